"""The OpenAI chat-completions protocol in plain Python: a request body checked and turned into what
serve.py's worker generates, and the OpenAI objects that answer it. Imported by serve.py (whose HTTP
side, FastAPI and uvicorn, is not imported here) and by the tests, which check each rule without a
server.

- A request: `parse_request` reads the body's JSON, checks its fields (OpenAI's names; what it
  leaves out is the CLI's default: greedy, 100 new tokens), turns its messages into the prompt the
  family's CLI builds (`chat_prompt`: SmolVLM and PerceptionLM through the checkpoint's chat
  template, PaliGemma as its task prompt, images first), reads its images and video (`read_url`:
  data: URLs always, http(s) with --allow-remote-images, files under --allowed-local-dir) and runs
  the processor on it alone -> a `ChatRequest`. What it refuses is an `ApiError`: an HTTP status and
  OpenAI's error object (`error_body`) with a one-line message.
- An answer: `Answer` turns a request's new ids into text as they come: the ids decoded whole at
  each step, less a trailing partial UTF-8 character and a tail that may begin a stop string
  (`sendable`), so the streamed deltas join to the text a non-streamed request gets; it ends at an
  end id, max_tokens or the first stop string (the text ends before it). `Reply` makes the
  chat.completion object and the server-sent chat.completion.chunk events, one id for all of a
  request's chunks; PaliGemma's `objects` (paligemma.answer_objects, as --json and --batch give
  them) come to it as the message's extra fields.
"""
import base64
import io
import json
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import paligemma
from common import VLMError, first_line, open_image

DEFAULT_MAX_TOKENS = 100  # the CLI's --max-new-tokens
MAX_IMAGES = 8  # a request
MAX_REMOTE = 16 * 2**20  # bytes of an http(s) image or video, whose every read must come ...
REMOTE_SECONDS = 10  # ... within this time
# OpenAI fields this server cannot honour: refused unless absent, null or this no-op value
NO_OPS = {"n": 1, "logprobs": False, "tools": [], "functions": [], "logit_bias": {},
          "presence_penalty": 0, "frequency_penalty": 0, "response_format": {"type": "text"}}
DONE = "data: [DONE]\n\n"  # a stream's last event


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


