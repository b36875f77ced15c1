"""PerceptionLM 1B/3B/8B in one file of plain PyTorch, loading the Hugging Face Hub checkpoints as they are.

PerceptionLM (PLM, arXiv:2504.13180) reads an image as a 448x448 thumbnail plus up to 36 448x448 tiles of
the image stretched onto the biggest tile grid it fits (a video as one 448x448 tile per frame, 32 frames).
Each tile goes through a Perception Encoder ViT (PE, arXiv:2504.13181: absolute and 2D rotary position
embeddings, layer scale), a two-layer MLP and a 2x2 average pooling: 256 tokens per tile. These fill the
<|image|> / <|video|> positions of a Llama 3 decoder's input. Read top to bottom: config, vision tower,
projector, decoder, the full model, preprocessing, loading, command line.

    python perception_lm.py --image cat.jpg --prompt "Describe the image."
    python perception_lm.py --video clip.mp4 --prompt "What happens in this video?"

Shapes: N tiles (or frames), P patches per tile, Dv vision width, B batch, T tokens, S keys, Dt text width.
"""
import math
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (GatedMLP, KVCache, SelfAttention, Streamer, VLMError, attend, check_args, cli_parser,
                    from_dict, generate, image_tensor, linear, load_weights, make_mask, normalize, open_image, read_json,
                    read_video, resize, resolve, rope_cos_sin, rope_inv_freq, rope_theta, run_cli, stop_ids)

DEFAULT_MODEL = "facebook/Perception-LM-1B"


# ----------------------------------------------------------------------------- config

@dataclass
class VisionConfig:  # timm Eva arguments; defaults shared by both PE architectures, PE_ARCHS has the rest
    img_size: int | list = 448
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_token: bool = True
    init_values: float | None = None  # layer scale (gamma_1, gamma_2) when set; PLM sets 0.1
    use_post_transformer_norm: bool = True  # timm's default with attention pooling; PLM turns it off
    rope_grid_offset: float = 0.0
    ref_feat_shape: int | list | None = None  # RoPE coordinates are rescaled so the grid spans this shape
    global_pool: str = "map"  # accepted, unused: PLM reads every patch, never a pooled output


