"""Fine-tune PaliGemma, SmolVLM or PerceptionLM on your own images and answers, in plain PyTorch.

    python finetune.py --model HuggingFaceTB/SmolVLM2-256M-Video-Instruct --data train.jsonl \\
        --output my-smolvlm --steps 200 --lora-rank 16

The data is one JSON object a line: {"image": path | "images": [paths] | "video": path, "prompt":
text, "answer": text}, paths relative to the data file. The model learns the answer only: the
chat families get the checkpoint's chat template around the prompt and learn the answer and its
end-of-turn token (training_data.prompt_and_answer); PaliGemma learns the answer and <eos> after
its prefix (processor(..., suffix=...)). Every line is read and encoded before the first step, and
a bad one stops the run with its line number. The output is a checkpoint in the Hub layout that
`load(DIR)` of the model file, and transformers, both load.

Read top to bottom: the families, what trains (LoRA adapters from lora.py), the learning rate,
saving, the training loop, the command line. The data (reading, encoding with answer-only labels,
the checks before the first step, the batches) is in training_data.py.
"""
import argparse
import datetime
import json
import math
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import paligemma
import perception_lm
import smolvlm
from command_line import run_cli
from common import VLMError, checkpoint_files, read_json, resolve, tied_parameters
from lora import add_lora, merge_lora
from training_data import batches, check_examples, encode, read_examples

# ------------------------------------------------------------ the families

FAMILIES = {"paligemma": paligemma, "idefics3": smolvlm, "smolvlm": smolvlm,
            "perception_lm": perception_lm}  # by config.json's model_type

# Per family, the module paths of the parts --train chooses from (the decoder's first).
# PaliGemma and PerceptionLM keep them at the top level, SmolVLM under `model.`.
TOP_LEVEL_PARTS = dict(vision=["vision_tower"], projector=["multi_modal_projector"],
                       decoder=["language_model", "lm_head"])
PARTS = {"paligemma": TOP_LEVEL_PARTS, "perception_lm": TOP_LEVEL_PARTS,
         "smolvlm": dict(vision=["model.vision_model"], projector=["model.connector"],
                         decoder=["model.text_model", "lm_head"])}


# ------------------------------------------------------------ what trains

def prepare(model, family, parts, lora_rank, lora_alpha, recompute):
    """Freeze all, then unfreeze the parts to train; with LoRA the decoder trains through its
    adapters. `recompute`: gradient checkpointing, each layer's activations recomputed in the
    backward pass instead of stored (memory for one layer, about a third more compute)."""
    paths = PARTS[family.__name__]
    model.requires_grad_(False)
    for part in parts:
        if part == "decoder" and lora_rank:
            add_lora(model.get_submodule(paths["decoder"][0]), lora_rank, lora_alpha)
            continue
        for path in paths[part]:
            model.get_submodule(path).requires_grad_(True)
    if recompute:
        for module in model.modules():
            if isinstance(module, nn.ModuleList):  # the vision tower's or the decoder's layers
                for layer in module:
                    layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    return [p for p in model.parameters() if p.requires_grad]


