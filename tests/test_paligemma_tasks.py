"""PaliGemma's detection and segmentation decoding against big_vision's own definitions: the answer
grammar and its 1023-bin boxes (pp/proj/paligemma/segmentation.py), the VQ-VAE mask decoder and the
mask pasting (evaluators/proj/paligemma/transfers/segmentation.py), the latter written here in Flax
as an independent reference; COCO RLE read back by pycocotools. jax, flax and pycocotools are
test-only oracles."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import paligemma as P
from common import VLMError

CODE_DIM = 512
# vae-oid.npz's decoder tensors in PyTorch layout: conv (out, in, kh, kw), transposed conv
# (in, out, kh, kw).
DECODER_SHAPES = {"_vq_vae._embedding": (128, CODE_DIM), "decoder.0": (128, CODE_DIM, 1, 1)}
for block in ("decoder.2.net", "decoder.3.net"):
    DECODER_SHAPES |= {f"{block}.0": (128, 128, 3, 3), f"{block}.2": (128, 128, 3, 3),
                       f"{block}.4": (128, 128, 1, 1)}
DECODER_SHAPES |= {"decoder.4": (128, 128, 4, 4), "decoder.6": (128, 64, 4, 4),
                   "decoder.8": (64, 32, 4, 4), "decoder.10": (32, 16, 4, 4),
                   "decoder.12": (1, 16, 1, 1)}
# A few of the encoder's tensors, which loading must ignore.
ENCODER_SHAPES = {"encoder.0": (16, 1, 4, 4), "encoder.8.net.0": (128, 128, 3, 3),
                  "encoder.10": (CODE_DIM, 128, 1, 1)}


def random_vae(seed=0):
    """Random weights in the vae-oid.npz layout, scaled by fan-in so that the outputs are about
    -1..1, like a real mask's."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in (DECODER_SHAPES | ENCODER_SHAPES).items():
        if name == "_vq_vae._embedding":
            arrays[name] = rng.normal(0, 1, shape).astype(np.float32)
            continue
        out_channels = shape[1] if name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10") \
            else shape[0]
        fan_in = math.prod(shape) // out_channels
        arrays[f"{name}.weight"] = rng.normal(0, 1.8 / fan_in ** 0.5, shape).astype(np.float32)
        arrays[f"{name}.bias"] = rng.normal(0, 0.05, out_channels).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """(path of a random vae-oid.npz, its arrays)."""
    arrays = random_vae()
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    np.savez(path, **arrays)
    return path, arrays


# ----------------------------------------------------------------------------- the mask decoder

