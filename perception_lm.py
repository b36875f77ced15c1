"""PerceptionLM 1B/3B/8B in one file of plain PyTorch, loading the Hugging Face Hub checkpoints as
they are.

PerceptionLM (PLM, arXiv:2504.13180) reads an image as a 448x448 thumbnail plus up to 36 448x448
tiles of the image stretched onto the biggest tile grid it fits (a video as one 448x448 tile per
frame, 32 frames). Each tile goes through a Perception Encoder ViT (PE, arXiv:2504.13181: absolute
and 2D rotary position embeddings, layer scale), a two-layer MLP and a 2x2 average pooling: 256
tokens per tile. These fill the <|image|> / <|video|> positions of a Llama 3 decoder's input. Read
top to bottom: config, vision tower, projector, decoder, the full model (with generation),
preprocessing, loading, command line.

    python perception_lm.py --image cat.jpg --prompt "Describe the image."
    python perception_lm.py --video clip.mp4 --prompt "What happens in this video?"

Shapes: N tiles (or frames), P patches per tile, L tokens per tile ([1 +] P: the class token where
there is one), Dv vision width, B batch, T new tokens, S keys (cached and new), H (query) heads, K
key/value heads, Dh head dim, C text width, V vocabulary.
"""
import math
import sys
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Embedding, KVCache, Linear, VLMError, apply_rope, attend, check_args,
                    check_context, decode_ids, expand_placeholders, find_chat_template, from_dict,
                    generate, image_tensor, load_weights, make_mask, next_token_loss, normalize,
                    open_image, open_tokenizer, optional_json, read_json, read_video,
                    render_template, resize, resolve, rope_cos_sin, rope_inv_freq, rope_theta,
                    stop_ids, text_inputs, token_text)

DEFAULT_MODEL = "facebook/Perception-LM-1B"


# ------------------------------------------------------------ config

@dataclass
class VisionConfig:  # timm Eva arguments; the defaults both PE architectures share
    img_size: int | list = 448
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_token: bool = True
    init_values: float | None = None  # layer scale (gamma_1, gamma_2) when set; PLM sets 0.1
    use_post_transformer_norm: bool = True  # timm's default (attention pooling); PLM turns it off
    rope_grid_offset: float = 0.0
    ref_feat_shape: int | list | None = None  # RoPE coordinates rescaled to span this grid
    global_pool: str = "map"  # accepted, unused: PLM reads every patch, never a pooled output


# The config names a timm architecture and overrides some of its arguments in `model_args`; the rest
# are timm's defaults for it (timm/models/eva.py; img_size from its pretrained_cfg, since
# fixed_input_size).
PE_ARCHS = {
    # PLM 1B and 3B
    "vit_pe_core_large_patch14_336": dict(img_size=336, ref_feat_shape=(24, 24),
                                          rope_grid_offset=1.0),
    # PLM 8B
    "vit_pe_core_gigantic_patch14_448": dict(embed_dim=1536, depth=50, mlp_ratio=8960 / 1536,
                                             class_token=False, ref_feat_shape=(32, 32)),
}


@dataclass
class TextConfig:  # Llama 3; the defaults are transformers' LlamaConfig's
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3 frequency scaling (1B, 3B) or none (8B)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class Config:
    vision: VisionConfig
    text: TextConfig
    vision_use_cls_token: bool = True  # drop the tower's first output token (the class token)
    projector_pooling_ratio: int = 1
    image_token_id: int = 128002
    video_token_id: int = 128003
    tie_word_embeddings: bool | None = None  # None: as the text config says

    @staticmethod
    def from_folder(folder):
        c = read_json(folder / "config.json")
        if c.get("model_type") != "perception_lm":
            raise VLMError(f"{folder} holds a {c.get('model_type', 'unknown')!r} checkpoint, "
                           "not PerceptionLM")
        vision = c.get("vision_config") or {}
        text = c.get("text_config") or {}
        architecture = vision.get("architecture")
        if architecture not in PE_ARCHS:
            raise VLMError(f"unsupported PerceptionLM vision tower {architecture!r} "
                           f"(expected one of {list(PE_ARCHS)})")
        model_args = vision.get("model_args") or {}
        unknown = sorted(set(model_args) - {f.name for f in fields(VisionConfig)})
        if unknown:
            raise VLMError(f"unsupported Perception Encoder option(s) {unknown} "
                           "in vision_config.model_args")
        vision_config = from_dict(VisionConfig, {**PE_ARCHS[architecture], **model_args})
        # the hub files (4.x) say rope_scaling; one saved by transformers 5 says rope_parameters
        rope_scaling = text.get("rope_parameters") or text.get("rope_scaling")
        text_fields = {**text, "rope_theta": rope_theta(text), "rope_scaling": rope_scaling}
        text_config = from_dict(TextConfig, text_fields)
        cfg = from_dict(Config, {**c, "vision": vision_config, "text": text_config})
        if cfg.tie_word_embeddings is None:
            cfg.tie_word_embeddings = text_config.tie_word_embeddings
        llama3_inv_freq(text_config)  # an unsupported rope scaling fails here, before the weights
        return cfg


