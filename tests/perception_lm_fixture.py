"""Tiny random PerceptionLM checkpoints in the exact Hugging Face Hub layout.

Hand-written hub-format config.json (the 4.x form the conversion script wrote: torch_dtype,
rope_theta and rope_scaling, a timm_wrapper vision_config whose `model_args` override the timm
architecture's defaults), a Llama-3-style tokenizer.json (byte-level BPE, the PLM special tokens
after the learned vocabulary in the conversion's order, a post-processor that prepends
<|begin_of_text|>), tokenizer_config.json, preprocessor_config.json, video_preprocessor_config.json,
processor_config.json, the chat template, generation_config.json, and weights under the hub names
(`model.vision_tower.timm_model.*`, `model.multi_modal_projector.linear_{1,2}.*`,
`model.language_model.*`, `lm_head.weight` when untied).

Variants: "1b" = PLM-1B/3B structure (vit_pe_core_large: class token, RoPE grid offset 1; tied head;
llama3 RoPE scaling) and "8b" = PLM-8B structure (vit_pe_core_gigantic: no class token, offset 0,
MLP ratio 8960/1536; untied head; no scaling) with an odd 5x5 patch grid, so the 2x2 adaptive
pooling has overlapping windows. Real sizes go through the same build(..., shapes=REAL[variant])
(bench/ uses it).
"""
import copy
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from hub import check_loads_cleanly, hf_shapes, random_tensor, save_safetensors, write_json

# The conversion script's chat template (transformers convert_perception_lm_weights_to_hf.py),
# verbatim.
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = 'You are a helpful language and vision assistant. You are able to "
    "understand the visual content that the user provides, and assist the user with a variety of "
    "tasks using natural language.' %}"
    "{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- system_message }}"
    "{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<|image|>' }}{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<|video|>' }}{%- endfor %}"
    "{%- for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{- content['text'] | trim }}{%- endfor %}{{'<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Llama 3's pre-tokenizer split (tiktoken cl100k-style), as in its tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's reserved ids renamed by the PLM conversion (DEFAULT_SPECIAL_TOKENS), in order; the real
# files go on to <|reserved_special_token_250|> (128256 ids in all), the fixture stops early.
SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|video|>",
             "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
            + [f"<|reserved_special_token_{i}|>" for i in range(5, 11)])
CORPUS = [
    "Describe the image.", "What is in this video?",
    "You are a helpful language and vision assistant.",
    "You are able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language.",
    "system", "user", "assistant", "A cat sitting on a red sofa, looking at the camera.",
    "The quick brown fox jumps over the lazy dog. 1234567890", "Où est la vache ? sur la plage !",
    "Answer briefly: how many people are there? Two people are walking on the beach.",
    "a bar plot of sales",
]


def llama3_tokenizer(folder):
    """Write tokenizer.json + tokenizer_config.json; returns {special token: id},
    vocabulary size."""
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=False)
    t = Tokenizer(BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    trainer = BpeTrainer(vocab_size=500, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 3, trainer)
    vocab = t.get_vocab()
    learned = json.loads(t.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    ids = {s: len(vocab) + i for i, s in enumerate(SPECIALS)}
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    assert all(tok.token_to_id(s) == i for s, i in ids.items())
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, ids[bos])])])
    tok.save(str(folder / "tokenizer.json"))
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for s, i in ids.items()}
    write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": added, "bos_token": bos, "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "extra_special_tokens": {"image_token": "<|image|>", "video_token": "<|video|>"},
        "image_token": "<|image|>", "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 11520, "pad_token": "<|end_of_text|>",
        "processor_class": "PerceptionLMProcessor", "tokenizer_class": "PreTrainedTokenizerFast",
        "video_token": "<|video|>"})
    return ids, len(vocab) + len(SPECIALS)


# Tiny shapes: the real structure (thumbnail + tiles, PE grid, 2x2 pooling) with small tiles and
# tile caps. The vision `model_args` are what the hub config holds; what they leave out is the timm
# architecture's default.
# seeds chosen so the greedy paths have clear margins and several distinct tokens (the tests check)
TINY = {
    "1b": dict(
        seed=2, architecture="vit_pe_core_large_patch14_336", vision_use_cls_token=True, tie=True,
        vision=dict(embed_dim=64, depth=2, num_heads=4, img_size=[56, 56], ref_feat_shape=[4, 4]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=11520,
                  rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
        tile=56, max_num_tiles=4),
    "8b": dict(
        seed=6, architecture="vit_pe_core_gigantic_patch14_448", vision_use_cls_token=False,
        tie=False,
        vision=dict(embed_dim=48, depth=2, num_heads=4, img_size=[70, 70], ref_feat_shape=[5, 5]),
        text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=11520,
                  rope_scaling=None),
        tile=70, max_num_tiles=6),
}
# The released sizes (transformers' conversion script + the PLM training configs); vocab_size is the
# real one.
REAL = {
    "1b": dict(
        TINY["1b"],
        vision=dict(embed_dim=1024, depth=23, img_size=[448, 448], ref_feat_shape=[32, 32]),
        text=dict(TINY["1b"]["text"], hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=64, vocab_size=128256),
        tile=448, max_num_tiles=36),
    "3b": dict(
        TINY["1b"],
        vision=dict(embed_dim=1024, depth=23, img_size=[448, 448], ref_feat_shape=[32, 32]),
        text=dict(TINY["1b"]["text"], hidden_size=3072, intermediate_size=8192,
                  num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                  head_dim=128, vocab_size=128256),
        tile=448, max_num_tiles=36),
    "8b": dict(
        TINY["8b"],
        vision=dict(embed_dim=1536, depth=47, img_size=[448, 448], ref_feat_shape=[32, 32]),
        text=dict(TINY["8b"]["text"], hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=128256),
        tile=448, max_num_tiles=36),
}


