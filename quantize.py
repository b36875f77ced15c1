"""Quantized decoder weights: `load(..., quantize="int8" | "int4")` and the CLIs' `--quantize`.

A tool, as gpt-fast keeps quantize.py beside its model: the model files import it only when a load
asks for quantized weights (their `load()`), and nothing else depends on it. It holds the quantized
layers (Int8Linear, Int4Linear), the round-to-nearest schemes, and `quantizer()`, the hook that
common.load_weights calls to swap a model's decoder Linears before the weights are read and to
quantize each weight as it is read.

Every decoder Linear (projections, MLPs, output head) is replaced; the vision tower and the
projector keep their dtype (4-bit vision towers broke other ports: bnb#963, tf#34294). Weights
only: activations stay in the model's dtype. Kernels: torch's own CPU ones.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Linear, VLMError

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
        # (n, in), contiguous: the kernel refuses a strided view (a batch's last positions)
        rows = x.reshape(-1, self.in_features).contiguous()
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


def quantizer(quantize):
    """The hook of common.load_weights for `quantize` ("int8" or "int4"): called with the model on
    the meta device, it replaces the decoder Linears, gives a tied head its own quantized copy, and
    returns the per-tensor converter that quantizes each weight as it is read."""
    if quantize not in ("int8", "int4"):
        raise VLMError(f"unknown quantization {quantize!r} (use int8 or int4)")

    def prepare(model, tied, device, dtype, convert):
        if device.type != "cpu":
            raise VLMError(f"--quantize runs on the CPU only (its kernels are not verified on "
                           f"{device.type})")
        quantized, model.quantization = quantize_linears(model, quantize, dtype)
        # A quantized head tied to the embedding gets its own quantized copy, made when the
        # embedding is read; the embedding stays in the model's dtype for its lookups.
        head_of = {}  # {embedding name: quantized head name}
        for name in [name for name in tied if name in quantized]:
            head_of[tied.pop(name)] = name

        def quantized_entries(name, tensor):  # a weight -> its quantized module's buffers
            prefix = name.removesuffix("weight")
            buffers = quantize_in_blocks(quantized[name], tensor)
            return {prefix + key: value for key, value in buffers.items()}

        def convert_or_quantize(name, read):
            if name in quantized:
                return quantized_entries(name, read())
            entries = {}
            if name in head_of:  # read for itself: the embedding's pages it touches are let go
                entries = quantized_entries(head_of[name], read())
            entries.update(convert(name, read))
            return entries

        return convert_or_quantize

    return prepare
