"""bench/ is run by hand (it is slow); here we only check that its scripts start and measure a tiny
model."""
import json
import subprocess
import sys

import pytest
import torch

import paligemma_fixture
from conftest import ROOT


@pytest.mark.parametrize("script", ["compare.py", "measure.py", "bandwidth.py", "checkpoints.py",
                                    "train.py", "batch.py", "llamacpp.py"])
def test_scripts_start(script):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout


def test_measure_runs_on_a_tiny_checkpoint(tmp_path):
    folder = paligemma_fixture.build(tmp_path / "pg", "pg2", check=False, unreachable_eos=True)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "measure.py"), "ours", "paligemma",
                        str(folder), "--new-tokens", "6", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["tokens"] == 6 and m["decode_tok_s"] > 0 and m["ttft_s"] > 0 and m["peak_rss_mb"] > 0
    assert m["decode_bytes"] > 0 and 0 < m["anon_mb"] <= m["peak_rss_mb"]


@pytest.mark.parametrize("family, variant, tied", [("paligemma", "pg2", True),
                                                   ("smolvlm", "v1", False),
                                                   ("perception_lm", "1b", True),
                                                   ("perception_lm", "8b", False)])
def test_decode_bytes_count_the_same_weights_in_both(tmp_path, family, variant, tied):
    """The bandwidth column divides by these bytes: the decoder and the LM head, a token embedding
    only when it is the head; the same count for our model and for transformers' on one
    checkpoint."""
    import importlib
    sys.path.insert(0, str(ROOT / "bench"))
    import measure
    fixture = importlib.import_module(f"{family}_fixture")
    folder = fixture.build(tmp_path / variant, variant, check=False)
    ours, _ = measure.load("ours", family, folder, torch.float32)
    hf, _ = measure.load("hf", family, folder, torch.float32)
    text = [p for n, p in ours.named_parameters() if not n.startswith(measure.VISION_PREFIXES)]
    text_model = "model.text_model" if family == "smolvlm" else "language_model"
    embedding = ours.get_submodule(text_model).embed_tokens.weight
    expected = sum(p.numel() * 4 for p in text) - (0 if tied else embedding.numel() * 4)
    assert measure.decode_bytes(ours) == measure.decode_bytes(hf) == expected


def test_batch_runs_on_a_tiny_checkpoint(tmp_path):
    """bench/batch.py: ours --batch, transformers' batched generate and a one-image run, each
    giving every image its tokens (the script checks), and a table row each."""
    import smolvlm_fixture
    folder = smolvlm_fixture.build(tmp_path / "smol", "v1", check=False, unreachable_eos=True)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "batch.py"), "smolvlm", str(folder),
                        "--images", "3", "--new-tokens", "3", "--batch-sizes", "2",
                        "--transformers-batch-size", "2", "--one-by-one", "1",
                        "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| run", "| ours --batch --batch-size 2", "| transformers generate, batches of 2",
        "| ours, 3 one-image runs (1 timed, scaled)"]
