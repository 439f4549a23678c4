"""The HTTP face: an OpenAI-compatible API on Starlette, over the runner and the directory.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events)
    GET  /v1/models                               bases and the adapter refs that run on them
    GET  /health                                  readiness (no key needed), and what is in memory (with it)
    GET  /ui/                                     the registry's read-only web page (webui), on the same stack

Every refusal is the OpenAI error object whose message is the line the CLI would print after `error: `
(message — hint). Registry lookups, hash checks and tokenization run in worker threads, so the event
loop only moves bytes; all model work is the runner's. A client that disconnects cancels its job, which
frees its batch row before the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from ..errors import AdapterHubError, CorruptRegistryError, NotFoundError, printable
from ..webui.app import create_app as ui_app
from . import protocol
from .access_log import AccessRecord
from .directory import Directory
from .protocol import CompletionRequest, Limits, RequestError
from .jobs import Delta, Done, Failed, Job, Target
from .runner import Engine

log = logging.getLogger("adapterhub.serving")


def _status(error: BaseException) -> tuple[int, str]:
    """HTTP status and OpenAI error type of an error: the user's mistakes are 4xx, the registry's damage 500."""
    if isinstance(error, RequestError):
        return error.status, error.kind
    if isinstance(error, NotFoundError):
        return 404, "not_found_error"
    if isinstance(error, CorruptRegistryError) or not isinstance(error, AdapterHubError):
        return 500, "server_error"
    return 400, "invalid_request_error"


def _message(error: BaseException) -> str:
    if isinstance(error, AdapterHubError):
        return printable(str(error))
    return f"unexpected {type(error).__name__} on the server — see the server's log"


def _error_response(error: BaseException, record: AccessRecord | None = None) -> JSONResponse:
    status, kind = _status(error)
    if record is not None:
        record.status, record.error = status, _message(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(protocol.error_body(_message(error), kind, getattr(error, "param", None)), status, headers)


class _JobStream(StreamingResponse):
    """A stream whose end, however it comes (done, client gone, server stopping), cancels the job and logs it."""

    def __init__(self, content: AsyncIterator[str], job: Job, done: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._job, self._done = job, done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, asyncio.CancelledError):
            pass  # the client left, or a second Ctrl-C stops the server now: the stream just ends
        finally:
            self._job.cancel()
            self._done()


def create_app(engine: Engine, directory: Directory, limits: Limits = Limits(), api_key: str | None = None,
               access_log: Callable[[str], None] | None = None) -> Starlette:
    """The Starlette application. `api_key`: required as `Authorization: Bearer KEY` on /v1/* and /ui (and for
    /health's details); `access_log` receives one JSON line per request."""

    def logged(record: AccessRecord) -> None:
        if access_log is not None:
            access_log(record.line())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError("missing or wrong API key", hint="send the server's key as 'Authorization: Bearer KEY'",
                               status=401, kind="authentication_error")

    async def health(request: Request) -> Response:
        # Open to load balancers; what is in memory (refs, sha256s) only with the key, when there is one.
        try:
            authorize(request)
        except RequestError:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "bases": engine.stats()})

    async def models(request: Request) -> Response:
        record = AccessRecord(request.method, request.url.path, _client(request))
        try:
            authorize(request)
            listing = await run_in_threadpool(directory.models)
        except Exception as e:  # noqa: BLE001 - every failure is an error object, never a traceback
            response = _error_response(e, record)
        else:
            record.status = 200
            response = JSONResponse({"object": "list", "data": listing})
        logged(record)
        return response

    async def generate(request: Request, chat: bool) -> Response:
        record = AccessRecord(request.method, request.url.path, _client(request))
        try:
            authorize(request)
            parsed = protocol.parse(await _body(request, limits.max_body_bytes), chat, limits)
            record.model, record.stream = parsed.model, parsed.stream
            target = await run_in_threadpool(directory.resolve, parsed.model)
            record.target(target)
            loreft = target.version is not None and target.version.kind == "loreft"
            tokens = await run_in_threadpool(protocol.prompt_tokens, engine.tokenizer(target.base), parsed, loreft)
            if len(tokens) > limits.max_prompt_tokens:
                raise RequestError(f"the prompt is {len(tokens)} tokens, above this server's limit of "
                                   f"{limits.max_prompt_tokens}", hint="send a shorter prompt")
            record.prompt_tokens = len(tokens)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            job = Job(target, tokens, parsed.max_tokens, parsed.sampling, parsed.stop,
                      lambda event: loop.call_soon_threadsafe(events.put_nowait, event), stream=parsed.stream)
            engine.submit(job)
        except Exception as e:  # noqa: BLE001 - every failure is an error object, never a traceback
            if not isinstance(e, AdapterHubError):
                log.exception("request failed")
            response = _error_response(e, record)
            logged(record)
            return response
        request_id = protocol.new_id(chat)
        if parsed.stream:
            record.status = 200

            def stream_ended() -> None:
                if record.finish_reason is None and record.error is None:
                    record.status, record.error = 499, "client disconnected"
                logged(record)

            return _JobStream(_events_as_sse(parsed, target, request_id, events, record), job, stream_ended)
        try:
            return await _answer(request, parsed, target, request_id, job, events, record)
        finally:
            logged(record)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(protocol.error_body(f"no route {request.method} {request.url.path}", "invalid_request_error"),
                            exc.status_code)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Mount("/ui", app=_KeyRequired(ui_app(directory.registry.root), authorize), name="ui")]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


class _KeyRequired:
    """An ASGI application behind the server's API key: the catalogue page shows what the API would."""

    def __init__(self, app, authorize: Callable[[Request], None]):
        self.app, self.authorize = app, authorize

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            try:
                self.authorize(Request(scope))
            except RequestError as e:
                await _error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _client(request: Request) -> str | None:
    return f"{request.client.host}:{request.client.port}" if request.client else None


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_big = RequestError(f"the request body is over this server's limit of {limit} bytes",
                           hint="send a shorter prompt", status=413)
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer(request: Request, parsed: CompletionRequest, target: Target, request_id: str, job: Job,
                  events: asyncio.Queue, record: AccessRecord) -> Response:
    """The whole completion as one JSON body; a client that leaves first cancels the job."""
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        while True:
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({next_event, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                job.cancel()
                record.status, record.error = 499, "client disconnected"
                return Response(status_code=499)
            event = next_event.result()
            if isinstance(event, Failed):
                return _error_response(event.error, record)
            if isinstance(event, Done):
                record.status, record.finish_reason = 200, event.finish_reason
                record.completion_tokens = event.completion_tokens
                return JSONResponse(protocol.completion_body(parsed, request_id, target.ref, event.text, event.finish_reason,
                                                             event.prompt_tokens, event.completion_tokens))
    finally:
        gone.cancel()


async def _events_as_sse(parsed: CompletionRequest, target: Target, request_id: str, events: asyncio.Queue,
                         record: AccessRecord) -> AsyncIterator[str]:
    def sse(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    first = True
    if parsed.chat:
        yield sse(protocol.chunk_body(parsed, request_id, target.ref, "", first=True))
        first = False
    while True:
        event = await events.get()
        if isinstance(event, Delta):
            yield sse(protocol.chunk_body(parsed, request_id, target.ref, event.text, first=first))
            first = False
        elif isinstance(event, Failed):
            status, kind = _status(event.error)
            record.status, record.error = status, _message(event.error)
            yield sse(protocol.error_body(_message(event.error), kind))
            return
        elif isinstance(event, Done):
            record.finish_reason, record.completion_tokens = event.finish_reason, event.completion_tokens
            yield sse(protocol.chunk_body(parsed, request_id, target.ref, None, event.finish_reason))
            if parsed.include_usage:
                yield sse(protocol.usage_chunk(parsed, request_id, target.ref, event.prompt_tokens, event.completion_tokens))
            yield "data: [DONE]\n\n"
            return
