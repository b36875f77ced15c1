"""SmolVLM 1 and SmolVLM2 in one file of plain PyTorch, loading the Hugging Face Hub checkpoints as
they are.

SmolVLM (arXiv:2504.05299; the Idefics3 design, arXiv:2408.12637) cuts an image into square tiles
plus one downscaled copy of the whole image, encodes each tile with a SigLIP vision transformer,
folds every s x s block of patch features into one token ("pixel shuffle"), projects those tokens
into a SmolLM2 (Llama) decoder and writes the answer. SmolVLM2 adds video: sampled frames, each one
tile, introduced by their timestamps. Read top to bottom: config, vision tower, connector, decoder,
the full model (with generation), preprocessing, loading, command line.

    python smolvlm.py --image cat.jpg --prompt "Describe this image."
    python smolvlm.py --video clip.mp4 --prompt "What happens in this video?"

Shapes: B batch, T new tokens, S keys (cached and new), V vocabulary, N images (tiles or frames),
P patches per tile, D vision width, C text width; in attention H query heads, K key/value heads, Dh
head dim.
"""
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (
    Embedding, KVCache, Linear, VLMError, apply_rope, attend, check_args, check_context,
    decode_ids, expand_placeholders, find_chat_template, from_dict, generate, image_tensor,
    load_weights, make_mask, next_token_loss, normalize, open_image, open_tokenizer, optional_json,
    read_json, read_video, render_template, resize, resolve, rope_cos_sin, rope_inv_freq,
    rope_theta, stop_ids, text_inputs, token_text,
)

# 256M parameters: fine on a laptop CPU
DEFAULT_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"


# ------------------------------------------------------------ config

@dataclass
class VisionConfig:
    """SigLIP as Idefics3/SmolVLM configure it. The defaults are transformers': SmolVLM2's
    config.json leaves out num_hidden_layers and intermediate_size and relies on 12 and 3072."""
    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-6


@dataclass
class TextConfig:  # Llama (SmolLM2); the defaults are transformers' LlamaConfig
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one per query head
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0


@dataclass
class Config:
    vision: VisionConfig
    text: TextConfig
    model_type: str = "idefics3"  # SmolVLM 1; "smolvlm" is SmolVLM2 (adds video)
    scale_factor: int = 2  # pixel shuffle: s x s patches -> one token
    image_token_id: int = 128257

    @staticmethod
    def from_folder(folder):
        config = read_json(folder / "config.json")
        if config.get("model_type") not in ("idefics3", "smolvlm"):
            raise VLMError(f"{folder} holds a {config.get('model_type', 'unknown')!r} checkpoint, "
                           "not SmolVLM (idefics3 or smolvlm)")
        # transformers' text default when the section is absent
        text_config = config.get("text_config") or {"rms_norm_eps": 1e-5}
        if text_config.get("model_type", "llama") != "llama":
            raise VLMError(f"unsupported SmolVLM text model {text_config.get('model_type')!r} "
                           "(expected llama)")
        scaling = text_config.get("rope_scaling") or text_config.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise VLMError(f"unsupported RoPE scaling {scaling} in {folder / 'config.json'}")
        text = from_dict(TextConfig, text_config)
        text.rope_theta = rope_theta(text_config)
        text.num_key_value_heads = text.num_key_value_heads or text.num_attention_heads
        text.head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
        vision = from_dict(VisionConfig, config.get("vision_config"))
        return Config(vision, text, config["model_type"], config.get("scale_factor", 2),
                      config.get("image_token_id", 128257))


# ------------------------------------------------------------ vision tower: SigLIP