def flax_reconstruct_masks(arrays):
    """big_vision's decoder (evaluators/proj/paligemma/transfers/segmentation.py) in Flax, with its
    conversion of the PyTorch-layout npz -> a jitted function codes (N, 16) -> (N, 64, 64, 1)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class ResBlock(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            residual = x
            x = nn.relu(nn.Conv(self.features, kernel_size=(3, 3), padding=1)(x))
            x = nn.relu(nn.Conv(self.features, kernel_size=(3, 3), padding=1)(x))
            x = nn.Conv(self.features, kernel_size=(1, 1), padding=0)(x)
            return x + residual

    class Decoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            features = 128
            x = nn.relu(nn.Conv(features, kernel_size=(1, 1), padding=0)(x))
            x = ResBlock(features)(x)
            x = ResBlock(features)(x)
            for _ in range(4):
                x = nn.ConvTranspose(features, kernel_size=(4, 4), strides=(2, 2), padding=2,
                                     transpose_kernel=True)(x)
                x = nn.relu(x)
                features //= 2
            return nn.Conv(1, kernel_size=(1, 1), padding=0)(x)

    def conv(name):  # PyTorch (o, i, kh, kw) or (i, o, kh, kw) -> Flax, as big_vision does
        return {"kernel": np.transpose(arrays[f"{name}.weight"], (2, 3, 1, 0)),
                "bias": arrays[f"{name}.bias"]}

    def resblock(name):
        return {"Conv_0": conv(f"{name}.0"), "Conv_1": conv(f"{name}.2"),
                "Conv_2": conv(f"{name}.4")}

    params = {"Conv_0": conv("decoder.0"), "ResBlock_0": resblock("decoder.2.net"),
              "ResBlock_1": resblock("decoder.3.net"), "ConvTranspose_0": conv("decoder.4"),
              "ConvTranspose_1": conv("decoder.6"), "ConvTranspose_2": conv("decoder.8"),
              "ConvTranspose_3": conv("decoder.10"), "Conv_1": conv("decoder.12")}
    embeddings = arrays["_vq_vae._embedding"]

    def reconstruct(codes):
        batch = codes.shape[0]
        quantized = jnp.take(embeddings, codes.reshape(-1), axis=0)
        quantized = quantized.reshape(batch, 4, 4, embeddings.shape[1])
        return Decoder().apply({"params": params}, quantized)

    return jax.jit(reconstruct, backend="cpu")


def test_decoder_matches_big_vision_flax(vae):
    path, arrays = vae
    decoder = P.load_mask_decoder(path)
    assert not decoder.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in decoder.parameters())
    codes = np.random.default_rng(1).integers(0, 128, (8, 16))
    with torch.inference_mode():
        ours = decoder(torch.tensor(codes)).numpy()
    theirs = np.asarray(flax_reconstruct_masks(arrays)(codes.astype(np.int32)))[..., 0]
    assert ours.shape == theirs.shape == (8, 64, 64)
    assert 0.2 < np.abs(theirs).mean() and (theirs > 0).any() and (theirs < 0).any()  # not trivial
    assert np.abs(ours - theirs).max() <= 1e-4


def test_decode_masks_one_per_object(vae):
    decoder = P.load_mask_decoder(vae[0])
    objects = [{"label": "a", "box": [10.5, 5.2, 60.9, 40.0], "seg": list(range(16))},
               {"label": "b", "box": [0, 0, 30, 30], "seg": None}]
    masks = P.decode_masks(decoder, objects, 80, 50)
    with torch.inference_mode():
        mask64 = decoder(torch.tensor([objects[0]["seg"]]))[0].numpy()
    assert masks[1] is None and masks[0].shape == (50, 80) and masks[0].dtype == bool
    assert np.array_equal(masks[0], P.paste_mask(mask64, objects[0]["box"], 80, 50))
    assert P.decode_masks(decoder, objects[1:], 80, 50) == [None]


def test_load_without_path_fetches_the_space_copy(vae, monkeypatch):
    calls = []

    def fake_download(repo_id, patterns, repo_type="model"):
        calls.append((repo_id, patterns, repo_type))
        return vae[0].parent

    monkeypatch.setattr(P, "download", fake_download)
    assert isinstance(P.load_mask_decoder(), P.MaskDecoder)
    assert calls == [("big-vision/paligemma-hf", ["vae-oid.npz"], "space")]


def write_bad_vae(folder, case, arrays):
    path = folder / f"{case}.npz"
    arrays = dict(arrays)
    if case == "missing":
        return path, "not found"
    if case == "not an npz":
        path.write_text("hello")
        return path, "not an .npz file"
    if case == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:100_000])
        return path, "not an .npz file"
    if case == "pickle inside":
        arrays["decoder.0.bias"] = np.array([{"a": 1}, None], dtype=object)
        np.savez(path, **arrays)
        return path, "allow_pickle=False"
    if case == "missing key":
        del arrays["decoder.10.bias"]
        message = "weight decoder.10.bias is missing"
    elif case == "unexpected key":
        arrays["decoder.13.weight"] = arrays.pop("decoder.12.weight")
        message = "unexpected tensor decoder.13.weight"
    elif case == "wrong shape":
        arrays["decoder.6.weight"] = arrays["decoder.6.weight"].transpose(1, 0, 2, 3)
        message = "tensor decoder.6.weight"
    elif case == "codebook of 64 codes":
        arrays["_vq_vae._embedding"] = arrays["_vq_vae._embedding"][:64]
        message = "tensor _vq_vae._embedding"
    np.savez(path, **arrays)
    return path, message


@pytest.mark.parametrize("case", ["missing", "not an npz", "truncated", "pickle inside",
                                  "missing key", "unexpected key", "wrong shape",
                                  "codebook of 64 codes"])
def test_bad_vae_files_fail_in_one_line(case, vae, tmp_path):
    path, message = write_bad_vae(tmp_path, case, vae[1])
    with pytest.raises(VLMError) as error:
        P.load_mask_decoder(path)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


# ----------------------------------------------------------------------------- the answer grammar

def loc(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


def seg(*codes):
    return "".join(f"<seg{c:03d}>" for c in codes)


def test_parse_detect_answer_multi_object_multi_class():
    text = f"{loc(51, 309, 708, 646)} car ; {loc(0, 0, 1023, 1023)} traffic light ; " \
           f"{loc(100, 200, 300, 400)} car"
    objects = P.parse_objects(text, 640, 480)
    assert [o["label"] for o in objects] == ["car", "traffic light", "car"]
    assert [o["seg"] for o in objects] == [None] * 3
    # y_min, x_min, y_max, x_max in bins of 1/1023, x by the width and y by the height
    assert objects[0]["box"] == pytest.approx([309 / 1023 * 640, 51 / 1023 * 480,
                                               646 / 1023 * 640, 708 / 1023 * 480])
    assert objects[1]["box"] == [0, 0, 640, 480]  # <loc1023> is the far edge


def test_parse_segment_answer():
    codes = list(range(3, 19))
    text = f"{loc(10, 20, 30, 40)}{seg(*codes)} cat ; {loc(1, 2, 3, 4)}{seg(*codes[::-1])} dog"
    objects = P.parse_objects(text, 1023, 1023)
    assert [(o["label"], o["seg"]) for o in objects] == [("cat", codes), ("dog", codes[::-1])]
    assert objects[0]["box"] == [20, 10, 40, 30]


@pytest.mark.parametrize("text, labels", [
    (f"{loc(1, 2, 3)} three", []),
    (f"{loc(1, 2, 3, 4, 5)} five", []),
    (f"{loc(1, 2, 3, 4)}{seg(*range(15))} fifteen", []),
    (f"{loc(1, 2, 3, 4)}{seg(*range(17))} seventeen", []),
    (f"{loc(5, 2, 5, 4)} empty ; {loc(1, 9, 3, 4)} inverted", []),
    (f"{loc(1, 2, 3, 1024)} out of range ; {loc(1, 2, 3, 4)}{seg(128, *range(15))} bad", []),
    (f"Sure! {loc(1, 2, 3, 4)} cat", ["cat"]),
    (f"{loc(1, 2, 3, 4)} cat ; some words ; {loc(1, 2, 3, 4)} dog", ["cat", "dog"]),
    (f"{loc(1, 2, 3, 4)} cat {loc(1, 2, 3, 4)} dog", ["dog"]),  # no separator: cat's label is bad
    (f"  \n{loc(1, 2, 3, 4)}   big  cat  \n", ["big  cat"]),
    (f"{loc(1, 2, 3, 4)};{loc(1, 2, 3, 4)}  ;", ["", ""]),
    ("", []),
    ("a caption with no objects; and a semicolon", []),
    ("<loc0001><loc0002 <seg12> ; ; <<>>", []),
])
def test_parse_malformed_pieces_are_skipped(text, labels):
    assert [o["label"] for o in P.parse_objects(text, 100, 100)] == labels


def two_bins(rng):
    """Two different bins in increasing order, each the near edge (0), the far edge (1023) or
    anything between, a quarter, a quarter and a half of the time."""
    while True:
        a, b = [int(rng.choice([0, 1023, rng.integers(0, 1024)])) for _ in range(2)]
        if a != b:
            return min(a, b), max(a, b)


def test_parse_token_soup_gives_exactly_the_good_objects():
    """Random answers of `;`-pieces: good objects (edge bins 0 and 1023 included, half with mask
    codes, some after stray text), bad ones (inverted or empty boxes, a mask code or a bin out of
    range) and token soup. Parsing never raises and gives the good objects only, in order, with
    boxes of bins / 1023 of a side that lie in the image (0 <= x0 < x1 <= width, likewise y)."""
    rng = np.random.default_rng(0)
    soup = [loc(7), loc(1023), loc(9999), seg(5), seg(999), " cat", "<", ">", " "]
    checked = []
    for _ in range(300):
        width, height = [int(n) for n in rng.integers(1, 2000, 2)]
        pieces = []
        expected = []
        for k in range(int(rng.integers(0, 7))):
            kind = rng.choice(["good", "inverted", "empty", "bad code", "bad bin", "soup"])
            if kind == "soup":  # ends with "<": never an object, whatever comes before
                pieces.append("".join(rng.choice(soup, rng.integers(0, 12))) + "<")
                continue
            y0, y1 = two_bins(rng)
            x0, x1 = two_bins(rng)
            codes = None
            if rng.random() < 0.5:
                codes = [int(c) for c in rng.integers(0, 128, 16)]
            label = f"thing {k}"
            if kind == "inverted":
                y0, y1 = y1, y0
            elif kind == "empty":
                x1 = x0
            elif kind == "bad code":
                codes = [int(rng.integers(128, 1000))] + [0] * 15
            elif kind == "bad bin":
                x1 = int(rng.integers(1024, 10000))
            else:
                expected.append({"label": label, "seg": codes,
                                 "box": [x0 * width / 1023, y0 * height / 1023,
                                         x1 * width / 1023, y1 * height / 1023]})
            stray = str(rng.choice(["", "Sure! ", "a cat "]))
            pieces.append(stray + loc(y0, x0, y1, x1) + seg(*(codes or [])) + " " + label)
        text = "".join(piece + str(rng.choice([";", " ; ", " ;"])) for piece in pieces)
        objects = P.parse_objects(text, width, height)
        assert [(o["label"], o["seg"]) for o in objects] == \
            [(o["label"], o["seg"]) for o in expected], text
        for obj, want in zip(objects, expected):
            assert obj["box"] == pytest.approx(want["box"], rel=1e-12, abs=1e-12)
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            checked.append((obj["box"], width, height))
    assert len(checked) > 100
    # the edges were exercised: boxes touching the image's far and near sides
    assert any(box[2] == width for box, width, _ in checked)
    assert any(box[1] == 0 for box, _, _ in checked)


def big_vision_loc_tokens(box, width, height):
    """big_vision's encoding of a pixel box (pp/proj/paligemma/segmentation.py): normalised
    y_min, x_min, y_max, x_max -> round(v * 1023) (half to even, like tf.round), clipped."""
    x0, y0, x1, y1 = box
    normalised = np.array([y0 / height, x0 / width, y1 / height, x1 / width])
    bins = np.clip(np.round(normalised * 1023).astype(int), 0, 1023)
    return loc(*bins)


def test_boxes_round_trip_within_one_pixel():
    rng = np.random.default_rng(0)
    for width, height in [(640, 480), (224, 224), (1920, 1080), (37, 2000), (3, 5)]:
        for _ in range(50):
            x0, x1 = np.sort(rng.uniform(0, width, 2))
            y0, y1 = np.sort(rng.uniform(0, height, 2))
            box = [x0, y0, x1, y1]
            text = big_vision_loc_tokens(box, width, height) + " thing"
            objects = P.parse_objects(text, width, height)
            if not objects:  # a side under one bin collapses: big_vision drops those too
                assert x1 - x0 < width / 1023 or y1 - y0 < height / 1023
                continue
            assert np.abs(np.array(objects[0]["box"]) - box).max() <= 1.0


# ----------------------------------------------------------------------------- masks in pixels

def test_paste_mask_is_big_vision_evaluator():
    rng = np.random.default_rng(0)
    # a smooth random mask with inside and outside parts
    mask64 = np.asarray(Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32))
                        .resize((64, 64), Image.Resampling.BICUBIC))
    width, height = 333, 217
    for bins in [(51, 309, 708, 646), (0, 0, 1023, 1023), (500, 500, 530, 560), (3, 7, 900, 20)]:
        objects = P.parse_objects(loc(*bins) + " x", width, height)
        ours = P.paste_mask(mask64, objects[0]["box"], width, height)
        # the evaluator's steps: bins / 1023, int() of pixel coordinates, PIL bilinear, > 0
        y1, x1, y2, x2 = np.array(bins) / 1023
        y1, x1, y2, x2 = map(int, (y1 * height, x1 * width, y2 * height, x2 * width))
        theirs = np.asarray(Image.fromarray(mask64).resize([x2 - x1, y2 - y1],
                                                           resample=Image.BILINEAR)) > 0.0
        assert ours.shape == (height, width) and ours.dtype == bool
        assert np.array_equal(ours[y1:y2, x1:x2], theirs)
        assert ours.sum() == theirs.sum() > 0  # nothing outside the box
    assert not P.paste_mask(mask64, [10.2, 10.5, 10.9, 30], width, height).any()  # empty after int


@pytest.mark.parametrize("case", ["random", "first pixel set", "empty", "full", "one pixel"])
def test_rle_is_pycocotools_encoding(case):
    """Our uncompressed RLE is COCO's: pycocotools compresses it to exactly what its own encode
    gives for the mask, and decodes it back to the mask. The counts start with the zeros before the
    first set pixel in column-major order (0 of them when the first pixel is set)."""
    from pycocotools import mask as coco_mask
    rng = np.random.default_rng(0)
    mask = rng.random((37, 23)) > 0.6
    mask[0, 0] = case == "first pixel set"
    mask = {"empty": np.zeros((5, 4), bool), "full": np.ones((5, 4), bool),
            "one pixel": np.ones((1, 1), bool)}.get(case, mask)
    rle = P.mask_to_rle(mask)
    json.dumps(rle)  # plain ints and lists
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = coco_mask.frPyObjects(rle, *rle["size"])
    assert rle["size"] == list(mask.shape) == list(theirs["size"])
    assert ours["counts"] == theirs["counts"]
    set_pixels = np.flatnonzero(mask.ravel(order="F"))
    leading_zeros = set_pixels[0] if len(set_pixels) else mask.size
    assert rle["counts"][0] == leading_zeros and all(n > 0 for n in rle["counts"][1:])
    assert sum(rle["counts"]) == mask.size
    decoded = coco_mask.decode(ours)
    assert np.array_equal(decoded.astype(bool), mask)


def box_region(box, width, height):
    """The pixels a box's drawing may touch: its corners rounded outwards."""
    region = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    region[math.floor(y0):math.ceil(y1) + 1, math.floor(x0):math.ceil(x1) + 1] = True
    return region


