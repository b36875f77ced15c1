"""finetune.py on tiny hub-layout checkpoints of each family: a few dozen steps overfit a tiny
dataset; the checkpoint it writes loads in transformers (no missing or unexpected keys) and in our
load() with the same logits; LoRA merged equals LoRA unmerged; gradient checkpointing changes no
number; bad data lines fail before the first step, naming the line; the save is atomic and shards.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import smolvlm
import smolvlm_fixture
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
    examples = finetune.read_examples(data)
    inputs = finetune.encode(family, processor, examples[:1])  # (one: PLM tile counts differ)
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


def test_lora_gradient_checkpointing_and_all_parts(ckpt, data, tmp_path, record_property):
    """PLM-8B-style (untied head, bf16 shards): LoRA on the decoder with the projector and vision
    tower trained fully, with and without gradient checkpointing: the same losses (the same
    gradients), the loss falls, and the merged checkpoint loads in both."""
    family, _, _, _, hf_class = FAMILIES["perception_lm_8b"]
    # the learning rates of the first 3 steps do not depend on --steps (warm-up)
    options = ["--lora-rank", "4", "--lr", "3e-3", "--warmup-steps", "3", "--train", "decoder",
               "projector", "vision"]
    plain = run(ckpt["perception_lm_8b"], data, tmp_path / "plain", "--steps", "3", *options)
    output = tmp_path / "out"
    r = run(ckpt["perception_lm_8b"], data, output, "--steps", "30", "--gradient-checkpointing",
            *options)
    curve = losses(r.stdout)
    assert losses(plain.stdout) == curve[:3]
    record_property("loss_curve", [curve[0], curve[-1]])
    assert curve[-1] <= 0.1 * curve[0], curve
    assert "LoRA" not in json.dumps(json.loads((output / "config.json").read_text()))
    same_logits(family, hf_class, output, data)


def test_lora_merged_equals_unmerged(ckpt, data):
    model, processor = smolvlm.load(str(ckpt["smolvlm"]), dtype=torch.float32)
    inputs = finetune.encode(smolvlm, processor, finetune.read_examples(data))
    del inputs["labels"]
    torch.manual_seed(0)
    trainable = finetune.prepare(model, smolvlm, ["decoder"], 4, 16.0, False)
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in trainable)  # only the adapters
    with torch.no_grad():
        for parameter in trainable:  # B starts at 0: give the update a value, as training would
            parameter.normal_(0, 0.05)
        unmerged = model(**inputs)
        finetune.merge_lora(model)
        merged = model(**inputs)
    assert not any(isinstance(m, finetune.LoRALinear) for m in model.modules())
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
    examples = finetune.read_examples(tmp_path / "train.jsonl")
    finetune.check_examples(smolvlm, processor, examples, 8192, batch_size=1)
    with pytest.raises(finetune.VLMError, match="cannot batch images with videos"):
        finetune.check_examples(smolvlm, processor, examples, 8192, batch_size=2)
    trainable = finetune.prepare(model, smolvlm, ["decoder"], 0, 16.0, True)
    for example in examples:
        inputs = finetune.encode(smolvlm, processor, [example])
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