# ------------------------------------------------------------ vision tower
# Perception Encoder (arXiv:2504.13181) as timm's Eva runs it; checkpoint keys
# `model.vision_tower.timm_model.*`.

def pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def pe_rope(c):
    """cos, sin (P, head_dim) of PE's 2D RoPE for the patch grid, as timm's RotaryEmbeddingCat
    builds them: head_dim / 4 frequencies f_i = 10000^(-i / (head_dim / 4)); a patch at (row, col)
    gets the angles [x * f, y * f] with x = col, y = row counted from `rope_grid_offset` (1 when a
    class token sits at 0, as in PE) and rescaled so the grid spans `ref_feat_shape`; each angle
    rotates one pair of channels."""
    image_h, image_w = pair(c.img_size)
    grid_h = image_h // c.patch_size
    grid_w = image_w // c.patch_size
    head_dim = c.embed_dim // c.num_heads
    n_bands = head_dim // 4  # a quarter each for x and y, each angle used by two channels
    bands = 1.0 / 10000.0 ** (torch.arange(n_bands, device="cpu").float() / n_bands)
    x = torch.arange(grid_w, device="cpu").float() + c.rope_grid_offset
    y = torch.arange(grid_h, device="cpu").float() + c.rope_grid_offset
    if c.ref_feat_shape is not None:
        ref_h, ref_w = pair(c.ref_feat_shape)
        x = x / grid_w * ref_w
        y = y / grid_h * ref_h
    ys, xs = torch.meshgrid(y, x, indexing="ij")  # (grid_h, grid_w): patches in row-major order
    x_angles = xs[..., None] * bands  # (grid_h, grid_w, head_dim / 4)
    y_angles = ys[..., None] * bands
    angles = torch.cat([x_angles, y_angles], -1).flatten(0, 1)  # (P, head_dim / 2)
    angles = angles.repeat_interleave(2, -1)  # (P, head_dim): [a0, a0, a1, a1, ...], interleaved
    return angles.cos(), angles.sin()


def rope_2d(x, cos, sin):
    """Rotate channel pairs (x0, x1), (x2, x3), ...: the interleaved layout of PE and timm, unlike
    the decoder's half-split one. fp32 cos/sin, the result rounded back to x's dtype."""
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)  # [-x1, x0, -x3, x2, ...]
    return (x * cos + rotated * sin).to(x.dtype)


class PEAttention(nn.Module):
    """Self-attention over all tokens of a tile with a fused qkv projection; RoPE on the patch
    tokens only (the class token, first when present, keeps angle 0)."""

    def __init__(self, dim, n_heads, n_prefix):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.n_prefix = n_prefix  # tokens before the patches: 1 with a class token, else 0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def rotate_patches(self, x, cos, sin):  # (N, H, L, Dh): RoPE on the patches, not the prefix
        prefix = x[:, :, :self.n_prefix]
        patches = rope_2d(x[:, :, self.n_prefix:], cos, sin)
        return torch.cat([prefix, patches], dim=2)

    def forward(self, x, cos, sin):  # (N, L, Dv) -> (N, L, Dv)
        N, L, C = x.shape
        qkv = self.qkv(x).view(N, L, 3, self.n_heads, self.head_dim)  # (N, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, L, Dh)
        q = self.rotate_patches(q, cos, sin)
        k = self.rotate_patches(k, cos, sin)
        y = attend(q, k, v)  # (N, H, L, Dh)
        y = y.transpose(1, 2).reshape(N, L, C)  # (N, L, Dv)
        return self.proj(y)


class PEMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class PEBlock(nn.Module):
    """A pre-LayerNorm ViT block whose two branches are scaled per channel (LayerScale,
    arXiv:2103.17239) when the config sets init_values (PLM does)."""

    def __init__(self, c, n_prefix):
        super().__init__()
        dim = c.embed_dim
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, as PE's
        self.attn = PEAttention(dim, c.num_heads, n_prefix)
        self.norm2 = nn.LayerNorm(dim)
        # timm's int(): 8960 for the 8B's 1536 x 8960/1536
        self.mlp = PEMlp(dim, int(dim * c.mlp_ratio))
        scaled = c.init_values is not None
        self.gamma_1 = nn.Parameter(torch.ones(dim)) if scaled else None
        self.gamma_2 = nn.Parameter(torch.ones(dim)) if scaled else None

    def forward(self, x, cos, sin):
        attended = self.attn(self.norm1(x), cos, sin)
        if self.gamma_1 is not None:
            attended = self.gamma_1 * attended
        x = x + attended
        transformed = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            transformed = self.gamma_2 * transformed
        return x + transformed


