"""PaliGemma 1 and 2 in one file of plain PyTorch, loading the Hugging Face Hub checkpoints as they
are.

PaliGemma (arXiv:2407.07726, PaliGemma 2: arXiv:2412.03555) is a SigLIP-So400m image encoder whose
patch features go through one linear layer into a Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2)
decoder. The decoder reads [image tokens, <bos>, prompt, "\\n"] as a *prefix* that attends in both
directions, then writes the answer causally after it (a "prefix-LM"). Read top to bottom: config,
vision tower, projector, decoder, the full model, preprocessing, loading, generation, command line.

python paligemma.py --image cat.jpg --prompt "caption en"

Shapes: N images, P patches per image, B batch, T new tokens, S keys (all tokens so far), H query
heads, K key/value heads, D head dim, C widths.
"""
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from common import (Embedding, KVCache, Linear, VLMError, apply_rope, attend, check_args,
                    check_context, decode_ids, download, from_dict, generate, image_tensor,
                    left_pad, load_weights, next_token_loss, normalize, open_image,
                    open_tokenizer, optional_json, read_json, resize, resolve, rope_cos_sin,
                    rope_inv_freq, rope_theta, stop_ids, token_text)

DEFAULT_MODEL = "google/paligemma2-3b-mix-224"


# ------------------------------------------------------------ config

@dataclass
class VisionConfig:  # SigLIP; the defaults are transformers', which the hub files rely on
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6


@dataclass
class TextConfig:  # Gemma / Gemma 2; what a config.json leaves out comes from GEMMA_DEFAULTS
    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    query_pre_attn_scalar: float | None = None  # Gemma 2: scores scale by this**-0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: tanh soft-cap of attention scores
    final_logit_softcapping: float | None = None  # Gemma 2: tanh soft-cap of the output logits
    sliding_window: int | None = None  # Gemma 2: local attention on every other layer
    layer_types: list | None = None
    rope_theta: float = 10000.0


# Gemma 2 changed the defaults transformers fills in when a config.json leaves a field out.
GEMMA_DEFAULTS = {
    "gemma": {},
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, query_pre_attn_scalar=256,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096),
}


@dataclass
class Config:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 256000

    @staticmethod
    def from_folder(folder):
        c = read_json(folder / "config.json")
        if c.get("model_type") != "paligemma":
            found = c.get("model_type", "unknown")
            raise VLMError(f"{folder} holds a {found!r} checkpoint, not PaliGemma")
        t = c.get("text_config") or {}
        text_type = t.get("model_type", "gemma")
        if text_type not in GEMMA_DEFAULTS:
            raise VLMError(f"unsupported PaliGemma text model {text_type!r} (expected gemma or "
                           "gemma2)")
        text = from_dict(TextConfig, {**GEMMA_DEFAULTS[text_type], **t})
        text.rope_theta = rope_theta(t)
        if text.model_type == "gemma2" and text.layer_types is None:
            # even layers slide, odd layers see everything (Gemma 2's alternating local/global
            # attention)
            text.layer_types = []
            for i in range(text.num_hidden_layers):
                text.layer_types.append("sliding_attention" if i % 2 == 0 else "full_attention")
        image_token = c.get("image_token_index", c.get("image_token_id", 256000))
        return Config(from_dict(VisionConfig, c.get("vision_config")), text, image_token)


# ------------------------------------------------------------ vision tower: SigLIP

class SiglipEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size)
        n_patches = (c.image_size // c.patch_size) ** 2
        self.position_embedding = Embedding(n_patches, c.hidden_size)

    def forward(self, pixels):  # (N, 3, S, S), S = image size
        pixels = pixels.to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(pixels)  # (N, C, S/patch, S/patch)
        x = x.flatten(2).transpose(1, 2)  # (N, P, C): patches in row-major order
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    """Plain multi-head self-attention over all patches, with biases on every projection."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):  # (N, P, C)
        N, P, C = x.shape
        q = self.q_proj(x).view(N, P, self.n_heads, -1).transpose(1, 2)  # (N, H, P, C/H)
        k = self.k_proj(x).view(N, P, self.n_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(N, P, self.n_heads, -1).transpose(1, 2)
        y = attend(q, k, v)  # no mask: every patch sees every patch
        y = y.transpose(1, 2).reshape(N, P, C)
        return self.out_proj(y)


class SiglipMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    """A pre-LayerNorm ViT block (arXiv:2010.11929), as in SigLIP (arXiv:2303.15343)."""

    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class SiglipVision(nn.Module):
    """Checkpoint keys `vision_tower.vision_model.*`. No pooling head: PaliGemma uses every
    patch."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = SiglipEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipLayer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):  # (N, 3, S, S) -> (N, P, C)
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Projector(nn.Module):
    """One linear layer, no activation (`projector_hidden_act` in the configs is unused)."""

    def __init__(self, vision_dim, text_dim):
        super().__init__()
        self.linear = nn.Linear(vision_dim, text_dim)

    def forward(self, x):  # (N, P, vision C) -> (N, P, text C)
        return self.linear(x)


# ------------------------------------------------------------ decoder: Gemma, Gemma 2

class GemmaRMSNorm(nn.Module):
    """RMSNorm (arXiv:1910.07467). Gemma stores the weight zero-centred and scales by (1 + w), all
    in fp32 (Gemma's reference code)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def softcapped_attention(q, k, v, mask, scale, softcap):
    """Gemma 2's attention: scores squashed to (-cap, cap) by tanh(s / cap) * cap before the mask
    (arXiv:2408.00118). SDPA cannot do that, so the steps are written out; the softmax runs in fp32
    as in the reference. q (B, H, T, D), k and v (B, K, S, D), mask bool (B, 1, T, S) or None."""
    B, H, T, D = q.shape
    K = k.shape[1]
    q = q.view(B, K, H // K, T, D)  # the query heads grouped by the key/value head they share
    k = k[:, :, None]  # (B, K, 1, S, D): one key/value head for the whole group
    v = v[:, :, None]
    scores = q @ k.transpose(-1, -2) * scale  # (B, K, H/K, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    y = weights @ v  # (B, K, H/K, T, D)
    return y.view(B, H, T, D)


class GemmaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and the KV cache; Gemma 2 adds the score soft-cap and
    its own scale, query_pre_attn_scalar**-0.5."""

    def __init__(self, layer_idx, c):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.scale = None  # Gemma 1: SDPA's 1/sqrt(head_dim)
        self.softcap = None
        if c.model_type == "gemma2":
            self.scale = c.query_pre_attn_scalar ** -0.5
            self.softcap = c.attn_logit_softcapping
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):  # x (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,K,T,D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,K,T,D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D): every key so far
        if self.softcap is None:
            y = attend(q, k, v, mask, self.scale)  # (B, H, T, D)
        else:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class GemmaMLP(nn.Module):
    """GeGLU (arXiv:2002.05202): down(gelu(gate(x)) * up(x)), with the tanh approximation of
    GELU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate = F.gelu(self.gate_proj(x), approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, layer_idx, c):
        super().__init__()
        self.gemma2 = c.model_type == "gemma2"
        self.sliding = self.gemma2 and c.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = GemmaAttention(layer_idx, c)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GemmaMLP(c.hidden_size, c.intermediate_size)
        if self.gemma2:  # Gemma 2's "sandwich": norms before and after the attention and the MLP
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, sliding_mask, cache):
        if self.sliding:
            mask = sliding_mask
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if not self.gemma2:
            x = x + h
            x = x + self.mlp(self.post_attention_layernorm(x))
            return x
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        x = x + self.post_feedforward_layernorm(h)
        return x


class Gemma(nn.Module):
    """The Gemma decoder (arXiv:2403.08295; Gemma 2: arXiv:2408.00118). Checkpoint keys
    `language_model.model.*`."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(i, c) for i in range(c.num_hidden_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def embed(self, ids):
        """Gemma scales token embeddings by sqrt(hidden size), rounded to the weight dtype first."""
        weight = self.embed_tokens.weight
        scale = torch.tensor(self.c.hidden_size ** 0.5, dtype=weight.dtype, device=weight.device)
        return self.embed_tokens(ids) * scale

    def forward(self, x, positions, mask, sliding_mask, cache=None):  # x (B, T, C), positions (B,T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, sliding_mask, cache)
        return self.norm(x)


# ------------------------------------------------------------ the full model

def prefix_lm_mask(keys, prefix, T, window=None):
    """Boolean mask (B, 1, T, S) for the last T of S positions, or None when nothing is masked.
    Causal, except that the prefix (image tokens, <bos>, prompt, "\\n") sees all of itself in both
    directions (the PaliGemma paper's prefix-LM). `window`: a query sees only its `window` most
    recent keys (Gemma 2's sliding layers), yet the prefix still sees all of itself there, as in
    transformers. `keys` (B, S) marks the real tokens (pads are never keys), `prefix` (B, S) the
    prefix tokens."""
    S = keys.shape[1]
    query_pos = torch.arange(S - T, S, device=keys.device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=keys.device)[None]  # (1, S)
    causal = key_pos <= query_pos  # (T, S)
    if window is not None:
        causal = causal & (key_pos > query_pos - window)
    within_prefix = prefix[:, S - T:, None] & prefix[:, None, :]  # (B, T, S): both in the prefix
    mask = (causal | within_prefix) & keys[:, None, :]  # (B, T, S)
    mask = mask | (key_pos == query_pos)  # a pad query sees itself, so no row is empty (no NaN)
    if bool(mask.all()):
        return None
    return mask[:, None]  # (B, 1, T, S)