# The config names a timm architecture and overrides some of its arguments in `model_args`; the rest are
# timm's defaults for it (timm/models/eva.py; img_size from its pretrained_cfg, since fixed_input_size).
PE_ARCHS = {
    "vit_pe_core_large_patch14_336": dict(img_size=336, ref_feat_shape=(24, 24), rope_grid_offset=1.0),  # 1B, 3B
    "vit_pe_core_gigantic_patch14_448": dict(embed_dim=1536, depth=50, mlp_ratio=8960 / 1536, class_token=False,
                                             ref_feat_shape=(32, 32)),  # 8B
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
            raise VLMError(f"{folder} holds a {c.get('model_type', 'unknown')!r} checkpoint, not PerceptionLM")
        v, t = c.get("vision_config") or {}, c.get("text_config") or {}
        if v.get("architecture") not in PE_ARCHS:
            raise VLMError(f"unsupported PerceptionLM vision tower {v.get('architecture')!r} (expected one of {list(PE_ARCHS)})")
        args = v.get("model_args") or {}
        if unknown := sorted(set(args) - {f.name for f in fields(VisionConfig)}):
            raise VLMError(f"unsupported Perception Encoder option(s) {unknown} in vision_config.model_args")
        text = from_dict(TextConfig, {**t, "rope_theta": rope_theta(t),  # 4.x rope_scaling or 5.x rope_parameters
                                      "rope_scaling": t.get("rope_parameters") or t.get("rope_scaling")})
        cfg = from_dict(Config, {**c, "vision": from_dict(VisionConfig, {**PE_ARCHS[v["architecture"]], **args}), "text": text})
        if cfg.tie_word_embeddings is None:
            cfg.tie_word_embeddings = text.tie_word_embeddings
        llama3_inv_freq(text)  # an unsupported rope scaling fails here, before the weights are read
        return cfg


# ----------------------------------------------------------------------------- vision tower: Perception Encoder

def pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def pe_rope(c):
    """cos, sin (P, head_dim) of PE's 2D RoPE for the patch grid, as timm's RotaryEmbeddingCat builds them:
    head_dim / 4 frequencies f_i = 10000^(-i / (head_dim / 4)); a patch at (row, col) gets the angles
    [x * f, y * f] with x = col, y = row counted from `rope_grid_offset` (1 when a class token sits at 0, as
    in PE) and rescaled so the grid spans `ref_feat_shape`; each angle rotates one pair of channels."""
    (h, w), hd = (s // c.patch_size for s in pair(c.img_size)), c.embed_dim // c.num_heads
    bands = 1.0 / 10000.0 ** (torch.arange(hd // 4, device="cpu").float() / (hd // 4))
    x = torch.arange(w, device="cpu").float() + c.rope_grid_offset
    y = torch.arange(h, device="cpu").float() + c.rope_grid_offset
    if c.ref_feat_shape is not None:
        ref_h, ref_w = pair(c.ref_feat_shape)
        x, y = x / w * ref_w, y / h * ref_h
    ys, xs = torch.meshgrid(y, x, indexing="ij")  # (h, w): patches in row-major order
    angles = torch.cat([xs[..., None] * bands, ys[..., None] * bands], -1).flatten(0, 1)  # (P, hd / 2)
    angles = angles.repeat_interleave(2, -1)  # [a0, a0, a1, a1, ...]: the interleaved layout
    return angles.cos(), angles.sin()


def rope_2d(x, cos, sin):
    """Rotate channel pairs (x0, x1), (x2, x3), ...: the interleaved layout of PE and timm, unlike the
    decoder's half-split one. fp32 cos/sin, the result rounded back to x's dtype."""
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)  # [-x1, x0, -x3, x2, ...]
    return (x * cos + rotated * sin).to(x.dtype)


class PEAttention(nn.Module):
    """Self-attention over all tokens with a fused qkv projection; RoPE on the patch tokens only (the class
    token, first when present, keeps angle 0)."""

    def __init__(self, dim, n_heads, n_prefix):
        super().__init__()
        self.H, self.n_prefix = n_heads, n_prefix
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        N, L, C = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)  # each (N, H, L, hd)
        p = self.n_prefix
        q, k = (torch.cat([t[:, :, :p], rope_2d(t[:, :, p:], cos, sin)], dim=2) for t in (q, k))
        return self.proj(attend(q, k, v).transpose(1, 2).reshape(N, L, C))


class PEMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class PEBlock(nn.Module):
    """A pre-LayerNorm ViT block whose two branches are scaled per channel (LayerScale, arXiv:2103.17239)."""

    def __init__(self, c, n_prefix):
        super().__init__()
        d = c.embed_dim
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)  # eps 1e-5, as PE's
        self.attn = PEAttention(d, c.num_heads, n_prefix)
        self.mlp = PEMlp(d, int(d * c.mlp_ratio))  # timm's int(): 8960 for the 8B's 1536 x 8960/1536
        scaled = c.init_values is not None
        self.gamma_1, self.gamma_2 = (nn.Parameter(torch.ones(d)) if scaled else None for _ in range(2))

    def forward(self, x, cos, sin):
        a = self.attn(self.norm1(x), cos, sin)
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.gamma_2 is None else self.gamma_2 * m)


class PerceptionEncoder(nn.Module):
    """Checkpoint keys `model.vision_tower.timm_model.*` (timm's Eva names). No pooling: PLM reads every
    patch of the last block."""

    def __init__(self, c):
        super().__init__()
        n_prefix, (h, w), d = int(c.class_token), (s // c.patch_size for s in pair(c.img_size)), c.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, c.patch_size, stride=c.patch_size, bias=False)  # norm_pre follows
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_prefix + h * w, d))  # the class token has one too
        self.norm_pre = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(PEBlock(c, n_prefix) for _ in range(c.depth))
        self.norm = nn.LayerNorm(d) if c.use_post_transformer_norm else nn.Identity()
        cos, sin = pe_rope(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels):  # (N, 3, S, S) -> (N, [1 +] P, Dv)
        x = self.patch_embed.proj(pixels.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)  # row-major
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = self.norm_pre(x + self.pos_embed)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.norm(x)


