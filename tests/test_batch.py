"""--batch in the three CLIs (batch_runner.py): a folder of fixture images (valid ones of different
sizes, a truncated PNG, a text file named .jpg) answered --batch-size at a time, one JSON line each;
the lines equal the one-image CLI's answers (int8 too), whatever the batch size, even with an image
too long for the context; --output-jsonl appended a batch at a time; --resume after a killed run,
retrying failed images in their place, dropping a line cut by a crash, refusing a file made with
other settings; temporary files that follow no planted link; the progress lines (stderr only), the
tiles' encoding line and PerceptionLM's note on many tiles."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batch_runner
import command_line
import common
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import smolvlm
import smolvlm_fixture
from conftest import ROOT
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)
from helpers import assert_fails, cli_in_process

FAMILIES = {"paligemma": (paligemma, paligemma_fixture, "pg2", "caption en"),
            "smolvlm": (smolvlm, smolvlm_fixture, "v1", "Describe this image."),
            "perception_lm": (perception_lm, perception_lm_fixture, "1b", "Describe the image.")}
SIZES = [(90, 70), (50, 30), (64, 64), (31, 77), (40, 52)]
# the flags of a family that change its answers, as each line's "settings" records them
FAMILY_SETTINGS = {"paligemma": {"vae": None}, "smolvlm": {"raw": False},
                   "perception_lm": {"raw": False, "max_tiles": None}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return {family: fixture.build(root / family, variant, check=False)
            for family, (_, fixture, variant, _) in FAMILIES.items()}


def write_images(folder, sizes=SIZES, bad=True):
    """Noisy RGB pictures a.png, b.png, ...; with `bad`, a truncated PNG and a text file named as
    a JPEG among them. -> the folder's image paths in sorted order, and the bad ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{chr(ord('a') + i)}.png")
    bad_files = []
    if bad:
        whole = (folder / "a.png").read_bytes()
        (folder / "b_truncated.png").write_bytes(whole[:len(whole) // 2])
        (folder / "c_notes.jpg").write_text("not an image")
        bad_files = [str(folder / "b_truncated.png"), str(folder / "c_notes.jpg")]
    (folder / "readme.txt").write_text("not an image suffix: left out of the folder")
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    return paths, bad_files


def base_args(family, ckpt, n_tokens=8):
    module, _, _, prompt = FAMILIES[family]
    return module, ["--model", ckpt[family], "--dtype", "float32", "--prompt", prompt,
                    "--max-new-tokens", n_tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_lines_equal_one_image_answers(family, ckpt, tmp_path):
    paths, bad = write_images(tmp_path / "photos")
    module, args = base_args(family, ckpt)
    r = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", 2)
    assert r.returncode == 1
    # nothing but the final one-line error on stderr: it is not a terminal and --progress is off
    assert r.stderr == "error: 2 of 7 images failed (their lines say why)\n"
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["image"] for line in lines] == paths  # the input order, sorted, each once
    for line in lines:
        assert line["prompt"] == FAMILIES[family][3]
        assert line["settings"] == {"model": str(ckpt[family]), "quantize": None,
                                    "max_new_tokens": 8, "temperature": 0.0, "top_k": None,
                                    "top_p": None, "seed": None, "dtype": "float32",
                                    **FAMILY_SETTINGS[family]}
        if line["image"] in bad:
            assert set(line) == {"image", "prompt", "error", "settings"}
            assert "cannot be read" in line["error"] and "\n" not in line["error"]
            continue
        alone = cli_in_process(module, *args, "--image", line["image"])
        assert alone.returncode == 0, alone.stderr
        assert alone.stdout == line["text"] + "\n"  # batched greedy generation equals one image
        assert 0 < line["tokens"] <= 8 and line["seconds"] > 0
        if family == "paligemma":  # the answer's objects, as parse_objects reads them
            image = Image.open(line["image"])
            objects = paligemma.parse_objects(line["text"], image.width, image.height)
            assert line["objects"] == paligemma.json_objects(objects, [None] * len(objects))
    assert "truncated" in lines[paths.index(bad[0])]["error"]


def test_tokens_count_to_the_end_token(ckpt, tmp_path):
    """A row that ends early counts its tokens up to its end token, not the batch's padding."""
    paths, _ = write_images(tmp_path / "photos", bad=False)
    module, args = base_args("smolvlm", ckpt, n_tokens=40)
    r = cli_in_process(module, *args, "--batch", *paths, "--batch-size", 5)
    assert r.returncode == 0, r.stderr
    model, processor = smolvlm.load(str(ckpt["smolvlm"]), dtype=torch.float32)
    for line in map(json.loads, r.stdout.splitlines()):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "Describe this image."}]}])
        inputs = processor(text=[prompt], images=[[common.open_image(line["image"])]])
        ids = model.generate(**inputs, max_new_tokens=40)[0].tolist()
        assert line["tokens"] == len(ids)  # alone, generation stops at the end token


