"""How many images a second does Ray Data (examples/ray_batch.py) answer on one machine, against
`--batch`, and how much memory does each actor take? A folder of N images (640x480, one prompt):

  --batch        one process: `python <family>.py --batch FOLDER --batch-size B`, T threads
  Ray, A actors  one process: a local Ray of T CPUs, then examples/ray_batch.py's main() mapping
                 A actors of T/A CPUs each (so T/A torch threads each: Ray sets OMP_NUM_THREADS)

    python bench/ray_batch.py smolvlm bench/checkpoints/smolvlm-256m-bfloat16 --actors 1 2

Times: the wall time of the --batch process (Python start, imports, load, all the images); for
Ray, the start of the local Ray apart, then the job: the actors' start, imports and loads, all the
images, the lines written. Sampled every second from /proc, for each answering process: its peak
RSS (VmHWM; the mmapped weights' pages count in every process that touches them), the highest PSS
seen (pages shared between processes split among them) and its CPU time (how the work split
between the actors). The checkpoints of bench/checkpoints.py never reach their end token, so every
image gets exactly --new-tokens tokens. Prints a markdown table; the runs go in the order of the
table.
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import measure  # noqa: E402  (bench/measure.py: the prompts)
from batch import write_images  # noqa: E402  (bench/batch.py: the same 640x480 pictures)


class MemoryWatch:
    """Samples, in a thread, the peak RSS, the PSS and the CPU time of the processes `find()`
    returns, until stopped -> {pid: (peak RSS MB, highest PSS MB, CPU s)}."""

    def __init__(self, find):
        self.find = find
        self.seen = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while not self.done.wait(1):
            for pid in self.find():
                try:
                    peak_kb = kilobytes(f"/proc/{pid}/status", "VmHWM:")
                    pss_kb = kilobytes(f"/proc/{pid}/smaps_rollup", "Pss:")
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue  # it ended between the listing and the reading
                cpu_s = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # user + system
                _, pss_before, _ = self.seen.get(pid, (0, 0, 0))
                self.seen[pid] = (peak_kb / 1024, max(pss_before, pss_kb / 1024), cpu_s)

    def stop(self):
        self.done.set()
        self.thread.join()
        return self.seen


def kilobytes(path, field):
    """A `field:   1234 kB` line of a /proc file -> 1234."""
    return int(Path(path).read_text().split(field)[1].split()[0])


def cli_batch(family, checkpoint, folder, n, new_tokens, batch_size, dtype, threads):
    command = [sys.executable, str(ROOT / f"{family}.py"), "--model", str(checkpoint),
               "--prompt", measure.PROMPTS[family], "--max-new-tokens", str(new_tokens),
               "--dtype", dtype, "--batch", str(folder), "--batch-size", str(batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    watch = MemoryWatch(lambda: [process.pid] if process.poll() is None else [])
    out, err = process.communicate()
    wall = time.perf_counter() - start
    memory = watch.stop()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == n and all(line["tokens"] == new_tokens for line in lines), out[-500:]
    return {"start_s": None, "job_s": wall, "memory": list(memory.values())}


def actors():
    """The pids of the running Ray actors of examples/ray_batch.py (their process title names the
    class)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"DatasetAnswerer" in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # it ended while listed
    return found


def ray_worker(family, checkpoint, folder, n, new_tokens, batch_size, dtype, threads, n_actors):
    """In a fresh process (this script with --ray-worker): a local Ray, then the job, timed."""
    import ray
    start = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    started = time.perf_counter()
    spec = runpy.run_path(str(ROOT / "examples" / "ray_batch.py"))
    with tempfile.TemporaryDirectory() as output:
        watch = MemoryWatch(actors)
        spec["main"]([str(folder), "--family", family, "--model", str(checkpoint), "--prompt",
                      measure.PROMPTS[family], "--max-new-tokens", str(new_tokens), "--dtype",
                      dtype, "--batch-size", str(batch_size), "--output", f"{output}/lines",
                      "--actors", str(n_actors), "--cpus-per-actor", str(threads / n_actors)])
        done = time.perf_counter()
        memory = watch.stop()
        lines = [json.loads(line) for path in Path(output, "lines").iterdir()
                 for line in path.read_text().splitlines()]
    ray.shutdown()
    assert len(lines) == n and all(line["tokens"] == new_tokens for line in lines)
    assert len(memory) == n_actors, memory
    print(json.dumps({"start_s": started - start, "job_s": done - started,
                      "memory": list(memory.values())}))


def ray_job(family, checkpoint, folder, n, new_tokens, batch_size, dtype, threads, n_actors):
    command = [sys.executable, __file__, family, str(checkpoint), "--ray-worker", str(n_actors),
               "--folder", str(folder), "--images", str(n), "--new-tokens", str(new_tokens),
               "--batch-size", str(batch_size), "--dtype", dtype, "--threads", str(threads)]
    r = subprocess.run(command, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"Ray ({n_actors} actors) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=["paligemma", "smolvlm", "perception_lm"])
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4, help="images generated together (4)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2, help="CPUs in all: --batch's threads, "
                   "the local Ray's CPUs (2)")
    p.add_argument("--actors", type=int, nargs="*", default=[1, 2], help="Ray runs (1 2)")
    p.add_argument("--repeat", type=int, default=1, help="the whole sequence this many times")
    p.add_argument("--ray-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args()
    common = (a.family, a.checkpoint)
    settings = (a.new_tokens, a.batch_size, a.dtype, a.threads)
    if a.ray_worker:
        ray_worker(*common, a.folder, a.images, *settings, a.ray_worker)
        return
    rows = []
    n = a.images
    with tempfile.TemporaryDirectory() as folder:
        write_images(folder, n)
        for _ in range(a.repeat):
            result = cli_batch(*common, folder, n, *settings)
            rows.append((f"--batch, {a.threads} threads", result))
            print(rows[-1], file=sys.stderr)
            for n_actors in a.actors:
                result = ray_job(*common, folder, n, *settings, n_actors)
                cpus = a.threads / n_actors
                rows.append((f"Ray, {n_actors} actor(s) x {cpus:g} CPU", result))
                print(rows[-1], file=sys.stderr)
    print(f"### {a.family}: {n} images 640x480, {a.new_tokens} new tokens each, "
          f"{Path(a.checkpoint).name}, {a.dtype}, batches of {a.batch_size}, {a.threads} CPUs\n")
    print("| run | Ray start s | job s | images/s (job) | peak RSS MB per process | "
          "highest PSS MB per process | CPU s per process |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, result in rows:
        ray_start = "" if result["start_s"] is None else f"{result['start_s']:.1f}"
        rss = " / ".join(f"{peak:.0f}" for peak, _, _ in result["memory"])
        pss = " / ".join(f"{highest:.0f}" for _, highest, _ in result["memory"])
        cpu = " / ".join(f"{cpu_s:.0f}" for _, _, cpu_s in result["memory"])
        print(f"| {name} | {ray_start} | {result['job_s']:.1f} | {n / result['job_s']:.3f} | "
              f"{rss} | {pss} | {cpu} |")


if __name__ == "__main__":
    main()