@pytest.mark.parametrize("shade", [20, 235])  # a dark and a light picture
def test_draw_changes_pixels_inside_boxes_only(shade, vae):
    width, height = 160, 120
    image = Image.new("RGB", (width, height), (shade, shade, shade))
    text = f"{loc(100, 50, 700, 600)}{seg(*range(16))} dog ; {loc(600, 650, 1000, 1000)} cat ; " \
           f"{loc(50, 700, 300, 1020)} dog"
    objects = P.parse_objects(text, width, height)
    masks = P.decode_masks(P.load_mask_decoder(vae[0]), objects, width, height)
    assert masks[0].any()
    picture = P.draw(image, objects, masks)
    assert picture.size == image.size and picture.mode == "RGB"
    changed = (np.asarray(picture) != np.asarray(image)).any(-1)
    inside = np.zeros_like(changed)
    for obj in objects:
        inside |= box_region(obj["box"], width, height)
    assert changed.any() and not (changed & ~inside).any()
    assert changed[masks[0]].all()  # the translucent fill
    # one colour per label: both dogs' left edges share a colour, the cat's differs
    edges = [picture.getpixel((math.ceil(o["box"][0]), int(o["box"][3]) - 5)) for o in objects]
    assert edges[0] == edges[2] != edges[1]
    assert image.getpixel((0, 0)) == (shade, shade, shade)  # the input is left alone


