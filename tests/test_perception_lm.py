"""perception_lm.py against transformers (and timm, which transformers runs the PE tower with) on
tiny hub-layout checkpoints: "1b" = PLM-1B/3B structure (class token, tied head, llama3 RoPE
scaling), "8b" = PLM-8B structure (no class token, untied head, no scaling, an odd 5x5 patch grid so
the 2x2 pooling windows overlap).

Tolerance: fp32 logits within 1e-4 (the tiny models' logits are O(10); fp32 rounding through a
2-block PE and a 2-layer decoder is O(1e-6), so 1e-4 leaves room for different kernel orders yet
catches any real mistake, which moves logits by O(0.1..10))."""
import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
import perception_lm as P
import perception_lm_fixture as F
import training_data
from common import VLMError
from helpers import (assert_chat_labels, assert_same_inputs, assert_same_loss_and_gradients,
                     cli_in_process, decode_video, make_video, run_cli)

VARIANTS = ["1b", "8b"]
QUESTIONS = ["Describe the image.", "What is in this video? Answer briefly."]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """1b: one fp32 model.safetensors, chat_template.jinja; 8b: two bf16 shards with an index (as
    released) and the older chat_template.json."""
    root = tmp_path_factory.mktemp("perception_lm")
    return {"1b": F.build(root / "1b", "1b"),
            "8b": F.build(root / "8b", "8b", shards=2, dtype=torch.bfloat16,
                          template_file="chat_template.json")}


@pytest.fixture(scope="session")
def ours(ckpt):
    # fp32: the parity dtype (the CPU default may be bf16)
    return {v: P.load(str(ckpt[v]), dtype=torch.float32) for v in VARIANTS}


@pytest.fixture(scope="session")
def hf(ckpt):
    from transformers import AutoProcessor, PerceptionLMForConditionalGeneration
    models = {}
    for v in VARIANTS:
        model = PerceptionLMForConditionalGeneration.from_pretrained(ckpt[v], dtype=torch.float32)
        models[v] = (model.eval(), AutoProcessor.from_pretrained(ckpt[v]))
    return models


def moving_gradients(i, y, x):
    """Frame i of the test clip: gradients that move from frame to frame."""
    red = (x * 5 + i * 10) % 256
    green = (y * 7 + i * 3) % 256
    blue = np.full_like(x, i * 11 % 256)
    return np.stack([red, green, blue], -1).astype(np.uint8)


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    """A 23-frame 48x36 video (moving gradients, so every frame differs) and its frames decoded
    whole by PyAV, with the metadata transformers' read_video_pyav derives."""
    path = make_video(tmp_path_factory.mktemp("video") / "clip one.mp4", n_frames=23, fps=10,
                      pattern=moving_gradients)
    return (path, *decode_video(path))


def chat(proc, question, images=1, videos=0):
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos
    content.append({"type": "text", "text": question})
    return proc.apply_chat_template([{"role": "user", "content": content}],
                                    add_generation_prompt=True)


def hf_inputs(inputs):
    """transformers' forward counts positions from the start of a padded row; ours (like its
    generate) from the first real token. Passing ours makes the two comparable on left-padded
    batches."""
    return {**inputs, "position_ids": (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)}


# ----------------------------------------------------------------------------- fixture and config

