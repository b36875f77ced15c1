"""common.py on its own: masks, attention, RoPE, sampling, loading. (Its error messages are tested
through the three CLIs and the API in test_errors.py.)"""
import json
import types

import torch
import torch.nn as nn
from safetensors.torch import save_file

import common


def test_make_mask_causal_and_pads():
    keys = torch.tensor([[0, 1, 1, 1, 1, 1]]).bool()  # one left pad
    m = common.make_mask(keys, 6)[0, 0]
    assert not m[1:, 0].any()  # the pad is never a key
    assert m[0, 0]  # ... but a pad query sees itself, so its row is not empty
    assert torch.equal(m[1:, 1:], torch.ones(5, 5).tril().bool())
    assert common.make_mask(keys, 2).shape == (1, 1, 2, 6)  # the last 2 queries against 6 keys
    assert torch.equal(common.make_mask(keys, 2)[0, 0], m[4:])
    full = torch.ones(2, 5, dtype=torch.bool)
    assert common.make_mask(full, 1).all()  # one new token without pads sees every key
    assert common.make_mask(full, 5) is common.CAUSAL  # prefill without pads: SDPA's causal kernel
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    explicit = torch.ones(5, 5).tril().bool()
    assert torch.allclose(common.attend(q, k, v, common.CAUSAL), common.attend(q, k, v, explicit),
                          atol=1e-6)


