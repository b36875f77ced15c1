"""The --batch runner: answer one prompt for many images (files, folders, glob patterns), one JSON
line each, in input order, with the model loaded once; --output-jsonl and --resume. Each family's
batch_answerer builds the per-batch code path (Answerer); DatasetAnswerer runs the same path over a
Ray Data dataset, on many machines.

A tool: the model files import it in their command-line part when --batch is given, and Ray's
actors for DatasetAnswerer (examples/ray_batch.py); it imports common.py, command_line.py,
atomic_file.py, image_files.py (and a model file, in DatasetAnswerer), never Ray.
"""
import importlib
import io
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

from atomic_file import write_atomically
from command_line import BATCH_SIZE, compile_option, encoding_progress, show_status
from common import VLMError, choose_device_and_dtype, first_line, open_image
from image_files import batch_paths

# The flags that change an answer, recorded in each line's "settings" (with the prompt and the
# dtype): --resume refuses a file made with others. Those left out (--device, --compile,
# --batch-size, --progress, ...) change how fast an answer comes, not what it is.
ANSWER_FLAGS = ("model", "quantize", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                "raw", "max_tiles", "vae")
LINE_START = b'{"image": '  # every line we write starts so: json.dumps keeps "image" first


def run_settings(args):
    """What a line's answer depends on besides its image: the flags of ANSWER_FLAGS this model file
    has, and the dtype in use (the default depends on the machine)."""
    settings = {name: getattr(args, name) for name in ANSWER_FLAGS if hasattr(args, name)}
    _, dtype = choose_device_and_dtype(args.device, args.dtype)
    settings["dtype"] = str(dtype).removeprefix("torch.")
    return settings


def read_jsonl(path, prompt, settings):
    """The lines of an earlier --output-jsonl FILE -> ({image: line} in file order, the images whose
    line is an error). What follows the last newline is a line cut by a crash: left out, its image
    is done again. Any other line that is not one we write, or one made with another prompt or
    settings, is refused."""
    *lines, tail = Path(path).read_bytes().split(b"\n")
    if not (tail.startswith(LINE_START) or LINE_START.startswith(tail)):
        lines.append(tail)  # not the start of a line of ours: checked below, and refused
    wanted = {"prompt": prompt, **settings}
    kept = {}
    failed = set()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise VLMError(f"{path} line {number} is not a line --output-jsonl writes, so it "
                           "cannot be resumed")
        made = {"prompt": record.get("prompt"), **(record.get("settings") or {})}
        for name, value in wanted.items():
            if made.get(name) != value:
                flag = "--" + name.replace("_", "-")
                raise VLMError(f"{path} line {number} was made with another {flag} "
                               f"({json.dumps(made.get(name))}, not {json.dumps(value)}): "
                               "--resume needs the same prompt and settings")
        kept[record["image"]] = line.decode("utf-8")
        if "error" in record:
            failed.add(record["image"])
    return kept, failed


def open_images(paths, contents=None):
    """-> [(path, PIL image, or the one line saying why it cannot be read)]. `contents`: the files'
    bytes, read already (a Ray dataset's), else the files are read from `paths`."""
    items = []
    for row, path in enumerate(paths):
        source = path
        if contents is not None:
            source = NamedBytes(contents[row], path)
        try:
            items.append((path, open_image(source)))
        except VLMError as e:
            items.append((path, first_line(e)))
    return items


class NamedBytes(io.BytesIO):
    """A file's bytes in memory, named by the file's path: open_image's message about them (PIL's
    within it too) is the one --batch gives about the file."""

    def __init__(self, data, path):
        super().__init__(data)
        self.path = path

    def __str__(self):
        return self.path

    def __repr__(self):  # PIL names a file object it cannot identify by its repr
        return repr(self.path)


def check_prompt(make_inputs, tokenizer, context, args):
    """Before the load, what would fail every image fails once: the processor's check of the
    prompt (its image placeholders) on a probe image, and the context: the prompt's own text
    tokens (no image's) plus --max-new-tokens (in `args`, the command line's) must fit."""
    inputs = make_inputs([Image.new("RGB", (64, 64), "gray")])
    added = tokenizer.get_added_tokens_decoder()  # image and template tokens among them
    n_text = sum(token not in added for token in inputs["input_ids"][0].tolist())
    if n_text + args.max_new_tokens > context:
        raise VLMError(f"the prompt's text alone ({n_text} tokens, no image's) plus "
                       f"--max-new-tokens ({args.max_new_tokens}) exceed the model's context of "
                       f"{context} tokens: every image would fail")


