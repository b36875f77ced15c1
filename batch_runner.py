"""The --batch runner: answer one prompt for many images (files, folders, glob patterns), one JSON
line each, in input order, with the model loaded once; --output-jsonl and --resume; atomic writes.

A tool: the model files import it in their command-line part when --batch is given (PaliGemma's
--output also uses write_atomically); it imports common.py and command_line.py.
"""
import glob
import json
import os
import sys
import time
from pathlib import Path

from command_line import BATCH_SIZE, compile_option, encoding_progress, show_status
from common import VLMError, first_line, open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def folder_images(folder, recursive):
    """The image files of a folder (by suffix; hidden files left out), sorted."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    images = [path for path in files if path.is_file() and not path.name.startswith(".")
              and path.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(images)


def batch_paths(patterns, recursive):
    """--batch's files, folders and glob patterns -> image paths (str) in order, each once. A
    pattern or a folder that gives no file is an error, as is a path that does not exist."""
    paths = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = folder_images(path, recursive)
            if not found:
                raise VLMError(f"folder {pattern} holds no images ({' '.join(IMAGE_SUFFIXES)})")
        elif path.exists():
            found = [path]
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            found = [Path(match) for match in matches if Path(match).is_file()]
            if not found:
                raise VLMError(f"pattern {pattern} matches no file")
        else:
            raise VLMError(f"{pattern}: no such file or folder")
        paths += [str(found_path) for found_path in found]
    return list(dict.fromkeys(paths))  # each image once, first place kept


def read_jsonl(path):
    """The lines of an earlier --output-jsonl FILE, checked: each a JSON object with an "image"."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "image" not in record:
            raise VLMError(f"{path} line {number} is not a line --output-jsonl writes, so it "
                           "cannot be resumed")
    return lines


def write_atomically(path, write):
    """The whole file or nothing: `write(temporary)` makes a temporary file beside `path`, which is
    then synced to disk and renamed over it."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        raise VLMError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        Path(temporary).unlink(missing_ok=True)  # there only after a failure or an interrupt


class Batch:
    """--batch: the images are found, and with --resume the earlier lines read, before the model
    loads (so a bad flag or an empty folder fails at once); run() then answers them --batch-size at
    a time, one JSON line each, in input order."""

    def __init__(self, args):
        output = args.output_jsonl
        if args.image:
            raise VLMError("give --image or --batch, not both")
        if args.batch_size is not None and args.batch_size <= 0:
            raise VLMError(f"batch-size must be positive, got {args.batch_size}")
        if args.resume and not output:
            raise VLMError("--resume needs --output-jsonl FILE (the lines to resume from)")
        if output and Path(output).exists() and not args.resume:
            raise VLMError(f"{output} exists: --resume adds the missing images to it")
        if output and not Path(output).absolute().parent.is_dir():
            raise VLMError(f"cannot write {output}: no such folder")
        self.args = args
        self.paths = batch_paths(args.batch, args.recursive)
        self.lines = []  # the JSON lines written, with --resume an earlier run's first
        if args.resume and Path(output).exists():
            self.lines = read_jsonl(output)
        answered = {json.loads(line)["image"] for line in self.lines}
        self.todo = [path for path in self.paths if path not in answered]
        self.shown = args.progress or sys.stderr.isatty()

    def run(self, model, decode, make_inputs, vision, describe=None):
        """Answer every image still to do. `make_inputs(images)`: the processor's inputs for a list
        of PIL images (one prompt each); `decode(ids)`: text; `vision`: the vision tower (for the
        tiles' progress); `describe(text, image)`: more fields for a line (PaliGemma's objects).
        Failed images carry an "error" and make the run an error at the end."""
        device = next(model.parameters()).device
        size = self.args.batch_size or BATCH_SIZE.get(device.type, BATCH_SIZE["cpu"])
        terminal = sys.stderr.isatty()
        start = time.perf_counter()
        total = len(self.todo)
        try:
            for first in range(0, total, size):
                paths = self.todo[first:first + size]
                records = self.answer(paths, model, decode, make_inputs, vision, describe)
                self.write([json.dumps(record) for record in records])
                if self.shown:
                    show_status(progress_text(first + len(paths), total, start), terminal)
        except KeyboardInterrupt:
            raise VLMError("interrupted: the lines written so far are kept (--resume goes "
                           "on)") from None
        if self.shown and terminal:
            print(file=sys.stderr)  # keep the last progress line
        failed = sum("error" in json.loads(line) for line in self.lines)
        if failed:
            raise VLMError(f"{failed} of {len(self.paths)} images failed (their lines say why)")

    def answer(self, paths, model, decode, make_inputs, vision, describe):
        """One batch -> its records in order; an image that cannot be read gets its error."""
        records = {}
        images = {}
        for path in paths:
            try:
                images[path] = open_image(path)
            except VLMError as e:
                records[path] = {"image": path, "prompt": self.args.prompt, "error": first_line(e)}
        try:
            records.update(self.generate(images, model, decode, make_inputs, vision, describe))
        except VLMError as e:  # rare (one image too long for the context): the batch fails
            for path in images:
                records[path] = {"image": path, "prompt": self.args.prompt, "error": first_line(e)}
        return [records[path] for path in paths]

    def generate(self, images, model, decode, make_inputs, vision, describe):
        """{path: image} -> {path: record}, the images generated as one left-padded batch."""
        if not images:
            return {}
        args = self.args
        device = next(model.parameters()).device
        start = time.perf_counter()
        inputs = make_inputs(list(images.values()))
        inputs = {name: value.to(device) for name, value in inputs.items()}
        with encoding_progress(vision, inputs, self.shown):
            new_ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, seed=args.seed, **compile_option(args))
        seconds = (time.perf_counter() - start) / len(images)  # each image's share of the batch
        records = {}
        for (path, image), ids in zip(images.items(), new_ids.tolist()):
            text = decode(ids)
            ends = [position for position, token in enumerate(ids) if token in model.stop]
            n_tokens = len(ids)
            if ends:
                n_tokens = ends[0] + 1  # up to its end token; the rest is the batch's padding
            records[path] = {"image": path, "prompt": args.prompt, "text": text,
                             "tokens": n_tokens, "seconds": round(seconds, 3)}
            if describe is not None:
                records[path].update(describe(text, image))
        return records

    def write(self, lines):
        """A batch's lines: to stdout, or added to --output-jsonl FILE, which is rewritten whole."""
        self.lines += lines
        if not self.args.output_jsonl:
            print("\n".join(lines), flush=True)
            return
        text = "".join(line + "\n" for line in self.lines)

        def write_text(temporary):
            Path(temporary).write_text(text, encoding="utf-8")

        write_atomically(self.args.output_jsonl, write_text)


def progress_text(done, total, start):
    """`8/16 images, 0.52 images/s, 0:15 left`"""
    rate = done / (time.perf_counter() - start)
    minutes, seconds = divmod(round((total - done) / rate), 60)
    return f"{done}/{total} images, {rate:.2f} images/s, {minutes}:{seconds:02d} left"
