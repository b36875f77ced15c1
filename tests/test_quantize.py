"""load(..., quantize="int8" | "int4") on every fixture variant of the three families.

What is checked:
- the numerics: int8 and int4 round-to-nearest within half a step of the weights, int4 packing
  round-trips through torch's kernel, packing in row blocks equals packing whole;
- the kernels compute exactly the scheme: the quantized model's logits equal (1e-3 relative) those
  of our fp32 model whose decoder weights are replaced by the same quantized values, dequantized
  here in plain torch; greedy decoding (the few-row kernels) gives the same tokens;
- the scheme is no worse than plain round-to-nearest: against the fp32 model, the relative logit
  error ||quantized - fp32|| / ||fp32|| is at most 1.1x that of a round-to-nearest reference of the
  same bits and group size written here (int8: symmetric per channel; int4: min-max per group of
  64, per channel in int8 where the int4 kernel cannot take the shape). The errors and the argmax
  agreement are printed (pytest -s) and recorded in the README;
- fallbacks are counted (--verbose), greedy generation runs end to end in bf16, the vision tower
  and projector are left alone, the CLI flag, CUDA is refused.

The fixtures are tiny random models: their errors say nothing about quality on real checkpoints
(random weights have no structure for quantization to exploit)."""
import pytest
import torch
import torch.nn as nn

import common
import quantize as Q  # the tool file (the name `quantize` is the option here)
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import smolvlm
import smolvlm_fixture
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)
from helpers import cli_in_process

FAMILIES = {"pg1": (paligemma, paligemma_fixture), "pg2": (paligemma, paligemma_fixture),
            "v1": (smolvlm, smolvlm_fixture), "v1big": (smolvlm, smolvlm_fixture),
            "v2": (smolvlm, smolvlm_fixture), "1b": (perception_lm, perception_lm_fixture),
            "8b": (perception_lm, perception_lm_fixture)}
VARIANTS = list(FAMILIES)
GROUP = Q.INT4_GROUP


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Each variant as its family's tests build it (pg2, v1big, 8b: bf16 shards)."""
    root = tmp_path_factory.mktemp("quantize")
    bf16 = {"pg2", "v1big", "8b"}
    folders = {}
    for variant, (_, fixture) in FAMILIES.items():
        dtype = torch.bfloat16 if variant in bf16 else torch.float32
        folders[variant] = fixture.build(root / variant, variant, shards=1 + (variant in bf16),
                                         dtype=dtype, check=False)
    return folders


def prompt(variant, processor, image):
    """One image and a question, as each family is prompted."""
    if FAMILIES[variant][0] is paligemma:
        return processor(text=["caption en"], images=[[image]])
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True)
    if FAMILIES[variant][0] is smolvlm:
        return processor(text=[text], images=[[image]])
    return processor(text=[text], images=[image])


@pytest.fixture(scope="module")
def models(ckpt):
    """{variant: {None | "int8" | "int4": (model, processor)}}, all with fp32 activations."""
    loaded = {}
    for variant, (module, _) in FAMILIES.items():
        loaded[variant] = {q: module.load(str(ckpt[variant]), dtype=torch.float32, quantize=q)
                           for q in (None, "int8", "int4")}
    return loaded


# ----------------------------------------------------------------------------- references

def dequantized_int8(module):
    """The weight an Int8Linear multiplies by, from its buffers."""
    return module.weight.float() * module.scale.float()[:, None]


def dequantized_int4(module, weight):
    """The weight an Int4Linear multiplies by: `weight` quantized again by the same function, its
    packing checked to be the module's, then dequantized here (q * scale + low per group)."""
    q, scale, low = Q.quantize_int4(weight, GROUP)
    assert torch.equal(Q.pack_int4(q), module.weight)
    scale = scale.repeat_interleave(GROUP, dim=1)  # (out, in)
    low = low.repeat_interleave(GROUP, dim=1)
    return q.float() * scale + low


def round_to_nearest(weight, bits):
    """Plain round-to-nearest, written independently of common.py: int8 symmetric per output
    channel; int4 min-max per group of 64 inputs."""
    if bits == 8:
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(weight / step).clamp(-127, 127) * step
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // GROUP, GROUP)
    low = groups.amin(dim=-1, keepdim=True)
    step = (groups.amax(dim=-1, keepdim=True) - low) / 15
    return (torch.round((groups - low) / step) * step + low).reshape(out_features, in_features)


