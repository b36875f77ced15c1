"""smolvlm.py against transformers on tiny hub-layout checkpoints: SmolVLM-256M-style ("v1",
idefics3), SmolVLM-Instruct-2.2B-style ("v1big", idefics3 with the v1 special tokens) and
SmolVLM2-style ("v2", smolvlm, with video).

Tolerance: fp32 logits within 1e-4 (the tiny models' logits are O(10); fp32 rounding of these small
networks is O(1e-6), so 1e-4 leaves room for different kernel orders yet catches any real mistake,
which moves logits by O(0.1..10)). Videos are generated with PyAV inside the tests; transformers
cannot open video files here (no torchcodec), so it gets the frames we decode with PyAV plus the
metadata its own PyAV reader derives."""
import json
import shutil

import pytest
import torch

import common
import compiled
import smolvlm as S
import smolvlm_fixture
import training_data
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)
from helpers import (assert_chat_labels, assert_same_inputs, assert_same_loss_and_gradients,
                     cli_in_process, decode_video, make_video, run_cli)

VARIANTS = ["v1", "v1big", "v2"]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """v1 and v2: one fp32 model.safetensors; v1big: two bf16 shards with an index (as
    SmolVLM-Instruct ships)."""
    root = tmp_path_factory.mktemp("smolvlm")
    return {"v1": smolvlm_fixture.build(root / "v1", "v1"),
            "v1big": smolvlm_fixture.build(root / "v1big", "v1big", shards=2, dtype=torch.bfloat16),
            "v2": smolvlm_fixture.build(root / "v2", "v2")}


@pytest.fixture(scope="session")
def ours(ckpt):
    # fp32: the parity dtype (the CPU default may be bf16)
    return {v: S.load(str(ckpt[v]), dtype=torch.float32) for v in VARIANTS}


@pytest.fixture(scope="session")
def hf(ckpt):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return {v: (AutoModelForImageTextToText.from_pretrained(ckpt[v], dtype=torch.float32).eval(),
                AutoProcessor.from_pretrained(ckpt[v])) for v in VARIANTS}


@pytest.fixture(scope="session")
def video(tmp_path_factory):
    """A 9.5 s, 4 fps clip, all its frames decoded with PyAV, and the metadata transformers' PyAV
    reader gives."""
    path = make_video(tmp_path_factory.mktemp("video") / "clip one.mp4", n_frames=38, fps=4)
    return (path, *decode_video(path))


def hf_inputs(inputs):
    """transformers' forward counts positions from the start of a padded row; ours (like its
    generate) from the first real token. Passing ours makes the two comparable on left-padded
    batches."""
    return dict(inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))


def hf_call(hproc, **case):
    return hproc(**case, return_tensors="pt", padding=True, padding_side="left")


def chat(*content, text="Describe this image."):
    parts = [{"type": c} for c in content] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


# ----------------------------------------------------------------------------- fixture and config

