"""generate(..., compiled=True) always decodes with the weights the model holds at that moment
(issue 21, "High"): two models of one shape in one process, weights changed in place after a
compiled run, threads. The compiled program freezes the weights as constants, so each of
these ran another model's or stale weights before the program was made per model and weights.
And every family's compiled step (issue 23): PaliGemma 1 and 2 and PerceptionLM in fp32, int8 and
int4 weights, the CLI's --compile. A compile takes ~20-60 s on 2 cores: each test compiles once and
checks what it can with that program."""
import threading

import pytest
import torch
from torch import nn

import common
import compiled
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import smolvlm as S
import smolvlm_fixture
from helpers import cli_in_process
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)


def compiles():
    """Programs compiled so far in this process (each compile adds one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------- a toy decode step

class Toy(nn.Module):
    """A decode step as compiled.compile_step takes it, small enough to compile in seconds."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 32)

    def decode_step(self, token, positions, keys, cache):
        return self.proj(self.embed(token) * positions[..., None]).float()  # (B, 1, 32)


def toy_step(model):
    """model's compiled step and its arguments."""
    cache = common.KVCache(1, 2, 1, 6, 4, torch.float32, "cpu")
    keys = torch.ones(2, 6, dtype=torch.bool)
    args = (torch.tensor([[3], [7]]), torch.tensor([[1.0], [2.0]]), keys, cache)
    return compiled.compile_step(model, "decode_step", keys, cache), args


def assert_compiled_is_eager(model):
    with torch.inference_mode():
        step, args = toy_step(model)
        assert (step(*args) - model.decode_step(*args)).abs().max() < 1e-5


def test_toy_models_of_one_shape_past_the_recompile_limit():
    """Three models of the same shapes, with dynamo's recompile limit at 1: each compiled step
    computes with its own weights (33c820f: the second and third ran the first's, no recompile)."""
    models = [Toy(seed) for seed in (0, 1, 2)]
    _, args = toy_step(models[0])
    assert (models[0].decode_step(*args) - models[1].decode_step(*args)).abs().max() > 0.1
    before = compiles()
    with torch._dynamo.config.patch(recompile_limit=1):
        for model in models:
            assert_compiled_is_eager(model)
    assert compiles() == before + 3


def test_toy_weights_changed_in_place():
    """After a compiled run: an in-place change under no_grad, an optimizer step, load_state_dict
    (all copy into the same tensors) and a new tensor put in place are each compiled anew (33c820f:
    the old weights ran on); the same weights are not compiled again."""
    model = Toy(0)
    assert_compiled_is_eager(model)
    before = compiles()
    assert_compiled_is_eager(model)
    assert compiles() == before  # unchanged weights: the program is reused
    with torch.no_grad():
        model.proj.weight.mul_(1.5)
    assert_compiled_is_eager(model)
    model.proj.weight.grad = torch.ones_like(model.proj.weight)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert_compiled_is_eager(model)
    model.load_state_dict(Toy(1).state_dict())
    assert_compiled_is_eager(model)
    model.proj.bias.data = torch.randn(32)
    assert_compiled_is_eager(model)
    assert compiles() == before + 4


def test_toy_program_is_frozen_and_compiled_again_when_settings_change():
    """The weights are constants of the program (a change through `.data`, which no version
    counter sees, does not reach it: the documented limit), and a change of a setting dynamo
    checks (the thread count) compiles the step again, frozen, instead of running it unfrozen or
    eager."""
    model = Toy(0)
    with torch.inference_mode():
        step, args = toy_step(model)
        before = step(*args)
        model.proj.weight.data.mul_(2)  # unseen by the version counter
        assert torch.equal(step(*args), before)  # frozen: the old values
        threads = torch.get_num_threads()
        n = compiles()
        torch.set_num_threads(threads + 1)
        try:
            assert (step(*args) - model.decode_step(*args)).abs().max() < 1e-5
            assert compiles() == n + 1
            again = step(*args)
            model.proj.weight.data.mul_(2)
            assert torch.equal(step(*args), again)  # frozen again
        finally:
            torch.set_num_threads(threads)


