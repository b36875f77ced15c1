"""What paligemma.py, smolvlm.py and perception_lm.py share: the functions their modules call and
the plumbing around the models.

Top to bottom: the error type, config helpers, RoPE, attention (the function, the causal mask, the
KV cache), the linear layer of the decoders, image and video input, checkpoints (resolution and
strict loading), tokenizers and chat templates, sampling and the decode loop, command-line helpers.
Nothing here is model-specific: each model file holds its whole model (vision encoder, projector,
and the decoder with its own attention module and MLP) and needs only this file.

Shapes: B batch, T new tokens, S keys (cache length so far), H query heads, K key/value heads, D
head dim.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps


class VLMError(Exception):
    """A problem with the user's input (file, checkpoint, prompt, flag); the CLIs print it as one
    line."""


def first_line(error):
    """The first line of an exception's message (library messages can run to many lines)."""
    return str(error).partition("\n")[0]


# ------------------------------------------------------------ config

def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VLMError(f"{path} not found") from None
    except (OSError, ValueError) as e:  # unreadable, or not JSON
        raise VLMError(f"{path} is not valid JSON ({e})") from None


def optional_json(path):
    """A JSON file a checkpoint may leave out: {} when it is absent."""
    if not Path(path).exists():
        return {}
    return read_json(path)


def from_dict(cls, d):
    """A config dataclass from a config.json section, keeping the fields the class knows."""
    known = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in (d or {}).items() if key in known})


def rope_theta(cfg, default=10000.0):
    """RoPE base from the hub's 4.x form (rope_theta) or the 5.x form (rope_parameters) that
    transformers 5 writes when it saves a config; rope scaling, where a model has it, is read by its
    own file."""
    parameters = cfg.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", cfg.get("rope_theta", default)))


# ------------------------------------------------------------ RoPE

def rope_inv_freq(head_dim, theta):
    """Rotary embedding frequencies theta^(-2i / D) (RoFormer, arXiv:2104.09864). Made on the CPU
    even while a model is built on the meta device: this buffer is computed, not loaded."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, D), computed in fp32 and rounded to the activation
    dtype."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): each angle serves dims i and i + D/2
    cos = angles.cos().to(dtype)[:, None]  # (B, 1, T, D): the same for every head
    sin = angles.sin().to(dtype)[:, None]
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) by its angle: the half-split layout of the hub checkpoints
    (transformers' `rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------ attention

CAUSAL = "causal"  # a mask: causal with no padding, which SDPA runs with its own causal kernel


def attend(q, k, v, mask=None, scale=None):
    """Scaled dot-product attention (arXiv:1706.03762): q (B, H, T, D), k, v (B, K, S, D) -> (B, H,
    T, D). mask: bool (B, 1, T, S), True = may attend; None: every key; CAUSAL: SDPA's causal
    kernel, about twice as fast on a CPU as the same explicit mask. scale None: 1/sqrt(D).
    Grouped-query attention: each key/value head serves H/K query heads without being copied."""
    is_causal = mask is CAUSAL
    if is_causal:
        mask = None
    grouped = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal,
                                          enable_gqa=grouped)


def make_mask(keys, T):
    """Causal mask (B, 1, T, S) for the last T of S positions; `keys` (B, S) marks the real
    (non-pad) tokens. None when nothing is masked, CAUSAL for a causal prefill without pads (SDPA's
    fast paths)."""
    B, S = keys.shape
    if bool(keys.all()) and T == 1:
        return None  # one new token sees every key
    if bool(keys.all()) and T == S:
        return CAUSAL
    query_pos = torch.arange(S - T, S, device=keys.device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=keys.device)[None]  # (1, S)
    mask = (key_pos <= query_pos) & keys[:, None, :]  # (B, T, S): causal, and pads are never keys
    mask = mask | (key_pos == query_pos)  # a pad query sees itself, so no row is empty (no NaN)
    return mask[:, None]  # (B, 1, T, S)


class KVCache:
    """Keys and values of every layer, allocated once for prompt + new tokens and written in
    place. One tensor for all layers, handed out as one view a layer (B, K, max_len, D): a compiled
    decode step gets the views as inputs and writes into them in place (indexing the whole tensor
    inside the step made the compiler copy all of it at every layer)."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device).unbind(0)
        self.v = torch.zeros(shape, dtype=dtype, device=device).unbind(0)
        self.len = 0  # filled positions; the model advances it after each forward pass
        # a compiled decode step's write position, as a tensor (1,): with it set, update() returns
        # every slot, filled or not, so each step has the same shapes (its mask hides the empty
        # slots) and the compiled code is reused
        self.slot = None

    def update(self, layer, k, v):
        """Store k, v (B, K, T, D) after the filled positions -> all keys and values so far (B, K,
        S, D); with `slot` set, the one new position there -> all slots (B, K, max_len, D)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        start = self.len
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def next_token_loss(logits, labels):
    """Training loss: the mean cross-entropy of each position's prediction of the next token, over
    the labels that are not -100 (transformers' ForCausalLMLoss: fp32 logits, labels shifted by
    one)."""
    predictions = logits[:, :-1].float().flatten(0, 1)  # (B * (T-1), V)
    targets = labels[:, 1:].flatten().to(predictions.device)  # (B * (T-1),)
    return F.cross_entropy(predictions, targets, ignore_index=-100)


def check_context(prompt_len, max_new_tokens, context, hint=""):
    if prompt_len + max_new_tokens > context:
        raise VLMError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens ({max_new_tokens}) "
                       f"exceed the model's context of {context} tokens{hint}")


# ------------------------------------------------------------ the decoders' linear layer

class Linear(nn.Linear):
    """nn.Linear with a CPU fast path for decoding. In bf16 on a CPU, a decode step (a few rows of
    x) runs faster as w @ x than as x @ w.T: the matrix-vector kernel streams the weights at
    ~1.2-1.5x the rate of the matrix-matrix one (bench/). The decoders build every projection from
    this class, so a variant (quantized weights, say) can replace these modules without touching a
    model's forward code. Compiled (generate(..., compiled=True)), it is a plain F.linear: the
    compiler packs the weight and picks its own kernel."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        fast = x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.bias is None
        if not fast or rows > 32 or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        if rows == 1:
            y = self.weight @ x.reshape(-1)  # (out,): the matrix-vector kernel
        else:
            y = self.weight @ x.reshape(rows, -1).t()  # (out, rows)
        return y.t().contiguous().view(*x.shape[:-1], -1)  # (..., out)


