"""The command line of the three model files: the shared parser and its checks, the chat families'
--prompt turn, the timed load, the streaming printer, progress on stderr, and run_cli (our errors as
one line, exit code 1).

A tool: paligemma.py, smolvlm.py and perception_lm.py import it in their command-line part only (in
main(), when run as a script), so a model file copied with common.py alone still loads and
generates; batch_runner.py uses its progress helpers.
"""
import argparse
import contextlib
import statistics
import sys
import time
import warnings

from PIL import Image

from common import KERNELS, VLMError, check_args, choose_device_and_dtype

# --batch: images generated together by default; measured in bench/batch.py (bench/RESULTS.md)
BATCH_SIZE = {"cpu": 4, "cuda": 16}


def cli_parser(description, default_model):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=default_model, help="hub repo id or local dir (%(default)s)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for more)")
    p.add_argument("--prompt", default="", help="the text prompt")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many (100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the most likely mass p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 "
                   "on CUDA and on CPUs with AVX512-BF16 or AMX, else float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="decoder weights in int8 (per channel) or int4 (groups of 64): fewer bytes "
                   "to read per token, on the CPU; the vision tower is left as it is")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (on the "
                   "CPU): about a minute to compile, then faster decoding (bench/RESULTS.md)")
    p.add_argument("--verbose", action="store_true", help="timings (load, prefill, tokens/s)")
    p.add_argument("--progress", action="store_true", help="progress on stderr even when it is not "
                   "a terminal")
    p.add_argument("--batch", nargs="+", metavar="PATH", help="answer --prompt for each image of "
                   "these files, folders and glob patterns, one JSON line each, model loaded once")
    p.add_argument("--batch-size", type=int, default=None, help="--batch: images generated "
                   f"together (default {BATCH_SIZE['cpu']} on a CPU, {BATCH_SIZE['cuda']} on CUDA)")
    p.add_argument("--recursive", action="store_true", help="--batch: subfolders' images too")
    p.add_argument("--output-jsonl", metavar="FILE", help="--batch: the lines go to FILE "
                   "instead of stdout, each batch's appended and synced to disk")
    p.add_argument("--resume", action="store_true", help="--batch: go on with --output-jsonl "
                   "FILE: its answered images are skipped, those with an error done again; a "
                   "FILE made with another prompt or another flag that changes answers (--model, "
                   "--max-new-tokens, sampling, --quantize, --raw, --max-tiles, --vae, the dtype: "
                   "each line's \"settings\") is refused")
    return p


def check_flags(args):
    """What would fail every answer, checked before the slow load (one line, exit code 1): the
    generation settings and the prompt, the counts a family's parser has, --batch's flags without
    --batch (and with a --video), and --compile where it is not verified. (A command line with bytes
    that are not UTF-8 reaches Python as lone surrogates, which no tokenizer accepts.)"""
    check_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if any("\ud800" <= c <= "\udfff" for c in args.prompt):
        raise VLMError("the prompt is not valid UTF-8 text")
    batch_only = {"--output-jsonl": args.output_jsonl is not None, "--resume": args.resume,
                  "--batch-size": args.batch_size is not None, "--recursive": args.recursive}
    for flag, given in batch_only.items():
        if given and not args.batch:
            raise VLMError(f"{flag} is a --batch option: give --batch PATH... with it")
    for flag in ("batch_size", "num_frames", "max_tiles"):  # the chat families add the last two
        value = vars(args).get(flag)
        if value is not None and value <= 0:
            raise VLMError(f"{flag.replace('_', '-')} must be positive, got {value}")
    if args.batch and vars(args).get("video"):
        raise VLMError("--batch answers images: give --video without it")
    if args.compile:
        device, _ = choose_device_and_dtype(args.device, args.dtype)
        if device.type != "cpu":
            raise VLMError(f"--compile is verified on the CPU only, not on {device.type}")


def user_turn(processor, args, n_images, n_videos):
    """--prompt as a user turn of the checkpoint's chat template (the images, then the videos, then
    the text: the templates' order); with --raw, as typed. For the chat families (SmolVLM,
    PerceptionLM)."""
    if args.raw:
        return args.prompt
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def timed_load(load, model, args):
    """A model file's load(model) with --device, --dtype and --quantize -> (model, processor, the
    seconds it took, for --verbose)."""
    start = time.perf_counter()
    model, processor = load(model, args.device, args.dtype, args.quantize)
    return model, processor, time.perf_counter() - start


def show_status(text, terminal):
    """A progress line on stderr: rewritten in place on a terminal (text "" clears it), else one
    line each."""
    if terminal:
        print(f"\r{text}\x1b[K", end="", file=sys.stderr, flush=True)
    elif text:
        print(text, file=sys.stderr, flush=True)


