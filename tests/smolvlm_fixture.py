"""Tiny random SmolVLM 1 (Idefics3) and SmolVLM2 checkpoints in the exact Hugging Face Hub layout.

Three variants, one per tokenizer/processor family a released checkpoint has:
- "v1":   SmolVLM-{256M,500M}-Instruct style: `idefics3`, SmolLM2 vocabulary with `<global-img>`,
          `<row_r_col_c>`, `<fake_token_around_image>`, `<image>`, reserved tokens and
          `<end_of_utterance>` added after it, tokenizer_class GPT2Tokenizer, pixel-shuffle scale
          factor 4.
- "v1big": SmolVLM-Instruct (2.2B) style: `idefics3`, only `<fake_token_around_image>`, `<image>`,
          `<end_of_utterance>` added (so `<global-img>` and `<row_r_col_c>` are plain text), scale
          factor 3, patch 7 (SO400M/14-like), no GQA, chat template in chat_template.jinja.
- "v2":   SmolVLM2-{256M,500M}-Video-Instruct style: `smolvlm`, the v1 vocabulary, tokenizer_class
          PreTrainedTokenizerFast with extra_special_tokens, `video_sampling` in
          preprocessor_config.json, and a vision_config that leaves out num_hidden_layers and
          intermediate_size (as the hub file does), so the class defaults 12 and 3072 apply; scale
          factor 2 here (4 in the release), so all three factors are run.
Hand-written hub-format config.json (4.x form: torch_dtype, rope_theta), tokenizer.json built with
`tokenizers` (byte-level BPE behind SmolLM2's Digits + ByteLevel pre-tokenizer, no post-processor,
"\\n\\n" one token), tokenizer_config.json, preprocessor_config.json, processor_config.json
(image_seq_len), the chat template, generation_config.json, and weights under the hub names
(`model.vision_model.*`, `model.connector.*`, `model.text_model.*`, `lm_head.weight`).
"""
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from hub import check_loads_cleanly, hf_shapes, random_tensor, save_safetensors, write_json

CORPUS = [
    "User: What do these images show?", "Assistant: A cow on the beach.", "Describe this image.",
    "Can you describe the video in detail?", "What is happening in this video?",
    "In this image, we see",
    "You are provided the following series of nine frames from a 0:00:09 [H:MM:SS] video.\n",
    "\nFrame from 00:01:", "\nFrame from 00:08:", "\n\n", "\n",
    "The quick brown fox jumps over the lazy dog.",
    "Où est la vache ? sur la plage. 2024 1234567890 "
    "+ - * / = ( ) [ ] { } < > \" ' ! ? , . : ;",
    "two cats laying on a pile of brown fishing nets", "Statue of Liberty, New York Bay 1886",
]
SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
                   "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
                   "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                   "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
ROWS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
            "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
            "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
            "<end_of_utterance>\n{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def smollm_tokenizer(folder, variant):
    """Write tokenizer.json and tokenizer_config.json; returns the vocabulary (token -> id)."""
    digits = pre_tokenizers.Digits(individual_digits=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = pre_tokenizers.Sequence([digits, byte_level])
    t = Tokenizer(BPE())
    t.pre_tokenizer = pre
    trainer = BpeTrainer(vocab_size=420, show_progress=False, special_tokens=SMOLLM_SPECIALS,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS * 3, trainer)
    state = json.loads(t.to_str())["model"]
    vocab = dict(sorted(state["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    if variant == "v1big":  # SmolVLM-Instruct: three added tokens only
        added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    else:
        added = (["<global-img>"] + ROWS + ["<fake_token_around_image>", "<image>"]
                 + [f"<|reserved_special_token_{k}|>" for k in range(3)] + ["<end_of_utterance>"])
    for tok in added:
        vocab[tok] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in SMOLLM_SPECIALS + added])
    tok.save(str(folder / "tokenizer.json"))
    assert len(tok.encode("\n\n").ids) == 1 and len(tok.encode("2024").ids) == 4
    decoder = {str(vocab[s]): {"content": s, "lstrip": False, "normalized": False,
                               "rstrip": False, "single_word": False, "special": True}
               for s in SMOLLM_SPECIALS + added}
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder,
              "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False,
              "eos_token": "<end_of_utterance>", "model_max_length": 8192,
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "vocab_size": 49152,
              "additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                            "<end_of_utterance>"],
              "processor_class": "SmolVLMProcessor" if variant == "v2" else "Idefics3Processor",
              "tokenizer_class": "PreTrainedTokenizerFast" if variant == "v2" else "GPT2Tokenizer"}
    if variant == "v2":
        config["truncation_side"] = "left"
        config["extra_special_tokens"] = {"image_token": "<image>",
                                          "fake_image_token": "<fake_token_around_image>",
                                          "global_image_token": "<global-img>",
                                          "end_of_utterance_token": "<end_of_utterance>"}
    write_json(folder / "tokenizer_config.json", config)
    return vocab


# Tiny shapes with everything a real checkpoint varies: scale factor 4 vs 3, patch 16-like vs
# 14-like (odd), GQA vs plain multi-head, explicit head_dim, fields left to the class defaults
# (v2 vision).
# seed: one whose greedy paths have clear margins and several distinct tokens (checked by the tests)
TINY = {
    "v1": dict(seed=0, scale_factor=4, tile=32, longest_edge=128,
               vision=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_hidden_layers=2, image_size=32, patch_size=4),
               text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, head_dim=16,
                         rope_theta=100000, max_position_embeddings=8192)),
    "v1big": dict(seed=0, scale_factor=3, tile=42, longest_edge=168,
                  vision=dict(hidden_size=36, intermediate_size=72, num_attention_heads=3,
                              num_hidden_layers=2, image_size=42, patch_size=7),
                  text=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=4, num_hidden_layers=2, rope_theta=273768.0,
                            max_position_embeddings=16384)),
    "v2": dict(seed=1, scale_factor=2, tile=16, longest_edge=64, video_edge=16, max_frames=64,
               # 12 layers, MLP 3072
               vision=dict(hidden_size=32, num_attention_heads=2, image_size=16, patch_size=4),
               text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, head_dim=16,
                         rope_theta=100000, max_position_embeddings=8192)),
}