# ------------------------------------------------------------ quantized decoder weights
# `load(..., quantize="int8" | "int4")` replaces every decoder Linear (projections, MLPs, output
# head) by one of these before loading and quantizes each weight as it is read; the vision tower
# and the projector keep their dtype (4-bit vision towers broke other ports: bnb#963, tf#34294).
# Weights only: activations stay in the model's dtype. Kernels: torch's own CPU ones.

INT4_GROUP = 64  # weights per int4 scale: 64 divides every real in-features count (576, 1536,
# 2048, 2304, 8192, 9216) and decodes ~10% faster than groups of 32 (bench/RESULTS.md)
QUANTIZE_ROWS = 1024  # rows quantized at a time: fp32 temporaries of at most ~40 MB (a whole
# 257,216-row head would take 2.4 GB), changed in place (fresh pages cost more than the arithmetic)


def quantize_int8(weight):
    """Symmetric round-to-nearest per output channel: weight (out, in) ~ q * scale[:, None] with q
    in [-127, 127] -> (q int8 (out, in), scale fp32 (out,))."""
    w = weight.to(torch.float32, copy=True)  # changed in place below
    # amin and amax: 10x faster than torch.aminmax along rows here (torch 2.14 on this CPU)
    largest = torch.maximum(-w.amin(dim=1), w.amax(dim=1))  # (out,): the largest |weight|
    scale = largest.clamp(min=1e-12) / 127  # maps to 127
    q = w.div_(scale[:, None]).round_().clamp_(-127, 127)
    return q.to(torch.int8), scale


def quantize_int4(weight, group_size):
    """Asymmetric round-to-nearest per group of `group_size` inputs (all 16 levels between a
    group's min and max, as gpt-fast and torchao do): weight ~ q * scale + low, q in [0, 15] ->
    (q uint8 (out, in), scale fp32 (out, in / group), low fp32 (out, in / group))."""
    out_features, in_features = weight.shape
    groups = weight.to(torch.float32, copy=True).view(out_features, -1, group_size)
    low = groups.amin(dim=-1)  # (out, groups)
    scale = (groups.amax(dim=-1) - low).clamp(min=1e-12) / 15
    q = groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
    return q.to(torch.uint8).view(out_features, in_features), scale, low


def pack_int4(q):
    """q uint8 (out, in) in [0, 15] -> the layout of torch's CPU int4 kernel, uint8 (out, in / 2).
    Its converter takes int32 (4 bytes a weight): load_weights gives it 1024 rows at a time."""
    return torch._convert_weight_to_int4pack_for_cpu(q.int(), 2)


