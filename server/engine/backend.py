"""The cai :class:`~cai.backends.base.Backend` protocol over an engine and one of its models, so the server's critique
and revise routes run :class:`cai.generate.generator.Generator` through the same worker as chat completions. It uses
the engine's public API only (:meth:`Engine.check`, :meth:`Engine.submit`, :class:`Handle`).
"""

from __future__ import annotations

import threading

from cai.backends.base import Completion, Sampling
from cai.core.errors import ContextLengthError, Issue
from cai.core.prompts import Message
from server.engine.delivery import Handle
from server.engine.engine import Engine
from server.engine.request import Done, GenParams, QueueFull

_WAKE_S = 0.5   # how often a generate call waiting for a queue place looks whether it was cancelled


class EngineBackend:
    """``generate`` blocks: call it from a plain thread, never from the event loop. Row i of a batch is seeded with
    ``seed + i``; when the queue is full it waits for room rather than failing.

    :meth:`cancel` (from any thread: the HTTP handler whose client went away) cancels the requests of the call in
    progress and every later call at once: their completions come back as errors (``Completion.error``), so the
    pipeline running in the blocked thread drops its record and returns within a decode step, instead of running
    every remaining stage for nobody."""

    name = "server"

    def __init__(self, engine: Engine, model_name: str | None = None):
        self.engine = engine
        self.model_name = model_name or engine.base_name
        self.model = engine.model_label(self.model_name)
        self.model_revision = engine.model_revision
        self.context_length = engine.context_length
        self._lock = threading.Lock()
        self._cancelled = False
        self._handles: list[Handle] = []        # of the generate call in progress

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            handles = list(self._handles)
        for h in handles:
            h.cancel()

    def count_tokens(self, messages: list[Message]) -> int:
        return self.engine.count_tokens(messages)

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        if not batch:
            return []
        params = [GenParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p, seed=seed + i) for i in range(len(batch))]
        prompts: list[list[int]] = []
        issues: list[Issue] = []
        for i, (conversation, p) in enumerate(zip(batch, params)):   # check every row before queueing any
            try:
                prompts.append(self.engine.check(self.model_name, conversation, p))
            except ContextLengthError as e:
                issues.append(Issue(f"conversation {i} of the batch: {e.message}"))
        if issues:
            raise ContextLengthError("prompt does not fit the model's context", issues)
        handles: list[Handle] = []
        results: list[Handle | Done] = []
        try:
            for conversation, p, ids in zip(batch, params, prompts):
                with self._lock:
                    if self._cancelled:
                        break
                handle = self._submit(conversation, p, ids)
                if handle is None:             # cancelled while it waited for a queue place: never queued
                    results.append(Done("cancelled", len(ids), 0, ""))
                    continue
                handles.append(handle)
                results.append(handle)
                with self._lock:
                    self._handles.append(handle)
                    cancelled = self._cancelled
                if cancelled:                  # cancel() ran between the submit and the registration above
                    handle.cancel()
            dones = [r.result() if isinstance(r, Handle) else r for r in results]
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        finally:
            with self._lock:
                self._handles = []
        completions = [_completion(done) for done in dones]
        missing = len(batch) - len(completions)          # rows never queued because the call was cancelled
        return completions + [Completion("", 0, 0, "error", error="the request was cancelled")] * missing

    def _submit(self, conversation: list[Message], params: GenParams, ids: list[int]) -> Handle | None:
        """Queue one row, waiting for a queue place as long as it takes; None if the call is cancelled meanwhile."""
        while True:
            try:
                return self.engine.submit(self.model_name, conversation, params, block=True, timeout=_WAKE_S,
                                          prompt_ids=ids)
            except QueueFull:
                if self._cancelled:
                    return None


def _completion(done: Done) -> Completion:
    if done.finish_reason in ("stop", "length"):
        # stripped like LocalBackend's, so records from either backend compare equal
        return Completion(done.text.strip(), done.prompt_tokens, done.completion_tokens, done.finish_reason)
    message = done.error or f"the request was {done.finish_reason}"
    return Completion("", done.prompt_tokens, done.completion_tokens, "error", error=message)