class Answerer:
    """The per-batch code path: a list of (path, image or error) -> one record each, in order.
    `make_inputs(images)`: the processor's inputs for a list of PIL images (one prompt each);
    `decode(ids)`: text; `vision`: the vision tower (for the tiles' progress); `describe(text,
    image)`: more fields for a record (PaliGemma's objects); `args`: the command line's."""

    def __init__(self, model, decode, make_inputs, vision, args, describe=None):
        self.model = model
        self.decode = decode
        self.make_inputs = make_inputs
        self.vision = vision
        self.args = args
        self.describe = describe
        self.settings = run_settings(args)
        self.shown = args.progress or sys.stderr.isatty()
        device = next(model.parameters()).device
        # images generated together (Batch.run's batches): --batch-size, else the device's default
        self.batch_size = args.batch_size or BATCH_SIZE.get(device.type, BATCH_SIZE["cpu"])

    def __call__(self, items):
        images = {path: image for path, image in items if not isinstance(image, str)}
        answers = self.answers(images)
        records = []
        for path, image in items:
            answer = answers.get(path, image)  # an image that could not be read: its error
            if isinstance(answer, str):
                answer = {"image": path, "prompt": self.args.prompt, "error": answer}
            records.append({**answer, "settings": self.settings})
        return records

    def answers(self, images):
        """{path: image} -> {path: record, or the one line of its error}, generated together; if
        that fails (say one long image: the padded batch passes the context), each image alone, so
        that an image's answer never depends on the others in its batch."""
        try:
            return self.generate(images)
        except VLMError as e:
            if len(images) == 1:
                return {path: first_line(e) for path in images}
        answers = {}
        for path, image in images.items():
            answers.update(self.answers({path: image}))
        return answers

    def generate(self, images):
        """{path: image} -> {path: record}, the images generated as one left-padded batch."""
        if not images:
            return {}
        args = self.args
        model = self.model
        device = next(model.parameters()).device
        start = time.perf_counter()
        inputs = self.make_inputs(list(images.values()))
        inputs = {name: value.to(device) for name, value in inputs.items()}
        with encoding_progress(self.vision, inputs, self.shown):
            new_ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed, **compile_option(args))
        seconds = (time.perf_counter() - start) / len(images)  # each image's share of the batch
        records = {}
        for (path, image), ids in zip(images.items(), new_ids.tolist()):
            text = self.decode(ids)
            ends = [position for position, token in enumerate(ids) if token in model.stop]
            n_tokens = len(ids)
            if ends:
                n_tokens = ends[0] + 1  # up to its end token; the rest is the batch's padding
            records[path] = {"image": path, "prompt": args.prompt, "text": text,
                             "tokens": n_tokens, "seconds": round(seconds, 3)}
            if self.describe is not None:
                records[path].update(self.describe(text, image))
        return records


class Batch:
    """--batch: the images are found, and with --resume the earlier lines read, before the model
    loads (so a bad flag or an empty folder fails at once); run() then answers them --batch-size at
    a time, one JSON line each, in input order."""

    def __init__(self, args):
        output = args.output_jsonl
        if args.image:
            raise VLMError("give --image or --batch, not both")
        if args.resume and not output:
            raise VLMError("--resume needs --output-jsonl FILE (the lines to resume from)")
        if output and Path(output).exists() and not args.resume:
            raise VLMError(f"{output} exists: --resume adds the missing images to it")
        if output and not Path(output).absolute().parent.is_dir():
            raise VLMError(f"cannot write {output}: no such folder")
        self.args = args
        self.paths = batch_paths(args.batch, args.recursive)
        self.settings = run_settings(args)
        self.lines = {}  # --output-jsonl: {image: line}, an earlier run's kept ones first
        failed = set()
        if args.resume and Path(output).exists():
            self.lines, failed = read_jsonl(output, args.prompt, self.settings)
        self.rank = {path: position for position, path in enumerate(self.paths)}
        for path in failed & set(self.paths):  # done again, its new line in its place
            del self.lines[path]
        self.todo = [path for path in self.paths if path not in self.lines]
        self.written = None  # the images in FILE, in its order, once this run has written it
        self.failed = 0
        self.shown = args.progress or sys.stderr.isatty()

    def run(self, batch_answerer):
        """Answer every image still to do with the Answerer `batch_answerer(args)` makes (the
        family's: it loads the model, once the images are found). Failed images carry an
        "error" and make the run an error at the end."""
        answer = batch_answerer(self.args)
        size = answer.batch_size
        terminal = sys.stderr.isatty()
        start = time.perf_counter()
        total = len(self.todo)
        try:
            for first in range(0, total, size):
                paths = self.todo[first:first + size]
                self.write(answer(open_images(paths)))
                if self.shown:
                    show_status(progress_text(first + len(paths), total, start), terminal)
        except KeyboardInterrupt:
            self.put_in_order()
            raise VLMError("interrupted: the lines written so far are kept (--resume goes "
                           "on)") from None
        self.put_in_order()
        if self.shown and terminal:
            print(file=sys.stderr)  # keep the last progress line
        if self.failed:
            raise VLMError(f"{self.failed} of {len(self.paths)} images failed (their lines say "
                           "why)")

    def write(self, records):
        """A batch's lines: printed to stdout, or put in --output-jsonl FILE: its first write this
        run makes the whole file (with --resume, the kept lines and the batch's, in order), each
        later one appends; either way written, flushed and synced to disk."""
        self.failed += sum("error" in record for record in records)
        lines = {record["image"]: json.dumps(record) for record in records}
        if not self.args.output_jsonl:
            print("\n".join(lines.values()), flush=True)
            return
        self.lines.update(lines)
        if self.written is None:
            self.rewrite()
            return
        try:
            with open(self.args.output_jsonl, "ab") as f:
                f.write(jsonl(lines.values()))  # one write: a crash cuts at most its last line
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise VLMError(f"cannot write {self.args.output_jsonl} ({e.strerror or e})") from None
        self.written += list(lines)

    def in_order(self):
        """FILE's images in input order, after the kept lines of images not given this time."""
        return sorted(self.lines, key=lambda image: self.rank.get(image, -1))

    def rewrite(self):
        """FILE written whole, in order, atomically: a run's first write, and at the end once more
        if a retried image was appended after images that come after it."""
        self.written = self.in_order()
        data = jsonl(self.lines[image] for image in self.written)
        write_atomically(self.args.output_jsonl, lambda f: f.write(data))

    def put_in_order(self):
        if self.written is not None and self.written != self.in_order():
            self.rewrite()