def count_tiles(inputs):
    """The tiles (or frames) in a processor's output, less the all-zero ones that pad a batch row (a
    real tile is never all zeros: pixel value 0 normalizes to -1)."""
    total = 0
    for name, value in inputs.items():
        if name.startswith("pixel_values"):  # pixel_values, pixel_values_videos
            tiles = value.flatten(0, -4).flatten(1)  # (tiles, 3 * H * W)
            total += int(tiles.ne(0).any(1).sum())
    return total


@contextlib.contextmanager
def encoding_progress(vision, inputs, shown):
    """While a prefill runs: a forward hook on the vision tower counts the tiles (or frames) it
    encodes and, once the prefill has taken 2 s, shows `encoding 37 tiles: 12/37` on stderr (when
    `shown`): a PerceptionLM image is ~37 tiles, minutes on a CPU with nothing else to see."""
    total = count_tiles(inputs)
    start = time.perf_counter()
    done = 0
    terminal = sys.stderr.isatty()

    def count(module, module_inputs, output):
        nonlocal done
        done += len(module_inputs[0])  # the tiles of this call
        if shown and time.perf_counter() - start > 2:
            show_status(f"encoding {total} tiles: {done}/{total}", terminal)
            if done >= total:
                show_status("", terminal)  # the answer or the next line starts clean

    handle = vision.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()


def stream_answer(model, processor, inputs, args, load_seconds, vision):
    """Generate an answer for one prompt, printing its text to stdout as it comes (timings to stderr
    with --verbose; the encoding of many tiles with progress) -> the new ids (1, n). `vision`: the
    model's vision tower."""
    device = next(model.parameters()).device
    inputs = {name: value.to(device) for name, value in inputs.items()}
    printer = Streamer(processor.decode)
    shown = args.progress or sys.stderr.isatty()
    with encoding_progress(vision, inputs, shown):
        new_ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, stream=printer, **compile_option(args))
    printer()  # the rest of the text, and a newline
    if args.verbose:
        printer.report(load_seconds)
    if args.verbose and model.quantization:
        print(model.quantization, file=sys.stderr)
    if args.verbose:
        print(kernel_report(), file=sys.stderr)
    return new_ids


def kernel_report():
    """One line on the decode kernels common.Linear timed in this process, e.g. `kernels timed
    here: w @ x for 2 of 7 shapes (576x576 1 row, 576x1536 1 row, torch.bfloat16); x @ w.T for
    the others`."""
    if not KERNELS:
        return "kernels: none timed (fp32, compiled, or not a CPU): x @ w.T throughout"
    dtypes = sorted({str(key[2]) for key in KERNELS})
    matrix_vector = [key for key, form in KERNELS.items() if form == "w @ x"]
    shapes = [f"{out}x{inner} {rows} row" for out, inner, _, rows, _ in matrix_vector]
    return (f"kernels timed here: w @ x for {len(matrix_vector)} of {len(KERNELS)} shapes "
            f"({', '.join(shapes + dtypes)}); x @ w.T for the others")


class Streamer:
    """Prints row 0 of the new ids as text as it comes: decode all so far, print what is new, but
    hold back a trailing partial UTF-8 character (byte-fallback tokens) until it is whole. Records
    token times."""

    def __init__(self, decode):
        self.decode = decode
        self.ids = []
        self.shown = 0  # characters printed so far
        self.times = [time.perf_counter()]

    def __call__(self, token=None):  # no token: the end, print the rest and a newline
        if token is not None:
            self.times.append(time.perf_counter())
            self.ids.append(int(token[0]))
        text = self.decode(self.ids)
        if token is None:
            print(text[self.shown:], flush=True)
        elif not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)

    def report(self, load_seconds):
        times = self.times
        n = len(times) - 1
        rate = float("nan")
        if n > 1:  # one over the median step after the first token: a compiling step is no step
            steps = [later - earlier for earlier, later in zip(times[1:], times[2:])]
            rate = 1 / statistics.median(steps)
        prefill = times[1] - times[0]
        print(f"load {load_seconds:.2f} s, prefill {prefill:.2f} s (to the first token), "
              f"decode {rate:.1f} tokens/s ({n} tokens)", file=sys.stderr)


def compile_option(args):
    """generate()'s compiled=True when --compile is given ({} otherwise: a stand-in for generate(),
    such as a test's, need not take the argument)."""
    if args.compile:
        return {"compiled": True}
    return {}


def run_cli(main):
    """Our errors become `error: <one line>` and exit code 1; any other exception is a bug and keeps
    its traceback. PIL's warning about a big image (89-179 megapixels) is silenced: such an image is
    read (as transformers reads it), a bigger one refused, and either way stderr holds at most our
    one line."""
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        main()
    except VLMError as e:
        sys.exit(f"error: {e}")  # printed to stderr, exit code 1