class Projector(nn.Module):
    """linear_1 -> exact GELU -> linear_2 on every patch, then average pooling of the patch grid by
    `pool` (2: 32x32 -> 16x16 = 256 tokens per tile). Adaptive pooling, as transformers does: an odd grid
    (5x5 -> 2x2) averages overlapping windows ([0, 3) and [2, 5) along each side)."""

    def __init__(self, vision_dim, text_dim, pool):
        super().__init__()
        self.pool = pool
        self.linear_1, self.linear_2 = nn.Linear(vision_dim, text_dim), nn.Linear(text_dim, text_dim)

    def forward(self, x):  # (N, P, Dv) -> (N, P / pool^2, Dt)
        x = self.linear_2(F.gelu(self.linear_1(x)))
        if self.pool > 1:
            N, P, C = x.shape
            side = math.isqrt(P)
            x = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(N, C, side, side), side // self.pool)
            x = x.flatten(2).transpose(1, 2)
        return x


# ----------------------------------------------------------------------------- decoder: Llama 3

def llama3_inv_freq(c):
    """RoPE frequencies of the text config, with Llama 3.1's frequency scaling when `rope_scaling` says
    llama3 (PLM 1B/3B: factor 32): wavelengths longer than original_max / low_freq_factor are stretched by
    `factor`, those shorter than original_max / high_freq_factor kept, the band between interpolated
    (transformers' _compute_llama3_parameters is the oracle; same float32 operations)."""
    inv = rope_inv_freq(c.head_dim, c.rope_theta)
    s = c.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise VLMError(f"unsupported rope scaling {kind!r} in text_config (PerceptionLM uses llama3 or none)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    factor, low, high, orig = (s[k] for k in keys)
    wavelen = 2 * math.pi / inv
    inv_long = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    between = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(between, (1 - smooth) * inv_long / factor + smooth * inv_long, inv_long)


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, round back, then scale (Llama's order)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class LlamaLayer(nn.Module):
    def __init__(self, i, c):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = SelfAttention(i, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, F.silu)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The Llama 3 decoder (arXiv:2407.21783); checkpoint keys `model.language_model.*`."""

    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(i, c) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq", llama3_inv_freq(c), persistent=False)

    def forward(self, x, positions, mask, cache=None):  # x (B, T, Dt) embeddings, positions (B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


# ----------------------------------------------------------------------------- the full model

class PerceptionLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = PerceptionEncoder(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.embed_dim, cfg.text.hidden_size, cfg.projector_pooling_ratio)
        self.language_model = Llama(cfg.text)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.stop, self.pad_id = [], 0  # set from the checkpoint by load()

    def visual_features(self, pixels):  # tiles or frames (..., 3, S, S) -> (N, tokens per tile, Dt)
        """One tile at a time (1025 tokens: matrix products big enough to run at full speed): the same result,
        with the activations of one tile instead of 37 (or more) in memory, and faster on a CPU, where smaller
        activations reuse freed memory instead of page-faulting in fresh memory (2 tiles: ~110k faults a call)."""
        x = torch.cat([self.vision_tower(tile) for tile in pixels.flatten(0, -4).split(1)])
        return self.multi_modal_projector(x[:, 1:] if self.cfg.vision_use_cls_token else x)

    def forward(self, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None, cache=None,
                last_only=False, **_):
        """input_ids (B, T) -> logits (B, T, V). attention_mask covers the cached tokens and the new ones (B, S);
        positions count from each row's first real token. pixel_values: the tiles of every image in order,
        (images, tiles, 3, S, S), or (all tiles, 3, S, S) when images have different tile counts; videos alike."""
        B, T = input_ids.shape
        S = T + (cache.len if cache is not None else 0)
        keys = torch.ones(B, S, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
        positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.language_model.embed_tokens(input_ids)
        for pixels, token, what in ((pixel_values, self.cfg.image_token_id, "image"),
                                    (pixel_values_videos, self.cfg.video_token_id, "video")):
            if pixels is not None:
                feats = self.visual_features(pixels).to(x.dtype).flatten(0, 1)
                slots = input_ids == token
                if int(slots.sum()) != len(feats):
                    raise VLMError(f"the prompt has {int(slots.sum())} {what} tokens but the {what}s give {len(feats)} features")
                x = x.masked_scatter(slots[..., None], feats)
        x = self.language_model(x, positions, make_mask(keys, T), cache)
        if cache is not None:
            cache.len += T
        if last_only:
            x = x[:, -1:]
        return linear(x, self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, pixel_values_videos=None, attention_mask=None, max_new_tokens=100,
                 temperature=0.0, top_k=None, top_p=None, seed=None, stream=None, **_):
        """Prefill once, then decode with the KV cache. Returns only the new ids (B, n)."""
        B, T = input_ids.shape
        t, total = self.cfg.text, T + max_new_tokens
        if total > t.max_position_embeddings:
            raise VLMError(f"the prompt ({T} tokens) plus --max-new-tokens ({max_new_tokens}) exceed the model's "
                           f"context of {t.max_position_embeddings} tokens (--max-tiles N makes images shorter)")
        dev = input_ids.device
        cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, total, t.head_dim,
                        self.language_model.embed_tokens.weight.dtype, dev)
        keys = torch.ones(B, total, dtype=torch.long, device=dev)  # generated tokens are real keys
        if attention_mask is not None:
            keys[:, :T] = attention_mask
        logits = self(input_ids, pixel_values, pixel_values_videos, keys[:, :T], cache, last_only=True)[:, -1]

        def step(tok):
            return self(tok[:, None], attention_mask=keys[:, :cache.len + 1], cache=cache, last_only=True)[:, -1]

        return generate(step, logits, max_new_tokens, self.stop, self.pad_id, temperature, top_k, top_p, seed, stream)


# ----------------------------------------------------------------------------- preprocessing

def render_template(template, messages, **variables):
    """A checkpoint's own chat template rendered by Jinja in a sandbox, with transformers' settings, so the
    string is the one transformers renders."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # templates call this to refuse a conversation they cannot render
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, **variables)
    except TemplateError as e:
        raise VLMError(f"chat template: {e}") from None


def optional_json(path):
    return read_json(path) if path.exists() else {}


def flatten(xs):  # one item, a list, or a list of lists (one per prompt) -> a flat list
    xs = [] if xs is None else xs if isinstance(xs, (list, tuple)) else [xs]
    return [x for item in xs for x in (item if isinstance(item, (list, tuple)) else [item])]


def uniform_frames(n):
    """transformers' `num_frames` sampling: frame i * total // n for i < n. A video with fewer frames than n
    gives all it has (transformers refuses it)."""
    return lambda total, fps: [i * total // n for i in range(n)] if n <= total else list(range(total))


def fitted_size(W, H, canvas_w, canvas_h):
    """The size an image would have scaled to fit the canvas keeping its aspect ratio, with transformers'
    rounding (PerceptionLMImageProcessor._get_image_height_width)."""
    f, s = min(canvas_w / W, canvas_h / H), W / H
    return (f * W, math.floor(f * W / s)) if s > 1 else (math.floor(f * H * s), f * H)


class Processor:
    """Images, videos and text -> model inputs, exactly as transformers' PerceptionLMProcessor (torchvision
    backend), with two differences: images with different tile counts can share a batch (their tiles are then
    concatenated, (all tiles, 3, S, S)), and a text that already starts with <|begin_of_text|> (a rendered chat
    template) does not get a second one, as in transformers' apply_chat_template(tokenize=True) flow."""

    def __init__(self, folder, cfg):
        from tokenizers import Tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise VLMError(f"{folder / 'tokenizer.json'} cannot be read ({e})") from None
        tc, pp = optional_json(folder / "tokenizer_config.json"), read_json(folder / "preprocessor_config.json")
        vp, pc = optional_json(folder / "video_preprocessor_config.json"), optional_json(folder / "processor_config.json")
        token = lambda v: v["content"] if isinstance(v, dict) else v  # older files store AddedToken dicts
        self.bos, self.pad = token(tc.get("bos_token", "<|begin_of_text|>")), token(tc.get("pad_token", "<|end_of_text|>"))
        self.pad_id = self.tokenizer.token_to_id(self.pad)
        self.image_token, self.video_token = (self.tokenizer.id_to_token(i) for i in (cfg.image_token_id, cfg.video_token_id))
        self.tile, self.max_num_tiles = pp.get("tile_size", 448), pp.get("max_num_tiles", 36)
        self.thumb_and_tiles = pp.get("vision_input_type", "thumb+tile") == "thumb+tile"
        self.mode = {2: "bilinear", 3: "bicubic"}.get(pp.get("resample", 3), "bicubic")
        size = vp.get("size", {"height": 448, "width": 448})
        self.video_size = (size["height"], size["width"])
        self.patch, self.pool = pc.get("patch_size", cfg.vision.patch_size), pc.get("pooling_ratio", 2)
        self.stop = [self.tokenizer.token_to_id(token(tc.get("eos_token", "<|eot_id|>")))]  # load() widens it
        jinja = folder / "chat_template.jinja"
        self.chat_template = jinja.read_text(encoding="utf-8") if jinja.exists() else next(
            (c["chat_template"] for c in (optional_json(folder / "chat_template.json"), pc, tc) if c.get("chat_template")), None)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if self.chat_template is None:
            raise VLMError("this checkpoint has no chat template (chat_template.jinja): pass a raw prompt (--raw)")
        return render_template(self.chat_template, messages, bos_token=self.bos, pad_token=self.pad,
                               add_generation_prompt=add_generation_prompt)

    def canvas(self, W, H, max_tiles):
        """(n_w, n_h) tiles for a W x H image, transformers' choice (Llama 3.2 Vision's dynamic tiling): of the
        grids of at most max_tiles tiles that hold the image without shrinking it, the one where the image
        would be biggest, later grids winning ties (so the biggest grid); if none holds it, the grid with the
        closest aspect ratio."""
        if max_tiles <= 1:
            return 1, 1
        ratios = {}  # aspect ratio -> grids, in transformers' order: n from max_tiles down, n_w ascending
        for n in range(max_tiles, 0, -1):
            for n_w in (x for x in range(1, n + 1) if n % x == 0):
                ratios.setdefault(n_w / (n // n_w), []).append((n_w, n // n_w))
        s, t, best = W / H, self.tile, None
        for n_w, n_h in (grid for grids in ratios.values() for grid in grids):
            if n_w * t >= W and n_h * t >= H:  # the short side of the image decides
                side = fitted_size(W, H, n_w * t, n_h * t)[0 if s < 1 else 1]
                if best is None or side >= best[0]:
                    best = side, (n_w, n_h)
        if best is not None:
            return best[1]
        if s >= 1:
            key = min((r for r in ratios if r <= s), key=lambda r: abs(r - s))
            return max(ratios[key], key=lambda g: g[0])
        key = min((r for r in ratios if r > s), key=lambda r: abs(1 / r - 1 / s))
        return max(ratios[key], key=lambda g: g[1])

    def tiles(self, image, max_tiles):
        """An image -> uint8 (1 + n_w * n_h, 3, t, t): the thumbnail, then the tiles of the image stretched onto
        the canvas in row-major order. Both resizes stretch (no padding), bicubic, antialiased on uint8."""
        x = image_tensor(image)[None]
        H, W = x.shape[-2:]
        t = self.tile
        thumb = resize(x, (t, t), self.mode)
        if not self.thumb_and_tiles:  # "vanilla": the thumbnail alone
            return thumb
        n_w, n_h = self.canvas(W, H, max_tiles)
        big = resize(x, (n_h * t, n_w * t), self.mode)
        return torch.cat([thumb, big.view(3, n_h, t, n_w, t).permute(1, 3, 0, 2, 4).reshape(-1, 3, t, t)])

    def frames(self, video, num_frames):
        """A video file (decoded with PyAV, `num_frames` sampled uniformly, 32 by default as PLM was trained), or
        decoded frames ((T, H, W, 3) / (T, 3, H, W) uint8, or a list of images: sampled only if num_frames is
        given) -> uint8 (T, 3, h, w) resized to one tile each (stretched)."""
        if isinstance(video, (str, Path)):
            x = read_video(video, uniform_frames(num_frames or 32))[0]
        else:
            is_list = isinstance(video, (list, tuple))
            x = torch.stack([image_tensor(f) for f in video]) if is_list else torch.as_tensor(np.asarray(video))
            x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
            x = x[uniform_frames(num_frames)(len(x), None)] if num_frames else x
        return resize(x.contiguous(), self.video_size, self.mode)

    def __call__(self, text=None, images=None, videos=None, num_frames=None, max_num_tiles=None, **_):
        text = [text] if isinstance(text, str) else list(text or [""])
        images = flatten(images)
        videos = [] if videos is None else [videos] if isinstance(videos, (str, Path, np.ndarray, torch.Tensor)) else list(videos)
        for token, given, what in ((self.image_token, images, "images"), (self.video_token, videos, "videos")):
            if (n := sum(t.count(token) for t in text)) != len(given):
                raise VLMError(f"the prompts have {n} {token} placeholders but {len(given)} {what} were given")
        tiles = [self.tiles(im, max_num_tiles or self.max_num_tiles) for im in images]
        frames = [self.frames(v, num_frames) for v in videos]
        # each placeholder becomes one token per pooled patch of each of its tiles (256 per 448 tile)
        per_tile = lambda x: (x.shape[-2] // self.patch // self.pool) * (x.shape[-1] // self.patch // self.pool)
        runs = {tok: iter([tok * per_tile(x) * len(x) for x in xs])
                for tok, xs in ((self.image_token, tiles), (self.video_token, frames))}
        pattern = re.compile("|".join(map(re.escape, runs)))
        text = [pattern.sub(lambda m: next(runs[m.group()]), t) for t in text]
        ids = [self.tokenizer.encode(t, add_special_tokens=not t.startswith(self.bos)).ids for t in text]
        L = max(len(i) for i in ids)  # left padding, so every row ends where generation starts
        out = {"input_ids": torch.tensor([[self.pad_id] * (L - len(i)) + i for i in ids]),
               "attention_mask": torch.tensor([[0] * (L - len(i)) + [1] * len(i) for i in ids])}
        stack = lambda xs: torch.stack(xs) if len({x.shape for x in xs}) == 1 else torch.cat(xs)  # mixed: all tiles
        if tiles:
            out["pixel_values"] = stack([normalize(x) for x in tiles])
        if frames:
            out["pixel_values_videos"] = stack([normalize(x) for x in frames])
        return out

    def decode(self, ids):
        """Text of generated ids, up to the first end token, special tokens skipped."""
        ids = [int(i) for i in ids]
        ends = [k for k, i in enumerate(ids) if i in self.stop]
        return self.tokenizer.decode(ids[:ends[0]] if ends else ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- loading

def hub_name(key, tied):
    """Hub key -> our module path: `model.` and timm's `timm_model.` wrapper dropped. A tied checkpoint's
    stored output head (none is released) is ignored: the head is the embedding."""
    if tied and key == "lm_head.weight":
        return None
    return key.removeprefix("model.").replace("vision_tower.timm_model.", "vision_tower.")


def load(model=DEFAULT_MODEL, device=None, dtype=None):
    """Load a PerceptionLM checkpoint (hub repo id or local directory) -> (model, processor)."""
    folder = resolve(model)
    cfg = Config.from_folder(folder)
    m = load_weights(lambda: PerceptionLM(cfg), folder, lambda k: hub_name(k, cfg.tie_word_embeddings), device, dtype)
    processor = Processor(folder, cfg)
    m.stop = processor.stop = stop_ids(folder, *processor.stop)
    m.pad_id = processor.pad_id
    return m, processor


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = cli_parser("Describe images and videos, or answer questions about them, with PerceptionLM 1B/3B/8B.",
                   DEFAULT_MODEL)
    p.add_argument("--video", default=None, help="a video file (decoded with PyAV; one tile of 256 tokens per frame)")
    p.add_argument("--num-frames", type=int, default=32, help="frames sampled uniformly from --video (default 32, "
                   "as PLM was trained; a shorter video gives all its frames)")
    p.add_argument("--max-tiles", type=int, default=None, help="at most this many 448px tiles per image, plus the "
                   "thumbnail (default: the checkpoint's 36, so almost any image becomes ~37 tiles = ~9.5k tokens, "
                   "slow on a CPU; e.g. --max-tiles 4 for a quick answer)")
    p.add_argument("--raw", action="store_true", help="pass --prompt as is (with <|image|> / <|video|> "
                   "placeholders), not wrapped in the chat template")
    a = p.parse_args(argv)
    check_args(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.prompt)
    for flag, value in (("num-frames", a.num_frames), ("max-tiles", a.max_tiles)):
        if value is not None and value <= 0:
            raise VLMError(f"{flag} must be positive, got {value}")
    images = [open_image(path) for path in a.image]  # fail on a bad image or video before the slow load
    videos = [read_video(a.video, uniform_frames(a.num_frames))[0]] if a.video else []
    t0 = time.perf_counter()
    model, processor = load(a.model, a.device, a.dtype)
    t_load = time.perf_counter() - t0
    text = a.prompt
    if not a.raw:  # a user turn: images, then the video, then the text, as the template orders them
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + [{"type": "text", "text": a.prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    dev = next(model.parameters()).device
    inputs = processor(text=[text], images=images or None, videos=videos or None, max_num_tiles=a.max_tiles)
    out = Streamer(processor.decode)
    model.generate(**{k: v.to(dev) for k, v in inputs.items()}, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stream=out)
    out()
    if a.verbose:
        out.report(t_load)


if __name__ == "__main__":
    run_cli(main)