def test_toy_threads_compile_each_program_once():
    """Three threads start at once, two with one model and one with another: one compile per
    model (the second thread of a model waits for the first's), each with its own weights."""
    shared = Toy(0)
    models = [shared, shared, Toy(1)]
    start = threading.Barrier(3)
    out = {}

    def run(i):
        with torch.inference_mode():
            step, args = toy_step(models[i])
            start.wait()
            out[i] = (step(*args), models[i].decode_step(*args))

    before = compiles()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert compiles() == before + 2
    for got, want in out.values():
        assert (got - want).abs().max() < 1e-5


# ----------------------------------------------------------------------------- SmolVLM

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two checkpoints of one shape (the "v2" fixture's) with different random weights."""
    root = tmp_path_factory.mktemp("compiled")
    return [smolvlm_fixture.build(root / f"seed{seed}", "v2", seed=seed, check=False)
            for seed in (1, 2)]


def load(folder):
    return S.load(str(folder), dtype=torch.float32)  # fp32: compiled tokens equal eager ones


def prompts(processor):
    """A left-padded batch of two text prompts."""
    texts = ["Tell me a story.", "What is the quick brown fox doing on the beach?"]
    chats = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in texts]
    inputs = processor(text=[processor.apply_chat_template(c) for c in chats])
    assert not inputs["attention_mask"].all()
    return inputs


def assert_step_logits_match_forward(model, inputs):
    """A few compiled steps' logits on the left-padded batch against the uncached forward (fp32:
    1e-4, as parity). Batch and dtype as in generate(): its program, no compile of its own."""
    ids = inputs["input_ids"]
    B, T = ids.shape
    c = model.cfg.text
    before = compiles()
    with torch.inference_mode():  # inference tensors, as generate() makes them
        cache = common.KVCache(c.num_hidden_layers, B, c.num_key_value_heads, T + 3, c.head_dim,
                               torch.float32, "cpu")
        keys = torch.ones(B, T + 3, dtype=torch.bool)
        keys[:, :T] = inputs["attention_mask"]
        positions = keys[:, :T].sum(-1, keepdim=True) - 1  # (B, 1): of the last prompt token
        model(ids, keys[:, :T], cache=cache, last_only=True)
        step = compiled.compile_step(model, "decode_step", keys, cache)
        for token in (5, 17, 40):
            tokens = torch.full((B, 1), token)
            positions = positions + 1
            cache.slot = torch.full((1,), cache.len)
            logits = step(tokens, positions, keys, cache)
            cache.len += 1
            ids = torch.cat([ids, tokens], 1)
            assert (logits - model(ids, keys[:, :cache.len])[:, -1:]).abs().max() < 1e-4
    assert compiles() == before


def test_two_smolvlms_of_one_shape(folders):
    """Two SmolVLMs of the same shapes in one process, with dynamo's recompile limit at 1: each
    compiled generate gets its own eager tokens, each from a program of its own (33c820f: the second
    ran the first's frozen weights after its own first token, with no recompile)."""
    (first, processor), (second, _) = [load(folder) for folder in folders]
    inputs = prompts(processor)
    eager = [model.generate(**inputs, max_new_tokens=8) for model in (first, second)]
    assert not torch.equal(eager[0], eager[1])
    before = compiles()
    with torch._dynamo.config.patch(recompile_limit=1):
        for model, tokens in zip((first, second), eager):
            assert torch.equal(model.generate(**inputs, max_new_tokens=8, compiled=True), tokens)
    assert compiles() == before + 2
    assert_step_logits_match_forward(second, inputs)