def read_url(url, where, media):
    """An image or video URL -> its bytes: a data: URL always, http(s) with --allow-remote-images,
    a file under --allowed-local-dir (a relative path is relative to it). `media`: the server's
    flags (allow_remote_images, allowed_local_dir resolved)."""
    local_dir = media.allowed_local_dir
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{where}: a data URL must be data:<type>;base64,<data>", where)
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:  # binascii.Error
            raise ApiError(400, f"{where}: the data URL is not valid base64", where) from None
    remote = url.startswith(("http://", "https://"))
    if remote and not media.allow_remote_images:
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
                "top_p": number(body, "top_p", None, 0, 1),
                "top_k": number(body, "top_k", None, 1, 2**31, integer=True),  # as vLLM takes
                "seed": number(body, "seed", None, 0, 2**63 - 1, integer=True)}
    if settings["top_p"] == 0:  # only the likeliest token: greedy (generate() takes (0, 1])
        settings["temperature"] = 0.0
    if settings["temperature"] == 0:  # top_p and top_k change nothing: greedy requests match
        settings["top_p"] = None
        settings["top_k"] = None
    stops = body.get("stop") or []
    if isinstance(stops, str):
        stops = [stops]
    valid = [stop for stop in stops if isinstance(stop, str) and stop]
    if not isinstance(stops, list) or len(stops) > 4 or len(valid) != len(stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    return settings, max_tokens, stops


@dataclass
class ChatRequest:
    """A checked request: what the worker generates, and how its answer is sent."""
    prompt: str
    images: list
    inputs: dict  # the processor's output for this request alone
    settings: dict  # generate()'s sampling keywords
    max_tokens: int
    stops: list
    alone: bool  # seeded, or a video: never batched with others
    stream: bool  # chunks as the text is decoded; else one chat.completion
    include_usage: bool  # a stream's last chunk carries the usage


def json_object(data):
    """The request's bytes -> its JSON object."""
    try:
        body = json.loads(data)
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_request(data, family, processor, context, media):
    """A request's bytes -> a ChatRequest: checked, its images read, preprocessed alone, so a bad
    request is refused before it waits (a prompt plus max_tokens past the model's `context` too).
    `media`: the server's flags that allow remote and local files (read_url)."""
    body = json_object(data)
    settings, max_tokens, stops = generation_settings(body, context)
    prompt, found = chat_prompt(body.get("messages"), family, processor)
    images = [open_image(Upload(read_url(url, where, media), where))
              for url, where in found["image"]]
    given = {}
    if images:
        given["images"] = [images]
    with tempfile.TemporaryDirectory() as folder:  # PyAV reads a video from a file
        for url, where in found["video"]:
            path = Path(folder) / where  # errors name the video by its place in the request
            path.write_bytes(read_url(url, where, media))
            given["videos"] = [str(path)]
        inputs = processor(text=[prompt], **given)
    n_tokens = inputs["input_ids"].shape[1]
    if n_tokens + max_tokens > context:
        raise ApiError(400, f"the prompt ({n_tokens} tokens) plus max_tokens ({max_tokens}) "
                       f"exceed the model's context of {context} tokens", "max_tokens")
    alone = settings["seed"] is not None or bool(found["video"])
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatRequest(prompt, images, inputs, settings, max_tokens, stops, alone,
                       body.get("stream") is True, include_usage)


# ------------------------------------------------------------ answers

def sendable(text, stops):
    """How much of `text` may be streamed now: not a trailing partial UTF-8 character (U+FFFD until
    its last byte comes), nor a tail that may begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    longest = max((len(stop) for stop in stops), default=1)
    for size in range(min(end, longest - 1), 0, -1):
        if any(stop.startswith(text[end - size:end]) for stop in stops):
            return end - size
    return end


class Answer:
    """A request's answer as its new ids come."""

    def __init__(self, request, decode, end_ids):
        self.request = request
        self.decode = decode  # ids -> text, up to an end token, no special tokens
        self.end_ids = end_ids  # the model's: the answer ends at one, finish_reason "stop"
        self.ids = []
        self.text = ""
        self.sent = 0  # characters streamed so far

    def add(self, token):
        """The next id -> (the text that may be streamed now, the finish_reason: None until the
        answer ends)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        reason = None
        if token in self.end_ids:
            reason = "stop"
        elif len(self.ids) >= self.request.max_tokens:
            reason = "length"
        cuts = [self.text.find(stop) for stop in self.request.stops if stop in self.text]
        if cuts:  # the text ends before the first stop string
            self.text = self.text[:min(cuts)]
            reason = "stop"
        end = len(self.text)
        if reason is None:
            end = sendable(self.text, self.request.stops)
        delta = ""
        if end > self.sent:
            delta = self.text[self.sent:end]
            self.sent = end
        return delta, reason

    def usage(self):
        prompt = int(self.request.inputs["attention_mask"].sum())  # image tokens in, padding out
        return {"prompt_tokens": prompt, "completion_tokens": len(self.ids),
                "total_tokens": prompt + len(self.ids)}


def sse(data):
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


class Reply:
    """The OpenAI objects answering one request; one id for all its chunks. `end`: what the worker
    sends when the answer ends ({"text", "finish_reason", "usage", "fields"}: the message's extra
    fields, PaliGemma's objects)."""

    def __init__(self, model, include_usage):
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model}
        self.include_usage = include_usage

    def completion(self, end):
        message = {"role": "assistant", "content": end["text"], **end["fields"]}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": end["finish_reason"]}
        return {**self.head, "object": "chat.completion", "choices": [choice],
                "usage": end["usage"]}

    def chunk(self, delta, finish_reason=None):
        """A stream's event: the first with the role, then the text, then one with the
        finish_reason (and, for PaliGemma, the objects)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data = {**self.head, "object": "chat.completion.chunk", "choices": [choice]}
        if self.include_usage:
            data["usage"] = None  # as OpenAI: null, then the chunk with empty choices has it
        return sse(data)

    def usage_chunk(self, usage):
        """The last event before DONE when stream_options.include_usage asks: no choices."""
        return sse({**self.head, "object": "chat.completion.chunk", "choices": [],
                    "usage": usage})
