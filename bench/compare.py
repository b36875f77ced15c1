"""How do we compare with transformers? Same weights, inputs, dtype and threads; each run in a fresh
process.

    python bench/compare.py paligemma --size pg2-3b-224 --dtype bfloat16
    python bench/compare.py smolvlm --size 256m --dtype float32 --repeats 5
    python bench/compare.py paligemma --size pg2-3b-224 --dtype bfloat16 --quantize int8
    # real weights
    python bench/compare.py paligemma --checkpoint ~/models/paligemma2-3b-mix-224 --dtype float32

Runs bench/measure.py for ours and for transformers alternately (`--repeats` times each, median
taken), measures the machine's read bandwidth in the same run, prints a markdown table of the ratios
(ours / transformers) with the absolute numbers, and appends it to bench/RESULTS.md.
"""
import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# metric, label, unit, better, target ratio (ours / transformers), format
METRICS = [("decode_tok_s", "decode, batch 1", "tok/s", "higher", 1.5, "{:.2f}"),
           ("batch4_tok_s", "decode throughput, batch 4", "tok/s", "higher", None, "{:.2f}"),
           ("ttft_s", "time to first token (1 image)", "s", "lower", 0.8, "{:.2f}"),
           ("load_s", "load (imports + weights + processor)", "s", "lower", 0.3, "{:.2f}"),
           ("peak_rss_mb", "peak RSS", "MB", "lower", 0.7, "{:.0f}"),
           ("anon_mb", "of it anonymous at the end (not file pages)", "MB", "lower", None,
            "{:.0f}")]