def with_weights(model, quantized, weight_for):
    """`model` (fp32, changed in place) with each decoder Linear's weight replaced by
    weight_for(quantized module, original weight). A tied head gets its own parameter: the
    embedding keeps its weights."""
    for name, module in quantized.named_modules():
        if isinstance(module, (Q.Int8Linear, Q.Int4Linear)):
            linear = model.get_submodule(name)
            new_weight = weight_for(module, linear.weight.detach())
            linear.weight = nn.Parameter(new_weight, requires_grad=False)
    return model


def same_scheme(module, weight):
    if isinstance(module, Q.Int8Linear):
        return dequantized_int8(module)
    return dequantized_int4(module, weight)


def plain_rounding(module, weight):
    bits = 8 if isinstance(module, Q.Int8Linear) else 4
    return round_to_nearest(weight, bits)


def relative_error(logits, reference):
    return float((logits - reference).norm() / reference.norm())


# ----------------------------------------------------------------------------- numerics

def test_int8_is_within_half_a_step():
    weight = torch.randn(40, 96) * torch.rand(40, 1) * 3  # rows of different scales
    weight[3] = 0  # an all-zero row must not divide by zero
    q, scale = Q.quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-6).all())
    assert bool((q[3] == 0).all())


def test_int4_is_within_half_a_step_and_the_group_ends_are_exact():
    weight = torch.randn(32, 4 * GROUP) + torch.randn(32, 4, 1).repeat_interleave(GROUP, 2).view(
        32, -1)  # groups with different offsets
    q, scale, low = Q.quantize_int4(weight, GROUP)
    assert q.dtype == torch.uint8 and int(q.max()) == 15 and int(q.min()) == 0
    step = scale.repeat_interleave(GROUP, dim=1)
    dequantized = q.float() * step + low.repeat_interleave(GROUP, dim=1)
    assert bool(((dequantized - weight).abs() <= step / 2 + 1e-5).all())
    groups = weight.view(32, 4, GROUP)
    assert torch.allclose(low, groups.amin(-1))  # each group's minimum is a level


