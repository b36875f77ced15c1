"""finetune.py on tiny hub-layout checkpoints of each family: a few dozen steps overfit a tiny
dataset; the checkpoint it writes loads in transformers (no missing or unexpected keys) and in our
load() with the same logits; LoRA merged equals LoRA unmerged; gradient checkpointing changes no
number and recomputes each layer; bad data lines (and an answer holding the end-of-turn text) fail
before the first step, naming the line; flags that would do nothing fail before the load; the save
is atomic, shards, and never deletes a finished checkpoint.
"""
import json
import os
import re
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import lora
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import smolvlm
import smolvlm_fixture
import training_data
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)
from helpers import assert_fails, cli_in_process
from hub import check_loads_cleanly

# family: (model file, fixture builder, fixture variant, build options, transformers class)
FAMILIES = {
    "paligemma": (paligemma, paligemma_fixture, "pg1", {}, "PaliGemmaForConditionalGeneration"),
    "smolvlm": (smolvlm, smolvlm_fixture, "v1", {}, "Idefics3ForConditionalGeneration"),
    "perception_lm": (perception_lm, perception_lm_fixture, "1b", {},
                      "PerceptionLMForConditionalGeneration"),
    # untied output head, two bf16 shards: LoRA, all parts, gradient checkpointing
    "perception_lm_8b": (perception_lm, perception_lm_fixture, "8b",
                         dict(shards=2, dtype=torch.bfloat16),
                         "PerceptionLMForConditionalGeneration"),
}
ANSWERS = ["a red cow.", "two dogs on the grass", "the sea at night"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    folders = {}
    for name, (_, fixture, variant, options, _) in FAMILIES.items():
        folders[name] = fixture.build(root / name, variant, **options)
    return folders


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three images with an answer each, as train.jsonl beside them (relative paths)."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i, answer in enumerate(ANSWERS):
        pixels = rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image {i}.png")
        example = {"image": f"image {i}.png", "prompt": "Describe this image.", "answer": answer}
        lines.append(json.dumps(example))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def losses(stdout):
    """The training loss of every step from the progress lines."""
    return [float(x) for x in re.findall(r"^step \d+/\d+  loss ([\d.]+)", stdout, re.M)]


def run(ckpt_folder, data, output, *options):
    r = cli_in_process(finetune, "--model", ckpt_folder, "--data", data, "--output", output,
                       "--batch-size", "3", *options)
    assert r.returncode == 0, r.stderr
    return r


def same_logits(family, hf_class, folder, data):
    """transformers loads `folder` with no missing or unexpected keys, and its logits on a training
    example equal our load()'s (fp32)."""
    import transformers
    hf_model = check_loads_cleanly(getattr(transformers, hf_class), folder).eval()
    model, processor = family.load(str(folder), dtype=torch.float32)
    examples = training_data.read_examples(data)
    inputs = training_data.encode(family, processor, examples[:1])  # (one: PLM tile counts differ)
    del inputs["labels"]
    with torch.no_grad():
        ours = model(**inputs)
        hf_inputs = dict(inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(0))
        if family is paligemma:  # PaliGemma counts positions from 1
            hf_inputs["position_ids"] = inputs["attention_mask"].cumsum(-1).clamp(min=1)
        theirs = hf_model(**hf_inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max() <= 1e-4
    return ours, inputs


@pytest.mark.parametrize("name", ["paligemma", "smolvlm", "perception_lm"])
def test_overfits_and_writes_a_checkpoint_both_load(name, ckpt, data, tmp_path, record_property):
    family, _, _, _, hf_class = FAMILIES[name]
    output = tmp_path / "out"
    r = run(ckpt[name], data, output, "--steps", "30", "--lr", "1e-3", "--eval-data", data,
            "--eval-every", "10")
    curve = losses(r.stdout)
    record_property("loss_curve", [curve[0], curve[-1]])
    assert len(curve) == 30 and curve[-1] <= 0.1 * curve[0], curve
    assert re.search(r"^step 30/30  loss [\d.]+  lr [\d.e-]+  \d+ tokens/s  0:00:00 left$",
                     r.stdout, re.M)
    eval_losses = [float(x) for x in re.findall(r"eval loss ([\d.]+)", r.stdout)]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]
    copied = {p.name for p in ckpt[name].iterdir() if p.suffix in (".json", ".jinja")}
    assert copied <= {p.name for p in output.iterdir()}  # tokenizer, processor, template, ...
    assert (output / "model.safetensors").exists()
    after, inputs = same_logits(family, hf_class, output, data)
    before = family.load(str(ckpt[name]), dtype=torch.float32)[0]
    with torch.no_grad():
        assert (before(**inputs) - after).abs().max() > 0.1  # the weights did change


def count_layer_runs(monkeypatch):
    """finetune.prepare wrapped so that every list of layers counts, for its first layer, the calls
    of the layer (a pre-hook on it: once per forward) and the runs of its code (a pre-hook on its
    first part: once per forward, and once more in the backward pass when the layer is recomputed,
    which calls the layer's own forward directly, not through its hooks). -> {layer list name:
    {"calls": n, "runs": n}}, filled as the CLI runs (each run of main() starts it anew)."""
    counts = {}
    prepare = finetune.prepare

    def count(name, what, module, inputs):
        counts[name][what] += 1

    def counting_prepare(model, *args):
        trainable = prepare(model, *args)
        counts.clear()
        for name, layers in model.named_modules():
            if isinstance(layers, torch.nn.ModuleList):
                counts[name] = dict(calls=0, runs=0)
                layers[0].register_forward_pre_hook(partial(count, name, "calls"))
                first_part = next(layers[0].children())
                first_part.register_forward_pre_hook(partial(count, name, "runs"))
        return trainable
    monkeypatch.setattr(finetune, "prepare", counting_prepare)
    return counts


def test_lora_gradient_checkpointing_and_all_parts(ckpt, data, tmp_path, monkeypatch,
                                                   record_property):
    """PLM-8B-style (untied head, bf16 shards): LoRA on the decoder with the projector and vision
    tower trained fully, with and without gradient checkpointing: with it, each layer runs again
    in the backward pass (recomputed), without it only in the forward; the losses are the same
    (the same gradients), the loss falls, and the merged checkpoint loads in both."""
    family, _, _, _, hf_class = FAMILIES["perception_lm_8b"]
    counts = count_layer_runs(monkeypatch)
    # the learning rates of the first 3 steps do not depend on --steps (warm-up)
    options = ["--lora-rank", "4", "--lr", "3e-3", "--warmup-steps", "3", "--train", "decoder",
               "projector", "vision"]
    plain = run(ckpt["perception_lm_8b"], data, tmp_path / "plain", "--steps", "3", *options)
    assert len(counts) == 2, counts  # the vision blocks and the decoder layers
    assert all(0 < c["runs"] == c["calls"] for c in counts.values()), counts  # no recomputation
    output = tmp_path / "out"
    r = run(ckpt["perception_lm_8b"], data, output, "--steps", "30", "--gradient-checkpointing",
            *options)
    assert len(counts) == 2, counts
    # every layer call runs the layer's code twice: in the forward, and again in the backward
    assert all(0 < c["runs"] == 2 * c["calls"] for c in counts.values()), counts
    curve = losses(r.stdout)
    assert losses(plain.stdout) == curve[:3]
    record_property("loss_curve", [curve[0], curve[-1]])
    assert curve[-1] <= 0.1 * curve[0], curve
    assert "LoRA" not in json.dumps(json.loads((output / "config.json").read_text()))
    same_logits(family, hf_class, output, data)


def test_lora_merged_equals_unmerged(ckpt, data):
    model, processor = smolvlm.load(str(ckpt["smolvlm"]), dtype=torch.float32)
    inputs = training_data.encode(smolvlm, processor, training_data.read_examples(data))
    del inputs["labels"]
    torch.manual_seed(0)
    trainable = finetune.prepare(model, smolvlm, ["decoder"], 4, 16.0, False)
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in trainable)  # only the adapters
    with torch.no_grad():
        for parameter in trainable:  # B starts at 0: give the update a value, as training would
            parameter.normal_(0, 0.05)
        unmerged = model(**inputs)
        lora.merge_lora(model)
        merged = model(**inputs)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    base = smolvlm.load(str(ckpt["smolvlm"]), dtype=torch.float32)[0]
    with torch.no_grad():
        assert (base(**inputs) - merged).abs().max() > 0.1  # the update is not a no-op


