"""serve.py, the OpenAI-compatible server. Without a server: its protocol (openai_chat.py: the
mapping of a request to each family's prompt, the checks of its fields and media, an answer's text)
and its worker (rows, batches, the queue, a failed load). Then each family's fixture served by
`python serve.py` on a free local port and driven by the official `openai` client: answers equal to
the CLI's, streamed deltas that join to the same text, concurrent requests batched and equal to
their sequential answers, every bad request a 4xx with a one-line OpenAI error object (and the
server still serving), the API key, and clients that go away in the middle of an answer."""
import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial

import numpy as np
import openai
import pytest
import torch
from PIL import Image

import openai_chat
import paligemma
import paligemma_fixture
import perception_lm
import perception_lm_fixture
import serve
import smolvlm
import smolvlm_fixture
from conftest import ROOT
from helpers import one_thread  # noqa: F401  (a fixture: this module runs single-threaded)
from helpers import cli_in_process, make_video

PROMPTS = {"paligemma": "detect cat", "smolvlm": "Describe this image.",
           "perception_lm": "Describe the image."}
KEY = "sk-test-key"


def png(size, seed):
    """A noisy RGB picture as PNG bytes."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data, kind="image/png"):
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def user(*parts):
    """One user message: bytes become image_url parts, strings text parts."""
    content = []
    for part in parts:
        if isinstance(part, bytes):
            content.append({"type": "image_url", "image_url": {"url": data_url(part)}})
        else:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python serve.py` in a subprocess, its log in a file."""

    def __init__(self, folder, log, *flags):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--port",
                   str(self.port), "--dtype", "float32", *map(str, flags)]
        with open(log, "w") as f:
            self.process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def wait(self, seconds=120):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            if get(self.url + "/health")[0] == 200:
                return self
            time.sleep(0.2)
        raise AssertionError(f"no /health in {seconds} s: {self.log.read_text()}")

    def client(self, timeout=60):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0,
                             timeout=timeout)

    def batches(self):
        """The log's batch lines -> [(requests, steps)]."""
        found = []
        for line in self.log.read_text().splitlines():
            if line.startswith("batch: "):
                words = line.split()
                found.append((int(words[1]), int(words[words.index("steps,") - 1])))
        return found

    def stop(self):
        self.process.kill()
        self.process.wait(10)


def get(url, headers=None):
    return request("GET", url, None, headers)


def request(method, url, body=None, headers=None):
    """-> (status, the JSON body) of a plain HTTP request; body: bytes or a JSON-able object."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:  # not listening yet
        return None, None


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Each family's fixture checkpoint, its server started as soon as it is written (so the
    servers boot while the other checkpoints are written and the tests without a server run):
    {family: Server}. SmolVLM's has an API key and a folder it may read images from; it never
    reaches its end token, so every answer runs to its own max_tokens or stop string."""
    root = tmp_path_factory.mktemp("serve")
    allowed = tmp_path_factory.mktemp("allowed")
    builds = {"smolvlm": partial(smolvlm_fixture.build, root / "smolvlm", "v1", check=False,
                                 unreachable_eos=True),
              "paligemma": partial(paligemma_fixture.build, root / "paligemma", "pg2",
                                   check=False),
              "perception_lm": partial(perception_lm_fixture.build, root / "perception_lm", "1b",
                                       check=False)}
    flags = {"smolvlm": ["--api-key", KEY, "--allowed-local-dir", allowed]}
    servers = {}
    try:
        for family, build in builds.items():
            servers[family] = Server(build(), root / f"{family}.log", *flags.get(family, []))
        servers["smolvlm"].allowed = allowed
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def ckpt(started):
    return {family: server.folder for family, server in started.items()}


@pytest.fixture(scope="module")
def servers(started):
    return {family: server.wait() for family, server in started.items()}


# ------------------------------------------------------------ without a server

def processor_of(module, folder):
    if module is paligemma:
        return paligemma.Processor(folder)
    return module.Processor(folder, module.Config.from_folder(folder))