class Int8Linear(nn.Module):
    """A decoder Linear with int8 weights and one scale per output channel: y = (x @ q.T) * scale,
    by torch._weight_int8pack_mm for a few rows (decoding). A prompt's many rows go through the
    dtype's matrix product instead, on q converted (exactly) to that dtype: at 256 rows the int8
    kernel takes ~10x the time of a bf16 product, ~2x that of converting first (bench/)."""

    def __init__(self, in_features, out_features, dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype  # of the activations, and so of the scales the kernel multiplies by
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype))

    def quantize(self, weight):  # (out, in) float -> this module's buffers
        q, scale = quantize_int8(weight)
        return {"weight": q, "scale": scale.to(self.dtype)}

    def forward(self, x):  # (..., in) -> (..., out)
        rows = x.reshape(-1, self.in_features)  # (n, in)
        if len(rows) > 32:
            # converted 4M weights at a time: a block under glibc's 32 MB mmap threshold reuses
            # freed memory, where a whole 9216 x 2304 matrix would fault in fresh pages each call
            blocks = self.weight.split(max(1, 2**22 // self.in_features))
            products = [F.linear(rows, block.to(x.dtype)) for block in blocks]  # (n, block) each
            y = torch.cat(products, dim=-1) * self.scale  # (n, out)
        else:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scale)  # (n, out)
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """A decoder Linear with 4-bit weights in groups of INT4_GROUP inputs, each group with its
    scale and offset: y = x @ (q * scale + low).T, by torch._weight_int4pack_mm_for_cpu. The kernel
    computes (q - 8) * scale + zero, so zero = low + 8 * scale is stored beside the scale."""

    def __init__(self, in_features, out_features, dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        packed_shape = (out_features, in_features // 2)  # two weights a byte
        groups = in_features // INT4_GROUP
        self.register_buffer("weight", torch.empty(packed_shape, dtype=torch.uint8))
        self.register_buffer("scale_and_zero", torch.empty(groups, out_features, 2, dtype=dtype))

    def quantize(self, weight):
        q, scale, low = quantize_int4(weight, INT4_GROUP)
        zero = low + 8 * scale
        scale_and_zero = torch.stack([scale, zero], dim=-1)  # (out, groups, 2)
        scale_and_zero = scale_and_zero.transpose(0, 1).contiguous()  # (groups, out, 2)
        return {"weight": pack_int4(q), "scale_and_zero": scale_and_zero.to(self.dtype)}

    def forward(self, x):  # (..., in) -> (..., out)
        rows = x.reshape(-1, self.in_features)  # (n, in)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, INT4_GROUP,
                                              self.scale_and_zero)  # (n, out)
        return y.view(*x.shape[:-1], self.out_features)


def int4_fits(linear):
    """The int4 kernel's shape rules: in-features a multiple of the group, out-features of 16."""
    return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0


def quantize_linears(model, quantize, dtype):
    """Replace every decoder Linear of `model` (on the meta device) by an Int8Linear or Int4Linear
    -> ({weight name: the new module}, a one-line summary for --verbose). int4 falls back to int8
    for a matrix whose shape its kernel cannot take."""
    quantized = {}
    fallbacks = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        kind = Int8Linear
        if quantize == "int4" and int4_fits(module):
            kind = Int4Linear
        elif quantize == "int4":
            fallbacks += 1
        replacement = kind(module.in_features, module.out_features, dtype)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, replacement)
        quantized[f"{name}.weight"] = replacement
    summary = f"{quantize}: {len(quantized)} decoder matrices quantized"
    if quantize == "int4":
        summary += (f", {fallbacks} of them in int8 (in-features not a multiple of {INT4_GROUP} "
                    "or out-features of 16)")
    return quantized, summary


def quantize_in_blocks(module, weight):
    """module.quantize(weight) a block of QUANTIZE_ROWS rows at a time (every scheme here is per
    row, and the int4 layout packs blocks of 64 rows on their own) -> the module's buffers."""
    parts = [module.quantize(rows) for rows in weight.split(QUANTIZE_ROWS)]
    # int4 scales are (groups, out, 2): the rows are their second dimension
    return {key: torch.cat([part[key] for part in parts], dim=1 if key == "scale_and_zero" else 0)
            for key in parts[0]}


# ------------------------------------------------------------ images and video

def open_image(path):
    """Open an image file and apply its EXIF orientation (phones store photos sideways); any
    mode."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img)  # a loaded copy, upright
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # missing, a directory, truncated, not an image, or a huge declared size (a "decompression
        # bomb")
        why = getattr(e, "strerror", None) or e
        raise VLMError(f"image {path} cannot be read ({why})") from None


def to_rgb(img):
    """Any PIL mode -> RGB, transparency composited on white as transformers' convert_to_rgb
    does."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if not has_alpha:
        return img.convert("RGB")
    white = Image.new("RGBA", img.size, "white")
    return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")


def image_tensor(img):
    """A PIL image, an (H, W, 3) uint8 array or a path -> uint8 tensor (3, H, W)."""
    if isinstance(img, (str, Path)):
        img = open_image(img)
    if hasattr(img, "convert") and img.mode != "RGB":
        img = to_rgb(img)
    x = torch.from_numpy(np.array(img, dtype=np.uint8))
    if x.dim() != 3 or x.shape[2] != 3 or 0 in x.shape:  # empty, or not RGB
        shape = tuple(x.shape)
        raise VLMError(f"an image must be (H, W, 3) pixels with H, W > 0, got shape {shape}")
    return x.permute(2, 0, 1)


def resize(x, size, mode):
    """uint8 (N, 3, H, W) resized with antialiasing on the integers, as transformers' torchvision
    backend does on CPU: bit-exact with it, with no torchvision at run time."""
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def normalize(x):
    """uint8 -> float32 in [-1, 1]: rescale by 1/255, then mean = std = 0.5 (all three families)."""
    return (x.float() - 127.5) / 127.5


def read_video(path, pick):
    """Decode a video with PyAV, keeping only the frames `pick(total_frames, fps)` selects (a long
    video is never held in memory whole) -> uint8 (N, 3, H, W) and the metadata transformers
    derives."""
    import av
    try:
        with av.open(str(path)) as container:
            # no video stream: an audio file, or an mp4 cut before its index (stored last)
            if not container.streams.video:
                raise VLMError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0) or 24.0
            total = stream.frames or int((container.duration or 0) / 1e6 * fps)
            wanted = [int(i) for i in pick(total, fps)]
            frames = decode_frames(container, stream, wanted)
    except (av.error.FFmpegError, OSError, ValueError) as e:  # missing, truncated, not a video
        why = getattr(e, "strerror", None) or e
        raise VLMError(f"video {path} cannot be read ({why})") from None
    if not frames:
        raise VLMError(f"video {path} has no decodable frames")
    if len(frames) < len(wanted):  # the file ends early: cut short, or damaged
        raise VLMError(f"video {path} is truncated or damaged: only {len(frames)} of the "
                       f"{len(wanted)} frames picked could be decoded")
    pixels = torch.from_numpy(np.stack([frames[i] for i in wanted])).permute(0, 3, 1, 2)
    meta = {"total_num_frames": total, "fps": fps, "duration": total / fps,
            "frames_indices": wanted}
    return pixels, meta


def decode_frames(container, stream, wanted):
    """{index: (H, W, 3) uint8} for the wanted frame indices. Decoding stops at the last one wanted,
    and only the wanted frames are converted to pixels."""
    frames = {}
    if not wanted:
        return frames
    last = max(wanted)
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    return frames


# ------------------------------------------------------------ checkpoints