def test_fixture_is_in_hub_layout(ckpt):
    from safetensors import safe_open
    index = json.loads((ckpt["v1big"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    prefixes = ("model.vision_model.", "model.connector.modality_projection.proj.",
                "model.text_model.")
    assert all(k.startswith(prefixes) or k == "lm_head.weight" for k in index["weight_map"])
    with safe_open(ckpt["v1"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
    with safe_open(ckpt["v1big"] / "model-00001-of-00002.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    v2 = json.loads((ckpt["v2"] / "config.json").read_text())
    assert "num_hidden_layers" not in v2["vision_config"]
    assert "intermediate_size" not in v2["vision_config"]
    assert "rope_theta" in v2["text_config"]  # the 4.x hub form
    assert "rope_parameters" not in v2["text_config"]


# hub config.json fields of released sizes (4.x form); what a file leaves out comes from defaults
REAL_CONFIGS = {
    "SmolVLM-256M-Instruct": {
        "model_type": "idefics3", "image_token_id": 49190, "scale_factor": 4,
        "text_config": {"head_dim": 64, "hidden_size": 576, "intermediate_size": 1536,
                        "max_position_embeddings": 8192, "model_type": "llama",
                        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
                        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
                        "vocab_size": 49280},
        "vision_config": {"hidden_size": 768, "image_size": 512, "intermediate_size": 3072,
                          "model_type": "idefics3_vision", "num_attention_heads": 12,
                          "num_hidden_layers": 12, "patch_size": 16}},
    "SmolVLM-Instruct": {
        "model_type": "idefics3", "image_token_id": 49153, "scale_factor": 3,
        "text_config": {"hidden_size": 2048, "intermediate_size": 8192,
                        "max_position_embeddings": 16384, "model_type": "llama",
                        "num_attention_heads": 32, "num_hidden_layers": 24,
                        "num_key_value_heads": 32, "rope_theta": 273768.0, "vocab_size": 49155},
        "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                          "model_type": "idefics3", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14}},
    "SmolVLM2-500M-Video-Instruct": {
        "model_type": "smolvlm", "image_token_id": 49190, "scale_factor": 4,
        "text_config": {"head_dim": 64, "hidden_size": 960, "intermediate_size": 2560,
                        "max_position_embeddings": 8192, "model_type": "llama",
                        "num_attention_heads": 15, "num_hidden_layers": 32,
                        "num_key_value_heads": 5, "rms_norm_eps": 1e-05, "rope_theta": 100000,
                        "vocab_size": 49280},
        "vision_config": {"hidden_size": 768, "image_size": 512,
                          "max_image_size": {"longest_edge": 512}, "model_type": "smolvlm_vision",
                          "num_attention_heads": 12, "patch_size": 16,
                          "size": {"longest_edge": 2048}}},
    "no text_config": {"model_type": "smolvlm", "vision_config": {}},
    "5.x form": {
        "model_type": "smolvlm",
        "text_config": {"hidden_size": 960, "num_attention_heads": 15,
                        "rope_parameters": {"rope_theta": 123456.0, "rope_type": "default"}}},
}


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_config_defaults_match_transformers(name, tmp_path):
    """Fields a hub config leaves out (SmolVLM2's vision layers and MLP width, Llama's head_dim, kv
    heads, eps) must get transformers' defaults."""
    from transformers import Idefics3Config, SmolVLMConfig
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[name]))
    ours = S.Config.from_folder(tmp_path)
    config_class = Idefics3Config
    if ours.model_type == "smolvlm":
        config_class = SmolVLMConfig
    theirs = config_class.from_pretrained(tmp_path)
    t, h = ours.text, theirs.text_config
    for f in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "max_position_embeddings"]:
        assert getattr(t, f) == getattr(h, f), f
    assert t.rope_theta == h.rope_parameters["rope_theta"]
    for f in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "image_size", "patch_size", "layer_norm_eps"]:
        assert getattr(ours.vision, f) == getattr(theirs.vision_config, f), f
    assert (ours.image_token_id, ours.scale_factor) == (theirs.image_token_id, theirs.scale_factor)


# -------------------------------------------------------------- tokenizer, chat template, processor

@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_matches_transformers(variant, ours, hf):
    """Our tokenizers.Tokenizer on tokenizer.json == the tokenizer class transformers picks
    (GPT2Tokenizer for idefics3 rebuilds the pre-tokenizer; SmolVLM2 loads tokenizer.json as is)."""
    proc, htok = ours[variant][1], hf[variant][1].tokenizer
    for text in ["In 2024, 1 cow and 12 cats.", "a\n\nb\nc  d",
                 "<fake_token_around_image><global-img><image>x", "<row_1_col_2>é ü 🐄 Où?",
                 " 1 2  3", "<|im_start|>User:<end_of_utterance>\nAssistant:"]:
        assert proc.tokenizer.encode(text).ids == htok(text)["input_ids"], text
    assert len(proc.tokenizer.encode("\n\n").ids) == 1
    n = len(proc.tokenizer.encode("<global-img><row_1_col_1>").ids)
    assert n == 2 if variant != "v1big" else n > 2  # SmolVLM-Instruct: plain text, several tokens


CONVERSATIONS = [
    chat("image"),
    chat("image", "image", text="What do these images show?"),
    [{"role": "user", "content": [{"type": "text", "text": "What do these images show?"},
                                  {"type": "image"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": " A cow and a cat."}]},
     {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + chat("image"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_template_matches_transformers(variant, ours, hf):
    proc, hproc = ours[variant][1], hf[variant][1]
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours_text = proc.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours_text == hproc.apply_chat_template(messages, add_generation_prompt=gen)
    expected = "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
    assert proc.apply_chat_template(chat("image")) == expected
    video = chat("video", text="What happens?")
    theirs = hproc.apply_chat_template(video, add_generation_prompt=True)
    assert proc.apply_chat_template(video) == theirs
    # SmolVLM2 switches templates
    assert ("<video>" in proc.apply_chat_template(video)) == (variant == "v2")


def processor_cases(images):
    return [
        dict(text=["<image>Describe this image."], images=[[images[0]]]),
        # mixed tile counts, and a text-only row
        dict(text=["<image>Compare<image>", "hi there, no image here", "<image>tall one"],
             images=[[images[0], images[1]], [], [images[3]]]),
        # a flat list of images
        dict(text=["User:<image>a<image>b<end_of_utterance>\nAssistant:"],
             images=[images[2], images[1]]),
        dict(text=["<image>no split", "<image>no split either"],
             images=[[images[0]], [images[3]]], do_image_splitting=False),
        dict(text=["only text, 2024", "and more text"]),
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_matches_transformers(variant, ours, hf, images):
    proc, hproc = ours[variant][1], hf[variant][1]
    for case in processor_cases(images):
        assert_same_inputs(proc(**case), hf_call(hproc, **case))


def test_image_splitting_layout(ours, images):
    """The tile grid follows the resize rules (long side to 4 tiles, short side even-rounded then up
    to whole tiles), tiles are row-major with the global view last, and the prompt has one block per
    tile."""
    proc = ours["v1"][1]
    M = proc.tile
    for im, grid in [(images[0], (4, 4)), (images[1], (3, 4)), (images[3], (4, 2))]:
        tiles, rows, cols = proc.image_tiles(im)
        assert (rows, cols) == grid and tiles.shape == (rows * cols + 1, 3, M, M)
        size = S.longest_edge_size(im.size[1], im.size[0], proc.edge)
        big = S.resize(S.image_tensor(im)[None], size, "lanczos")
        big = S.resize(big, (rows * M, cols * M), "lanczos")[0]
        assert torch.equal(tiles[cols + 1], big[:, M:2 * M, M:2 * M])  # row 1, col 1
        assert torch.equal(tiles[-1], S.resize(big[None], (M, M), "lanczos")[0])
        ids = proc(text=["<image>"], images=[[im]])["input_ids"][0]
        n_image_tokens = int((ids == proc.tokenizer.token_to_id("<image>")).sum())
        assert n_image_tokens == (rows * cols + 1) * proc.image_seq_len
        # "\n\n" is one token
        assert len(ids) == proc.image_seq_len + 3 + rows * ((proc.image_seq_len + 2) * cols + 1)


def test_number_words_match_num2words():
    from num2words import num2words
    assert all(S.number_words(n) == num2words(n) for n in range(1000))


# ----------------------------------------------------------------------------- model parity

@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, ours, hf, images, record_property):
    model, proc = ours[variant]
    case = processor_cases(images)[1]
    inputs = proc(**case)
    with torch.no_grad():
        a = model(**inputs)
        b = hf[variant][0](**hf_inputs(inputs)).logits
    real = inputs["attention_mask"].bool()
    # in the junit XML (--junitxml)
    record_property("max_abs_dlogit", float((a - b)[real].abs().max()))
    assert (a - b)[real].abs().max() <= 1e-4
    # the images must matter: other images move the logits far beyond the tolerance
    with torch.no_grad():
        c = model(**proc(**dict(case, images=[[images[2], images[1]], [], [images[3]]])))
    assert (a - c)[0, -1].abs().max() > 0.1


def test_vision_tower_and_connector_match_transformers(ours, hf):
    """Partly padded tiles exercise the patch mask and the bucketised positions; scale factors 4 and
    3 the pixel shuffle's block order."""
    for variant in ["v1", "v1big"]:
        model, hmodel = ours[variant][0], hf[variant][0]
        M = ours[variant][1].tile
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand(1, 3, 3, M, M, generator=g) * 2 - 1
        mask = torch.ones(1, 3, M, M, dtype=torch.long)
        mask[0, 1, :, M // 2 + 3:] = 0  # a tile with real pixels in its left part only (ragged)
        mask[0, 2, M // 3:, :] = 0
        pixels = pixels * mask[:, :, None]
        with torch.no_grad():
            a = model.image_features(pixels, mask)
            b = hmodel.model.get_image_features(pixels, mask).pooler_output[0].view(a.shape)
            full = model.image_features(pixels, torch.ones_like(mask))
        assert (a - b).abs().max() <= 1e-4
        assert (a - full)[1:].abs().max() > 1e-2  # the mask matters
        vision = model.cfg.vision
        x = torch.randn(2, (vision.image_size // vision.patch_size) ** 2, vision.hidden_size)
        with torch.no_grad():
            assert torch.allclose(model.model.connector(x), hmodel.model.connector(x), atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers(variant, ours, hf, images):
    model, proc = ours[variant]
    texts = [proc.apply_chat_template(chat("image")),
             proc.apply_chat_template(chat("image", "image", text="Compare."))]
    inputs = proc(text=texts, images=[[images[0]], [images[3], images[1]]])
    T = inputs["input_ids"].shape[1]
    new = model.generate(**inputs, max_new_tokens=16)
    hmodel = hf[variant][0]
    ref = hmodel.generate(**inputs, max_new_tokens=16, do_sample=False)[:, T:]
    assert new.shape == (2, 16) and torch.equal(new, ref)
    # the comparison means something only if the path is not a near-tie nor one repeated token
    with torch.no_grad():
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ref], 1),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ref)], 1))
        logits = hmodel(**hf_inputs(full)).logits
    top2 = logits[:, T - 1:-1].topk(2).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-2
    assert all(len(set(row.tolist())) >= 4 for row in ref)
    assert proc.decode(new[0]) == hf[variant][1].decode(new[0], skip_special_tokens=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_uncached(variant, ours, images):
    """Greedy with the KV cache == greedy recomputing the whole sequence with model() at every
    step."""
    model, proc = ours[variant]
    inputs = proc(text=[proc.apply_chat_template(chat("image"))], images=[[images[2]]])
    new = model.generate(**inputs, max_new_tokens=10)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(10):
        with torch.no_grad():
            logits = model(ids, mask, inputs["pixel_values"], inputs["pixel_attention_mask"])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(new, ids[:, -10:])


def test_compiled_decoding_equals_eager(ours, images):
    """generate(compiled=True), the decode step through torch.compile (issue 17): the same greedy
    tokens as eager decoding on a left-padded batch, and prompts of other lengths reuse the one
    compiled program. (The fp32 kernels differ in rounding, O(1e-6) on logits O(10); the paths
    are checked for near-ties, as in test_greedy_tokens_match_transformers.)"""
    model, proc = ours["v2"]
    first = proc(text=[proc.apply_chat_template(chat("image")),
                       proc.apply_chat_template(chat("image", "image", text="Compare."))],
                 images=[[images[0]], [images[3], images[1]]])
    second = proc(text=[proc.apply_chat_template(chat("image", text="What is it?")),
                        proc.apply_chat_template(chat(text="Tell me a story."))],
                  images=[[images[2]], []])
    assert first["input_ids"].shape[1] != second["input_ids"].shape[1]
    eager = model.generate(**first, max_new_tokens=12)
    assert torch.equal(model.generate(**first, max_new_tokens=12, compiled=True), eager)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    new = model.generate(**second, max_new_tokens=5, compiled=True)
    assert torch.equal(new, model.generate(**second, max_new_tokens=5))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no second compile
    # no near-ties on these paths, so equal tokens are not luck of rounding (they do not prove
    # equal logits, though: a wrong mask moved them by 0.7 with the same argmax; hence below)
    for inputs, ids in ((first, eager), (second, new)):
        T = inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids], 1),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1))
        with torch.no_grad():
            top2 = model(**full)[:, T - 1:-1].topk(2).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    # and the logits, a few compiled steps against the uncached forward (fp32: 1e-4, as parity)
    ids = proc(text=[proc.apply_chat_template(chat(text="Tell me a story."))])["input_ids"]
    T = ids.shape[1]
    c = model.cfg.text
    cache = common.KVCache(c.num_hidden_layers, 1, c.num_key_value_heads, T + 3, c.head_dim,
                           torch.float32, "cpu")
    keys = torch.ones(1, T + 3, dtype=torch.bool)
    with torch.inference_mode():
        model(ids, cache=cache, last_only=True)
        step = compiled.compile_step(model, "decode_step", keys, cache)
        for token in (5, 17, 40):
            cache.slot = torch.full((1,), cache.len)
            logits = step(torch.tensor([[token]]), torch.tensor([[cache.len]]), keys, cache)
            cache.len += 1
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            assert (logits - model(ids)[:, -1:]).abs().max() < 1e-4


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_mixed_tile_batch_equals_rows_alone(variant, ours, images):
    """Rows with 17, 13 + 9 and no tiles (zero-padded images and masks) and left padding == each row
    alone."""
    model, proc = ours[variant]
    story = "Hello, who are you? Tell me a story."
    rows = [(chat("image"), [images[0]]),
            (chat("image", "image", text="Which is taller?"), [images[1], images[3]]),
            ([{"role": "user", "content": [{"type": "text", "text": story}]}], [])]
    texts = [proc.apply_chat_template(m) for m, _ in rows]
    inputs = proc(text=texts, images=[i for _, i in rows])
    n = [len(proc.image_tiles(i)[0]) for i in (images[0], images[1], images[3])]
    assert len(set(n)) == 3 and inputs["pixel_values"].shape[1] == n[1] + n[2]
    assert not inputs["pixel_values"][2].any()
    batch = model.generate(**inputs, max_new_tokens=8)
    for i, (t, ims) in enumerate(zip(texts, [i for _, i in rows])):
        alone = model.generate(**proc(text=[t], images=[ims] if ims else None), max_new_tokens=8)
        assert torch.equal(batch[i], alone[0])


# ----------------------------------------------------------------------------- training

def conversations():
    """A one-turn conversation and a two-turn one (its first answer is context, not learned)."""
    first = [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "Describe this image."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cow on the beach."}]}]
    second = first + [
        {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "On the sandy beach."}]}]
    return [first, second]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_labels_cover_the_answer_and_end_of_turn(variant, ours, hf, images):
    proc = ours[variant][1]
    assert_chat_labels(proc, hf[variant][1], conversations(), [[images[0]], [images[1]]],
                       "<end_of_utterance>")
    prompt, answer = training_data.prompt_and_answer(proc, conversations()[0])
    assert answer == " A cow on the beach.<end_of_utterance>"  # as the template writes it
    with pytest.raises(common.VLMError, match="must end with the assistant"):
        training_data.prompt_and_answer(proc, conversations()[0][:1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_match_transformers(variant, ours, hf, images, record_property):
    """A left-padded batch of two training rows: loss, and gradients through the vision tower, the
    connector and the decoder."""
    model, proc = ours[variant]
    pairs = [training_data.prompt_and_answer(proc, conversation)
             for conversation in conversations()]
    inputs = proc(text=[prompt for prompt, _ in pairs], images=[[images[0]], [images[1]]],
                  suffix=[answer for _, answer in pairs])
    names = ["model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
             "model.connector.modality_projection.proj.weight",
             "model.text_model.embed_tokens.weight",
             "model.text_model.layers.0.self_attn.k_proj.weight",
             "model.text_model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    errors = assert_same_loss_and_gradients(model, hf[variant][0], inputs, hf_inputs(inputs),
                                            {name: name for name in names})
    record_property("gradient_relative_errors", errors)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"})  # no labels: logits
    assert torch.is_tensor(logits) and logits.shape[:2] == inputs["input_ids"].shape


def test_bfloat16_agrees_loosely(ckpt, images):
    """bf16 keeps ~3 significant digits, so logits of magnitude ~20 may differ by ~0.1 after a few
    layers; we require the two bf16 runs to agree within 5% of the logit range and on the top-1
    token at most positions."""
    from transformers import AutoModelForImageTextToText
    model, proc = S.load(str(ckpt["v2"]), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    theirs = AutoModelForImageTextToText.from_pretrained(ckpt["v2"], dtype=torch.bfloat16).eval()
    inputs = proc(**processor_cases(images)[1])
    with torch.no_grad():
        a, b = model(**inputs).float(), theirs(**hf_inputs(inputs)).logits.float()
    real = inputs["attention_mask"].bool()
    assert (a - b)[real].abs().max() <= 0.05 * (b[real].max() - b[real].min())
    assert (a.argmax(-1) == b.argmax(-1))[real].float().mean() >= 0.9


def test_stop_ids_and_stopping(ckpt, ours, images, tmp_path):
    """The stop set is the union of <end_of_utterance>, the tokenizer's eos, config.json's and
    generation_config.json's; a row stops at any of them and the rest is padding."""
    for variant in VARIANTS:
        model, proc = ours[variant]
        eou = proc.tokenizer.token_to_id("<end_of_utterance>")
        assert model.stop == proc.stop and {eou} <= set(model.stop) <= {eou, 2}
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt["v1"], dst)
    model, proc = S.load(str(dst))
    inputs = proc(text=[proc.apply_chat_template(chat("image"))], images=[[images[0]]])
    first = int(model.generate(**inputs, max_new_tokens=1)[0, 0])
    eou = proc.tokenizer.token_to_id("<end_of_utterance>")
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [eou, first]}))
    model, proc = S.load(str(dst))
    assert first in model.stop and eou in model.stop
    new = model.generate(**inputs, max_new_tokens=8)
    assert new.shape == (1, 1) and proc.decode(new[0]) == ""


def test_unknown_keywords_raise_type_error(ours, images):
    """forward, generate and the processor name every argument they take: a misspelt keyword is a
    TypeError, as for any Python function, never silently dropped (max_new_token=5 would otherwise
    generate the default 100 tokens)."""
    model, proc = ours["v1"]
    inputs = proc(text=["<image>Describe this image."], images=[[images[0]]])
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(**inputs, max_new_token=5)
    with pytest.raises(TypeError, match="max_new_token"):
        model(**inputs, max_new_token=5)
    with pytest.raises(TypeError, match="position_ids"):  # transformers' name; ours counts them
        model(**inputs, position_ids=None)
    with pytest.raises(TypeError, match="return_tensors"):  # transformers' processor option
        proc(text=["<image>Describe this image."], images=[[images[0]]], return_tensors="pt")


# ----------------------------------------------------------------------------- video (SmolVLM2)

def test_video_matches_transformers(ours, hf, video):
    """Our PyAV decoding + SmolVLM sampling of a file == transformers given the same decoded frames
    and metadata (as its chat-template path samples them), for the default frame budget and for one
    small enough that the first and last second are skipped; then logits and greedy tokens on the
    video input."""
    (model, proc), (hmodel, hproc) = ours["v2"], hf["v2"]
    path, frames, meta = video
    text = proc.apply_chat_template(chat("video", text="What happens?"))
    budgets = [(None, [0, 4, 8, 12, 16, 20, 24, 28, 32, 37]), (4, [4, 14, 24, 34])]
    for num_frames, expected in budgets:
        a = proc(text=[text], videos=[path], num_frames=num_frames)
        b = hf_call(hproc, text=[text], videos=[frames], video_metadata=[meta],
                    do_sample_frames=True, fps=hproc.video_processor.fps,
                    num_frames=num_frames or hproc.video_processor.num_frames)
        assert_same_inputs(a, b)
        assert a["pixel_values"].shape[1] == len(expected)
        prompt = proc.tokenizer.decode(a["input_ids"][0].tolist())
        assert f"Frame from 00:{expected[-1] // 4:02d}:" in prompt
    # already decoded frames: sampled on request, all kept otherwise (transformers' default for
    # arrays)
    case = dict(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=True)
    assert_same_inputs(proc(**case), hf_call(hproc, **case))
    # two videos of 7 and 5 frames: both prompts state the padded count (seven), as transformers' do
    two = [text, text.replace("What happens?", "And now?")]
    metas = [dict(meta, frames_indices=list(range(7))),
             dict(meta, frames_indices=list(range(10, 15)))]
    case = dict(text=two, videos=[frames[:7], frames[10:15]], video_metadata=metas)
    a = proc(**case)
    assert_same_inputs(a, hf_call(hproc, **case))
    assert proc.tokenizer.decode(a["input_ids"][1].tolist()).count("seven frames") == 1
    inputs = proc(text=[text], videos=[path], num_frames=4)
    with torch.no_grad():
        assert (model(**inputs) - hmodel(**inputs).logits).abs().max() <= 1e-4
    T = inputs["input_ids"].shape[1]
    assert torch.equal(model.generate(**inputs, max_new_tokens=16),
                       hmodel.generate(**inputs, max_new_tokens=16, do_sample=False)[:, T:])


def test_video_processor_config_file(ckpt, video, tmp_path):
    """With a video_preprocessor_config.json (no image `size` in it) frames go to video_size, not to
    the image longest edge that preprocessor_config.json would impose: still equal to
    transformers."""
    from transformers import AutoProcessor
    dst = tmp_path / "v2"
    shutil.copytree(ckpt["v2"], dst)
    pp = json.loads((dst / "preprocessor_config.json").read_text())
    image_only = ("size", "do_image_splitting", "image_processor_type")
    vp = {k: v for k, v in pp.items() if k not in image_only}
    sampling = {"fps": 2, "max_frames": 6, "video_size": {"longest_edge": 40}}
    vp.update(video_processor_type="SmolVLMVideoProcessor", video_sampling=sampling)
    (dst / "video_preprocessor_config.json").write_text(json.dumps(vp))
    proc, hproc = S.Processor(dst, S.Config.from_folder(dst)), AutoProcessor.from_pretrained(dst)
    assert hproc.video_processor.size["longest_edge"] == proc.video["edge"] == 40
    path, frames, meta = video
    text = proc.apply_chat_template(chat("video"))
    theirs = hf_call(hproc, text=[text], videos=[frames], video_metadata=[meta],
                     do_sample_frames=True, num_frames=6, fps=2)
    assert_same_inputs(proc(text=[text], videos=[str(path)]), theirs)


# ----------------------------------------------------------------------------- command line

def test_cli_image_end_to_end(ckpt, ours, images, tmp_path):
    """Two --image flags: both go into the one prompt, wrapped in the chat template."""
    paths = [tmp_path / "cat picture.png", tmp_path / "dog.jpg"]
    images[0].save(paths[0])
    images[3].save(paths[1], quality=90)
    r = run_cli("smolvlm.py", "--dtype", "float32", "--model", str(ckpt["v1"]),
                "--image", str(paths[0]), "--image", str(paths[1]),
                "--prompt", "Describe this image.", "--max-new-tokens", "12", "--verbose")
    assert r.returncode == 0, r.stderr
    model, proc = ours["v1"]
    inputs = proc(text=[proc.apply_chat_template(chat("image", "image"))],
                  images=[[S.open_image(p) for p in paths]])
    assert r.stdout == proc.decode(model.generate(**inputs, max_new_tokens=12)[0]) + "\n"
    assert "tokens/s" in r.stderr and "load" in r.stderr


def test_cli_video_end_to_end(ckpt, ours, video):
    path = str(video[0])
    r = run_cli("smolvlm.py", "--dtype", "float32", "--model", str(ckpt["v2"]), "--video", path,
                "--prompt", "What happens?", "--num-frames", "4", "--max-new-tokens", "10")
    assert r.returncode == 0, r.stderr
    model, proc = ours["v2"]
    prompt = proc.apply_chat_template(chat("video", text="What happens?"))
    inputs = proc(text=[prompt], videos=[path], num_frames=4)
    assert r.stdout == proc.decode(model.generate(**inputs, max_new_tokens=10)[0]) + "\n"
    raw = cli_in_process(S, "--dtype", "float32", "--model", str(ckpt["v2"]), "--video", path,
                         "--prompt", "In this video, we see", "--raw",
                         "--num-frames", "4", "--max-new-tokens", "10")
    inputs = proc(text=["<video>In this video, we see"], videos=[path], num_frames=4)
    assert raw.returncode == 0
    assert raw.stdout == proc.decode(model.generate(**inputs, max_new_tokens=10)[0]) + "\n"


def test_generate_and_forward_take_what_the_processor_returns(ours, images, video):
    """model(**processor(...)) and model.generate(**processor(...)) take every key the processor
    returns, a suffix's labels included, as transformers' do (images: pixel_attention_mask too;
    a video gives the same keys). generate ignores labels: its tokens are those of the same inputs
    without them."""
    pairs = [training_data.prompt_and_answer(ours["v1"][1], conversation)
             for conversation in conversations()]
    text = [prompt for prompt, _ in pairs]
    answers = [answer for _, answer in pairs]
    v2_proc = ours["v2"][1]
    video_text = [v2_proc.apply_chat_template(chat("video", text="What happens?"))]
    cases = [("v1", dict(text=text, images=[[images[0]], [images[1]]], suffix=answers)),
             ("v2", dict(text=video_text, videos=[video[0]], num_frames=4, suffix=["A cow."]))]
    for variant, case in cases:
        model, proc = ours[variant]
        inputs = proc(**case)
        assert set(inputs) == {"input_ids", "attention_mask", "labels", "pixel_values",
                               "pixel_attention_mask"}
        without = {k: v for k, v in inputs.items() if k != "labels"}
        new = model.generate(**inputs, max_new_tokens=6)
        assert new.shape[1] > 0 and torch.equal(new, model.generate(**without, max_new_tokens=6))
        with torch.no_grad():
            logits, loss = model(**inputs)
            assert torch.equal(logits, model(**without)) and loss.item() > 0