def test_attend_grouped_query_equals_repeated_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = common.make_mask(torch.tensor([[1] * 7, [0, 0] + [1] * 5]).bool(), 5)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = (q @ kr.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1) @ vr
    assert torch.allclose(common.attend(q, k, v, mask, 0.3), ref, atol=1e-5)


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0,
                      max_position_embeddings=64)
    rot = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 40]])
    x = torch.randn(1, 1, 4, 32)
    cos, sin = rot(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    c2, s2 = common.rope_cos_sin(common.rope_inv_freq(32, 500000.0), pos, torch.float32)
    assert torch.allclose(common.apply_rope(x, c2, s2), ref, atol=1e-6)
    nested = {"rope_parameters": {"rope_theta": 5.0}}
    assert common.rope_theta({"rope_theta": 5.0}) == common.rope_theta(nested) == 5.0


def test_linear_is_x_times_w_transposed(monkeypatch):
    """The decoders' Linear: F.linear itself in fp32 (bit for bit); in bf16 either decode form for a
    few rows (the one timed fastest here, and each form chosen) agrees with F.linear to bf16
    rounding, for every row count and leading shape a decoder passes."""
    torch.manual_seed(0)
    layer = common.Linear(32, 48, bias=False)
    # exact in both dtypes: the layer switches between them
    w = torch.randn(48, 32).bfloat16().float()
    layer.weight.data = w.clone()
    for form in (None, "x @ w.T", "w @ x"):
        monkeypatch.setattr(common, "KERNELS", {})
        if form is not None:
            monkeypatch.setattr(common, "faster", lambda runs, form=form: form)
        for shape in [(1, 1, 32), (4, 1, 32), (2, 3, 32), (1, 40, 32), (5, 32)]:
            x = torch.randn(shape)
            with torch.no_grad():
                assert torch.equal(layer.float()(x), torch.nn.functional.linear(x, w))
                ours = layer.bfloat16()(x.bfloat16())
            ref = torch.nn.functional.linear(x.bfloat16(), w.bfloat16())
            assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
            assert ours.is_contiguous()
            assert (ours.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
        # bf16 products of <= 32 rows were timed, once a row count (the 40-row prefill was not)
        assert sorted(key[3] for key in common.KERNELS) == [1, 4, 5, 6]
        assert set(common.KERNELS.values()) <= {"x @ w.T", "w @ x"}
        if form is not None:
            assert set(common.KERNELS.values()) == {form}


def test_faster_keeps_the_first_unless_clearly_faster(monkeypatch):
    """Another form replaces the first named (the usual kernel) only when it takes < 90% of its
    time: near-equal kernels do not swap from run to run with timing noise. Each is run and timed
    on its own."""
    for other_time, expected in ((0.95, "usual"), (0.85, "other"), (1.5, "usual")):
        ran = []
        timings = {"usual": [1.0] * 4, "other": [other_time] * 4}

        def repeat(run, repeat, number, timings=timings):
            return timings[run()]

        monkeypatch.setattr(common.timeit, "repeat", repeat)
        runs = {"usual": lambda: ran.append("usual") or "usual",
                "other": lambda: ran.append("other") or "other"}
        assert common.faster(runs) == expected
        assert ran == ["usual", "other"]
    # the real timer on real products: one of the two names
    w = torch.randn(64, 32)
    x = torch.randn(1, 32)
    monkeypatch.undo()
    runs = {"x @ w.T": lambda: torch.nn.functional.linear(x, w), "w @ x": lambda: w @ x.t()}
    assert common.faster(runs) in runs


def test_load_weights_ties_shared_parameters(tmp_path):
    """A parameter the model uses under two names (a tied output head) is read once, under its first
    name, and stays one parameter after loading."""
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = common.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    weight = torch.randn(5, 3)
    save_file({"embed.weight": weight}, tmp_path / "model.safetensors")
    m = common.load_weights(TiedHead, tmp_path, lambda k: k, dtype=torch.float32)
    assert m.head.weight is m.embed.weight and torch.equal(m.head.weight, weight)
    assert len(list(m.parameters())) == 1


def test_kv_cache_writes_in_place():
    cache = common.KVCache(2, 1, 1, 10, 4, torch.float32, "cpu")
    ptr = cache.k[1].data_ptr()
    k, v = cache.update(1, torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4))
    assert k.shape == (1, 1, 3, 4) and cache.k[1].data_ptr() == ptr
    cache.len = 3
    k, _ = cache.update(1, 2 * torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    assert k.shape == (1, 1, 4, 4) and k[0, 0, 3, 0] == 2 and k[0, 0, 0, 0] == 1


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0], [1.0, 0.0, 0.0, 9.0]])
    assert common.sample(logits).tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([common.sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # top-k = 2 keeps exactly the two best
    draws = torch.stack([common.sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1}  # the best token alone already has mass >= 0.5
    draws = torch.stack([common.sample(logits, 1.0, top_p=0.9, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    # a big vocabulary whose 1024 most likely tokens hold only 65% of the mass: the nucleus
    # (p = 0.9) is the first 2164 tokens (the fewest with
    # (1 - exp(-0.001 n)) / (1 - exp(-4.096)) >= 0.9), found past the first 1024
    big = (-0.001 * torch.arange(4096.0)).expand(500, -1)
    draws = common.sample(big, 1.0, top_p=0.9, generator=g)
    assert draws.max() <= 2163 and (draws >= 1024).any()


def test_generate_loop_stops_rows_and_pads():
    steps = iter([torch.tensor([[0.0, 0, 9, 0], [0, 0, 0, 9]]),
                  torch.tensor([[0.0, 0, 0, 9], [9.0, 0, 0, 0]])])
    first = torch.tensor([[9.0, 0, 0, 0], [0, 0, 9.0, 0]])
    seen = []
    out = common.generate(lambda tok: next(steps), first, 10, stop=[3], pad_id=0,
                          stream=seen.append)
    # row 1 stops at 3 and is padded after; then row 0 stops
    assert out.tolist() == [[0, 2, 3], [2, 3, 0]]
    assert len(seen) == 3


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)


def test_load_weights(tmp_path, monkeypatch):
    good = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    save_file(good, tmp_path / "model.safetensors")
    m = common.load_weights(Tiny, tmp_path, lambda k: k, dtype=torch.float32)
    assert torch.equal(m.a.weight, good["a.weight"]) and m.a.weight.device.type == "cpu"
    # the default dtype: bf16 only where bf16 products were timed at least as fast as fp32 ones
    for fast in (True, False):
        monkeypatch.setattr(common, "fast_bf16", lambda device_type, fast=fast: fast)
        m = common.load_weights(Tiny, tmp_path, lambda k: k, device="cpu")
        assert m.a.weight.dtype == (torch.bfloat16 if fast else torch.float32)
    m = common.load_weights(Tiny, tmp_path, lambda k: k, dtype="bfloat16")
    assert m.a.weight.dtype == torch.bfloat16
    assert common.resolve(str(tmp_path)) == tmp_path  # a local directory is used as it is


def test_load_weights_layout(tmp_path, monkeypatch):
    """fp32 decoder matrices are stored column-major only where bf16 is slow (AVX2-class CPUs, where
    the GEMV gains from it); the values are the same either way."""
    w = torch.randn(6, 3)  # tall: (out, in) with out >= in
    save_file({"a.weight": w}, tmp_path / "model.safetensors")
    for fast_bf16, stride in ((False, (1, 6)), (True, (3, 1))):
        monkeypatch.setattr(common, "fast_bf16", lambda device_type, fast=fast_bf16: fast)
        m = common.load_weights(lambda: nn.ModuleDict({"a": nn.Linear(3, 6, bias=False)}), tmp_path,
                                lambda k: k, device="cpu", dtype=torch.float32)
        assert torch.equal(m["a"].weight, w) and m["a"].weight.stride() == stride


def test_stop_ids_union(tmp_path):
    config = {"eos_token_id": 1, "text_config": {"eos_token_id": [1, 107]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5]}))
    assert common.stop_ids(tmp_path, 9, None) == [1, 5, 9, 107]


def test_placeholders_and_text_inputs():
    """expand_placeholders fills each placeholder with the next text of its own list, across the
    prompts and with two kinds interleaved, never reading a placeholder in what it put in;
    text_inputs left-pads, and with answers appends them, labels -100 on the prompt."""
    blocks = {"<i>": ["I1<i>", "I2"], "<v>": ["V1"]}
    assert common.expand_placeholders(["a<i>b<v>", "<i>c"], blocks) == ["aI1<i>bV1", "I2c"]

    class Tokenizer:  # one id per character
        def encode(self, text, add_special_tokens):
            return types.SimpleNamespace(ids=[ord(c) for c in text])

    inputs = common.text_inputs(Tokenizer(), [[1, 2, 3], [4]], pad_id=0, answers=["x", "yz"])
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 120], [0, 4, 121, 122]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert inputs["labels"].tolist() == [[-100, -100, -100, 120], [-100, -100, 121, 122]]
    assert set(common.text_inputs(Tokenizer(), [[5]], pad_id=0)) == {"input_ids", "attention_mask"}


def test_bf16_default_is_timed_not_read_from_flags(monkeypatch):
    """The CPU's default dtype comes from timing a bf16 and an fp32 product, not from its flags."""
    times = iter([[2.0] * 4, [1.0] * 4, [1.0] * 4, [3.0] * 4])  # fp32, bf16; then fp32, bf16
    monkeypatch.setattr(common.timeit, "repeat", lambda run, repeat, number: next(times))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    common.fast_bf16.cache_clear()
    assert common.fast_bf16("cpu")  # bf16 took half of fp32's time: bf16 is the default
    common.fast_bf16.cache_clear()
    assert not common.fast_bf16("cpu")  # 3x fp32's time: fp32
    common.fast_bf16.cache_clear()  # the next caller times the real machine again
    assert not common.fast_bf16("meta") and common.fast_bf16("cuda")


def test_kernel_report_names_the_timed_forms():
    """--verbose's line on the kernels (command_line.kernel_report, over common.KERNELS)."""
    import command_line
    saved = dict(common.KERNELS)
    common.KERNELS.clear()
    try:
        assert "none timed" in command_line.kernel_report()
        common.KERNELS[(576, 1536, torch.bfloat16, 1, 2)] = "w @ x"
        common.KERNELS[(1536, 576, torch.bfloat16, 1, 2)] = "x @ w.T"
        assert command_line.kernel_report() == ("kernels timed here: w @ x for 1 of 2 shapes "
                                                "(576x1536 1 row, torch.bfloat16); x @ w.T for "
                                                "the others")
    finally:
        common.KERNELS.clear()
        common.KERNELS.update(saved)
