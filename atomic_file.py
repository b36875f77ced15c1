"""Whole files or nothing: write_atomically writes a file through a temporary beside it, renamed
over it once complete and synced.

A tool: batch_runner.py (--output-jsonl) and PaliGemma's --output use it; it imports common.py.
"""
import os
import tempfile
from pathlib import Path

from common import VLMError


def write_atomically(path, write):
    """The whole file or nothing: `write(f)` writes the contents into `f`, a new temporary file
    beside `path` open for binary writing (made by mkstemp: a fresh name, created exclusively, so
    no link planted in the folder is followed). It is synced, renamed over `path`, and the rename
    synced (the folder)."""
    folder = Path(path).absolute().parent
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp",
                                                 dir=folder)
        os.fchmod(descriptor, new_file_mode())  # not mkstemp's 0600, which hides it from others
        with os.fdopen(descriptor, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        temporary = None
        folder_descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_descriptor)
        finally:
            os.close(folder_descriptor)
    except OSError as e:
        raise VLMError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        if temporary is not None:  # a failure or an interrupt before the rename
            Path(temporary).unlink(missing_ok=True)


def new_file_mode():
    """What open() gives a new file: 0666 less the umask (which can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask
