"""Bad input and hostile files across paligemma.py, smolvlm.py and perception_lm.py: one clear line,
exit code 1, nothing lost.

Every case runs the real CLI (in this process through command_line.run_cli, which is what
`python <file>.py` runs; as a real process for a few, among them bytes that are not UTF-8 in argv)
or the Python API, and asserts exit code 1, exactly one stderr line `error: ...` saying what is
wrong, and nothing on stdout; the API raises common.VLMError with the same message. Accepted image
formats run the CLI to the end and are converted as transformers converts them. A case that applies
to several files is parametrized over them (video cases: SmolVLM2 and PerceptionLM).

The checkpoints are the per-family test fixtures; test_<family>.py proves that transformers loads
them cleanly, so here they are built without that check (check=False), once per session."""
import io
import json
import os
import pickle
import re
import tokenize
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import common
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import smolvlm
import smolvlm_fixture
from common import VLMError
from conftest import ROOT
from helpers import (assert_fails, assert_same_inputs, cli_in_process,  # noqa: F401
                     make_audio, make_video, one_thread, run_cli)
from hub import save_safetensors

FAMILIES = ["paligemma", "smolvlm", "perception_lm"]
VIDEO = ["smolvlm", "perception_lm"]  # SmolVLM2 and PerceptionLM take videos
MODULES = {"paligemma": paligemma, "smolvlm": smolvlm, "perception_lm": perception_lm}
IMAGE_TOKEN = {"paligemma": "<image>", "smolvlm": "<image>", "perception_lm": "<|image|>"}
# What differs per family: a weight and the decoder's final norm (hub names), a prompt longer than
# the fixture's context, the flags for a prompt with two image placeholders for one image, and what
# the processor says to it.
SPEC = {
    "paligemma": dict(key="multi_modal_projector.linear.bias",
                      norm="language_model.model.norm.weight", name="PaliGemma",
                      long_prompt="x" * 9000, two_placeholders=["--prompt", "<image><image>two?"],
                      placeholder_error="the prompts have 2 <image> placeholders but 1 images "
                                        "were given"),
    "smolvlm": dict(key="model.connector.modality_projection.proj.weight",
                    norm="model.text_model.norm.weight", name="SmolVLM", long_prompt="cow " * 9000,
                    two_placeholders=["--raw", "--prompt", "<image><image>two?"],
                    placeholder_error="the prompts have [2] <image> placeholders but [1] images "
                                      "were given (per prompt)"),
    "perception_lm": dict(key="model.multi_modal_projector.linear_1.bias",
                          norm="model.language_model.norm.weight",
                          name="PerceptionLM", long_prompt="word " * 12000,
                          two_placeholders=["--raw", "--prompt", "<|image|><|image|>two?"],
                          placeholder_error="the prompts have 2 <|image|> placeholders but 1 "
                                            "images were given"),
}


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors_ckpt")
    return {"paligemma": paligemma_fixture.build(root / "pg1", "pg1", check=False),
            "smolvlm": smolvlm_fixture.build(root / "v2", "v2", check=False),
            # SmolVLM 1: no video
            "smolvlm1": smolvlm_fixture.build(root / "v1", "v1", check=False),
            "perception_lm": perception_lm_fixture.build(root / "1b", "1b", check=False)}


@pytest.fixture(scope="session")
def loaded(ckpt):
    return {f: MODULES[f].load(str(ckpt[f])) for f in FAMILIES}