class PaliGemma(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVision(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Gemma(cfg.text)
        # the output head is the token embedding (tied weights), used as a (vocab, hidden) matrix
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.lm_head.weight = self.language_model.embed_tokens.weight
        self.stop = [1]  # end ids and padding: set from the checkpoint by load()
        self.pad_id = 0

    def image_features(self, pixel_values):  # (N, 3, S, S) -> (N, P, C), unscaled unlike text
        # 2 images at a time: the same result, with 2 images' activations in memory instead of a
        # whole batch's (and faster on a CPU: small activations reuse freed memory instead of
        # page-faulting)
        features = []
        for pixels in pixel_values.split(2):
            features.append(self.multi_modal_projector(self.vision_tower(pixels)))
        return torch.cat(features)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None,
                labels=None, cache=None, last_only=False):
        """input_ids (B, T) -> logits (B, T, V), and with `labels` (B, T) (logits, loss).
        attention_mask and token_type_ids (B, S) cover the cached tokens and the new ones.
        token_type_ids: 0 = prefix (bidirectional), 1 = suffix (causal); without them the whole
        input is a prefix, which is how a prompt is read at inference. cache and last_only serve
        generate()'s prefill (its decode steps run decode_step)."""
        B, T = input_ids.shape
        S = T
        if cache is not None:
            S = cache.len + T
        if attention_mask is None:
            keys = torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
        else:
            keys = attention_mask.bool()  # (B, S): the real tokens, not padding
        prefix = keys
        if token_type_ids is not None:
            prefix = keys & (token_type_ids == 0)
        # PaliGemma counts positions from 1; left pads do not count
        positions = keys.long().cumsum(-1)[:, -T:].clamp(min=1)  # (B, T)

        # the image tokens' embeddings are replaced by the image features
        is_image = input_ids == self.cfg.image_token_index
        x = self.language_model.embed(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        if pixel_values is not None:
            features = self.image_features(pixel_values).to(x.dtype)  # (N, P, C)
            n_features = features.shape[0] * features.shape[1]
            if int(is_image.sum()) != n_features:
                n_tokens = int(is_image.sum())
                raise VLMError(f"the prompt has {n_tokens} image tokens but the images give "
                               f"{n_features} features")
            x = x.masked_scatter(is_image[..., None], features)

        mask = prefix_lm_mask(keys, prefix, T)
        sliding_mask = None
        if self.cfg.text.sliding_window:
            sliding_mask = prefix_lm_mask(keys, prefix, T, self.cfg.text.sliding_window)
        x = self.language_model(x, positions, mask, sliding_mask, cache)  # (B, T, C)
        if cache is not None:
            cache.len += T
        if last_only:
            x = x[:, -1:]
        logits = self.to_logits(x)  # (B, T, V)
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels)

    def to_logits(self, x):
        """Hidden states (B, T, C) -> logits (B, T, V): the output head, then Gemma 2's final
        soft-cap, which squashes the logits into (-cap, cap) too."""
        logits = self.lm_head(x)  # (B, T, V)
        cap = self.cfg.text.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def decode_step(self, token, positions, keys, cache):
        """One decode step of generate(), eager or compiled (compiled=True compiles this method):
        token (B, 1) at `positions` (B, 1) -> fp32 logits (B, 1, V). Its key and value go to slot
        cache.slot (1,), and it attends to the filled slots of the real tokens `keys` (B, max_len)
        of the whole run: every step has the same shapes, and the cache's length is the one size
        that changes from run to run (compiled.compile_step). A generated token is in the causal
        suffix: no prefix rule applies to it."""
        slots = torch.arange(keys.shape[1], device=keys.device)  # (max_len,)
        filled = slots <= cache.slot  # (max_len,)
        mask = (keys & filled)[:, None, None]  # (B, 1, 1, max_len)
        sliding_mask = None
        if self.cfg.text.sliding_window:  # Gemma 2's sliding layers: prefix_lm_mask's window rule
            recent = slots > cache.slot - self.cfg.text.sliding_window  # (max_len,)
            sliding_mask = mask & recent  # (B, 1, 1, max_len)
        x = self.language_model.embed(token)  # (B, 1, C)
        x = self.language_model(x, positions, mask, sliding_mask, cache)  # (B, 1, C)
        # fp32 out: rounded inside the compiled program, and an fp32 argmax is ~2.5x a bf16 one
        return self.to_logits(x).float()  # (B, 1, V)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, token_type_ids=None,
                 labels=None, max_new_tokens=100, temperature=0.0, top_k=None, top_p=None,
                 seed=None, stream=None, compiled=False):
        """Prefill once (the images are encoded here only), then decode_step for each new token.
        compiled=True: the step through torch.compile (compiled.py: one to two minutes for each
        model and weights in a process; README "What holds on which CPU"). Returns only the new
        ids (B, n). labels (a processor's, with a suffix) are taken, as transformers does, and
        ignored."""
        check_args(max_new_tokens, temperature, top_k, top_p)  # before the prefill's work
        B, T = input_ids.shape
        text = self.cfg.text
        check_context(T, max_new_tokens, text.max_position_embeddings)
        device = input_ids.device
        max_len = T + max_new_tokens
        cache = KVCache(text.num_hidden_layers, B, text.num_key_value_heads, max_len, text.head_dim,
                        self.language_model.embed_tokens.weight.dtype, device)
        # the attention mask of the whole run, made once: generated tokens are real keys
        keys = torch.ones(B, max_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            keys[:, :T] = attention_mask
        last_position = keys[:, :T].sum(-1, keepdim=True)  # (B, 1): the last prompt token's, from 1
        decode = self.decode_step
        if compiled:  # checked before the prefill's work; a tool, imported only for this option
            from compiled import compile_step
            decode = compile_step(self, "decode_step", keys, cache)
        logits = self(input_ids, pixel_values, keys[:, :T], token_type_ids, cache=cache,
                      last_only=True)  # (B, 1, V)

        def step(token):  # (B,) -> the next logits (B, V), one cached decode step
            positions = last_position + (cache.len + 1 - T)  # (B, 1)
            cache.slot = torch.full((1,), cache.len, device=device)  # where the new key goes
            logits = decode(token[:, None], positions, keys, cache)  # (B, 1, V)
            cache.len += 1
            return logits[:, -1]

        return generate(step, logits[:, -1], max_new_tokens, self.stop, self.pad_id, temperature,
                        top_k, top_p, seed, stream)


# ------------------------------------------------------------ preprocessing

IMAGE_TOKEN = "<image>"
# <loc0000>..<loc1023> (detection boxes) and <seg000>..<seg127> (mask codes) are in the vocabulary;
# transformers also registers them as added tokens, so they are matched whole in the prompt text.
LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]


