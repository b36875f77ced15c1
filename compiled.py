"""Compiled decoding: `generate(..., compiled=True)` and the CLIs' `--compile` run the decode step
as one torch.compile program. Eager PyTorch runs a SmolVLM-256M step as ~7,400 separate operations,
each paying its dispatch; compiled, the small ones are fused and each matrix-vector product gets
the kernel timed fastest for its shape (bench/RESULTS.md, issue 17). For inference: the weights
are frozen into the program.

A tool: smolvlm.py's generate() imports it only when compiled=True; nothing else depends on it.
"""
import sys
from functools import partial

import torch

from common import VLMError

COMPILE_OPTIONS = {
    "max_autotune": True,  # time candidate kernels for each matrix product and keep the fastest
    # the model's modules do not change between steps: checking them all costs ~0.5 ms a step
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "autotune_num_choices_displayed": 0,  # no timing tables on stderr
    "max_autotune_report_choices_stats": False,
}


def compile_step(model, name, keys, cache):
    """The model's decode method `name` compiled, once, and kept on the model for the next runs.
    The run's length (the cache's slots, `keys` (B, max_len)) is marked as the size that changes,
    so one compiled program serves every prompt length; the batch size compiles anew."""
    if keys.device.type != "cpu":
        raise VLMError(f"--compile is verified on the CPU only, not on {keys.device.type}")
    torch._dynamo.mark_dynamic(keys, 1)  # (B, max_len)
    for tensor in cache.k + cache.v:
        torch._dynamo.mark_dynamic(tensor, 2)  # (B, K, max_len, D)
    attribute = "compiled_" + name
    if not hasattr(model, attribute):  # compiled at its first call, after the first token
        print("compiling the decode step at its first call: about a minute on a CPU, once in this "
              "process", file=sys.stderr)
        step = torch.compile(getattr(model, name), options=COMPILE_OPTIONS)
        setattr(model, attribute, step)
    return partial(call_frozen, getattr(model, attribute))


def call_frozen(step, *args):
    """Run a compiled step, compiling it first if need be with its weights frozen: constants,
    packed once for the kernels chosen. (Freezing must be set while the step is traced, which
    torch.compile's options do not reach.)"""
    with torch._inductor.config.patch(freezing=True):
        return step(*args)
