"""The layers of the house (issue 22): common.py imports no file of ours, a model file imports only
common.py at its top (a tool file only inside the function that needs it), tools never import one
another in a cycle, and a model file copied with common.py alone loads, preprocesses, runs forward
and generates, with no tool file beside it."""
import ast
import shutil
import subprocess
import sys

import pytest

import paligemma_fixture
import perception_lm_fixture
import smolvlm_fixture
from conftest import ROOT

MODELS = ("paligemma", "smolvlm", "perception_lm")
OURS = {path.stem for path in ROOT.glob("*.py")}


def imports_of(name):
    """-> (ours imported at the top of the module, ours imported inside a function)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
    top = set()
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found = {node.module.split(".")[0]}
        else:
            continue
        placed = top if node.col_offset == 0 else inner
        placed.update(found & OURS)
    return top, inner


def test_the_tool_files_are_there():
    tools = OURS - set(MODELS) - {"common", "finetune", "serve"}
    assert {"quantize", "compiled", "command_line", "batch_runner", "atomic_file", "image_files",
            "lora", "openai_chat", "training_data"} <= tools


def test_the_chat_protocol_imports_no_http_stack():
    """openai_chat.py, the OpenAI protocol serve.py speaks, is plain Python: importing it (and all
    it imports) loads neither FastAPI, Starlette nor uvicorn, so it is tested without a server."""
    script = ("import sys\nimport openai_chat\n"
              "print(sorted(sys.modules.keys() & {'fastapi', 'starlette', 'uvicorn', 'serve'}))")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_common_imports_no_file_of_ours():
    top, inner = imports_of("common")
    assert top | inner == set()


@pytest.mark.parametrize("name", MODELS)
def test_a_model_file_imports_common_only_at_its_top(name):
    top, inner = imports_of(name)
    assert top == {"common"}
    assert not inner & set(MODELS)  # no model file reaches into another
    assert inner <= OURS - {name}


def test_imports_run_one_way():
    """A tool never imports a model at its top in a way that loops back: the graph of top-level
    imports between our files has no cycle, and nothing imports finetune.py or serve.py."""
    graph = {name: imports_of(name)[0] for name in OURS}
    for name, imported in graph.items():
        assert not imported & {"finetune", "serve"}, name
    visiting = set()
    done = set()

    def visit(name):
        assert name not in visiting, f"import cycle through {name}"
        if name in done:
            return
        visiting.add(name)
        for other in graph[name]:
            visit(other)
        visiting.remove(name)
        done.add(name)

    for name in graph:
        visit(name)


BUILDERS = {"paligemma": (paligemma_fixture, "pg2"), "smolvlm": (smolvlm_fixture, "v2"),
            "perception_lm": (perception_lm_fixture, "1b")}
PROMPTS = {"paligemma": "caption en", "smolvlm": "<image>Describe this image.",
           "perception_lm": "<|image|>Describe the image."}

COPIED = """
import sys
import numpy as np
import torch
from PIL import Image
sys.path[:] = [p for p in sys.path if "{root}" not in p]
import {name} as M
assert M.__file__.startswith("{copy}"), M.__file__
model, processor = M.load("{checkpoint}", dtype=torch.float32)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
inputs = processor(text=["{prompt}"], images=[[image]])
logits = model(**inputs)
ids = model.generate(**inputs, max_new_tokens=3)
print(processor.decode(ids[0]) is not None, tuple(logits.shape[:2]), sorted(sys.modules.keys()
      & {{"quantize", "compiled", "command_line", "batch_runner"}}))
"""


@pytest.mark.parametrize("name", MODELS)
def test_a_model_file_and_common_alone_load_and_generate(name, tmp_path):
    """The README's promise for copying: the model file and common.py, nothing else of ours."""
    fixture, variant = BUILDERS[name]
    checkpoint = fixture.build(tmp_path / "checkpoint", variant, check=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file_name in (f"{name}.py", "common.py"):
        shutil.copy(ROOT / file_name, copy / file_name)
    script = COPIED.format(root=ROOT, copy=copy, name=name, checkpoint=checkpoint,
                           prompt=PROMPTS[name])
    r = subprocess.run([sys.executable, "-c", script], cwd=copy, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == "True"
    assert r.stdout.rstrip().endswith("[]")  # no tool file was imported (none was there to import)
