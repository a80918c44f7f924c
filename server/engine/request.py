"""What one request to the engine is: its parameters (:class:`GenParams`), the events it produces (:class:`Delta`
events, then exactly one :class:`Done`; with :class:`TokenLogprob` entries when asked), the errors submitting it can
raise, and its state inside the engine (:class:`Request`).

Nothing here imports torch: the HTTP layer imports these types at start-up, before any model is loaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Errors a submit raises


class QueueFull(Exception):
    """The request queue is full; ``retry_after`` (seconds, at least 1) estimates when a place frees up."""

    def __init__(self, retry_after: float, depth: int):
        super().__init__(f"the server is busy: {depth} requests are waiting; retry in about {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The engine takes no more requests: it is draining, stopped, or its worker died (see ``Engine.error``)."""


class UnknownModel(ValueError):
    """A model name the engine does not serve."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown model {name!r}; this server has: {', '.join(known)}")
        self.name = name


# ---------------------------------------------------------------------------------------------------------------
# Parameters and events


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()      # the text ends before the first of these; finish_reason "stop"
    seed: int | None = None         # per-request RNG seed; None draws a random one
    logprobs: int | None = None     # None: none; k >= 0: each token's log-probability and its k likeliest alternatives

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (0 <= self.temperature <= 10):
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be at least 0, got {self.logprobs}")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its log-probability under the model (the logits before temperature and top-p),
    and the ``GenParams.logprobs`` likeliest tokens with theirs, likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str                       # new text since the last event (never empty)
    logprobs: tuple[TokenLogprob, ...] = ()   # the tokens decoded since the last event (with GenParams.logprobs)


@dataclass(frozen=True)
class Done:
    finish_reason: str              # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int          # tokens decoded, the end-of-sequence token included
    text: str                       # the whole completion: every Delta's text, concatenated
    error: str | None = None
    # with GenParams.logprobs: every token of the text, i.e. decoded and not special (with a stop string: up to the
    # token that completed it)
    logprobs: tuple[TokenLogprob, ...] | None = None


Event = Delta | Done


# ---------------------------------------------------------------------------------------------------------------
# A request inside the engine


class Request:
    """One submitted request. ``result`` is set once, under the scheduler's lock; the fields under "decoding state"
    belong to the worker thread (:mod:`server.engine.detokenize` and :mod:`server.engine.sampling` write them)."""

    def __init__(self, model: str, prompt_ids: list[int], params: GenParams, generator: Any,
                 on_event: Callable[[Event], None] | None):
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator            # torch.Generator (CPU) for this request's draws
        self.on_event = on_event              # where its events go (called on the worker thread: never blocks)
        self.submitted = time.monotonic()
        self.started: float | None = None     # when the worker took it (None: still queued)
        self.cancelled = False                # set by any thread; the worker drops the row at its next step
        self.result: Done | None = None       # set once, under the scheduler's lock
        self.finished = threading.Event()     # set once the Done has been delivered
        # decoding state
        self.ids: list[int] = []              # generated tokens, the end-of-sequence token excluded
        self.n_tokens = 0                     # tokens decoded, the end-of-sequence token included
        self.text = ""                        # decoded text so far (complete characters)
        self.sent = 0                         # characters of text already delivered as Delta events
        self.prefix_offset = 0                # ids[prefix_offset:read_offset] decode to the last emitted text
        self.read_offset = 0
        self.logprobs: list[TokenLogprob] = []  # with params.logprobs: one per token of ids
        self.logprobs_sent = 0                # of them, delivered in Delta events

    def unsent_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The log-probabilities not yet delivered, marked as delivered (they go with the next Delta)."""
        new = tuple(self.logprobs[self.logprobs_sent:])
        self.logprobs_sent = len(self.logprobs)
        return new

    def done(self, reason: str, error: str | None = None) -> Done:
        """The Done this request ends with: the text delivered so far, the tokens decoded."""
        return Done(reason, len(self.prompt_ids), self.n_tokens, self.text[:self.sent], error,
                    tuple(self.logprobs) if self.params.logprobs is not None else None)
