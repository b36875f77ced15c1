"""An OpenAI-compatible server for the three families: POST /v1/chat/completions (images as
image_url parts, streaming as server-sent events, usage), GET /v1/models, GET /health.

    python serve.py --model HuggingFaceTB/SmolVLM2-256M-Video-Instruct [--port 8000] [--api-key KEY]

The family comes from the checkpoint's config.json (model_type); the model loads once (/health
answers 503 until then). A chat becomes the prompt its family's CLI builds: SmolVLM and PerceptionLM
through the checkpoint's chat template; PaliGemma, which has none, as its task prompt (the images
first, then the text). So a request [image, text] answers what `python FAMILY.py --image X --prompt
TEXT` prints with the same settings; what a request leaves out is the CLI's default (greedy, 100 new
tokens). PaliGemma's message carries `objects` (what its --json prints: label, box in pixels, mask
as COCO RLE when the mask decoder is at hand); in a stream, the chunk with the finish_reason does.

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
  gets its row's text as it is decoded: the ids decoded whole at each step, less a trailing partial
  UTF-8 character and a tail that may begin a stop string, so the deltas join to the text a
  non-streamed request gets.
"""
import argparse
import asyncio
import base64
import hmac
import io
import json
import queue
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

import paligemma
import perception_lm
import smolvlm
from common import VLMError, choose_device_and_dtype, first_line, open_image, read_json, resolve

FAMILIES = {"paligemma": paligemma, "idefics3": smolvlm, "smolvlm": smolvlm,
            "perception_lm": perception_lm}  # config.json's model_type -> the model file
# A batch waits for the requests that reach the server within BATCH_WINDOW seconds of its first,
# and for those still being read and preprocessed (a 640x480 image takes SmolVLM's processor
# 0.3-2 s), up to PREPARE_WAIT seconds more: eight clients started together reach the server within
# a few ms, but the queue over seconds (bench/serve.py).
BATCH_WINDOW = 0.05
PREPARE_WAIT = 10
DEFAULT_MAX_TOKENS = 100  # the CLI's --max-new-tokens
MAX_BODY = 32 * 2**20  # bytes of a request: a few photos in base64
MAX_IMAGES = 8  # a request
MAX_REMOTE = 16 * 2**20  # bytes of an http(s) image or video, whose every read must come ...
REMOTE_SECONDS = 10  # ... within this time
# OpenAI fields this server cannot honour: refused unless absent, null or this no-op value
NO_OPS = {"n": 1, "logprobs": False, "tools": [], "functions": [], "logit_bias": {},
          "presence_penalty": 0, "frequency_penalty": 0, "response_format": {"type": "text"}}