def derived(src, dst, drop=(), files=None, state=None):
    """A checkpoint directory like `src` (its files linked, not copied), without the files in
    `drop`, with the text `files` (name -> str) written, and with `state` as its weights when
    given."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if (f.name not in drop and f.name not in (files or {})
                and not (state is not None and f.name == "model.safetensors")):
            (dst / f.name).symlink_to(f)
    for name, text in (files or {}).items():
        (dst / name).write_text(text, encoding="utf-8")
    if state is not None:
        save_file(state, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Good and bad image and video files, written once."""
    d = tmp_path_factory.mktemp("errors_media")
    rng = np.random.default_rng(0)
    f = {"dir": d, "good": d / "ok.png"}
    Image.new("RGB", (20, 20), "red").save(f["good"])
    base = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    f["base"] = d / "base.png"
    base.save(f["base"])
    # bad images
    (d / "zero.jpg").write_bytes(b"")
    base.save(d / "full.jpg", quality=95)
    full = (d / "full.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(full[:len(full) // 2])
    (d / "cut.png").write_bytes(f["base"].read_bytes()[:len(f["base"].read_bytes()) // 2])
    (d / "notes.jpg").write_text("not an image, just text\n")
    # 10 gigapixels declared, a few bytes of data
    (d / "bomb.png").write_bytes(png_header(100_000, 100_000))
    # 120 megapixels: PIL only warns, then no data
    (d / "big.png").write_bytes(png_header(12_000, 10_000))
    # accepted images
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)))
    rgba.save(d / "rgba.png")
    base.convert("LA").save(d / "la.png")
    base.convert("P").save(d / "p.png", transparency=3)
    base.convert("L").save(d / "l.png")
    base.convert("1").save(d / "bilevel.png")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 200).save(d / "i16.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    base.save(d / "exif.jpg", exif=exif)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(d / "one.png")
    Image.fromarray(rng.integers(0, 256, (20, 4000, 3), dtype=np.uint8)).save(d / "wide.png")
    base.save(d / "anim.gif", save_all=True, append_images=[Image.new("RGB", (60, 40), "blue")])
    base.save(d / "lossless.webp", lossless=True)
    base.save(d / "b.bmp")
    base.save(d / "png_named.jpg", format="PNG")
    (d / "dir with spaces é 猫").mkdir()
    base.save(d / "dir with spaces é 猫" / "photo ü.png")
    # videos
    f["clip"] = make_video(d / "clip.mp4", 20, 10, size=(16, 16))
    mp4 = f["clip"].read_bytes()
    # mp4 keeps its index at the end: cut, it is gone
    (d / "cut.mp4").write_bytes(mp4[:int(len(mp4) * 0.6)])
    mkv = make_video(d / "clip.mkv", 20, 10, size=(16, 16)).read_bytes()
    (d / "cut.mkv").write_bytes(mkv[:int(len(mkv) * 0.8)])  # Matroska decodes up to the cut
    # the header, cut at the first cluster
    (d / "empty.mkv").write_bytes(mkv[:mkv.index(bytes.fromhex("1F43B675")) + 4])
    (d / "notes.mp4").write_text("not a video, just text\n")
    make_audio(d / "voice.m4a")
    return f


def png_header(w, h):
    """A PNG declaring w x h pixels with a few bytes of pixel data."""
    import struct
    import zlib

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def cli(family, ckpt, *args, model=None):
    return cli_in_process(MODULES[family], "--model", model or ckpt[family],
                          "--max-new-tokens", "2", *args)


# ----------------------------------------------------------------------------- images

BAD_IMAGES = {  # file -> what the one line says (after "image <path> cannot be read (")
    "missing path": ("nope.png", "No such file or directory"),
    "a directory": (".", "Is a directory"),
    "0-byte file": ("zero.jpg", "cannot identify image file"),
    "truncated JPEG": ("cut.jpg", "image file is truncated"),
    "truncated PNG": ("cut.png", "image file is truncated"),
    "text file named .jpg": ("notes.jpg", "cannot identify image file"),
    "decompression bomb": ("bomb.png", "could be decompression bomb"),
    # PIL's warning must not add a line
    "120 MP declared, no data": ("big.png", "image file is truncated"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_image_file(family, case, ckpt, media):
    name, message = BAD_IMAGES[case]
    path = media["dir"] / name
    if (family, case) == ("paligemma", "missing path"):  # one through a real process
        r = run_cli(f"{family}.py", "--model", ckpt[family], "--image", path)
    else:
        r = cli(family, ckpt, "--image", path)
    assert_fails(r, f"image {path} cannot be read (")
    assert message in r.stderr


def image_call(family, images, text=None):
    """The processor arguments for one prompt with these images."""
    text = text or ("caption en" if family == "paligemma"
                    else IMAGE_TOKEN[family] * len(images) + "x")
    return dict(text=[text], images=images if family == "perception_lm" else [images])


@pytest.mark.parametrize("image", ["empty PIL image", "RGBA array"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_image_object_in_the_api(family, image, loaded):
    """Through the API an image may be a PIL image or an (H, W, 3) array: an empty one or a
    4-channel array is refused in one line, not turned into a wrong tensor or a traceback deep in a
    resize."""
    im, shape = (Image.new("RGB", (0, 5)), "(5, 0, 3)") if image == "empty PIL image" else \
        (np.zeros((8, 8, 4), np.uint8), "(8, 8, 4)")
    message = f"an image must be (H, W, 3) pixels with H, W > 0, got shape {shape}"
    with pytest.raises(VLMError, match=re.escape(message)):
        loaded[family][1](**image_call(family, [im]))


def rgb(path):
    from transformers.image_transforms import convert_to_rgb
    return convert_to_rgb(Image.open(path), return_numpy=True)


def exif_upright(path):
    from transformers.image_utils import load_image
    return np.asarray(load_image(str(path)))


def first_gif_frame(path):
    from transformers.image_transforms import convert_to_rgb
    with Image.open(path) as im:
        first = convert_to_rgb(im, return_numpy=True)
        im.seek(1)
        # taking frame 2 would fail
        assert not np.array_equal(first, convert_to_rgb(im, return_numpy=True))
    return first


# file -> the reference our processor output must equal: transformers' own conversion
# (convert_to_rgb on the opened file, load_image for EXIF), transformers' processor ("hf"), or the
# same image saved as PNG ("base").
ACCEPTED = {
    "RGBA": ("rgba.png", rgb), "LA": ("la.png", rgb), "P with transparency": ("p.png", rgb),
    "L": ("l.png", rgb), "1 (bilevel)": ("bilevel.png", rgb), "I;16": ("i16.png", rgb),
    "CMYK": ("cmyk.jpg", rgb),
    "EXIF-rotated JPEG": ("exif.jpg", exif_upright),
    "1x1": ("one.png", "hf"), "4000x20": ("wide.png", "hf"),
    "GIF (first frame)": ("anim.gif", first_gif_frame),
    "WEBP": ("lossless.webp", "base"), "BMP": ("b.bmp", "base"),
    "PNG named .jpg": ("png_named.jpg", "base"),
    "spaces, non-ASCII path": ("dir with spaces é 猫/photo ü.png", "base"),
}


# what PIL opens each file as: the case tests what it says
MODES = {"RGBA": "RGBA", "LA": "LA", "P with transparency": "P", "L": "L", "1 (bilevel)": "1",
         "I;16": "I;16", "CMYK": "CMYK", "GIF (first frame)": "P"}


@pytest.fixture(scope="session")
def hf_processors(ckpt):
    from transformers import AutoProcessor
    return {f: AutoProcessor.from_pretrained(ckpt[f]) for f in FAMILIES}


@pytest.mark.parametrize("case", ACCEPTED)
@pytest.mark.parametrize("family", FAMILIES)
def test_accepted_image(family, case, ckpt, media, loaded, request):
    name, reference = ACCEPTED[case]
    path = media["dir"] / name
    with Image.open(path) as im:
        assert (im.mode == MODES.get(case, "RGB")
                and (case != "P with transparency" or "transparency" in im.info))
    r = cli(family, ckpt, "--image", path)
    # the answer, streamed
    assert r.returncode == 0 and r.stderr == "" and r.stdout.endswith("\n"), r.stderr
    proc = loaded[family][1]
    ours = proc(**image_call(family, [path]))
    if reference == "hf":
        # transformers' processor on the image opened by PIL: equal, shapes and values
        hproc = request.getfixturevalue("hf_processors")[family]
        theirs = hproc(**image_call(family, [Image.open(path).convert("RGB")]), return_tensors="pt",
                       padding=True)
        assert_same_inputs(ours, theirs)
    else:  # our conversion equals the reference, and so do the pixels the processor makes of it
        expected = np.asarray(Image.open(media["base"])) if reference == "base" else reference(path)
        assert np.array_equal(common.image_tensor(path).permute(1, 2, 0).numpy(), expected)
        of_expected = proc(**image_call(family, [expected]))
        assert torch.equal(ours["pixel_values"], of_expected["pixel_values"])
        if case == "EXIF-rotated JPEG":
            # upright: the stored 60x40 picture displays 40 wide, 60 tall
            assert expected.shape[:2] == (60, 40)


# ----------------------------------------------------------------------------- videos

BAD_VIDEOS = {
    "missing": ("nope.mp4", "cannot be read (No such file or directory)"),
    "a directory": (".", "cannot be read (Is a directory)"),
    "not a video": ("notes.mp4", "cannot be read (Invalid data found when processing input)"),
    "truncated mp4": ("cut.mp4", "cannot be read ("),
    "truncated mkv": ("cut.mkv", "is truncated or damaged: only "),
    "no decodable frames": ("empty.mkv", "has no decodable frames"),
    "audio only": ("voice.m4a", "has no video stream"),
}


@pytest.mark.parametrize("case", BAD_VIDEOS)
@pytest.mark.parametrize("family", VIDEO)
def test_bad_video(family, case, ckpt, media):
    name, message = BAD_VIDEOS[case]
    path = media["dir"] / name
    assert_fails(cli(family, ckpt, "--video", path), f"video {path} {message}")


VIDEO_FLAGS = {  # family, flags (a clip is added with {clip}), message
    "SmolVLM 1 given a video": ("smolvlm1", ["--video", "{clip}"],
                                "this SmolVLM 1 checkpoint does not take videos"),
    "image and video at once": ("smolvlm", ["--video", "{clip}", "--image", "{good}"],
                                "give images or videos in one call, not both"),
    "smolvlm --num-frames 0": ("smolvlm", ["--video", "{clip}", "--num-frames", "0"],
                               "error: num-frames must be positive, got 0"),
    "perception_lm --num-frames 0": ("perception_lm", ["--video", "{clip}", "--num-frames", "0"],
                                     "error: num-frames must be positive, got 0"),
}


@pytest.mark.parametrize("case", VIDEO_FLAGS)
def test_video_flags(case, ckpt, media):
    family, args, message = VIDEO_FLAGS[case]
    args = [a.format(clip=media["clip"], good=media["good"]) for a in args]
    module = MODULES["smolvlm" if family == "smolvlm1" else family]
    assert_fails(cli_in_process(module, "--model", ckpt[family], *args), message)


@pytest.fixture(scope="session")
def long_video(tmp_path_factory):
    """20 minutes at 5 fps (6000 frames), 16x16 pixels so that it is quick to write."""
    return make_video(tmp_path_factory.mktemp("long") / "long.mp4", 6000, 5, size=(16, 16),
                      pattern=lambda i, y, x: np.full((*y.shape, 3), i % 256, np.uint8))


@pytest.mark.parametrize("family", VIDEO)
def test_long_video_is_sampled_without_decoding_it_into_memory(family, loaded, long_video,
                                                               monkeypatch):
    """The decoder must run up to the last sampled frame (a codec decodes in order) but only the
    sampled frames may become pixel arrays, and decoding stops there: memory holds the samples,
    never the video."""
    counts = {"decoded": 0, "to_ndarray": 0}
    real_open = av.open

    class Frame:
        def __init__(self, frame):
            self.frame = frame

        def to_ndarray(self, **kw):
            counts["to_ndarray"] += 1
            return self.frame.to_ndarray(**kw)

    class Container:  # av's container, counting what is decoded and converted
        def __init__(self, c):
            self.c = c

        def __getattr__(self, name):
            return getattr(self.c, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.c.close()

        def decode(self, *streams):
            for frame in self.c.decode(*streams):
                counts["decoded"] += 1
                yield Frame(frame)

    monkeypatch.setattr(av, "open", lambda *a, **k: Container(real_open(*a, **k)))
    proc = loaded[family][1]
    if family == "smolvlm":
        picked = proc.sample_frames(6000, 5.0, 1200.0)
        n = proc(text=["<video>x"], videos=[long_video])["pixel_values"].shape[1]
    else:
        picked = perception_lm.uniform_frames(32)(6000, 5.0)
        n = proc(text=["<|video|>x"], videos=[long_video])["pixel_values_videos"].shape[1]
    assert n == len(picked) == counts["to_ndarray"] <= 64  # only the sampled frames become arrays
    assert counts["decoded"] == max(picked) + 1 < 6000  # and decoding stops after the last one


# ----------------------------------------------------------------------------- checkpoints

def bad_checkpoint(case, family, src, dst):
    """-> (the --model value, what the line says) for a broken checkpoint written under dst."""
    key = SPEC[family]["key"]
    other = {"paligemma": "smolvlm", "smolvlm": "perception_lm",
             "perception_lm": "paligemma"}[family]
    if case == "missing dir":
        message = f"{dst / 'nowhere'} is not a checkpoint directory nor a hub repo id (org/name)"
        return dst / "nowhere", message
    if case == "empty dir":
        dst.mkdir()
        return dst, f"{dst / 'config.json'} not found"
    if case == "another family":
        return src[other], f"holds a {other!r} checkpoint, not {SPEC[family]['name']}"
    if case == "invalid config.json":  # an error page saved as config.json
        files = {"config.json": "<!DOCTYPE html><html>404</html>"}
        return (derived(src[family], dst, files=files),
                f"{dst / 'config.json'} is not valid JSON (Expecting value: line 1 column 1")
    if case == "truncated safetensors":
        data = (src[family] / "model.safetensors").read_bytes()
        derived(src[family], dst, drop=["model.safetensors"])
        (dst / "model.safetensors").write_bytes(data[:len(data) // 2])
        return dst, (f"cannot read weights {dst / 'model.safetensors'}: "
                     "Error while deserializing header")
    if case == "a missing shard":  # two shards and their index, the second one not there
        derived(src[family], dst, drop=["model.safetensors"])
        save_safetensors(load_file(src[family] / "model.safetensors"), dst, shards=2)
        (dst / "model-00002-of-00002.safetensors").unlink()
        return dst, (f"cannot read weights {dst}/model-00002-of-00002.safetensors: "
                     "No such file or directory")
    state = load_file(src[family] / "model.safetensors")
    if case == "missing tensor":
        # named by its module path: PerceptionLM's drops the checkpoint's "model."
        del state[key]
        name = key.replace('model.multi', 'multi')
        return derived(src[family], dst, state=state), f"weight {name} is missing from {dst}"
    if case == "extra tensor":
        state["model.extra_head.weight"] = torch.zeros(2, 2)
        return (derived(src[family], dst, state=state),
                "unexpected tensor model.extra_head.weight in model.safetensors")
    if case == "mis-shaped tensor":
        expected = tuple(state[key].shape)
        state[key] = torch.zeros(3)
        return (derived(src[family], dst, state=state),
                f"tensor {key} has shape (3,), expected {expected}")
    if case == "no tokenizer.json":
        return (derived(src[family], dst, drop=["tokenizer.json"]),
                f"{dst / 'tokenizer.json'} cannot be read (No such file")
    raise KeyError(case)


CHECKPOINTS = ["missing dir", "empty dir", "another family", "invalid config.json",
               "truncated safetensors", "a missing shard", "missing tensor", "extra tensor",
               "mis-shaped tensor", "no tokenizer.json"]


@pytest.mark.parametrize("case", CHECKPOINTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_checkpoint(family, case, ckpt, media, tmp_path):
    model, message = bad_checkpoint(case, family, ckpt, tmp_path / "ckpt")
    assert_fails(cli(family, ckpt, "--image", media["good"], model=model), message)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub offline, with an empty cache; a helper makes snapshot_download raise a given
    error."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    response = type("R", (), {"status_code": 403, "headers": {}, "request": None, "url": "u",
                              "json": lambda s: {}})()

    def fail_with(error_class):
        def download(*a, **k):
            raise error_class("hub said no", response=response)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return fail_with


HUB = {"not cached, HF_HUB_OFFLINE=1": None,
       "gated, no token": ("is gated: accept its licence at "
                           "https://huggingface.co/plainvlm-tests/x, then `hf auth login`"),
       "not found": "was not found on the Hugging Face Hub (private repos need a login)"}


@pytest.mark.parametrize("case", HUB)
@pytest.mark.parametrize("family", FAMILIES)
def test_hub_repo_errors(family, case, hub, ckpt, media, tmp_path):
    from huggingface_hub import errors
    if case == "not cached, HF_HUB_OFFLINE=1":
        message = ("plainvlm-tests/x is not cached and the Hub cannot be reached "
                   "(HF_HUB_OFFLINE is set, or no network)")
    else:
        hub({"gated, no token": errors.GatedRepoError,
             "not found": errors.RepositoryNotFoundError}[case])
        message = f"plainvlm-tests/x {HUB[case]}"
    if (family, case) == ("paligemma", "not cached, HF_HUB_OFFLINE=1"):
        # a real process, set up as a user would
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty cache")}
        r = run_cli(f"{family}.py", "--model", "plainvlm-tests/x", "--image", media["good"],
                    env=env)
    else:
        r = cli(family, ckpt, "--image", media["good"], model="plainvlm-tests/x")
    assert_fails(r, message)


# ----------------------------------------------------------------------------- prompts and flags

FLAGS = {  # flags -> what the line says
    "--max-new-tokens 0": (["--max-new-tokens", "0"], "max-new-tokens must be positive, got 0"),
    "--max-new-tokens -1": (["--max-new-tokens", "-1"], "max-new-tokens must be positive, got -1"),
    "--temperature -1": (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    "--temperature nan": (["--temperature", "nan"], "temperature must be >= 0, got nan"),
    "--top-p 0": (["--top-p", "0", "--temperature", "1"], "top-p must be in (0, 1], got 0.0"),
    "--top-p 1.5": (["--top-p", "1.5", "--temperature", "1"], "top-p must be in (0, 1], got 1.5"),
    "--top-k 0": (["--top-k", "0", "--temperature", "1"], "top-k must be positive, got 0"),
    "--dtype float64": (["--dtype", "float64"],
                        "unknown dtype torch.float64 (use float32, bfloat16 or float16)"),
    "--dtype bf16": (["--dtype", "bf16"], "unknown dtype bf16 (use float32, bfloat16 or float16)"),
    "--device cuda without CUDA": (["--device",
                                    "cuda" if not torch.cuda.is_available() else "cuda:99"],
                                   "cannot be used ("),
    "--device nonsense": (["--device", "gpu0"],
                          "device gpu0 cannot be used (Invalid device string: 'gpu0')"),
}


@pytest.mark.parametrize("case", FLAGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_flag(family, case, ckpt, media):
    args, message = FLAGS[case]
    assert_fails(cli(family, ckpt, "--image", media["good"], *args), message)


@pytest.mark.parametrize("case", ["longer than the context", "one image placeholder too many"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_prompt(family, case, ckpt, media):
    if case == "longer than the context":
        args, message = ["--prompt", SPEC[family]["long_prompt"]], "exceed the model's context of"
    else:
        args, message = SPEC[family]["two_placeholders"], SPEC[family]["placeholder_error"]
    assert_fails(cli(family, ckpt, "--image", media["good"], *args), message)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_not_utf8_real_process(family, ckpt, media):
    """A shell passes the bytes of a Latin-1 terminal as they are; Python turns them into lone
    surrogates."""
    r = run_cli(f"{family}.py", "--model", ckpt[family], "--image", media["good"],
                "--prompt", b"caf\xe9 au lait")
    assert_fails(r, "the prompt is not valid UTF-8 text")


PLACEHOLDERS = {  # (family, case) -> flags ({good}: an image, {clip}: a video), what the line says
    ("paligemma", "image placeholder, no image"):
        (["--prompt", "<image>x"], "PaliGemma needs an image: pass --image FILE"),
    ("smolvlm", "image placeholder, no image"):
        (["--raw", "--prompt", "<image>x"],
         "the prompts have 1 <image> placeholders but no images were given"),
    ("perception_lm", "image placeholder, no image"):
        (["--raw", "--prompt", "<|image|>x"],
         "the prompts have 1 <|image|> placeholders but 0 images were given"),
    ("smolvlm", "placeholder typed in a chat prompt"):
        (["--image", "{good}", "--prompt", "what is <image>?"],
         "the prompts have [2] <image> placeholders but [1] images"),
    ("perception_lm", "placeholder typed in a chat prompt"):
        (["--image", "{good}", "--prompt", "what is <|image|>?"],
         "the prompts have 2 <|image|> placeholders but 1 images"),
    ("perception_lm", "raw prompt without its placeholder"):
        (["--image", "{good}", "--raw", "--prompt", "no placeholder"],
         "the prompts have 0 <|image|> placeholders but 1 images"),
    ("smolvlm", "two video placeholders, one video"):
        (["--video", "{clip}", "--raw", "--prompt", "<video><video>x"],
         "the prompts have 2 <video> placeholders but 1 videos were given"),
    ("perception_lm", "two video placeholders, one video"):
        (["--video", "{clip}", "--raw", "--prompt", "<|video|><|video|>x"],
         "the prompts have 2 <|video|> placeholders but 1 videos were given"),
    ("perception_lm", "--max-tiles 0"):
        (["--image", "{good}", "--max-tiles", "0"], "error: max-tiles must be positive, got 0"),
}


@pytest.mark.parametrize("family, case", PLACEHOLDERS)
def test_placeholders_and_family_flags(family, case, ckpt, media):
    args, message = PLACEHOLDERS[family, case]
    args = [a.format(good=media["good"], clip=media["clip"]) for a in args]
    assert_fails(cli(family, ckpt, *args), message)


# ----------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("cause", ["corrupted weight", "float16 overflow"])
@pytest.mark.parametrize("family", FAMILIES)
def test_non_finite_logits(family, cause, ckpt, media, tmp_path):
    """NaN in a weight, or a final norm scaled so that activations pass float16's 65504 (the way
    Gemma 2 overflows in float16): an error that names the cause and the fix, never silent output.
    The overflowing checkpoint runs fine in float32 and bfloat16, which proves the cause is
    float16's range."""
    state, norm = load_file(ckpt[family] / "model.safetensors"), SPEC[family]["norm"]
    if cause == "corrupted weight":
        state[norm][0] = float("nan")
    else:  # Gemma stores its norm weights zero-centred (the scale is 1 + w)
        state[norm] = state[norm] + 3e4 if family == "paligemma" else state[norm] * 3e4
    bad = derived(ckpt[family], tmp_path / "ckpt", state=state)
    dtype = "float16" if cause == "float16 overflow" else "float32"
    assert_fails(cli(family, ckpt, "--image", media["good"], "--dtype", dtype, model=bad),
                 "the model produced non-finite logits: a float16 overflow "
                 "(use --dtype bfloat16 or float32) or corrupted weights")
    if cause == "float16 overflow":
        for dtype in ("float32", "bfloat16"):
            r = cli(family, ckpt, "--image", media["good"], "--dtype", dtype, model=bad)
            assert r.returncode == 0 and r.stderr == "" and len(r.stdout) > 1, r.stderr


# ----------------------------------------------------------------------------- --batch

def refuse_to_load(monkeypatch, family):
    """The family's load() replaced by one that records that it was called -> those calls."""
    calls = []

    def load(model=None, device=None, dtype=None, quantize=None):
        calls.append(model)
        raise VLMError("the model was loaded")

    monkeypatch.setattr(MODULES[family], "load", load)
    return calls


@pytest.mark.parametrize("flag", ["--output-jsonl", "--resume", "--batch-size", "--recursive"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_flags_without_batch(family, flag, ckpt, media, tmp_path, monkeypatch):
    """A --batch option with --image would do nothing: refused before the load."""
    given = {"--output-jsonl": [flag, tmp_path / "out.jsonl"], "--batch-size": [flag, 2]}
    calls = refuse_to_load(monkeypatch, family)
    r = cli(family, ckpt, "--image", media["good"], *given.get(flag, [flag]))
    assert_fails(r, f"{flag} is a --batch option: give --batch PATH... with it")
    assert calls == [] and not (tmp_path / "out.jsonl").exists()


# (family, case) -> --batch flags and what the one line says: each would fail every image
RUN_WIDE = {
    **{(family, "--compile on CUDA"):
       (["--compile"], "--compile is verified on the CPU only, not on cuda")
       for family in FAMILIES},
    ("perception_lm", "--raw without <|image|>"):
        (["--raw", "--prompt", "no placeholder"],
         "the prompts have 0 <|image|> placeholders but 1 images were given"),
    **{(family, "two image placeholders"):
       (SPEC[family]["two_placeholders"], SPEC[family]["placeholder_error"])
       for family in FAMILIES},
    **{(family, "prompt longer than the context"):
       (["--prompt", SPEC[family]["long_prompt"]], "exceed the model's context of")
       for family in FAMILIES},
    **{(family, "--max-new-tokens past the context"):
       (["--max-new-tokens", "20000"], "plus --max-new-tokens (20000) exceed the model's context")
       for family in FAMILIES},
    **{(family, "--batch-size 0"): (["--batch-size", "0"], "batch-size must be positive, got 0")
       for family in FAMILIES},
    **{(family, "--dtype float64"): (["--dtype", "float64"], "unknown dtype torch.float64")
       for family in FAMILIES},
}


@pytest.mark.parametrize("family, case", RUN_WIDE)
def test_run_wide_errors_fail_once_before_the_load(family, case, ckpt, media, monkeypatch):
    """--batch with a setting that would fail every image: one line, exit code 1, and the model
    is never loaded (its load() records a call)."""
    args, message = RUN_WIDE[family, case]
    if case == "--compile on CUDA":  # as on a machine with CUDA: the default device
        import command_line
        monkeypatch.setattr(command_line, "choose_device_and_dtype",
                            lambda device, dtype: (torch.device("cuda"), torch.bfloat16))
    calls = refuse_to_load(monkeypatch, family)
    r = cli(family, ckpt, "--batch", media["good"], media["base"], *args)
    assert_fails(r, message)
    assert calls == []


# ----------------------------------------------------------------------------- security

class Payload:
    """Unpickling this touches a file: what a hostile pytorch_model.bin could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_weights_are_refused_never_unpickled(family, ckpt, media, tmp_path):
    marker, proof = tmp_path / "unpickled", tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()  # the payload works: unpickling it would have created the marker
    bad = derived(ckpt[family], tmp_path / "ckpt", drop=["model.safetensors"])
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    assert_fails(cli(family, ckpt, "--image", media["good"], model=bad),
                 f"no model.safetensors in {bad} "
                 "(its *.bin pickle weights are never loaded, for safety)")
    assert not marker.exists()


@pytest.mark.parametrize("family", VIDEO)  # the chat families
def test_chat_template_cannot_reach_python_internals(family, ckpt, media, tmp_path):
    """The checkpoint's chat template is rendered in Jinja's sandbox: attribute access to Python
    internals fails in one line instead of walking to os or subprocess."""
    template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    files = ({"chat_template.json": json.dumps({"chat_template": template})} if family == "smolvlm"
             else {"chat_template.jinja": template})
    bad = derived(ckpt[family], tmp_path / "ckpt", files=files)
    assert_fails(cli(family, ckpt, "--image", media["good"], model=bad),
                 "chat template: access to attribute '__class__' of 'str' object is unsafe.")


SOURCES = sorted(path.name for path in ROOT.glob("*.py"))  # every top-level file, tools too


def test_the_source_scan_covers_the_models_and_tools():
    assert {"common.py", "paligemma.py", "smolvlm.py", "perception_lm.py", "finetune.py",
            "quantize.py", "command_line.py", "batch_runner.py"} <= set(SOURCES)


@pytest.mark.parametrize("file", SOURCES)
def test_sources_never_eval_exec_or_unpickle(file):
    """In the code (comments and strings aside): no eval/exec/compile/__import__ builtins, no
    pickle, marshal or torch.load, no trust_remote_code, no unsandboxed jinja2 Template/Environment;
    weights go through safetensors. Tensors are read in common.py only (its strict loader);
    finetune.py opens the source checkpoint for its key names, never a tensor."""
    text = (ROOT / file).read_text(encoding="utf-8")
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type in (tokenize.NAME, tokenize.OP)]
    names = [t.string for t in toks]
    # bare names, not attributes (re.compile)
    builtins = {b for prev, b in zip(["("] + names, names) if prev != "."}
    assert not {"eval", "exec", "compile", "__import__"} & builtins
    assert not {"pickle", "marshal", "dill", "trust_remote_code", "Template", "Environment",
                "load_file"} & set(names)
    assert not any(names[i:i + 3] == ["torch", ".", "load"] for i in range(len(names)))
    assert "trust_remote_code" not in text and "torch.load" not in text
    # safetensors is opened in these two files only, and tensors are taken out in common.py only
    assert ("safe_open" in names) == (file in ("common.py", "finetune.py"))
    assert bool({"get_tensor", "get_slice"} & set(names)) == (file == "common.py")
    assert ("ImmutableSandboxedEnvironment" in names) == (file == "common.py")  # chat templates


# --------------------------------------------------------------------- the Python API says the same

API = ["missing image", "missing checkpoint", "mis-shaped tensor", "placeholders",
       "--max-new-tokens 0", "not a video"]


@pytest.mark.parametrize("family, case", [(f, c) for f in FAMILIES for c in API
                                          if c != "not a video" or f in VIDEO])
def test_api_raises_the_cli_message(family, case, ckpt, media, loaded, tmp_path):
    M, (model, proc) = MODULES[family], loaded[family]
    good, missing, token = str(media["good"]), str(media["dir"] / "nope.png"), IMAGE_TOKEN[family]
    if case == "missing image":
        args, call = ["--image", missing], lambda: proc(**image_call(family, [missing]))
    elif case == "missing checkpoint":
        args, call = ["--image", good], lambda: M.load(str(tmp_path / "nowhere"))
    elif case == "mis-shaped tensor":
        bad, _ = bad_checkpoint(case, family, ckpt, tmp_path / "ckpt")
        args, call = ["--image", good], lambda: M.load(str(bad))
    elif case == "placeholders":
        prompt = SPEC[family]["two_placeholders"][-1]
        args, call = (["--image", good, *SPEC[family]["two_placeholders"]],
                      lambda: proc(**image_call(family, [good], prompt)))
    elif case == "--max-new-tokens 0":
        inputs = proc(**image_call(family, [good]))
        args, call = (["--image", good, "--max-new-tokens", "0"],
                      lambda: model.generate(**inputs, max_new_tokens=0))
    else:
        video = str(media["dir"] / "notes.mp4")
        token = "<video>" if family == "smolvlm" else "<|video|>"
        args, call = ["--video", video], lambda: proc(text=[token + "x"], videos=[video])
    model_dir = (tmp_path / "nowhere" if case == "missing checkpoint"
                 else bad if case == "mis-shaped tensor" else ckpt[family])
    r = cli_in_process(M, "--model", model_dir, *args)
    with pytest.raises(VLMError) as e:
        call()
    assert_fails(r, str(e.value))
    assert r.stderr == f"error: {e.value}\n"


def test_paligemma_processor_without_images(loaded):
    """(The CLI refuses earlier, naming the flag: see PLACEHOLDERS.)"""
    with pytest.raises(VLMError, match="^PaliGemma needs at least one image per prompt$"):
        loaded["paligemma"][1](text=["caption en"])
