import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Tiny models: one thread is faster than two (and much faster on a shared machine); CLI subprocesses
# inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def images():
    """A few RGB test pictures of different sizes and aspect ratios (smooth gradients plus noise, so
    a resize has real work to do)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(90, 70), (50, 30), (64, 64), (31, 77)]:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        noisy = base + rng.normal(0, 30, base.shape)
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out
