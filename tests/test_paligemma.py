"""paligemma.py against transformers on tiny hub-layout checkpoints
(PaliGemma 1 = Gemma, PaliGemma 2 = Gemma 2).

Tolerance: fp32 logits within 1e-4 (the tiny models' logits are O(10); fp32 rounding of a 4-layer
network is O(1e-6), so 1e-4 leaves room for different kernel orders yet catches any real mistake,
which moves logits by O(0.1..10))."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import paligemma as P
import paligemma_fixture
from conftest import ROOT
from helpers import assert_same_inputs, assert_same_loss_and_gradients, run_cli

VARIANTS = ["pg1", "pg2"]
PROMPTS = ["caption en", "answer en where is the cow standing?"]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """pg1: one fp32 model.safetensors; pg2: two bf16 shards with an index
    (as PaliGemma 2 was released)."""
    root = tmp_path_factory.mktemp("paligemma")
    return {"pg1": paligemma_fixture.build(root / "pg1", "pg1"),
            "pg2": paligemma_fixture.build(root / "pg2", "pg2", shards=2, dtype=torch.bfloat16)}


@pytest.fixture(scope="session")
def ours(ckpt):
    # fp32: the parity dtype (the CPU default may be bf16)
    return {v: P.load(str(ckpt[v]), dtype=torch.float32) for v in VARIANTS}


@pytest.fixture(scope="session")
def hf(ckpt):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
    load_hf = PaliGemmaForConditionalGeneration.from_pretrained
    return {v: (load_hf(ckpt[v], dtype=torch.float32).eval(),
                AutoProcessor.from_pretrained(ckpt[v])) for v in VARIANTS}


def hf_inputs(inputs):
    """transformers' forward counts positions from the start of a padded row; ours (like its
    generate) from the first real token. Passing ours makes the two comparable on left-padded
    batches."""
    x = {k: v for k, v in inputs.items() if k != "labels"}
    x["position_ids"] = inputs["attention_mask"].cumsum(-1).clamp(min=1)
    return x


# ----------------------------------------------------------------------------- fixture and config

def test_fixture_is_in_hub_layout(ckpt):
    from safetensors import safe_open
    index = json.loads((ckpt["pg2"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    with safe_open(ckpt["pg1"] / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float32
    prefixes = ("vision_tower.vision_model.", "language_model.model.",
                "multi_modal_projector.linear.")
    assert all(k.startswith(prefixes) for k in keys)
    assert not any("lm_head" in k for k in keys)
    with safe_open(ckpt["pg2"] / "model-00001-of-00002.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert "rope_parameters" not in (ckpt["pg2"] / "config.json").read_text()  # the 4.x hub form


# hub config.json of released sizes, as written by the conversion scripts (4.x form)
REAL_CONFIGS = {
    "paligemma-3b-pt-224": {
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 2048,
        "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                        "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                        "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                          "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False}},
    "paligemma2-28b-pt-896": {
        "model_type": "paligemma", "image_token_index": 257152, "projection_dim": 4608,
        "text_config": {"hidden_size": 4608, "intermediate_size": 36864, "model_type": "gemma2",
                        "num_attention_heads": 32, "num_hidden_layers": 46,
                        "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 144,
                        "vocab_size": 257216,
                        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "projection_dim": 4608,
                          "vision_use_head": False}},
}


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_config_defaults_match_transformers(name, tmp_path):
    """Fields a hub config leaves out must get transformers' defaults
    (head_dim 256, softcaps, window...)."""
    from transformers import PaliGemmaConfig
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[name]))
    ours, theirs = P.Config.from_folder(tmp_path), PaliGemmaConfig.from_pretrained(tmp_path)
    t, h = ours.text, theirs.text_config
    for f in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "max_position_embeddings"]:
        assert getattr(t, f) == getattr(h, f), f
    assert t.rope_theta == h.rope_parameters["rope_theta"]
    if t.model_type == "gemma2":
        for f in ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                  "sliding_window", "layer_types"]:
            assert getattr(t, f) == getattr(h, f), f
    for f in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "image_size", "patch_size", "layer_norm_eps"]:
        assert getattr(ours.vision, f) == getattr(theirs.vision_config, f), f
    assert ours.image_token_index == theirs.image_token_id


# ----------------------------------------------------------------------------- processor

@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_matches_transformers(variant, ours, hf, images):
    proc, hproc = ours[variant][1], hf[variant][1]
    cases = [
        dict(text=["caption en"], images=[[images[0]]]),
        # left padding, empty prompt
        dict(text=PROMPTS + [""], images=[[images[0]], [images[1]], [images[3]]]),
        # two images
        dict(text=["answer en how many?", "ocr"], images=[[images[0], images[2]], [images[1]]]),
        # placeholders in the text
        dict(text=["<image><image>compare these"], images=[[images[1], images[2]]]),
        dict(text=PROMPTS, images=[[images[0]], [images[2]]],
             suffix=["a cow", "on the beach, far away"]),
        dict(text=["detect <loc0012> é ü 🐄 cat ; dog"], images=[[images[3]]]),
    ]
    for case in cases:
        assert_same_inputs(proc(**case), hproc(**case, return_tensors="pt", padding="longest"))


# ----------------------------------------------------------------------------- model parity

@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, ours, hf, images, record_property):
    model, proc = ours[variant]
    inputs = proc(text=PROMPTS + ["caption es"], images=[[images[0]], [images[1]], [images[2]]])
    with torch.no_grad():
        a = model(**inputs)
        b = hf[variant][0](**hf_inputs(inputs)).logits
    real = inputs["attention_mask"].bool()
    # in the junit XML (--junitxml)
    record_property("max_abs_dlogit", float((a - b)[real].abs().max()))
    assert (a - b)[real].abs().max() <= 1e-4
    # the image must matter: another image moves the logits far beyond the tolerance
    with torch.no_grad():
        c = model(**proc(text=PROMPTS + ["caption es"],
                         images=[[images[3]], [images[1]], [images[2]]]))
    assert (a - c)[0, -1].abs().max() > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers(variant, ours, hf, images):
    model, proc = ours[variant]
    inputs = proc(text=PROMPTS, images=[[images[0]], [images[1]]])
    T = inputs["input_ids"].shape[1]
    new = model.generate(**inputs, max_new_tokens=16)
    hmodel = hf[variant][0]
    ref = hmodel.generate(**{k: v for k, v in inputs.items() if k != "labels"}, max_new_tokens=16,
                          do_sample=False)[:, T:]
    assert new.shape == (2, 16) and torch.equal(new, ref)
    # the comparison means something only if the path is not a near-tie nor one repeated token
    with torch.no_grad():
        logits = hmodel(
            input_ids=torch.cat([inputs["input_ids"], ref], 1),
            pixel_values=inputs["pixel_values"],
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ref)], 1),
            token_type_ids=torch.cat([inputs["token_type_ids"], torch.ones_like(ref)], 1)).logits
    top2 = logits[:, T - 1:-1].topk(2).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-2
    assert all(len(set(row.tolist())) >= 4 for row in ref)
    assert proc.decode(new[0]) == hf[variant][1].decode(new[0], skip_special_tokens=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_uncached(variant, ours, images):
    """Greedy with the KV cache == greedy recomputing the whole sequence with model()
    at every step."""
    model, proc = ours[variant]
    inputs = proc(text=["answer en what is this?"], images=[[images[2]]])
    new = model.generate(**inputs, max_new_tokens=12)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    for _ in range(12):
        with torch.no_grad():
            nxt = model(ids, inputs["pixel_values"], mask, types)[:, -1].argmax(-1, keepdim=True)
        pairs = ((ids, nxt), (mask, torch.ones_like(nxt)), (types, torch.ones_like(nxt)))
        ids, mask, types = (torch.cat([t, v], 1) for t, v in pairs)
    assert torch.equal(new, ids[:, -12:])


def test_a_generated_image_token_is_embedded_as_itself(ckpt, images):
    """A decode step embeds a generated <image> token as itself, as transformers does (its id is
    inside the vocabulary). generate() once decoded through forward(), which embeds image tokens as
    <pad> before the image features replace them; with no image in a decode step, the generated
    token stayed <pad>. The fixture's <image> row (tied: its output row too) is made 5% longer than
    the second answer token's, so that greedy decoding picks <image> there."""
    from transformers import PaliGemmaForConditionalGeneration
    model, proc = P.load(str(ckpt["pg1"]), dtype=torch.float32)  # its own: the weights change
    hmodel = PaliGemmaForConditionalGeneration.from_pretrained(ckpt["pg1"], dtype=torch.float32)
    inputs = proc(text=["caption en"], images=[[images[0]]])
    T = inputs["input_ids"].shape[1]
    second = model.generate(**inputs, max_new_tokens=2)[0, 1]
    image_id = model.cfg.image_token_index
    with torch.no_grad():
        for weight in (model.language_model.embed_tokens.weight,
                       hmodel.get_input_embeddings().weight):
            weight[image_id] = weight[second] * 1.05
    new = model.generate(**inputs, max_new_tokens=10)
    ref = hmodel.eval().generate(**inputs, max_new_tokens=10, do_sample=False)[:, T:]
    assert new[0, 1] == image_id and new.shape == (1, 10)
    assert torch.equal(new, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_rows_alone(variant, ours, images):
    model, proc = ours[variant]
    texts = ["caption en", "answer en where is the cow standing? tell me more"]
    imgs = [[images[0]], [images[3]]]
    batch = model.generate(**proc(text=texts, images=imgs), max_new_tokens=10)
    for i in range(2):
        alone = model.generate(**proc(text=[texts[i]], images=[imgs[i]]), max_new_tokens=10)
        assert torch.equal(batch[i], alone[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_suffix_training_case(variant, ours, hf, images):
    """With a suffix the prefix is bidirectional and the suffix causal;
    logits and the loss match."""
    model, proc = ours[variant]
    inputs = proc(text=PROMPTS, images=[[images[0]], [images[1]]],
                  suffix=["a cow", "on the sandy beach"])
    with torch.no_grad():
        a, ours_loss = model(**inputs)  # labels in the inputs: the loss comes too
        out = hf[variant][0](**hf_inputs(inputs), labels=inputs["labels"])
    real = inputs["attention_mask"].bool()
    assert (a - out.logits)[real].abs().max() <= 1e-4
    labels = inputs["labels"]
    loss = torch.nn.functional.cross_entropy(a[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    assert abs(loss.item() - out.loss.item()) < 1e-4
    assert abs(ours_loss.item() - out.loss.item()) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_and_forward_take_what_the_processor_returns(variant, ours, images):
    """model(**processor(...)) and model.generate(**processor(...)) take every key the processor
    returns, a suffix's labels included, as transformers' do. generate ignores labels: its tokens
    are those of the same inputs without them."""
    model, proc = ours[variant]
    inputs = proc(text=PROMPTS, images=[[images[0]], [images[1]]],
                  suffix=["a cow", "on the sandy beach"])
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask", "pixel_values",
                           "labels"}
    without = {k: v for k, v in inputs.items() if k != "labels"}
    new = model.generate(**inputs, max_new_tokens=6)
    assert new.shape[1] > 0 and torch.equal(new, model.generate(**without, max_new_tokens=6))
    with torch.no_grad():
        logits, loss = model(**inputs)
        assert torch.equal(logits, model(**without)) and loss.item() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_match_transformers(variant, ours, hf, images, record_property):
    """A left-padded batch of two training rows (prefix-LM mask, suffix labels): loss, and
    gradients through the vision tower, the projector and the decoder."""
    model, proc = ours[variant]
    inputs = proc(text=PROMPTS, images=[[images[0]], [images[1]]],
                  suffix=["a cow", "on the sandy beach"])
    names = ["vision_tower.encoder.layers.0.self_attn.q_proj.weight",
             "multi_modal_projector.linear.weight", "language_model.embed_tokens.weight",
             "language_model.layers.0.self_attn.k_proj.weight",
             "language_model.layers.1.mlp.down_proj.weight"]
    hf_model = hf[variant][0]
    errors = assert_same_loss_and_gradients(model, hf_model, inputs,
                                            dict(hf_inputs(inputs), labels=inputs["labels"]),
                                            {name: "model." + name for name in names})
    record_property("gradient_relative_errors", errors)


def test_prefix_lm_mask():
    keys = torch.tensor([[0, 1, 1, 1, 1, 1]]).bool()  # one left pad
    prefix = torch.tensor([[0, 1, 1, 1, 0, 0]]).bool()  # tokens 1..3 see each other both ways
    m = P.prefix_lm_mask(keys, prefix, 6)[0, 0]
    assert m[1, 3] and m[3, 1] and not m[1, 4] and m[5, 4] and not m[4, 5]
    assert not m[1:, 0].any() and m[0, 0]  # the pad is never a key, but its own row is not empty
    w = P.prefix_lm_mask(keys, prefix, 6, window=2)[0, 0]
    assert w[5].tolist() == [False, False, False, False, True, True]  # the suffix slides
    assert w[1, 3] and w[3, 1]  # the prefix does not (here the window is shorter than the prefix)
    # all prefix, no pads
    assert P.prefix_lm_mask(torch.ones(1, 4).bool(), torch.ones(1, 4).bool(), 4) is None


def test_prefix_is_bidirectional_and_suffix_causal(ours, images):
    model, proc = ours["pg1"]
    base = proc(text=["caption en"], images=[[images[0]]], suffix=["a cow on the beach"])
    del base["labels"]  # the logits alone
    n_prefix = int((base["token_type_ids"][0] == 0).sum())
    with torch.no_grad():
        ref = model(**base)
        changed = dict(base, input_ids=base["input_ids"].clone())
        # a later *prefix* token: earlier prefix positions see it
        changed["input_ids"][0, n_prefix - 2] = 40
        a = model(**changed)
        changed["input_ids"] = base["input_ids"].clone()
        changed["input_ids"][0, -1] = 40  # the last *suffix* token: nothing before it may see it
        b = model(**changed)
    assert (a - ref)[0, :n_prefix - 2].abs().max() > 1e-2
    assert torch.equal(b[0, :-1], ref[0, :-1])


def test_sliding_window_is_exercised(ours, hf, images):
    """pg2's window (24) is shorter than the prompt + generation; the window really changes the
    outcome and the prefix stays bidirectional across it, as in transformers."""
    model, proc = ours["pg2"]
    question = "answer en where is the cow standing? describe the picture in detail"
    inputs = proc(text=[question], images=[[images[0]]])
    assert inputs["input_ids"].shape[1] > model.cfg.text.sliding_window
    T = inputs["input_ids"].shape[1]
    new = model.generate(**inputs, max_new_tokens=16)
    ref = hf["pg2"][0].generate(**{k: v for k, v in inputs.items() if k != "labels"},
                                max_new_tokens=16, do_sample=False)
    assert torch.equal(new, ref[:, T:])
    inputs = proc(text=[question], images=[[images[0]]], suffix=["on the beach"])
    prefix = inputs["token_type_ids"][0] == 0
    del inputs["labels"]  # the logits alone
    with torch.no_grad():
        windowed = model(**inputs)
        model.cfg.text.sliding_window = 10_000
        try:
            full = model(**inputs)
        finally:
            model.cfg.text.sliding_window = 24
    assert torch.equal(windowed[0, prefix], full[0, prefix])  # the prefix ignores the window
    assert (windowed[0, ~prefix] - full[0, ~prefix]).abs().max() > 1e-2  # the suffix does not


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_agrees_loosely(variant, ckpt, hf, images):
    """bf16 keeps ~3 significant digits, so logits of magnitude ~10 may differ by ~0.1 after a few
    layers; we require the two bf16 runs to agree within 5% of the logit range and on the top-1
    token at most positions."""
    from transformers import PaliGemmaForConditionalGeneration
    model, proc = P.load(str(ckpt[variant]), dtype=torch.bfloat16)
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    theirs = PaliGemmaForConditionalGeneration.from_pretrained(ckpt[variant],
                                                               dtype=torch.bfloat16).eval()
    inputs = proc(text=PROMPTS, images=[[images[0]], [images[1]]])
    with torch.no_grad():
        a = model(**inputs).float()
        b = theirs(**hf_inputs(inputs)).logits.float()
    real = inputs["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= 0.05 * (b[real].max() - b[real].min())
    assert (a.argmax(-1) == b.argmax(-1))[real].float().mean() >= 0.9


def test_float16_runs_or_fails_clearly(ckpt, images):
    model, proc = P.load(str(ckpt["pg1"]), dtype=torch.float16)
    new = model.generate(**proc(text=["caption en"], images=[[images[0]]]), max_new_tokens=4)
    assert new.shape == (1, 4)


def test_sampling_is_seeded(ours, images):
    model, proc = ours["pg1"]
    inputs = proc(text=["caption en"], images=[[images[0]]])
    a = model.generate(**inputs, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    b = model.generate(**inputs, max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    hot = [model.generate(**inputs, max_new_tokens=8, temperature=50.0, seed=s) for s in range(3)]
    assert not torch.equal(hot[0], hot[1]) or not torch.equal(hot[1], hot[2])
    assert torch.equal(a, b)


def test_stops_at_end_token(ckpt, images, tmp_path):
    """Make the first greedy token an end token: that row stops and the rest is padding."""
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt["pg1"], dst)
    model, proc = P.load(str(dst))
    inputs = proc(text=["caption en"], images=[[images[0]]])
    first = int(model.generate(**inputs, max_new_tokens=1)[0, 0])
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, first]}))
    model, proc = P.load(str(dst))
    assert first in model.stop and 1 in model.stop
    new = model.generate(**inputs, max_new_tokens=8)
    assert new.shape == (1, 1) and proc.decode(new[0]) == ""


# ------------------------------------------------------------------------- command line and loading

def test_cli_streams_the_greedy_answer(ckpt, ours, images, tmp_path):
    path = tmp_path / "cat picture.png"
    images[0].save(path)
    r = run_cli("paligemma.py", "--dtype", "float32", "--model", str(ckpt["pg2"]),
                "--image", str(path), "--prompt", "caption en", "--max-new-tokens", "12",
                "--verbose")
    assert r.returncode == 0, r.stderr
    model, proc = ours["pg2"]
    inputs = proc(text=["caption en"], images=[[open_path(path)]])
    expected = proc.decode(model.generate(**inputs, max_new_tokens=12)[0])
    assert r.stdout == expected + "\n"
    assert "tokens/s" in r.stderr and "load" in r.stderr


def test_cli_detection_png_and_json(ckpt, ours, images, tmp_path, monkeypatch):
    """--output and --json on an answer with a box and a mask. The fixture's random answer holds no
    object, so the model's generate is replaced by one that feeds the ids of a `segment` answer
    through the real decode loop (streamed as usual); the mask decoder has random weights. The JSON
    carries the box in the image's pixels and a COCO RLE that decodes to paste_mask's mask; the PNG
    differs from the input on the box's outline and the mask, and nowhere outside the box."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as coco_mask

    import common
    from helpers import cli_in_process
    from test_paligemma_tasks import random_vae
    path = tmp_path / "street.png"
    images[0].save(path)
    width, height = images[0].size
    vae = tmp_path / "vae-oid.npz"
    np.savez(vae, **random_vae())
    bins = [100, 50, 700, 600]  # y_min, x_min, y_max, x_max in 1/1023 of a side
    codes = [int(c) for c in np.random.default_rng(3).integers(0, 128, 16)]
    answer = "".join(f"<loc{b:04d}>" for b in bins)
    answer += "".join(f"<seg{c:03d}>" for c in codes) + " cow"
    model, proc = ours["pg1"]
    script = proc.tokenizer.encode(answer, add_special_tokens=False).ids + [model.stop[0]]
    assert proc.decode(script) == answer and len(script) < 40
    prompts = []

    def scripted_generate(self, input_ids, pixel_values=None, attention_mask=None,
                          token_type_ids=None, labels=None, max_new_tokens=100, temperature=0.0,
                          top_k=None, top_p=None, seed=None, stream=None):
        prompts.append(input_ids)
        vocab = self.cfg.text.vocab_size
        logits = [torch.zeros(1, vocab).index_fill_(1, torch.tensor([i]), 1.0) for i in script]
        steps = iter(logits[1:])
        return common.generate(lambda token: next(steps), logits[0], max_new_tokens, self.stop,
                               self.pad_id, temperature, top_k, top_p, seed, stream)

    monkeypatch.setattr(P.PaliGemma, "generate", scripted_generate)
    drawing = tmp_path / "boxes.png"
    r = cli_in_process(P, "--dtype", "float32", "--model", ckpt["pg1"], "--image", path,
                       "--prompt", "segment cow", "--max-new-tokens", "40", "--vae", vae,
                       "--output", drawing, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    expected_prompt = proc(text=["segment cow"], images=[[open_path(path)]])["input_ids"]
    assert len(prompts) == 1 and torch.equal(prompts[0], expected_prompt)
    result = json.loads(r.stdout.splitlines()[-1])
    assert r.stdout == answer + "\n" + json.dumps(result) + "\n"  # the streamed text, then JSON
    assert result["text"] == answer and len(result["objects"]) == 1
    found = result["objects"][0]
    assert found["label"] == "cow"
    box = [bins[1] * width / 1023, bins[0] * height / 1023,  # x0, y0, x1, y1 in pixels
           bins[3] * width / 1023, bins[2] * height / 1023]
    assert found["box"] == pytest.approx(box, abs=0.006)  # rounded to a hundredth
    with torch.inference_mode():
        mask64 = P.load_mask_decoder(vae)(torch.tensor([codes]))[0].numpy()
    expected = P.paste_mask(mask64, box, width, height)
    assert expected.any() and not expected.all()
    rle = found["mask"]
    decoded = coco_mask.decode(coco_mask.frPyObjects(rle, *rle["size"]))
    assert rle["size"] == [height, width] and np.array_equal(decoded.astype(bool), expected)
    with Image.open(drawing) as written:
        assert written.format == "PNG" and written.size == (width, height)
        changed = (np.asarray(written.convert("RGB")) != np.asarray(images[0])).any(-1)
    x0, y0, x1, y1 = (int(v) for v in box)  # Pillow draws on the whole pixels of the box
    outline = np.concatenate([changed[y0:y1 + 1, x0], changed[y0:y1 + 1, x1],
                              changed[y0, x0:x1 + 1], changed[y1, x0:x1 + 1]])
    assert outline.all()  # the box's four sides
    assert changed[expected].all()  # the mask's translucent fill
    inside = np.zeros_like(changed)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    assert not changed[~inside].any()


def open_path(p):
    from common import open_image
    return open_image(p)


def test_offline_repo_id_from_hub_cache(ckpt, tmp_path):
    """A repo id resolves from a hub-style cache with HF_HUB_OFFLINE=1
    (an uncached one: test_errors.py)."""
    snap = tmp_path / "hub" / "models--google--paligemma-tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(ckpt["pg1"], snap)
    refs = tmp_path / "hub" / "models--google--paligemma-tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123456789abcdef")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("import paligemma; m, p = paligemma.load('google/paligemma-tiny'); "
            "print(type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "PaliGemma", r.stderr


def test_softcapped_attention_equals_reference():
    """Gemma 2's written-out attention: grouped heads, tanh soft-cap before the mask,
    fp32 softmax."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    keys = torch.tensor([[1] * 7, [0, 0] + [1] * 5]).bool()
    mask = P.prefix_lm_mask(keys, torch.zeros_like(keys), 5)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = torch.tanh(q @ kr.transpose(-1, -2) * 0.3 / 5.0) * 5.0
    ref = s.masked_fill(~mask, float("-inf")).softmax(-1) @ vr
    assert torch.allclose(P.softcapped_attention(q, k, v, mask, 0.3, 5.0), ref, atol=1e-6)


def test_unknown_keyword_is_a_type_error(ours, images):
    """forward and generate name every argument they take: a misspelt one fails,
    as in any function."""
    model, proc = ours["pg1"]
    inputs = proc(text=["caption en"], images=[[images[0]]])
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(**inputs, max_new_token=5)
    with pytest.raises(TypeError, match="attention_masks"):
        model(**inputs, attention_masks=inputs["attention_mask"])
    with pytest.raises(TypeError, match="suffixes"):
        proc(text=["caption en"], images=[[images[0]]], suffixes=["a cow"])
