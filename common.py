"""The pieces paligemma.py, smolvlm.py and perception_lm.py share.

Top to bottom: the one error type, config helpers, RoPE, attention (the mask, the KV cache, the decoder's
attention and MLP blocks), image and video input, checkpoint resolution and safetensors loading, sampling
and the generation loop, command-line helpers. The vision encoders and decoders live in
the model files, so that each file reads as one whole model.
Shapes: B batch, T new tokens, S keys (cache length so far), H query heads, K key/value heads, D head dim.
"""
import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps


class VLMError(Exception):
    """A problem with the user's input (file, checkpoint, prompt, flag); the CLIs print it as one line."""


# ----------------------------------------------------------------------------- config

def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON
        raise VLMError(f"{path} {'not found' if isinstance(e, FileNotFoundError) else f'is not valid JSON ({e})'}") from None


def from_dict(cls, d):
    """A config dataclass from a config.json section, keeping the fields the class knows."""
    return cls(**{k: v for k, v in (d or {}).items() if k in {f.name for f in fields(cls)}})


def rope_theta(cfg, default=10000.0):
    """RoPE base from the hub's 4.x form (rope_theta) or the 5.x form (rope_parameters) that transformers 5
    writes when it saves a config; rope scaling, where a model has it, is read by its own file."""
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", default)))


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim, theta):
    """Rotary embedding frequencies (RoFormer, arXiv:2104.09864). Made on the CPU even while a model is
    built on the meta device: this buffer is computed, not loaded."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) -> cos, sin (B, 1, T, D), computed in fp32 and rounded to the activation dtype."""
    emb = (positions[..., None].float() * inv_freq.to(positions.device)).repeat(1, 1, 2)  # (B, T, D): [f, f]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """The half-split layout of the hub checkpoints: dimension i pairs with i + D/2 (`rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------- attention

def attend(q, k, v, mask=None, scale=None, softcap=None):
    """q (B, H, T, D), k/v (B, K, S, D), mask bool (B, 1, T, S) with True = may attend, None = all may.
    Grouped-query attention: each K/V head serves H/K query heads without being copied."""
    if softcap is None:  # CAUSAL: SDPA's own causal kernel, about twice as fast on CPU as the same explicit mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is CAUSAL else mask, scale=scale,
                                              is_causal=mask is CAUSAL, enable_gqa=q.shape[1] != k.shape[1])
    # Gemma 2 squashes scores with tanh(s / cap) * cap before the mask (arXiv:2408.00118), which SDPA cannot
    # express, so this path is written out; the softmax runs in fp32 as in the reference.
    B, H, T, D = q.shape
    s = q.view(B, k.shape[1], -1, T, D) @ k[:, :, None].transpose(-1, -2) * (scale or D ** -0.5)  # (B, K, H/K, T, S)
    s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], float("-inf"))
    return (s.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v[:, :, None]).view(B, H, T, D)


CAUSAL = "causal"


def make_mask(keys, T):
    """Causal mask (B, 1, T, S) for the last T of S positions, `keys` (B, S) marking real (non-pad) tokens;
    None when nothing is masked and CAUSAL for a plain causal prefill (SDPA's fast paths)."""
    S = keys.shape[1]
    if T in (1, S) and bool(keys.all()):
        return CAUSAL if T > 1 else None
    q, k = torch.arange(S - T, S, device=keys.device)[:, None], torch.arange(S, device=keys.device)[None]
    return ((k <= q) & keys[:, None, :] | (k == q))[:, None]  # pads are never keys; a pad query sees itself (no NaN)


