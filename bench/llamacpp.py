"""Does SmolVLM decode at least as fast as llama.cpp on a CPU? (issue 17) Same weights (bf16), same
prompts, same threads, runs alternated.

    python bench/llamacpp.py [--size 256m|v2-500m] [--threads 2] [--repeats 3] [--new-tokens 64]
                             [--work /tmp/plainvlm-llamacpp] [--jobs N] [--json FILE]

Steps, each skipped when its output is already in --work (a second run starts measuring at once):
1. builds llama.cpp for the CPU (llama-bench, llama-mtmd-cli) from the llama-cpp-python==0.3.36
   sdist (pip download, cmake; ~6 minutes on 2 cores), again without AMX if the machine refuses
   AMX at run time;
2. converts the bench checkpoint (bench/checkpoints.py smolvlm --size SIZE --dtype bfloat16,
   written if missing) with llama.cpp's own convert_hf_to_gguf.py to a bf16 GGUF and its mmproj;
3. alternates, --repeats rounds: ours in a fresh process (64 tokens after a short text prompt, 64
   after the image prompt of bench/measure.py, and the time to that prompt's first token), eager
   and then compiled (generate(..., compiled=True), after a warm-up that compiles), then
   llama-bench (64 tokens after the same two context lengths), then llama-mtmd-cli (time to the
   first token with the same picture and prompt).

Prints a markdown table of the medians (range over the rounds) and the machine; --json FILE writes
every raw number. Decode rate, ours: one over the median gap between consecutive new tokens.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

VERSION = "0.3.36"  # llama-cpp-python, whose sdist carries llama.cpp in vendor/llama.cpp
SDIST = f"llama_cpp_python-{VERSION}"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
# for a virtual machine whose CPU lists AMX but whose kernel refuses it to a process
NO_AMX_FLAGS = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
TARGETS = ["llama-bench", "llama-mtmd-cli"]
STORY = "Write a story about a cat."
IMAGE_PROMPT = "Describe this image."  # bench/measure.py's SmolVLM prompt, for llama-mtmd-cli too

# Run by llama.cpp's converter in place of its own entry point. The bench checkpoints carry a tiny
# test tokenizer whose pre-tokenizer hash the converter does not know; the real SmolVLM tokenizer
# is SmolLM's (single digits, then byte-level BPE), which llama.cpp calls "smollm".
CONVERTER = '''"""Written by plainvlm's bench/llamacpp.py. Usage: python THIS CONVERTER ARGS..."""
import runpy
import sys

from conversion import base


def smollm_pre_tokenizer(self, tokenizer):
    return "smollm"


base.TextModel.get_vocab_base_pre = smollm_pre_tokenizer
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def say(message):
    print(message, file=sys.stderr, flush=True)


def fail(message):
    sys.exit(f"error: {message}")