class Processor:
    """Images -> pixel_values, text -> input_ids, exactly as transformers' PaliGemmaProcessor (with
    the torchvision backend). A prompt becomes <image> x (S/14)^2 per image, <bos>, the prompt,
    "\\n"."""

    def __init__(self, folder):
        self.tokenizer = open_tokenizer(folder)
        self.tokenizer.add_tokens(LOC_TOKENS + SEG_TOKENS)
        pp = read_json(folder / "preprocessor_config.json")
        self.size = (pp["size"]["height"], pp["size"]["width"])
        self.mode = {2: "bilinear", 3: "bicubic"}.get(pp.get("resample", 3), "bicubic")
        self.image_seq_length = pp["image_seq_length"]
        tc = optional_json(folder / "tokenizer_config.json")
        self.bos = token_text(tc.get("bos_token", "<bos>"))
        self.eos = token_text(tc.get("eos_token", "<eos>"))
        self.pad_id = self.tokenizer.token_to_id(token_text(tc.get("pad_token", "<pad>")))
        self.stop = [self.tokenizer.token_to_id(self.eos)]  # load() widens it to the checkpoint's

    def images(self, images):  # list of images -> (N, 3, S, S) float32 in [-1, 1]
        pixels = [normalize(resize(image_tensor(im)[None], self.size, self.mode)) for im in images]
        return torch.cat(pixels)

    def __call__(self, text=None, images=None, suffix=None):
        """text: a prompt or a list (one per row); images: per row a list of images (one image or a
        flat list: one per prompt); suffix: the answers to train on, which adds `labels`."""
        if isinstance(text, str) or text is None:
            text = [text]
        text = ["" if t is None else t for t in text]
        if images is None:
            raise VLMError("PaliGemma needs at least one image per prompt")
        if not isinstance(images, (list, tuple)):
            images = [[images]] * len(text)  # one image for every prompt
        per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        flat = [im for row in per_prompt for im in row]
        placed = sum(t.count(IMAGE_TOKEN) for t in text)
        if placed == 0 and len(per_prompt) != len(text):
            raise VLMError(f"got {len(per_prompt)} image lists for {len(text)} prompts")
        if placed > 0 and placed != len(flat):
            raise VLMError(f"the prompts have {placed} {IMAGE_TOKEN} placeholders but {len(flat)} "
                           "images were given")
        ids = []
        types = []  # 0: the prefix, read both ways; 1: the suffix, read causally
        for i, t in enumerate(text):
            if placed == 0:  # the usual case: the images go first
                prompt = IMAGE_TOKEN * len(per_prompt[i]) + self.bos + t + "\n"
            else:  # placeholders in the text: <bos> goes right after the last one
                end = t.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN)
                prompt = t[:end] + self.bos + t[end:] + "\n"
            prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_length)
            ids.append(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
            types.append([0] * len(ids[i]))
        if isinstance(suffix, str):
            suffix = [suffix]
        for i, answer in enumerate(suffix or []):  # training: the answer and <eos> form the suffix
            answer_ids = self.tokenizer.encode(answer + self.eos, add_special_tokens=False).ids
            ids[i] = ids[i] + answer_ids
            types[i] = types[i] + [1] * len(answer_ids)
        inputs = {"input_ids": left_pad(ids, self.pad_id),
                  "token_type_ids": left_pad(types, 0),
                  "attention_mask": left_pad([[1] * len(row) for row in ids], 0),
                  "pixel_values": self.images(flat)}
        if suffix is not None:  # the loss reads the suffix only
            inputs["labels"] = inputs["input_ids"].masked_fill(inputs["token_type_ids"] == 0, -100)
        return inputs

    def decode(self, ids):
        """Text of generated ids, up to the first end token, special tokens skipped."""
        return decode_ids(self.tokenizer, ids, self.stop)


# ------------------------------------------------------------ loading

def hub_name(key):
    """Hub key -> our module path. transformers 5 may save the vision tower without `vision_model.`.
    The output head is the embedding, so a stored copy (older exports have one) is not read."""
    if key.startswith("language_model.lm_head."):
        return None
    key = key.replace("vision_tower.vision_model.", "vision_tower.")
    return key.replace("language_model.model.", "language_model.")


def load(model=DEFAULT_MODEL, device=None, dtype=None, quantize=None):
    """Load a PaliGemma checkpoint (hub repo id or local directory) -> (model, processor).
    quantize: None, "int8" or "int4" decoder weights (quantize.py)."""
    folder = resolve(model)
    cfg = Config.from_folder(folder)
    prepare = None
    if quantize:  # a tool, imported only for this option
        from quantize import quantizer
        prepare = quantizer(quantize)
    m = load_weights(partial(PaliGemma, cfg), folder, hub_name, device, dtype, prepare)
    processor = Processor(folder)
    m.stop = stop_ids(folder, processor.tokenizer.token_to_id(processor.eos))
    m.pad_id = processor.pad_id
    processor.stop = m.stop
    return m, processor


# ------------------------------------------------------------ detection and segmentation
# An answer such as `<loc0051><loc0309><loc0708><loc0646> car ; <loc...>x4 <seg012>...x16 person`
# holds one object per `;`: four location tokens, for `segment` sixteen mask codes, then the label.
# The mask codes index the codebook of a small VQ-VAE (arXiv:2301.02229) whose decoder turns them
# into a 64x64 mask of the object's box. All of this follows Google's big_vision, the training
# code: `pp/proj/paligemma/segmentation.py` (how answers were made) and
# `evaluators/proj/paligemma/transfers/segmentation.py` (how they are read back).

# One object: 4 loc tokens (y_min, x_min, y_max, x_max), maybe 16 seg tokens, then the label.
# The first loc token must not follow another token, so that 5 loc tokens or 15 seg tokens
# match nothing instead of passing for a shorter object. Anchored at the end of its `;`-piece:
# stray text before an object is dropped, the object kept.
OBJECT = re.compile(r"(?<!>)((?:<loc\d{4}>){4})((?:<seg\d{3}>){16})?\s*([^<>;]*)$")


def parse_objects(text, width, height):
    """Every well-formed object of a `detect` or `segment` answer, in order, as
    {"label": str, "box": [x0, y0, x1, y1] floats in the original image's pixels,
    "seg": 16 mask codes or None}. Malformed pieces (stray text, 3 or 5 loc tokens,
    15 seg tokens, an empty or inverted box) are skipped; nothing raises."""
    objects = []
    for piece in text.split(";"):
        match = OBJECT.search(piece.strip())
        if match is None:
            continue
        y_min, x_min, y_max, x_max = [int(n) for n in re.findall(r"\d+", match[1])]
        seg = None
        if match[2]:
            seg = [int(n) for n in re.findall(r"\d+", match[2])]
        # big_vision's evaluator keeps a prediction only with every token in range and a box
        # of positive height and width (in bins).
        if max(y_min, x_min, y_max, x_max) > 1023 or y_max <= y_min or x_max <= x_min:
            continue
        if seg is not None and max(seg) > 127:
            continue
        # Bins: big_vision encodes a box side v in 0..1 as round(v * 1023), clipped to
        # 0..1023, and its evaluator decodes with bin / 1023: <loc1023> is the far edge. We
        # use that training convention; the demos divide by 1024, which pulls every
        # coordinate up to 0.1% of a side towards the origin. The model saw the image
        # squeezed to a square, so x scales by the width and y by the height, each on its own.
        box = [x_min / 1023 * width, y_min / 1023 * height,
               x_max / 1023 * width, y_max / 1023 * height]  # x0, y0, x1, y1
        objects.append({"label": match[3].strip(), "box": box, "seg": seg})
    return objects


class ResBlock(nn.Module):
    """conv 3x3, ReLU, conv 3x3, ReLU, conv 1x1, added to the input (big_vision's ResBlock)."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


def upsample(in_channels, out_channels):
    """A transposed conv that doubles the grid. big_vision's Flax layer pads the stride-dilated
    input by 2; in PyTorch's terms that is padding = kernel - 1 - 2 = 1 (PyTorch's padding=2
    would give 6x6 from 4x4). The npz holds PyTorch's (in, out, 4, 4) weights, used as is."""
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)


