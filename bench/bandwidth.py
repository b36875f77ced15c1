"""What is this machine's memory bandwidth? (the ceiling for decoding, which reads every weight once
per token)

    python bench/bandwidth.py [--threads N] [--gib 2]

Reads a buffer much larger than the caches with torch (the same threads the models use) and prints
GB/s. The buffer is written first: reading never-touched memory only reads the kernel's shared zero
page, which would report cache speed, not memory speed.
"""
import argparse
import json
import statistics
import time

import torch


def read_bandwidth(gib=2.0, repeats=7):
    """The best of two ways to read `gib` of fp32 once: a sum, and a matrix-vector product (what a
    decode step is). Neither alone is the ceiling on every machine: on some the sum runs below what
    a GEMV reaches."""
    x = torch.ones(int(gib * 2**30) // 4)  # written, so every page is real memory
    m, v = x.view(-1, 4096), torch.ones(4096)
    best = 0.0
    for read in (lambda: x.sum(), lambda: torch.mv(m, v)):
        read()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        best = max(best, x.numel() * 4 / statistics.median(times) / 1e9)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gib", type=float, default=2.0,
                   help="buffer size (default 2 GiB: well beyond the caches)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    gbs = read_bandwidth(a.gib)
    print(json.dumps({"read_gb_s": gbs, "threads": torch.get_num_threads()}) if a.json else
          f"read bandwidth {gbs:.1f} GB/s with {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