class ApiError(VLMError):
    """A request refused: its HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def error_body(status, message, param=None, code=None):
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------ requests

class Upload(io.BytesIO):
    """The bytes of an image in a request, named in error messages by where the request holds
    them (PIL prints a file's repr)."""

    def __init__(self, data, where):
        super().__init__(data)
        self.where = where

    def __repr__(self):
        return self.where

    __str__ = __repr__


def read_url(url, where, args):
    """An image or video URL -> its bytes: a data: URL always, http(s) with --allow-remote-images,
    a file under --allowed-local-dir (a relative path is relative to it)."""
    local_dir = args.allowed_local_dir  # resolved
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data URL must be data:<type>;base64,<data>", where)
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:  # binascii.Error
            raise ApiError(400, f"{where}: the data URL is not valid base64", where) from None
    remote = url.startswith(("http://", "https://"))
    if remote and not args.allow_remote_images:
        raise ApiError(400, f"{where}: http(s) URLs are refused (the server's "
                       "--allow-remote-images allows them)", where)
    if not remote and local_dir is None:
        raise ApiError(400, f"{where}: use a data: URL (local files need the server's "
                       "--allowed-local-dir)", where)
    try:
        if remote:
            with urllib.request.urlopen(url, timeout=REMOTE_SECONDS) as response:
                data = response.read(MAX_REMOTE + 1)
        else:
            path = (local_dir / url.removeprefix("file://")).resolve()  # links and .. followed
            if not path.is_relative_to(local_dir):
                raise ApiError(400, f"{where}: {url} is not under --allowed-local-dir", where)
            data = path.read_bytes()
    except (OSError, ValueError) as e:
        raise ApiError(400, f"{where}: {url} cannot be read ({first_line(e)})", where) from None
    if len(data) > MAX_REMOTE:
        raise ApiError(400, f"{where}: {url} is over {MAX_REMOTE // 2**20} MiB", where)
    return data


def parse_content(content, where, found):
    """A message's content -> the chat template's parts ({"type": "text" | "image" | "video"});
    each image_url and video_url is added to `found` as (url, where)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", where)
    parts = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        if kind not in ("image_url", "video_url"):
            raise ApiError(400, f"{at}: unknown content part {json.dumps(kind)} (text with its "
                           "text, image_url or video_url)", at)
        url = part.get(kind)
        if isinstance(url, dict):  # {"url": ..., "detail": ...}; detail has no meaning here
            url = url.get("url")
        if not isinstance(url, str):
            raise ApiError(400, f"{at}.{kind}.url must be a string", f"{at}.{kind}.url")
        media = kind.removesuffix("_url")  # image, video
        found[media].append((url, f"{at}.{kind}"))
        parts.append({"type": media})
    return parts


def chat_prompt(messages, family, processor):
    """The request's messages -> the prompt the family's CLI would build for them, and their media
    {"image": [(url, where)], "video": [...]}."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    found = {"image": [], "video": []}
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant",
                           f"messages[{i}].role")
        content = parse_content(message.get("content"), f"messages[{i}].content", found)
        turns.append({"role": role, "content": content})
    if len(found["image"]) > MAX_IMAGES or len(found["video"]) > 1:
        raise ApiError(400, f"too many images or videos: at most {MAX_IMAGES} images or one "
                       "video a request", "messages")
    if family is not paligemma:
        return processor.apply_chat_template(turns, add_generation_prompt=True), found
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise ApiError(400, "PaliGemma has no chat template: send one user message, its images "
                       "and task prompt (e.g. 'caption en')", "messages")
    if found["video"] or not found["image"]:
        raise ApiError(400, "PaliGemma needs an image (and takes no video)", "messages")
    text = "".join(part["text"] for part in turns[0]["content"] if part["type"] == "text")
    return text, found


def number(body, name, default, low, high, integer=False):
    """A numeric field of the request, checked; absent or null: `default`."""
    value = body.get(name)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {what} in [{low}, {high}], got {json.dumps(value)}",
                       name)
    return value