def learning_rate(step, total, peak, warmup):
    """Linear warm-up to `peak` over `warmup` steps, then a cosine decay towards 0 at `total`
    (arXiv:1608.03983; transformers' get_cosine_schedule_with_warmup, counted from step 1)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------ saving

SHARD_BYTES = 5 * 2 ** 30  # shards of at most 5 GB, as the Hub checkpoints are cut


def hub_state(model, rename, source):
    """Our state dict under the source checkpoint's key names: each hub key of `source` is renamed
    as load() renames it, and the inverse map names our tensors. A tied weight is written once."""
    from safetensors import safe_open
    hub_key = {}
    for file_name in checkpoint_files(source):
        with safe_open(Path(source) / file_name, framework="pt") as f:
            for key in f.keys():
                if rename(key) is not None:
                    hub_key[rename(key)] = key
    tied = tied_parameters(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        if name not in hub_key:
            raise VLMError(f"weight {name} has no key in {source}")
        state[hub_key[name]] = tensor.detach().to("cpu").contiguous()
    return state


def write_checkpoint(folder, state, source, dtype, shard_bytes):
    """model.safetensors, or shards with their index when larger than `shard_bytes`; config.json
    with the saved dtype; the tokenizer, processor, chat template and generation files copied."""
    from safetensors.torch import save_file
    shards = [{}]
    shard_size = 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_size + size > shard_bytes:
            shards.append({})
            shard_size = 0
        shards[-1][key] = tensor
        shard_size += size
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / file_name, metadata={"format": "pt"})
            weight_map.update({key: file_name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = read_json(Path(source) / "config.json")
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config.pop("dtype", None)  # the 5.x name of the same field
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in sorted(Path(source).iterdir()):
        weights_files = ("config.json", "model.safetensors.index.json")
        if path.suffix in (".json", ".jinja") and path.name not in weights_files:
            shutil.copyfile(path, folder / path.name)


def save(model, family, source, output, shard_bytes=SHARD_BYTES):
    """The trained model (LoRA merged) as a checkpoint in `output`, written atomically: into a new
    hidden folder beside it (tempfile.mkdtemp: never a stale one), renamed to `output` only once
    complete, so that a crash never leaves a folder that looks like a checkpoint. A complete
    checkpoint is never deleted: when the rename fails (`output` filled meanwhile), it stays where
    it is and the error names that folder."""
    merge_lora(model)
    rename = family.hub_name  # as the family's load() renames hub keys
    if family is perception_lm:  # whether a stored output head is read depends on the tying
        rename = partial(perception_lm.hub_name, tied=model.cfg.tie_word_embeddings)
    state = hub_state(model, rename, source)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp's folder is private (mode 0700); the checkpoint is a folder made inside it with the
    # usual permissions, and it is that folder which becomes `output`
    hidden = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    folder = hidden / output.name
    try:
        folder.mkdir()
        write_checkpoint(folder, state, source, next(model.parameters()).dtype, shard_bytes)
    except BaseException:  # a crash or an interrupt mid-write: nothing half-written is left
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    try:
        folder.rename(output)  # (POSIX rename replaces an empty directory: see main())
    except OSError as e:
        raise VLMError(f"{output} cannot take the checkpoint now ({e.strerror or e}); it is kept "
                       f"in {folder}") from None
    hidden.rmdir()


# ------------------------------------------------------------ training

def to_device(inputs, device):
    return {name: value.to(device) for name, value in inputs.items()}


def evaluate(model, family, processor, examples, batch_size, device):
    """The mean loss over every answer token of the held-out examples."""
    total_loss = 0.0
    n_tokens = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            inputs = encode(family, processor, examples[start:start + batch_size])
            _, loss = model(**to_device(inputs, device))
            n_answer = int((inputs["labels"][:, 1:] != -100).sum())  # the predicted ones
            total_loss += loss.item() * n_answer
            n_tokens += n_answer
    return total_loss / n_tokens


def train(model, family, processor, examples, eval_examples, trainable, args):
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    warmup = args.warmup_steps
    if warmup is None:
        warmup = max(1, args.steps // 10)
    data = batches(examples, args.batch_size, args.seed)
    start = time.perf_counter()
    n_tokens = 0
    losses = []
    for step in range(args.steps):
        lr = learning_rate(step, args.steps, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(args.grad_accum):  # gradients summed over micro-batches, then one step
            inputs = encode(family, processor, next(data))
            _, loss = model(**to_device(inputs, device))
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
            n_tokens += int(inputs["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # transformers' Trainer default
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        elapsed = time.perf_counter() - start
        left = datetime.timedelta(seconds=round(elapsed / (step + 1) * (args.steps - step - 1)))
        print(f"step {step + 1}/{args.steps}  loss {step_loss:.4f}  lr {lr:.2e}  "
              f"{n_tokens / elapsed:.0f} tokens/s  {left} left", flush=True)
        if eval_examples and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            eval_loss = evaluate(model, family, processor, eval_examples, args.batch_size, device)
            print(f"step {step + 1}  eval loss {eval_loss:.4f}", flush=True)
    return losses


# ------------------------------------------------------------ command line

def check_training_flags(args):
    """Refuse, before the load, the settings that would do nothing or fail after it."""
    if args.lora_rank < 0:
        raise VLMError("--lora-rank must be positive, or 0 for no LoRA")
    if args.lora_alpha is not None and not 0 < args.lora_alpha < math.inf:
        raise VLMError("--lora-alpha must be a positive number")
    if (args.lora_rank or args.lora_alpha is not None) and "decoder" not in args.train:
        raise VLMError("--lora-rank and --lora-alpha adapt the decoder, which --train leaves out")
    if args.lora_alpha is not None and not args.lora_rank:
        raise VLMError("--lora-alpha scales the LoRA update: it needs --lora-rank")
    if args.lora_alpha is None:
        args.lora_alpha = 16.0
    # fp16 gradients underflow to 0 without loss scaling, which this loop does not do
    if getattr(torch, args.dtype, None) is torch.float16:
        raise VLMError("--dtype float16 cannot train here (no loss scaling): use bfloat16 or "
                       "float32")


def main(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune PaliGemma, SmolVLM or PerceptionLM on "
                                "images (or videos), prompts and answers.")
    p.add_argument("--model", required=True, help="hub repo id or local checkpoint directory")
    p.add_argument("--data", required=True, help="training data, JSON lines (see the docstring)")
    p.add_argument("--output", required=True, help="the checkpoint directory to write")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (100)")
    p.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of AdamW (1e-5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--train", nargs="+", default=["decoder"],
                   choices=["decoder", "projector", "vision"], help="the parts to train (decoder)")
    p.add_argument("--lora-rank", type=int, default=0, help="train the decoder through LoRA "
                   "adapters of this rank, merged into the weights when saving (0: no LoRA)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha / rank (16)")
    p.add_argument("--eval-data", help="held-out JSON lines: their loss every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=50, help="(50)")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation (0)")
    p.add_argument("--dtype", default="float32", help="float32 (the default: exact updates) or "
                   "bfloat16 (half the memory; small updates are lost to rounding)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~1/3 slower")
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "grad_accum", "eval_every"):
        if getattr(args, flag) <= 0:
            raise VLMError(f"--{flag.replace('_', '-')} must be positive")
    check_training_flags(args)
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise VLMError(f"--output {output} exists and is not an empty directory")
    examples = read_examples(args.data)  # field and file errors before the slow load
    eval_examples = read_examples(args.eval_data) if args.eval_data else []
    folder = resolve(args.model)
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type not in FAMILIES:
        raise VLMError(f"{folder} holds a {model_type!r} checkpoint, not one of {list(FAMILIES)}")
    family = FAMILIES[model_type]
    torch.manual_seed(args.seed)
    model, processor = family.load(str(folder), args.device, args.dtype)
    context = model.cfg.text.max_position_embeddings
    for data in (examples, eval_examples):
        check_examples(family, processor, data, context, args.batch_size)
    trainable = prepare(model, family, args.train, args.lora_rank, args.lora_alpha,
                        args.gradient_checkpointing)
    n_trainable = sum(p.numel() for p in trainable)
    print(f"training {n_trainable:,} parameters ({', '.join(args.train)}) on {len(examples)} "
          f"examples", file=sys.stderr)
    model.train()
    train(model, family, processor, examples, eval_examples, trainable, args)
    save(model, family, folder, output)
    print(f"saved {output}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