def run(cmd, what, log_folder, **kwargs):
    """Run `cmd` with its output captured; on failure one line naming `what` and the last line of
    its output, the whole output kept in log_folder/WHAT.log."""
    cmd = [str(part) for part in cmd]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        fail(f"{what}: {cmd[0]} not found on PATH")
    if result.returncode != 0:
        log = Path(log_folder) / (re.sub(r"\W+", "-", what) + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        fail(f"{what} failed (exit {result.returncode}): {lines[-1].strip()} (all of it: {log})")
    return result


# ------------------------------------------------------------ building llama.cpp

def source(work):
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and unpacked into `work`."""
    folder = work / SDIST / "vendor" / "llama.cpp"
    if (folder / "CMakeLists.txt").exists():
        return folder
    tarball = work / f"{SDIST}.tar.gz"
    if not tarball.exists():
        say(f"downloading the llama-cpp-python=={VERSION} sdist to {work} ...")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={VERSION}", "-d", work],
            f"pip download llama-cpp-python=={VERSION}", work / "logs")
    if not tarball.exists():
        fail(f"pip download did not leave {tarball}")
    say(f"unpacking {tarball.name} ...")
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(tarball) as archive:
        archive.extractall(work, **safe)
    return folder


def build(llama, folder, flags, jobs, work):
    """llama-bench and llama-mtmd-cli built in llama/folder -> their bin/ folder."""
    binaries = llama / folder / "bin"
    if all((binaries / target).exists() for target in TARGETS):
        return binaries
    if not (llama / folder / "CMakeCache.txt").exists():
        say(f"configuring llama.cpp in {llama / folder} ...")
        run(["cmake", "-S", ".", "-B", folder] + CMAKE_FLAGS + flags, f"cmake configure {folder}",
            work / "logs", cwd=llama)
    say(f"building {', '.join(TARGETS)} with {jobs} jobs (about 6 minutes on 2 cores) ...")
    run(["cmake", "--build", folder, "--config", "Release", "-j", jobs, "--target"] + TARGETS,
        f"cmake build {folder}", work / "logs", cwd=llama)
    return binaries


def refuses_amx(binaries, gguf, threads):
    """Whether llama-bench dies on one token the way a machine that refuses AMX makes it die."""
    cmd = [binaries / "llama-bench", "-m", gguf, "-t", threads, "-p", "0", "-n", "1", "-r", "1",
           "-o", "json"]
    result = subprocess.run([str(part) for part in cmd], capture_output=True, text=True)
    if result.returncode == 0:
        return False
    if result.returncode == -signal.SIGILL or "amx" in result.stderr.lower():
        return True
    lines = (result.stderr.strip() or "no output").splitlines()
    fail(f"llama-bench does not run (exit {result.returncode}): {lines[-1]}")


def llama_cpp(llama, gguf, threads, jobs, work):
    """The bin/ folder of a llama.cpp build that runs here: with AMX where the machine allows it
    (a build-noamx folder says an earlier run found that it does not)."""
    if (llama / "build-noamx" / "bin" / "llama-bench").exists():
        return build(llama, "build-noamx", NO_AMX_FLAGS, jobs, work)
    binaries = build(llama, "build", [], jobs, work)
    if not refuses_amx(binaries, gguf, threads):
        return binaries
    say("llama-bench dies on AMX instructions here: building llama.cpp again without AMX")
    return build(llama, "build-noamx", NO_AMX_FLAGS, jobs, work)


# ------------------------------------------------------------ converting the checkpoint

def checkpoint(size):
    """The bench checkpoint's folder, written by bench/checkpoints.py if missing."""
    folder = HERE / "checkpoints" / f"smolvlm-{size}-bfloat16"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    say(f"writing the bench checkpoint {folder.name} ...")
    run([sys.executable, HERE / "checkpoints.py", "smolvlm", "--size", size, "--dtype",
         "bfloat16"], "bench/checkpoints.py", HERE / "checkpoints")
    if not (folder / "config.json").exists():
        fail(f"bench/checkpoints.py did not write {folder}")
    return folder


def convert(llama, folder, work):
    """(text GGUF, mmproj GGUF) of the checkpoint in bf16, by llama.cpp's own converter."""
    out = work / "gguf"
    text = out / f"{folder.name}.gguf"
    mmproj = out / f"mmproj-{folder.name}.gguf"
    if text.exists() and mmproj.exists():
        return text, mmproj
    out.mkdir(parents=True, exist_ok=True)
    # the converter imports sentencepiece: installed for it alone, never into the environment
    pydeps = work / "pydeps"
    if not (pydeps / "sentencepiece").exists():
        say(f"installing sentencepiece into {pydeps} for the converter ...")
        run([sys.executable, "-m", "pip", "install", "--quiet", "--target", pydeps,
             "sentencepiece"], "pip install sentencepiece", work / "logs")
    wrapper = work / "convert_smolvlm.py"
    wrapper.write_text(CONVERTER)
    paths = [llama, llama / "gguf-py", pydeps] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in paths if str(p)))
    for gguf, extra in ((text, []), (mmproj, ["--mmproj"])):
        if gguf.exists():
            continue
        say(f"converting {folder.name} to {gguf} ...")
        partial = gguf.with_name(gguf.name + ".part")  # renamed once whole: a crash leaves no gguf
        cmd = [sys.executable, wrapper, llama / "convert_hf_to_gguf.py", folder, "--outtype",
               "bf16", "--outfile", partial] + extra
        run(cmd, f"convert_hf_to_gguf {gguf.name}", work / "logs", env=env)
        partial.replace(gguf)
    return text, mmproj


