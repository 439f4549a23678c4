"""The OpenAI wire format: request bodies checked into typed requests, results shaped into response bodies.

Pure: no I/O, no MLX. A body that is not what the API allows is refused with the field and the reason,
as a 400, before anything is looked up or loaded. Fields the API has and this server does not use
(`user`, `logprobs`, penalties, ...) are accepted and ignored, as vLLM and mlx_lm.server do, so
clients that always send them keep working; `n` other than 1 is refused, as it would change the answer.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from ..errors import AdapterHubError

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256


class RequestError(AdapterHubError):
    """A request the API refuses: `status` is the HTTP status, `kind` the OpenAI error type."""

    def __init__(self, message: str, hint: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message, hint)
        self.status = status
        self.kind = kind
        self.param = param


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server refuses more with a 400 (or 413, 503) that says the limit."""

    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    max_tokens: int = 4096
    max_prompt_tokens: int = 8192
    max_pending: int = 256  # queued and running requests, all bases together
    max_batch: int = 32  # rows decoded together on one base


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions or /v1/chat/completions body."""

    chat: bool
    model: str
    prompt: str | None  # completions
    messages: tuple[dict, ...] | None  # chat: {"role", "content"} with content as text
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _refuse(param: str, why: str, hint: str | None = None) -> RequestError:
    return RequestError(f"'{param}' {why}", hint=hint or "see the OpenAI API reference for this field", param=param)


def _number(body: dict, param: str, default: float, low: float, high: float) -> float:
    value = body.get(param)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(param, f"must be a number, got {json.dumps(value)}")
    if not low <= value <= high:
        raise _refuse(param, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _integer(body: dict, param: str) -> int | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(param, f"must be a whole number, got {json.dumps(value)}")
    return value


def _text_content(content, where: str) -> str:
    """A message's content as text: a string, or the text parts of a list (the newer OpenAI form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise _refuse(where, "has a part that is not text; this server reads text only")
        return "".join(p["text"] for p in content)
    raise _refuse(where, "must be a string or a list of text parts")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _refuse(f"messages[{i}]", "must be an object with a string 'role'")
        checked.append({"role": message["role"], "content": _text_content(message.get("content"), f"messages[{i}].content")})
    return tuple(checked)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the client's way of sending one prompt as a batch of one
    if not isinstance(prompt, str):
        raise _refuse("prompt", "must be one string", hint="send one prompt per request")
    return prompt


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)):
        raise _refuse("stop", f"must be a string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings "
                              f"of at most {MAX_STOP_LENGTH} characters")
    return tuple(stops)


def parse(raw: bytes, chat: bool, limits: Limits) -> CompletionRequest:
    """The request in `raw` (a JSON body), checked; RequestError says which field is wrong and why."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", hint="send a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(body).__name__}", hint="send a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _refuse("model", "must name a base or an adapter ref", hint="GET /v1/models lists what this server serves")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise _refuse("n", f"must be 1, got {n}", hint="send one request per completion")
    max_tokens = _integer(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif not 1 <= max_tokens <= limits.max_tokens:
        raise _refuse("max_tokens", f"must be between 1 and this server's limit of {limits.max_tokens}, got {max_tokens}",
                      hint="ask for fewer tokens")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2 ** 63:
        raise _refuse("seed", f"must be between 0 and 2**63 - 1, got {seed}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _refuse("stream", f"must be true or false, got {json.dumps(stream)}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _refuse("stream_options", "must be an object")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _refuse("top_p", "must be above 0 (it keeps the most likely tokens whose probabilities add up to it)")
    return CompletionRequest(
        chat=chat, model=model, prompt=None if chat else _prompt(body), messages=_messages(body) if chat else None,
        max_tokens=max_tokens, sampling=Sampling(_number(body, "temperature", 1.0, 0.0, 2.0), top_p, seed),
        stop=_stop(body), stream=stream, include_usage=bool(options.get("include_usage")))


# ---- responses -------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: CompletionRequest, request_id: str, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """The whole answer, as one JSON object. `model` is the version that answered (`sql-lora@3` for
    `sql-lora@prod`), as OpenAI names the dated snapshot behind an alias."""
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(request: CompletionRequest, request_id: str, model: str, text: str | None,
               finish_reason: str | None = None, first: bool = False) -> dict:
    """One server-sent event of a stream: a piece of text, or the end (`finish_reason` set)."""
    if request.chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(request: CompletionRequest, request_id: str, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last event when the client asked for `stream_options.include_usage`: no choices, the token counts."""
    return {"id": request_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def prompt_tokens(tokenizer, request: CompletionRequest, loreft: bool = False) -> list[int]:
    """The tokens the model reads, as `adapterhub generate` (generation.templated) makes them.

    A chat: the messages in the tokenizer's chat template with the assistant's turn opened, encoded
    without added special tokens (the template writes its own), as mlx-lm's generate and server do.
    A completion prompt: the text as given, with the BOS mlx-lm's stream_generate adds (unless the text
    starts with it), or as loreft.generate encodes it for a LoReFT adapter.
    """
    if request.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("this base's tokenizer has no chat template, so a chat cannot be put in its format",
                               hint="send the text to /v1/completions instead", param="messages")
        from ..generation import chat_tokens

        try:
            tokens = chat_tokens(tokenizer, request.messages)
        except Exception as e:  # noqa: BLE001 - a template raises whatever its author chose (jinja's exceptions)
            raise RequestError(f"the chat template refused these messages: {e}", param="messages") from None
    elif loreft:
        tokens = tokenizer.encode(request.prompt)
    else:
        bos = getattr(tokenizer, "bos_token", None)
        tokens = tokenizer.encode(request.prompt, add_special_tokens=bos is None or not request.prompt.startswith(bos))
    if not tokens:
        raise RequestError("the prompt is empty", hint="send some text", param="messages" if request.chat else "prompt")
    return list(tokens)