class KVCache:
    """Keys and values of every layer, allocated once for prompt + new tokens and written in place."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        self.k = torch.zeros(n_layers, batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v, self.len = torch.zeros_like(self.k), 0  # len: filled positions, advanced by the model

    def update(self, layer, k, v):  # k, v (B, K, T, D) -> all keys and values so far (B, K, S, D)
        end = self.len + k.shape[2]
        self.k[layer, :, :, self.len:end], self.v[layer, :, :, self.len:end] = k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def linear(x, w):
    """x @ w.T for the decoders. In bf16 on a CPU, a decode step (a few rows of x) is faster as w @ x: the
    matrix-vector kernel streams the weights at ~1.2-1.5x the rate of the matrix-matrix one (bench/)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or (rows := x.numel() // x.shape[-1]) > 32:
        return F.linear(x, w)
    y = w @ (x.reshape(-1) if rows == 1 else x.reshape(rows, -1).t())  # (out,) or (out, rows)
    return y.t().contiguous().view(*x.shape[:-1], -1)


class SelfAttention(nn.Module):
    """Decoder attention of Gemma and Llama: q/k/v/o projections, RoPE, the cache, Gemma 2's soft-cap."""

    def __init__(self, idx, dim, n_heads, n_kv_heads, head_dim, scale=None, softcap=None):
        super().__init__()
        self.idx, self.H, self.K, self.D, self.scale, self.softcap = idx, n_heads, n_kv_heads, head_dim, scale, softcap
        self.q_proj, self.o_proj = nn.Linear(dim, n_heads * head_dim, bias=False), nn.Linear(n_heads * head_dim, dim, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(dim, n_kv_heads * head_dim, bias=False) for _ in range(2))

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = apply_rope(linear(x, self.q_proj.weight).view(B, T, self.H, self.D).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(linear(x, self.k_proj.weight).view(B, T, self.K, self.D).transpose(1, 2), cos, sin)  # (B, K, T, D)
        v = linear(x, self.v_proj.weight).view(B, T, self.K, self.D).transpose(1, 2)
        k, v = cache.update(self.idx, k, v) if cache is not None else (k, v)  # (B, K, S, D): all keys so far
        y = attend(q, k, v, mask, self.scale, self.softcap)  # scale None: SDPA's 1/sqrt(D)
        return linear(y.transpose(1, 2).reshape(B, T, self.H * self.D), self.o_proj.weight)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): GeGLU with tanh GELU in Gemma, SwiGLU in Llama (arXiv:2002.05202)."""

    def __init__(self, dim, hidden, act):
        super().__init__()
        self.act, self.down_proj = act, nn.Linear(hidden, dim, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return linear(self.act(linear(x, self.gate_proj.weight)) * linear(x, self.up_proj.weight), self.down_proj.weight)


# ----------------------------------------------------------------------------- images and video

def open_image(path):
    """Open an image file and apply its EXIF orientation (phones store photos sideways); any mode."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img)  # (a loaded copy, upright)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # missing, a directory, truncated,
        # not an image, or a huge declared size (a "decompression bomb")
        raise VLMError(f"image {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None


def image_tensor(img):
    """A PIL image, an (H, W, 3) uint8 array or a path -> uint8 tensor (3, H, W). Any PIL mode becomes RGB, with
    transparency composited on white as transformers' convert_to_rgb does."""
    img = open_image(img) if isinstance(img, (str, Path)) else img
    if hasattr(img, "convert") and img.mode != "RGB":
        alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        img = (Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")) if alpha else img).convert("RGB")
    if (x := torch.from_numpy(np.array(img, dtype=np.uint8))).dim() != 3 or x.shape[2] != 3 or 0 in x.shape:
        raise VLMError(f"an image must be (H, W, 3) pixels with H, W > 0, got shape {tuple(x.shape)}")  # empty, or not RGB
    return x.permute(2, 0, 1)


def resize(x, size, mode):
    """uint8 (N, 3, H, W) resized with antialiasing on the integers, as transformers' torchvision backend
    does on CPU: bit-exact with it, with no torchvision at run time."""
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)


def normalize(x):  # uint8 -> float32 in [-1, 1], i.e. rescale by 1/255 then mean = std = 0.5
    return (x.float() - 127.5) / 127.5


def read_video(path, pick):
    """Decode a video with PyAV, keeping only the frames `pick(total_frames, fps)` selects (a long video is
    never held in memory whole) -> uint8 (N, 3, H, W) and the metadata transformers derives."""
    import av
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:  # an audio file, or an mp4 cut before its index (stored last)
                raise VLMError(f"video {path} has no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or 0) or 24.0
            total = s.frames or int((c.duration or 0) / 1e6 * fps)
            idx = [int(i) for i in pick(total, fps)]
            # decoding stops after the last index; only the picked frames are converted to pixels
            got = {i: f.to_ndarray(format="rgb24") for i, f in zip(range(max(idx, default=-1) + 1), c.decode(s)) if i in idx}
    except (av.error.FFmpegError, OSError, ValueError) as e:  # missing, a directory, truncated, not a video
        raise VLMError(f"video {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not got or len(got) < len(idx):  # nothing decodable, or the file ends early: cut short, or damaged
        raise VLMError(f"video {path} " + (f"is truncated or damaged: only {len(got)} of the {len(idx)} frames picked could be decoded" if got else "has no decodable frames"))
    frames = torch.from_numpy(np.stack([got[i] for i in idx])).permute(0, 3, 1, 2)
    return frames, {"total_num_frames": total, "fps": fps, "duration": total / fps, "frames_indices": idx}


# ----------------------------------------------------------------------------- checkpoints

def resolve(model):
    """A local checkpoint directory, or a hub repo id fetched by huggingface_hub into its usual cache (so a
    checkpoint transformers downloaded is reused, and HF_HUB_OFFLINE=1 works)."""
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    if Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise VLMError(f"{model} is not a checkpoint directory nor a hub repo id (org/name)")
    from huggingface_hub import errors as E, snapshot_download
    try:  # weights only as safetensors: pickle (*.bin) files are never fetched, never read
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except (E.HfHubHTTPError, OSError) as e:
        why = {E.GatedRepoError: f"is gated: accept its licence at https://huggingface.co/{model}, then `hf auth login`",
               E.RepositoryNotFoundError: "was not found on the Hugging Face Hub (private repos need a login)",
               E.LocalEntryNotFoundError: "is not cached and the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network)"}
        raise VLMError(f"{model} " + next((w for t, w in why.items() if isinstance(e, t)),  # gated before not-found:
                                          f"cannot be downloaded: {str(e).splitlines()[0]}")) from None  # a subclass


def load_weights(make, folder, rename, device=None, dtype=None):
    """Build `make()` on the meta device (no memory, no random init) and read the safetensors shards of
    `folder` into it, with one strict check: every tensor maps to a parameter (`rename` gives its name, or
    None to skip it), every parameter is found, every shape matches; an error names the key. The default
    dtype is bf16 (half the bytes to read; the checkpoints' own) where matrix products are fast in it: CUDA,
    and CPUs with AVX512-BF16/AMX. Elsewhere fp32: on an AVX2-only CPU a bf16 matrix product runs ~5x slower
    than fp32 (bench/), and image prompts are matrix products."""
    from safetensors import SafetensorError, safe_open
    try:  # an unknown device name, or a GPU that is not there (a torch built without CUDA raises AssertionError)
        device = torch.empty(0, device=device or ("cuda" if torch.cuda.is_available() else "cpu")).device
    except (RuntimeError, AssertionError) as e:
        raise VLMError(f"device {device} cannot be used ({str(e).splitlines()[0]})") from None
    fast_bf16 = device.type == "cuda" or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype or (torch.bfloat16 if fast_bf16 else torch.float32)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise VLMError(f"unknown dtype {dtype} (use float32, bfloat16 or float16)")
    relayout = device.type == "cpu" and dtype == torch.float32 and not fast_bf16  # (see below)
    index = Path(folder) / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    if not index.exists() and not (Path(folder) / files[0]).exists():
        raise VLMError(f"no model.safetensors in {folder}" + (" (its *.bin pickle weights are never loaded, for safety)"
                                                              if list(Path(folder).glob("*.bin")) else ""))
    reset, nn.Embedding.reset_parameters = nn.Embedding.reset_parameters, lambda self: None
    try:  # (random init of an embedding on the meta device would import torch._dynamo: ~2 s for nothing)
        with torch.device("meta"):
            model = make()
    finally:
        nn.Embedding.reset_parameters = reset
    expected, state = model.state_dict(), {}
    for name in files:
        try:
            for key in safe_open(Path(folder) / name, framework="pt").keys():
                if (ours := rename(key)) is None:
                    continue
                if ours not in expected:
                    raise VLMError(f"unexpected tensor {key} in {name}: not a weight of this model")
                with safe_open(Path(folder) / name, framework="pt", device=str(device)) as f:  # one open per tensor:
                    if (shape := tuple(f.get_slice(key).get_shape())) != expected[ours].shape:  # the file pages a
                        raise VLMError(f"tensor {key} has shape {shape}, expected {tuple(expected[ours].shape)}")
                    t = f.get_tensor(key)  # converted tensor came from are released at once
                    # On AVX2-only CPUs, MKL's fp32 matrix-vector product (a decode step) reads a tall matrix up to 2x
                    # faster stored column-major (bench/); on AVX-512 ones it gains ~3% and would triple the load time
                    # (a transposing copy). The vision towers only multiply matrices, so they keep their layout.
                    tall = relayout and t.dim() == 2 and t.shape[0] >= t.shape[1] and "vision" not in ours
                    state[ours] = (t.t().contiguous().t() if tall else t).to(dtype)  # .to keeps the layout
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # a missing or truncated shard, a bad header
            raise VLMError(f"cannot read weights {Path(folder) / name}: {str(e).splitlines()[0]}") from None
    if missing := [k for k in expected if k not in state]:
        raise VLMError(f"weight {missing[0]} is missing from {folder} ({len(missing)} missing in all)")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def stop_ids(folder, *extra):
    """The union of the end ids in config.json (and its text_config), generation_config.json and `extra`."""
    config, gen = read_json(Path(folder) / "config.json"), Path(folder) / "generation_config.json"
    ids = {i for i in extra if i is not None}
    for e in (c.get("eos_token_id") for c in (config, config.get("text_config") or {}, read_json(gen) if gen.exists() else {})):
        ids.update(e if isinstance(e, list) else [] if e is None else [e])
    return sorted(ids)


# ----------------------------------------------------------------------------- sampling and generation

def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token ids (B,); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.shape[-1])).values[:, -1:], float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1:  # nucleus sampling: the smallest set of most likely tokens with mass >= top_p,
        # looked for among the 1024 most likely (all of them, if those fall short of top_p): no full sort
        p, idx = t if (t := probs.topk(min(1024, probs.shape[-1]))).values.sum(-1).min() >= top_p else probs.topk(probs.shape[-1])
        p[(p.cumsum(-1) - p) > top_p] = 0
        return idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_args(max_new_tokens, temperature, top_k, top_p, prompt=""):
    """Run by generate() and, before the slow load, by the CLIs: the same message either way. (A command line
    with bytes that are not UTF-8 reaches Python as lone surrogates, which no tokenizer accepts.)"""
    for bad, message in ((max_new_tokens <= 0, f"max-new-tokens must be positive, got {max_new_tokens}"),
                         (any("\ud800" <= c <= "\udfff" for c in prompt), "the prompt is not valid UTF-8 text"),
                         (not 0 <= temperature < math.inf, f"temperature must be >= 0, got {temperature}"),
                         (top_k is not None and top_k <= 0, f"top-k must be positive, got {top_k}"),
                         (top_p is not None and not 0 < top_p <= 1, f"top-p must be in (0, 1], got {top_p}")):
        if bad:
            raise VLMError(message)


@torch.inference_mode()
def generate(step, logits, max_new_tokens, stop, pad_id, temperature=0.0, top_k=None, top_p=None, seed=None, stream=None):
    """The decode loop of all three models. `logits` (B, V) come from the prefill's last position;
    `step(tokens (B,))` runs one cached decode step and returns the next (B, V). A row stops at any id in
    `stop` and is padded with `pad_id` after. `stream` gets each new (B,) batch. Returns new ids (B, n)."""
    check_args(max_new_tokens, temperature, top_k, top_p)
    gen = torch.Generator(logits.device).manual_seed(seed) if seed is not None else None
    stop, done, out = torch.tensor(stop, device=logits.device), torch.zeros(len(logits), dtype=torch.bool, device=logits.device), []
    for i in range(max_new_tokens):
        if not torch.isfinite(logits).all():
            raise VLMError("the model produced non-finite logits: a float16 overflow (use --dtype bfloat16 or float32) or corrupted weights")
        tok = sample(logits, temperature, top_k, top_p, gen).masked_fill(done, pad_id)
        out.append(tok)
        if stream is not None:
            stream(tok)
        done |= torch.isin(tok, stop)
        if done.all() or i == max_new_tokens - 1:
            return torch.stack(out, 1)
        logits = step(tok)


class Streamer:
    """Prints row 0 of the new ids as text as it comes: decode all so far, print what is new, but hold back
    a trailing partial UTF-8 character (byte-fallback tokens) until it is whole. Records token times."""

    def __init__(self, decode):
        self.decode, self.ids, self.shown, self.times = decode, [], 0, [time.perf_counter()]

    def __call__(self, tok=None):  # no token: the end, print the rest and a newline
        if tok is not None:
            self.times.append(time.perf_counter())
            self.ids.append(int(tok[0]))
        text = self.decode(self.ids)
        if tok is None or not text.endswith("\ufffd"):
            print(text[self.shown:], end="" if tok is not None else "\n", flush=True)
            self.shown = len(text)

    def report(self, t_load):
        t, n = self.times, len(self.times) - 1
        rate = (n - 1) / (t[-1] - t[1]) if n > 1 else float("nan")  # the tokens after the first, over their time
        print(f"load {t_load:.2f} s, prefill {t[1] - t[0]:.2f} s (to the first token), decode {rate:.1f} tokens/s ({n} tokens)", file=sys.stderr)


# ----------------------------------------------------------------------------- command line

def cli_parser(description, default_model):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=default_model, help=f"hub repo id or local directory (default {default_model})")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", default="", help="the text prompt")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many new tokens (default 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--verbose", action="store_true", help="print timings (load, prefill, tokens/s) to stderr")
    return p


def run_cli(main):
    """Our errors become `error: <one line>` and exit code 1; any other exception is a bug and keeps its
    traceback. PIL's warning about a big image (89-179 megapixels) is silenced: such an image is read (as
    transformers reads it), a bigger one refused, and either way stderr holds at most our one line."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        main()
    except VLMError as e:
        sys.exit(f"error: {e}")  # printed to stderr, exit code 1
