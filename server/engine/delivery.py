"""How a request's events reach its caller: one path.

The worker hands every event of a request (:class:`Delta` events, then one :class:`Done`) to the request's
``on_event`` callback, on the worker thread, and sets the request's ``finished`` flag after the Done; nothing else
carries events. The callback must never block the worker. Built on that one path:

- :class:`Handle`: what :meth:`Engine.submit` returns: cancel the request, or wait for its Done (``result``).
- :class:`Mailbox`: events to one asyncio event loop, coalesced: however many requests' events a decode step posts,
  the loop is woken once (``call_soon_threadsafe`` per event costs a wake-up each, and while the loop runs Python the
  worker waits for the GIL between its kernels). Posting once the loop is closed raises, and the engine then cancels
  the request (nobody will read the rest).
- :class:`EventStream`: the async iterator :meth:`Engine.stream` returns, reading one request's events from a mailbox.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import Any

from server.engine.request import Done, Event, Request


class Handle:
    """A submitted request: cancel it, or wait for its :class:`Done`. Events go to the ``on_event`` given to
    :meth:`Engine.submit` (called on the worker thread, so it must not block)."""

    def __init__(self, request: Request, cancel: Callable[[Request], None]):
        self._request = request
        self._cancel = cancel

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    @property
    def done(self) -> bool:
        return self._request.finished.is_set()

    def cancel(self) -> None:
        """Cancel the request (thread-safe; nothing happens if it has ended). A queued request ends at once, a
        running one at the worker's next decode step; either way it ends with ``Done(finish_reason="cancelled")``."""
        self._cancel(self._request)

    def result(self, timeout: float | None = None) -> Done:
        """Block until the request ends; raises TimeoutError after ``timeout`` seconds."""
        if not self._request.finished.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        assert self._request.result is not None
        return self._request.result


class Mailbox:
    """Events from the worker thread to one event loop, coalesced into one wake-up of the loop per burst. It holds
    the loop weakly: a mailbox outliving its loop (the engine keeps one per loop) does not keep it alive."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    @property
    def closed(self) -> bool:
        """Whether the loop is closed (or gone): nobody will read what is posted."""
        loop = self._loop()
        return loop is None or loop.is_closed()

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """On any thread. Raises RuntimeError once the loop is closed (the engine then cancels the request)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._pending.append((queue, item))
            wake = len(self._pending) == 1        # else a flush is scheduled and has not run yet: it takes this too
        if wake:
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class EventStream:
    """The async iterator :meth:`Engine.stream` returns: Delta events, then exactly one Done.

    Closing it (``aclose()``), cancelling the task that awaits it, or dropping it unfinished cancels the request."""

    def __init__(self, handle: Handle, queue: asyncio.Queue):
        self.handle = handle
        self._queue = queue
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:              # the consumer's task was cancelled: nobody will read the rest
            self._close()
            raise
        if isinstance(event, Done):
            self._closed = True
        return event

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handle.cancel()

    def __del__(self) -> None:
        if not self._closed:
            self.handle.cancel()
