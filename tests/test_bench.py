"""bench/ is run by hand (it is slow); here we only check that its scripts start and measure a tiny model."""
import json
import subprocess
import sys

import pytest

import paligemma_fixture
from conftest import ROOT


@pytest.mark.parametrize("script", ["compare.py", "measure.py", "bandwidth.py", "checkpoints.py"])
def test_scripts_start(script):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout


def test_measure_runs_on_a_tiny_checkpoint(tmp_path):
    folder = paligemma_fixture.build(tmp_path / "pg", "pg2", check=False, unreachable_eos=True)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "measure.py"), "ours", "paligemma", str(folder),
                        "--new-tokens", "6", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["tokens"] == 6 and m["decode_tok_s"] > 0 and m["ttft_s"] > 0 and m["peak_rss_mb"] > 0
    assert m["decode_bytes"] > 0