class VisionEmbeddings(nn.Module):
    """Patch embedding plus learned positions. Idefics2 (arXiv:2405.02246) adapted SigLIP to tiles
    of any size the NaViT way (arXiv:2307.06304): a tile of h x w real patches takes positions from
    a grid stretched over the n x n trained ones, by bucketing each patch's fractional coordinate.
    For a full tile the position is row * n + col."""

    def __init__(self, c):
        super().__init__()
        self.grid_side = c.image_size // c.patch_size  # n: trained positions per side
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = Embedding(self.grid_side ** 2, c.hidden_size)

    def forward(self, pixels, patch_mask):
        """pixels (N, 3, H, W), patch_mask (N, h, w) bool, True on real patches -> (N, h*w, D)."""
        x = self.patch_embedding(pixels)  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, D)
        N, h, w = patch_mask.shape
        rows = self.grid_index(patch_mask[:, :, 0].sum(1), h)  # (N, h)
        cols = self.grid_index(patch_mask[:, 0, :].sum(1), w)  # (N, w)
        positions = rows[:, :, None] * self.grid_side + cols[:, None, :]  # (N, h, w)
        positions = positions.flatten(1)  # (N, h*w)
        positions = positions.masked_fill(~patch_mask.flatten(1), 0)  # padding patches: position 0
        return x + self.position_embedding(positions)

    def grid_index(self, count, size):
        """count (N,) real patches along an axis -> (N, size): each patch's row (or column) on the
        trained grid, from its fractional coordinate i / count."""
        spacing = 1 / self.grid_side
        boundaries = torch.arange(spacing, 1.0, spacing, device=count.device)  # (n - 1,)
        index = torch.arange(size, dtype=torch.float32, device=count.device)
        fraction = index[None] * (1.0 / count)[:, None]  # (N, size)
        return torch.bucketize(fraction.clamp(max=1 - 1e-6), boundaries, right=True)