def tuned(name, t, first_special):
    """Plain random weights make a degenerate language model (greedy decoding repeats one token), so
    the attention branch is made small and the MLP branch large (each position's own token then
    decides the next one), embeddings get unit-norm rows and the final norm is ~2x, so logits are
    widely spread (clear top-1 margins). The special tokens' output rows are shrunk so greedy paths
    stay in text, as a trained model's do until the turn ends. The vision side keeps
    hub.random_tensor's unit-scale activations: images move logits."""
    # (the head is already fan-in scaled: unit rows)
    if "embed_tokens" in name or name == "lm_head.weight":
        t = t / t.shape[1] ** 0.5 if "embed_tokens" in name else t
        t[first_special:] *= 0.3
        return t
    if "self_attn.o_proj" in name:
        return t * 0.3
    if "down_proj" in name:
        return t * 3
    if name == "model.language_model.norm.weight":
        return t * 2.5 + 2
    return t


def build(folder, variant="1b", shards=1, dtype=torch.float32, shapes=None, seed=None, check=True,
          template_file="chat_template.jinja", unreachable_eos=False):
    """Write a checkpoint directory. `shapes` overrides TINY[variant] (REAL[...] for the released
    sizes, with the real vocab_size); `unreachable_eos` zeroes the end tokens' output rows so that
    greedy decoding never stops early (a benchmark then always generates the same number of tokens).
    """
    from transformers import PerceptionLMConfig, PerceptionLMForConditionalGeneration
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids, n_tokens = llama3_tokenizer(folder)
    spec = copy.deepcopy(shapes or TINY[variant])
    txt, tile, patch = spec["text"], spec["tile"], 14
    eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    model_args = {**spec["vision"], "global_pool": "", "use_post_transformer_norm": False,
                  "init_values": 0.1}
    vision = {"architecture": spec["architecture"], "do_pooling": True, "global_pool": "map",
              "initializer_range": 0.02, "model_args": model_args, "model_type": "timm_wrapper",
              "num_classes": 1024, "num_features": spec["vision"]["embed_dim"],
              "pretrained_cfg": {"tag": "fb", "custom_load": False, "input_size": [3, 336, 336],
                                 "fixed_input_size": True, "interpolation": "bicubic",
                                 "crop_pct": 1.0, "crop_mode": "center", "mean": [0.5, 0.5, 0.5],
                                 "std": [0.5, 0.5, 0.5], "num_classes": 1024, "pool_size": None,
                                 "first_conv": "patch_embed.proj", "classifier": "head"}}
    text = {"architectures": None, "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos, "hidden_act": "silu",
            "initializer_range": 0.02, "mlp_bias": False, "model_type": "llama",
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "tie_word_embeddings": spec["tie"], "torch_dtype": str(dtype)[6:], "use_cache": True,
            "vocab_size": txt.pop("vocab_size", n_tokens), **txt}
    write_json(folder / "config.json", {
        "architectures": ["PerceptionLMForConditionalGeneration"],
        "image_token_id": ids["<|image|>"], "model_type": "perception_lm",
        "projector_pooling_ratio": 2, "text_config": text,
        "torch_dtype": str(dtype)[6:], "transformers_version": "4.54.0.dev0",
        "video_token_id": ids["<|video|>"], "vision_config": vision,
        "vision_use_cls_token": spec["vision_use_cls_token"]})
    write_json(folder / "generation_config.json", {
        "bos_token_id": ids["<|begin_of_text|>"], "do_sample": False, "eos_token_id": eos,
        "transformers_version": "4.54.0.dev0"})
    write_json(folder / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "PerceptionLMImageProcessorFast", "image_std": [0.5, 0.5, 0.5],
        "max_frame_tiles": 1, "max_num_tiles": spec["max_num_tiles"],
        "processor_class": "PerceptionLMProcessor", "size": {"height": tile, "width": tile},
        "tile_size": tile, "vision_input_type": "thumb+tile"})
    write_json(folder / "video_preprocessor_config.json", {
        "processor_class": "PerceptionLMProcessor", "size": {"height": tile, "width": tile},
        "video_processor_type": "PerceptionLMVideoProcessor"})
    write_json(folder / "processor_config.json", {
        "patch_size": patch, "pooling_ratio": 2, "processor_class": "PerceptionLMProcessor"})
    if template_file.endswith(".jinja"):
        (folder / template_file).write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:  # the older processor layout: {"chat_template": ...} in chat_template.json
        write_json(folder / template_file, {"chat_template": CHAT_TEMPLATE})
    gen = torch.Generator().manual_seed(spec.get("seed", 0) if seed is None else seed)
    config = PerceptionLMConfig.from_pretrained(folder)
    shapes = hf_shapes(PerceptionLMForConditionalGeneration, config)
    output_weight = "model.language_model.embed_tokens.weight" if spec["tie"] else "lm_head.weight"
    state = {}
    for name, shape in shapes.items():
        # tied to the embedding: the hub files do not store it
        if name == "lm_head.weight" and spec["tie"]:
            continue
        tensor = random_tensor(name, shape, gen)
        state[name] = tuned(name, tensor, n_tokens - len(SPECIALS)).to(dtype)
        if unreachable_eos and name == output_weight:
            state[name][eos] = 0  # logit exactly 0, far below the maximum
    save_safetensors(state, folder, shards, dtype)
    if check:
        check_loads_cleanly(PerceptionLMForConditionalGeneration, folder)
    return folder
