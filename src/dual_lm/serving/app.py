"""The HTTP side: FastAPI routes in OpenAI's completions shape over an ``Engine``.

The body is read here (at most ``max_body`` bytes) and checked by ``requests``; every refusal, a
route that does not exist and a failure of the model get OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx or 5xx status. A stream is
server-sent events: ``data: <chunk>`` per piece of text or per step of the mode, then
``data: [DONE]``; a client that goes away cancels its jobs (a waiting job is dropped, a running row
stops at its next token).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from dual_lm.serving.engine import Engine
from dual_lm.serving.requests import ApiError, Completion, parse_completion, parse_fill

MAX_BODY = 1 << 20  # bytes: a prompt fills a context of 2,048 tokens in well under this


def _error(err: ApiError) -> Response:
    """OpenAI's error body, as ASCII JSON: a message that quotes the client's text (a lone surrogate
    included) must not fail to encode (Starlette's ``JSONResponse`` writes raw UTF-8)."""
    return Response(json.dumps(err.body()), status_code=err.status, media_type="application/json")


async def read_json(request: Request, limit: int):
    """The request's JSON body, refused (``ApiError``) when over ``limit`` bytes, empty, not UTF-8 or not JSON."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # a web page can post text/plain here unasked; JSON needs a preflight we refuse
        shown = kind or "none"
        raise ApiError(f"send the body as Content-Type: application/json (got {shown})", status=415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(f"the request body is over {limit} bytes", status=413)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(f"the request body is over {limit} bytes", status=413)
    if not body.strip():
        raise ApiError("the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")  # strictly: JSON is UTF-8 (RFC 8259), json.loads would also take UTF-16
    except UnicodeDecodeError as err:
        raise ApiError(f"the request body is not valid UTF-8 (byte {err.start}): send JSON in UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ApiError("the request body is nested too deeply to be read") from None
    except ValueError as err:
        raise ApiError(f"the request body is not valid JSON: {err}") from None


class _Events:
    """The events of one request's jobs, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.jobs = loop, asyncio.Queue(), []

    def emit(self, event: dict) -> None:  # on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


def create_app(engine: Engine, name: str, max_body: int = MAX_BODY) -> FastAPI:
    """The server's routes for ``engine``'s model, served as model ``name``."""
    app = FastAPI(title="dual-lm", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def refused(request: Request, err: ApiError):
        return _error(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(ApiError(f"{request.method} {request.url.path}: {err.detail}", None, err.status_code, kind))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return _error(ApiError(f"invalid request: {err.errors()}"))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        return _error(ApiError(f"internal error: {type(err).__name__}: {err}", None, 500, "server_error"))

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and model != name:
            raise ApiError(f"model {model!r} is not served here; this server serves {name!r}", "model", 404,
                           "not_found_error")  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("dual_lm.serving").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return Response(json.dumps({"status": "down", "model": name}), 503, media_type="application/json")
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "dual-lm"}]}

    @app.post("/v1/fill")
    async def fill(request: Request):
        body = await read_json(request, max_body)
        checked = parse_fill(body)
        check_model(body)
        events = _Events(asyncio.get_running_loop())
        events.jobs = [engine.fill_job(checked, events.emit)]
        engine.submit(events.jobs)
        return await _answer(request, events, lambda: _filled(events, name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request, max_body)
        checked = parse_completion(body)
        check_model(body)
        events = _Events(asyncio.get_running_loop())
        events.jobs = engine.completion_jobs(checked, events.emit)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
        }
        engine.submit(events.jobs)
        if checked.stream:
            return StreamingResponse(_stream(checked, events, head), media_type="text/event-stream")
        return await _answer(request, events, lambda: _whole(checked, events, head))

    return app


class _Gone(Exception):
    """The client of an unstreamed request went away: its jobs are cancelled, nobody reads an answer."""


async def _watch(request: Request, events: _Events) -> None:
    """Cancel the request's jobs once its client has gone (checked every half second, tokens flowing or not)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    events.cancel()
    events.queue.put_nowait({"gone": True})


async def _answer(request: Request, events: _Events, collect):
    """``await collect()`` while ``_watch`` looks out for the client; an empty 499 if it went away."""
    watcher = asyncio.create_task(_watch(request, events))
    try:
        return await collect()
    except _Gone:
        return Response(status_code=499)  # nginx's "client closed request": logged, never read
    finally:
        watcher.cancel()


async def _next(events: _Events) -> dict:
    event = await events.queue.get()
    if "gone" in event:
        raise _Gone
    return event


def _usage(totals: list[dict]) -> dict:
    prompt = sum(u["prompt_tokens"] for u in totals)
    completion = sum(u["completion_tokens"] for u in totals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _filled(events: _Events, name: str) -> dict:
    result = await _next(events)
    if "error" in result:
        status = result.get("status", 500)
        raise ApiError(result["error"], "text" if status == 400 else None, status,
                       "invalid_request_error" if status == 400 else "server_error")  # fmt: skip
    return {"object": "fill", "model": name, "masks": result["masks"]}


async def _whole(checked: Completion, events: _Events, head: dict) -> dict:
    """The answer of a request without ``stream``: every choice's text, once all are done."""
    texts = [p if checked.echo else "" for p in checked.prompts]
    ends: dict[int, dict] = {}
    while len(ends) < len(checked.prompts):
        event = await _next(events)
        if "error" in event:
            events.cancel()
            raise ApiError(event["error"], None, 500, "server_error")
        texts[event["index"]] += event["text"]
        if "finish_reason" in event:
            ends[event["index"]] = event
    choices = [
        {"index": i, "text": texts[i], "logprobs": None, "finish_reason": ends[i]["finish_reason"],
         "dual_lm": ends[i]["stats"]}
        for i in range(len(texts))
    ]  # fmt: skip
    return {**head, "choices": choices, "usage": _usage([ends[i]["usage"] for i in ends])}


def _chunk(head: dict, index: int, text: str, finish_reason=None, extra: dict | None = None) -> str:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return f"data: {json.dumps({**head, 'choices': [choice], **(extra or {})})}\n\n"


async def _stream(checked: Completion, events: _Events, head: dict):
    """The server-sent events of a streamed request (see the module docstring)."""
    try:
        if checked.echo:
            for i, prompt in enumerate(checked.prompts):
                yield _chunk(head, i, prompt)
        usages, done = [], 0
        while done < len(checked.prompts):
            event = await events.queue.get()
            if "error" in event:
                yield f"data: {json.dumps(ApiError(event['error'], None, 500, 'server_error').body())}\n\n"
                return
            extra = {"dual_lm": event["event"]} if "event" in event else None
            if "finish_reason" in event:
                done += 1
                usages.append(event["usage"])
                extra = {"dual_lm": {"event": "done", **event["stats"]}}
            yield _chunk(head, event["index"], event["text"], event.get("finish_reason"), extra)
        if checked.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(usages)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is cancelled) or the stream ended
        events.cancel()
