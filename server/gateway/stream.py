"""A streamed chat completion from an upstream (``"stream": true``): opened on one endpoint, then relayed event by
event as the upstream sends them.

Everything that can go wrong before the first event (a refused connection, a 5xx or 429, a body that is not an
event stream, no first event within the timeout) happens inside :func:`open_stream`, which the openai backend's
:meth:`~cai.backends.openai.OpenAIBackend.call` retries on another endpoint and at last turns into a failure with a
status: the client's response has not started yet. After the first event the status line is sent; a failure then
(the connection broken, the stream quiet for the timeout, an event that is not a chunk) raises
:class:`~server.errors.UpstreamError` from the iterator, and the route ends the stream with an error event and
``[DONE]``. Closing the stream (the client went away) closes the upstream connection, which is how an upstream
learns to stop generating.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from pydantic import ValidationError

from cai.backends.openai import BAD_RESPONSE, TIMEOUT, UNREACHABLE, Endpoint, OpenAIBackend, Retryable
from server.errors import UpstreamError
from server.gateway.http import BrokenConnection, Pool, Response, bounded
from server.gateway.protocol import UpstreamChunk

DONE = "[DONE]"


class BadEvent(ValueError):
    """An event that is not a chat completion chunk (or an error event from the upstream)."""


def parse_event(data: str) -> UpstreamChunk | None:
    """One event's data as a chunk; None for ``[DONE]``. Raises BadEvent."""
    if data.strip() == DONE:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        raise BadEvent(f"an event that is not JSON: {data[:200]!r}") from None
    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
        error = obj["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise BadEvent(f"the upstream sent an error: {str(message)[:300]}")
    try:
        return UpstreamChunk.model_validate(obj)
    except ValidationError as e:
        raise BadEvent(f"an event that is not a chat completion chunk: {e.errors()[0]['msg']}") from None


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event (its ``data:`` lines joined), as they arrive."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


async def open_stream(backend: OpenAIBackend, pool: Pool, ep: Endpoint, body: dict,
                      timeout: float) -> UpstreamStream:
    """POST a streamed request to one endpoint and read its first event within ``timeout`` (the ``send`` of
    ``backend.call``)."""
    payload = json.dumps(body).encode()
    response: Response | None = None

    async def first_event() -> tuple[AsyncIterator[str], UpstreamChunk]:
        nonlocal response
        response = r = await pool.request("POST", "/chat/completions", payload, accept="text/event-stream")
        ctype = r.headers.get("content-type", "")
        if r.status >= 300 or not ctype.startswith("text/event-stream"):
            text = (await r.read()).decode("utf-8", "replace")
            backend.check_status(ep, r.status, r.headers, text)            # raises for a 4xx or 5xx
            raise Retryable(f"HTTP {r.status} {ctype or 'without a content type'}, not an event stream: "
                            f"{text[:200]!r}", kind=BAD_RESPONSE)
        events = sse_data(r.lines())
        try:
            first = parse_event(await events.__anext__())
        except StopAsyncIteration:
            first = None
        except BadEvent as e:
            raise Retryable(str(e), kind=BAD_RESPONSE) from None
        if first is None:
            raise Retryable("the stream ended before its first chunk", kind=BAD_RESPONSE)
        return events, first

    try:
        events, first = await bounded(first_event(), timeout)
    except BaseException as e:
        if response is not None:
            await response.aclose()
        if isinstance(e, asyncio.TimeoutError):
            raise Retryable(f"no first event within {timeout:g}s", endpoint_down=True, kind=TIMEOUT) from None
        if isinstance(e, BrokenConnection):
            raise Retryable(str(e), endpoint_down=True, kind=UNREACHABLE) from None
        raise
    assert response is not None
    return UpstreamStream(ep, response, events, first, timeout)


class UpstreamStream:
    """The chunks of one upstream stream, the first one already read. Iterate it once; ``aclose`` (or the end of
    the iteration) closes the connection. Counts as an outstanding request of its endpoint while open, so the
    least-outstanding choice sees streams too."""

    def __init__(self, ep: Endpoint, response: Response, events: AsyncIterator[str], first: UpstreamChunk,
                 timeout: float):
        self.ep, self._response, self._events, self._first, self._timeout = ep, response, events, first, timeout
        self._open = True
        ep.outstanding += 1

    def __aiter__(self) -> AsyncIterator[UpstreamChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[UpstreamChunk]:
        chunk: UpstreamChunk | None = self._first
        finished = False
        try:
            while chunk is not None:
                finished = finished or any(c.finish_reason for c in chunk.choices)
                yield chunk
                chunk = await self._next(finished)
        finally:
            await self.aclose()

    async def _next(self, finished: bool) -> UpstreamChunk | None:
        # a stream quiet for the timeout has its connection cut by a timer (cheaper than a wait_for, which makes a
        # task for every chunk): the read then fails, and the flag says why
        quiet: list[bool] = []

        def cut() -> None:
            quiet.append(True)
            self._response.abort()

        timer = asyncio.get_running_loop().call_later(self._timeout, cut)
        try:
            data = await self._events.__anext__()
        except StopAsyncIteration:
            if finished and not quiet:    # ended without [DONE] after its last chunk: some servers do
                return None
            if quiet:
                raise UpstreamError(TIMEOUT, f"the upstream's stream went quiet for {self._timeout:g} s") from None
            raise UpstreamError(UNREACHABLE, "the upstream's stream ended before the answer did") from None
        except BrokenConnection as e:
            if quiet:
                raise UpstreamError(TIMEOUT, f"the upstream's stream went quiet for {self._timeout:g} s") from None
            raise UpstreamError(UNREACHABLE, f"the connection to the upstream broke mid-stream ({e})") from None
        finally:
            timer.cancel()
        try:
            return parse_event(data)
        except BadEvent as e:
            raise UpstreamError(BAD_RESPONSE, str(e)) from None

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self.ep.outstanding -= 1
            await self._response.aclose()