class VisionAttention(nn.Module):
    """Multi-head self-attention over a tile's patches; padding patches are never keys."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        N, P, D = x.shape
        q = self.q_proj(x).view(N, P, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, P, Dh)
        k = self.k_proj(x).view(N, P, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, P, Dh)
        v = self.v_proj(x).view(N, P, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, P, Dh)
        y = attend(q, k, v, mask)  # (N, H, P, Dh)
        y = y.transpose(1, 2).reshape(N, P, D)  # (N, P, D)
        return self.out_proj(y)


class VisionMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    """A pre-LayerNorm ViT block (arXiv:2010.11929), as in SigLIP (arXiv:2303.15343)."""

    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c.hidden_size, c.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c.hidden_size, c.intermediate_size)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """Checkpoint keys `model.vision_model.*`. No pooling head: every patch feature is used."""

    def __init__(self, c):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels, patch_mask):
        x = self.embeddings(pixels, patch_mask)  # (N, P, D)
        mask = patch_mask.flatten(1)[:, None, None, :]  # (N, 1, 1, P): the real patches are keys
        if bool(mask.all()):
            mask = None  # no padding patch: SDPA's unmasked path
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


# ------------------------------------------------------------ connector: pixel shuffle

class Connector(nn.Module):
    """Pixel shuffle (space-to-depth) then a linear map: s^2 fewer tokens, each s^2 times wider
    (Idefics3)."""

    def __init__(self, cfg):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        dim_in = cfg.vision.hidden_size * self.scale_factor ** 2
        self.modality_projection = nn.Module()  # checkpoint key `modality_projection.proj.weight`
        self.modality_projection.proj = nn.Linear(dim_in, cfg.text.hidden_size, bias=False)

    def forward(self, x):
        N, P, D = x.shape
        s = self.scale_factor
        side = math.isqrt(P)  # patches per side of a tile
        # Token r * side/s + c holds the s x s block of patches (s*r + i, s*c + j), in the channel
        # order (i * s + j) * D + e: row-major blocks, row-major inside a block.
        x = x.view(N, side // s, s, side // s, s, D)  # (N, r, i, c, j, D)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (N, r, c, i, j, D)
        x = x.reshape(N, P // s ** 2, s * s * D)  # (N, P / s^2, s^2 D)
        return self.modality_projection.proj(x)  # (N, P / s^2, C)


# ------------------------------------------------------------ decoder: Llama (SmolLM2)

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
    """The Llama decoder (arXiv:2302.13971) of SmolLM2. Checkpoint keys `model.text_model.*`."""

    def __init__(self, c):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(i, c) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def forward(self, x, positions, mask, cache=None):
        """x (B, T, C) embeddings, positions (B, T) -> (B, T, C) normed hidden states."""
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # (B, 1, T, Dh) each
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


# ------------------------------------------------------------ the full model

class SmolVLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # the checkpoint nests the three parts under `model.`
        self.model.vision_model = VisionTransformer(cfg.vision)
        self.model.connector = Connector(cfg)
        self.model.text_model = Llama(cfg.text)
        # untied: SmolVLM checkpoints store their own lm_head.weight
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.stop = [2]  # end ids and padding: set from the checkpoint by load()
        self.pad_id = 2

    def image_features(self, pixel_values, pixel_attention_mask=None):
        """pixel_values (B, N, 3, H, W) -> features (tiles, P / s^2, C) of the real tiles, in order.
        A batch row with fewer tiles is padded with all-zero images, which are skipped (a real tile
        is never all zeros: pixel value 0 normalizes to -1)."""
        vision = self.model.vision_model
        dtype = vision.embeddings.patch_embedding.weight.dtype
        tiles = pixel_values.to(dtype).flatten(0, 1)  # (B*N, 3, H, W)
        real = tiles.flatten(1).ne(0).any(1)  # (B*N,)
        tiles = tiles[real]  # (tiles, 3, H, W)
        if pixel_attention_mask is None:  # every pixel is real
            pixel_attention_mask = torch.ones_like(pixel_values[:, :, 0], dtype=torch.bool)
        pixel_mask = pixel_attention_mask.flatten(0, 1)[real].bool()  # (tiles, H, W)
        patch_mask = self.patch_mask(pixel_mask)  # (tiles, h, w)
        # 2 tiles at a time: the same result, with activations for 2 tiles in memory instead of a
        # whole batch's (and ~20% faster on a CPU: small activations reuse freed memory instead of
        # page-faulting in fresh memory)
        features = []
        for start in range(0, len(tiles), 2):
            patches = vision(tiles[start:start + 2], patch_mask[start:start + 2])  # (2, P, D)
            features.append(self.model.connector(patches))  # (2, P / s^2, C)
        return torch.cat(features)

    def patch_mask(self, pixel_mask):
        """(N, H, W) bool, True on real pixels -> (N, h, w), True where any pixel is real."""
        p = self.cfg.vision.patch_size
        N, H, W = pixel_mask.shape
        h, w = H // p, W // p  # whole patches (the patch convolution drops a partial edge)
        blocks = pixel_mask[:, :h * p, :w * p].reshape(N, h, p, w, p)  # (N, h, p, w, p)
        return blocks.any(4).any(2)  # (N, h, w)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                labels=None, cache=None, last_only=False):
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only; with `labels` (B, T)
        (logits, loss). attention_mask (B, S) covers the cached tokens and the new ones. cache and
        last_only serve generate()'s prefill (its decode steps run decode_step)."""
        B, T = input_ids.shape
        if attention_mask is None:  # every token is real, the cached ones too
            n_cached = cache.len if cache is not None else 0
            attention_mask = torch.ones(B, n_cached + T, dtype=torch.bool, device=input_ids.device)
        keys = attention_mask.bool()  # (B, S): False on left padding
        # counted from each row's first real token: left pads change nothing
        positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        x = self.model.text_model.embed_tokens(input_ids)  # (B, T, C)
        if pixel_values is not None:
            x = self.merge_images(x, input_ids, pixel_values, pixel_attention_mask)
        mask = make_mask(keys, T)
        x = self.model.text_model(x, positions, mask, cache)  # (B, T, C)
        if cache is not None:
            cache.len += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C): only the last position picks the next token
        logits = self.lm_head(x)  # (B, T, V)
        if labels is None:
            return logits
        return logits, next_token_loss(logits, labels)

    def merge_images(self, x, input_ids, pixel_values, pixel_attention_mask):
        """x (B, T, C) with the embedding of each image token replaced by the next image feature."""
        features = self.image_features(pixel_values, pixel_attention_mask)  # (tiles, P / s^2, C)
        features = features.flatten(0, 1)  # (image tokens, C)
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        n_image_tokens = int(is_image.sum())
        if n_image_tokens != features.shape[0]:
            raise VLMError(f"the prompt has {n_image_tokens} image tokens but the images give "
                           f"{features.shape[0]} features")
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def decode_step(self, token, positions, keys, cache):
        """One decode step of generate(), eager or compiled (compiled=True compiles this method):
        token (B, 1) at `positions` (B, 1) -> fp32 logits (B, 1, V). Its key and value go to slot
        cache.slot (1,), and it attends to the filled slots of the real tokens `keys` (B, max_len)
        of the whole run: every step has the same shapes, and the cache's length is the one size
        that changes from run to run (compiled.compile_step)."""
        filled = torch.arange(keys.shape[1], device=keys.device) <= cache.slot  # (max_len,)
        mask = (keys & filled)[:, None, None]  # (B, 1, 1, max_len)
        x = self.model.text_model.embed_tokens(token)  # (B, 1, C)
        x = self.model.text_model(x, positions, mask, cache)  # (B, 1, C)
        # fp32 out: rounded inside the compiled program, and an fp32 argmax is ~2.5x a bf16 one
        return self.lm_head(x).float()  # (B, 1, V)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                 labels=None, max_new_tokens=100, temperature=0.0, top_k=None, top_p=None,
                 seed=None, stream=None, compiled=False):
        """Prefill once (the images and frames are encoded here only), then decode_step for each
        new token. compiled=True: the step through torch.compile (compiled.py: one to two minutes
        for each model and weights in a process; README "What holds on which CPU"). Returns only
        the new ids (B, n). labels (a processor's, with a suffix) are taken, as transformers does,
        and ignored."""
        check_args(max_new_tokens, temperature, top_k, top_p)  # before the prefill's work
        B, T = input_ids.shape
        text = self.cfg.text
        check_context(T, max_new_tokens, text.max_position_embeddings)
        device = input_ids.device
        max_len = T + max_new_tokens
        cache = KVCache(text.num_hidden_layers, B, text.num_key_value_heads, max_len, text.head_dim,
                        self.model.text_model.embed_tokens.weight.dtype, device)
        # the attention mask of the whole run, made once: generated tokens are real keys
        keys = torch.ones(B, max_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            keys[:, :T] = attention_mask
        last_position = keys[:, :T].sum(-1, keepdim=True) - 1  # (B, 1): of the last prompt token
        decode = self.decode_step
        if compiled:  # checked before the prefill's work; a tool, imported only for this option
            from compiled import compile_step
            decode = compile_step(self, "decode_step", keys, cache)
        logits = self(input_ids, keys[:, :T], pixel_values, pixel_attention_mask, cache=cache,
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

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL codes in the configs
MAX_IMAGE_SIZE = 4096  # transformers' cap on the longest edge
# transformers swaps in this template when a message holds a video: the hub one has no video branch.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # in tokenizer_config.json


def number_words(n):
    """An English cardinal as the num2words package writes it (64 -> sixty-four, 101 -> one hundred
    and one)."""
    if n >= 1000:
        raise VLMError(f"{n} video frames are too many")
    if n < 20:
        return WORDS[n]
    if n < 100:
        return TENS[n // 10] + (f"-{WORDS[n % 10]}" if n % 10 else "")
    return f"{WORDS[n // 100]} hundred" + (f" and {number_words(n % 100)}" if n % 100 else "")


def longest_edge_size(h, w, edge):
    """(h, w) scaled so the long side is `edge` (capped at 4096; small images are scaled up too) and
    the short side keeps the aspect ratio, rounded down, then up to an even number: transformers'
    rule."""
    edge = min(edge, MAX_IMAGE_SIZE)
    aspect = w / h
    if w >= h:
        new_w = edge
        new_h = int(edge / aspect)
        new_h += new_h % 2
    else:
        new_h = edge
        new_w = int(edge * aspect)
        new_w += new_w % 2
    return max(new_h, 1), max(new_w, 1)


def rows_of_images(images, counts):
    """A flat list of images split into prompt rows by each prompt's placeholder count. Images
    beyond the placeholders form one more row, which the caller's count check then refuses."""
    rows = []
    for count in counts:
        rows.append(images[:count])
        images = images[count:]
    if images:
        rows.append(images)
    return rows


class Processor:
    """Text, images and videos -> model inputs, exactly as transformers' Idefics3Processor
    (SmolVLM 1) and SmolVLMProcessor (SmolVLM2) with the torchvision backend. Each image becomes
    row-major tiles plus a global view (rows x cols blocks of
    `<fake_token_around_image><row_i_col_j><image> x image_seq_len`, then the global block); each
    video frame one global block after its timestamp."""

    def __init__(self, folder, cfg):
        self.tokenizer = open_tokenizer(folder)
        tokenizer_config = optional_json(folder / "tokenizer_config.json")
        # the variables a chat template sees, as transformers passes them
        self.special = {key: token_text(tokenizer_config[key]) for key in SPECIAL_TOKENS
                        if tokenizer_config.get(key)}
        extra = tokenizer_config.get("extra_special_tokens")
        if cfg.model_type == "smolvlm" and isinstance(extra, dict):
            self.special.update(extra)  # SmolVLM2 names its image tokens here
        self.image_token = self.special.get("image_token", "<image>")
        self.fake_image_token = self.special.get("fake_image_token", "<fake_token_around_image>")
        # plain text in SmolVLM-Instruct (2.2B), a special token in the others
        self.global_image_token = self.special.get("global_image_token", "<global-img>")
        self.video_token = "<video>"

        processor_config = optional_json(folder / "processor_config.json")
        v = cfg.vision  # tokens per tile, when processor_config.json does not say
        tokens_per_tile = (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2
        self.image_seq_len = processor_config.get("image_seq_len", tokens_per_tile)
        # transformers 5.x nests the image processor in processor_config.json
        image_config = (processor_config.get("image_processor")
                        or read_json(folder / "preprocessor_config.json"))
        for statistic in ("image_mean", "image_std"):  # normalize() hard-codes 0.5
            if image_config.get(statistic, [0.5] * 3) != [0.5] * 3:
                raise VLMError(f"unsupported image_mean/image_std in {folder} "
                               "(SmolVLM normalizes with 0.5)")
        self.edge = None  # the long side is resized to this, unless do_resize is off
        if image_config.get("do_resize", True):
            self.edge = image_config.get("size", {}).get("longest_edge", 4 * 364)
        self.tile = image_config.get("max_image_size", {}).get("longest_edge", 364)
        self.split = image_config.get("do_image_splitting", True)
        self.mode = RESAMPLE[image_config.get("resample", 1)]
        self.video = self.video_settings(folder, cfg, processor_config, image_config)
        self.chat_template = find_chat_template(folder, processor_config)

        self.pad_id = self.tokenizer.token_to_id(self.special.get("pad_token", "<|im_end|>"))
        # the last token of an answer, learned in training
        self.end_of_turn = self.special.get("end_of_utterance_token", "<end_of_utterance>")
        end_tokens = [self.end_of_turn, self.special.get("eos_token", self.end_of_turn)]
        end_ids = [self.tokenizer.token_to_id(token) for token in end_tokens]
        # with config.json's and generation_config.json's (stop_ids drops a token not in the vocab)
        self.stop = stop_ids(folder, *end_ids)

    @staticmethod
    def video_settings(folder, cfg, processor_config, image_config):
        """SmolVLM2's video sampling and sizes; None for SmolVLM 1. transformers reads the video
        processor from processor_config.json, else video_preprocessor_config.json, else
        preprocessor_config.json, where the image `size` replaces video_sampling's video_size (its
        code does so whenever both are present)."""
        video_config = (processor_config.get("video_processor")
                        or optional_json(folder / "video_preprocessor_config.json") or image_config)
        sampling = video_config.get("video_sampling")
        if cfg.model_type != "smolvlm" or not sampling:
            return None
        size = video_config.get("size") or sampling["video_size"]
        tile = video_config.get("max_image_size", {}).get("longest_edge", 364)
        mode = RESAMPLE[video_config.get("resample", 1)]
        return dict(fps=sampling["fps"], max_frames=sampling["max_frames"],
                    edge=size["longest_edge"], tile=tile, mode=mode)

    # --- images

    def image_tiles(self, img, split=True):
        """One image -> uint8 tiles (n, 3, M, M) (rows x cols row-major, then the global view) and
        rows, cols (0, 0 when the image is one view)."""
        M = self.tile
        x = image_tensor(img)[None]  # (1, 3, h, w) uint8
        if self.edge:  # the long side to size.longest_edge
            x = resize(x, longest_edge_size(*x.shape[-2:], self.edge), self.mode)
        if not split:  # one M x M view
            return resize(x, (M, M), self.mode), 0, 0
        h, w = x.shape[-2:]  # both sides up to multiples of M, the short one following the long one
        if w >= h:
            W = math.ceil(w / M) * M
            H = math.ceil(int(W / (w / h)) / M) * M
        else:
            H = math.ceil(h / M) * M
            W = math.ceil(int(H * (w / h)) / M) * M
        x = resize(x, (H, W), self.mode)  # (1, 3, H, W)
        if H <= M and W <= M:
            return x, 0, 0
        rows, cols = H // M, W // M
        tiles = x[0].view(3, rows, M, cols, M).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, M, M)
        tiles = tiles.reshape(rows * cols, 3, M, M)
        global_view = resize(x, (M, M), self.mode)  # (1, 3, M, M)
        return torch.cat([tiles, global_view]), rows, cols

    def image_prompt(self, rows, cols):
        """The text an image stands for: a rows x cols grid of tile blocks, then the global view's
        block."""
        fake = self.fake_image_token
        image = self.image_token * self.image_seq_len
        whole = f"{fake}{self.global_image_token}{image}{fake}"
        if rows == 0:
            return whole
        grid = ""
        for r in range(rows):
            for c in range(cols):
                grid += f"{fake}<row_{r + 1}_col_{c + 1}>{image}"
            grid += "\n"
        return f"{grid}\n{whole}"  # the last row's "\n" and this one make the single token "\n\n"

    # --- video (SmolVLM2)

    def sample_frames(self, total, fps, duration, max_frames=None):
        """transformers' SmolVLM sampling: video_sampling.fps frames a second, at most max_frames,
        evenly spaced, skipping the first and last second of a video long enough to need fewer
        frames than that."""
        max_frames = max_frames or self.video["max_frames"]
        rate = self.video["fps"]
        n_frames = max(min(int(round(rate * duration)), max_frames), 1)
        start, end = 0, total - 1
        if duration - 2 > max_frames * rate:
            start, end = int(fps), int(total - fps)
        start = max(0, start)
        end = min(end, total - 1)
        if start >= end:
            start, end = 0, total - 1
        return np.unique(np.linspace(start, end, n_frames, dtype=int)).tolist()

    def video_frames(self, video, metadata=None, sample=None, max_frames=None):
        """A path (decoded with PyAV, sampled unless sample=False) or decoded frames (N, H, W, 3) or
        (N, 3, H, W) uint8 with optional metadata (sampled only if sample=True) -> uint8
        (n, 3, M, M) and the metadata."""

        def pick(total, fps):  # a file's frames to decode (only those); duration = frames / fps
            if sample is False:
                return range(total)
            return self.sample_frames(total, fps, total / fps, max_frames)

        if isinstance(video, (str, Path)):
            frames, meta = read_video(video, pick)
        else:
            frames, meta = self.decoded_video(video, metadata, sample, max_frames)
        # two resizes: the long side to `edge`, then a square tile (videos are not split)
        settings = self.video
        size = longest_edge_size(*frames.shape[-2:], settings["edge"])
        frames = resize(frames, size, settings["mode"])
        return resize(frames, (settings["tile"], settings["tile"]), settings["mode"]), meta

    def decoded_video(self, video, metadata, sample, max_frames):
        """Frames given as an array -> uint8 (N, 3, H, W), sampled only when asked (which needs the
        fps in the metadata), and the metadata with the indices of the frames kept."""
        frames = torch.as_tensor(np.asarray(video))
        if frames.shape[-1] == 3:
            frames = frames.permute(0, 3, 1, 2)  # (N, 3, H, W)
        meta = dict(metadata or {"total_num_frames": len(frames), "fps": None, "duration": None})
        if sample:
            if not meta.get("fps"):
                raise VLMError("sampling video frames needs video_metadata with the fps")
            total, fps = meta["total_num_frames"], meta["fps"]
            duration = meta.get("duration") or total / fps
            meta["frames_indices"] = self.sample_frames(total, fps, duration, max_frames)
            frames = frames[meta["frames_indices"]]
        if meta.get("frames_indices") is None:
            meta["frames_indices"] = list(range(len(frames)))
        return frames, meta

    def video_prompt(self, n_frames, meta):
        fps = meta.get("fps") or 24  # transformers' fallback when the frame rate is unknown
        times = [i / fps for i in meta["frames_indices"]]
        if meta.get("duration") is not None:
            seconds = int(meta["duration"])
        else:
            seconds = int(times[-1])
        length = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        text = (f"You are provided the following series of {number_words(n_frames)} frames from a "
                f"{length} [H:MM:SS] video.\n")
        frame = self.image_prompt(0, 0)  # a frame is one global view
        for t in times:
            text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:{frame}"
        return text + "\n\n"

    # --- the whole input

    def image_inputs(self, text, images, split):
        """-> per row the list of its images' uint8 tiles, and {<image>: the prompt block of each
        image, in order}."""
        counts = [prompt.count(self.image_token) for prompt in text]
        if self.video and any(self.video_token in prompt for prompt in text):
            raise VLMError(f"the prompts have {self.video_token} placeholders but no videos were "
                           "given")
        if images is None:
            if any(counts):
                raise VLMError(f"the prompts have {sum(counts)} {self.image_token} placeholders "
                               "but no images were given")
            return [], {self.image_token: []}
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not any(isinstance(row, (list, tuple)) for row in images):
            images = rows_of_images(images, counts)
        given = [len(row) for row in images]
        if given != counts:
            raise VLMError(f"the prompts have {counts} {self.image_token} placeholders but {given} "
                           "images were given (per prompt)")
        tiles = []  # per row, per image: uint8 (n, 3, M, M)
        blocks = []  # per image, in order: the text it stands for
        for row in images:
            tiles.append([])
            for image in row:
                image_tiles, rows, cols = self.image_tiles(image, split)
                tiles[-1].append(image_tiles)
                blocks.append(self.image_prompt(rows, cols))
        return tiles, {self.image_token: blocks}

    def video_inputs(self, text, videos, metadata, sample, max_frames):
        """-> per video its uint8 frames (transformers batches videos, not rows), and {<video>: each
        one's prompt block}."""
        if not self.video:
            raise VLMError("this SmolVLM 1 checkpoint does not take videos "
                           "(SmolVLM2 checkpoints do)")
        if not isinstance(videos, (list, tuple)):
            videos = [videos]
        n_placeholders = sum(prompt.count(self.video_token) for prompt in text)
        if n_placeholders != len(videos):
            raise VLMError(f"the prompts have {n_placeholders} {self.video_token} placeholders but "
                           f"{len(videos)} videos were given")
        metas = metadata  # one for all, or one per video
        if not isinstance(metas, (list, tuple)):
            metas = [metadata] * len(videos)
        # per video: uint8 frames and the metadata of those kept
        decoded = [self.video_frames(video, meta, sample, max_frames)
                   for video, meta in zip(videos, metas)]
        # every prompt states the padded frame count, as transformers' do
        n_frames = max(len(frames) for frames, _ in decoded)
        blocks = [self.video_prompt(n_frames, meta) for _, meta in decoded]
        return [[frames] for frames, _ in decoded], {self.video_token: blocks}  # a row per video

    def __call__(self, text=None, images=None, videos=None, video_metadata=None,
                 do_sample_frames=None, num_frames=None, do_image_splitting=None, suffix=None):
        """text: a string or a list (one per batch row) with one `<image>` per image (`<video>` per
        video); images: per row a list of PIL images, arrays or paths (a flat list is split by the
        placeholder counts); videos: per video a path or decoded frames (then `video_metadata`, and
        `do_sample_frames=True` to sample as transformers' chat-template path does; paths are
        sampled by default). Left padding. `num_frames` and `do_image_splitting` override the
        checkpoint's max_frames and do_image_splitting. `suffix`: per row the answer to train on
        (training_data.prompt_and_answer), appended to the prompt; it adds `labels`, -100 except
        on it."""
        if text is None:
            raise VLMError("a text prompt is required")
        text = [text] if isinstance(text, str) else list(text)
        if images is not None and videos is not None:  # both fill pixel_values in transformers
            raise VLMError("give images or videos in one call, not both")
        if videos is not None:
            pixels, blocks = self.video_inputs(text, videos, video_metadata, do_sample_frames,
                                               num_frames)
        else:
            split = self.split if do_image_splitting is None else do_image_splitting
            pixels, blocks = self.image_inputs(text, images, split)
        text = expand_placeholders(text, blocks)
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(text)]
        out = text_inputs(self.tokenizer, ids, self.pad_id, suffix)
        if any(pixels):
            out.update(self.pad_pixels(pixels, videos is not None))
        return out

    def pad_pixels(self, rows, is_video):
        """Per row a list of uint8 (n, 3, h, w) -> pixel_values (B, N, 3, H, W) float32 zero-padded
        to the most tiles, pixel_attention_mask (B, N, H, W) int64, 1 on real pixels (and, as in
        transformers, on the padding frames of a video)."""
        no_tiles = torch.zeros(0, 3, 1, 1, dtype=torch.uint8)  # a prompt without images
        tiles = [torch.cat(row) if row else no_tiles for row in rows]
        N = max(len(t) for t in tiles)
        H = max(t.shape[-2] for t in tiles)
        W = max(t.shape[-1] for t in tiles)
        pixel_values = torch.zeros(len(rows), N, 3, H, W)
        pixel_mask = torch.zeros(len(rows), N, H, W, dtype=torch.long)
        for b, row_tiles in enumerate(tiles):
            n, _, h, w = row_tiles.shape
            pixel_values[b, :n, :, :h, :w] = normalize(row_tiles)
            n_marked = N if is_video else n
            pixel_mask[b, :n_marked, :h, :w] = 1
        return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_mask}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """The conversation rendered with the checkpoint's chat template (SmolVLM2 switches to its
        video template when a message holds a video, as transformers does) -> the prompt string."""
        parts = [part for message in messages for part in (message.get("content") or [])]
        has_video = any(isinstance(part, dict) and part.get("type") == "video" for part in parts)
        template = self.chat_template
        if has_video and self.video:
            template = VIDEO_CHAT_TEMPLATE
        if template is None:
            raise VLMError("this checkpoint has no chat template: pass a raw prompt (--raw)")
        return render_template(template, messages, add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **self.special)

    def decode(self, ids):
        """Text of generated ids, up to the first end token, special tokens skipped."""
        return decode_ids(self.tokenizer, ids, self.stop)


# ------------------------------------------------------------ loading

def hub_name(key):
    """Our module paths are the hub's; a stray computed buffer some exports carry is skipped."""
    if key.endswith(("position_ids", "rotary_emb.inv_freq")):
        return None
    return key


def load(model=DEFAULT_MODEL, device=None, dtype=None, quantize=None):
    """A SmolVLM or SmolVLM2 checkpoint (hub repo id or local directory) -> (model, processor).
    quantize: None, "int8" or "int4" decoder weights (quantize.py)."""
    folder = resolve(model)
    cfg = Config.from_folder(folder)
    processor = Processor(folder, cfg)
    prepare = None
    if quantize:  # a tool, imported only for this option
        from quantize import quantizer
        prepare = quantizer(quantize)
    smolvlm = load_weights(partial(SmolVLM, cfg), folder, hub_name, device, dtype, prepare)
    smolvlm.stop = processor.stop  # the checkpoint's end ids
    smolvlm.pad_id = processor.pad_id
    return smolvlm, processor


# ------------------------------------------------------------ command line

def cli_prompt(processor, args, n_images):
    """--prompt as a user turn of the chat template with a placeholder per image or video
    (command_line.user_turn); with --raw, as typed, the placeholders put first if it has none."""
    from command_line import user_turn
    n_videos = int(bool(args.video))  # the command line takes one --video
    n_media = n_images + n_videos
    token = processor.video_token if n_videos else processor.image_token
    if args.raw and n_media and token not in args.prompt:
        return token * n_media + args.prompt
    return user_turn(processor, args, n_images, n_videos)


def parse_args(argv=None):
    """The command line's arguments, checked before anything slow (one line, exit code 1; the
    --video and --num-frames checks are command_line.check_flags')."""
    from command_line import check_flags, cli_parser
    parser = cli_parser("Describe images and videos, or answer questions about them, with "
                        "SmolVLM / SmolVLM2.", DEFAULT_MODEL)
    parser.add_argument("--video", help="a video file (SmolVLM2), decoded with PyAV")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="at most this many video frames (default: the checkpoint's)")
    parser.add_argument("--raw", action="store_true",
                        help="pass --prompt as is, not wrapped in the chat template (an <image> "
                             "per image is put first if it has none)")
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def batch_answerer(args):
    """--batch's answerer (batch_runner.Answerer; Ray's DatasetAnswerer uses it too): each image
    with --prompt in the chat template. A prompt that would fail every image fails before the
    load."""
    from batch_runner import Answerer, check_prompt
    folder = resolve(args.model)
    cfg = Config.from_folder(folder)
    processor = Processor(folder, cfg)
    prompt = cli_prompt(processor, args, 1)  # one image per prompt

    def make_inputs(images):
        return processor(text=[prompt] * len(images), images=[[image] for image in images])

    check_prompt(make_inputs, processor.tokenizer, cfg.text.max_position_embeddings, args)
    model, processor = load(str(folder), args.device, args.dtype, args.quantize)
    return Answerer(model, processor.decode, make_inputs, model.model.vision_model, args)


def main(argv=None):
    from command_line import stream_answer, timed_load
    args = parse_args(argv)
    if args.batch:
        from batch_runner import Batch
        Batch(args).run(batch_answerer)  # the images are found before the slow load
        return
    images = [open_image(path) for path in args.image]  # fail on a bad image before the slow load
    folder = resolve(args.model)
    processor = Processor(folder, Config.from_folder(folder))
    prompt = cli_prompt(processor, args, len(images))
    image_rows = [images] if images else None
    videos = [args.video] if args.video else None
    # a bad video fails here, before the slow load
    inputs = processor(text=[prompt], images=image_rows, videos=videos, num_frames=args.num_frames)
    model, processor, load_seconds = timed_load(load, str(folder), args)
    stream_answer(model, processor, inputs, args, load_seconds, model.model.vision_model)


if __name__ == "__main__":
    from command_line import run_cli
    run_cli(main)