def test_int4_packing_round_trips_through_the_kernel():
    """Multiplying the identity by the packed weights, with scale 1 and zero 8 (the kernel
    computes (q - 8) * scale + zero), gives back every q (2,096 rows: a tail of 48 after the
    kernel's blocks of 64)."""
    q = torch.randint(0, 16, (2096, 128), dtype=torch.uint8)
    packed = Q.pack_int4(q)
    assert packed.shape == (2096, 64) and packed.dtype == torch.uint8
    scale_and_zero = torch.zeros(128 // GROUP, 2096, 2)
    scale_and_zero[..., 0] = 1
    scale_and_zero[..., 1] = 8
    identity = torch.eye(128)
    unpacked = torch._weight_int4pack_mm_for_cpu(identity, packed, GROUP, scale_and_zero)
    assert torch.equal(unpacked.t(), q.float())


@pytest.mark.parametrize("kind", [Q.Int8Linear, Q.Int4Linear])
@pytest.mark.parametrize("rows", [1, 3, 32, 33, 200])
def test_linear_modules_equal_the_dequantized_product(kind, rows):
    """Both paths: the int8/int4 kernels for up to 32 rows, the int8 module's dtype matrix product
    on converted weights above."""
    torch.manual_seed(rows)
    weight = torch.randn(48, 2 * GROUP)
    module = kind(2 * GROUP, 48, torch.float32)
    for key, value in Q.quantize_in_blocks(module, weight).items():
        setattr(module, key, value)
    x = torch.randn(2, rows, 2 * GROUP)
    expected = x @ same_scheme(module, weight).t()
    y = module(x)
    assert y.shape == (2, rows, 48)
    assert relative_error(y, expected) < 1e-5


def test_quantizing_a_tall_matrix_in_row_blocks_is_the_same():
    """Blocks of 1024 rows and a tail of 48 (int4 packs its own blocks of 64 rows)."""
    weight = torch.randn(Q.QUANTIZE_ROWS * 2 + 48, GROUP)
    module = Q.Int4Linear(GROUP, len(weight), torch.float32)
    buffers = Q.quantize_in_blocks(module, weight)
    whole = module.quantize(weight)
    assert all(torch.equal(buffers[key], whole[key]) for key in whole)
    assert buffers["scale_and_zero"].shape == (1, len(weight), 2)


# ----------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_models_compute_the_scheme_and_beat_plain_rounding(variant, ckpt, models,
                                                                     images):
    module, _ = FAMILIES[variant]
    reference, processor = models[variant][None]
    inputs = prompt(variant, processor, images[0])
    with torch.inference_mode():
        full = reference(**inputs)  # (1, T, V) fp32
    for quantize, bits in (("int8", 8), ("int4", 4)):
        quantized, _ = models[variant][quantize]
        with torch.inference_mode():
            logits = quantized(**inputs)
        same, _ = module.load(str(ckpt[variant]), dtype=torch.float32)
        rounded, _ = module.load(str(ckpt[variant]), dtype=torch.float32)
        with_weights(same, quantized, same_scheme)
        with_weights(rounded, quantized, plain_rounding)
        with torch.inference_mode():
            same_logits = same(**inputs)
            rounded_logits = rounded(**inputs)
        assert relative_error(logits, same_logits) < 1e-3, (variant, quantize)
        error = relative_error(logits, full)
        plain = relative_error(rounded_logits, full)
        agreement = float((logits.argmax(-1) == full.argmax(-1)).float().mean())
        print(f"\n{variant} {quantize}: relative logit error {error:.4f} (plain round-to-nearest "
              f"{plain:.4f}), argmax agreement {agreement:.1%} over {logits.shape[1]} positions")
        assert error <= 1.1 * plain, (variant, quantize, error, plain)
        assert error > 0  # the weights really are quantized
        # the decode path (one row a step, the int8/int4 kernels) gives the same greedy tokens
        new = quantized.generate(**inputs, max_new_tokens=6)
        assert torch.equal(new, same.generate(**inputs, max_new_tokens=6)), (variant, quantize)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_decoder_is_quantized(variant, models):
    reference, _ = models[variant][None]
    for quantize in ("int8", "int4"):
        quantized, _ = models[variant][quantize]
        decoder_linears = [name for name, m in reference.named_modules()
                           if isinstance(m, common.Linear)]
        swapped = [name for name, m in quantized.named_modules()
                   if isinstance(m, (Q.Int8Linear, Q.Int4Linear))]
        assert swapped == decoder_linears and swapped
        assert not any(isinstance(m, common.Linear) for m in quantized.modules())
        # vision tower, projector, norms and the token embedding keep their fp32 weights
        for name, weight in quantized.named_parameters():
            assert weight.dtype == torch.float32, name
            assert torch.equal(weight, reference.get_parameter(name)), name
        embedding = [m for m in quantized.modules() if isinstance(m, nn.Embedding)]
        assert embedding and all(e.weight.dtype == torch.float32 for e in embedding)


@pytest.mark.parametrize("variant", VARIANTS)
def test_int4_falls_back_to_int8_where_its_kernel_cannot_and_says_how_often(variant, models):
    """The int4 kernel needs in-features a multiple of the group (64) and out-features of 16; the
    tiny shapes miss that here and there (v1big: hidden 48 and MLP 96, every matrix; 8b: MLP 160;
    odd vocabularies), the real ones never."""
    reference, _ = models[variant][None]
    quantized, _ = models[variant]["int4"]
    linears = [m for m in reference.modules() if isinstance(m, common.Linear)]
    misfits = [m for m in linears if m.in_features % GROUP or m.out_features % 16]
    n_int8 = sum(isinstance(m, Q.Int8Linear) for m in quantized.modules())
    assert n_int8 == len(misfits)
    assert quantized.quantization.startswith(f"int4: {len(linears)} decoder matrices quantized, "
                                             f"{len(misfits)} of them in int8")
    assert models[variant]["int8"][0].quantization == (f"int8: {len(linears)} decoder matrices "
                                                       "quantized")
    assert models[variant][None][0].quantization is None
    if variant == "v1big":
        assert len(misfits) == len(linears)