# ------------------------------------------------------------ measuring

def ours(folder, threads, new_tokens, compile_decode):
    """One fresh process: decode after the text prompt, then decode and the time to the first token
    after the image prompt. -> dict"""
    import torch

    import measure
    import smolvlm
    torch.set_num_threads(threads)
    model, processor = smolvlm.load(str(folder), device="cpu", dtype=torch.bfloat16)
    model.stop = [-1]  # random weights: never an end token, always new_tokens tokens
    options = {"compiled": True} if compile_decode else {}
    picture = measure.image()
    story = [{"role": "user", "content": [{"type": "text", "text": STORY}]}]

    def text_inputs():
        return processor(text=[processor.apply_chat_template(story, add_generation_prompt=True)])

    def image_inputs():
        return processor(text=measure.chat("smolvlm", processor, 1), images=[[picture]])

    def timed(make_inputs, max_new_tokens):
        """-> (start, [arrival time of each new token], prompt length)"""
        times = []

        def clock(token):
            times.append(time.perf_counter())

        start = time.perf_counter()
        inputs = make_inputs()
        model.generate(**inputs, max_new_tokens=max_new_tokens, stream=clock, **options)
        if len(times) != max_new_tokens:
            fail(f"ours generated {len(times)} of {max_new_tokens} tokens")
        return start, times, inputs["input_ids"].shape[1]

    # warm-up, not counted; compiled, with the measured lengths (a cache length compiles once)
    warm_tokens = new_tokens if compile_decode else 4
    timed(text_inputs, warm_tokens)
    timed(image_inputs, warm_tokens)
    _, text_times, text_length = timed(text_inputs, new_tokens)
    image_start, image_times, image_length = timed(image_inputs, new_tokens)
    text_gap = statistics.median(b - a for a, b in zip(text_times, text_times[1:]))
    image_gap = statistics.median(b - a for a, b in zip(image_times, image_times[1:]))
    return {"decode_text_tok_s": 1 / text_gap, "decode_image_tok_s": 1 / image_gap,
            "ttft_s": image_times[0] - image_start, "text_prompt_tokens": text_length,
            "image_prompt_tokens": image_length, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "compile": compile_decode,
            "torch": torch.__version__}


def measure_ours(folder, threads, new_tokens, compile_decode, work):
    cmd = [sys.executable, __file__, "--ours", folder, "--threads", threads, "--new-tokens",
           new_tokens] + (["--compile"] if compile_decode else [])
    result = run(cmd, "ours", work / "logs")
    return json.loads(result.stdout.strip().splitlines()[-1])


def llama_bench(binaries, gguf, threads, new_tokens, depths, work):
    """Decode tokens/s after each context length in `depths` (llama-bench fills the KV cache with
    that many tokens first, untimed). -> ({depth: tok/s}, llama-bench's rows)"""
    cmd = [binaries / "llama-bench", "-m", gguf, "-t", threads, "-p", "0", "-n", new_tokens,
           "-r", "1", "-d", ",".join(str(d) for d in depths), "-o", "json"]
    rows = json.loads(run(cmd, "llama-bench", work / "logs").stdout)
    return {row["n_depth"]: row["avg_ts"] for row in rows}, rows


TIMESTAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) ")  # llama.cpp's log: minutes.s.ms.us


def seconds(line):
    """The time a llama.cpp log line was written, in seconds since the program started."""
    match = TIMESTAMP.match(line)
    if match is None:
        return None
    minutes, whole, milli, micro = (int(group) for group in match.groups())
    return 60 * minutes + whole + milli / 1e3 + micro / 1e6