def test_fixture_is_in_hub_layout(ckpt):
    from safetensors import safe_open
    with safe_open(ckpt["1b"] / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float32
    prefixes = ("model.vision_tower.timm_model.", "model.multi_modal_projector.linear_",
                "model.language_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert "model.vision_tower.timm_model.cls_token" in keys and "lm_head.weight" not in keys
    index = json.loads((ckpt["8b"] / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) == 2
    assert "lm_head.weight" in weight_map
    assert "model.vision_tower.timm_model.cls_token" not in weight_map
    with safe_open(ckpt["8b"] / "model-00001-of-00002.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    config = json.loads((ckpt["1b"] / "config.json").read_text())
    assert "rope_parameters" not in json.dumps(config)
    assert config["text_config"]["rope_scaling"]["rope_type"] == "llama3"
    assert not (ckpt["8b"] / "chat_template.jinja").exists()
    assert (ckpt["8b"] / "chat_template.json").exists()


def real_config(variant):
    """config.json of a released size as the conversion script writes it (4.x form)."""
    spec = F.REAL[variant]
    text = {**spec["text"], "model_type": "llama", "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": spec["tie"], "bos_token_id": 128000,
            "eos_token_id": [128001, 128009]}
    model_args = {**spec["vision"], "global_pool": "", "use_post_transformer_norm": False,
                  "init_values": 0.1}
    vision = {"architecture": spec["architecture"], "model_type": "timm_wrapper",
              "num_classes": 1024, "model_args": model_args}
    return {"model_type": "perception_lm", "projector_pooling_ratio": 2,
            "vision_use_cls_token": spec["vision_use_cls_token"], "image_token_id": 128002,
            "video_token_id": 128003, "text_config": text, "vision_config": vision}


@pytest.mark.parametrize("variant, bare", [("1b", False), ("3b", False), ("8b", False),
                                           ("1b", True), ("8b", True)])
def test_config_matches_transformers_and_timm(variant, bare, tmp_path):
    """What the hub config leaves to timm's architecture defaults (heads, MLP width, class token,
    RoPE offset; with `bare` model_args, everything) and to LlamaConfig must come out as timm and
    transformers build them; the llama3 RoPE frequencies must be bit-equal to transformers'
    _compute_llama3_parameters."""
    import timm
    from transformers import PerceptionLMConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    config = real_config(variant)
    if bare:
        config["vision_config"]["model_args"] = {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = P.Config.from_folder(tmp_path)
    theirs = PerceptionLMConfig.from_pretrained(tmp_path)
    v = ours.vision
    with torch.device("meta"):
        tower = timm.create_model(theirs.vision_config.architecture, pretrained=False,
                                  num_classes=0, **theirs.vision_config.model_args)
    assert (v.embed_dim, v.depth) == (tower.embed_dim, len(tower.blocks))
    assert v.patch_size == tower.patch_embed.patch_size[0]
    assert v.num_heads == tower.blocks[0].attn.num_heads
    assert int(v.embed_dim * v.mlp_ratio) == tower.blocks[0].mlp.fc1.out_features
    assert v.class_token == (tower.cls_token is not None) == ours.vision_use_cls_token
    assert v.rope_grid_offset == tower.rope.grid_offset
    assert P.pair(v.ref_feat_shape) == tuple(tower.rope.ref_feat_shape)
    assert P.pair(v.img_size) == tuple(tower.patch_embed.img_size)
    assert isinstance(tower.norm, torch.nn.Identity) == (not v.use_post_transformer_norm)
    assert (tower.blocks[0].gamma_1 is not None) == (v.init_values is not None)
    t = ours.text
    h = theirs.text_config
    for f in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "max_position_embeddings"]:
        assert getattr(t, f) == getattr(h, f), f
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    token_ids = (ours.image_token_id, ours.video_token_id)
    assert (ours.projector_pooling_ratio, *token_ids) == (2, 128002, 128003)
    rope_type = h.rope_parameters["rope_type"]
    if rope_type == "default":
        expected = LlamaRotaryEmbedding.compute_default_rope_parameters(h)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_type](h)[0]
    ours_inv = P.llama3_inv_freq(t)
    assert torch.equal(ours_inv, expected)
    assert (rope_type == "llama3") == (variant != "8b")
    if rope_type == "llama3":  # the scaling really changes the low frequencies
        assert not torch.equal(ours_inv, common.rope_inv_freq(t.head_dim, t.rope_theta))


def test_unsupported_configs_fail_clearly(tmp_path):
    config = real_config("1b")
    config["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(VLMError, match="unsupported rope scaling 'yarn'"):
        P.Config.from_folder(tmp_path)
    config = real_config("1b")
    config["vision_config"]["model_args"]["qk_norm"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(VLMError, match=r"unsupported Perception Encoder option\(s\) \['qk_norm'\]"):
        P.Config.from_folder(tmp_path)
    config["vision_config"]["architecture"] = "vit_base_patch16_224"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(VLMError,
                       match="unsupported PerceptionLM vision tower 'vit_base_patch16_224'"):
        P.Config.from_folder(tmp_path)


# ----------------------------------------------------------------------------- vision tower

@pytest.mark.parametrize("grid, ref, offset, head_dim", [
    ((32, 32), (32, 32), 1.0, 64), ((32, 32), (32, 32), 0.0, 96),
    ((5, 5), (5, 5), 0.0, 12), ((4, 6), (24, 24), 1.0, 16)])
def test_pe_rope_table_matches_timm(grid, ref, offset, head_dim):
    """Our 2D RoPE table == timm's RotaryEmbeddingCat(grid_indexing='xy') as PE uses it, bit for
    bit."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
    rope = RotaryEmbeddingCat(head_dim, in_pixels=False, feat_shape=list(grid), ref_feat_shape=ref,
                              grid_offset=offset, grid_indexing="xy")
    c = P.VisionConfig(img_size=[grid[0] * 14, grid[1] * 14], embed_dim=head_dim * 2, num_heads=2,
                       rope_grid_offset=offset, ref_feat_shape=list(ref))
    cos, sin = P.pe_rope(c)
    assert torch.equal(torch.cat([sin, cos], -1), rope.get_embed())


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_tower_matches_timm(variant, ours, hf, images):
    """The PE tower alone, every output token (class token included), against timm's
    forward_features."""
    model, proc = ours[variant]
    pixels = proc(text="<|image|><|image|>", images=images[:2])["pixel_values"].flatten(0, -4)
    with torch.no_grad():
        a = model.vision_tower(pixels)
        b = hf[variant][0].model.vision_tower.timm_model.forward_features(pixels)
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
    # class token + 4x4 patches, or 5x5 patches alone
    assert a.shape[1] == (17 if variant == "1b" else 25)


# ----------------------------------------------------------------------------- processor

def test_tiling_matches_transformers():
    """The canvas choice for many image sizes and tile caps, at the real 448 px tile, ==
    transformers'."""
    from transformers.models.perception_lm.image_processing_perception_lm import (
        PerceptionLMImageProcessor)
    hf_ip = PerceptionLMImageProcessor()
    ours = P.Processor.__new__(P.Processor)
    ours.tile = 448
    sides = [1, 20, 80, 100, 300, 448, 449, 457, 600, 896, 1000, 2000, 3000, 20000]
    for max_tiles in [1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 36]:
        hf_ip.max_num_tiles = max_tiles
        for W in sides:
            for H in sides:
                if max_tiles == 1:
                    expected = (1, 1)
                else:
                    expected = hf_ip._fit_image_to_canvas(W, H, 448)
                    if not expected:
                        expected = hf_ip._find_closest_aspect_ratio(W, H, 448)
                assert ours.canvas(W, H, max_tiles) == tuple(expected), (W, H, max_tiles)
    # transformers' max_num_tiles call argument does not cap the canvas (only 1 turns tiling off): a
    # 90x70 image with 2 allowed still gets 2x2 tiles when the processor was configured with 4
    hf_ip.max_num_tiles = 4
    tiled = hf_ip(Image.new("RGB", (90, 70)), tile_size=56, max_num_tiles=2)
    assert tiled["pixel_values"][0].shape[0] == 5
    ours.tile = 56
    # ours: 2 tiles at most, and none holds 90x70: the closest ratio
    assert ours.canvas(90, 70, 2) == (1, 1)
    ours.tile = 448
    # the facts file's worked examples: almost any image becomes ~36 tiles + the thumbnail
    examples = {(448, 448): (6, 6), (80, 100): (5, 7), (457, 300): (7, 5), (600, 2000): (3, 10),
                (3000, 20): (36, 1), (1000, 1000): (6, 6)}
    for (W, H), grid in examples.items():
        assert ours.canvas(W, H, 36) == grid


@pytest.fixture(scope="session")
def more_images(images):
    """conftest's pictures plus a wide and a tall one too big for any canvas (the closest-ratio
    fallback)."""
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 256, (90, 400, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (300, 20, 3), dtype=np.uint8))
    return images + [wide, tall]


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_matches_transformers(variant, ours, hf, more_images):
    proc, hproc = ours[variant][1], hf[variant][1]
    im = more_images
    cases = [
        dict(text=["<|image|>Describe the image."], images=[im[0]]),
        dict(text=["<|image|>Describe the image.",
                   "<|image|>What is in it? é ü 🐈 and more words here"],
             images=[[im[0]], [im[1]]]),  # left padding, equal tile counts
        # placeholders mid-text
        dict(text=["Compare <|image|> with <|image|>, please."], images=[[im[0], im[1]]]),
        dict(text=["No picture at all.",
                   "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]),
    ]
    for case in cases:
        theirs = hproc(**case, return_tensors="pt", padding=True, padding_side="left")
        assert_same_inputs(proc(**case), theirs)
    # --max-tiles N == a checkpoint whose max_num_tiles is N (transformers' call kwarg only switches
    # tiling off at 1: its canvas list always comes from the configured max_num_tiles, see
    # test_tiling_matches_transformers)
    default = hproc.image_processor.max_num_tiles
    try:
        for n in (None, 1, 2, 3):
            hproc.image_processor.max_num_tiles = n or default
            for image in im:
                assert_same_inputs(proc(text=["<|image|>x"], images=[image], max_num_tiles=n),
                                   hproc(text=["<|image|>x"], images=[image], return_tensors="pt"))
    finally:
        hproc.image_processor.max_num_tiles = default
    vanilla = copy.copy(proc)  # vision_input_type other than "thumb+tile": the thumbnail alone
    vanilla.thumb_and_tiles = False
    case = dict(text=["<|image|>x"], images=[im[4]])
    assert_same_inputs(vanilla(**case),
                       hproc(**case, vision_input_type="vanilla", return_tensors="pt"))
    assert vanilla(**case)["pixel_values"].shape[1] == 1


def test_images_with_different_tile_counts_share_a_batch(ours, hf, images):
    """transformers cannot stack them; ours concatenates the tiles and gives each prompt its own
    count."""
    proc, hproc = ours["1b"][1], hf["1b"][1]
    case = dict(text=["<|image|>a", "<|image|>b"], images=[[images[0]], [images[3]]])
    with pytest.raises(ValueError):
        hproc(**case, return_tensors="pt", padding=True)
    out = proc(**case)
    alone = [proc(text=[t], images=[i]) for t, i in zip(case["text"], case["images"])]
    assert torch.equal(out["pixel_values"], torch.cat([a["pixel_values"][0] for a in alone]))
    # 2x2 pooled tokens per tile
    counts = (out["input_ids"] == proc.tokenizer.token_to_id("<|image|>")).sum(1)
    assert counts.tolist() == [4 * len(a["pixel_values"][0]) for a in alone]
    assert counts[0] != counts[1]


def text_part(text):
    return {"type": "text", "text": text}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_template_matches_transformers(variant, ours, hf):
    proc, hproc = ours[variant][1], hf[variant][1]
    image = {"type": "image"}
    conversations = [
        [{"role": "user", "content": [image, text_part("Describe the image.")]}],
        [{"role": "user", "content": [text_part("  first text  "), {"type": "video"}, image,
                                      text_part("more")]}],
        [{"role": "system", "content": "  You are terse. "},
         {"role": "user", "content": [text_part("hi")]},
         {"role": "assistant", "content": [text_part("Hello.")]},
         {"role": "user", "content": [image, image]}],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours_text = proc.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours_text == hproc.apply_chat_template(messages, add_generation_prompt=gen)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_flow_has_one_begin_of_text(variant, ours, hf, images):
    """A rendered chat prompt already starts with <|begin_of_text|> and the tokenizer adds one more
    by default: transformers' apply_chat_template(tokenize=True) avoids the second, and so does our
    processor."""
    proc, hproc = ours[variant][1], hf[variant][1]
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": "Describe."}]
    messages = [{"role": "user", "content": content}]
    theirs = hproc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
    mine = proc(text=[proc.apply_chat_template(messages)], images=[images[0]])
    assert_same_inputs(mine, dict(theirs))
    bos = proc.tokenizer.token_to_id("<|begin_of_text|>")
    assert (mine["input_ids"] == bos).sum() == 1 and mine["input_ids"][0, 0] == bos
    # the trap
    doubled = hproc(text=[proc.apply_chat_template(messages)], images=[images[0]],
                    return_tensors="pt")
    assert doubled["input_ids"][0, :2].tolist() == [bos, bos]


# ----------------------------------------------------------------------------- model parity

@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, ours, hf, images, record_property):
    model, proc = ours[variant]
    texts = [chat(proc, q) for q in QUESTIONS]
    inputs = proc(text=texts, images=[[images[0]], [images[1]]])
    assert inputs["pixel_values"].dim() == 5  # equal tile counts: transformers can run the batch
    with torch.no_grad():
        a = model(**inputs)
        b = hf[variant][0](**hf_inputs(inputs)).logits
        c = model(**proc(text=texts, images=[[images[2]], [images[1]]]))
    real = inputs["attention_mask"].bool()
    # in the junit XML (--junitxml)
    record_property("max_abs_dlogit", float((a - b)[real].abs().max()))
    assert (a - b)[real].abs().max() <= 1e-4
    assert (a - c)[0, -1].abs().max() > 0.1  # the image matters far beyond the tolerance


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_head_is_tied_as_the_checkpoint_says(variant, ours):
    """1b ties the head to the token embedding (one tensor, also after loading); 8b has its own."""
    model, _ = ours[variant]
    tied = model.lm_head.weight is model.language_model.embed_tokens.weight
    assert tied == (variant == "1b")


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers(variant, ours, hf, images):
    model, proc = ours[variant]
    inputs = proc(text=[chat(proc, q) for q in QUESTIONS], images=[[images[0]], [images[1]]])
    T = inputs["input_ids"].shape[1]
    new = model.generate(**inputs, max_new_tokens=16)
    hmodel = hf[variant][0]
    ref = hmodel.generate(**inputs, max_new_tokens=16, do_sample=False)[:, T:]
    assert new.shape == (2, 16) and torch.equal(new, ref)
    # the comparison means something only if the path is not a near-tie nor one repeated token
    whole = {"input_ids": torch.cat([inputs["input_ids"], ref], 1),
             "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(ref)], 1),
             "pixel_values": inputs["pixel_values"]}
    with torch.no_grad():
        logits = hmodel(**hf_inputs(whole)).logits
    top2 = logits[:, T - 1:-1].topk(2).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-2
    assert all(len(set(row.tolist())) >= 4 for row in ref)
    assert proc.decode(new[0]) == hf[variant][1].decode(new[0], skip_special_tokens=True)


def test_unknown_keywords_raise(ours, images):
    """A misspelt argument is an error, as in any Python function, not silently dropped (`**_` once
    turned max_new_token=5 into the default 100 tokens)."""
    model, proc = ours["1b"]
    inputs = proc(text=[chat(proc, QUESTIONS[0])], images=[images[0]])
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(**inputs, max_new_token=5)
    with pytest.raises(TypeError, match="pixel_value"):
        model(input_ids=inputs["input_ids"], pixel_value=inputs["pixel_values"])
    with pytest.raises(TypeError, match="return_tensors"):
        proc(text=["<|image|>x"], images=[images[0]], return_tensors="pt")


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_uncached(variant, ours, images):
    """Greedy with the KV cache == greedy recomputing the whole sequence with model() at every
    step."""
    model, proc = ours[variant]
    inputs = proc(text=[chat(proc, QUESTIONS[0])], images=[images[2]])
    new = model.generate(**inputs, max_new_tokens=12)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(12):
        with torch.no_grad():
            logits = model(ids, inputs["pixel_values"], attention_mask=mask)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(new, ids[:, -12:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_with_different_tile_counts_equals_rows_alone(variant, ours, images):
    """Left padding and tiles concatenated across images of different tile counts (which
    transformers refuses): each row generates what it generates alone, and its logits match."""
    model, proc = ours[variant]
    texts = [chat(proc, QUESTIONS[0]), chat(proc, QUESTIONS[1] + " Say more.", images=2)]
    imgs = [[images[2]], [images[3], images[0]]]
    inputs = proc(text=texts, images=imgs)
    assert inputs["pixel_values"].dim() == 4  # mixed tile counts
    batch = model.generate(**inputs, max_new_tokens=10)
    with torch.no_grad():
        batch_logits = model(**inputs)[:, -1]
    for i in range(2):
        alone = proc(text=[texts[i]], images=imgs[i])
        assert torch.equal(batch[i], model.generate(**alone, max_new_tokens=10)[0])
        with torch.no_grad():
            assert (batch_logits[i] - model(**alone)[0, -1]).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_matches_transformers(variant, ours, hf, clip):
    """The video file decoded by us with 8 frames sampled == transformers given the same video
    decoded whole, its metadata and num_frames=8 (its `num_frames` sampling path): pixels, ids,
    logits, greedy tokens."""
    path, frames, meta = clip
    model, proc = ours[variant]
    hmodel, hproc = hf[variant]
    text = [chat(proc, "What happens?", images=0, videos=1)]
    inputs = proc(text=text, videos=[str(path)], num_frames=8)
    # add_special_tokens=False: as its chat flow tokenizes a rendered prompt
    theirs = hproc(text=text, videos=[frames], video_metadata=[meta], do_sample_frames=True,
                   num_frames=8, return_tensors="pt", add_special_tokens=False)
    # pixel_values_videos is there (transformers#40004 is not in 5.23)
    assert_same_inputs(inputs, dict(theirs))
    assert inputs["pixel_values_videos"].shape[:2] == (1, 8)
    decoded = proc(text=text, videos=[frames], num_frames=8)
    assert torch.equal(decoded["pixel_values_videos"], inputs["pixel_values_videos"])
    with torch.no_grad():
        assert (model(**inputs) - hmodel(**inputs).logits).abs().max() <= 1e-4
    T = inputs["input_ids"].shape[1]
    ref = hmodel.generate(**inputs, max_new_tokens=8, do_sample=False)[:, T:]
    assert torch.equal(model.generate(**inputs, max_new_tokens=8), ref)
    text = [chat(proc, "Compare.", images=1, videos=1)]
    both = proc(text=text, images=[frames[0]], videos=[frames], num_frames=4)
    theirs = hproc(text=text, images=[frames[0]], videos=[frames], video_metadata=[meta],
                   do_sample_frames=True, num_frames=4, return_tensors="pt",
                   add_special_tokens=False)
    assert_same_inputs(both, dict(theirs))
    with torch.no_grad():
        assert (model(**both) - hmodel(**both).logits).abs().max() <= 1e-4


def test_short_video_gives_all_its_frames(ours, clip):
    """transformers refuses num_frames > total frames; we take every frame (a 1-second clip at the
    default 32)."""
    path, frames, _ = clip
    out = ours["1b"][1](text=["<|video|>"], videos=[str(path)], num_frames=32)
    assert out["pixel_values_videos"].shape[1] == len(frames) == 23
    assert P.uniform_frames(8)(23, 10.0) == [0, 2, 5, 8, 11, 14, 17, 20]


# ----------------------------------------------------------------------------- training

def conversations():
    """A one-turn conversation and a two-turn one (its first answer is context, not learned)."""
    first = [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "Describe the image."}]},
             {"role": "assistant", "content": [{"type": "text", "text": " A cat on a sofa. "}]}]
    second = first + [
        {"role": "user", "content": [{"type": "text", "text": "How many people are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two people."}]}]
    return [first, second]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_labels_cover_the_answer_and_end_of_turn(variant, ours, hf, images):
    proc = ours[variant][1]
    # transformers' processor(text=...) would add a second <|begin_of_text|> (see above)
    assert_chat_labels(proc, hf[variant][1], conversations(), [[images[0]], [images[1]]],
                       "<|eot_id|>", add_special_tokens=False)
    prompt, answer = training_data.prompt_and_answer(proc, conversations()[0])
    assert answer == "A cat on a sofa.<|eot_id|>"  # the template trims the text
    with pytest.raises(VLMError, match="must end with the assistant"):
        training_data.prompt_and_answer(proc, conversations()[0][:1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_match_transformers(variant, ours, hf, images, record_property):
    """A left-padded batch of two training rows: loss, and gradients through the vision tower, the
    projector and the decoder."""
    model, proc = ours[variant]
    pairs = [training_data.prompt_and_answer(proc, conversation)
             for conversation in conversations()]
    # one image size: transformers stacks the tiles and refuses different tile counts
    inputs = proc(text=[prompt for prompt, _ in pairs], images=[[images[0]], [images[0]]],
                  suffix=[answer for _, answer in pairs])
    names = ["vision_tower.blocks.0.attn.qkv.weight", "multi_modal_projector.linear_1.weight",
             "language_model.embed_tokens.weight",
             "language_model.layers.0.self_attn.k_proj.weight",
             "language_model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    weights = {name: "model." + name.replace("vision_tower.", "vision_tower.timm_model.")
               for name in names}
    weights["lm_head.weight"] = "lm_head.weight"
    errors = assert_same_loss_and_gradients(model, hf[variant][0], inputs, hf_inputs(inputs),
                                            weights)
    record_property("gradient_relative_errors", errors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_agrees_loosely(variant, ckpt, images):
    """bf16 keeps ~3 significant digits, so logits of magnitude ~10 may differ by ~0.1 after a few
    layers; we require the two bf16 runs to agree within 5% of the logit range and on the top-1
    token at most positions."""
    from transformers import PerceptionLMForConditionalGeneration
    model, proc = P.load(str(ckpt[variant]), dtype=torch.bfloat16)
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    theirs = PerceptionLMForConditionalGeneration.from_pretrained(ckpt[variant],
                                                                  dtype=torch.bfloat16).eval()
    inputs = proc(text=[chat(proc, q) for q in QUESTIONS], images=[[images[0]], [images[1]]])
    with torch.no_grad():
        a = model(**inputs).float()
        b = theirs(**hf_inputs(inputs)).logits.float()
    real = inputs["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= 0.05 * (b[real].max() - b[real].min())
    assert (a.argmax(-1) == b.argmax(-1))[real].float().mean() >= 0.9


def test_stops_at_end_token(ckpt, images, tmp_path):
    """Make the first greedy token an end token: that row stops and the rest is padding."""
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt["1b"], dst)
    model, proc = P.load(str(dst))
    inputs = proc(text=[chat(proc, QUESTIONS[0])], images=[images[0]])
    first = int(model.generate(**inputs, max_new_tokens=1)[0, 0])
    eot = proc.tokenizer.token_to_id("<|eot_id|>")
    assert eot in model.stop and proc.tokenizer.token_to_id("<|end_of_text|>") in model.stop
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, first]}))
    model, proc = P.load(str(dst))
    new = model.generate(**inputs, max_new_tokens=8)
    assert new.shape == (1, 1) and proc.decode(new[0]) == ""


# ----------------------------------------------------------------------------- command line

def test_cli_streams_the_greedy_answer(ckpt, ours, images, clip, tmp_path):
    path = tmp_path / "cat picture.png"
    images[0].save(path)
    r = run_cli("perception_lm.py", "--dtype", "float32", "--model", str(ckpt["8b"]),
                "--image", str(path), "--prompt", QUESTIONS[0], "--max-new-tokens", "12",
                "--verbose")
    assert r.returncode == 0, r.stderr
    model, proc = ours["8b"]
    image = common.open_image(path)
    inputs = proc(text=[chat(proc, QUESTIONS[0])], images=[image])
    expected = proc.decode(model.generate(**inputs, max_new_tokens=12)[0])
    assert r.stdout == expected + "\n" and expected
    assert "tokens/s" in r.stderr and "load" in r.stderr
    # --max-tiles caps the tiling as transformers' max_num_tiles does; --video samples
    # --num-frames; --raw
    model, proc = ours["1b"]
    r = cli_in_process(P, "--dtype", "float32", "--model", str(ckpt["1b"]), "--image", str(path),
                       "--max-tiles", "1", "--video", str(clip[0]), "--num-frames", "5",
                       "--prompt", "Compare.", "--max-new-tokens", "6")
    inputs = proc(text=[chat(proc, "Compare.", videos=1)], images=[image], videos=[str(clip[0])],
                  num_frames=5, max_num_tiles=1)
    assert inputs["pixel_values"].shape[1] == 2 and inputs["pixel_values_videos"].shape[1] == 5
    expected = proc.decode(model.generate(**inputs, max_new_tokens=6)[0])
    assert r.returncode == 0 and r.stdout == expected + "\n", r.stderr
    r = cli_in_process(P, "--dtype", "float32", "--model", str(ckpt["1b"]), "--image", str(path),
                       "--raw", "--prompt", "<|image|>cat", "--max-new-tokens", "6")
    inputs = proc(text=["<|image|>cat"], images=[image])
    expected = proc.decode(model.generate(**inputs, max_new_tokens=6)[0])
    assert r.returncode == 0 and r.stdout == expected + "\n", r.stderr


def test_cli_help_tells_the_tile_cost():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        P.main(["--help"])
    help_text = out.getvalue()
    assert "--max-tiles" in help_text and "9.5k" in help_text and "--num-frames" in help_text


def test_generate_and_forward_take_what_the_processor_returns(ours, images, clip):
    """model(**processor(...)) and model.generate(**processor(...)) take every key the processor
    returns, a suffix's labels included, as transformers' do (pixel_values for the images,
    pixel_values_videos for the videos). generate ignores labels: its tokens are those of the same
    inputs without them."""
    model, proc = ours["1b"]
    frames = clip[1]
    text = [chat(proc, "Compare.", images=1, videos=1), chat(proc, QUESTIONS[0])]
    inputs = proc(text=text, images=[frames[0], images[1]], videos=[frames], num_frames=4,
                  suffix=["The same.<|eot_id|>", "A picture.<|eot_id|>"])
    assert set(inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                           "pixel_values_videos"}
    without = {k: v for k, v in inputs.items() if k != "labels"}
    new = model.generate(**inputs, max_new_tokens=6)
    assert new.shape[1] > 0 and torch.equal(new, model.generate(**without, max_new_tokens=6))
    with torch.no_grad():
        logits, loss = model(**inputs)
        assert torch.equal(logits, model(**without)) and loss.item() > 0
