"""Tiny random PaliGemma 1 and 2 checkpoints in the exact Hugging Face Hub layout.

Hand-written hub-format config.json (the 4.x form: torch_dtype, no rope_parameters), a Gemma-style
tokenizer.json (BPE with byte fallback, spaces as "▁", <pad>/<eos>/<bos>/<unk> = 0/1/2/3,
<loc>/<seg> in the vocabulary, <image> an added special token after them, embedding rows padded to a
multiple of 64), tokenizer_config.json, preprocessor_config.json, generation_config.json, and
weights under the hub names (`vision_tower.vision_model.*`, `language_model.model.*`,
`multi_modal_projector.linear.*`, no lm_head).
"""
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from hub import check_loads_cleanly, hf_shapes, random_tensor, save_safetensors, write_json

CORPUS = [
    "caption en", "caption es", "describe en", "answer en where is the cow standing?",
    "detect cat ; dog", "segment car", "ocr", "a cow on the beach",
    "two cats laying on a pile of brown fishing nets", "question en what is this?",
    "The quick brown fox jumps over the lazy dog.", "Où est la vache ? sur la plage",
    "A photo of a bee on a flower, in the garden.",
    "1234567890 + - * / = ( ) [ ] { } < > \" ' ! ? , . : ;",
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def gemma_tokenizer(folder):
    """Write a Gemma-style tokenizer.json; returns (image_token_id, tokenizer vocabulary size)."""
    trainer = BpeTrainer(vocab_size=400, show_progress=False, special_tokens=[])
    t = Tokenizer(BPE())
    t.normalizer = normalizers.Replace(" ", "▁")
    t.train_from_iterator(CORPUS * 3, trainer)
    learned = json.loads(t.to_str())["model"]
    vocab = {}
    learned_tokens = sorted(learned["vocab"], key=learned["vocab"].get)
    for tok in SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + learned_tokens:
        vocab.setdefault(tok, len(vocab))
    for tok in [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]:
        vocab[tok] = len(vocab)
    image_id = len(vocab)
    vocab["<image>"] = image_id
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                        byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in SPECIALS[:5] + ["<image>"]])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in SPECIALS[5:]])
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                            special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    specials = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for s, i in vocab.items() if s in SPECIALS[:5] + ["<image>"]}
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": specials,
        "bos_token": "<bos>", "clean_up_tokenization_spaces": False, "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>", "padding_side": "left", "processor_class": "PaliGemmaProcessor",
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False})
    return image_id, len(vocab)


# Tiny shapes; everything a real checkpoint varies is varied here too (MQA vs GQA, explicit
# head_dim, query_pre_attn_scalar != head_dim, a sliding window shorter than the prompt).
TINY = {
    # the seed of each is one whose greedy path has clear margins (checked by the tests)
    "pg1": dict(seed=4, text=dict(model_type="gemma", hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
                                  head_dim=32),
                vision=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_hidden_layers=2, image_size=56, patch_size=14)),
    "pg2": dict(seed=5, text=dict(model_type="gemma2", hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                                  head_dim=16, query_pre_attn_scalar=24, sliding_window=24,
                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                  cache_implementation="hybrid",
                                  hidden_activation="gelu_pytorch_tanh",
                                  max_position_embeddings=8192),
                vision=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_hidden_layers=2, image_size=56, patch_size=14)),
}


def hub_key(hf_key):
    """transformers 5 internal name -> the hub name the released checkpoints use."""
    return (hf_key.replace("model.vision_tower.", "vision_tower.vision_model.")
            .replace("model.language_model.", "language_model.model.")
            .replace("model.multi_modal_projector.", "multi_modal_projector."))