def matches(pattern, lines):
    """The match of `pattern` in each line that has one."""
    found = [re.search(pattern, line) for line in lines]
    return [match for match in found if match is not None]


def mtmd_ttft(binaries, text, mmproj, picture, threads, work):
    """Time to the first token with the picture, from llama-mtmd-cli's own log. -> dict

    Its "prompt eval time" (llama_perf) runs from the first decode of the prompt to the first
    token's logits, so it already holds the image slices' encoding and their decoding into the
    cache ("mtmd batch encoding done", "image decoded" lines, kept apart here); added to it is the
    time before that decode (reading the PNG, resizing, slicing; from the CLI's warning printed
    just before it loads the image to the first "encoding mtmd batch" line, which holds the first
    few text tokens' decode as well: a few ms counted twice)."""
    cmd = [binaries / "llama-mtmd-cli", "-m", text, "--mmproj", mmproj, "--image", picture,
           "-p", IMAGE_PROMPT, "-n", "1", "-t", threads, "--perf", "-lv", "4",
           "--log-timestamps", "--log-colors", "off"]
    cmd = [str(part) for part in cmd]
    result = subprocess.run(cmd, capture_output=True, text=True)
    log = work / "logs" / "llama-mtmd-cli.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    lines = result.stderr.splitlines()
    if result.returncode != 0:
        tail = (lines or ["no output"])[-1].strip()
        return {"error": f"llama-mtmd-cli failed (exit {result.returncode}): {tail} ({log})"}
    encode = [int(m.group(1)) for m in matches(r"encoding done in (\d+) ms", lines)]
    decode = [int(m.group(1))
              for m in matches(r"image decoded \(batch \d+/\d+\) in (\d+) ms", lines)]
    evals = matches(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", lines)
    start = [seconds(line) for line in lines if "experimental CLI" in line]
    first_encode = [seconds(line) for line in lines if "encoding mtmd batch" in line]
    if not evals or not encode:
        return {"error": f"llama-mtmd-cli printed no prompt eval time or image encoding ({log})"}
    prompt_eval_s = float(evals[-1].group(1)) / 1e3
    stamps = start[:1] + first_encode[:1]
    preprocess_s = 0.0  # left out if the log has no timestamps
    if len(stamps) == 2 and None not in stamps:
        preprocess_s = stamps[1] - stamps[0]
    kept = [line for line in lines if any(key in line for key in (
        "experimental CLI", "encoding mtmd batch", "encoding done", "image decoded",
        "llama_perf_context_print"))]
    return {"ttft_s": preprocess_s + prompt_eval_s, "preprocess_s": preprocess_s,
            "prompt_eval_s": prompt_eval_s, "prompt_tokens": int(evals[-1].group(2)),
            "image_encode_s": sum(encode) / 1e3, "image_decode_s": sum(decode) / 1e3,
            "image_slices": len(encode), "lines": kept}


# ------------------------------------------------------------ report

def machine(threads, torch_version):
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("model name")]
    flags = [name for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
             if f" {name}" in text]
    cpu = names[0] if names else "unknown CPU"
    return (f"{cpu} ({os.cpu_count()} cores; {', '.join(flags) or 'no AVX2'}), torch "
            f"{torch_version}, {threads} threads")


