"""Helpers to write checkpoints in the Hugging Face Hub layout (used by the fixture builders and
bench/).

Weights are random but shaped so that comparisons mean something: linear layers keep activations at
unit scale (std 1/sqrt(fan_in)), embeddings have unit rows, so logits are spread widely (clear top-1
margins) and images move them.
"""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def random_tensor(name, shape, gen, zero_centred_norms=False):
    """A random value for a hub key, by what the key is: norms near 1 (or near 0 when the checkpoint
    stores them zero-centred, as Gemma does), biases small, matrices scaled by fan-in, embeddings
    unit."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(s in name for s in ("norm", "ln_", "layernorm"))
    if len(shape) <= 1 and (is_norm or leaf.startswith("gamma")):
        if leaf == "bias":
            return torch.randn(shape, generator=gen) * 0.1
        base = 0.0 if zero_centred_norms and "language_model" in name else 1.0
        if leaf.startswith("gamma"):
            base = 0.5
        return base + torch.randn(shape, generator=gen) * 0.1
    if leaf == "bias" or len(shape) == 1:
        return torch.randn(shape, generator=gen) * 0.1
    if ("embed_tokens" in name or "position_embedding" in name or "pos_embed" in name
            or "cls_token" in name):
        return torch.randn(shape, generator=gen)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def save_safetensors(state, folder, shards=1, dtype=torch.float32):
    """Write `state` as model.safetensors, or as `shards` files plus
    model.safetensors.index.json."""
    folder = Path(folder)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def hf_shapes(model_cls, config):
    """Names and shapes of a transformers model's state dict, built on the meta device (no
    memory)."""
    with torch.device("meta"):
        m = model_cls(config)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def check_loads_cleanly(model_cls, folder):
    """The fixture is right only if transformers loads it with no missing, unexpected or mismatched
    key."""
    model, info = model_cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"transformers does not load {folder} cleanly: {bad}"
    return model
