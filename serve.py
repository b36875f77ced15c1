"""An OpenAI-compatible server for the three families: POST /v1/chat/completions (images as
image_url parts, streaming as server-sent events, usage), GET /v1/models, GET /health.

    python serve.py --model HuggingFaceTB/SmolVLM2-256M-Video-Instruct [--port 8000] [--api-key KEY]

The family comes from the checkpoint's config.json (model_type); the model loads once (/health
answers 503 until then). This file is the server: its flags, the worker that owns the model and
batches the requests, the FastAPI app and its errors. What a request may hold and what answers it,
the OpenAI chat-completions protocol, is openai_chat.py: a chat becomes the prompt its family's CLI
builds, so a request [image, text] answers what `python FAMILY.py --image X --prompt TEXT` prints
with the same settings. PaliGemma's message carries `objects` (what its --json prints); in a stream,
the chunk with the finish_reason does.

How a request goes (measured in bench/serve.py; bench/RESULTS.md):
- An HTTP thread checks it, reads its images (data: URLs; http(s) only with --allow-remote-images;
  files only under --allowed-local-dir) and runs the processor on it alone, so a bad request gets a
  4xx with a one-line OpenAI error object before it waits. It then waits in a bounded queue (past
  --max-queue waiting requests: 503).
- One worker thread owns the model. It takes the first waiting request and those that reach the
  server within BATCH_WINDOW of it (waiting, within PREPARE_WAIT, for those still preprocessed), up
  to --max-batch-size, and generates the compatible ones as ONE left-padded batch (as --batch
  does): the same sampling settings (greedy ones always match), no seed (a seeded request runs
  alone, so its answer is reproducible) and no video, the longest prompt plus the largest
  max_tokens within the context. The others wait for the next batch.
- Each row ends at its own end token, max_tokens or stop string, or when its client goes away (the
  stream callback tells generate() which rows have ended); the batch ends when all have. A stream
  gets its row's text as it is decoded (openai_chat.Answer), so the deltas join to the text a
  non-streamed request gets.
"""
import argparse
import asyncio
import hmac
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import paligemma
import perception_lm
import smolvlm
from common import VLMError, choose_device_and_dtype, first_line, read_json, resolve
from openai_chat import DONE, Answer, ApiError, ChatRequest, Reply, error_body, parse_request, sse

FAMILIES = {"paligemma": paligemma, "idefics3": smolvlm, "smolvlm": smolvlm,
            "perception_lm": perception_lm}  # config.json's model_type -> the model file
# A batch waits for the requests that reach the server within BATCH_WINDOW seconds of its first,
# and for those still being read and preprocessed (a 640x480 image takes SmolVLM's processor
# 0.3-2 s), up to PREPARE_WAIT seconds more: eight clients started together reach the server within
# a few ms, but the queue over seconds (bench/serve.py).
BATCH_WINDOW = 0.05
PREPARE_WAIT = 10
MAX_BODY = 32 * 2**20  # bytes of a request: a few photos in base64


@dataclass
class Job:
    """A request on its way through the worker, and the asyncio queue its events go to."""
    request: ChatRequest
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = 0.0  # time.monotonic() when it reached the server
    cancelled: bool = False  # its client went away

    def send(self, *event):  # from the worker thread to the request's event loop
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# ------------------------------------------------------------ the worker

class Row:
    """A request's row of a batch: its answer, sent as events as its new ids come."""

    def __init__(self, job, worker):
        self.job = job
        self.worker = worker  # its describe() gives the message's extra fields
        self.answer = Answer(job.request, worker.processor.decode, worker.model.stop)
        self.done = False

    def push(self, token):
        """The row's next token -> whether the row has ended."""
        if self.done or self.job.cancelled:
            self.done = True
            return True
        delta, reason = self.answer.add(token)
        if delta and self.job.request.stream:
            self.job.send("text", delta)
        if reason is not None:
            text = self.answer.text
            fields = self.worker.describe(self.job.request, text)
            self.job.send("end", {"text": text, "finish_reason": reason,
                                  "usage": self.answer.usage(), "fields": fields})
            self.done = True  # only now: a row whose end failed gets generate()'s error
        return self.done