# ----------------------------------------------------------------------------- the CLI's part

def test_task_args():
    parser = argparse.ArgumentParser()
    P.add_task_args(parser)
    args = parser.parse_args(["--output", "a.png", "--json", "--vae", "v.npz"])
    assert (args.output, args.json, args.vae) == ("a.png", True, "v.npz")
    assert parser.parse_args([]).json is False


def test_write_detections_png_and_json(vae, tmp_path, capsys):
    image = Image.new("RGB", (90, 70), (200, 180, 40))
    text = f"{loc(100, 50, 700, 600)}{seg(*range(16))} dog ; {loc(600, 650, 1000, 1000)} cat"
    decoder = P.load_mask_decoder(vae[0])
    output = tmp_path / "out.png"
    P.write_detections(text, image, str(output), True, decoder)
    out, err = capsys.readouterr()
    assert err == "" and out.endswith("\n") and out.count("\n") == 1
    answer = json.loads(out)
    assert answer["text"] == text
    assert [o["label"] for o in answer["objects"]] == ["dog", "cat"]
    assert answer["objects"][0]["box"] == [round(50 / 1023 * 90, 2), round(100 / 1023 * 70, 2),
                                           round(600 / 1023 * 90, 2), round(700 / 1023 * 70, 2)]
    assert answer["objects"][1]["mask"] is None
    objects = P.parse_objects(text, 90, 70)
    expected = P.decode_masks(decoder, objects, 90, 70)[0]
    assert P.mask_to_rle(expected) == answer["objects"][0]["mask"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary file left
    with Image.open(output) as drawn:
        assert drawn.format == "PNG" and drawn.size == (90, 70)
        assert np.array_equal(np.asarray(drawn), np.asarray(P.draw(image, objects, [expected])))


def test_write_detections_without_objects(tmp_path, capsys):
    image = Image.new("RGB", (30, 20), (10, 200, 30))
    output = tmp_path / "out.png"
    P.write_detections("a cat on a mat", image, str(output), True)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"text": "a cat on a mat", "objects": []}
    assert err.count("\n") == 1 and "no object" in err
    with Image.open(output) as drawn:
        assert np.array_equal(np.asarray(drawn), np.asarray(image))