def test_smolvlm_weights_changed_in_place(folders):
    """A compiled generate, then a decoder weight scaled in place, then another model's weights
    loaded (load_state_dict copies into the same tensors): each compiled generate equals the eager
    one on the weights held then (33c820f: the first weights ran on)."""
    model, processor = load(folders[0])
    inputs = prompts(processor)
    before = compiles()
    eager = model.generate(**inputs, max_new_tokens=8)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, compiled=True), eager)
    with torch.no_grad():
        model.model.text_model.layers[0].mlp.down_proj.weight.mul_(1.5)
    scaled = model.generate(**inputs, max_new_tokens=8)
    assert not torch.equal(scaled, eager)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, compiled=True), scaled)
    other, _ = load(folders[1])
    model.load_state_dict(other.state_dict())
    loaded = other.generate(**inputs, max_new_tokens=8)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, compiled=True), loaded)
    assert compiles() == before + 3  # one program for each of the three weights
    assert_step_logits_match_forward(model, inputs)


# ----------------------------------------------------------------------------- the other families

# Gemma (PaliGemma 1), Gemma 2 (PaliGemma 2: sliding window 24 on every other layer, the attention
# and final soft-caps) and Llama 3 with its RoPE scaling (PerceptionLM 1B)
FAMILIES = {"pg1": (paligemma, paligemma_fixture), "pg2": (paligemma, paligemma_fixture),
            "1b": (perception_lm, perception_lm_fixture)}
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {variant: fixture.build(root / variant, variant, check=False)
            for variant, (_, fixture) in FAMILIES.items()}


def chat(processor, question):
    """A user turn with one image and `question`, in the chat template (PerceptionLM)."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


def batch_of_two(variant, processor, images):
    """A left-padded batch of two prompts with an image each, as the family is prompted."""
    texts = ["caption en", "answer en where is the cow standing? describe the picture in detail"]
    if FAMILIES[variant][0] is perception_lm:
        texts = [chat(processor, "Describe the image."),
                 chat(processor, "What is in this video? Answer briefly.")]
    inputs = processor(text=texts, images=[[images[0]], [images[1]]])
    assert not inputs["attention_mask"].all()
    return inputs


def decode_logits(model, inputs, new_ids, compiled_step):
    """generate()'s decode steps, the model's decode_step or its compiled program, fed new_ids
    (B, n) after the prefill of `inputs` -> the logits after each of them (B, n, V). The batch size
    and dtype are generate()'s: the compiled program is the one its generate() made."""
    B, T = inputs["input_ids"].shape
    n = new_ids.shape[1]
    c = model.cfg.text
    with torch.inference_mode():  # inference tensors, as generate() makes them
        cache = common.KVCache(c.num_hidden_layers, B, c.num_key_value_heads, T + n, c.head_dim,
                               torch.float32, "cpu")
        keys = torch.ones(B, T + n, dtype=torch.bool)
        keys[:, :T] = inputs["attention_mask"]
        step = model.decode_step
        if compiled_step:
            step = compiled.compile_step(model, "decode_step", keys, cache)
        model(**inputs, cache=cache, last_only=True)
        positions = keys[:, :T].sum(-1, keepdim=True)  # (B, 1): the last prompt token's, from 1
        if not isinstance(model, paligemma.PaliGemma):  # the Llamas count from 0
            positions = positions - 1
        logits = []
        for i in range(n):
            cache.slot = torch.full((1,), cache.len)
            token = new_ids[:, i].contiguous()  # (B,): strides as generate()'s, which dynamo checks
            logits.append(step(token[:, None], positions + 1 + i, keys, cache))
            cache.len += 1
    return torch.cat(logits, 1)