def tuned(name, t):
    """Plain random weights make a degenerate language model that repeats one token: the attention
    output is nearly the same average at every step. So the attention branch is made smaller and the
    MLP branch large (each position's own token then mostly decides the next one, while the images
    still move the logits), and the final norm is ~6x so logits spread widely (clear top-1
    margins)."""
    if "text_model" in name and "o_proj" in name:
        return t * 0.6
    if "text_model" in name and "down_proj" in name:
        return t * 3
    if name == "model.text_model.norm.weight":
        return t * 6
    return t


def build(folder, variant="v1", shards=1, dtype=torch.float32, shapes=None, seed=None, check=True,
          unreachable_eos=False):
    """Write a checkpoint directory. `shapes` overrides TINY[variant] (same keys; bench/ uses real
    sizes, with a real `vocab_size` in `text`); `unreachable_eos` zeroes the end tokens' output rows
    so that greedy decoding never stops early (a benchmark then always generates the same number of
    tokens)."""
    from transformers import (Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    from transformers import Idefics3Config
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = smollm_tokenizer(folder, variant)
    spec = shapes or TINY[variant]
    vis, txt, s, tile = dict(spec["vision"]), dict(spec["text"]), spec["scale_factor"], spec["tile"]
    n_vocab = txt.pop("vocab_size", len(vocab))
    seq_len = (vis["image_size"] // vis["patch_size"]) ** 2 // s ** 2
    eou, v2 = vocab["<end_of_utterance>"], variant == "v2"
    architecture = "SmolVLMForConditionalGeneration" if v2 else "Idefics3ForConditionalGeneration"
    v2_vision = ({"max_image_size": {"longest_edge": tile},
                  "size": {"longest_edge": spec["longest_edge"]},
                  "use_base_siglip": False} if v2 else {})
    config = {
        "architectures": [architecture],
        "image_token_id": vocab["<image>"], "model_type": "smolvlm" if v2 else "idefics3",
        "scale_factor": s,
        "text_config": {"_name_or_path": "None", "architectures": ["VLlama3ForCausalLM"],
                        "model_type": "llama", "pad_token_id": 2, "rms_norm_eps": 1e-5,
                        "rope_scaling": None, "torch_dtype": "bfloat16", "vocab_size": n_vocab,
                        "is_llama_config": True, "rope_interleaved": False, **txt},
        "tie_word_embeddings": False, "torch_dtype": str(dtype)[6:],
        "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": n_vocab,
        "vision_config": {"model_type": "smolvlm_vision" if v2 else "idefics3_vision",
                          "tie_word_embeddings": False, **v2_vision, **vis},
    }
    write_json(folder / "config.json", config)
    generation = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": eou,
                  "pad_token_id": 2, "transformers_version": "4.50.0.dev0"}
    write_json(folder / "generation_config.json", generation)
    pp = {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
          "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
          "image_std": [0.5, 0.5, 0.5],
          "image_processor_type": "SmolVLMImageProcessor" if v2 else "Idefics3ImageProcessor",
          "max_image_size": {"longest_edge": tile},
          "processor_class": "SmolVLMProcessor" if v2 else "Idefics3Processor",
          "resample": 1, "rescale_factor": 1 / 255, "size": {"longest_edge": spec["longest_edge"]}}
    if v2:
        pp["video_sampling"] = {"fps": 1, "max_frames": spec.get("max_frames", 64),
                                "video_size": {"longest_edge": spec.get("video_edge", tile)}}
    write_json(folder / "preprocessor_config.json", pp)
    write_json(folder / "processor_config.json",
               {"image_seq_len": seq_len, "processor_class": pp["processor_class"]})
    if variant == "v1big":
        (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    else:
        write_json(folder / "chat_template.json", {"chat_template": TEMPLATE})
    gen = torch.Generator().manual_seed(spec.get("seed", 0) if seed is None else seed)
    if v2:
        cls, cfg = SmolVLMForConditionalGeneration, SmolVLMConfig
    else:
        cls, cfg = Idefics3ForConditionalGeneration, Idefics3Config
    shapes = hf_shapes(cls, cfg.from_pretrained(folder))
    state = {k: tuned(k, random_tensor(k, shape, gen)).to(dtype) for k, shape in shapes.items()}
    if unreachable_eos:
        state["lm_head.weight"][eou] = 0  # logit exactly 0, far below the maximum
    save_safetensors(state, folder, shards, dtype)
    if check:
        check_loads_cleanly(cls, folder)
    return folder
