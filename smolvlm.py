"""SmolVLM 1 and SmolVLM2 in one file of plain PyTorch, loading the Hugging Face Hub checkpoints as they are.

SmolVLM (arXiv:2504.05299; the Idefics3 design, arXiv:2408.12637) cuts an image into square tiles plus one
downscaled copy of the whole image, encodes each tile with a SigLIP vision transformer, folds every s x s block of
patch features into one token ("pixel shuffle"), projects those tokens into a SmolLM2 (Llama) decoder and writes
the answer. SmolVLM2 adds video: sampled frames, each one tile, introduced by their timestamps. Read top to
bottom: config, vision tower, connector, decoder, the full model, preprocessing, loading, generation, command line.

    python smolvlm.py --image cat.jpg --prompt "Describe this image."
    python smolvlm.py --video clip.mp4 --prompt "What happens in this video?"

Shapes: B batch, T tokens, N images (tiles or frames) per row, P patches per tile, D/C vision/text width.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (GatedMLP, KVCache, SelfAttention, Streamer, VLMError, attend, check_args, cli_parser, from_dict,
                    generate, image_tensor, linear, load_weights, make_mask, normalize, open_image, read_json, read_video,
                    resize, resolve, rope_cos_sin, rope_inv_freq, rope_theta, run_cli, stop_ids)

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"  # 256M parameters: fine on a laptop CPU


# ----------------------------------------------------------------------------- config

@dataclass
class VisionConfig:
    """SigLIP as Idefics3/SmolVLM configure it. The defaults are transformers': SmolVLM2's config.json leaves
    out num_hidden_layers and intermediate_size and relies on 12 and 3072."""
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
        c = read_json(folder / "config.json")
        if c.get("model_type") not in ("idefics3", "smolvlm"):
            raise VLMError(f"{folder} holds a {c.get('model_type', 'unknown')!r} checkpoint, not SmolVLM (idefics3 or smolvlm)")
        t = c.get("text_config") or {"rms_norm_eps": 1e-5}  # transformers' text default when the section is absent
        if t.get("model_type", "llama") != "llama":
            raise VLMError(f"unsupported SmolVLM text model {t.get('model_type')!r} (expected llama)")
        scaling = t.get("rope_scaling") or t.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise VLMError(f"unsupported RoPE scaling {scaling} in {folder / 'config.json'}")
        text = from_dict(TextConfig, t)
        text.rope_theta = rope_theta(t)
        text.num_key_value_heads = text.num_key_value_heads or text.num_attention_heads
        text.head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
        return Config(from_dict(VisionConfig, c.get("vision_config")), text, c["model_type"],
                      c.get("scale_factor", 2), c.get("image_token_id", 128257))


# ----------------------------------------------------------------------------- vision tower: SigLIP, any tile size

class VisionEmbeddings(nn.Module):
    """Patch embedding plus learned positions. Idefics2 (arXiv:2405.02246) adapted SigLIP to tiles of any size
    the NaViT way (arXiv:2307.06304): a tile of h x w real patches takes positions from a grid stretched over
    the n x n trained ones, by bucketing each patch's fractional coordinate. For a full tile it is row * n + col."""

    def __init__(self, c):
        super().__init__()
        self.n = c.image_size // c.patch_size  # trained positions per side
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(self.n ** 2, c.hidden_size)

    def forward(self, pixels, patch_mask):  # (N, 3, H, W), (N, h, w) bool -> (N, h*w, D)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        bounds = torch.arange(1 / self.n, 1.0, 1 / self.n, device=x.device)

        def buckets(count, size):  # count (N,) real patches along an axis -> (N, size) trained-grid index
            frac = torch.arange(size, dtype=torch.float32, device=x.device)[None] * (1.0 / count)[:, None]
            return torch.bucketize(frac.clamp(max=1 - 1e-6), bounds, right=True)

        N, h, w = patch_mask.shape
        rows, cols = buckets(patch_mask[:, :, 0].sum(1), h), buckets(patch_mask[:, 0, :].sum(1), w)
        pos = (rows[:, :, None] * self.n + cols[:, None, :]).flatten(1).masked_fill(~patch_mask.flatten(1), 0)
        return x + self.position_embedding(pos)