def generation_settings(body, context):
    """-> (generate()'s sampling keywords, max_tokens, the stop strings)."""
    for name, no_op in NO_OPS.items():
        if body.get(name) not in (None, no_op):
            raise ApiError(400, f"{name}={json.dumps(body[name])} is not supported here", name)
    max_tokens = number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, context, integer=True)
    max_tokens = number(body, "max_completion_tokens", max_tokens, 1, context, integer=True)
    settings = {"temperature": number(body, "temperature", 0.0, 0, 2),
                "top_p": number(body, "top_p", None, 0, 1),  # 0: only the likeliest token
                "top_k": number(body, "top_k", None, 1, 2**31, integer=True),  # as vLLM takes
                "seed": number(body, "seed", None, 0, 2**63 - 1, integer=True)}
    stops = body.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    valid = [stop for stop in stops if isinstance(stop, str) and stop]
    if not isinstance(stops, list) or len(stops) > 4 or len(valid) != len(stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    return settings, max_tokens, stops


@dataclass
class Job:
    """A request on its way through the worker, and the asyncio queue its events go to."""
    prompt: str
    images: list
    inputs: dict  # the processor's output for this request alone
    settings: dict
    max_tokens: int
    stops: list
    alone: bool  # seeded, or a video: never batched with others
    stream: bool  # text events as it is decoded; else only the end
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = 0.0  # time.monotonic() when it reached the server
    cancelled: bool = False  # its client went away

    def send(self, *event):  # from the worker thread to the request's event loop
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# ------------------------------------------------------------ the worker

def sendable(text, stops):
    """How much of `text` may be streamed now: not a trailing partial UTF-8 character (U+FFFD until
    its last byte comes), nor a tail that may begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    longest = max((len(stop) for stop in stops), default=1)
    for size in range(min(end, longest - 1), 0, -1):
        if any(stop.startswith(text[end - size:end]) for stop in stops):
            return end - size
    return end


class Row:
    """A request's row of a batch: its new ids decoded as they come, sent as text deltas."""

    def __init__(self, job, worker):
        self.job = job
        self.worker = worker  # its processor decodes, its model's end ids end the row
        self.ids = []
        self.sent = 0  # characters sent so far
        self.done = False

    def push(self, token):
        """The row's next token -> whether the row has ended."""
        if self.done or self.job.cancelled:
            self.done = True
            return True
        self.ids.append(token)
        text = self.worker.processor.decode(self.ids)  # up to an end token, no special tokens
        reason = None
        if token in self.worker.model.stop:
            reason = "stop"
        elif len(self.ids) >= self.job.max_tokens:
            reason = "length"
        cuts = [text.find(stop) for stop in self.job.stops if stop in text]
        if cuts:  # the text ends before the first stop string
            text = text[:min(cuts)]
            reason = "stop"
        end = len(text)
        if reason is None:
            end = sendable(text, self.job.stops)
        if end > self.sent and self.job.stream:
            self.job.send("text", text[self.sent:end])
            self.sent = end
        if reason is not None:
            self.done = True
            prompt = int(self.job.inputs["attention_mask"].sum())  # image tokens in, padding out
            usage = {"prompt_tokens": prompt, "completion_tokens": len(self.ids),
                     "total_tokens": prompt + len(self.ids)}
            self.job.send("end", {"text": text, "finish_reason": reason, "usage": usage,
                                  "fields": self.worker.describe(self.job, text)})
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
        except VLMError as e:
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

    def prepare(self, body, loop):
        """A request, in an HTTP thread: checked, its images read, preprocessed alone -> a Job."""
        context = self.model.cfg.text.max_position_embeddings
        settings, max_tokens, stops = generation_settings(body, context)
        prompt, found = chat_prompt(body.get("messages"), self.family, self.processor)
        images = [open_image(Upload(read_url(url, where, self.args), where))
                  for url, where in found["image"]]
        given = {}
        if images:
            given["images"] = [images]
        with tempfile.TemporaryDirectory() as folder:  # PyAV reads a video from a file
            for url, where in found["video"]:
                path = Path(folder) / where  # errors name the video by its place in the request
                path.write_bytes(read_url(url, where, self.args))
                given["videos"] = [str(path)]
            inputs = self.processor(text=[prompt], **given)
        n_tokens = inputs["input_ids"].shape[1]
        if n_tokens + max_tokens > context:
            raise ApiError(400, f"the prompt ({n_tokens} tokens) plus max_tokens ({max_tokens}) "
                           f"exceed the model's context of {context} tokens", "max_tokens")
        alone = settings["seed"] is not None or bool(found["video"])
        return Job(prompt, images, inputs, settings, max_tokens, stops, alone,
                   body.get("stream") is True, asyncio.Queue(), loop)

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
            if self.fits(batch, job):
                batch.append(job)
            else:
                rest.append(job)
        self.waiting = rest
        return batch

    def fits(self, batch, job):
        if not batch:
            return True
        if batch[0].alone or job.alone or job.settings != batch[0].settings:
            return False
        longest = max(other.inputs["input_ids"].shape[1] for other in [*batch, job])
        most = max(other.max_tokens for other in [*batch, job])
        return longest + most <= self.model.cfg.text.max_position_embeddings  # left-padded

    def generate(self, batch):
        if not batch:
            return
        start = time.perf_counter()
        rows = [Row(job, self) for job in batch]
        steps = 0

        def stream(token):  # (B,) new ids -> (B,) whether each row has ended
            nonlocal steps
            steps += 1
            ended = [row.push(int(t)) for row, t in zip(rows, token.tolist())]
            return torch.tensor(ended, device=token.device)

        try:
            inputs = batch[0].inputs
            if len(batch) > 1:  # preprocessed together, left-padded, as --batch does
                images = [job.images for job in batch]
                inputs = self.processor(text=[job.prompt for job in batch],
                                        images=images if any(images) else None)
            inputs = {name: value.to(self.device) for name, value in inputs.items()}
            self.model.generate(**inputs, max_new_tokens=max(job.max_tokens for job in batch),
                                stream=stream, **batch[0].settings)
        except Exception as e:  # each unfinished row gets the error; the server goes on
            traceback.print_exc()
            for row in rows:
                if not row.done:
                    row.job.send("error", first_line(e))
        spread = (max(job.arrived for job in batch) - batch[0].arrived) * 1000
        print(f"batch: {len(batch)} requests (arrived within {spread:.0f} ms), {steps} steps, "
              f"{time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)

    def describe(self, job, text):
        """PaliGemma: the objects of the answer, as its --json prints them."""
        if self.family is not paligemma:
            return {}
        image = job.images[0]
        objects = paligemma.parse_objects(text, image.width, image.height)
        masks = [None] * len(objects)
        if self.mask_decoder is not None:
            masks = paligemma.decode_masks(self.mask_decoder, objects, image.width, image.height)
        return {"objects": paligemma.json_objects(objects, masks)}


# ------------------------------------------------------------ HTTP

def sse(data):
    return f"data: {json.dumps(data)}\n\n"


class Reply:
    """The OpenAI objects answering one request; one id for all its chunks."""

    def __init__(self, model, job, body):
        self.job = job
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model}
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    async def events(self, request=None):
        """The job's events up to its end or error. With `request` (not streamed: only the end
        comes), its client is polled, and one gone away ends its row; Starlette cancels a stream
        whose client went away instead."""
        while True:
            try:
                kind, value = await asyncio.wait_for(self.job.events.get(), timeout=0.5)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.job.cancelled = True
                    return
                continue
            yield kind, value
            if kind != "text":
                return

    async def complete(self, request):
        end = None
        async for kind, value in self.events(request):
            if kind == "error":
                raise ApiError(500, value)
            if kind == "end":
                end = value
        if end is None:
            raise ApiError(499, "the client went away")  # nginx's status for it; never seen
        message = {"role": "assistant", "content": end["text"], **end["fields"]}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": end["finish_reason"]}
        return {**self.head, "object": "chat.completion", "choices": [choice],
                "usage": end["usage"]}

    def chunk(self, delta, finish_reason=None):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        if self.include_usage:
            data["usage"] = None  # as OpenAI: null, then the chunk with empty choices has it
        return sse(data)

    async def stream(self):
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            async for kind, value in self.events():
                if kind == "text":
                    yield self.chunk({"content": value})
                elif kind == "error":
                    yield sse(error_body(500, value))
                    return
                else:
                    yield self.chunk(value["fields"], value["finish_reason"])
            if self.include_usage:
                last = {**self.head, "object": "chat.completion.chunk", "choices": []}
                yield sse({**last, "usage": value["usage"]})
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True  # a client gone mid-stream frees its row


async def read_body(request):
    """The request's JSON object, refused past MAX_BODY bytes before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"the request is over {MAX_BODY // 2**20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request is over {MAX_BODY // 2**20} MiB")
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


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
            body = await read_body(request)
            job = await asyncio.to_thread(worker.prepare, body, asyncio.get_running_loop())
            job.arrived = arrived
            worker.submit(job)
        finally:
            worker.preparing -= 1
        reply = Reply(args.model, job, body)
        if job.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await reply.complete(request)

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