class Worker:
    """Owns the model: loads it, then generates the waiting requests in batches."""

    def __init__(self, args, family, folder):
        self.args = args
        self.family = family
        self.folder = folder
        self.model = None  # set once loaded: until then requests get 503
        self.error = None  # why the load failed: the server stops with it
        self.queue = queue.Queue(args.max_queue)
        self.waiting = []  # taken from the queue, not yet generated
        self.preparing = 0  # requests being read and preprocessed (the HTTP side counts them)

    def run(self, server):
        """The worker thread: load, then generate batches until the process ends."""
        args = self.args
        try:
            model, self.processor = self.family.load(str(self.folder), args.device, args.dtype,
                                                     args.quantize)
            self.mask_decoder = None
            if self.family is paligemma:
                self.mask_decoder = self.load_mask_decoder()
        except Exception as e:  # ours or not, a failed load stops the server (never a 503 forever)
            self.error = e
            server.should_exit = True
            return
        self.device = next(model.parameters()).device
        self.model = model
        print(f"serving {args.model} at http://{args.host}:{args.port}", file=sys.stderr,
              flush=True)
        while True:
            self.generate(self.next_batch())

    def load_mask_decoder(self):
        """--vae, else the Hub's copy; without one, objects come without masks."""
        try:
            return paligemma.load_mask_decoder(self.args.vae)
        except VLMError as e:
            if self.args.vae:
                raise
            print(f"no masks: {e}", file=sys.stderr)
            return None

    def prepare(self, data, loop):
        """A request's bytes, in an HTTP thread: checked, its images read, preprocessed alone ->
        a Job whose events go to `loop`."""
        context = self.model.cfg.text.max_position_embeddings
        request = parse_request(data, self.family, self.processor, context, self.args)
        return Job(request, asyncio.Queue(), loop)

    def submit(self, job):
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.args.max_queue} requests waiting): "
                           "try again later", code="overloaded") from None

    def next_batch(self):
        """The first waiting request and those that reach the server within BATCH_WINDOW of it
        (or while they are preprocessed, up to PREPARE_WAIT more), up to --max-batch-size -> the
        ones that can share its batch; the others wait for the next."""
        if not self.waiting:
            self.waiting.append(self.queue.get())
        deadline = self.waiting[0].arrived + BATCH_WINDOW
        while len(self.waiting) < self.args.max_batch_size:
            try:
                self.waiting.append(self.queue.get(timeout=0.01))
            except queue.Empty:
                now = time.monotonic()
                if now > deadline and (self.preparing == 0 or now > deadline + PREPARE_WAIT):
                    break
        batch = []
        rest = []
        for job in self.waiting:
            if job.cancelled:
                continue  # its client went away while it waited
            if self.fits([other.request for other in batch], job.request):
                batch.append(job)
            else:
                rest.append(job)
        self.waiting = rest
        return batch

    def fits(self, batch, request):
        """Whether `request` can join the requests of `batch`."""
        if not batch:
            return True
        if batch[0].alone or request.alone or request.settings != batch[0].settings:
            return False
        longest = max(other.inputs["input_ids"].shape[1] for other in [*batch, request])
        most = max(other.max_tokens for other in [*batch, request])
        return longest + most <= self.model.cfg.text.max_position_embeddings  # left-padded

    def generate(self, batch):
        if not batch:
            return
        start = time.perf_counter()
        rows = [Row(job, self) for job in batch]
        requests = [job.request for job in batch]
        steps = 0

        def stream(token):  # (B,) new ids -> (B,) whether each row has ended
            nonlocal steps
            steps += 1
            ended = [row.push(int(t)) for row, t in zip(rows, token.tolist())]
            return torch.tensor(ended, device=token.device)

        try:
            inputs = requests[0].inputs
            if len(batch) > 1:  # preprocessed together, left-padded, as --batch does
                images = [request.images for request in requests]
                inputs = self.processor(text=[request.prompt for request in requests],
                                        images=images if any(images) else None)
            inputs = {name: value.to(self.device) for name, value in inputs.items()}
            self.model.generate(**inputs, max_new_tokens=max(r.max_tokens for r in requests),
                                stream=stream, **requests[0].settings)
        except Exception as e:  # each unfinished row gets the error; the server goes on
            traceback.print_exc()
            for row in rows:
                if not row.done:
                    row.job.send("error", first_line(e))
        spread = (max(job.arrived for job in batch) - batch[0].arrived) * 1000
        print(f"batch: {len(batch)} requests (arrived within {spread:.0f} ms), {steps} steps, "
              f"{time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)

    def describe(self, request, text):
        """The answer's extra fields: PaliGemma's objects."""
        if self.family is not paligemma:
            return {}
        return {"objects": paligemma.answer_objects(text, request.images[0], self.mask_decoder)}


# ------------------------------------------------------------ HTTP

async def events(job, request=None):
    """The job's events up to its end or error. With `request` (not streamed: only the end comes),
    its client is polled, and one gone away ends its row; Starlette cancels a stream whose client
    went away instead."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                job.cancelled = True
                return
            continue
        yield kind, value
        if kind != "text":
            return


async def complete(job, reply, request):
    """A request not streamed -> its chat.completion."""
    end = None
    async for kind, value in events(job, request):
        if kind == "error":
            raise ApiError(500, value)
        if kind == "end":
            end = value
    if end is None:
        raise ApiError(499, "the client went away")  # nginx's status for it; never seen
    return reply.completion(end)


async def sse_stream(job, reply):
    """A streamed request -> its server-sent events: the role, the text as it is decoded, the
    finish_reason, the usage when asked, DONE."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        async for kind, value in events(job):
            if kind == "text":
                yield reply.chunk({"content": value})
            elif kind == "error":
                yield sse(error_body(500, value))
                return
            else:
                yield reply.chunk(value["fields"], value["finish_reason"])
        if reply.include_usage:
            yield reply.usage_chunk(value["usage"])
        yield DONE
    finally:
        job.cancelled = True  # a client gone mid-stream frees its row


async def read_body(request):
    """The request's bytes, refused past MAX_BODY bytes before they are all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"the request is over {MAX_BODY // 2**20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request is over {MAX_BODY // 2**20} MiB")
    return bytes(body)


def make_app(worker):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(openapi_url=None)  # no /docs: the API is OpenAI's
    args = worker.args

    def check(request):
        """The API key (constant-time compare), then whether the model is loaded."""
        sent = request.headers.get("authorization", "").encode()
        if args.api_key and not hmac.compare_digest(sent, f"Bearer {args.api_key}".encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                           code="invalid_api_key")
        if worker.model is None:
            raise ApiError(503, "the model is still loading", code="loading")

    @app.exception_handler(VLMError)  # refused here, or bad input a model file found (400)
    async def refused(request, e):
        if not isinstance(e, ApiError):
            e = ApiError(400, str(e))
        return JSONResponse(error_body(e.status, str(e), e.param, e.code), e.status)

    @app.exception_handler(HTTPException)  # an unknown path or method
    async def not_served(request, e):
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(error_body(e.status_code, message), e.status_code)

    @app.get("/health")
    async def health():
        if worker.model is None:
            raise ApiError(503, "the model is still loading", code="loading")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        check(request)
        entry = {"id": args.model, "object": "model", "created": 0, "owned_by": "plainvlm"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check(request)
        arrived = time.monotonic()
        worker.preparing += 1  # only this thread changes it
        try:
            data = await read_body(request)
            job = await asyncio.to_thread(worker.prepare, data, asyncio.get_running_loop())
            job.arrived = arrived
            worker.submit(job)
        finally:
            worker.preparing -= 1
        reply = Reply(args.model, job.request.include_usage)
        if job.request.stream:
            return StreamingResponse(sse_stream(job, reply), media_type="text/event-stream")
        return await complete(job, reply, request)

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description="An OpenAI-compatible server (chat completions with "
                                "images) for a PaliGemma, SmolVLM or PerceptionLM checkpoint.")
    p.add_argument("--model", required=True, help="hub repo id or local dir")
    p.add_argument("--host", default="127.0.0.1", help="%(default)s: this machine only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the "
                   "CLI's, by device)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; past them, 503")
    p.add_argument("--api-key", default=None, help="requests need Authorization: Bearer KEY")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) URLs")
    p.add_argument("--allowed-local-dir", type=Path, default=None,
                   help="image and video files may be read under this folder")
    p.add_argument("--vae", default=None, help="PaliGemma: a local vae-oid.npz for masks")
    args = p.parse_args(argv)
    if args.max_batch_size <= 0 or args.max_queue <= 0:
        raise VLMError("--max-batch-size and --max-queue must be positive")
    if args.allowed_local_dir is not None:
        args.allowed_local_dir = args.allowed_local_dir.resolve()  # links and .. followed
        if not args.allowed_local_dir.is_dir():
            raise VLMError(f"--allowed-local-dir {args.allowed_local_dir} is not a folder")
    choose_device_and_dtype(args.device, args.dtype)  # a bad --device or --dtype: before the load
    folder = resolve(args.model)
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type not in FAMILIES:
        raise VLMError(f"{args.model} holds a {model_type!r} checkpoint; serve.py serves "
                       f"{', '.join(FAMILIES)}")
    import uvicorn
    worker = Worker(args, FAMILIES[model_type], folder)
    server = uvicorn.Server(uvicorn.Config(make_app(worker), host=args.host, port=args.port))
    threading.Thread(target=worker.run, args=(server,), daemon=True).start()
    server.run()
    if worker.error is not None:
        raise worker.error


if __name__ == "__main__":
    from command_line import run_cli
    run_cli(main)