def test_paths_files_folders_patterns(ckpt, tmp_path):
    paths, _ = write_images(tmp_path / "photos", bad=False)
    sub = write_images(tmp_path / "photos" / "more", sizes=SIZES[:1], bad=False)[0]
    module, args = base_args("smolvlm", ckpt, n_tokens=2)
    pattern = str(tmp_path / "photos" / "[ab].png")
    r = cli_in_process(module, *args, "--batch", paths[2], pattern, tmp_path / "photos")
    assert r.returncode == 0, r.stderr
    images = [json.loads(line)["image"] for line in r.stdout.splitlines()]
    assert images == [paths[2], paths[0], paths[1]] + paths[3:]  # each once, first place kept
    r = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--recursive")
    assert [json.loads(line)["image"] for line in r.stdout.splitlines()] == sorted(paths + sub)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_batch_flags_fail_before_the_model_loads(family, tmp_path):
    """Each is one line and exit 1 before any loading: the model path does not even exist."""
    module, args = base_args(family, {family: tmp_path / "no model here"})
    (tmp_path / "empty").mkdir()
    photos = write_images(tmp_path / "photos", bad=False)[0]
    (tmp_path / "old.jsonl").write_text("earlier lines\n")
    cases = [(["--batch", tmp_path / "empty"], "holds no images"),
             (["--batch", tmp_path / "*.webp"], "matches no file"),
             (["--batch", tmp_path / "missing.png"], "no such file or folder"),
             (["--batch", photos[0], "--batch-size", 0], "batch-size must be positive"),
             (["--batch", photos[0], "--resume"], "--resume needs --output-jsonl"),
             (["--batch", photos[0], "--image", photos[0]], "not both"),
             (["--batch", photos[0], "--output-jsonl", tmp_path / "old.jsonl"], "exists"),
             (["--batch", photos[0], "--output-jsonl", tmp_path / "old.jsonl", "--resume"],
              "cannot be resumed"),
             (["--batch", photos[0], "--output-jsonl", tmp_path / "no" / "x.jsonl"],
              "no such folder")]
    if family == "paligemma":  # a segment prompt needs the mask decoder: offline, none is cached
        cases += [(["--batch", photos[0], "--json"], "--batch lines carry the objects"),
                  (["--batch", photos[0], "--prompt", "segment cat"], "is not cached")]
    else:
        cases += [(["--batch", photos[0], "--video", "clip.mp4"], "--batch answers images")]
    for extra, message in cases:
        assert_fails(cli_in_process(module, *args, *extra), message)
    assert (tmp_path / "old.jsonl").read_text() == "earlier lines\n"  # never touched


def test_output_jsonl_is_the_stdout_lines(ckpt, tmp_path):
    paths, _ = write_images(tmp_path / "photos")
    module, args = base_args("paligemma", ckpt)
    out = tmp_path / "labels.jsonl"
    to_file = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", 3,
                             "--output-jsonl", out)
    to_stdout = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", 3)
    assert to_file.returncode == to_stdout.returncode == 1
    assert to_file.stdout == ""
    written = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in to_stdout.stdout.splitlines()]
    for line in written + printed:
        line.pop("seconds", None)  # timings differ from run to run
    assert written == printed and len(written) == len(paths)
    assert sorted(os.listdir(tmp_path)) == ["labels.jsonl", "photos"]  # no temporary file left


