"""How many images a second does `--batch` answer? A folder of N images (640x480, one prompt):

  ours --batch      one process: `python <family>.py --batch FOLDER --batch-size B` (for each B)
  ours, one by one  N processes: `python <family>.py --image FILE`, the way to do it before --batch
  transformers      one process: the model loaded once, then `generate` on batches of B images

    python bench/batch.py smolvlm bench/checkpoints/smolvlm-256m-bfloat16 --batch-sizes 1 2 4 8
    python bench/batch.py paligemma bench/checkpoints/paligemma-pg2-3b-224-bfloat16 \
        --batch-sizes 4 --transformers-batch-size 4 --one-by-one 16

Two rates each: end to end (N / the wall time of the process(es): Python start, imports, load and
all) and generation only (N / the time of preprocessing + generate, summed over the batches: ours
from the lines' "seconds", transformers timed the same way). The checkpoints of bench/checkpoints.py
never reach their end token, so every image gets exactly --new-tokens tokens. Prints a markdown
table; the runs go in the order of the table.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402  (bench/measure.py: the prompts and the chat template)


def write_images(folder, n):
    """n different 640x480 pictures (gradients and noise), as PNG files -> their paths."""
    from PIL import Image
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 127 / 1120], -1)
    paths = []
    for i in range(n):
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = Path(folder) / f"image{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def cli(family, checkpoint, new_tokens, *args):
    """Our CLI in a fresh process -> (wall seconds, stdout)."""
    command = [sys.executable, str(ROOT / f"{family}.py"), "--model", str(checkpoint),
               "--prompt", measure.PROMPTS[family], "--max-new-tokens", str(new_tokens),
               *map(str, args)]
    start = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{r.stderr[-3000:]}")
    return wall, r.stdout


def ours_batch(family, checkpoint, folder, n, new_tokens, batch_size):
    wall, out = cli(family, checkpoint, new_tokens, "--batch", folder, "--batch-size", batch_size)
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == n and all(line["tokens"] == new_tokens for line in lines), out[-500:]
    return {"wall_s": wall, "generate_s": sum(line["seconds"] for line in lines)}


def ours_one_by_one(family, checkpoint, paths, new_tokens):
    walls = [cli(family, checkpoint, new_tokens, "--image", path, "--verbose")[0]
             for path in paths]
    return {"wall_s": sum(walls), "generate_s": float("nan")}


def transformers_batch(family, checkpoint, folder, n, new_tokens, batch_size, dtype):
    """This script with --transformers-worker, in a fresh process."""
    command = [sys.executable, __file__, family, str(checkpoint), "--transformers-worker",
               "--folder", str(folder), "--new-tokens", str(new_tokens), "--dtype", dtype,
               "--batch-sizes", str(batch_size)]
    start = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"transformers failed:\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["images"] == n
    return {"wall_s": wall, "generate_s": result["generate_s"]}


def transformers_worker(family, checkpoint, folder, new_tokens, batch_size, dtype):
    """Load once, then per batch: the processor and a greedy generate, timed."""
    import torch
    from PIL import Image
    model, processor = measure.load("hf", family, Path(checkpoint), getattr(torch, dtype))
    paths = sorted(Path(folder).glob("*.png"))
    images = [Image.open(path).convert("RGB") for path in paths]
    generate_s = 0.0
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size]
        start = time.perf_counter()
        texts = measure.chat(family, processor, len(batch))
        inputs = processor(text=texts, images=[[image] for image in batch], padding=True,
                           return_tensors="pt")
        with torch.inference_mode():
            new_ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        generate_s += time.perf_counter() - start
        assert new_ids.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    print(json.dumps({"images": len(images), "generate_s": generate_s}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=["paligemma", "smolvlm"])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="ours --batch at each of these batch sizes")
    p.add_argument("--transformers-batch-size", type=int, default=None,
                   help="transformers' generate on batches of this many (default: not run)")
    p.add_argument("--one-by-one", type=int, default=0, help="this many one-image runs, their "
                   "time scaled to all the images (one-image runs take the same time each)")
    p.add_argument("--dtype", default="bfloat16", help="transformers' dtype: ours' CLI default "
                   "on this CPU is bfloat16 (AVX512-BF16/AMX), so keep them equal")
    p.add_argument("--transformers-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.transformers_worker:
        transformers_worker(a.family, a.checkpoint, a.folder, a.new_tokens, a.batch_sizes[0],
                            a.dtype)
        return
    rows = []
    n = a.images
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(folder, n)
        for batch_size in a.batch_sizes:
            result = ours_batch(a.family, a.checkpoint, folder, n, a.new_tokens, batch_size)
            rows.append((f"ours --batch --batch-size {batch_size}", result))
            print(rows[-1], file=sys.stderr)
        if a.transformers_batch_size:
            size = a.transformers_batch_size
            result = transformers_batch(a.family, a.checkpoint, folder, n, a.new_tokens, size,
                                        a.dtype)
            rows.append((f"transformers generate, batches of {size}", result))
            print(rows[-1], file=sys.stderr)
        if a.one_by_one:
            result = ours_one_by_one(a.family, a.checkpoint, paths[:a.one_by_one], a.new_tokens)
            result["wall_s"] *= n / a.one_by_one
            rows.append((f"ours, {n} one-image runs ({a.one_by_one} timed, scaled)", result))
            print(rows[-1], file=sys.stderr)
    print(f"### {a.family}: {n} images 640x480, {a.new_tokens} new tokens each, "
          f"{Path(a.checkpoint).name}\n")
    print("| run | wall s | images/s end to end | generate s | images/s generating |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in rows:
        print(f"| {name} | {result['wall_s']:.1f} | {n / result['wall_s']:.3f} | "
              f"{result['generate_s']:.1f} | {n / result['generate_s']:.3f} |")


if __name__ == "__main__":
    main()
