"""Many machines: examples/ray_batch.py maps batch_runner.DatasetAnswerer over a Ray Data dataset
on a local Ray (2 CPUs, 2 actors of 1 CPU each). For the same folder (good images, a truncated PNG,
a text file named .jpg), its JSON lines equal --batch's: each image exactly once, the same texts,
token counts, PaliGemma objects, settings and the unreadable images' error messages. A load that
would fail every image stops the job in one line; without Ray, one line says how to install it.

The tests that need Ray are marked `ray` (about two minutes on 2 shared cores, most of it starting
Ray and its actors): `.ci/run` runs them in a step of their own, after installing "ray[data]";
`python -m pytest -m "not ray"` leaves them out."""
import contextlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import paligemma
import paligemma_fixture
import smolvlm
import smolvlm_fixture
from conftest import ROOT
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)
from helpers import cli_in_process
from test_batch import write_images

SCRIPT = ROOT / "examples" / "ray_batch.py"
# PaliGemma's prompt and length: this fixture then answers two of the pictures with objects
FAMILIES = {"smolvlm": (smolvlm, smolvlm_fixture, "v1", "Describe this image.", 8),
            "paligemma": (paligemma, paligemma_fixture, "pg2", "detect person", 16)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    return {family: fixture.build(root / family, variant, check=False)
            for family, (_, fixture, variant, _, _) in FAMILIES.items()}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the module; shut down at its end, and every process it started
    (Ray's servers, its workers) gone within 30 s, or killed and the teardown fails."""
    ray = pytest.importorskip("ray")
    before = descendants()
    # the actors import the model files as this process does
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield ray
    finally:
        started = descendants() - before  # taken while Ray's processes are still our children
        ray.shutdown()
        give_up = time.monotonic() + 30
        while started & running() and time.monotonic() < give_up:
            time.sleep(0.5)
        left = started & running()
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray left processes {sorted(pid for pid, _ in left)} running"


def processes():
    """{(pid, start time): (parent pid, state)} of every process, from Linux's /proc (the start
    time tells a process from a later one given the same pid)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the fields after the name (in parentheses; it may hold ")" itself)
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while listed
        found[(int(stat.parent.name), fields[19])] = (int(fields[1]), fields[0])
    return found


def descendants():
    """This process's children, their children, and so on: {(pid, start time)}."""
    table = processes()
    found = set()
    parents = {os.getpid()}
    while parents:
        children = {key for key, (parent, _) in table.items() if parent in parents} - found
        found |= children
        parents = {pid for pid, _ in children}
    return found


def running():
    """The processes that have not ended (a zombie has ended: only its exit status is left)."""
    return {key for key, (_, state) in processes().items() if state != "Z"}


@contextlib.contextmanager
def deadline(seconds):
    """A TimeoutError in this (the main) thread after `seconds`: a Ray job that waits forever
    (say for a CPU that never frees) fails the test instead of hanging the run."""
    def expire(signum, frame):
        raise TimeoutError(f"no result in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def ray_batch(*args):
    """examples/ray_batch.py's main() in this process (Ray already started: it uses that one)
    -> the exit code (0, or SystemExit's) and its message."""
    spec = runpy.run_path(str(SCRIPT))  # its functions, without running it
    try:
        with deadline(300):
            spec["main"]([str(arg) for arg in args])
    except SystemExit as e:
        return (1 if isinstance(e.code, str) else e.code), str(e.code)
    return 0, ""


def read_lines(folder):
    """Every JSON line of the files Ray wrote into `folder`, a field with no value (null) left out:
    Ray writes every column in every row, --batch only the fields a line has."""
    lines = []
    for path in sorted(folder.iterdir()):
        for text in path.read_text().splitlines():
            record = json.loads(text)
            lines.append({field: value for field, value in record.items() if value is not None})
    return lines


def without_seconds(records):
    return [{field: value for field, value in record.items() if field != "seconds"}
            for record in records]


@pytest.mark.ray
@pytest.mark.parametrize("family", FAMILIES)
def test_ray_lines_equal_batch_lines(family, ckpt, local_ray, tmp_path):
    paths, bad = write_images(tmp_path / "photos")
    module, _, _, prompt, n_tokens = FAMILIES[family]
    flags = ["--model", ckpt[family], "--prompt", prompt, "--max-new-tokens", n_tokens,
             "--dtype", "float32", "--batch-size", 2]
    r = cli_in_process(module, *flags, "--batch", tmp_path / "photos")
    assert r.stderr == "error: 2 of 7 images failed (their lines say why)\n"
    expected = [json.loads(line) for line in r.stdout.splitlines()]
    code, message = ray_batch(tmp_path / "photos", "--family", family, *flags,
                              "--output", tmp_path / "out", "--actors", 2)
    assert code == 0, message  # the unreadable files are lines, not a failed job
    lines = read_lines(tmp_path / "out")
    assert sorted(line["image"] for line in lines) == paths  # each image exactly once
    lines.sort(key=lambda line: line["image"])
    assert without_seconds(lines) == without_seconds(expected)
    assert all(line["seconds"] > 0 for line in lines if "text" in line)
    # the comparison covers what it should: the unreadable files' errors, and PaliGemma's objects
    assert [line["image"] for line in lines if "error" in line] == bad
    assert "truncated" in lines[paths.index(bad[0])]["error"]
    if family == "paligemma":
        assert sum(bool(line.get("objects")) for line in lines) == 2


@pytest.mark.ray
def test_a_load_that_would_fail_every_image_stops_the_job_in_one_line(ckpt, local_ray, tmp_path):
    """--max-new-tokens past the context: each actor refuses before its load (as --batch does
    before its own); the job stops with that one line, and writes nothing."""
    paths, _ = write_images(tmp_path / "photos", bad=False)
    code, message = ray_batch(tmp_path / "photos", "--family", "smolvlm", "--model",
                              ckpt["smolvlm"], "--prompt", "Describe this image.",
                              "--max-new-tokens", 10000, "--output", tmp_path / "out")
    assert code == 1
    assert message.startswith("error: the prompt's text alone (") and "\n" not in message
    assert message.endswith("exceed the model's context of 8192 tokens: every image would fail")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.ray
def test_a_source_with_no_image_is_one_line(ckpt, local_ray, tmp_path):
    """A folder that does not exist, or holds no image file: one line, exit code 1, nothing
    written (Ray finds this while planning the read: no actor starts)."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image suffix")
    for source in (tmp_path / "nowhere", tmp_path / "notes"):
        code, message = ray_batch(source, "--family", "smolvlm", "--model", ckpt["smolvlm"],
                                  "--output", tmp_path / "out")
        assert code == 1 and message.startswith("error: ") and "\n" not in message, message
        assert str(source) in message
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_bad_flags_fail_before_ray_starts(ckpt, tmp_path):
    """One line, exit code 1, and no Ray: a bad flag of the family, a bad count, an output folder
    that holds files already."""
    pytest.importorskip("ray")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.json").write_text("{}\n")
    base = [tmp_path, "--family", "smolvlm", "--model", ckpt["smolvlm"]]
    cases = {("--output", tmp_path / "new", "--max-new-tokens", 0):
             "error: max-new-tokens must be positive, got 0",
             ("--output", tmp_path / "new", "--actors", 0): "error: actors must be positive, got 0",
             ("--output", tmp_path / "out"):
             f"error: {tmp_path / 'out'} is not empty: the lines go into a new folder"}
    for flags, message in cases.items():
        assert ray_batch(*base, *flags) == (1, message)
    assert not (tmp_path / "new").exists()


def test_without_ray_one_line_says_how_to_install_it(tmp_path):
    code = ("import runpy, sys; sys.modules['ray'] = None; "  # `import ray` then fails
            f"sys.argv = ['ray_batch.py', '{tmp_path}', '--family', 'smolvlm', '--output', "
            f"'{tmp_path / 'out'}']; runpy.run_path('{SCRIPT}', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == 'error: Ray is not installed: pip install "ray[data]"\n'