def resolve(model):
    """A local checkpoint directory, or a hub repo id fetched by huggingface_hub into its usual
    cache (so a checkpoint transformers downloaded is reused, and HF_HUB_OFFLINE=1 works)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise VLMError(f"{model} is not a checkpoint directory nor a hub repo id (org/name)")
    # weights only as safetensors: pickle (*.bin) files are never fetched, never read
    return download(model, ["*.json", "*.safetensors", "*.jinja"])


def download(repo_id, patterns, repo_type="model"):
    """The files of a hub repo matching `patterns`, fetched into (or found in) the hub cache -> the
    folder."""
    from huggingface_hub import errors, snapshot_download
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns)
        return Path(folder)
    except errors.GatedRepoError:  # (before RepositoryNotFoundError: it is a subclass)
        page = f"https://huggingface.co/{repo_id}"
        why = f"is gated: accept its licence at {page}, then `hf auth login`"
    except errors.RepositoryNotFoundError:
        why = "was not found on the Hugging Face Hub (private repos need a login)"
    except errors.LocalEntryNotFoundError:
        why = "is not cached and the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network)"
    except (errors.HfHubHTTPError, OSError) as e:
        why = f"cannot be downloaded: {first_line(e)}"
    raise VLMError(f"{repo_id} {why}")


def fast_bf16(device):
    """Whether bf16 matrix products are fast here: on CUDA, and on CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


def choose_device_and_dtype(device=None, dtype=None):
    """-> (torch.device, torch.dtype). The device defaults to CUDA when there is one. The dtype
    defaults to bf16 (half the bytes to read; the checkpoints' own) where matrix products are fast
    in it, else fp32: on an AVX2-only CPU a bf16 matrix product runs ~5x slower than fp32 (bench/),
    and image prompts are matrix products."""
    if not device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # an unknown device name, or a GPU that is not there (torch without CUDA raises AssertionError)
    try:
        device = torch.empty(0, device=device).device
    except (RuntimeError, AssertionError) as e:
        raise VLMError(f"device {device} cannot be used ({first_line(e)})") from None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if fast_bf16(device) else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise VLMError(f"unknown dtype {dtype} (use float32, bfloat16 or float16)")
    return device, dtype


def skip_init(module):
    pass


@contextlib.contextmanager
def no_embedding_init():
    """nn.Embedding's random initialisation, even on the meta device, imports torch._dynamo (~2 s
    spent for nothing, since every weight is then loaded): switched off while a model is built."""
    original = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = skip_init
    try:
        yield
    finally:
        nn.Embedding.reset_parameters = original


def tied_parameters(model):
    """{name: the name it shares its parameter with} for weights a model uses twice (a tied output
    head)."""
    first_name = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return tied


def checkpoint_files(folder):
    """The safetensors shards named by model.safetensors.index.json, or the one
    model.safetensors."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(read_json(index)["weight_map"].values()))
    if not (Path(folder) / "model.safetensors").exists():
        note = ""
        if list(Path(folder).glob("*.bin")):
            note = " (its *.bin pickle weights are never loaded, for safety)"
        raise VLMError(f"no model.safetensors in {folder}{note}")
    return ["model.safetensors"]


def read_tensor(path, key, device):
    """One tensor of a safetensors file, through its own open: the file pages it maps are released
    with it (a tensor kept as it is stays mapped; one converted or quantized is let go at once)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt", device=str(device)) as f:
        return f.get_tensor(key)


def read_checkpoint(folder, rename, expected, device, convert):
    """Every tensor of the checkpoint -> {our name: tensor}, with one strict check: each tensor maps
    to a parameter (`rename` gives its name, or None to skip it), each parameter is found, each
    shape matches; an error names the key. `expected` is {name: shape}; `convert(name, read)` runs
    on each, `read()` giving the tensor, and returns the entries it makes ({name: tensor}, or a
    quantized weight's buffers)."""
    from safetensors import SafetensorError, safe_open
    state = {}
    found = set()
    for file_name in checkpoint_files(folder):
        path = Path(folder) / file_name
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            for key, shape in shapes.items():
                name = rename(key)
                if name is None:
                    continue
                if name not in expected:
                    raise VLMError(f"unexpected tensor {key} in {file_name}: not a weight of this "
                                   "model")
                if shape != tuple(expected[name]):
                    wanted = tuple(expected[name])
                    raise VLMError(f"tensor {key} has shape {shape}, expected {wanted}")
                state.update(convert(name, partial(read_tensor, path, key, device)))
                found.add(name)
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # a missing or cut shard
            raise VLMError(f"cannot read weights {path}: {first_line(e)}") from None
    missing = [name for name in expected if name not in found]
    if missing:
        raise VLMError(f"weight {missing[0]} is missing from {folder} "
                       f"({len(missing)} missing in all)")
    return state