class PerceptionEncoder(nn.Module):
    """The PE tower with timm's Eva names. No pooling: PLM reads every patch of the last block."""

    def __init__(self, c):
        super().__init__()
        n_prefix = int(c.class_token)
        image_h, image_w = pair(c.img_size)
        n_patches = (image_h // c.patch_size) * (image_w // c.patch_size)
        dim = c.embed_dim
        self.patch_embed = nn.Module()
        # no bias: norm_pre follows
        self.patch_embed.proj = nn.Conv2d(3, dim, c.patch_size, stride=c.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if c.class_token else None
        # the class token has a position embedding too
        self.pos_embed = nn.Parameter(torch.zeros(1, n_prefix + n_patches, dim))
        self.norm_pre = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(PEBlock(c, n_prefix) for _ in range(c.depth))
        self.norm = nn.LayerNorm(dim) if c.use_post_transformer_norm else nn.Identity()
        cos, sin = pe_rope(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels):  # (N, 3, S, S) -> (N, L, Dv)
        x = pixels.to(self.pos_embed.dtype)
        x = self.patch_embed.proj(x)  # (N, Dv, S / 14, S / 14)
        x = x.flatten(2).transpose(1, 2)  # (N, P, Dv): patches in row-major order
        if self.cls_token is not None:
            cls = self.cls_token.expand(len(x), -1, -1)  # (N, 1, Dv)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + P, Dv)
        x = self.norm_pre(x + self.pos_embed)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.norm(x)


# ------------------------------------------------------------ projector

class Projector(nn.Module):
    """linear_1 -> exact GELU -> linear_2 on every patch, then average pooling of the patch grid by
    `pool` (2: 32x32 -> 16x16 = 256 tokens per tile). Adaptive pooling, as transformers does: an odd
    grid (5x5 -> 2x2) averages overlapping windows ([0, 3) and [2, 5) along each side)."""

    def __init__(self, vision_dim, text_dim, pool):
        super().__init__()
        self.pool = pool
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x):  # (N, P, Dv) -> (N, P / pool^2, C)
        x = self.linear_1(x)  # (N, P, C)
        x = F.gelu(x)  # exact (erf) GELU
        x = self.linear_2(x)
        if self.pool > 1:
            N, P, C = x.shape
            side = math.isqrt(P)
            x = x.transpose(1, 2).reshape(N, C, side, side)  # (N, C, side, side): the patch grid
            x = F.adaptive_avg_pool2d(x, side // self.pool)  # (N, C, side / pool, side / pool)
            x = x.flatten(2).transpose(1, 2)  # (N, P / pool^2, C)
        return x


# ------------------------------------------------------------ decoder: Llama 3

def llama3_inv_freq(c):
    """RoPE frequencies of the text config, with Llama 3.1's frequency scaling when `rope_scaling`
    says llama3 (PLM 1B/3B). Each frequency's wavelength is measured against the original context:
    long waves are slowed down by `factor`, short ones kept, the band between interpolated.
    transformers' _compute_llama3_parameters is the oracle (the same float32 operations)."""
    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta)
    scaling = c.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise VLMError(f"unsupported rope scaling {rope_type!r} in text_config "
                       "(PerceptionLM uses llama3 or none)")
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    original_max_positions = scaling["original_max_position_embeddings"]
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # low frequencies (waves longer than low_freq_wavelen): slowed down by `factor`, so positions
    # beyond the original context get angles the model has seen
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # high frequencies (waves shorter than high_freq_wavelen): kept, they resolve nearby positions
    # medium frequencies (between the two): a linear blend of slowed and kept, by wavelength
    periods = original_max_positions / wavelen  # how often each wave turns in the original context
    # 0 at the low-frequency edge, 1 at the high-frequency one
    smooth = (periods - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class LlamaRMSNorm(nn.Module):
    """RMSNorm (arXiv:1910.07467)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, round back to the activation dtype, then scale (Llama's order)
        x_float = x.float()
        mean_square = x_float.pow(2).mean(-1, keepdim=True)
        normed = x_float * torch.rsqrt(mean_square + self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    """Grouped-query attention (arXiv:2305.13245): the K key/value heads each serve H/K query heads.
    RoPE rotates queries and keys; while generating, the keys and values go to the KV cache."""

    def __init__(self, layer_index, c):
        super().__init__()
        self.layer_index = layer_index  # this layer's slot in the KV cache
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        # project, then split into heads: q (B, H, T, Dh); k and v (B, K, T, Dh)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, K, S, Dh): every key so far
        y = attend(q, k, v, mask)  # (B, H, T, Dh), scaled by 1/sqrt(Dh)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*Dh)
        return self.o_proj(y)  # (B, T, C)


class LlamaMLP(nn.Module):
    """SwiGLU (arXiv:2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, c):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        gate = F.silu(self.gate_proj(x))  # (B, T, intermediate_size)
        up = self.up_proj(x)
        return self.down_proj(gate * up)  # (B, T, C)


class LlamaLayer(nn.Module):
    """A pre-norm decoder block: attention and MLP, each added to the residual stream."""

    def __init__(self, layer_index, c):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(layer_index, c)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The Llama 3 decoder (arXiv:2407.21783). Checkpoint keys `model.language_model.*`."""

    def __init__(self, c):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(i, c) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq", llama3_inv_freq(c), persistent=False)

    def forward(self, x, positions, mask, cache=None):
        """x (B, T, C) embeddings, positions (B, T) -> (B, T, C) normed hidden states."""
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, 1, T, Dh) each
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


# ------------------------------------------------------------ the full model

class PerceptionLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        text = cfg.text
        self.vision_tower = PerceptionEncoder(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.embed_dim, text.hidden_size,
                                               cfg.projector_pooling_ratio)
        self.language_model = Llama(text)
        self.lm_head = Linear(text.hidden_size, text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # PLM 1B and 3B: the output head is the token embedding
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.stop = []  # end token ids, set from the checkpoint by load()
        self.pad_id = 0

    def visual_features(self, pixels):  # tiles or frames (..., 3, S, S) -> (N, tokens per tile, C)
        """One tile at a time (1025 tokens: matrix products big enough to run at full speed): the
        same result, with the activations of one tile instead of 37 (or more) in memory, and faster
        on a CPU, where smaller activations reuse freed memory instead of page-faulting in fresh
        memory (2 tiles: ~110k faults a call)."""
        tiles = pixels.flatten(0, -4)  # (N, 3, S, S)
        x = torch.cat([self.vision_tower(tile) for tile in tiles.split(1)])  # (N, L, Dv)
        if self.cfg.vision_use_cls_token:
            x = x[:, 1:]  # (N, P, Dv): the class token dropped
        return self.multi_modal_projector(x)

    def insert_features(self, x, input_ids, pixels, token_id, what):
        """The features of the tiles (or frames) in order into the positions of their placeholder
        token: x (B, T, C) -> (B, T, C)."""
        features = self.visual_features(pixels).to(x.dtype).flatten(0, 1)  # (tokens, C)
        slots = input_ids == token_id  # (B, T)
        n_slots = int(slots.sum())
        if n_slots != len(features):
            raise VLMError(f"the prompt has {n_slots} {what} tokens but the {what}s give "
                           f"{len(features)} features")
        return x.masked_scatter(slots[..., None], features)

    def forward(self, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None,
                labels=None, cache=None, last_only=False):
        """input_ids (B, T) -> logits (B, T, V); with last_only, the last position's (B, 1, V);
        with `labels` (B, T), (logits, loss).
        attention_mask (B, S) covers the cached tokens and the new ones (0: padding); positions
        count from each row's first real token. pixel_values: the tiles of every image in order,
        (images, tiles, 3, S, S), or (all tiles, 3, S, S) when images have different tile counts;
        pixel_values_videos alike, one tile per frame."""
        B, T = input_ids.shape
        n_cached = cache.len if cache is not None else 0
        if attention_mask is None:  # no padding
            attention_mask = torch.ones(B, n_cached + T, dtype=torch.bool, device=input_ids.device)
        keys = attention_mask.bool()  # (B, S): True for the real tokens
        positions = keys.long().cumsum(-1) - 1  # (B, S): 0 at each row's first real token
        positions = positions.clamp(min=0)[:, -T:]  # (B, T): the new tokens' (pads get 0)
        x = self.language_model.embed_tokens(input_ids)  # (B, T, C)
        if pixel_values is not None:
            x = self.insert_features(x, input_ids, pixel_values, self.cfg.image_token_id, "image")
        if pixel_values_videos is not None:
            video_id = self.cfg.video_token_id
            x = self.insert_features(x, input_ids, pixel_values_videos, video_id, "video")
        mask = make_mask(keys, T)
        x = self.language_model(x, positions, mask, cache)  # (B, T, C)
        if cache is not None:
            cache.len += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C): generation needs the last position only
        logits = self.lm_head(x)  # (B, T, V), or (B, 1, V)
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels)

    def decode_step(self, token, positions, keys, cache):
        """One decode step of generate(), eager or compiled (compiled=True compiles this method):
        token (B, 1) at `positions` (B, 1) -> fp32 logits (B, 1, V). Its key and value go to slot
        cache.slot (1,), and it attends to the filled slots of the real tokens `keys` (B, max_len)
        of the whole run: every step has the same shapes, and the cache's length is the one size
        that changes from run to run (compiled.compile_step)."""
        filled = torch.arange(keys.shape[1], device=keys.device) <= cache.slot  # (max_len,)
        mask = (keys & filled)[:, None, None]  # (B, 1, 1, max_len)
        x = self.language_model.embed_tokens(token)  # (B, 1, C)
        x = self.language_model(x, positions, mask, cache)  # (B, 1, C)
        # fp32 out: rounded inside the compiled program, and an fp32 argmax is ~2.5x a bf16 one
        return self.lm_head(x).float()  # (B, 1, V)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None,
                 labels=None, max_new_tokens=100, temperature=0.0, top_k=None, top_p=None,
                 seed=None, stream=None, compiled=False):
        """Prefill once (the tiles and frames are encoded here only), then decode_step for each
        new token. compiled=True: the step through torch.compile (compiled.py: one to two minutes
        for each model and weights in a process; README "What holds on which CPU"). Returns only
        the new ids (B, n). labels (a processor's, with a suffix) are taken, as transformers does,
        and ignored."""
        check_args(max_new_tokens, temperature, top_k, top_p)  # before the prefill's work
        B, T = input_ids.shape
        text = self.cfg.text
        check_context(T, max_new_tokens, text.max_position_embeddings,
                      hint=" (--max-tiles N makes images shorter)")
        device = input_ids.device
        max_len = T + max_new_tokens
        cache = KVCache(text.num_hidden_layers, B, text.num_key_value_heads, max_len, text.head_dim,
                        self.language_model.embed_tokens.weight.dtype, device)
        # the attention mask of the whole run, made once: generated tokens are real keys
        keys = torch.ones(B, max_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            keys[:, :T] = attention_mask
        last_position = keys[:, :T].sum(-1, keepdim=True) - 1  # (B, 1): of the last prompt token
        decode = self.decode_step
        if compiled:  # checked before the prefill's work; a tool, imported only for this option
            from compiled import compile_step
            decode = compile_step(self, "decode_step", keys, cache)
        logits = self(input_ids, pixel_values, pixel_values_videos, keys[:, :T], cache=cache,
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

def flatten(images):
    """One image, a list, or a list of lists (one per prompt) -> a flat list."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


def uniform_frames(n):
    """transformers' `num_frames` sampling as the `pick(total, fps)` of read_video: frame
    i * total // n for i < n. A video with fewer frames than n gives all it has (transformers
    refuses it)."""

    def pick(total, fps):  # fps unused: the frames are spaced by count, not by time
        if n > total:
            return list(range(total))
        return [i * total // n for i in range(n)]

    return pick


def fitted_size(W, H, canvas_w, canvas_h):
    """The size an image would have scaled to fit the canvas keeping its aspect ratio, with
    transformers' rounding (PerceptionLMImageProcessor._get_image_height_width)."""
    scale = min(canvas_w / W, canvas_h / H)
    aspect = W / H
    if aspect > 1:  # wide: the height follows the width
        return scale * W, math.floor(scale * W / aspect)
    return math.floor(scale * H * aspect), scale * H


def grids_by_ratio(max_tiles):
    """{aspect ratio n_w / n_h: [(n_w, n_h), ...]} for every grid of at most max_tiles tiles, in
    transformers' order: tile count from max_tiles down, then n_w ascending."""
    grids = {}
    for n_tiles in range(max_tiles, 0, -1):
        for n_w in range(1, n_tiles + 1):
            if n_tiles % n_w == 0:
                n_h = n_tiles // n_w
                grids.setdefault(n_w / n_h, []).append((n_w, n_h))
    return grids


def stack_pixels(items):
    """Per-image (or per-video) pixels -> one tensor: stacked when all have the same tile count, as
    transformers does, else their tiles concatenated (all tiles, 3, S, S)."""
    if len({x.shape for x in items}) == 1:
        return torch.stack(items)
    return torch.cat(items)


class Processor:
    """Images, videos and text -> model inputs, exactly as transformers' PerceptionLMProcessor
    (torchvision backend), with two differences: images with different tile counts can share a batch
    (their tiles are then concatenated, (all tiles, 3, S, S)), and a text that already starts with
    <|begin_of_text|> (a rendered chat template) does not get a second one, as in transformers'
    apply_chat_template(tokenize=True) flow."""

    def __init__(self, folder, cfg):
        self.tokenizer = open_tokenizer(folder)
        tokenizer_config = optional_json(folder / "tokenizer_config.json")
        image_config = read_json(folder / "preprocessor_config.json")
        video_config = optional_json(folder / "video_preprocessor_config.json")
        processor_config = optional_json(folder / "processor_config.json")
        # text: special tokens by name in tokenizer_config.json, placeholders by id in config.json
        self.bos = token_text(tokenizer_config.get("bos_token", "<|begin_of_text|>"))
        self.pad = token_text(tokenizer_config.get("pad_token", "<|end_of_text|>"))
        self.pad_id = self.tokenizer.token_to_id(self.pad)
        eos = token_text(tokenizer_config.get("eos_token", "<|eot_id|>"))
        self.end_of_turn = eos  # the last token of an answer, learned in training
        # with config.json's and generation_config.json's end ids
        self.stop = stop_ids(folder, self.tokenizer.token_to_id(eos))
        self.image_token = self.tokenizer.id_to_token(cfg.image_token_id)
        self.video_token = self.tokenizer.id_to_token(cfg.video_token_id)
        self.chat_template = find_chat_template(folder, processor_config, tokenizer_config)
        # images: a thumbnail and up to max_num_tiles tiles ("thumb+tile"), or the thumbnail alone
        self.tile = image_config.get("tile_size", 448)
        self.max_num_tiles = image_config.get("max_num_tiles", 36)
        self.thumb_and_tiles = image_config.get("vision_input_type", "thumb+tile") == "thumb+tile"
        resample = image_config.get("resample", 3)  # PIL's numbering
        self.mode = {2: "bilinear", 3: "bicubic"}.get(resample, "bicubic")
        # videos: every frame one tile
        size = video_config.get("size", {"height": 448, "width": 448})
        self.video_size = (size["height"], size["width"])
        # tokens per tile: the patches left after the projector's pooling
        self.patch = processor_config.get("patch_size", cfg.vision.patch_size)
        self.pool = processor_config.get("pooling_ratio", 2)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if self.chat_template is None:
            raise VLMError("this checkpoint has no chat template (chat_template.jinja): "
                           "pass a raw prompt (--raw)")
        return render_template(self.chat_template, messages, bos_token=self.bos,
                               pad_token=self.pad, add_generation_prompt=add_generation_prompt)

    def canvas(self, W, H, max_tiles):
        """(n_w, n_h) tiles for a W x H image, transformers' choice (Llama 3.2 Vision's dynamic
        tiling): of the grids of at most max_tiles tiles that hold the image without shrinking it,
        the one where the image would be biggest, later grids winning ties (so the biggest grid); if
        none holds it, the grid with the closest aspect ratio."""
        if max_tiles <= 1:
            return 1, 1
        grids = grids_by_ratio(max_tiles)
        aspect = W / H
        best_side = None
        best_grid = None
        for ratio_grids in grids.values():
            for n_w, n_h in ratio_grids:
                canvas_w = n_w * self.tile
                canvas_h = n_h * self.tile
                if canvas_w < W or canvas_h < H:
                    continue  # the image would shrink
                fitted_w, fitted_h = fitted_size(W, H, canvas_w, canvas_h)
                short_side = fitted_w if aspect < 1 else fitted_h  # the short side decides
                if best_side is None or short_side >= best_side:
                    best_side = short_side
                    best_grid = (n_w, n_h)
        if best_grid is not None:
            return best_grid
        # no grid holds the image: of the closest aspect ratio on the image's side of 1, its grid
        # with the most tiles along the long side
        if aspect >= 1:
            wide_ratios = [ratio for ratio in grids if ratio <= aspect]
            closest = min(wide_ratios, key=lambda ratio: abs(ratio - aspect))
            return max(grids[closest], key=lambda grid: grid[0])
        tall_ratios = [ratio for ratio in grids if ratio > aspect]
        closest = min(tall_ratios, key=lambda ratio: abs(1 / ratio - 1 / aspect))
        return max(grids[closest], key=lambda grid: grid[1])

    def tiles(self, image, max_tiles):
        """An image -> uint8 (1 + n_w * n_h, 3, t, t): the thumbnail, then the tiles of the image
        stretched onto the canvas in row-major order. Both resizes stretch (no padding), bicubic,
        antialiased on uint8."""
        x = image_tensor(image)[None]  # (1, 3, H, W)
        H, W = x.shape[-2:]
        t = self.tile
        thumbnail = resize(x, (t, t), self.mode)  # (1, 3, t, t)
        if not self.thumb_and_tiles:  # "vanilla": the thumbnail alone
            return thumbnail
        n_w, n_h = self.canvas(W, H, max_tiles)
        canvas = resize(x, (n_h * t, n_w * t), self.mode)  # (1, 3, n_h * t, n_w * t)
        tiles = canvas.view(3, n_h, t, n_w, t).permute(1, 3, 0, 2, 4)  # (n_h, n_w, 3, t, t)
        tiles = tiles.reshape(-1, 3, t, t)  # (n_h * n_w, 3, t, t): row-major
        return torch.cat([thumbnail, tiles])

    def frames(self, video, num_frames):
        """A video file (decoded with PyAV, `num_frames` sampled uniformly, 32 by default as PLM was
        trained), or decoded frames ((T, H, W, 3) / (T, 3, H, W) uint8, or a list of images: sampled
        only if num_frames is given) -> uint8 (T, 3, h, w) resized to one tile each (stretched)."""
        if isinstance(video, (str, Path)):  # only the sampled frames are decoded
            x, _ = read_video(video, uniform_frames(num_frames or 32))  # (T, 3, H, W)
            return resize(x.contiguous(), self.video_size, self.mode)
        if isinstance(video, (list, tuple)):
            x = torch.stack([image_tensor(frame) for frame in video])  # (T, 3, H, W)
        else:
            x = torch.as_tensor(np.asarray(video))
            if x.shape[-1] == 3:  # channels last
                x = x.permute(0, 3, 1, 2)  # (T, 3, H, W)
        if num_frames:
            pick = uniform_frames(num_frames)
            x = x[pick(len(x), None)]
        return resize(x.contiguous(), self.video_size, self.mode)

    def tokens_per_tile(self, pixels):  # (..., 3, h, w) -> pooled patches a tile: 256 at 448 px
        rows = pixels.shape[-2] // self.patch // self.pool
        cols = pixels.shape[-1] // self.patch // self.pool
        return rows * cols

    def placeholder_runs(self, tiles, frames):
        """-> {<|image|>: [...], <|video|>: [...]}: each <|image|> (<|video|>) stands for one token
        per pooled patch of every tile (frame) of its image (video), the images and videos taken in
        order."""
        runs = {self.image_token: [], self.video_token: []}
        for x in tiles:
            runs[self.image_token].append(self.image_token * self.tokens_per_tile(x) * len(x))
        for x in frames:
            runs[self.video_token].append(self.video_token * self.tokens_per_tile(x) * len(x))
        return runs

    def __call__(self, text=None, images=None, videos=None, num_frames=None, max_num_tiles=None,
                 suffix=None):
        """text: a prompt or a list of prompts, with a placeholder for each image and video; images:
        one, a list, or a list per prompt; videos: a file or decoded frames, or a list of them ->
        {input_ids, attention_mask, and pixel_values / pixel_values_videos where given}.
        max_num_tiles replaces the checkpoint's tile cap (36); num_frames: frames sampled per
        video (a file: 32 by default; decoded frames: all by default). suffix: per prompt the
        answer to train on (training_data.prompt_and_answer), appended; it adds `labels`, -100
        but on it."""
        if isinstance(text, str):
            text = [text]
        prompts = list(text or [""])
        images = flatten(images)
        if videos is None:
            videos = []
        elif isinstance(videos, (str, Path, np.ndarray, torch.Tensor)):  # one video
            videos = [videos]
        videos = list(videos)
        given = [(self.image_token, images, "images"), (self.video_token, videos, "videos")]
        for token, media, what in given:
            n_placeholders = sum(prompt.count(token) for prompt in prompts)
            if n_placeholders != len(media):
                raise VLMError(f"the prompts have {n_placeholders} {token} placeholders but "
                               f"{len(media)} {what} were given")
        tiles = [self.tiles(image, max_num_tiles or self.max_num_tiles) for image in images]
        frames = [self.frames(video, num_frames) for video in videos]
        prompts = expand_placeholders(prompts, self.placeholder_runs(tiles, frames))
        ids = []
        for prompt in prompts:
            # a rendered chat template starts with <|begin_of_text|> already: no second one
            add_bos = not prompt.startswith(self.bos)
            ids.append(self.tokenizer.encode(prompt, add_special_tokens=add_bos).ids)
        out = text_inputs(self.tokenizer, ids, self.pad_id, suffix)
        if tiles:
            out["pixel_values"] = stack_pixels([normalize(x) for x in tiles])
        if frames:
            out["pixel_values_videos"] = stack_pixels([normalize(x) for x in frames])
        return out

    def decode(self, ids):
        """Text of generated ids, up to the first end token, special tokens skipped."""
        return decode_ids(self.tokenizer, ids, self.stop)


# ------------------------------------------------------------ loading

def hub_name(key, tied):
    """Hub key -> our module path: `model.` and timm's `timm_model.` wrapper dropped. A tied
    checkpoint's stored output head (none is released) is ignored: the head is the embedding."""
    if tied and key == "lm_head.weight":
        return None
    return key.removeprefix("model.").replace("vision_tower.timm_model.", "vision_tower.")


def load(model=DEFAULT_MODEL, device=None, dtype=None, quantize=None):
    """Load a PerceptionLM checkpoint (hub repo id or local directory) -> (model, processor).
    quantize: None, "int8" or "int4" decoder weights (quantize.py)."""
    folder = resolve(model)
    cfg = Config.from_folder(folder)
    rename = partial(hub_name, tied=cfg.tie_word_embeddings)
    prepare = None
    if quantize:  # a tool, imported only for this option
        from quantize import quantizer
        prepare = quantizer(quantize)
    perception_lm = load_weights(partial(PerceptionLM, cfg), folder, rename, device, dtype,
                                 prepare)
    processor = Processor(folder, cfg)
    perception_lm.stop = processor.stop  # the checkpoint's end ids
    perception_lm.pad_id = processor.pad_id
    return perception_lm, processor


# ------------------------------------------------------------ command line

def parse_args(argv=None):
    """The command line's arguments, checked before anything slow (one line, exit code 1)."""
    from command_line import check_flags, cli_parser
    parser = cli_parser("Describe images and videos, or answer questions about them, with "
                        "PerceptionLM 1B/3B/8B.", DEFAULT_MODEL)
    parser.add_argument("--video", default=None,
                        help="a video file (decoded with PyAV; one tile of 256 tokens per frame)")
    parser.add_argument("--num-frames", type=int, default=32,
                        help="frames sampled uniformly from --video (default 32, as PLM was "
                        "trained; a shorter video gives all its frames)")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="at most this many 448px tiles per image, plus the thumbnail "
                        "(default: the checkpoint's 36, so almost any image becomes ~37 tiles = "
                        "~9.5k tokens, slow on a CPU; e.g. --max-tiles 4 for a quick answer)")
    parser.add_argument("--raw", action="store_true",
                        help="pass --prompt as is (with <|image|> / <|video|> placeholders), not "
                        "wrapped in the chat template")
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def main(argv=None):
    from command_line import stream_answer, timed_load
    args = parse_args(argv)
    if args.batch:
        from batch_runner import Batch
        Batch(args).run(batch_answerer)  # the images are found before the slow load
        return
    # fail on a bad image or video before the slow load
    images = [open_image(path) for path in args.image]
    videos = []
    if args.video:
        frames, _ = read_video(args.video, uniform_frames(args.num_frames))
        videos.append(frames)
    model, processor, load_seconds = timed_load(load, args.model, args)
    on_cpu = next(model.parameters()).device.type == "cpu"
    text = cli_prompt(processor, args, len(images), len(videos))
    if on_cpu:
        note_many_tiles(processor, images, args.max_tiles)
    inputs = processor(text=[text], images=images or None, videos=videos or None,
                       max_num_tiles=args.max_tiles)
    stream_answer(model, processor, inputs, args, load_seconds, model.vision_tower)


def cli_prompt(processor, args, n_images, n_videos):
    """--prompt as a user turn of the chat template (images, then the video, then the text: the
    template's order); with --raw, as typed (command_line.user_turn)."""
    from command_line import user_turn
    return user_turn(processor, args, n_images, n_videos)


def note_many_tiles(processor, images, max_tiles):
    """One stderr line when an image becomes more than 16 tiles (the CLI calls this on a CPU, where
    each tile's prefill takes seconds) -> whether it printed."""
    tile_counts = [1]
    for image in images:
        n_w, n_h = processor.canvas(*image.size, max_tiles or processor.max_num_tiles)
        tile_counts.append(1 + n_w * n_h)  # the thumbnail and the tiles
    n_tiles = max(tile_counts)
    if n_tiles <= 16 or not processor.thumb_and_tiles:
        return False
    per_tile = (processor.tile // processor.patch // processor.pool) ** 2  # tokens
    print(f"note: an image becomes {n_tiles} tiles, {n_tiles * per_tile:,} tokens, slow on a CPU: "
          f"--max-tiles N trades detail for speed (--max-tiles 4: at most 5 tiles, "
          f"{5 * per_tile:,} tokens)", file=sys.stderr)
    return True


def batch_answerer(args):
    """--batch's answerer (batch_runner.Answerer; Ray's DatasetAnswerer uses it too): each image
    in the chat template with --prompt. A prompt that would fail every image (say --raw without
    <|image|>) fails before the load."""
    from batch_runner import Answerer, check_prompt
    folder = resolve(args.model)
    cfg = Config.from_folder(folder)
    processor = Processor(folder, cfg)
    prompt = cli_prompt(processor, args, 1, 0)

    def preprocess(images):
        return processor(text=[prompt] * len(images), images=images,
                         max_num_tiles=args.max_tiles)

    check_prompt(preprocess, processor.tokenizer, cfg.text.max_position_embeddings, args)
    model, processor = load(str(folder), args.device, args.dtype, args.quantize)
    noted = next(model.parameters()).device.type != "cpu"  # the note on many tiles: on a CPU

    def make_inputs(images):
        nonlocal noted
        if not noted:  # once a run
            noted = note_many_tiles(processor, images, args.max_tiles)
        return preprocess(images)

    return Answerer(model, processor.decode, make_inputs, model.vision_tower, args)


if __name__ == "__main__":
    from command_line import run_cli
    run_cli(main)