class VisionAttention(nn.Module):  # multi-head self-attention over a tile's patches; padding patches are no keys
    def __init__(self, dim, n_heads):
        super().__init__()
        self.H = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask):
        N, P, D = x.shape
        q, k, v = (proj(x).view(N, P, self.H, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v, mask).transpose(1, 2).reshape(N, P, D))


class VisionMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

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
        x = self.embeddings(pixels, patch_mask)
        keys = patch_mask.flatten(1)[:, None, None, :]  # (N, 1, 1, P): every patch attends to the real ones
        mask = None if bool(keys.all()) else keys
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.post_layernorm(x)


# ----------------------------------------------------------------------------- connector: pixel shuffle + projection

class Projection(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)


class Connector(nn.Module):
    """Pixel shuffle (space-to-depth) then a linear map: s^2 fewer tokens, each s^2 times wider (Idefics3)."""

    def __init__(self, cfg):
        super().__init__()
        self.s = cfg.scale_factor
        self.modality_projection = Projection(cfg.vision.hidden_size * self.s ** 2, cfg.text.hidden_size)

    def forward(self, x):  # (N, P, D) with P = side^2 -> (N, P / s^2, C)
        N, P, D = x.shape
        side, s = math.isqrt(P), self.s
        # Token r * side/s + c holds the s x s block of patches (s*r + i, s*c + j), in the channel order
        # (i * s + j) * D + e: row-major blocks, row-major inside a block.
        x = x.view(N, side // s, s, side // s, s, D).permute(0, 1, 3, 2, 4, 5).reshape(N, P // s ** 2, s * s * D)
        return self.modality_projection.proj(x)


# ----------------------------------------------------------------------------- decoder: Llama (SmolLM2)

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
    """The Llama decoder (arXiv:2302.13971) of SmolLM2, with grouped-query attention. Checkpoint keys
    `model.text_model.*`."""

    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(i, c) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)

    def forward(self, x, positions, mask, cache=None):  # x (B, T, C) embeddings, positions (B, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


# ----------------------------------------------------------------------------- the full model

class SmolVLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # the checkpoint nests the three parts under `model.`
        self.model.vision_model = VisionTransformer(cfg.vision)
        self.model.connector = Connector(cfg)
        self.model.text_model = Llama(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)  # untied: its own weights
        self.stop, self.pad_id = [2], 2  # set from the checkpoint by load()

    def image_features(self, pixel_values, pixel_attention_mask=None):
        """pixel_values (B, N, 3, H, W) -> features (tiles, P / s^2, C) of the real tiles, in order. A batch row with
        fewer tiles is padded with all-zero images, which are skipped (a real tile never is all zeros: 0 -> -1)."""
        vision = self.model.vision_model
        x = pixel_values.to(vision.embeddings.patch_embedding.weight.dtype).flatten(0, 1)
        real = x.flatten(1).ne(0).any(1)
        x = x[real]
        mask = torch.ones_like(x[:, 0], dtype=torch.bool) if pixel_attention_mask is None else \
            pixel_attention_mask.flatten(0, 1)[real].bool()
        p = self.cfg.vision.patch_size
        N, H, W = mask.shape
        patch_mask = mask[:, :H // p * p, :W // p * p].reshape(N, H // p, p, W // p, p).any(4).any(2)  # any real pixel
        # 2 tiles at a time: the same result, with activations for 2 tiles instead of all of a batch's in memory (and
        # ~20% faster on a CPU: small activations reuse freed memory instead of page-faulting in fresh memory)
        return torch.cat([self.model.connector(vision(x[i:i + 2], patch_mask[i:i + 2])) for i in range(0, N, 2)])

    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, positions=None,
                cache=None, last_only=False, **_):
        """input_ids (B, T) -> logits (B, T, V). attention_mask covers the cached tokens and the new ones (B, S)."""
        B, T = input_ids.shape
        S = T + (cache.len if cache is not None else 0)
        keys = torch.ones(B, S, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
        if positions is None:  # counted from each row's first real token, so left pads change nothing
            positions = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.model.text_model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.image_features(pixel_values, pixel_attention_mask).flatten(0, 1)
            is_image = input_ids == self.cfg.image_token_id
            if int(is_image.sum()) != feats.shape[0]:
                raise VLMError(f"the prompt has {int(is_image.sum())} image tokens but the images give {feats.shape[0]} features")
            x = x.masked_scatter(is_image[..., None], feats.to(x.dtype))
        x = self.model.text_model(x, positions, make_mask(keys, T), cache)
        if cache is not None:
            cache.len += T
        return linear(x[:, -1:] if last_only else x, self.lm_head.weight)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, max_new_tokens=100,
                 temperature=0.0, top_k=None, top_p=None, seed=None, stream=None, **_):
        """Prefill once (the images are encoded here only), then decode with the KV cache. Returns the new ids (B, n)."""
        B, T = input_ids.shape
        t = self.cfg.text
        if T + max_new_tokens > t.max_position_embeddings:
            raise VLMError(f"the prompt ({T} tokens) plus --max-new-tokens ({max_new_tokens}) exceed the model's "
                           f"context of {t.max_position_embeddings} tokens")
        dev, dt = input_ids.device, self.lm_head.weight.dtype
        cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, T + max_new_tokens, t.head_dim, dt, dev)
        keys = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=dev)  # generated tokens are real keys
        if attention_mask is not None:
            keys[:, :T] = attention_mask
        last = keys[:, :T].sum(-1, keepdim=True) - 1  # (B, 1) position of the last prompt token
        logits = self(input_ids, keys[:, :T], pixel_values, pixel_attention_mask, cache=cache, last_only=True)[:, -1]

        def step(tok):
            S = cache.len + 1
            return self(tok[:, None], keys[:, :S], positions=last + (S - T), cache=cache, last_only=True)[:, -1]

        return generate(step, logits, max_new_tokens, self.stop, self.pad_id, temperature, top_k, top_p, seed, stream)