def test_resume_after_a_killed_run(ckpt, tmp_path):
    """A real process killed once its first batch is on disk; --resume then answers the rest: each
    image exactly once, in order, the same lines as a run that was never interrupted."""
    folder = smolvlm_fixture.build(tmp_path / "slow", "v1", check=False, unreachable_eos=True)
    paths, _ = write_images(tmp_path / "photos", bad=False)
    out = tmp_path / "labels.jsonl"
    args = ["--model", folder, "--dtype", "float32", "--prompt", "Describe this image.",
            "--max-new-tokens", 300, "--batch", tmp_path / "photos", "--batch-size", 2,
            "--output-jsonl", out]
    process = subprocess.Popen([sys.executable, str(ROOT / "smolvlm.py"), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 900  # a loaded machine can take minutes to start it
    while not out.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    stdout, _ = process.communicate()
    assert process.returncode == -signal.SIGKILL and stdout == b""
    first = out.read_text().splitlines()
    assert 0 < len(first) < len(paths)  # killed mid-run, with whole lines only
    resumed = cli_in_process(smolvlm, *args, "--resume", "--progress")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == ""
    assert f"{len(paths)}/{len(paths)} images" not in resumed.stderr  # only the rest was to do
    assert f"{len(paths) - len(first)}/{len(paths) - len(first)} images" in resumed.stderr
    lines = out.read_text().splitlines()
    assert lines[:len(first)] == first  # what was written is kept
    assert [json.loads(line)["image"] for line in lines] == paths
    whole = cli_in_process(smolvlm, *args[:-2])
    assert whole.returncode == 0, whole.stderr
    assert [json.loads(line)["image"] for line in whole.stdout.splitlines()] == paths
    for resumed_line, whole_line in zip(lines, whole.stdout.splitlines()):
        resumed_record = json.loads(resumed_line)
        whole_record = json.loads(whole_line)
        assert resumed_record.pop("seconds") > 0 and whole_record.pop("seconds") > 0
        assert resumed_record == whole_record and resumed_record["tokens"] == 300


def test_progress_goes_to_stderr_only(ckpt, tmp_path):
    paths, _ = write_images(tmp_path / "photos", bad=False)
    module, args = base_args("perception_lm", ckpt, n_tokens=3)
    quiet = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", 2)
    shown = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", 2,
                           "--progress")
    assert quiet.returncode == shown.returncode == 0
    assert quiet.stderr == ""
    quiet_lines = [json.loads(line) for line in quiet.stdout.splitlines()]
    shown_lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [line["image"] for line in shown_lines] == paths
    for line in quiet_lines + shown_lines:
        assert "error" not in line and line.pop("seconds") > 0
    assert shown_lines == quiet_lines  # the same answers, with or without progress
    progress = shown.stderr.splitlines()
    assert [line.split(" images,")[0] for line in progress] == ["2/5", "4/5", "5/5"]
    assert all("images/s" in line and line.endswith(" left") for line in progress)


def test_encoding_line_counts_tiles_after_two_seconds(monkeypatch, capsys):
    """A fake clock at 1.5 s a call: the first tile (1.5 s) is shown no line, the later ones are."""
    clock = iter(np.arange(0, 100, 1.5))
    monkeypatch.setattr(command_line.time, "perf_counter", lambda: float(next(clock)))
    vision = torch.nn.Identity()
    inputs = {"pixel_values": torch.ones(1, 3, 3, 4, 4), "pixel_attention_mask": torch.ones(3)}
    with command_line.encoding_progress(vision, inputs, shown=True):
        for _ in range(3):
            vision(torch.ones(1, 3, 4, 4))
    assert capsys.readouterr().err == "encoding 3 tiles: 2/3\nencoding 3 tiles: 3/3\n"
    with command_line.encoding_progress(vision, inputs, shown=False):
        vision(torch.ones(3, 3, 4, 4))
    assert capsys.readouterr().err == ""
    vision(torch.ones(1, 3, 4, 4))  # the hook is gone after the prefill
    assert capsys.readouterr().err == ""


def test_padding_tiles_are_not_counted():
    pixels = torch.ones(2, 3, 3, 4, 4)
    pixels[1, 2] = 0  # row 1 has two tiles, padded with a third all-zero one
    assert command_line.count_tiles({"pixel_values": pixels, "pixel_values_videos": pixels[0]}) == 8


def test_perception_lm_notes_many_tiles(ckpt, tmp_path):
    """A 280 px square with --max-tiles 20 becomes a 4x4 grid and the thumbnail: 17 tiles. One
    stderr line, once per run, says so; a 5-tile image gets none."""
    big = tmp_path / "big.png"
    Image.fromarray(np.full((280, 280, 3), 120, dtype=np.uint8)).save(big)
    module, args = base_args("perception_lm", ckpt, n_tokens=2)
    r = cli_in_process(module, *args, "--image", big, "--max-tiles", 20)
    assert r.returncode == 0, r.stderr
    # the fixture's 56 px tiles are 4 tokens each (14 px patches, 2x2 pooling)
    assert r.stderr.startswith("note: an image becomes 17 tiles, 68 tokens, slow on a CPU")
    assert r.stderr.count("\n") == 1 and "--max-tiles" in r.stderr
    r = cli_in_process(module, *args, "--batch", big, big.parent / "*.png", tmp_path / "big.png",
                       "--max-tiles", 20)
    assert r.returncode == 0 and r.stderr.count("note:") == 1 and len(r.stdout.splitlines()) == 1
    small = write_images(tmp_path / "photos", sizes=SIZES[:1], bad=False)[0]
    # the checkpoint's own cap of 4 tiles: 5 with the thumbnail, no note
    assert cli_in_process(module, *args, "--image", small[0]).stderr == ""


def test_one_image_cli_shows_the_tiles_being_encoded(ckpt, tmp_path, monkeypatch):
    """The one-image CLI wires the hook to PerceptionLM's vision tower (one tile a call): with a
    clock at 1 s a call the prefill is 'long', and stderr counts the 5 tiles; stdout is the
    answer."""
    image = write_images(tmp_path / "photos", sizes=SIZES[:1], bad=False)[0][0]
    module, args = base_args("perception_lm", ckpt, n_tokens=3)
    quiet = cli_in_process(module, *args, "--image", image)
    clock = iter(range(10_000))
    monkeypatch.setattr(command_line.time, "perf_counter", lambda: float(next(clock)))
    shown = cli_in_process(module, *args, "--image", image, "--progress")
    assert shown.returncode == quiet.returncode == 0
    assert shown.stdout == quiet.stdout and quiet.stderr == ""
    counts = [line for line in shown.stderr.splitlines() if line.startswith("encoding")]
    assert counts[-1] == "encoding 5 tiles: 5/5" and len(counts) >= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_reaches_load(family, ckpt, tmp_path, monkeypatch):
    """--quantize is passed to load() on the one-image path."""
    module, _, _, prompt = FAMILIES[family]
    seen = []

    def fake_load(model, device=None, dtype=None, quantize=None):
        seen.append(quantize)
        raise common.VLMError("stopped after load")

    monkeypatch.setattr(module, "load", fake_load)
    paths, _ = write_images(tmp_path / "images", bad=False)
    r = cli_in_process(module, "--model", ckpt[family], "--image", paths[0], "--prompt", prompt,
                       "--quantize", "int8")
    assert_fails(r, "stopped after load")
    assert seen == ["int8"]


def test_quantized_batch_equals_quantized_one_image_answers(ckpt, tmp_path):
    """A real int8 --batch: its lines are the one-image CLI's answers with --quantize int8, and
    (int8 changes some answer of this fixture) not all the float32 ones."""
    paths, _ = write_images(tmp_path / "photos", bad=False)
    module, args = base_args("smolvlm", ckpt)
    r = cli_in_process(module, *args, "--batch", *paths, "--batch-size", 3, "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["image"] for line in lines] == paths
    float32 = []
    for line in lines:
        assert line["settings"]["quantize"] == "int8"
        alone = cli_in_process(module, *args, "--image", line["image"], "--quantize", "int8")
        assert alone.returncode == 0, alone.stderr
        assert alone.stdout == line["text"] + "\n"
        float32.append(cli_in_process(module, *args, "--image", line["image"]).stdout)
    assert float32 != [line["text"] + "\n" for line in lines]


def records(text):
    """JSON lines -> their records without the timings (which differ from run to run)."""
    out = []
    for line in text.splitlines():
        record = json.loads(line)
        record.pop("seconds", None)
        out.append(record)
    return out


def test_resume_retries_failed_images_in_their_place(ckpt, tmp_path):
    """A kept line with an error is an image to do again: its new line takes the old one's place
    (input order, even when a later batch appends it), the lines kept stay as they were, and an
    image that fails again still has one line."""
    paths, bad = write_images(tmp_path / "photos")
    module, args = base_args("smolvlm", ckpt)
    out = tmp_path / "labels.jsonl"
    batch = ["--batch", tmp_path / "photos", "--output-jsonl", out]
    first = cli_in_process(module, *args, *batch, "--batch-size", 2)
    assert first.stderr == "error: 2 of 7 images failed (their lines say why)\n"
    good = [line for line in out.read_text().splitlines() if "error" not in json.loads(line)]
    assert len(good) == 5
    Image.open(paths[0]).save(bad[0])  # the truncated PNG mended; the text file is still one
    # one image a batch: the mended one rewrites the file, the other is appended after e.png
    again = cli_in_process(module, *args, *batch, "--resume", "--batch-size", 1)
    assert again.stderr == "error: 1 of 7 images failed (their lines say why)\n"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["image"] for line in lines] == paths
    assert "text" in lines[paths.index(bad[0])]
    assert "cannot identify image file" in lines[paths.index(bad[1])]["error"]
    Image.open(paths[3]).save(bad[1], format="JPEG")  # the text file becomes a picture
    last = cli_in_process(module, *args, *batch, "--resume")
    assert last.returncode == 0, last.stderr
    assert set(good) <= set(out.read_text().splitlines())  # kept byte for byte
    fresh = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", 2)
    assert fresh.returncode == 0, fresh.stderr
    assert records(out.read_text()) == records(fresh.stdout)  # each image once, in input order


def test_resume_refuses_a_file_made_with_other_settings(ckpt, tmp_path):
    """Each line records what its answer depends on; --resume with another prompt or such a flag
    is one line, exit code 1, the file untouched. Flags that do not change answers may change."""
    write_images(tmp_path / "photos", sizes=SIZES[:2], bad=False)
    module, args = base_args("smolvlm", ckpt, n_tokens=2)
    out = tmp_path / "labels.jsonl"
    batch = ["--batch", tmp_path / "photos", "--output-jsonl", out, "--resume"]
    assert cli_in_process(module, *args, *batch).returncode == 0
    written = out.read_bytes()
    (tmp_path / "link").symlink_to(ckpt["smolvlm"])  # the same files, named another way
    others = {"--prompt": ["What is it?"], "--model": [tmp_path / "link"],
              "--max-new-tokens": [3], "--temperature": [0.5], "--top-k": [3], "--top-p": [0.5],
              "--seed": [1], "--quantize": ["int8"], "--dtype": ["bfloat16"], "--raw": []}
    for flag, value in others.items():
        r = cli_in_process(module, *args, *batch, flag, *value)
        assert_fails(r, f"labels.jsonl line 1 was made with another {flag} (")
        assert out.read_bytes() == written
    same = cli_in_process(module, *args, *batch, "--batch-size", 1, "--progress")
    assert same.returncode == 0 and same.stdout == "" and out.read_bytes() == written


def test_resume_does_a_line_cut_by_a_crash_again(ckpt, tmp_path):
    """A last line without its newline was cut by a crash: dropped, its image done again. A bad
    line elsewhere, or an unfinished last one that is no line of ours, is refused."""
    paths, _ = write_images(tmp_path / "photos", bad=False)
    module, args = base_args("smolvlm", ckpt, n_tokens=4)
    out = tmp_path / "labels.jsonl"
    batch = ["--batch", tmp_path / "photos", "--batch-size", 2, "--output-jsonl", out]
    assert cli_in_process(module, *args, *batch).returncode == 0
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    kept = whole[:-len(lines[-1])]
    for cut in (len(whole) - 1, len(kept) + 30, len(kept) + 3):  # in the line, in '{"image"'
        out.write_bytes(whole[:cut])
        r = cli_in_process(module, *args, *batch, "--resume")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes().startswith(kept)
        assert records(out.read_text()) == records(whole.decode())
    for number, text in ((2, b"".join([lines[0], b"not json\n"] + lines[2:])),
                         (6, whole + b"earlier notes")):
        out.write_bytes(text)
        r = cli_in_process(module, *args, *batch, "--resume")
        assert_fails(r, f"labels.jsonl line {number} is not a line --output-jsonl writes")
        assert out.read_bytes() == text


class FakeModel(torch.nn.Module):
    """A stand-in for a model in an Answerer: every image's answer is the ids 5, 6, 7 and the end
    token 2, computed from nothing."""
    stop = {2}

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed):
        return torch.tensor([[5, 6, 7, 2]] * len(input_ids))