class MaskDecoder(nn.Module):
    """The VQ-VAE's decoder: 16 mask codes -> a 64x64 mask. Module names are the keys of
    `vae-oid.npz` (`_vq_vae._embedding`, `decoder.0.weight`, ..., `decoder.12.bias`), so
    loading is one strict pass; `decoder` keeps the ReLUs at their original indices."""

    def __init__(self, code_dim=512):
        super().__init__()
        self._vq_vae = nn.Module()
        self._vq_vae._embedding = nn.Parameter(torch.zeros(128, code_dim))  # 128 codes
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, 128, 1), nn.ReLU(),  # 0, 1
            ResBlock(128), ResBlock(128),  # 2, 3
            upsample(128, 128), nn.ReLU(),  # 4, 5: 4x4 -> 8x8
            upsample(128, 64), nn.ReLU(),  # 6, 7: -> 16x16
            upsample(64, 32), nn.ReLU(),  # 8, 9: -> 32x32
            upsample(32, 16), nn.ReLU(),  # 10, 11: -> 64x64
            nn.Conv2d(16, 1, 1),  # 12, no activation
        )

    def forward(self, codes):  # (N, 16) long in 0..127 -> (N, 64, 64) about -1..1, > 0 inside
        x = self._vq_vae._embedding[codes]  # (N, 16, D)
        N, _, D = x.shape
        x = x.view(N, 4, 4, D)  # the 16 codes fill a 4x4 grid row by row, channels last
        x = x.permute(0, 3, 1, 2)  # (N, D, 4, 4)
        x = self.decoder(x)  # (N, 1, 64, 64)
        return x[:, 0]