# ----------------------------------------------------------------------------- preprocessing

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL resample codes in the processor configs
MAX_IMAGE_SIZE = 4096  # transformers' cap on the longest edge
# transformers swaps in this template when a message holds a video: the hub one has no video branch.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n):
    """An English cardinal as the num2words package writes it (64 -> sixty-four, 101 -> one hundred and one)."""
    if n >= 1000:
        raise VLMError(f"{n} video frames are too many")
    if n < 20:
        return WORDS[n]
    if n < 100:
        return TENS[n // 10] + (f"-{WORDS[n % 10]}" if n % 10 else "")
    return f"{WORDS[n // 100]} hundred" + (f" and {number_words(n % 100)}" if n % 100 else "")


def longest_edge_size(h, w, edge):
    """(h, w) scaled so the long side is `edge` (capped at 4096; small images are scaled up too) and the short
    side keeps the aspect ratio, rounded down, then up to an even number: transformers' rule."""
    edge = min(edge, MAX_IMAGE_SIZE)
    if w >= h:
        w, h = edge, int(edge / (w / h))
        h += h % 2
    else:
        h, w = edge, int(edge * (w / h))
        w += w % 2
    return max(h, 1), max(w, 1)


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


class Processor:
    """Text, images and videos -> model inputs, exactly as transformers' Idefics3Processor (SmolVLM 1) and
    SmolVLMProcessor (SmolVLM2) with the torchvision backend. Each image becomes row-major tiles plus a global
    view (rows x cols blocks of `<fake_token_around_image><row_i_col_j><image> x image_seq_len`, then the global
    block); each video frame one global block after its timestamp."""

    def __init__(self, folder, cfg):
        from tokenizers import Tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise VLMError(f"{folder / 'tokenizer.json'} cannot be read ({e})") from None
        tc = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        named = {k: tc[k]["content"] if isinstance(tc[k], dict) else str(tc[k])  # a string or a saved AddedToken
                 for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc.get(k)}
        if cfg.model_type == "smolvlm" and isinstance(tc.get("extra_special_tokens"), dict):
            named.update(tc["extra_special_tokens"])  # SmolVLM2 names its image tokens here
        self.special = named  # the variables a chat template sees, as transformers passes them
        self.image_token, self.fake = named.get("image_token", "<image>"), named.get("fake_image_token", "<fake_token_around_image>")
        self.global_img = named.get("global_image_token", "<global-img>")  # plain text in SmolVLM-Instruct (2.2B)
        self.video_token = "<video>"
        pc = read_json(folder / "processor_config.json") if (folder / "processor_config.json").exists() else {}
        v = cfg.vision  # tokens per tile, when processor_config.json does not say
        self.image_seq_len = pc.get("image_seq_len", (v.image_size // v.patch_size) ** 2 // cfg.scale_factor ** 2)
        ip = pc.get("image_processor") or read_json(folder / "preprocessor_config.json")  # 5.x nests it
        if ip.get("image_mean", [0.5] * 3) != [0.5] * 3 or ip.get("image_std", [0.5] * 3) != [0.5] * 3:
            raise VLMError(f"unsupported image_mean/image_std in {folder} (SmolVLM normalizes with 0.5)")
        self.edge = ip.get("size", {}).get("longest_edge", 4 * 364) if ip.get("do_resize", True) else None
        self.tile = ip.get("max_image_size", {}).get("longest_edge", 364)
        self.split, self.mode = ip.get("do_image_splitting", True), RESAMPLE[ip.get("resample", 1)]
        # Video (SmolVLM2): transformers reads the video processor from processor_config.json, else
        # video_preprocessor_config.json, else preprocessor_config.json, where the image `size` replaces
        # video_sampling's video_size (its code does so whenever both are present).
        vfile = folder / "video_preprocessor_config.json"
        vp = pc.get("video_processor") or (read_json(vfile) if vfile.exists() else ip)
        vs = vp.get("video_sampling") if cfg.model_type == "smolvlm" else None
        self.video = vs and dict(fps=vs["fps"], max_frames=vs["max_frames"],
                                 edge=(vp.get("size") or vs["video_size"])["longest_edge"],
                                 tile=vp.get("max_image_size", {}).get("longest_edge", 364), mode=RESAMPLE[vp.get("resample", 1)])
        self.chat_template = pc.get("chat_template")
        for name in ("chat_template.json", "chat_template.jinja"):
            if self.chat_template is None and (folder / name).exists():
                self.chat_template = read_json(folder / name)["chat_template"] if name.endswith("json") else \
                    (folder / name).read_text(encoding="utf-8")
        self.pad_id = self.tokenizer.token_to_id(named.get("pad_token", "<|im_end|>"))
        eou = named.get("end_of_utterance_token", "<end_of_utterance>")
        self.stop = sorted({self.tokenizer.token_to_id(t) for t in (eou, named.get("eos_token", eou))} - {None})

    # --- images

    def image_tiles(self, img, split=True):
        """One image -> uint8 tiles (n, 3, M, M) (rows x cols row-major, then the global view) and rows, cols."""
        x, M = image_tensor(img)[None], self.tile
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
        x = resize(x, (H, W), self.mode)
        if H <= M and W <= M:
            return x, 0, 0
        tiles = x.view(3, H // M, M, W // M, M).permute(1, 3, 0, 2, 4).reshape(-1, 3, M, M)
        return torch.cat([tiles, resize(x, (M, M), self.mode)]), H // M, W // M

    def image_prompt(self, rows, cols):
        """The text an image stands for: a rows x cols grid of tile blocks, then the global view's block."""
        image = self.image_token * self.image_seq_len
        whole = f"{self.fake}{self.global_img}{image}{self.fake}"
        if rows == 0:
            return whole
        grid = "".join("".join(f"{self.fake}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return f"{grid}\n{whole}"  # the last row's "\n" and this one make the single token "\n\n"

    # --- video (SmolVLM2)

    def sample_frames(self, total, fps, duration, max_frames=None):
        """transformers' SmolVLM sampling: video_sampling.fps frames a second, at most max_frames, evenly spaced,
        skipping the first and last second of a video long enough to need fewer frames than that."""
        max_frames, rate = max_frames or self.video["max_frames"], self.video["fps"]
        n = max(min(int(round(rate * duration)), max_frames), 1)
        start, end = 0, total - 1
        if duration - 2 > max_frames * rate:
            start, end = int(fps), int(total - fps)
        start, end = max(0, start), min(end, total - 1)
        if start >= end:
            start, end = 0, total - 1
        return np.unique(np.linspace(start, end, n, dtype=int)).tolist()

    def video_frames(self, video, metadata=None, sample=None, max_frames=None):
        """A path (decoded with PyAV, sampled unless sample=False) or decoded frames (N, H, W, 3) / (N, 3, H, W)
        uint8 with optional metadata (sampled only if sample=True) -> uint8 (n, 3, M, M) and the metadata."""
        if isinstance(video, (str, Path)):  # only the sampled frames are decoded; duration = frames / fps
            frames, meta = read_video(video, lambda n, fps: range(n) if sample is False else
                                      self.sample_frames(n, fps, n / fps, max_frames))
        else:
            frames = torch.as_tensor(np.asarray(video))
            frames = frames.permute(0, 3, 1, 2) if frames.shape[-1] == 3 else frames
            meta = dict(metadata or {"total_num_frames": len(frames), "fps": None, "duration": None})
            if sample:
                if not meta.get("fps"):
                    raise VLMError("sampling video frames needs video_metadata with the fps")
                n, fps = meta["total_num_frames"], meta["fps"]
                meta["frames_indices"] = self.sample_frames(n, fps, meta.get("duration") or n / fps, max_frames)
                frames = frames[meta["frames_indices"]]
            if meta.get("frames_indices") is None:
                meta["frames_indices"] = list(range(len(frames)))
        v = self.video  # two resizes: the long side to `edge`, then a square tile (no splitting for video)
        x = resize(frames, longest_edge_size(*frames.shape[-2:], v["edge"]), v["mode"])
        return resize(x, (v["tile"], v["tile"]), v["mode"]), meta

    def video_prompt(self, n_frames, meta):
        fps = meta.get("fps") or 24  # transformers' fallback when the frame rate is unknown
        times = [i / fps for i in meta["frames_indices"]]
        d = int(meta["duration"]) if meta.get("duration") is not None else int(times[-1])
        text = (f"You are provided the following series of {number_words(n_frames)} frames from a "
                f"{d // 3600}:{d % 3600 // 60:02d}:{d % 60:02d} [H:MM:SS] video.\n")
        frame = self.image_prompt(0, 0)  # a frame is one global view
        return text + "".join(f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:{frame}" for t in times) + "\n\n"

    # --- the whole input

    def image_inputs(self, text, images, split):
        """-> per row the list of its images' uint8 tiles, and the prompt block of each image in order."""
        counts = [t.count(self.image_token) for t in text]
        if self.video and any(self.video_token in t for t in text):
            raise VLMError(f"the prompts have {self.video_token} placeholders but no videos were given")
        if images is None:
            if any(counts):
                raise VLMError(f"the prompts have {sum(counts)} {self.image_token} placeholders but no images were given")
            return [], []
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not any(isinstance(i, (list, tuple)) for i in images):  # a flat list: split by the placeholder counts
            cut = np.cumsum([0] + counts).tolist()
            images = [images[a:b] for a, b in zip(cut, cut[1:])] + ([images[cut[-1]:]] if len(images) > cut[-1] else [])
        if [len(i) for i in images] != counts:
            raise VLMError(f"the prompts have {counts} {self.image_token} placeholders but {[len(i) for i in images]} "
                           "images were given (per prompt)")
        tiles = [[self.image_tiles(im, split) for im in row] for row in images]
        return [[t for t, _, _ in row] for row in tiles], [self.image_prompt(r, c) for row in tiles for _, r, c in row]

    def video_inputs(self, text, videos, metadata, sample, max_frames):
        """-> per video its uint8 frames (transformers batches videos, not rows), and each one's prompt block."""
        if not self.video:
            raise VLMError("this SmolVLM 1 checkpoint does not take videos (SmolVLM2 checkpoints do)")
        videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
        if sum(t.count(self.video_token) for t in text) != len(videos):
            raise VLMError(f"the prompts have {sum(t.count(self.video_token) for t in text)} {self.video_token} "
                           f"placeholders but {len(videos)} videos were given")
        metas = metadata if isinstance(metadata, (list, tuple)) else [metadata] * len(videos)
        decoded = [self.video_frames(v, m, sample, max_frames) for v, m in zip(videos, metas)]
        n = max(len(f) for f, _ in decoded)  # each prompt states the padded frame count, as transformers' does
        return [[f] for f, _ in decoded], [self.video_prompt(n, m) for _, m in decoded]

    def __call__(self, text=None, images=None, videos=None, video_metadata=None, do_sample_frames=None, num_frames=None,
                 do_image_splitting=None, **_):
        """text: a string or a list (one per batch row) with one `<image>` per image (`<video>` per video);
        images: per row a list of PIL images, arrays or paths (a flat list is split by the placeholder counts);
        videos: per video a path or decoded frames (then `video_metadata`, and `do_sample_frames=True` to sample
        as transformers' chat-template path does; paths are sampled by default). Left padding. `num_frames` and
        `do_image_splitting` override the checkpoint's max_frames and do_image_splitting."""
        if text is None:
            raise VLMError("a text prompt is required")
        text = [text] if isinstance(text, str) else list(text)
        if images is not None and videos is not None:  # both fill pixel_values in transformers, which breaks
            raise VLMError("give images or videos in one call, not both")
        if videos is not None:
            token, (pixels, blocks) = self.video_token, self.video_inputs(text, videos, video_metadata, do_sample_frames, num_frames)
        else:
            split = self.split if do_image_splitting is None else do_image_splitting
            token, (pixels, blocks) = self.image_token, self.image_inputs(text, images, split)
        blocks = iter(blocks)  # each placeholder becomes its block, in order
        text = ["".join(p + next(blocks) for p in parts[:-1]) + parts[-1] for parts in (t.split(token) for t in text)]
        ids = [e.ids for e in self.tokenizer.encode_batch(text)]
        L = max(len(i) for i in ids)  # left padding, so every row ends where generation starts
        out = {"input_ids": torch.tensor([[self.pad_id] * (L - len(i)) + i for i in ids]),
               "attention_mask": torch.tensor([[0] * (L - len(i)) + [1] * len(i) for i in ids])}
        if any(pixels):
            out.update(self.pad_pixels(pixels, videos is not None))
        return out

    def pad_pixels(self, rows, is_video):
        """Per row a list of uint8 (n, 3, h, w) -> pixel_values (B, N, 3, H, W) float32 zero-padded to the most
        tiles, pixel_attention_mask (B, N, H, W) int64, 1 on real pixels (and, as in transformers, on the padding
        frames of a video)."""
        tiles = [torch.cat(r) if r else torch.zeros(0, 3, 1, 1, dtype=torch.uint8) for r in rows]
        N, H, W = max(len(t) for t in tiles), max(t.shape[-2] for t in tiles), max(t.shape[-1] for t in tiles)
        pv, mask = torch.zeros(len(rows), N, 3, H, W), torch.zeros(len(rows), N, H, W, dtype=torch.long)
        for b, t in enumerate(tiles):
            n, h, w = t.shape[0], t.shape[-2], t.shape[-1]
            pv[b, :n, :, :h, :w] = normalize(t)
            mask[b, :N if is_video else n, :h, :w] = 1
        return {"pixel_values": pv, "pixel_attention_mask": mask}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """The conversation rendered with the checkpoint's chat template (SmolVLM2 switches to its video template
        when a message holds a video, as transformers does) -> the prompt string."""
        has_video = any(isinstance(c, dict) and c.get("type") == "video" for m in messages for c in (m.get("content") or []))
        template = VIDEO_CHAT_TEMPLATE if has_video and self.video else self.chat_template
        if template is None:
            raise VLMError("this checkpoint has no chat template: pass a raw prompt (--raw)")
        return render_template(template, messages, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, **self.special)

    def decode(self, ids):
        """Text of generated ids, up to the first end token, special tokens skipped."""
        ids = [int(i) for i in ids]
        ends = [k for k, i in enumerate(ids) if i in self.stop]
        return self.tokenizer.decode(ids[:ends[0]] if ends else ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- loading

def hub_name(key):
    """Our module paths are the hub's; a stray computed buffer some exports carry is skipped."""
    return None if key.endswith(("position_ids", "rotary_emb.inv_freq")) else key


def load(model=DEFAULT_MODEL, device=None, dtype=None):
    """Load a SmolVLM or SmolVLM2 checkpoint (hub repo id or local directory) -> (model, processor)."""
    folder = resolve(model)
    cfg = Config.from_folder(folder)
    processor = Processor(folder, cfg)
    m = load_weights(lambda: SmolVLM(cfg), folder, hub_name, device, dtype)
    m.stop = processor.stop = stop_ids(folder, *processor.stop)  # with config.json's and generation_config.json's
    m.pad_id = processor.pad_id
    return m, processor


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = cli_parser("Describe images and videos, or answer questions about them, with SmolVLM / SmolVLM2.", DEFAULT_MODEL)
    p.add_argument("--video", help="a video file (SmolVLM2), decoded with PyAV")
    p.add_argument("--num-frames", type=int, default=None, help="at most this many video frames (default: the checkpoint's)")
    p.add_argument("--raw", action="store_true", help="pass --prompt as is, not wrapped in the chat template "
                                                      "(an <image> per image is put first if it has none)")
    a = p.parse_args(argv)
    check_args(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.prompt)
    if a.num_frames is not None and a.num_frames <= 0:
        raise VLMError(f"num-frames must be positive, got {a.num_frames}")
    images = [open_image(path) for path in a.image]  # fail on a bad image before the slow load
    folder = resolve(a.model)
    processor = Processor(folder, Config.from_folder(folder))
    if a.raw:
        token = processor.video_token if a.video else processor.image_token
        n = len(images) + bool(a.video)
        prompt = a.prompt if token in a.prompt or not n else token * n + a.prompt
    else:
        media = [{"type": "image"} for _ in images] + ([{"type": "video"}] if a.video else [])
        prompt = processor.apply_chat_template([{"role": "user", "content": media + [{"type": "text", "text": a.prompt}]}])
    inputs = processor(text=[prompt], images=[images] if images else None, videos=[a.video] if a.video else None,
                       num_frames=a.num_frames)  # a bad video fails here, before the slow load
    t0 = time.perf_counter()
    model, processor = load(str(folder), a.device, a.dtype)
    t_load = time.perf_counter() - t0
    dev = next(model.parameters()).device
    out = Streamer(processor.decode)
    model.generate(**{k: v.to(dev) for k, v in inputs.items()}, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stream=out)
    out()
    if a.verbose:
        out.report(t_load)


if __name__ == "__main__":
    run_cli(main)