def test_chat_becomes_the_cli_prompt(ckpt):
    """[image, text] renders what the CLI renders; system and multi-turn chats go through the
    template with their parts in order; PaliGemma takes one user turn, images first."""
    cli_args = argparse.Namespace(raw=False, prompt="Describe this image.", video=None)
    image = png((20, 10), 0)
    messages = user(image, "Describe this image.")
    for module, cli_prompt in [(smolvlm, lambda p: smolvlm.cli_prompt(p, cli_args, 1)),
                               (perception_lm, lambda p: perception_lm.cli_prompt(p, cli_args,
                                                                                  1, 0))]:
        processor = processor_of(module, ckpt[module.__name__])
        prompt, found = openai_chat.chat_prompt(messages, module, processor)
        assert prompt == cli_prompt(processor)
        assert found == {"image": [(data_url(image), "messages[0].content[0].image_url")],
                         "video": []}
        chat = [{"role": "system", "content": "Be brief."}, *user("Hi", image, "and this?"),
                {"role": "assistant", "content": "A cat."}, *user("Why?")]
        expected = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                 {"type": "image"},
                                                 {"type": "text", "text": "and this?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
        prompt, _ = openai_chat.chat_prompt(chat, module, processor)
        assert prompt == processor.apply_chat_template(expected)
        assert "Be brief." in prompt and "A cat." in prompt
    processor = processor_of(paligemma, ckpt["paligemma"])
    prompt, found = openai_chat.chat_prompt(user("detect ", image, "cat"), paligemma, processor)
    assert prompt == "detect cat" and len(found["image"]) == 1
    for chat, message in [([{"role": "system", "content": "x"}, *user(image, "caption en")],
                           "no chat template"),
                          (user(image, "caption en") * 2, "no chat template"),
                          (user("caption en"), "needs an image")]:
        with pytest.raises(openai_chat.ApiError, match=message) as e:
            openai_chat.chat_prompt(chat, paligemma, processor)
        assert e.value.status == 400


def test_urls_data_remote_and_local(tmp_path):
    allowed = (tmp_path / "allowed").resolve()
    allowed.mkdir()
    (allowed / "a.png").write_bytes(b"inside")
    (tmp_path / "secret.png").write_bytes(b"outside")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    closed = argparse.Namespace(allow_remote_images=False, allowed_local_dir=None)
    local = argparse.Namespace(allow_remote_images=False, allowed_local_dir=allowed)
    assert openai_chat.read_url(data_url(b"\x00\x01"), "x", closed) == b"\x00\x01"
    assert openai_chat.read_url(str(allowed / "a.png"), "x", local) == b"inside"
    assert openai_chat.read_url("a.png", "x", local) == b"inside"  # relative to the folder
    assert openai_chat.read_url(f"file://{allowed}/a.png", "x", local) == b"inside"
    refused = [("data:image/png;base64,not base64!", closed, "not valid base64"),
               ("data:image/png,rawbytes", closed, "data:<type>;base64"),
               ("https://example.com/cat.png", closed, "--allow-remote-images"),  # no network
               (str(allowed / "a.png"), closed, "--allowed-local-dir"),
               (str(tmp_path / "secret.png"), local, "not under"),
               ("../secret.png", local, "not under"),
               ("link.png", local, "not under"),  # a link out of the folder
               ("ftp://example.com/cat.png", local, "cannot be read"),  # a name in the folder
               ("missing.png", local, "cannot be read")]
    for url, args, message in refused:
        with pytest.raises(openai_chat.ApiError, match=message) as e:
            openai_chat.read_url(url, "messages[0].content[0]", args)
        assert e.value.status == 400 and e.value.param == "messages[0].content[0]"


def test_stream_holds_back_partial_characters_and_stop_prefixes():
    assert openai_chat.sendable("abc", []) == 3
    assert openai_chat.sendable("ab\ufffd", []) == 2  # a character still missing a byte
    assert openai_chat.sendable("abc ST", ["STOP"]) == 4  # "ST" may begin "STOP"
    assert openai_chat.sendable("abc SX", ["STOP"]) == 6
    assert openai_chat.sendable("abc S", ["xyz", "S!"]) == 4


GREEDY = {"temperature": 0.0, "top_p": None, "top_k": None, "seed": None}  # generate()'s keywords


def test_settings_greedy_requests_match_and_top_p_0_is_greedy():
    """What generate() gets: top_p 0 (OpenAI allows it, generate() takes (0, 1]) keeps only the
    likeliest token, which is greedy; a greedy request's top_p and top_k change nothing, so they
    are dropped and greedy requests share a batch."""
    greedy = (GREEDY, 100, [])  # settings, max_tokens, stops
    for body in [{}, {"top_p": 0.9}, {"top_k": 5, "top_p": 0.5}, {"temperature": 1, "top_p": 0}]:
        assert openai_chat.generation_settings(body, 1000) == greedy, body
    sampled = {"temperature": 0.7, "top_p": 0.9, "stop": "x", "max_completion_tokens": 7}
    assert openai_chat.generation_settings(sampled, 1000) == (
        {"temperature": 0.7, "top_p": 0.9, "top_k": None, "seed": None}, 7, ["x"])


def test_a_request_becomes_what_the_worker_needs(ckpt):
    """The body's bytes -> the prompt, the images, the processor's output for it alone, the
    settings and how to answer; bad JSON and a prompt past the context refused."""
    processor = processor_of(smolvlm, ckpt["smolvlm"])
    media = argparse.Namespace(allow_remote_images=False, allowed_local_dir=None)
    image = png((40, 30), 5)
    body = {"messages": user(image, "Hi"), "stream": True, "max_tokens": 5, "stop": "x",
            "stream_options": {"include_usage": True}, "seed": 3}
    data = json.dumps(body).encode()
    request = openai_chat.parse_request(data, smolvlm, processor, 8192, media)
    prompt, _ = openai_chat.chat_prompt(body["messages"], smolvlm, processor)
    alone = processor(text=[prompt], images=[[Image.open(io.BytesIO(image))]])
    assert request.prompt == prompt and [im.size for im in request.images] == [(40, 30)]
    assert request.inputs.keys() == alone.keys()
    assert all(torch.equal(request.inputs[name], alone[name]) for name in alone)
    assert (request.max_tokens, request.stops, request.settings["seed"]) == (5, ["x"], 3)
    assert request.stream and request.include_usage and request.alone  # seeded: alone
    plain = openai_chat.parse_request(json.dumps({"messages": user("Hi")}).encode(), smolvlm,
                                      processor, 8192, media)
    assert not (plain.stream or plain.include_usage or plain.alone) and plain.images == []
    n_tokens = request.inputs["input_ids"].shape[1]
    for bad, context, message in [(b"{", 8192, "not JSON"), (b"[]", 8192, "a JSON object"),
                                  (data, n_tokens + 4, f"prompt \\({n_tokens} tokens\\)")]:
        with pytest.raises(openai_chat.ApiError, match=message) as e:
            openai_chat.parse_request(bad, smolvlm, processor, context, media)
        assert e.value.status == 400


class FakeJob(serve.Job):
    def send(self, *event):  # no event loop here
        self.events.put_nowait(event)


def job_for(max_tokens, stops=(), images=(), settings=None, alone=False):
    inputs = {"input_ids": torch.zeros(1, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}  # 3 prompt tokens, 2 pads
    request = openai_chat.ChatRequest("", list(images), inputs, settings or GREEDY, max_tokens,
                                      list(stops), alone, stream=True, include_usage=False)
    return FakeJob(request, serve.asyncio.Queue(), None, arrived=time.monotonic())


def events_of(job):
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


def fake_worker(decode="".join):
    """What a Row uses of its worker: the processor's decode, the end ids, describe()."""
    return argparse.Namespace(processor=argparse.Namespace(decode=decode),
                              model=argparse.Namespace(stop=["<end>"]),
                              describe=lambda request, text: {"objects": [text]})


def test_a_row_ends_at_its_end_token_limit_stop_string_or_client():
    def pushed(row, tokens):
        return [row.push(token) for token in tokens]

    job = job_for(max_tokens=100, stops=["STOP"])
    assert pushed(serve.Row(job, fake_worker()), "Hello STOP there") == [False] * 9 + [True] * 7
    events = events_of(job)
    assert "".join(value for kind, value in events if kind == "text") == "Hello "
    usage = {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
    assert events[-1] == ("end", {"text": "Hello ", "finish_reason": "stop", "usage": usage,
                                  "fields": {"objects": ["Hello "]}})
    job = job_for(max_tokens=3)
    assert pushed(serve.Row(job, fake_worker()), "abcd") == [False, False, True, True]
    assert events_of(job)[-1][1]["finish_reason"] == "length"
    job = job_for(max_tokens=9)
    row = serve.Row(job, fake_worker(lambda ids: "".join(ids).partition("<end>")[0]))
    assert pushed(row, ["a", "<end>", "b"]) == [False, True, True]
    assert events_of(job)[-1][1]["finish_reason"] == "stop"
    job = job_for(max_tokens=9)
    row = serve.Row(job, fake_worker())
    row.push("a")
    job.cancelled = True  # the client went away: the row ends without an end event
    assert row.push("b") is True and events_of(job) == [("text", "a")]


def test_a_row_whose_end_fails_gets_the_error():
    """generate() sends its error to each row that has not ended: a row whose end could not be
    made (here PaliGemma's objects) has not, so its client gets the error, never waits forever."""
    args = argparse.Namespace(max_queue=1, allowed_local_dir=None)
    worker = serve.Worker(args, paligemma, None)  # not loaded

    def generate(input_ids, attention_mask, max_new_tokens, stream, temperature, top_p, top_k,
                 seed):
        stream(torch.tensor([7]))  # one new id: the row ends at its max_tokens

    def describe(request, text):
        raise ValueError("no objects")

    worker.model = argparse.Namespace(generate=generate, stop=[])
    worker.processor = argparse.Namespace(decode=str)
    worker.device = "cpu"
    worker.describe = describe
    job = job_for(1)
    worker.generate([job])
    assert events_of(job) == [("text", "[7]"), ("error", "no objects")]


def test_a_failed_load_stops_the_server():
    """Any error while loading, ours or not (out of memory), stops the server with it: never a
    server that answers 503 'still loading' forever."""
    def load(folder, device, dtype, quantize):
        raise RuntimeError("out of memory")

    args = argparse.Namespace(max_queue=1, device=None, dtype=None, quantize=None)
    worker = serve.Worker(args, argparse.Namespace(load=load), "checkpoint")
    server = argparse.Namespace(should_exit=False)
    worker.run(server)
    assert server.should_exit and str(worker.error) == "out of memory"


def test_paligemma_objects_with_masks():
    """The objects of a segment answer, as the CLI's --json gives them, masks included."""
    args = argparse.Namespace(max_queue=1, allowed_local_dir=None)
    worker = serve.Worker(args, paligemma, None)  # not loaded
    torch.manual_seed(0)
    worker.mask_decoder = paligemma.MaskDecoder().eval()
    text = "<loc0100><loc0200><loc0700><loc0900>" + "".join(
        f"<seg{i:03d}>" for i in range(16)) + " cat"
    image = Image.new("RGB", (60, 40))
    fields = worker.describe(job_for(1, images=[image]).request, text)
    objects = paligemma.parse_objects(text, 60, 40)
    masks = paligemma.decode_masks(worker.mask_decoder, objects, 60, 40)
    assert fields == {"objects": paligemma.json_objects(objects, masks)}
    assert fields["objects"][0]["label"] == "cat" and fields["objects"][0]["mask"] is not None


def test_batches_group_the_requests_that_can_share_one():
    """Greedy requests share a batch; a seeded one runs alone; one whose client left is dropped;
    the longest prompt plus the largest max_tokens stay within the context; --max-batch-size."""
    args = argparse.Namespace(max_queue=16, max_batch_size=4, allowed_local_dir=None)
    worker = serve.Worker(args, smolvlm, None)  # not loaded
    worker.model = argparse.Namespace(cfg=argparse.Namespace(
        text=argparse.Namespace(max_position_embeddings=100)))
    jobs = {name: job_for(10) for name in "ABDF"}
    jobs["C"] = job_for(10, settings={**GREEDY, "seed": 1}, alone=True)
    jobs["D"].cancelled = True
    jobs["E"] = job_for(96)  # 5 prompt tokens + 96 > 100 beside any other
    for name in "ABCDEF":
        worker.submit(jobs[name])
    batches = ["".join(name for job in worker.next_batch() for name in jobs if jobs[name] is job)
               for _ in range(4)]
    assert batches == ["AB", "C", "E", "F"]
    first = job_for(10)
    worker.submit(first)
    worker.preparing = 1  # a second request is still being preprocessed: the batch waits for it
    second = job_for(10)

    def arrives():
        time.sleep(0.3)
        worker.submit(second)
        worker.preparing = 0

    threading.Thread(target=arrives).start()
    assert worker.next_batch() == [first, second]


def test_a_full_queue_is_refused():
    args = argparse.Namespace(max_queue=2, allowed_local_dir=None)
    worker = serve.Worker(args, smolvlm, None)  # not loaded
    worker.submit(job_for(1))
    worker.submit(job_for(1))
    with pytest.raises(openai_chat.ApiError, match="busy") as e:
        worker.submit(job_for(1))
    assert e.value.status == 503


# ------------------------------------------------------------ served

def answer(client, messages, **options):
    return client.chat.completions.create(model="m", messages=messages, temperature=0,
                                          **options)


def streamed(client, messages, **options):
    """A streamed answer -> (the joined deltas, the chunks)."""
    chunks = list(answer(client, messages, stream=True, stream_options={"include_usage": True},
                         **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("family", PROMPTS)
def test_answers_equal_the_cli_streamed_or_not(family, servers, ckpt, tmp_path):
    server = servers[family]
    client = server.client()
    image = png((64, 48), 1)
    (tmp_path / "image.png").write_bytes(image)
    module = {"paligemma": paligemma, "smolvlm": smolvlm, "perception_lm": perception_lm}[family]
    cli = cli_in_process(module, "--model", ckpt[family], "--image", tmp_path / "image.png",
                         "--prompt", PROMPTS[family], "--max-new-tokens", 12, "--dtype",
                         "float32", *(["--json"] if family == "paligemma" else []))
    assert cli.returncode == 0, cli.stderr
    messages = user(image, PROMPTS[family])
    whole = answer(client, messages, max_tokens=12)
    text = whole.choices[0].message.content
    assert cli.stdout.splitlines()[0] == text.splitlines()[0] and cli.stdout.startswith(text)
    if family == "paligemma":  # after the text, --json's line: the same objects
        assert cli.stdout == text + "\n" + json.dumps({"text": text, "objects": []}) + "\n"
        assert whole.choices[0].message.model_extra["objects"] == []
    else:
        assert cli.stdout == text + "\n"
    processor = processor_of(module, ckpt[family])
    prompt, _ = openai_chat.chat_prompt(messages, module, processor)
    prompt_tokens = processor(text=[prompt], images=[[Image.open(io.BytesIO(image))]])
    assert whole.usage.prompt_tokens == prompt_tokens["input_ids"].shape[1]  # image tokens in
    n_tokens = whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + n_tokens
    assert whole.choices[0].finish_reason == ("length" if n_tokens == 12 else "stop")
    joined, chunks = streamed(client, messages, max_tokens=12)
    assert joined == text
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != whole.id
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    if family == "paligemma":
        assert chunks[-2].choices[0].delta.model_extra["objects"] == []


def test_concurrent_requests_equal_their_sequential_answers(servers):
    """Nine requests sent together, batched (the log shows it), each equal to its answer alone:
    different images, prompt lengths, max_tokens, a stop string, no image, a seeded sample."""
    server = servers["smolvlm"]
    client = server.client()
    images = [png(size, seed) for seed, size in enumerate([(64, 48), (30, 90), (50, 50)])]
    requests = [(user(images[0], "Describe this image."), {"max_tokens": 10}),
                (user(images[1], "What is it?"), {"max_tokens": 4}),
                (user(images[2], "Describe this image in many words, please."),
                 {"max_tokens": 16}),
                (user("Describe a cow."), {"max_tokens": 7}),
                (user(images[0], images[1], "Compare them."), {"max_tokens": 9}),
                (user(images[1], "Describe this image."), {"max_tokens": 12, "stream": True}),
                (user(images[2], "Why?"), {"max_tokens": 5, "top_p": 0.9}),
                (user(images[2], "Describe this image."), {"max_tokens": 8, "temperature": 1.0,
                                                           "seed": 7})]

    def run(messages, options):
        options = dict(options)
        if options.pop("stream", False):
            return streamed(client, messages, **options)[0], None
        reply = client.chat.completions.create(model="m", messages=messages,
                                               **{"temperature": 0, **options})
        return reply.choices[0].message.content, reply.usage

    alone = [run(*r) for r in requests]
    stop = alone[0][0][4:7]  # a stop string that occurs in an answer
    requests.append((requests[0][0], {"max_tokens": 10, "stop": [stop, "never"]}))
    alone.append(run(*requests[-1]))
    assert alone[-1][0] == alone[0][0][:alone[0][0].index(stop)]
    assert [usage.completion_tokens for _, usage in alone[:8] if usage] == [10, 4, 16, 7, 9, 5, 8]
    assert alone[-1][1].completion_tokens < 10  # ended at the stop string
    n_batches = len(server.batches())
    together = [None] * len(requests)

    def send(i):
        together[i] = run(*requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone
    batched = server.batches()[n_batches:]
    assert max(n for n, _ in batched) > 1, batched  # some requests did share a batch


def error_of(status, body):
    """The OpenAI error object of a 4xx reply, checked: its four fields, a one-line message."""
    assert 400 <= status < 500, (status, body)
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    return error


def test_bad_requests_get_4xx_and_the_server_goes_on(servers):
    server = servers["smolvlm"]
    url = server.url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    image = png((40, 30), 3)
    (server.allowed / "ok.png").write_bytes(image)
    good = {"model": "m", "messages": user(image, "Describe this image."), "max_tokens": 3}

    def with_part(part):
        return {**good, "messages": [{"role": "user", "content": [part]}]}

    def image_part(url):
        return {"type": "image_url", "image_url": {"url": url}}

    cases = [(with_part(image_part(data_url(b"not an image at all"))), "cannot be read"),
             (with_part(image_part(data_url(image[:len(image) // 2]))), "truncated"),
             (with_part(image_part("data:image/png;base64,@@@")), "not valid base64"),
             (with_part(image_part("http://127.0.0.1:9/cat.png")), "--allow-remote-images"),
             (with_part(image_part("/etc/hostname")), "not under --allowed-local-dir"),
             (with_part({"type": "input_audio", "input_audio": {}}), "unknown content part"),
             (with_part({"type": "image_url", "image_url": {}}), "url must be a string"),
             ({**good, "n": 2}, "n=2 is not supported"),
             ({**good, "tools": [{"type": "function"}]}, "not supported"),
             ({**good, "temperature": -1}, "temperature must be a number"),
             ({**good, "top_p": 1.5}, "top_p must be"),
             ({**good, "max_tokens": 0}, "max_tokens must be an integer"),
             ({**good, "max_tokens": "5"}, "max_tokens must be an integer"),
             ({**good, "seed": 1.5}, "seed must be an integer"),
             ({**good, "stop": ["a", "b", "c", "d", "e"]}, "stop must be"),
             ({**good, "messages": user(*[image] * 9, "Describe.")}, "too many images"),
             ({**good, "max_tokens": 8192}, "exceed the model's context of 8192 tokens"),
             ({**good, "messages": []}, "messages must be a non-empty list"),
             ({**good, "messages": [{"role": "tool", "content": "x"}]}, "role must be"),
             ({**good, "messages": [{"role": "user", "content": 5}]}, "must be a string or"),
             (b"{not json", "not JSON"),
             ([1, 2], "must be a JSON object")]
    for body, message in cases:
        error = error_of(*request("POST", url, body, headers))
        assert message in error["message"], (message, error)
        status, reply = request("POST", url, good, headers)  # and the next request is served
        assert status == 200 and reply["choices"][0]["message"]["content"] is not None
    error = error_of(*get(server.url + "/v1/nothing", headers))
    assert "/v1/nothing" in error["message"]
    error_of(*get(url, headers))  # GET where only POST is served: 405
    local = with_part(image_part(str(server.allowed / "ok.png")))  # a file it may read
    assert request("POST", url, local, headers)[0] == 200
    status, reply = request("POST", url, {**good, "top_p": 0}, headers)  # OpenAI's range: greedy
    assert status == 200, reply
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in [*headers.items(), ("Content-Length", str(33 * 2**20))]:
        connection.putheader(name, value)
    connection.endheaders()  # the body is never sent: the size alone is refused
    reply = connection.getresponse()
    error = error_of(reply.status, json.loads(reply.read()))
    assert reply.status == 413 and "over 32 MiB" in error["message"]
    connection.close()
    assert request("POST", url, good, headers)[0] == 200


def test_api_key(servers, ckpt):
    server = servers["smolvlm"]
    body = {"model": "m", "messages": user("Hi"), "max_tokens": 2}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        for method, path, data in [("POST", "/v1/chat/completions", body),
                                   ("GET", "/v1/models", None)]:
            status, reply = request(method, server.url + path, data, headers)
            assert status == 401 and error_of(status, reply)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in server.client().models.list().data] == [str(ckpt["smolvlm"])]
    assert get(server.url + "/health") == (200, {"status": "ok"})  # no key needed


def test_clients_that_go_away_free_their_rows(servers):
    """A stream closed after two chunks and a request whose client times out: each row ends
    long before its max_tokens, and the server goes on serving."""
    server = servers["smolvlm"]
    messages = user(png((40, 30), 4), "Describe this image.")
    n_batches = len(server.batches())
    stream = server.client().chat.completions.create(model="m", messages=messages,
                                                     max_tokens=4000, stream=True)
    for _, _ in zip(stream, range(2)):
        pass
    stream.close()
    with pytest.raises(openai.APITimeoutError):
        server.client(timeout=1).chat.completions.create(model="m", messages=messages,
                                                         max_tokens=4000)
    deadline = time.monotonic() + 30
    while len(server.batches()) < n_batches + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    freed = server.batches()[n_batches:]
    assert len(freed) == 2 and all(steps < 2000 for _, steps in freed), freed
    assert get(server.url + "/health") == (200, {"status": "ok"})
    reply = answer(server.client(), messages, max_tokens=3)
    assert reply.usage.completion_tokens == 3


def test_a_video_url_answers_as_the_cli(servers, ckpt, tmp_path):
    """PerceptionLM: a video sent as a data: URL, read from a temporary file as --video reads it."""
    video = make_video(tmp_path / "clip.mp4", n_frames=6, fps=3)
    cli = cli_in_process(perception_lm, "--model", ckpt["perception_lm"], "--video", video,
                         "--prompt", "What happens?", "--max-new-tokens", 6, "--dtype",
                         "float32")
    assert cli.returncode == 0, cli.stderr
    url = data_url(video.read_bytes(), "video/mp4")
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    reply = answer(servers["perception_lm"].client(), messages, max_tokens=6)
    assert cli.stdout == reply.choices[0].message.content + "\n"
    processor = processor_of(perception_lm, ckpt["perception_lm"])
    prompt, _ = openai_chat.chat_prompt(messages, perception_lm, processor)
    inputs = processor(text=[prompt], videos=[str(video)])
    assert reply.usage.prompt_tokens == inputs["input_ids"].shape[1]  # the frames' tokens in
    status, body = request("POST", servers["perception_lm"].url + "/v1/chat/completions",
                           {"messages": [{"role": "user", "content": [
                               {"type": "video_url", "video_url": {"url": data_url(b"xx")}}]}]})
    assert "cannot be read" in error_of(status, body)["message"]