# The Hub copy of big_vision's gs://big_vision/paligemma/vae-oid.npz, a file of the demo Space.
VAE_REPO = "big-vision/paligemma-hf"
VAE_FILE = "vae-oid.npz"
EMBEDDING = "_vq_vae._embedding"


def load_mask_decoder(path=None):
    """The mask decoder of `vae-oid.npz` (a local file, by default the Hub Space's copy), read
    without pickle and checked strictly: every decoder tensor used, every shape right. The
    encoder's tensors are not needed. -> MaskDecoder in eval mode, float32, on the CPU."""
    if path is None:
        path = download(VAE_REPO, [VAE_FILE], repo_type="space") / VAE_FILE
    path = Path(path)
    if not path.is_file():
        raise VLMError(f"mask decoder weights {path} not found")
    if not zipfile.is_zipfile(path):
        raise VLMError(f"mask decoder weights {path} are not an .npz file (or are truncated)")
    try:  # allow_pickle=False refuses an object array (pickled data) inside
        with np.load(path, allow_pickle=False) as npz:
            wanted = [key for key in npz.files if key.startswith("decoder.") or key == EMBEDDING]
            tensors = {key: np.asarray(npz[key], dtype=np.float32) for key in wanted}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = str(e).partition("\n")[0]
        raise VLMError(f"mask decoder weights {path} cannot be read ({why})") from None
    # The width of a code is read from the file (512 in community ports); other shapes are fixed.
    codebook = tensors.get(EMBEDDING)
    code_dim = codebook.shape[-1] if codebook is not None and codebook.ndim == 2 else 512
    decoder = MaskDecoder(code_dim)
    expected = decoder.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise VLMError(f"unexpected tensor {key} in {path}: not a weight of the mask decoder")
        if value.shape != tuple(expected[key].shape):
            raise VLMError(f"tensor {key} in {path} has shape {value.shape}, "
                           f"expected {tuple(expected[key].shape)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise VLMError(f"weight {missing[0]} is missing from {path} "
                       f"({len(missing)} missing in all)")
    decoder.load_state_dict({key: torch.tensor(value) for key, value in tensors.items()})
    return decoder.eval()