def tuned(name, t, gemma2):
    """Plain random weights make a degenerate language model: the attention output is nearly the
    same average at every step and, with the output head tied to the embedding, greedy decoding
    repeats one token. So the attention branch is made small and the MLP branch large (each
    position's own token then decides the next one), the zero-centred Gemma norms get unit spread,
    and the final norm is ~9x so logits are widely spread (clear top-1 margins). Gemma 2's sandwich
    norms undo branch scales, so there the norms carry them."""
    if "embed_tokens" in name:
        return t / t.shape[1] ** 0.5
    if "o_proj" in name:
        return t * 0.3
    if "down_proj" in name:
        return t * 3
    if name.startswith("language_model") and "norm" in name:
        t = t * 10  # N(0, 0.1) -> N(0, 1) around the stored zero
        if name.endswith("model.norm.weight"):
            return t + 8
        if gemma2 and "post_attention_layernorm" in name:
            return t - 0.7
        if gemma2 and "post_feedforward_layernorm" in name:
            return t + 2
    return t


def build(folder, variant="pg1", shards=1, dtype=torch.float32, shapes=None, seed=None, check=True,
          unreachable_eos=False):
    """Write a checkpoint directory. `shapes` overrides TINY[variant] (bench/ uses real sizes,
    including a real `vocab_size`); `unreachable_eos` zeroes the end tokens' output rows so that
    greedy decoding never stops early (a benchmark then always generates the same number of
    tokens)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_id, n_tokens = gemma_tokenizer(folder)
    spec = shapes or TINY[variant]
    vis, txt = dict(spec["vision"]), dict(spec["text"])
    # the conversion pads to a multiple of 64
    vocab = txt.pop("vocab_size", (n_tokens + 63) // 64 * 64)
    n_img = (vis["image_size"] // vis["patch_size"]) ** 2
    gemma2 = txt["model_type"] == "gemma2"
    eos = [1, 6] if gemma2 else 1  # <eos>, and <end_of_turn> for PaliGemma 2
    config = {
        "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
        "eos_token_id": eos, "hidden_size": 2048, "ignore_index": -100,
        "image_token_index": image_id, "model_type": "paligemma",
        "pad_token_id": 0, "projection_dim": txt["hidden_size"],
        "text_config": {**txt, "num_image_tokens": n_img, "vocab_size": vocab,
                        "torch_dtype": str(dtype)[6:],
                        **({"eos_token_id": eos} if gemma2 else {})},
        "torch_dtype": str(dtype)[6:], "transformers_version": "4.47.0.dev0",
        "vision_config": {**vis, "model_type": "siglip_vision_model", "num_image_tokens": n_img,
                          "projection_dim": txt["hidden_size"], "projector_hidden_act": "gelu_fast",
                          "vision_use_head": False,
                          **({"num_positions": n_img, "hidden_act": "gelu_pytorch_tanh"}
                             if gemma2 else {})},
    }
    write_json(folder / "config.json", config)
    write_json(folder / "generation_config.json",
               {"bos_token_id": 2, "eos_token_id": eos, "pad_token_id": 0})
    write_json(folder / "preprocessor_config.json", {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": n_img,
        "image_std": [0.5, 0.5, 0.5], "processor_class": "PaliGemmaProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": vis["image_size"], "width": vis["image_size"]}})
    gen = torch.Generator().manual_seed(spec.get("seed", 0) if seed is None else seed)
    shapes = hf_shapes(PaliGemmaForConditionalGeneration, PaliGemmaConfig.from_pretrained(folder))
    state = {}
    for k, shape in shapes.items():
        if k == "lm_head.weight":  # tied to the embedding: the hub files do not store it
            continue
        name = hub_key(k)
        t = random_tensor(name, shape, gen, zero_centred_norms=True)
        state[name] = tuned(name, t, gemma2).to(dtype)
        if unreachable_eos and name.endswith("embed_tokens.weight"):
            # logit exactly 0, far below the maximum
            state[name][eos if isinstance(eos, list) else [eos]] = 0
    save_safetensors(state, folder, shards, dtype)
    if check:
        check_loads_cleanly(PaliGemmaForConditionalGeneration, folder)
    return folder
