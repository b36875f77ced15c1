"""What paligemma.py, smolvlm.py and perception_lm.py share: the functions their modules call, the
loading of a checkpoint, and generation. Nothing model-specific (each model file holds its whole
model: vision encoder, projector, and the decoder with its own attention module and MLP) and no
tooling (quantizing, the command line, the --batch runner and compiled decoding live in tool files
of their own, README "Reading a model file"). A model file needs only this file.

Sections, top to bottom:
  error type        VLMError (a problem with the user's input: the CLIs print it as one line)
  config            reading config.json sections into dataclasses, the RoPE base
  RoPE              frequencies, cos/sin for positions, the rotation
  attention         attend (SDPA, grouped-query), make_mask, KVCache
  loss and context  next_token_loss (training), check_context
  layers            Linear (the decoders' projections; on a CPU, decode kernels chosen by
                    timing them: KERNELS, faster), Embedding
  images and video  open_image, RGB conversion, resizing, normalising, PyAV decoding
  checkpoints       hub or local resolution, device and dtype, strict safetensors loading (with a
                    per-tensor hook that quantize.py uses), tied weights, end-of-turn ids
  text              tokenizer, chat template (finding and rendering it), placeholders, padding
                    (with training labels), decoding
  generation        sampling (greedy, top-k, nucleus) and the decode loop all three models use

Shapes: B batch, T new tokens, S keys (cache length so far), H query heads, K key/value heads, D
head dim.
"""
import json
import math
import re
import timeit
from dataclasses import fields
from functools import cache, partial
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
    (non-pad) tokens; CAUSAL for a causal prefill without pads (SDPA's fast path). (A decode step
    has masks of its own: the models' decode_step.)"""
    S = keys.shape[1]
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
        self.len = 0  # filled positions; the prefill's forward and generate()'s steps advance it
        # a decode step's write position (decode_step, eager or compiled), as a tensor (1,): with it
        # set, update() returns every slot, filled or not, so each step has the same shapes (its
        # mask hides the empty slots) and a compiled step's code is reused
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


# ------------------------------------------------------------ layers

# (out, in, dtype, rows, threads) -> the form of a few-row product timed fastest on this machine
KERNELS = {}


class Linear(nn.Linear):
    """nn.Linear with a CPU decode path whose kernel is chosen by measurement. A decode step
    multiplies each weight by a few rows of x, as x @ w.T (the matrix-matrix kernel) or as w @ x
    (the matrix-vector one); which streams the weights faster depends on the CPU and the shape, by
    up to 2x either way (bench/RESULTS.md: w @ x won on an AMX Xeon, x @ w.T on most shapes of an
    AMD EPYC). So each shape's first few-row call on a CPU times both and keeps the faster in
    KERNELS (a few ms a shape, 0.24 s for PerceptionLM-1B's 0.5 GB head); --verbose lists them.
    The decoders build every projection from this class, so a variant (quantized weights, say) can
    replace these modules without touching a model's forward code. Compiled (generate(...,
    compiled=True)), it is a plain F.linear: the compiler packs the weight and picks its own
    kernel."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        timed = x.dtype != torch.float32 and x.device.type == "cpu" and self.bias is None
        if not timed or rows > 32 or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        x_rows = x.reshape(rows, -1)  # (rows, in)
        key = (*self.weight.shape, x.dtype, rows, torch.get_num_threads())
        if key not in KERNELS:
            KERNELS[key] = faster({"x @ w.T": partial(F.linear, x_rows, self.weight),
                                    "w @ x": partial(torch.matmul, self.weight, x_rows.t())})
        if KERNELS[key] == "x @ w.T":
            return F.linear(x, self.weight)
        y = self.weight @ x_rows.t()  # (out, rows): one row runs the matrix-vector kernel
        return y.t().contiguous().view(*x.shape[:-1], -1)  # (..., out)


def faster(runs, margin=0.9):
    """{name: a call, other name: another call} -> the name of the faster, each call timed 4 times
    (its shortest counts, so a first call's page faults do not): the first stays unless the second
    takes < `margin` of its time, so timing noise does not swap near-equal ones from run to run."""
    first, second = [min(timeit.repeat(run, repeat=4, number=1)) for run in runs.values()]
    names = list(runs)
    return names[1] if second < margin * first else names[0]


class Embedding(nn.Embedding):
    """nn.Embedding with no random initialisation on the meta device, where load() builds a model:
    there it would import torch._dynamo (~2 s spent for nothing, since every weight is then
    loaded). Elsewhere (a model built for training from scratch) it initialises as usual."""

    def reset_parameters(self):
        if self.weight.device.type != "meta":
            super().reset_parameters()


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


@cache
def fast_bf16(device_type):
    """Whether bf16 matrix products beat fp32 ones on this device: CUDA, yes. A CPU's flags do not
    tell (AVX512-BF16 or AMX: 1.5-3x faster; AVX2 only: ~5x slower, bench/RESULTS.md), so a
    prefill-sized product is timed in both, once a process (~0.03 s on a 2-core EPYC)."""
    if device_type != "cpu":
        return device_type == "cuda"
    x = torch.randn(512, 1024)  # (512, 1024) @ (1024, 512): a prompt's product
    runs = {"fp32": partial(torch.mm, x, x.T),
            "bf16": partial(torch.mm, x.bfloat16(), x.T.bfloat16())}
    return faster(runs, margin=1.0) == "bf16"


def choose_device_and_dtype(device=None, dtype=None):
    """-> (torch.device, torch.dtype). The device defaults to CUDA when there is one. The dtype
    defaults to bf16 (half the bytes to read; the checkpoints' own) where matrix products were timed
    faster in it (fast_bf16), else fp32: on an AVX2-only CPU a bf16 matrix product runs ~5x slower
    than fp32 (bench/), and image prompts are matrix products."""
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
        dtype = torch.bfloat16 if fast_bf16(device.type) else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise VLMError(f"unknown dtype {dtype} (use float32, bfloat16 or float16)")
    return device, dtype


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


def load_weights(make, folder, rename, device=None, dtype=None, prepare=None):
    """`make()` with the weights of the checkpoint in `folder`, in four steps: choose the device and
    dtype; build the model on the meta device (no memory, no random init); read the shards with the
    strict check of read_checkpoint, converting each tensor to the dtype as it is read; put the
    tensors in place, tying the weights the model shares. `prepare`, a tool's hook (quantize.py's
    quantizer), is called with the meta model before the read, as prepare(model, tied, device,
    dtype, convert): it may change the model's modules and the `tied` pairs and returns the
    per-tensor converter to use instead of `convert`. model.quantization: a one-line summary for
    --verbose (None: not quantized)."""
    device, dtype = choose_device_and_dtype(device, dtype)
    with torch.device("meta"):
        model = make()
    tied = tied_parameters(model)
    expected = {name: t.shape for name, t in model.state_dict().items() if name not in tied}
    model.quantization = None
    # On AVX2-only CPUs, MKL's fp32 matrix-vector product (a decode step) reads a tall matrix up to
    # 2x faster stored column-major (bench/); on AVX-512 ones it gains ~3% and would triple the load
    # time (a transposing copy). The vision towers only multiply matrices, so they keep their
    # layout.
    relayout = device.type == "cpu" and dtype == torch.float32 and not fast_bf16(device.type)

    def convert(name, read):  # a tensor as read -> {name: it in the model's dtype}
        tensor = read()
        tall = tensor.dim() == 2 and tensor.shape[0] >= tensor.shape[1]
        if relayout and tall and "vision" not in name:
            tensor = tensor.t().contiguous().t()  # column-major; .to() keeps the layout
        return {name: tensor.to(dtype)}

    if prepare is not None:
        convert = prepare(model, tied, device, dtype, convert)
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


def find_chat_template(folder, processor_config, fallback=None):
    """The chat template in transformers' order: processor_config.json's `chat_template` (older
    checkpoints), else chat_template.jinja, else chat_template.json's, else the `fallback` config's
    (tokenizer_config.json, where a family reads it); None when there is none."""
    if processor_config.get("chat_template"):
        return processor_config["chat_template"]
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    for config in (optional_json(Path(folder) / "chat_template.json"), fallback or {}):
        if config.get("chat_template"):
            return config["chat_template"]
    return None


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


def expand_placeholders(prompts, blocks):
    """Each placeholder in the prompts replaced by the next text of its list, in order across the
    prompts: `blocks` is {placeholder: [the text each of its occurrences stands for, ...]}."""
    placeholder = re.compile("|".join(re.escape(token) for token in blocks))
    texts = {token: iter(token_blocks) for token, token_blocks in blocks.items()}
    return [placeholder.sub(lambda found: next(texts[found.group()]), prompt) for prompt in prompts]


def text_inputs(tokenizer, rows, pad_id, answers=None):
    """Rows of prompt ids (lists) -> input_ids and attention_mask, left-padded. With `answers`
    (training: one per row), each row is extended in place by its answer's ids, and `labels` are
    added: -100 on the prompt (never learned), the answer's ids on the answer."""
    if isinstance(answers, str):
        answers = [answers]
    if answers is not None and len(answers) != len(rows):
        raise VLMError(f"got {len(answers)} answers (suffix) for {len(rows)} prompts")
    labels = []
    for row, answer in zip(rows, answers or []):
        answer_ids = tokenizer.encode(answer, add_special_tokens=False).ids
        labels.append([-100] * len(row) + answer_ids)
        row.extend(answer_ids)
    inputs = {"input_ids": left_pad(rows, pad_id),
              "attention_mask": left_pad([[1] * len(row) for row in rows], 0)}
    if answers is not None:
        inputs["labels"] = left_pad(labels, -100)
    return inputs


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


def check_args(max_new_tokens, temperature, top_k, top_p):
    """Run by generate() and, before the slow load, by the CLIs (command_line.check_flags): the same
    message either way."""
    if max_new_tokens <= 0:
        raise VLMError(f"max-new-tokens must be positive, got {max_new_tokens}")
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
    id in `stop` and is padded with `pad_id` after. `stream` gets each new (B,) batch; it may return
    a bool (B,) of rows to end there (serve.py: a client gone, a request's own max_tokens) or None.
    Returns new ids (B, n)."""
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
            ended = stream(token)
            if ended is not None:
                done = done | ended
        done = done | torch.isin(token, stop)
        if done.all() or i == max_new_tokens - 1:
            break
        logits = step(token)
    return torch.stack(new_ids, 1)