def whole_sequence_logits(model, inputs, new_ids):
    """The uncached forward over the prompt and new_ids (generated tokens: real, and PaliGemma's
    causal suffix) -> the logits after each new token (B, n, V), and those that chose them."""
    T = inputs["input_ids"].shape[1]
    ones = torch.ones_like(new_ids)
    whole = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new_ids], 1),
                 attention_mask=torch.cat([inputs["attention_mask"], ones], 1))
    if "token_type_ids" in inputs:
        whole["token_type_ids"] = torch.cat([inputs["token_type_ids"], ones], 1)
    with torch.no_grad():
        logits = model(**whole)
    return logits[:, T:], logits[:, T - 1:-1]


@pytest.mark.parametrize("variant", FAMILIES)
def test_compiled_step_equals_eager(variant, family_folders, images):
    """PaliGemma 1 and 2 and PerceptionLM in fp32 on a left-padded batch of two: the compiled
    generate gives the eager tokens from one compile, and the compiled and eager steps' logits equal
    the uncached forward's (1e-4, as parity). On PaliGemma 2 the sliding window leaves keys out of
    the last steps, and the logits show it."""
    module, _ = FAMILIES[variant]
    model, processor = module.load(str(family_folders[variant]), dtype=torch.float32)
    inputs = batch_of_two(variant, processor, images)
    eager = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    assert eager.shape == (2, NEW_TOKENS)
    before = compiles()
    assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, compiled=True), eager)
    after_each, choosing = whole_sequence_logits(model, inputs, eager)
    # no near-ties on the path, so equal tokens are not luck of rounding
    top2 = choosing.topk(2).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    for compiled_step in (True, False):
        logits = decode_logits(model, inputs, eager, compiled_step)
        assert (logits - after_each).abs().max() < 1e-4, compiled_step
    assert compiles() == before + 1
    window = getattr(model.cfg.text, "sliding_window", None)  # Gemma 2 only
    if window:
        T = inputs["input_ids"].shape[1]
        assert T + NEW_TOKENS - 1 > window + 4  # the last steps' window leaves the first keys out
        model.cfg.text.sliding_window = 10_000
        try:
            unwindowed = decode_logits(model, inputs, eager, compiled_step=False)
        finally:
            model.cfg.text.sliding_window = window
        assert (unwindowed - after_each).abs().max() > 1e-2


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_compiled_tokens_equal_eager(quantize, family_folders, images):
    """PaliGemma 1 with int8 and int4 decoder weights (fp32 activations; the fixture's matrices all
    fit the int4 kernel): the compiled generate gives the eager tokens on the left-padded batch."""
    model, processor = paligemma.load(str(family_folders["pg1"]), dtype=torch.float32,
                                      quantize=quantize)
    if quantize == "int4":
        assert ", 0 of them in int8" in model.quantization
    inputs = batch_of_two("pg1", processor, images)
    eager = model.generate(**inputs, max_new_tokens=NEW_TOKENS)
    before = compiles()
    assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, compiled=True), eager)
    assert compiles() == before + 1
    compiled_logits = decode_logits(model, inputs, eager, compiled_step=True)
    eager_logits = decode_logits(model, inputs, eager, compiled_step=False)
    assert (compiled_logits - eager_logits).abs().max() < 1e-3


def test_cli_compile(family_folders, images, tmp_path):
    """PerceptionLM's --compile end to end, in this process: the eager answer, streamed, after the
    compile is said on stderr."""
    path = tmp_path / "picture.png"
    images[2].save(path)
    folder = family_folders["1b"]
    r = cli_in_process(perception_lm, "--model", folder, "--dtype", "float32", "--image", path,
                       "--prompt", "Describe the image.", "--max-new-tokens", "8", "--compile")
    assert r.returncode == 0, r.stderr
    assert "compiling the decode step" in r.stderr
    model, processor = perception_lm.load(str(folder), dtype=torch.float32)
    inputs = processor(text=[chat(processor, "Describe the image.")],
                       images=[common.open_image(path)])
    new = model.generate(**inputs, max_new_tokens=8)
    assert new.shape[1] > 1 and r.stdout == processor.decode(new[0]) + "\n"
