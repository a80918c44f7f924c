"""The HTTP side of answering: JSON bodies as ASCII, server-sent events, and the client going away. Routes use these;
serving classes never see them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from server.errors import ClientDisconnected, GenerationFailed, UpstreamError, error_body


class AsciiJSONResponse(JSONResponse):
    """JSON as ASCII (``\\u`` escapes): a body can always be encoded, whatever text it carries."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def json_response(body: BaseModel, status_code: int = 200) -> AsciiJSONResponse:
    """A response model as an ASCII JSON response (for routes that set the status or the response themselves)."""
    return AsciiJSONResponse(body.model_dump(mode="json"), status_code=status_code)


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

    def __init__(self, events: AsyncIterator[BaseModel]):
        super().__init__(_sse_stream(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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


async def _sse_stream(events: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield _sse(event.model_dump(mode="json"))
    except (GenerationFailed, UpstreamError) as e:   # the status line is sent already: the error goes in the stream
        yield _sse(error_body(e)[1])
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()            # type: ignore[attr-defined]
    yield _sse("[DONE]")