@pytest.mark.parametrize("variant", ["pg2", "v2", "1b"])
def test_greedy_generation_in_bf16(variant, ckpt, models, images):
    """The CPU default dtype: bf16 activations and bf16 scales. A run end to end per family, its
    first logits within a few percent of the fp32-activation quantized model's."""
    module, _ = FAMILIES[variant]
    for quantize in ("int8", "int4"):
        model, processor = module.load(str(ckpt[variant]), dtype=torch.bfloat16,
                                       quantize=quantize)
        inputs = prompt(variant, processor, images[1])
        new = model.generate(**inputs, max_new_tokens=8)
        assert new.shape[0] == 1 and 1 <= new.shape[1] <= 8
        assert isinstance(processor.decode(new[0]), str)
        fp32_model, _ = models[variant][quantize]
        with torch.inference_mode():
            logits = model(**inputs)[:, -1].float()
            expected = fp32_model(**inputs)[:, -1]
        assert relative_error(logits, expected) < 0.05, (variant, quantize)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_left_padded_batch_generates_what_each_row_does_alone(quantize, models, images):
    """Two prompts of different lengths in one generate(): the prefill hands the output head its
    last positions as a strided view, which torch's int4 kernel refused ("expect A to be
    contiguous": --batch with --quantize int4 failed on every batch of two or more)."""
    model, processor = models["pg1"][quantize]
    texts = ["caption en", "answer en where is the cow standing? describe the picture in detail"]
    inputs = processor(text=texts, images=[[images[0]], [images[1]]])
    assert not inputs["attention_mask"].all()
    new = model.generate(**inputs, max_new_tokens=6)
    for i in range(2):
        alone = processor(text=[texts[i]], images=[[images[i]]])
        assert torch.equal(new[i], model.generate(**alone, max_new_tokens=6)[0]), i


def test_cli_flag(ckpt, models, images, tmp_path):
    path = tmp_path / "picture.png"
    images[0].save(path)
    model, processor = models["v1big"]["int4"]
    r = cli_in_process(smolvlm, "--model", ckpt["v1big"], "--dtype", "float32", "--image", path,
                       "--prompt", "Describe the image.", "--max-new-tokens", "6", "--quantize",
                       "int4", "--verbose")
    assert r.returncode == 0, r.stderr
    inputs = prompt("v1big", processor, common.open_image(path))
    expected = processor.decode(model.generate(**inputs, max_new_tokens=6)[0])
    assert r.stdout == expected + "\n"
    assert "int4: 15 decoder matrices quantized, 15 of them in int8" in r.stderr
    r = cli_in_process(paligemma, "--model", ckpt["pg1"], "--image", path, "--quantize", "int3")
    assert r.returncode == 2 and "invalid choice: 'int3'" in r.stderr  # argparse's refusal


def test_refused_off_the_cpu_and_unknown_schemes(ckpt):
    with pytest.raises(common.VLMError, match="--quantize runs on the CPU only"):
        perception_lm.load(str(ckpt["1b"]), device="meta", quantize="int8")
    with pytest.raises(common.VLMError, match="unknown quantization 'nf4'"):
        perception_lm.load(str(ckpt["1b"]), quantize="nf4")


@pytest.mark.parametrize("variant", ["pg2", "v1", "1b"])
def test_bench_counts_the_quantized_bytes(variant, models):
    """bench/measure.py's decode bytes (the bandwidth column): the quantized buffers instead of the
    weights they replace, and a tied embedding no longer (it is only looked up)."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "bench"))
    import measure
    for quantize in ("int8", "int4"):
        model, _ = models[variant][quantize]
        quantized = [m for m in model.modules()
                     if isinstance(m, (Q.Int8Linear, Q.Int4Linear))]
        buffers = sum(b.numel() * b.element_size() for m in quantized for b in m.buffers())
        norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if not n.startswith(measure.VISION_PREFIXES) and "embed_tokens" not in n)
        assert measure.decode_bytes(model) == buffers + norms


def test_int8_prompt_path_in_blocks_of_rows():
    """Above 32 rows the int8 weights are converted 4M at a time: 300 x 32768 is 3 blocks."""
    torch.manual_seed(0)
    weight = torch.randn(300, 2**15)
    module = Q.Int8Linear(2**15, 300, torch.float32)
    for key, value in module.quantize(weight).items():
        setattr(module, key, value)
    x = torch.randn(40, 2**15)
    assert relative_error(module(x), x @ dequantized_int8(module).t()) < 1e-5