def test_sharded_atomic_save(ckpt, data, tmp_path, monkeypatch):
    model, _ = paligemma.load(str(ckpt["paligemma"]), dtype=torch.float32)
    output = tmp_path / "sharded"
    finetune.save(model, paligemma, ckpt["paligemma"], output, shard_bytes=100_000)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    n_shards = len(set(index["weight_map"].values()))
    assert n_shards > 2 and not (output / "model.safetensors").exists()
    assert all(k.startswith(("language_model.model.", "vision_tower.vision_model.",
                             "multi_modal_projector.")) for k in index["weight_map"])
    same_logits(paligemma, FAMILIES["paligemma"][4], output, data)

    def crash(*args):
        (args[0] / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # a crash mid-save
    monkeypatch.setattr(finetune, "write_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        finetune.save(model, paligemma, ckpt["paligemma"], tmp_path / "crashed")
    assert list(tmp_path.iterdir()) == [output]  # nothing that looks like a checkpoint, no litter


def test_a_finished_checkpoint_is_kept_when_the_rename_fails(ckpt, tmp_path, monkeypatch):
    """The output folder filled by someone else while the checkpoint was written: the rename
    fails, and the complete checkpoint stays where it was written, in the one folder that the
    one-line error names; the other files are left alone."""
    model, _ = paligemma.load(str(ckpt["paligemma"]), dtype=torch.float32)
    output = tmp_path / "out"
    write_checkpoint = finetune.write_checkpoint

    def write_then_output_filled(*args):
        write_checkpoint(*args)
        output.mkdir()
        (output / "theirs.txt").write_text("another run's")
    monkeypatch.setattr(finetune, "write_checkpoint", write_then_output_filled)
    with pytest.raises(finetune.VLMError) as error:
        finetune.save(model, paligemma, ckpt["paligemma"], output)
    message = str(error.value)
    written = [path.parent for path in tmp_path.rglob("model.safetensors")]
    assert len(written) == 1 and output not in written
    kept = written[0]
    assert "\n" not in message and f"kept in {kept}" in message and str(output) in message
    assert kept.parent.parent == tmp_path  # beside the output, on its file system
    assert [p.name for p in output.iterdir()] == ["theirs.txt"]
    saved, _ = paligemma.load(str(kept), dtype=torch.float32)  # complete: the strict load reads it
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name


def test_a_stale_partial_folder_is_neither_reused_nor_deleted(ckpt, tmp_path):
    """A partial folder a crashed run left with this process's id (the old fixed name) does not
    stop the save, and is not the save's to delete."""
    model, _ = paligemma.load(str(ckpt["paligemma"]), dtype=torch.float32)
    stale = tmp_path / f".out.partial-{os.getpid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    finetune.save(model, paligemma, ckpt["paligemma"], tmp_path / "out")
    assert set(tmp_path.iterdir()) == {stale, tmp_path / "out"}
    assert (stale / "model.safetensors").read_bytes() == b"half"
    assert paligemma.load(str(tmp_path / "out"), dtype=torch.float32)


def test_video_line_trains(tmp_path):
    """SmolVLM2: a data line with a video (and one with two images) is encoded with the answer's
    labels, and a training step runs on it."""
    from helpers import make_video
    folder = smolvlm_fixture.build(tmp_path / "v2", "v2")
    make_video(tmp_path / "clip.mp4", n_frames=12, fps=4)
    for i in range(2):
        Image.new("RGB", (30 + 9 * i, 20), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    lines = [{"video": "clip.mp4", "prompt": "What happens?", "answer": "Colours move."},
             {"images": ["0.png", "1.png"], "prompt": "What differs?", "answer": "The size."}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    model, processor = smolvlm.load(str(folder), dtype=torch.float32)
    examples = training_data.read_examples(tmp_path / "train.jsonl")
    training_data.check_examples(smolvlm, processor, examples, 8192, batch_size=1)
    with pytest.raises(finetune.VLMError, match="cannot batch images with videos"):
        training_data.check_examples(smolvlm, processor, examples, 8192, batch_size=2)
    trainable = finetune.prepare(model, smolvlm, ["decoder"], 0, 16.0, True)
    for example in examples:
        inputs = training_data.encode(smolvlm, processor, [example])
        answer_ids = inputs["labels"][inputs["labels"] != -100].tolist()
        expected = " " + example["answer"] + "<end_of_utterance>"
        assert processor.tokenizer.decode(answer_ids, skip_special_tokens=False) == expected
        _, loss = model(**inputs)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in trainable)


def test_learning_rate_warms_up_then_decays():
    rates = [finetune.learning_rate(step, 10, 1.0, 2) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(rates[2:], rates[3:])) and 0 < rates[-1] < 0.05


def bad_lines(folder):
    """{what is wrong: (the data file's text, the line that fails, a word of the message)}."""
    good = json.dumps({"image": "image 0.png", "prompt": "Describe.", "answer": "a cow"})
    Image.new("RGB", (10, 10)).save(folder / "image 0.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    long_answer = json.dumps({"image": "image 0.png", "prompt": "Describe.",
                              "answer": " ".join(["cow"] * 12000)})
    return {
        "missing image": (good + '\n{"image": "nowhere.png", "prompt": "a", "answer": "b"}\n',
                          2, "nowhere.png not found"),
        "missing field": (good + "\n\n" + '{"image": "image 0.png", "prompt": "a"}\n', 3,
                          "no 'answer' text"),
        "not JSON": ("{oops\n" + good, 1, "not JSON"),
        "two media": ('{"image": "image 0.png", "video": "v.mp4", "prompt": "a", "answer": "b"}',
                      1, "give one of"),
        "unreadable image": (good + '\n{"image": "broken.png", "prompt": "a", "answer": "b"}', 2,
                             "cannot be read"),
        "answer longer than the context": (good + "\n" + long_answer, 2, "context"),
    }


@pytest.mark.parametrize("what", ["missing image", "missing field", "not JSON", "two media",
                                  "unreadable image", "answer longer than the context"])
def test_bad_data_line_fails_before_the_first_step(what, ckpt, tmp_path):
    text, line, message = bad_lines(tmp_path)[what]
    (tmp_path / "train.jsonl").write_text(text)
    r = cli_in_process(finetune, "--model", ckpt["smolvlm"], "--data", tmp_path / "train.jsonl",
                       "--output", tmp_path / "out")
    assert_fails(r, f"train.jsonl line {line}: ")  # nothing on stdout: no step ran
    assert message in r.stderr
    assert not (tmp_path / "out").exists()


def test_output_must_be_new_or_empty(ckpt, data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = cli_in_process(finetune, "--model", ckpt["smolvlm"], "--data", data, "--output",
                       tmp_path / "out")
    assert_fails(r, "exists and is not an empty directory")


END_OF_TURN = {"paligemma": "<eos>", "smolvlm": "<end_of_utterance>",
               "perception_lm": "<|eot_id|>"}  # the fixtures' tokenizers


@pytest.mark.parametrize("name", ["paligemma", "smolvlm", "perception_lm"])
def test_answer_holding_the_end_of_turn_text_is_refused(name, ckpt, tmp_path):
    """The labels would stop at the end-of-turn text (or learn to end the answer there): the data
    check names the line instead."""
    Image.new("RGB", (10, 10)).save(tmp_path / "image 0.png")
    good = {"image": "image 0.png", "prompt": "Describe.", "answer": "a cow"}
    bad = dict(good, answer=f"a cow{END_OF_TURN[name]} and a dog")
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    r = cli_in_process(finetune, "--model", ckpt[name], "--data", tmp_path / "train.jsonl",
                       "--output", tmp_path / "out", "--steps", "1")
    assert_fails(r, f"train.jsonl line 2: the answer contains {END_OF_TURN[name]!r}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "4", "--train", "vision"], "which --train leaves out"),
    (["--lora-alpha", "8", "--train", "projector", "vision"], "which --train leaves out"),
    (["--lora-alpha", "8"], "--lora-alpha scales the LoRA update: it needs --lora-rank"),
    (["--lora-rank", "-1"], "--lora-rank must be positive, or 0 for no LoRA"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--lora-rank", "4", "--lora-alpha", "nan"], "--lora-alpha must be a positive number"),
    (["--dtype", "float16"], "no loss scaling"),
    (["--dtype", "half"], "no loss scaling"),
])
def test_flags_that_would_do_nothing_are_refused_before_the_load(flags, message, ckpt, data,
                                                                 tmp_path, monkeypatch):
    def load(folder, device, dtype):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(smolvlm, "load", load)
    r = cli_in_process(finetune, "--model", ckpt["smolvlm"], "--data", data, "--output",
                       tmp_path / "out", "--steps", "1", *flags)
    assert_fails(r, message)