def bytes_written():
    """What this process has passed to write() so far (Linux counts it in /proc/self/io)."""
    for line in open("/proc/self/io").read().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])


def test_output_jsonl_appends_each_batch(tmp_path, monkeypatch):
    """3,000 images, 10 a batch, into --output-jsonl: each batch writes its own lines and no more
    (the bytes this process writes, counted between batches), not the whole file so far."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3000):
        Image.new("RGB", (2, 2)).save(folder / f"{i:04d}.png")
    out = tmp_path / "labels.jsonl"
    args = command_line.cli_parser("", "fake").parse_args(
        ["--batch", str(folder), "--batch-size", "10", "--output-jsonl", str(out), "--progress",
         "--dtype", "float32"])
    counts = [bytes_written()]

    def after_each_batch(text, terminal):
        counts.append(bytes_written())

    def make_inputs(images):
        return {"input_ids": torch.zeros(len(images), 1, dtype=torch.long)}

    def decode(ids):
        return "an answer"

    def fake_answerer(args):
        return batch_runner.Answerer(FakeModel(), decode, make_inputs, torch.nn.Identity(), args)

    monkeypatch.setattr(batch_runner, "show_status", after_each_batch)
    batch_runner.Batch(args).run(fake_answerer)
    per_batch = [later - earlier for earlier, later in zip(counts, counts[1:])]
    lines = out.read_text().splitlines()
    assert len(per_batch) == 300 and len(lines) == 3000
    assert [json.loads(line)["image"] for line in lines] == [str(folder / f"{i:04d}.png")
                                                              for i in range(3000)]
    batch_bytes = len(out.read_bytes()) / 300
    assert min(per_batch) > 0.9 * batch_bytes and max(per_batch) < 1.1 * batch_bytes


def test_one_long_image_fails_only_itself(ckpt, tmp_path):
    """A SmolVLM fixture with a context of 100 tokens: with 8 new tokens a 90x70 picture (a prompt
    of 122 tokens) cannot be answered, the others (47 to 74) can. A batch with it fails and is
    done again row by row: every line is the same with --batch-size 1 and 3."""
    short = tmp_path / "short context"
    short.mkdir()
    for f in Path(ckpt["smolvlm"]).iterdir():
        if f.name != "config.json":
            (short / f.name).symlink_to(f)
    config = json.loads((Path(ckpt["smolvlm"]) / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 100
    (short / "config.json").write_text(json.dumps(config))
    paths, _ = write_images(tmp_path / "photos", sizes=[(400, 10), (90, 70), (10, 400), (31, 77)],
                            bad=False)
    module, args = base_args("smolvlm", {"smolvlm": short})
    by_size = {}
    for size in (1, 3):
        r = cli_in_process(module, *args, "--batch", tmp_path / "photos", "--batch-size", size)
        assert r.stderr == "error: 1 of 4 images failed (their lines say why)\n"
        by_size[size] = records(r.stdout)
    assert by_size[3] == by_size[1]
    assert [line["image"] for line in by_size[3]] == paths
    assert "exceed the model's context of 100 tokens" in by_size[3][1]["error"]
    assert all("text" in line for line in by_size[3][:1] + by_size[3][2:])


def test_temporary_files_follow_no_planted_link(ckpt, tmp_path):
    """A link planted at the temporary name the writes used to take ({path}.{pid}.tmp), pointing
    at a victim: --output-jsonl and PaliGemma's --output write their files, each with the
    permissions open() gives, and the victim stays as it was."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    paths, _ = write_images(tmp_path / "photos", sizes=SIZES[:1], bad=False)
    module, args = base_args("paligemma", ckpt)
    out = tmp_path / "labels.jsonl"
    picture = tmp_path / "drawn.png"
    for target in (out, picture):
        Path(f"{target}.{os.getpid()}.tmp").symlink_to(victim)
    r = cli_in_process(module, *args, "--batch", paths[0], "--output-jsonl", out)
    assert r.returncode == 0, r.stderr
    r = cli_in_process(module, *args, "--image", paths[0], "--output", picture)
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "precious"
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == paths
    assert Image.open(picture).size == Image.open(paths[0]).size
    umask = os.umask(0o022)
    os.umask(umask)
    for target in (out, picture):
        assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert len(os.listdir(tmp_path)) == 6  # the victim, photos, the two files, the two links
