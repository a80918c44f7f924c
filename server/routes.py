"""The routes: thin. Each parses its wire schema (FastAPI does it from the annotation), calls one service method,
and turns the result into a response. Nothing here decides anything a test of the services could not see, except
three HTTP matters: the JSON content type (:func:`require_json`), readiness (:func:`accepting`, and
``ServerState.ready``), and the client going away (:func:`until_disconnected`, :class:`EventStreamResponse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.responses import StreamingResponse

from server.errors import ClientDisconnected, Unavailable, UnsupportedMediaType, error_body
from server.protocol import ChatCompletionRequest, CritiqueRequest, ErrorResponse, ReviseRequest
from server.services import GenerationFailed, NotFound

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in [
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model or constitution"),
        (413, "body too large"), (415, "body is not JSON"), (429, "queue full (see Retry-After)"),
        (503, "loading or shutting down")]}


class AsciiJSONResponse(JSONResponse):
    """JSON as ASCII (``\\u`` escapes): a body can always be encoded, whatever text it carries."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def state(request: Request) -> Any:
    return request.app.state.server


async def require_json(request: Request) -> None:
    """Only a body declared as JSON is read (see UnsupportedMediaType for why)."""
    value = request.headers.get("content-type")
    if value:
        m = email.message.Message()
        m["content-type"] = value
        if m.get_content_maintype() == "application" and (
                m.get_content_subtype() == "json" or m.get_content_subtype().endswith("+json")):
            return
    raise UnsupportedMediaType(f"send the body as JSON with 'Content-Type: application/json' (got "
                               f"{value or 'no content type'!s})")


async def accepting(request: Request) -> None:
    """New work is refused (503) once shutdown began."""
    if state(request).draining:
        raise Unavailable("the server is shutting down")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable) -> Any:
    """Await ``work``, but cancel it (and raise ClientDisconnected) as soon as the client goes away: a request
    waiting for its answer must not keep the engine busy for nobody. The body has been read by then, so the next
    ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientDisconnected()


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects, whatever the server's ASGI spec version
    (Starlette's StreamingResponse only listens for the disconnect below spec 2.4, and above it notices only when
    a write fails, which for a request still queued in the engine may be never). Stopping cancels the task reading
    the body iterator, which cancels the engine requests."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _sse(data: dict | str) -> bytes:
    """One event. ASCII JSON: nothing in a chunk can make the encoding fail mid-stream."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _events(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except GenerationFailed as e:            # the status line is sent already: the error goes in the stream
        yield _sse(error_body(e)[1])
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()            # type: ignore[attr-defined]
    yield _sse("[DONE]")


router = APIRouter()
work = [Depends(accepting)]
json_work = [Depends(require_json), Depends(accepting)]


@router.get("/health", summary="liveness and readiness (open: no API key)")
async def health(request: Request) -> Response:
    status, body = state(request).health()
    return AsciiJSONResponse(body, status_code=status)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    st = state(request)
    return PlainTextResponse(st.metrics.render(st.engine), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", dependencies=work, responses=ERRORS)
async def list_models(request: Request) -> dict:
    return state(request).ready().models()


@router.post("/v1/chat/completions", dependencies=json_work, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    services = state(request).ready()
    if body.stream:
        chunks = await until_disconnected(request, services.chat_stream(body))
        return EventStreamResponse(_events(chunks), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return AsciiJSONResponse(await until_disconnected(request, services.chat(body)))


@router.post("/v1/critique", dependencies=json_work, responses=ERRORS)
async def critique(body: CritiqueRequest, request: Request) -> dict:
    return await until_disconnected(request, state(request).ready().critique(body))


@router.post("/v1/revise", dependencies=json_work, responses=ERRORS)
async def revise(body: ReviseRequest, request: Request) -> dict:
    return await until_disconnected(request, state(request).ready().revise(body))


@router.get("/v1/constitutions", dependencies=work, responses=ERRORS)
async def constitutions(request: Request) -> dict:
    return state(request).registry.describe()


@router.get("/v1/constitutions/{name}", dependencies=work, responses=ERRORS)
async def constitution(name: str, request: Request) -> dict:
    st = state(request)
    try:
        return st.registry.describe(name)
    except KeyError:
        raise NotFound(f"unknown constitution {name!r}; this server has: {', '.join(st.registry.names())}",
                       "name", "constitution_not_found") from None
