"""The queue in front of the worker: admission, waves, and the end of every request.

Admission. The queue is bounded (``queue_size``): beyond it a submit raises :class:`QueueFull`, which says when to
come back (recent request durations times the waves ahead), instead of letting latency grow without limit. A
draining, stopped or failed engine raises :class:`EngineStopped`. ``enqueue(block=True)`` waits for a place instead.

Waves. On a GPU (and on a CPU, less so) one forward pass over 16 rows costs little more than over one, so the worker
decodes many requests together. When it is free it takes every waiting request for one model (the oldest request's
model picks; others wait for the next wave), up to ``max_batch``, waiting up to ``batch_window_s`` after the first
arrival so that a burst gathers. A wave never mixes models.

Admission into a running wave (continuous batching). Between two decode steps the worker takes more requests for the
wave's model (``take(skip_other_models=False)``): the oldest waiting request keeps priority, so a request for another
model at the head of the queue stops admission, the wave runs out and the next one serves it.

Ending. A request ends exactly once: :meth:`Scheduler.settle` records its :class:`Done` under the lock and frees its
queue or in-flight place; the caller then delivers the Done (outside the lock). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque

from server.engine.request import Done, EngineStopped, QueueFull, Request


class Scheduler:
    """The waiting and running requests of one engine, and the lock that guards them (and every request's result).
    Thread-safe: HTTP threads enqueue and cancel, the worker thread takes and settles."""

    def __init__(self, max_batch: int, queue_size: int, batch_window_s: float):
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_window_s = batch_window_s
        self.lock = threading.Condition(threading.RLock())
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []      # taken by the worker and not ended
        self.draining = False                 # enqueue refuses new work
        self.stopping = False                 # the worker exits once the queue is empty
        self.error: str | None = None         # why the worker died
        self._durations: deque[float] = deque(maxlen=32)   # seconds from start to end of recent requests

    # -- admission ---------------------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """Raise what :meth:`enqueue` would raise now (EngineStopped, QueueFull), without queueing anything."""
        with self.lock:
            self._check_open()
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(self.retry_after(), len(self.waiting))

    def enqueue(self, request: Request, block: bool, timeout: float | None) -> None:
        """Queue ``request``; with ``block``, wait up to ``timeout`` seconds (None: forever) for a place."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while True:
                self._check_open()
                if len(self.waiting) < self.queue_size:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if not block or (left is not None and left <= 0):
                    raise QueueFull(self.retry_after(), len(self.waiting))
                self.lock.wait(left)
            request.submitted = time.monotonic()
            self.waiting.append(request)
            self.lock.notify_all()

    def _check_open(self) -> None:
        if self.error:
            raise EngineStopped(f"the inference worker failed: {self.error}")
        if self.draining:
            raise EngineStopped("the engine is shutting down")

    def retry_after(self) -> float:
        """Seconds until a queue place is likely free: recent request durations times the waves ahead (>= 1)."""
        per_request = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        waves_ahead = math.ceil((len(self.waiting) + 1) / self.max_batch)
        return max(1.0, round(per_request * waves_ahead, 1))

    # -- waves -------------------------------------------------------------------------------------------------

    def wait_for_wave(self) -> str | None:
        """Block until requests wait and a burst has gathered (up to ``batch_window_s`` after the oldest arrived, or
        until ``max_batch`` wait); the model of the next wave (the oldest request's). None when stopping and nothing
        is left. Call it with the lock held and take the wave before releasing it (so the model is the head's)."""
        with self.lock:
            while True:
                if not self.waiting:
                    if self.stopping:
                        return None
                    self.lock.wait()
                    continue
                if self.max_batch > 1 and not self.stopping:
                    deadline = self.waiting[0].submitted + self.batch_window_s
                    while 0 < len(self.waiting) < self.max_batch and not self.stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self.lock.wait(left)
                    if not self.waiting:      # all cancelled while gathering
                        continue
                return self.waiting[0].model

    def take(self, model: str, limit: int, skip_other_models: bool) -> list[Request]:
        """Move up to ``limit`` waiting requests for ``model`` to running (oldest first). Without
        ``skip_other_models`` it stops at the first request for another model, which keeps its priority."""
        with self.lock:
            taken: list[Request] = []
            for request in self.waiting:
                if len(taken) >= limit:
                    break
                if request.model == model:
                    taken.append(request)
                elif not skip_other_models:
                    break
            now = time.monotonic()
            for request in taken:
                self.waiting.remove(request)
                request.started = now
            self.running += taken
            if taken:
                self.lock.notify_all()        # queue places are free (blocking submitters wait on it)
            return taken

    # -- ending ------------------------------------------------------------------------------------------------

    def settle(self, request: Request, reason: str, error: str | None = None) -> Done | None:
        """Record a request's end; None if it had already ended. The caller delivers the Done."""
        with self.lock:
            if request.result is not None:
                return None
            if request.started is None:
                with contextlib.suppress(ValueError):
                    self.waiting.remove(request)
            else:
                with contextlib.suppress(ValueError):
                    self.running.remove(request)
                if reason in ("stop", "length"):
                    self._durations.append(time.monotonic() - request.started)
            request.result = request.done(reason, error)
            self.lock.notify_all()            # a queue or in-flight place is free (drain and block wait on it)
            return request.result

    def cancel(self, request: Request) -> Done | None:
        """Mark a request cancelled. A queued one ends here (its Done is returned for delivery); a running one ends
        at the worker's next step (None)."""
        with self.lock:
            if request.result is not None:
                return None
            request.cancelled = True
            return self.settle(request, "cancelled") if request.started is None else None

    def stop(self) -> None:
        """Refuse new work; the worker finishes what is queued and running, then exits."""
        with self.lock:
            self.draining = True
            self.stopping = True
            self.lock.notify_all()

    def fail(self, message: str) -> list[Request]:
        """The worker died: refuse everything from now on; the requests it leaves unfinished."""
        with self.lock:
            self.error = message
            return self.pending()

    def pending(self) -> list[Request]:
        with self.lock:
            return list(self.waiting) + list(self.running)