@torch.inference_mode()
def decode_masks(decoder, objects, width, height):
    """One (height, width) bool mask per object, None for an object without mask codes."""
    masks = [None] * len(objects)
    segmented = [i for i, obj in enumerate(objects) if obj["seg"] is not None]
    if not segmented:
        return masks
    codes = torch.tensor([objects[i]["seg"] for i in segmented])  # (N, 16)
    masks64 = decoder(codes).numpy()  # (N, 64, 64)
    for i, mask64 in zip(segmented, masks64):
        masks[i] = paste_mask(mask64, objects[i]["box"], width, height)
    return masks


def paste_mask(mask64, box, width, height):
    """A 64x64 float mask -> (height, width) bool, as big_vision's evaluator does: the box's
    corners truncated with int(), the float mask resized to the box with Pillow's bilinear
    filter, inside where > 0. The box lies in the image, as parse_objects gives it."""
    x0, y0, x1, y1 = [int(v) for v in box]
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:  # a box of a few pixels can still be empty after int()
        return mask
    small = Image.fromarray(np.asarray(mask64, dtype=np.float32))  # mode "F"
    resized = small.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    mask[y0:y1, x0:x1] = np.asarray(resized) > 0
    return mask


def mask_to_rle(mask):
    """(h, w) bool -> COCO's uncompressed RLE {"size": [h, w], "counts": [...]}: the lengths of
    the runs of equal pixels in column-major order, starting with a run of zeros (of length 0
    when the first pixel is set), as pycocotools and every COCO tool read it."""
    pixels = np.asarray(mask, dtype=bool).ravel(order="F")
    run_starts = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    bounds = np.concatenate([[0], run_starts, [pixels.size]])
    counts = np.diff(bounds).tolist()
    if pixels[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


# The demo Space's colours, one per label in order of first appearance.
COLOURS = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (228, 142, 241)]


