"""How fast do we train, against transformers? One training step (forward, backward, AdamW step) of
SmolVLM on the same batch, ours and transformers alternately in one process, the same weights,
dtype and threads.

    python bench/train.py --checkpoint bench/checkpoints/smolvlm-256m-bfloat16 --dtype float32

The batch: `--batch` rows of one 640x480 image each (one 512 px tile, no splitting, so that a step
takes seconds on a CPU), the chat prompt and an answer, labels on the answer only. Every part
trains (vision tower, connector, decoder). Each round times `--steps` steps of ours, then of
transformers, after one untimed warm-up step each; the result is the median over `--rounds` rounds
of training tokens/s (all tokens of the batch, prompt and image included), and the ratio ours /
transformers, appended to bench/RESULTS.md.
"""
import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import smolvlm  # noqa: E402
import training_data  # noqa: E402
from compare import machine  # noqa: E402
from measure import image  # noqa: E402

ANSWER = "A colourful gradient with some noise, from dark blue on the left to bright red."


def batch(processor, rows):
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe this image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]
    prompt, answer = training_data.prompt_and_answer(processor, messages)
    return processor(text=[prompt] * rows, images=[[image()]] * rows, suffix=[answer] * rows,
                     do_image_splitting=False)


def timed_steps(step, n):
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def training_step(model, optimizer, inputs, is_ours):
    def step():
        if is_ours:
            _, loss = model(**inputs)
        else:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(HERE / "checkpoints" / "smolvlm-256m-bfloat16"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round (2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForImageTextToText
    model, processor = smolvlm.load(args.checkpoint, device="cpu", dtype=dtype)
    hf_model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, dtype=dtype)
    inputs = batch(processor, args.batch)
    n_tokens = int(inputs["attention_mask"].sum())
    steps = {}
    for name, m in (("ours", model), ("transformers", hf_model)):
        m.train()
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-6)
        steps[name] = training_step(m, optimizer, inputs, name == "ours")
        steps[name]()  # warm-up: the optimizer's state is allocated here
    rates = {"ours": [], "transformers": []}
    for round_number in range(args.rounds):
        for name in rates:
            seconds = timed_steps(steps[name], args.steps)
            rates[name].append(n_tokens / seconds)
            print(f"round {round_number + 1} {name}: {seconds:.2f} s a step, "
                  f"{n_tokens / seconds:.1f} tokens/s", file=sys.stderr)
    ours = statistics.median(rates["ours"])
    theirs = statistics.median(rates["transformers"])
    spread = {name: (min(r), max(r)) for name, r in rates.items()}
    round_ratios = [a / b for a, b in zip(rates["ours"], rates["transformers"])]
    lines = [
        f"\n{datetime.date.today()} — {machine()}\n",
        f"### training: smolvlm {Path(args.checkpoint).name}, {args.dtype}, {args.threads} threads",
        "",
        f"Batch: {args.batch} rows x {n_tokens // args.batch} tokens (one 512 px tile each, "
        "answer labels only); every part trains; forward + backward + AdamW step; "
        f"{args.rounds} alternating rounds of {args.steps} steps, median (min-max); the ratio "
        f"per round: {', '.join(f'{r:.2f}' for r in round_ratios)} (load average "
        f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs).",
        "",
        "| metric | ours | transformers | ours / transformers | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| training tokens/s | {ours:.1f} ({spread['ours'][0]:.1f}-{spread['ours'][1]:.1f}) | "
        f"{theirs:.1f} ({spread['transformers'][0]:.1f}-{spread['transformers'][1]:.1f}) | "
        f"{ours / theirs:.2f} | >= 1.2 | {'yes' if ours / theirs >= 1.2 else '**no**'} |",
    ]
    print("\n".join(lines))
    if not args.no_write:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
