"""Which files are images: --batch's files, folders and glob patterns -> the image paths, in order,
each once.

A tool: batch_runner.py uses it (and examples/ray_batch.py its suffixes); it imports common.py.
"""
import glob
from pathlib import Path

from common import VLMError

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