def spread(values, fmt):
    """'median (min-max)' of the rounds; the median alone for one round."""
    if not values:
        return "failed"
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(rounds):
    text_tokens = rounds[0]["ours"]["text_prompt_tokens"]
    image_tokens = rounds[0]["ours"]["image_prompt_tokens"]
    rows = [("decode_text_tok_s", f"decode after the text prompt ({text_tokens} tokens), tok/s"),
            ("decode_image_tok_s",
             f"decode after the image prompt ({image_tokens} tokens), tok/s"),
            ("ttft_s", "time to first token with the image, s")]
    lines = ["| | ours | ours compiled | llama.cpp | ours / llama.cpp | compiled / llama.cpp |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, label in rows:
        cells = [label]
        theirs = [r["llama"][key] for r in rounds if key in r["llama"]]
        for kind in ("ours", "compiled"):
            cells.append(spread([r[kind][key] for r in rounds], "{:.2f}"))
        cells.append(spread(theirs, "{:.2f}"))
        for kind in ("ours", "compiled"):
            cells.append(ratio([r[kind][key] for r in rounds], theirs, key == "ttft_s"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio(mine, theirs, sooner):
    """Ours over llama.cpp's medians: a rate's ratio, or for a time how many times sooner."""
    if not theirs:
        return ""
    if sooner:
        return f"{statistics.median(theirs) / statistics.median(mine):.2f}x sooner"
    return f"{statistics.median(mine) / statistics.median(theirs):.2f}x"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256m", choices=["256m", "v2-500m"],
                   help="the bench checkpoint: smolvlm-SIZE-bfloat16 (bench/checkpoints.py)")
    p.add_argument("--threads", type=int, default=2, help="for ours and llama.cpp alike")
    p.add_argument("--repeats", type=int, default=3, help="rounds of ours, then llama.cpp")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--work", default="/tmp/plainvlm-llamacpp",
                   help="where llama.cpp is built and the GGUF files are written (kept)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="build jobs")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # with --ours
    p.add_argument("--json", help="write every raw number to this file")
    p.add_argument("--ours", help=argparse.SUPPRESS)  # the measuring process: a checkpoint folder
    a = p.parse_args()
    if a.ours:
        print(json.dumps(ours(Path(a.ours), a.threads, a.new_tokens, a.compile)))
        return
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = checkpoint(a.size)
    llama = source(work)
    text, mmproj = convert(llama, folder, work)
    binaries = llama_cpp(llama, text, a.threads, a.jobs, work)
    import measure
    picture = work / "image.png"
    measure.image().save(picture)
    busy = os.getloadavg()[0]
    if busy > 0.5:
        say(f"load average {busy:.2f} before measuring: something else uses the CPU, and the "
            "numbers will say more about it than about ours or llama.cpp")
    rounds = []
    for i in range(a.repeats):
        mine = measure_ours(folder, a.threads, a.new_tokens, False, work)
        say(f"round {i + 1}/{a.repeats} ours: {mine}")
        compiled = measure_ours(folder, a.threads, a.new_tokens, True, work)
        say(f"round {i + 1}/{a.repeats} ours compiled: {compiled}")
        depths = [mine["text_prompt_tokens"], mine["image_prompt_tokens"]]
        rates, rows = llama_bench(binaries, text, a.threads, a.new_tokens, depths, work)
        mtmd = mtmd_ttft(binaries, text, mmproj, picture, a.threads, work)
        theirs = {"decode_text_tok_s": rates[depths[0]], "decode_image_tok_s": rates[depths[1]]}
        if "ttft_s" in mtmd:
            theirs["ttft_s"] = mtmd["ttft_s"]
        else:
            say(f"round {i + 1}/{a.repeats} {mtmd['error']}")
        say(f"round {i + 1}/{a.repeats} llama.cpp: {theirs}")
        rounds.append({"ours": mine, "compiled": compiled, "llama": theirs, "llama_bench": rows,
                       "mtmd": mtmd,
                       "load_average": os.getloadavg()})
    build_commit = rounds[0]["llama_bench"][0].get("build_commit", "?")
    stamp = (f"{machine(a.threads, rounds[0]['ours']['torch'])}; llama.cpp {build_commit} "
             f"(llama-cpp-python {VERSION}, {binaries.parent.name}); SmolVLM {a.size} random "
             f"weights, bf16; {a.new_tokens} new tokens; {a.repeats} round(s), median (range); "
             f"load average {busy:.2f} before measuring")
    print(f"{table(rounds)}\n\n{stamp}")
    if a.json:
        report = {"machine": stamp, "size": a.size, "threads": a.threads, "checkpoint": str(folder),
                  "gguf": [str(text), str(mmproj)], "build": str(binaries), "rounds": rounds}
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
