"""Does serve.py's batching pay? 8 chat requests (a 640x480 image each, 32 new tokens), sent to
`python serve.py` one after another, then all at once:

    python bench/serve.py                          # SmolVLM-256M, real config, random weights, bf16
    python bench/serve.py --dtype float32 --threads 2
    python bench/serve.py --text-only --new-tokens 64   # no image: the decoding batching shares

The checkpoint is bench/checkpoints.py's (its end token unreachable, so every answer is exactly
--new-tokens tokens). The server runs on --threads CPU threads; the requests are plain HTTP from
this process (one thread each when they go together), after one warm-up request. Prints a markdown
table: requests a second each way and their ratio, p50/p95 latency (request sent -> answer
received), and the batches the server ran for the requests sent together (from its log: how many
requests each, and within how many ms they reached the queue, which BATCH_WINDOW must cover).
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import checkpoints  # noqa: E402  (bench/checkpoints.py: real-size random checkpoints)
from batch import write_images  # noqa: E402  (the 640x480 pictures bench/batch.py uses)
from measure import PROMPTS  # noqa: E402


def post(url, body):
    """One request -> (seconds to the whole answer, the reply)."""
    start = time.perf_counter()
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        reply = json.loads(r.read())
    return time.perf_counter() - start, reply


def one_after_another(url, bodies):
    """-> (wall seconds, each request's latency)."""
    start = time.perf_counter()
    latencies = [post(url, body)[0] for body in bodies]
    return time.perf_counter() - start, latencies


def all_at_once(url, bodies):
    latencies = [None] * len(bodies)

    def send(i):
        latencies[i] = post(url, bodies[i])[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies


def wait_for(server, url, log, seconds=1800):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve.py stopped:\n{Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"serve.py did not load in {seconds} s")


def batch_lines(log):
    return [line for line in Path(log).read_text().splitlines() if line.startswith("batch: ")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256m", help="bench/checkpoints.py's SmolVLM size")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2, help="the server's CPU threads")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--text-only", action="store_true",
                   help="requests without the image: decoding, which batching shares, dominates")
    a = p.parse_args()
    folder = checkpoints.checkpoint("smolvlm", a.size, "bfloat16")
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as tmp:
        bodies = []
        for path in write_images(tmp, a.requests):
            image = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            content = [{"type": "image_url", "image_url": {"url": image}},
                       {"type": "text", "text": PROMPTS["smolvlm"]}]
            if a.text_only:
                content = [{"type": "text", "text": "Write a short story about a lighthouse."}]
            bodies.append({"model": "m", "messages": [{"role": "user", "content": content}],
                           "max_tokens": a.new_tokens, "temperature": 0})
        log = Path(tmp) / "serve.log"
        command = [sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--dtype",
                   a.dtype, "--port", str(a.port), "--max-batch-size", str(a.requests)]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        with open(log, "w") as f:
            server = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(server, url, log)
            chat = url + "/v1/chat/completions"
            _, reply = post(chat, bodies[0])  # warm-up: the first pass of a process is slower
            assert reply["usage"]["completion_tokens"] == a.new_tokens, reply["usage"]
            print(f"warm-up done; prompt: {reply['usage']['prompt_tokens']} tokens",
                  file=sys.stderr)
            one_wall, one_latencies = one_after_another(chat, bodies)
            print(f"one after another: {one_wall:.1f} s", file=sys.stderr)
            n_lines = len(batch_lines(log))
            together_wall, together_latencies = all_at_once(chat, bodies)
            time.sleep(0.5)  # the batch's log line comes just after its last answer
            batches = batch_lines(log)[n_lines:]
        finally:
            server.kill()
            server.wait()
    rows = [("one after another", one_wall, one_latencies),
            ("all at once", together_wall, together_latencies)]
    print(f"\nSmolVLM-{a.size.upper()} (real config, random weights), {a.dtype}, "
          f"{a.threads} CPU threads: {a.requests} requests, "
          f"{'text only' if a.text_only else 'a 640x480 image'} and {a.new_tokens} new tokens "
          "each\n")
    print("| requests sent | wall (s) | requests/s | p50 latency (s) | p95 latency (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, wall, latencies in rows:
        print(f"| {name} | {wall:.1f} | {a.requests / wall:.3f} | "
              f"{np.percentile(latencies, 50):.1f} | {np.percentile(latencies, 95):.1f} |")
    print(f"\nthroughput, all at once / one after another: {one_wall / together_wall:.2f}x")
    print("server batches for the requests sent at once:")
    for line in batches:
        print(f"    {line}")


if __name__ == "__main__":
    main()