def test_segment_without_reachable_vae_keeps_text_and_boxes(tmp_path, capsys, monkeypatch):
    def offline(repo_id, patterns, repo_type="model"):
        raise VLMError(f"{repo_id} is not cached and the Hub cannot be reached")

    monkeypatch.setattr(P, "download", offline)
    image = Image.new("RGB", (90, 70))
    text = f"{loc(100, 50, 700, 600)}{seg(*range(16))} dog"
    P.write_detections(text, image, str(tmp_path / "out.png"), True)
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["objects"][0]["mask"] is None and len(answer["objects"][0]["box"]) == 4
    assert err.count("\n") == 1 and "no masks" in err and "big-vision/paligemma-hf" in err
    assert (tmp_path / "out.png").exists()


def test_write_detections_does_nothing_unasked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "download", None)  # would fail if called
    P.write_detections(f"{loc(1, 2, 3, 4)}{seg(*range(16))} x", Image.new("RGB", (9, 9)))
    assert capsys.readouterr() == ("", "")


def test_write_detections_unwritable_output(tmp_path):
    with pytest.raises(VLMError, match="cannot write"):
        P.write_detections("", Image.new("RGB", (9, 9)), str(tmp_path / "no" / "out.png"))


@pytest.mark.parametrize("case", ["missing", "not an npz", "pickle inside", "wrong shape"])
def test_cli_bad_vae_fails_in_one_line_before_loading(case, vae, tmp_path):
    """--vae is read before the model: a bad file ends the CLI with one line and exit code 1."""
    from helpers import assert_fails, cli_in_process
    path, message = write_bad_vae(tmp_path, case, vae[1])
    image = tmp_path / "in.png"
    Image.new("RGB", (20, 10), "white").save(image)
    r = cli_in_process(P, "--model", tmp_path / "no-model-needed", "--image", image,
                       "--prompt", "segment cat", "--vae", path)
    assert_fails(r, message)


@pytest.mark.parametrize("flags", [["--output", "boxes.png"], ["--json"],
                                   ["--output", "boxes.png", "--json"]])
def test_output_and_json_refuse_several_images_before_loading(flags, tmp_path, monkeypatch):
    """An answer about two images has boxes that belong to neither: --output and --json with
    several --image stop in one line before the slow load, and no PNG is written."""
    from helpers import assert_fails, cli_in_process

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(P, "load", no_load)
    monkeypatch.chdir(tmp_path)
    paths = []
    for i, colour in enumerate(["white", "black"]):
        paths += ["--image", tmp_path / f"in{i}.png"]
        Image.new("RGB", (20, 10), colour).save(paths[-1])
    r = cli_in_process(P, "--model", tmp_path / "no-model-needed", *paths, "--prompt",
                       "detect cat", *flags)
    assert_fails(r, "--output and --json take one --image, not 2")
    assert not (tmp_path / "boxes.png").exists()
    parser = argparse.ArgumentParser()
    P.add_task_args(parser)
    assert " ".join(parser.format_help().split()).count("one --image only:") == 2
