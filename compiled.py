"""Compiled decoding: `generate(..., compiled=True)` and the CLIs' `--compile` run the decode step
as one torch.compile program. Eager PyTorch runs a SmolVLM-256M step as ~7,400 separate operations,
each paying its dispatch; compiled, the small ones are fused and each matrix-vector product gets
the kernel timed fastest for its shape (bench/RESULTS.md, issue 17). For inference: the weights
are frozen into the program.

Frozen weights are copies, so a program belongs to one model and to the weights it held when it
was compiled. Dynamo keeps its programs on the code object of the function it compiles, which
every model of a class shares; so each model's step gets a code object of its own (dynamo's cache
then is per model, and so is its recompile limit), and a new one when its weights change. A
program's frozen weights stay in memory until the process ends, though (Inductor's code cache
keeps every program it loaded): each model compiled, and each change of its weights followed by a
compiled run, holds one more copy (~0.8 GB for SmolVLM-256M in bf16).

A tool: a model file's generate() imports it only when compiled=True; nothing else depends on it.
"""
import sys
import threading
import types
from itertools import chain

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from common import VLMError

COMPILE_OPTIONS = {
    "max_autotune": True,  # time candidate kernels for each matrix product and keep the fastest
    # checking the model's ~270 modules at each step costs ~0.5 ms; the program is this model's
    # own (one code object per model and weights, below), so those checks could never fail
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "autotune_num_choices_displayed": 0,  # no timing tables on stderr
    "max_autotune_report_choices_stats": False,
}
LOCK = threading.Lock()  # the models' program tables
# one compile at a time (dynamo compiles one at a time anyway): a thread's first call of a step
# that another thread is compiling waits for it and runs that program
COMPILING = threading.Lock()


def compile_step(model, name, keys, cache):
    """The model's decode method `name` as a compiled step, made at its first call and kept on
    the model for the next runs while the model holds the same weights. The run's length (the
    cache's slots, `keys` (B, max_len)) is marked as the size that changes, so one program serves
    every prompt length; each batch size has a program of its own."""
    if keys.device.type != "cpu":
        raise VLMError(f"--compile is verified on the CPU only, not on {keys.device.type}")
    torch._dynamo.mark_dynamic(keys, 1)  # (B, max_len)
    for tensor in cache.k + cache.v:
        torch._dynamo.mark_dynamic(tensor, 2)  # (B, K, max_len, D)
    weights = fingerprint(model)
    with LOCK:
        if getattr(model, "compiled_weights", None) != weights:
            model.compiled_weights = weights
            model.compiled_steps = {}  # the old weights' programs are never run again
        key = (name, keys.shape[0])
        if key not in model.compiled_steps:
            model.compiled_steps[key] = Program(model, name)
        return model.compiled_steps[key]


def fingerprint(model):
    """What identifies the weights a program froze: each parameter's and buffer's identity, memory
    and version counter. The counter counts every in-place change made through the tensor
    (optimizer steps, load_state_dict, LoRA merges, `with torch.no_grad(): w.mul_(2)`), not the
    changes made through its `.data`, which autograd does not see either."""
    tensors = chain(model.parameters(), model.buffers())
    return tuple((id(t), t.data_ptr(), version(t)) for t in tensors)


def version(tensor):
    if tensor.is_inference():  # made in inference mode: has no counter, and cannot be changed
        return -1  # in place outside it
    return tensor._version


def own_method(model, name):
    """model.name, bound to a fresh copy of its function's code: dynamo's programs for it are then
    this model's alone."""
    function = getattr(type(model), name)
    code = function.__code__.replace()  # equal, not identical: the cache is per object
    copy = types.FunctionType(code, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(copy, model)


class Program:
    """A step compiled at its first call with the weights frozen: as constants, packed once for the
    kernels chosen. Freezing must be set while the step is traced, which torch.compile's options do
    not reach, so the compiling call runs with inductor's `freezing` set (a setting local to this
    thread; entered at every step it would cost ~25-120 us a step), and the later calls without.
    Dynamo compiles anew when something it checks changes (the thread count, autocast, inference
    tensors or not): that would be unfrozen, so it is refused (recompile_limit=1 with fullgraph
    raises) and the step compiled again here, frozen."""

    def __init__(self, model, name):
        self.model = model
        self.name = name
        self.step = None  # set once a compile has run

    def __call__(self, *args):
        step = self.step
        if step is not None:
            try:
                return step(*args)
            except FailOnRecompileLimitHit:
                pass  # compiled for other settings: compile again below
        with COMPILING:
            if self.step is not step:  # compiled by another thread meanwhile
                return self.step(*args)
            print("compiling the decode step: about a minute on a CPU, once for each model, batch "
                  "size and weights", file=sys.stderr)
            fresh = torch.compile(own_method(self.model, self.name), fullgraph=True,
                                  recompile_limit=1, options=COMPILE_OPTIONS)
            with torch._inductor.config.patch(freezing=True):
                out = fresh(*args)
            self.step = fresh
            return out