def draw(image, objects, masks=None):
    """The image with every mask as a translucent fill, every box, and its label on a tag of
    the box's colour in the box's top-left corner: a filled tag reads on any picture."""
    labels = list(dict.fromkeys(obj["label"] for obj in objects))
    colour_of = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    picture = image.convert("RGB")  # a copy
    for obj, mask in zip(objects, masks or [None] * len(objects)):
        if mask is not None:
            fill = Image.new("RGB", picture.size, colour_of[obj["label"]])
            opacity = Image.fromarray(mask.astype(np.uint8) * 128)  # 50% inside the mask
            picture.paste(fill, (0, 0), opacity)
    pen = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    line_width = max(2, min(picture.size) // 200)
    for obj in objects:
        colour = colour_of[obj["label"]]
        corner = (obj["box"][0] + line_width, obj["box"][1] + line_width)
        pen.rectangle(obj["box"], outline=colour, width=line_width)
        pen.rectangle(pen.textbbox(corner, obj["label"], font=font), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]  # ITU-R BT.601
        text_colour = "black" if luminance > 150 else "white"
        pen.text(corner, obj["label"], fill=text_colour, font=font)
    return picture


def add_task_args(parser):
    parser.add_argument("--output", help="detect/segment, one --image only: draw boxes, labels, "
                        "masks into this PNG")
    parser.add_argument("--json", action="store_true",
                        help="detect/segment, one --image only: after the text, print one JSON "
                        "object: the text and the objects (box in pixels, mask as COCO's "
                        "uncompressed RLE)")
    parser.add_argument("--vae", help="segment: a local vae-oid.npz (default: the copy in the Hub "
                        f"Space {VAE_REPO})")


def write_detections(text, image, output=None, as_json=False, decoder=None):
    """After generation: the objects of `text` (an answer about `image`) drawn into the PNG
    `output` and/or printed as JSON. Masks need the mask decoder: `decoder` (from --vae), else
    the Hub's; without it, text and boxes still come out and one stderr line says why."""
    if output is None and not as_json:
        return
    objects = parse_objects(text, image.width, image.height)
    masks = [None] * len(objects)
    if any(obj["seg"] is not None for obj in objects):
        try:
            if decoder is None:
                decoder = load_mask_decoder()
            masks = decode_masks(decoder, objects, image.width, image.height)
        except VLMError as e:
            print(f"no masks: {e}", file=sys.stderr)
    if output is not None:
        if not objects:
            print(f"the answer holds no object: {output} is the image unchanged", file=sys.stderr)
        picture = draw(image, objects, masks)
        from atomic_file import write_atomically
        write_atomically(output, partial(picture.save, format="PNG"))  # never a half-written PNG
    if as_json:
        print(json.dumps({"text": text, "objects": json_objects(objects, masks)}))


def json_objects(objects, masks):
    """Objects and their masks as JSON: label, box in pixels, mask as COCO's uncompressed RLE."""
    listed = []
    for obj, mask in zip(objects, masks):
        box = [round(v, 2) for v in obj["box"]]  # a hundredth of a pixel is plenty
        rle = None if mask is None else mask_to_rle(mask)
        listed.append({"label": obj["label"], "box": box, "mask": rle})
    return listed


def answer_objects(text, image, decoder):
    """An answer about `image` -> its objects as JSON (json_objects), masks only with the mask
    `decoder`: the fields of --batch's lines and of serve.py's messages."""
    objects = parse_objects(text, image.width, image.height)
    masks = [None] * len(objects)
    if decoder is not None:
        masks = decode_masks(decoder, objects, image.width, image.height)
    return json_objects(objects, masks)


# ------------------------------------------------------------ command line

def parse_args(argv=None):
    """The command line's arguments, checked before anything slow (one line, exit code 1)."""
    from command_line import check_flags, cli_parser
    p = cli_parser("Caption, answer questions about, detect or segment images with PaliGemma 1/2. "
                   "Prompts are task prefixes such as 'caption en', 'answer en <question>', "
                   "'detect cat', 'ocr'.", DEFAULT_MODEL)
    add_task_args(p)
    args = p.parse_args(argv)
    check_flags(args)
    if (args.output or args.json) and len(args.image) > 1:
        # the model reads the images together: the boxes of its one answer belong to none of them
        raise VLMError(f"--output and --json take one --image, not {len(args.image)}: an answer "
                       "about several images has boxes in none of them")
    if args.batch and (args.output or args.json):
        raise VLMError("--output and --json are for one --image; --batch lines carry the objects")
    return args


def main(argv=None):
    from command_line import stream_answer, timed_load
    args = parse_args(argv)
    if args.batch:
        from batch_runner import Batch
        Batch(args).run(batch_answerer)  # the images are found before the slow load
        return
    if not args.image:
        raise VLMError("PaliGemma needs an image: pass --image FILE (or --batch PATH...)")
    images = [open_image(path) for path in args.image]  # fail on a bad image before the slow load
    decoder = None
    if args.vae:  # a bad mask decoder file fails before the slow load too
        decoder = load_mask_decoder(args.vae)
    model, processor, load_seconds = timed_load(load, args.model, args)
    inputs = processor(text=[args.prompt], images=[images])
    new_ids = stream_answer(model, processor, inputs, args, load_seconds, model.vision_tower)
    answer = processor.decode(new_ids[0])
    write_detections(answer, images[0], args.output, args.json, decoder)


def batch_answerer(args):
    """--batch's answerer (batch_runner.Answerer; Ray's DatasetAnswerer uses it too): each image
    with --prompt; each line adds the answer's objects (detect, segment; masks with the mask
    decoder). A bad mask decoder file, or a prompt that would fail every image, fails before the
    load."""
    from batch_runner import Answerer, check_prompt
    decoder = None
    if args.vae or args.prompt.startswith("segment"):  # segment lines need the mask decoder
        decoder = load_mask_decoder(args.vae)
    folder = resolve(args.model)
    processor = Processor(folder)

    def make_inputs(images):
        return processor(text=[args.prompt] * len(images), images=[[image] for image in images])

    def describe(text, image):
        return {"objects": answer_objects(text, image, decoder)}

    context = Config.from_folder(folder).text.max_position_embeddings
    check_prompt(make_inputs, processor.tokenizer, context, args)
    model, processor = load(str(folder), args.device, args.dtype, args.quantize)
    return Answerer(model, processor.decode, make_inputs, model.vision_tower, args, describe)


if __name__ == "__main__":
    from command_line import run_cli
    run_cli(main)