def load_weights(make, folder, rename, device=None, dtype=None, quantize=None):
    """`make()` with the weights of the checkpoint in `folder`, in four steps: choose the device and
    dtype; build the model on the meta device (no memory, no random init), its decoder Linears
    replaced by quantized ones when `quantize` is "int8" or "int4"; read the shards with the strict
    check of read_checkpoint, converting (or quantizing) each tensor as it is read, so a quantized
    model never holds its full-precision weights; put the tensors in place, tying the weights the
    model shares. model.quantization: a one-line summary for --verbose (None: not quantized)."""
    device, dtype = choose_device_and_dtype(device, dtype)
    if quantize not in (None, "int8", "int4"):
        raise VLMError(f"unknown quantization {quantize!r} (use int8 or int4)")
    if quantize and device.type != "cpu":
        raise VLMError(f"--quantize runs on the CPU only (its kernels are not verified on "
                       f"{device.type})")
    with torch.device("meta"), no_embedding_init():
        model = make()
    tied = tied_parameters(model)
    expected = {name: t.shape for name, t in model.state_dict().items() if name not in tied}
    quantized = {}  # {weight name: its Int8Linear or Int4Linear}
    model.quantization = None
    if quantize:
        quantized, model.quantization = quantize_linears(model, quantize, dtype)
    # A quantized head tied to the embedding gets its own quantized copy, made when the embedding is
    # read; the embedding stays in the model's dtype for its lookups.
    head_of = {}  # {embedding name: quantized head name}
    for name in [name for name in tied if name in quantized]:
        head_of[tied.pop(name)] = name
    # On AVX2-only CPUs, MKL's fp32 matrix-vector product (a decode step) reads a tall matrix up to
    # 2x faster stored column-major (bench/); on AVX-512 ones it gains ~3% and would triple the load
    # time (a transposing copy). The vision towers only multiply matrices, so they keep their
    # layout.
    relayout = device.type == "cpu" and dtype == torch.float32 and not fast_bf16(device)

    def quantized_entries(name, tensor):  # a weight -> its quantized module's buffers, by name
        prefix = name.removesuffix("weight")
        buffers = quantize_in_blocks(quantized[name], tensor)
        return {prefix + key: value for key, value in buffers.items()}

    def convert(name, read):
        if name in quantized:
            return quantized_entries(name, read())
        entries = {}
        if name in head_of:  # read for itself: the embedding's pages it touches are let go after
            entries = quantized_entries(head_of[name], read())
        tensor = read()
        tall = tensor.dim() == 2 and tensor.shape[0] >= tensor.shape[1]
        if relayout and tall and "vision" not in name:
            tensor = tensor.t().contiguous().t()  # column-major; .to() keeps the layout
        entries[name] = tensor.to(dtype)
        return entries

    state = read_checkpoint(folder, rename, expected, device, convert)
    for name, source in tied.items():
        state[name] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    for name, source in tied.items():  # assign=True made two parameters of one tensor: one again
        module_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(module_name), attribute, model.get_parameter(source))
    return model.to(device).eval()


def stop_ids(folder, *extra):
    """The union of the end ids in config.json (and its text_config), generation_config.json and
    `extra`."""
    config = read_json(Path(folder) / "config.json")
    generation = optional_json(Path(folder) / "generation_config.json")
    ids = {i for i in extra if i is not None}
    for section in (config, config.get("text_config") or {}, generation):
        eos = section.get("eos_token_id")
        if isinstance(eos, list):
            ids.update(eos)
        elif eos is not None:
            ids.add(eos)
    return sorted(ids)


# ------------------------------------------------------------ text

def open_tokenizer(folder):
    from tokenizers import Tokenizer
    path = Path(folder) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
        raise VLMError(f"{path} cannot be read ({e})") from None


def token_text(value):
    """A special token as tokenizer_config.json stores it: a string, or a saved AddedToken dict."""
    if isinstance(value, dict):
        return value["content"]
    return str(value)


def left_pad(rows, value):
    """Lists of ints -> a (len(rows), longest) tensor, each row padded on the left with `value`:
    batches are left-padded, so that every row ends where generation starts."""
    longest = max(len(row) for row in rows)
    return torch.tensor([[value] * (longest - len(row)) + row for row in rows])


def decode_ids(tokenizer, ids, stop):
    """Text of generated ids up to the first end token (any id in `stop`), special tokens
    skipped."""
    ids = [int(i) for i in ids]
    ends = [position for position, i in enumerate(ids) if i in stop]
    if ends:
        ids = ids[:ends[0]]
    return tokenizer.decode(ids, skip_special_tokens=True)