def jsonl(lines):
    """Lines -> the bytes of a JSON-lines file (each line ends with a newline)."""
    return "".join(line + "\n" for line in lines).encode("utf-8")


def progress_text(done, total, start):
    """`8/16 images, 0.52 images/s, 0:15 left`"""
    rate = done / (time.perf_counter() - start)
    minutes, seconds = divmod(round((total - done) / rate), 60)
    return f"{done}/{total} images, {rate:.2f} images/s, {minutes}:{seconds:02d} left"


# ------------------------------------------------------------ many machines: Ray Data

FAMILIES = ("paligemma", "smolvlm", "perception_lm")  # the model files, by module name


def family_args(family, model, prompt, max_new_tokens=100, dtype=None, quantize=None,
                device=None, options=()):
    """A family's model file and the arguments its command line gives for these values (its
    parser's defaults, its checks: a bad flag fails here in one line); `options`: more of its
    flags as typed, say ["--raw"], ["--max-tiles", "4"], ["--temperature", "0.7", "--seed", "1"].
    model None: the family's default."""
    if family not in FAMILIES:
        raise VLMError(f"no family {family!r}: one of {', '.join(FAMILIES)}")
    module = importlib.import_module(family)
    argv = ["--prompt", prompt, "--max-new-tokens", str(max_new_tokens), *options]
    for flag, value in (("--model", model), ("--dtype", dtype), ("--quantize", quantize),
                        ("--device", device)):
        if value is not None:
            argv += [flag, value]
    return module, module.parse_args(argv)


class DatasetAnswerer:
    """--batch's answers over a Ray Data dataset, on as many machines as the cluster has:
    `dataset.map_batches(DatasetAnswerer, fn_constructor_kwargs={"family": ..., "model": ...,
    "prompt": ...}, compute=ActorPoolStrategy(size=N))` builds one in each of N actors, which
    loads the model once (family_args says what the arguments mean). A batch holds "path"
    (include_paths=True) and either the files' "bytes" (read_binary_files: decoded here as --batch
    opens a file, EXIF rotation too, and an unreadable one is an error line with --batch's
    message) or decoded "image" pixels (read_images, which fails on an unreadable file). -> the
    --batch lines' fields as columns: every row has every field, null where its line has none (a
    good row's error; a failed row's text, tokens, seconds, objects)."""

    def __init__(self, family, model, prompt, max_new_tokens=100, dtype=None, quantize=None,
                 device=None, batch_size=None, options=()):
        module, args = family_args(family, model, prompt, max_new_tokens, dtype, quantize, device,
                                   options)
        self.answer = module.batch_answerer(args)  # --batch's own: the check, then the load
        self.batch_size = batch_size or self.answer.batch_size
        described = ()
        if self.answer.describe is not None:  # a family's fields (PaliGemma's objects), in order
            described = tuple(self.answer.describe("", Image.new("RGB", (64, 64))))
        # Arrow needs the same columns in every batch, whatever its rows hold
        self.columns = ("image", "prompt", "text", "tokens", "seconds", *described, "error",
                        "settings")

    def __call__(self, batch):
        paths = [str(path) for path in batch["path"]]  # read with include_paths=True
        if "bytes" in batch:
            items = open_images(paths, batch["bytes"])
        else:
            items = [(path, Image.fromarray(pixels)) for path, pixels in zip(paths, batch["image"])]
        records = []
        for first in range(0, len(items), self.batch_size):
            records += self.answer(items[first:first + self.batch_size])
        return {column: [record.get(column) for record in records] for column in self.columns}