def measure(impl, family, folder, dtype, new_tokens, threads, quantize=None):
    cmd = [sys.executable, str(HERE / "measure.py"), impl, family, str(folder), "--dtype", dtype,
           "--new-tokens", str(new_tokens)] + (["--threads", str(threads)] if threads else [])
    if quantize:
        cmd += ["--quantize", quantize]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{impl} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch
    import transformers
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    isa = ("AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?")
    return (f"{cpu}, {isa}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def table(family, size, dtype, runs, bandwidth, threads):
    med = {impl: {k: statistics.median(r[k] for r in runs[impl]) for k in runs[impl][0]}
           for impl in runs}
    ours, hf = med["ours"], med["hf"]
    n_runs = len(runs["ours"])
    lines = [f"### {family} {size}, {dtype}, {threads} threads ({n_runs} runs each, median)", "",
             "| metric | ours | transformers | ours / transformers | target | met |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label, unit, better, target, fmt in METRICS:
        ratio = ours[key] / hf[key]
        met = "" if target is None else (
            "yes" if (ratio >= target if better == "higher" else ratio <= target) else "**no**")
        goal = "" if target is None else (f">= {target}" if better == "higher" else f"<= {target}")
        lines.append(f"| {label} ({unit}) | {fmt.format(ours[key])} | {fmt.format(hf[key])} | "
                     f"{ratio:.2f} | {goal} | {met} |")
    for impl, name in (("ours", "ours"), ("hf", "transformers")):
        achieved = med[impl]["decode_bytes"] * med[impl]["decode_tok_s"] / 1e9
        if impl == "ours":
            pct = 100 * achieved / bandwidth
            lines.append(f"| decode bandwidth, {name} "
                         f"(GB/s; % of the {bandwidth:.1f} GB/s read ceiling) | "
                         f"{achieved:.1f} ({pct:.0f}%) | | | >= 60% | "
                         f"{'yes' if pct >= 60 else '**no**'} |")
        else:
            lines.append(f"| decode bandwidth, {name} (GB/s; % of ceiling) | | {achieved:.1f} "
                         f"({100 * achieved / bandwidth:.0f}%) | | | |")
    lines.append(f"\nDecode reads {ours['decode_bytes'] / 1e9:.2f} GB per token "
                 f"(decoder + LM head, {dtype}). "
                 f"Prompt: {int(ours['prompt_tokens'])} tokens "
                 f"(transformers: {int(hf['prompt_tokens'])}); "
                 f"{int(ours['tokens'])} new tokens per run.")
    return "\n".join(lines)


def quantized_table(family, size, dtype, quantize, runs, bandwidth, threads):
    """Ours quantized beside ours unquantized and transformers (both in `dtype`)."""
    med = {impl: {k: statistics.median(r[k] for r in runs[impl]) for k in runs[impl][0]}
           for impl in runs}
    q, ours, hf = med[quantize], med["ours"], med["hf"]
    lines = [f"### {family} {size}, {quantize} (activations {dtype}), {threads} threads "
             f"({len(runs['hf'])} runs each, median)", "",
             f"| metric | ours {quantize} | ours {dtype} | transformers {dtype} | "
             f"{quantize} / ours | {quantize} / transformers |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label, unit, better, target, fmt in METRICS:
        lines.append(f"| {label} ({unit}) | {fmt.format(q[key])} | {fmt.format(ours[key])} | "
                     f"{fmt.format(hf[key])} | {q[key] / ours[key]:.2f} | {q[key] / hf[key]:.2f} |")
    cells = []
    for impl in (quantize, "ours", "hf"):
        achieved = med[impl]["decode_bytes"] * med[impl]["decode_tok_s"] / 1e9
        cells.append(f"{achieved:.1f} ({100 * achieved / bandwidth:.0f}%)")
    lines.append(f"| decode bandwidth (GB/s; % of the {bandwidth:.1f} GB/s read ceiling) | "
                 + " | ".join(cells) + " | | |")
    lines.append(f"\nDecode reads {q['decode_bytes'] / 1e9:.2f} GB per token in {quantize} "
                 f"({ours['decode_bytes'] / 1e9:.2f} GB in {dtype}). Prompt: "
                 f"{int(q['prompt_tokens'])} tokens; {int(q['tokens'])} new tokens per run. "
                 f"Spread of decode tok/s over the runs, {quantize}: "
                 f"{min(r['decode_tok_s'] for r in runs[quantize]):.2f}-"
                 f"{max(r['decode_tok_s'] for r in runs[quantize]):.2f}, {dtype}: "
                 f"{min(r['decode_tok_s'] for r in runs['ours']):.2f}-"
                 f"{max(r['decode_tok_s'] for r in runs['ours']):.2f}.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=["paligemma", "smolvlm", "perception_lm"])
    p.add_argument("--size", help="a real size from bench/checkpoints.py (random weights)")
    p.add_argument("--checkpoint", help="or a local checkpoint directory (real weights)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="also run ours with quantized decoder weights, in turn with the other two")
    p.add_argument("--no-write", action="store_true",
                   help="print the table without appending to RESULTS.md")
    a = p.parse_args()
    if not a.checkpoint and not a.size:
        p.error("give --size or --checkpoint")
    from checkpoints import checkpoint
    folder = Path(a.checkpoint) if a.checkpoint else checkpoint(a.family, a.size, "bfloat16")
    thread_args = ["--threads", str(a.threads)] if a.threads else []
    bw = subprocess.run([sys.executable, str(HERE / "bandwidth.py"), "--json"] + thread_args,
                        capture_output=True, text=True, check=True)
    bandwidth = json.loads(bw.stdout)["read_gb_s"]
    runs = {"ours": [], "hf": []}
    if a.quantize:
        runs[a.quantize] = []
    for i in range(a.repeats):
        for impl in runs:
            quantize = impl if impl == a.quantize else None
            which = "ours" if quantize else impl
            runs[impl].append(measure(which, a.family, folder, a.dtype, a.new_tokens, a.threads,
                                      quantize))
            print(f"run {i + 1}/{a.repeats} {impl}: {runs[impl][-1]}", file=sys.stderr)
    threads = runs["ours"][0]["threads"]
    if a.quantize:
        text = quantized_table(a.family, a.size or folder.name, a.dtype, a.quantize, runs,
                               bandwidth, threads)
    else:
        text = table(a.family, a.size or folder.name, a.dtype, runs, bandwidth, threads)
    stamp = f"{datetime.date.today()} — {machine()}; read bandwidth {bandwidth:.1f} GB/s"
    print(f"{text}\n\n{stamp}")
    if not a.no_write:
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n{text}\n\n{stamp}\n")


if __name__ == "__main__":
    main()