def render_template(template, messages, **variables):
    """A checkpoint's own chat template rendered by Jinja in a sandbox, with transformers' settings,
    so the string is the one transformers renders."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # templates call this to refuse a conversation they cannot render
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, **variables)
    except TemplateError as e:
        raise VLMError(f"chat template: {e}") from None


def split_answer(render, messages, end_token):
    """Training data from a conversation whose last message is the assistant's answer -> (prompt,
    answer): the prompt as the chat template renders it for generation, the answer as the template
    continues it, up to and including the end-of-turn token (what the template writes after that
    token, SmolVLM's "\\n", comes before the next turn and is not learned). `render(messages,
    add_generation_prompt)` is the processor's apply_chat_template."""
    if not messages or messages[-1].get("role") != "assistant":
        raise VLMError("a training conversation must end with the assistant's answer")
    prompt = render(messages[:-1], add_generation_prompt=True)
    whole = render(messages, add_generation_prompt=False)
    answer = whole[len(prompt):]
    if not whole.startswith(prompt) or end_token not in answer:
        raise VLMError("the chat template does not write the answer after the generation prompt")
    end = answer.index(end_token) + len(end_token)
    return prompt, answer[:end]


def append_answers(tokenizer, rows, answers):
    """For training: each row of prompt ids (a list, extended in place) followed by its answer's ids
    -> per row the labels: -100 on the prompt (never learned), the answer's ids on the answer. No
    answers (None): no labels, None."""
    if answers is None:
        return None
    if isinstance(answers, str):
        answers = [answers]
    if len(answers) != len(rows):
        raise VLMError(f"got {len(answers)} answers (suffix) for {len(rows)} prompts")
    labels = []
    for row, answer in zip(rows, answers):
        answer_ids = tokenizer.encode(answer, add_special_tokens=False).ids
        labels.append([-100] * len(row) + answer_ids)
        row.extend(answer_ids)
    return labels


# ------------------------------------------------------------ sampling and generation

def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token ids (B,); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is None or top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return sample_nucleus(probs, top_p, generator)


def sample_nucleus(probs, top_p, generator):
    """Nucleus sampling (arXiv:1904.09751): draw from the smallest set of most likely tokens whose
    mass is at least top_p. The set is looked for among the 1024 most likely tokens, with no sort of
    the whole vocabulary; only when those fall short of top_p (in some row) are all tokens
    sorted."""
    best = probs.topk(min(1024, probs.shape[-1]))
    if best.values.sum(-1).min() < top_p:
        best = probs.topk(probs.shape[-1])
    p, ids = best  # (B, n) each, most likely first
    mass_before = p.cumsum(-1) - p
    p = p.masked_fill(mass_before > top_p, 0.0)  # a token stays while those before it hold <= top_p
    choice = torch.multinomial(p, 1, generator=generator)  # (B, 1): a position in `ids`
    return ids.gather(-1, choice).squeeze(-1)


def check_args(max_new_tokens, temperature, top_k, top_p, prompt=""):
    """Run by generate() and, before the slow load, by the CLIs: the same message either way. (A
    command line with bytes that are not UTF-8 reaches Python as lone surrogates, which no tokenizer
    accepts.)"""
    if max_new_tokens <= 0:
        raise VLMError(f"max-new-tokens must be positive, got {max_new_tokens}")
    if any("\ud800" <= c <= "\udfff" for c in prompt):
        raise VLMError("the prompt is not valid UTF-8 text")
    if not 0 <= temperature < math.inf:
        raise VLMError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise VLMError(f"top-k must be positive, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise VLMError(f"top-p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate(step, logits, max_new_tokens, stop, pad_id, temperature=0.0, top_k=None, top_p=None,
             seed=None, stream=None):
    """The decode loop of all three models. `logits` (B, V) come from the prefill's last position;
    `step(tokens (B,))` runs one cached decode step and returns the next (B, V). A row stops at any
    id in `stop` and is padded with `pad_id` after. `stream` gets each new (B,) batch. Returns new
    ids (B, n)."""
    check_args(max_new_tokens, temperature, top_k, top_p)
    device = logits.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor(stop, device=device)
    done = torch.zeros(len(logits), dtype=torch.bool, device=device)
    new_ids = []
    for i in range(max_new_tokens):
        if not torch.isfinite(logits).all():
            raise VLMError("the model produced non-finite logits: a float16 overflow (use --dtype "
                           "bfloat16 or float32) or corrupted weights")
        token = sample(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(done, pad_id)  # a finished row gets padding
        new_ids.append(token)
        if stream is not None:
            stream(token)
        done = done | torch.isin(token, stop)
        if done.all() or i == max_new_tokens - 1:
            break
        logits = step(token)
    return torch.stack(new_ids, 1)


class Streamer:
    """Prints row 0 of the new ids as text as it comes: decode all so far, print what is new, but
    hold back a trailing partial UTF-8 character (byte-fallback tokens) until it is whole. Records
    token times."""

    def __init__(self, decode):
        self.decode = decode
        self.ids = []
        self.shown = 0  # characters printed so far
        self.times = [time.perf_counter()]

    def __call__(self, token=None):  # no token: the end, print the rest and a newline
        if token is not None:
            self.times.append(time.perf_counter())
            self.ids.append(int(token[0]))
        text = self.decode(self.ids)
        if token is None:
            print(text[self.shown:], flush=True)
        elif not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)

    def report(self, load_seconds):
        times = self.times
        n = len(times) - 1
        rate = float("nan")
        if n > 1:  # one over the median step after the first token: a compiling step is no step
            steps = [later - earlier for earlier, later in zip(times[1:], times[2:])]
            rate = 1 / statistics.median(steps)
        prefill = times[1] - times[0]
        print(f"load {load_seconds:.2f} s, prefill {prefill:.2f} s (to the first token), "
              f"decode {rate:.1f} tokens/s ({n} tokens)", file=sys.stderr)


# ------------------------------------------------------------ compiled decoding
# generate(..., compiled=True): the decode step as one compiled program. Eager PyTorch runs a
# SmolVLM-256M step as ~7,400 separate operations, each paying its dispatch; compiled, the small
# ones are fused and each matrix-vector product gets the kernel timed fastest for its shape
# (bench/RESULTS.md, issue 17). For inference: the weights are frozen into the program.

COMPILE_OPTIONS = {
    "max_autotune": True,  # time candidate kernels for each matrix product and keep the fastest
    # the model's modules do not change between steps: checking them all costs ~0.5 ms a step
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "autotune_num_choices_displayed": 0,  # no timing tables on stderr
    "max_autotune_report_choices_stats": False,
}


def compile_step(model, name, keys, cache):
    """The model's decode method `name` compiled, once, and kept on the model for the next runs.
    The run's length (the cache's slots, `keys` (B, max_len)) is marked as the size that changes,
    so one compiled program serves every prompt length; the batch size compiles anew."""
    if keys.device.type != "cpu":
        raise VLMError(f"--compile is verified on the CPU only, not on {keys.device.type}")
    torch._dynamo.mark_dynamic(keys, 1)  # (B, max_len)
    for tensor in cache.k + cache.v:
        torch._dynamo.mark_dynamic(tensor, 2)  # (B, K, max_len, D)
    attribute = "compiled_" + name
    if not hasattr(model, attribute):  # compiled at its first call, after the first token
        print("compiling the decode step at its first call: about a minute on a CPU, once in this "
              "process", file=sys.stderr)
        step = torch.compile(getattr(model, name), options=COMPILE_OPTIONS)
        setattr(model, attribute, step)
    return partial(call_frozen, getattr(model, attribute))


def call_frozen(step, *args):
    """Run a compiled step, compiling it first if need be with its weights frozen: constants,
    packed once for the kernels chosen. (Freezing must be set while the step is traced, which
    torch.compile's options do not reach.)"""
    with torch._inductor.config.patch(freezing=True):
        return step(*args)


# ------------------------------------------------------------ command line

# --batch: images generated together by default; measured in bench/batch.py (bench/RESULTS.md)
BATCH_SIZE = {"cpu": 4, "cuda": 16}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def cli_parser(description, default_model):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=default_model, help="hub repo id or local dir (%(default)s)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for more)")
    p.add_argument("--prompt", default="", help="the text prompt")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many (100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the most likely mass p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 "
                   "on CUDA and on CPUs with AVX512-BF16 or AMX, else float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="decoder weights in int8 (per channel) or int4 (groups of 64): fewer bytes "
                   "to read per token, on the CPU; the vision tower is left as it is")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (SmolVLM, "
                   "on the CPU): about a minute to compile, then about twice the tokens a second")
    p.add_argument("--verbose", action="store_true", help="timings (load, prefill, tokens/s)")
    p.add_argument("--progress", action="store_true", help="progress on stderr even when it is not "
                   "a terminal")
    p.add_argument("--batch", nargs="+", metavar="PATH", help="answer --prompt for each image of "
                   "these files, folders and glob patterns, one JSON line each, model loaded once")
    p.add_argument("--batch-size", type=int, default=None, help="--batch: images generated "
                   f"together (default {BATCH_SIZE['cpu']} on a CPU, {BATCH_SIZE['cuda']} on CUDA)")
    p.add_argument("--recursive", action="store_true", help="--batch: subfolders' images too")
    p.add_argument("--output-jsonl", metavar="FILE", help="--batch: the lines go to FILE, "
                   "rewritten whole (atomically) after each batch, instead of stdout")
    p.add_argument("--resume", action="store_true", help="--batch: skip the images already in "
                   "--output-jsonl FILE and add the others")
    return p


def show_status(text, terminal):
    """A progress line on stderr: rewritten in place on a terminal (text "" clears it), else one
    line each."""
    if terminal:
        print(f"\r{text}\x1b[K", end="", file=sys.stderr, flush=True)
    elif text:
        print(text, file=sys.stderr, flush=True)


def count_tiles(inputs):
    """The tiles (or frames) in a processor's output, less the all-zero ones that pad a batch row (a
    real tile is never all zeros: pixel value 0 normalizes to -1)."""
    total = 0
    for name, value in inputs.items():
        if name.startswith("pixel_values"):  # pixel_values, pixel_values_videos
            tiles = value.flatten(0, -4).flatten(1)  # (tiles, 3 * H * W)
            total += int(tiles.ne(0).any(1).sum())
    return total


@contextlib.contextmanager
def encoding_progress(vision, inputs, shown):
    """While a prefill runs: a forward hook on the vision tower counts the tiles (or frames) it
    encodes and, once the prefill has taken 2 s, shows `encoding 37 tiles: 12/37` on stderr (when
    `shown`): a PerceptionLM image is ~37 tiles, minutes on a CPU with nothing else to see."""
    total = count_tiles(inputs)
    start = time.perf_counter()
    done = 0
    terminal = sys.stderr.isatty()

    def count(module, module_inputs, output):
        nonlocal done
        done += len(module_inputs[0])  # the tiles of this call
        if shown and time.perf_counter() - start > 2:
            show_status(f"encoding {total} tiles: {done}/{total}", terminal)
            if done >= total:
                show_status("", terminal)  # the answer or the next line starts clean

    handle = vision.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()


def stream_answer(model, processor, inputs, args, load_seconds, vision):
    """Generate an answer for one prompt, printing its text to stdout as it comes (timings to stderr
    with --verbose; the encoding of many tiles with progress) -> the new ids (1, n). `vision`: the
    model's vision tower."""
    device = next(model.parameters()).device
    inputs = {name: value.to(device) for name, value in inputs.items()}
    printer = Streamer(processor.decode)
    shown = args.progress or sys.stderr.isatty()
    with encoding_progress(vision, inputs, shown):
        new_ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, stream=printer, compiled=args.compile)
    printer()  # the rest of the text, and a newline
    if args.verbose:
        printer.report(load_seconds)
    if args.verbose and model.quantization:
        print(model.quantization, file=sys.stderr)
    return new_ids


def folder_images(folder, recursive):
    """The image files of a folder (by suffix; hidden files left out), sorted."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    images = [path for path in files if path.is_file() and not path.name.startswith(".")
              and path.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(images)


def batch_paths(patterns, recursive):
    """--batch's files, folders and glob patterns -> image paths (str) in order, each once. A
    pattern or a folder that gives no file is an error, as is a path that does not exist."""
    paths = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = folder_images(path, recursive)
            if not found:
                raise VLMError(f"folder {pattern} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        elif path.exists():
            found = [path]
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            found = [Path(match) for match in matches if Path(match).is_file()]
            if not found:
                raise VLMError(f"pattern {pattern} matches no file")
        else:
            raise VLMError(f"{pattern}: no such file or folder")
        paths += [str(found_path) for found_path in found]
    return list(dict.fromkeys(paths))  # each image once, first place kept


def read_jsonl(path):
    """The lines of an earlier --output-jsonl FILE, checked: each a JSON object with an "image"."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "image" not in record:
            raise VLMError(f"{path} line {number} is not a line --output-jsonl writes, so it "
                           "cannot be resumed")
    return lines


def write_atomically(path, write):
    """The whole file or nothing: `write(temporary)` makes a temporary file beside `path`, which is
    then synced to disk and renamed over it."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        raise VLMError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        Path(temporary).unlink(missing_ok=True)  # there only after a failure or an interrupt


class Batch:
    """--batch: the images are found, and with --resume the earlier lines read, before the model
    loads (so a bad flag or an empty folder fails at once); run() then answers them --batch-size at
    a time, one JSON line each, in input order."""

    def __init__(self, args):
        output = args.output_jsonl
        if args.image:
            raise VLMError("give --image or --batch, not both")
        if args.batch_size is not None and args.batch_size <= 0:
            raise VLMError(f"batch-size must be positive, got {args.batch_size}")
        if args.resume and not output:
            raise VLMError("--resume needs --output-jsonl FILE (the lines to resume from)")
        if output and Path(output).exists() and not args.resume:
            raise VLMError(f"{output} exists: --resume adds the missing images to it")
        if output and not Path(output).absolute().parent.is_dir():
            raise VLMError(f"cannot write {output}: no such folder")
        self.args = args
        self.paths = batch_paths(args.batch, args.recursive)
        self.lines = []  # the JSON lines written, with --resume an earlier run's first
        if args.resume and Path(output).exists():
            self.lines = read_jsonl(output)
        answered = {json.loads(line)["image"] for line in self.lines}
        self.todo = [path for path in self.paths if path not in answered]
        self.shown = args.progress or sys.stderr.isatty()

    def run(self, model, decode, make_inputs, vision, describe=None):
        """Answer every image still to do. `make_inputs(images)`: the processor's inputs for a list
        of PIL images (one prompt each); `decode(ids)`: text; `vision`: the vision tower (for the
        tiles' progress); `describe(text, image)`: more fields for a line (PaliGemma's objects).
        Failed images carry an "error" and make the run an error at the end."""
        device = next(model.parameters()).device
        size = self.args.batch_size or BATCH_SIZE.get(device.type, BATCH_SIZE["cpu"])
        terminal = sys.stderr.isatty()
        start = time.perf_counter()
        total = len(self.todo)
        try:
            for first in range(0, total, size):
                paths = self.todo[first:first + size]
                records = self.answer(paths, model, decode, make_inputs, vision, describe)
                self.write([json.dumps(record) for record in records])
                if self.shown:
                    show_status(progress_text(first + len(paths), total, start), terminal)
        except KeyboardInterrupt:
            raise VLMError("interrupted: the lines written so far are kept (--resume goes "
                           "on)") from None
        if self.shown and terminal:
            print(file=sys.stderr)  # keep the last progress line
        failed = sum("error" in json.loads(line) for line in self.lines)
        if failed:
            raise VLMError(f"{failed} of {len(self.paths)} images failed (their lines say why)")

    def answer(self, paths, model, decode, make_inputs, vision, describe):
        """One batch -> its records in order; an image that cannot be read gets its error."""
        records = {}
        images = {}
        for path in paths:
            try:
                images[path] = open_image(path)
            except VLMError as e:
                records[path] = {"image": path, "prompt": self.args.prompt, "error": first_line(e)}
        try:
            records.update(self.generate(images, model, decode, make_inputs, vision, describe))
        except VLMError as e:  # rare (one image too long for the context): the batch fails
            for path in images:
                records[path] = {"image": path, "prompt": self.args.prompt, "error": first_line(e)}
        return [records[path] for path in paths]

    def generate(self, images, model, decode, make_inputs, vision, describe):
        """{path: image} -> {path: record}, the images generated as one left-padded batch."""
        if not images:
            return {}
        args = self.args
        device = next(model.parameters()).device
        start = time.perf_counter()
        inputs = make_inputs(list(images.values()))
        inputs = {name: value.to(device) for name, value in inputs.items()}
        with encoding_progress(vision, inputs, self.shown):
            new_ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed, compiled=args.compile)
        seconds = (time.perf_counter() - start) / len(images)  # each image's share of the batch
        records = {}
        for (path, image), ids in zip(images.items(), new_ids.tolist()):
            text = decode(ids)
            ends = [position for position, token in enumerate(ids) if token in model.stop]
            n_tokens = len(ids)
            if ends:
                n_tokens = ends[0] + 1  # up to its end token; the rest is the batch's padding
            records[path] = {"image": path, "prompt": args.prompt, "text": text,
                             "tokens": n_tokens, "seconds": round(seconds, 3)}
            if describe is not None:
                records[path].update(describe(text, image))
        return records

    def write(self, lines):
        """A batch's lines: to stdout, or added to --output-jsonl FILE, which is rewritten whole."""
        self.lines += lines
        if not self.args.output_jsonl:
            print("\n".join(lines), flush=True)
            return
        text = "".join(line + "\n" for line in self.lines)

        def write_text(temporary):
            Path(temporary).write_text(text, encoding="utf-8")

        write_atomically(self.args.output_jsonl, write_text)


def progress_text(done, total, start):
    """`8/16 images, 0.52 images/s, 0:15 left`"""
    rate = done / (time.perf_counter() - start)
    minutes, seconds = divmod(round((total - done) / rate), 60)
    return f"{done}/{total} images, {rate:.2f} images/s, {minutes}:{seconds:02d} left"


def run_cli(main):
    """Our errors become `error: <one line>` and exit code 1; any other exception is a bug and keeps
    its traceback. PIL's warning about a big image (89-179 megapixels) is silenced: such an image is
    read (as transformers reads it), a bigger one refused, and either way stderr holds at most our
    one line."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        main()
    except VLMError as e:
        sys.exit(f"error: {e}")  # printed to stderr, exit code 1
