"""The inference worker of the HTTP service: one thread owns the model(s); requests reach it through a bounded queue
and get their text back token by token, as it is decoded.

Threading. HTTP handlers run on the asyncio event loop and must never block it, and a model must not be driven by two
threads at once (the KV cache, the active adapter). So one worker thread does every forward pass. Handlers call
:meth:`Engine.submit` (thread-safe, never blocks unless asked to) or :meth:`Engine.stream`; the worker hands each
event (:class:`Delta`, then one :class:`Done`) back through a per-request callback. For asyncio that callback is
``loop.call_soon_threadsafe(queue.put_nowait, event)``: the worker never waits on the loop. The request queue is
bounded (``queue_size``): beyond it, :class:`QueueFull` tells the client when to come back, instead of letting
latency grow without limit.

Wave batching. On a GPU (and on a CPU, less so) one forward pass over 16 rows costs little more than over one, so the
worker decodes many requests together. When it is free it takes every waiting request for one model (the oldest
request's model picks; others wait for the next wave), up to ``max_batch``, waiting up to ``batch_window_s`` after the
first arrival so that a burst gathers. Prompts are left-padded to one width and prefilled in one forward pass, with
position ids taken from the attention mask (pads never shift a row's positions), then every live row gets one token per
step from a shared ``DynamicCache``. A wave never mixes models: base requests run with the adapters disabled, adapter
requests with their adapter set.

Admission into a running wave (continuous batching). Between two decode steps, requests waiting for the wave's model
are prefilled on their own and merged into the running batch: both caches are left-padded with zero keys/values (and
mask zeros) to one length and concatenated along the batch. The oldest waiting request keeps priority: a request for
another model at the head of the queue stops admission, so the wave runs out and the next one serves it.

Why a manual decode loop and not ``model.generate``: each row has its own temperature, top-p, seed and stop strings,
streams its own tokens, can be cancelled mid-way, and can join the batch late; ``generate`` gives one setting per call
and returns only at the end. Finished rows (end of sequence, stop string, ``max_tokens``, cancelled) are dropped from
the batch and the cache at the next step, and cache columns that no remaining row attends to are trimmed, so a
finished row costs nothing and its batch place is free at once.

Per-row sampling: temperature 0 is argmax (the same tokens as ``generate(do_sample=False)``); otherwise softmax of
logits / temperature, restricted to the top-p nucleus, sampled by inverse CDF with one uniform draw from the row's own
``torch.Generator``: the same seed, prompt and settings give the same text whatever else shares the batch (up to the
floating-point noise of batched kernels).

Log-probabilities (``GenParams.logprobs`` = k): for the rows that ask, each step's log_softmax of the raw logits gives
the picked token's log-probability and the k likeliest tokens'; rows that do not ask cost nothing. They travel with
the Delta that shows the token's text, and all of them with the Done.

Streaming text is detokenized incrementally: each step decodes a short window of the row's tokens (the last complete
characters and what followed), and shows the new suffix once it ends in a complete character (a partial UTF-8
sequence decodes to U+FFFD and is held back). With stop strings, the last ``len(longest stop) - 1`` characters are
held back until it is known they do not begin one. The deltas of a request concatenate exactly to its ``Done.text``.

Failures: an exception inside a wave (a CUDA out-of-memory, say) ends that wave's requests with
``Done(finish_reason="error")`` and the worker goes on; if the worker loop itself dies, :attr:`Engine.error` says why,
every pending request ends with an error, and :meth:`Engine.submit` raises :class:`EngineStopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.backends.base import Completion, Sampling
from cai.core.errors import ContextLengthError, Issue, ModelError
from cai.core.prompts import Message
from cai.inference.loading import load_chat_model

log = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"   # what a partial UTF-8 sequence decodes to
_SEED_MASK = (1 << 64) - 1     # torch.Generator.manual_seed takes 64-bit seeds
_TOP_K = 1024                  # nucleus search starts within the top k tokens (see _sample)
_CANCEL_GRACE_S = 30.0         # seconds drain waits, after cancelling, for the worker's current step to end


# ---------------------------------------------------------------------------------------------------------------
# Errors, parameters, events


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
# Requests and their handles


class _Request:
    """One submitted request. The fields under "decoding state" belong to the worker thread."""

    def __init__(self, model: str, prompt_ids: list[int], params: GenParams, generator: Any,
                 on_event: Callable[[Event], None] | None):
        self.model = model
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator            # torch.Generator (CPU) for this request's draws
        self.on_event = on_event
        self.submitted = time.monotonic()
        self.started: float | None = None     # when the worker took it (None: still queued)
        self.cancelled = False                # set by any thread; the worker drops the row at its next step
        self.result: Done | None = None       # set once, under the engine lock
        self.finished = threading.Event()
        # decoding state
        self.ids: list[int] = []              # generated tokens, the end-of-sequence token excluded
        self.n_tokens = 0                     # tokens decoded, the end-of-sequence token included
        self.text = ""                        # decoded text so far (complete characters)
        self.sent = 0                         # characters of text already delivered as Delta events
        self.prefix_offset = 0                # ids[prefix_offset:read_offset] decode to the last emitted text
        self.read_offset = 0
        self.logprobs: list[TokenLogprob] = []  # with params.logprobs: one per token of ids
        self.logprobs_sent = 0                # of them, delivered in Delta events


class Handle:
    """A submitted request: cancel it, or wait for its :class:`Done`. Events go to the ``on_event`` given to
    :meth:`Engine.submit` (called on the worker thread, so it must not block)."""

    def __init__(self, engine: Engine, request: _Request):
        self._engine = engine
        self._request = request

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    @property
    def done(self) -> bool:
        return self._request.finished.is_set()

    def cancel(self) -> None:
        """Cancel the request (thread-safe; nothing happens if it has ended). A queued request ends at once, a
        running one at the worker's next decode step; either way it ends with ``Done(finish_reason="cancelled")``."""
        self._engine._cancel(self._request)

    def result(self, timeout: float | None = None) -> Done:
        """Block until the request ends; raises TimeoutError after ``timeout`` seconds."""
        if not self._request.finished.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        assert self._request.result is not None
        return self._request.result


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


# ---------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Wave:
    """The rows being decoded together, and their tensors (all on the model's device)."""

    rows: list[_Request]
    cache: Any        # transformers DynamicCache; keys/values [rows, kv heads, cache length, head dim]
    mask: Any         # [rows, cache length] long: 1 where the row has a real token, 0 for padding
    pos: Any          # [rows] long: position id of the token fed next (= real tokens of the row so far)
    last: Any         # [rows] long: the token fed next (the last one sampled)


class Engine:
    """One inference worker over a base model and any number of LoRA adapters (see the module docstring)."""

    def __init__(self, model: str | None = "default", adapters: dict[str, str] | None = None, *,
                 device: str | None = None, max_batch: int = 16, queue_size: int = 64,
                 batch_window_s: float = 0.005, base_name: str = "base", dtype: str | None = None,
                 continuous: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_window_s = batch_window_s
        self.base_name = base_name
        self.continuous = continuous            # admit waiting requests into a running wave
        self.adapters: dict[str, str] = {}      # adapter name -> its folder (resolved)
        self._load(model, dict(adapters or {}), device, dtype)
        self.model_names: list[str] = [base_name, *self.adapters]

        self._cond = threading.Condition(threading.RLock())   # guards the queue, counters and request results
        self._waiting: deque[_Request] = deque()
        self._in_flight = 0
        self._active: list[_Request] = []       # requests of the wave being decoded (worker thread only)
        self._draining = False                  # submit refuses new work
        self._stop = False                      # the worker exits once the queue is empty
        self._thread: threading.Thread | None = None
        self._batch_sizes: Counter[int] = Counter()
        self._durations: deque[float] = deque(maxlen=32)   # seconds from start to end of recent requests
        self.tokens_generated = 0
        self.error: str | None = None
        # the chat template's fixed head (system prompt and the first role marker), which nearly every prompt starts
        # with: its keys/values are computed once per model and copied into each prefill instead of recomputed
        self.head: tuple[int, ...] = self._template_head()
        self._heads: dict[str, Any] = {}        # model name -> DynamicCache of the head (batch 1)
        self.head_rows = 0                      # rows whose prefill reused the head (for tests and benchmarks)

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self, model: str | None, adapters: dict[str, str], device: str | None, dtype: str | None) -> None:
        loaded = load_chat_model(model, device, dtype)
        lm = loaded.lm
        self.tokenizer, self.device = loaded.tokenizer, loaded.device
        self.dtype = str(lm.dtype).removeprefix("torch.")
        self.model_id, self.model_revision = loaded.model_id, loaded.revision
        self.pad_id: int = self.tokenizer.pad_token_id
        self.eos_ids = loaded.eos_ids
        self._hidden_ids = set(self.eos_ids) | set(self.tokenizer.all_special_ids)   # never part of the text
        self.context_length: int | None = loaded.context_length
        self._lm = lm           # the transformers model (its config builds caches)
        self._model = lm        # what forward passes go through: the model, or the PeftModel around it
        self._peft: Any = None
        for name, folder in adapters.items():
            self._load_adapter(name, folder)
        if self._peft is not None:
            self._peft.eval()
            self._model = self._peft

    def _load_adapter(self, name: str, folder: str) -> None:
        import json

        if not name or name == self.base_name or "." in name:
            raise ModelError(f"adapter name {name!r} is not allowed: it must be non-empty, without '.', and not "
                             f"{self.base_name!r} (the base model's name)")
        path = Path(folder).expanduser()
        config_file = path / "adapter_config.json"
        if not path.is_dir():
            raise ModelError(f"adapter {name!r}: folder {folder} does not exist",
                             hint="Give the folder that training wrote, e.g. runs/<name>/adapters/sft.")
        if not config_file.exists():
            raise ModelError(f"adapter {name!r}: {folder} has no adapter_config.json (not a PEFT adapter folder)",
                             hint="Give the folder that training wrote, e.g. runs/<name>/adapters/sft.")
        try:
            peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
        except (OSError, ValueError) as e:
            raise ModelError(f"adapter {name!r}: cannot read {config_file}: {e}") from None
        if peft_type not in (None, "LORA"):
            raise ModelError(f"adapter {name!r} in {folder} is a {peft_type} adapter; only LoRA adapters can be "
                             "served")
        try:
            from peft import PeftModel

            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._lm, str(path), adapter_name=name)
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
        except Exception as e:   # peft raises many kinds (shape mismatch, missing weights, bad config)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"adapter {name!r}: cannot load {folder} onto {self.model_id}: {first}",
                             hint="The adapter must have been trained on this base model.") from None
        self.adapters[name] = str(path.resolve())

    # -- facts -------------------------------------------------------------------------------------------------

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the worker."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Requests the worker has taken and not finished."""
        return self._in_flight

    @property
    def batch_sizes(self) -> Counter[int]:
        """A snapshot: rows in each forward pass (prefills and decode steps) -> how many passes had that many."""
        with self._cond:
            return Counter(self._batch_sizes)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def model_label(self, model_name: str) -> str:
        """What provenance records as the model: the base model id, plus the adapter folder for an adapter."""
        self._check_name(model_name)
        return self.model_id if model_name == self.base_name else f"{self.model_id}+{self.adapters[model_name]}"

    def render(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def encode(self, messages: list[Message]) -> list[int]:
        """The prompt's token ids: the chat template rendered with the generation prompt, tokenized."""
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    MIN_HEAD = 8    # tokens: a shorter head is not worth a cache

    def _template_head(self) -> tuple[int, ...]:
        """The tokens one-user-message prompts start with (what differently starting prompts share), less one so a
        prompt always has a token of its own after it. A prompt whose first characters merge with the head's last
        token differently simply does not use it (checked per prefill)."""
        probes = [self.encode([{"role": "user", "content": c}]) for c in ("a", "zz", "Hi", "The 1", " x", "\n?")]
        n = 0
        while n < min(map(len, probes)) - 1 and all(p[n] == probes[0][n] for p in probes):
            n += 1
        return tuple(probes[0][:n]) if n >= self.MIN_HEAD else ()

    # -- submitting ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once). Requests submitted before wait in the queue until then."""
        with self._cond:
            if self._draining or self.error:
                raise EngineStopped("the engine was stopped")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="cai-engine", daemon=True)
            self._thread.start()

    def submit(self, model_name: str, messages: list[Message], params: GenParams,
               on_event: Callable[[Event], None] | None = None, *, block: bool = False,
               timeout: float | None = None, prompt_ids: list[int] | None = None) -> Handle:
        """Queue a request; thread-safe. Raises UnknownModel, ContextLengthError, EngineStopped, or QueueFull (with
        ``block=True``: waits for a queue place instead, up to ``timeout`` seconds). ``on_event`` receives every event
        on the worker thread and must not block. ``prompt_ids``: ``encode(messages)``, if the caller has it already."""
        request = self._prepare(model_name, messages, params, on_event, prompt_ids)
        self._enqueue(request, block, timeout)
        return Handle(self, request)

    def stream(self, model_name: str, messages: list[Message], params: GenParams) -> EventStream:
        """Queue a request from the event loop and return its events as an async iterator.

        Every check happens here, synchronously, before any event: UnknownModel, ContextLengthError, QueueFull and
        EngineStopped are raised by this call (so a route can answer 4xx/503 before it starts a streamed response).
        Closing the iterator, cancelling the task reading it, or dropping it cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)   # raises once the loop is closed: request cancelled

        return EventStream(self.submit(model_name, messages, params, on_event), queue)

    def check_admission(self) -> None:
        """Raise what :meth:`submit` would raise now for a full queue or a stopped engine (EngineStopped, QueueFull),
        without queueing anything. A multi-stage job (the critique pipeline) calls it once before its first stage,
        so a busy server refuses it at once rather than after part of the work."""
        with self._cond:
            if self.error:
                raise EngineStopped(f"the inference worker failed: {self.error}")
            if self._draining:
                raise EngineStopped("the engine is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(self._retry_after(), len(self._waiting))

    def _check_name(self, model_name: str) -> None:
        if model_name not in self.model_names:
            raise UnknownModel(model_name, self.model_names)

    def _prepare(self, model_name: str, messages: list[Message], params: GenParams,
                 on_event: Callable[[Event], None] | None, prompt_ids: list[int] | None = None) -> _Request:
        import torch

        self._check_name(model_name)
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(messages)
        if not ids:
            raise ValueError("the prompt is empty")
        if self.context_length and len(ids) + params.max_tokens > self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} it needs "
                f"{len(ids) + params.max_tokens}, the model's context is {self.context_length}",
                [Issue(f"shorten the conversation or lower max_tokens to at most "
                       f"{max(self.context_length - len(ids), 0)}")])
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed & _SEED_MASK)
        return _Request(model_name, ids, params, generator, on_event)

    def _enqueue(self, request: _Request, block: bool, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.error:
                    raise EngineStopped(f"the inference worker failed: {self.error}")
                if self._draining:
                    raise EngineStopped("the engine is shutting down")
                if len(self._waiting) < self.queue_size:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if not block or (left is not None and left <= 0):
                    raise QueueFull(self._retry_after(), len(self._waiting))
                self._cond.wait(left)
            request.submitted = time.monotonic()
            self._waiting.append(request)
            self._cond.notify_all()

    def _retry_after(self) -> float:
        """Seconds until a queue place is likely free: recent request durations times the waves ahead (>= 1)."""
        per_request = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        waves_ahead = math.ceil((len(self._waiting) + 1) / self.max_batch)
        return max(1.0, round(per_request * waves_ahead, 1))

    # -- ending requests -------------------------------------------------------------------------------------

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            if request.result is not None:
                return
            request.cancelled = True
            done = self._settle(request, "cancelled") if request.started is None else None
        if done is not None:           # a queued request ends here; a running one at the worker's next step
            self._deliver_done(request, done)

    def _settle(self, request: _Request, reason: str, error: str | None = None) -> Done | None:
        """Record a request's end (with the lock held); None if it had already ended. Deliver the result after."""
        if request.result is not None:
            return None
        if request.started is None:
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)
        else:
            self._in_flight -= 1
            if reason in ("stop", "length"):
                self._durations.append(time.monotonic() - request.started)
        request.result = Done(reason, len(request.prompt_ids), request.n_tokens, request.text[:request.sent],
                              error, tuple(request.logprobs) if request.params.logprobs is not None else None)
        self._cond.notify_all()        # a queue place or an in-flight place is free (drain and block wait on it)
        return request.result

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        with self._cond:
            done = self._settle(request, reason, error)
        if done is not None:
            self._deliver_done(request, done)

    def _deliver_done(self, request: _Request, done: Done) -> None:
        self._deliver(request, done)
        request.finished.set()

    def _deliver(self, request: _Request, event: Event) -> None:
        if request.on_event is None:
            return
        try:
            request.on_event(event)
        except Exception as e:         # the consumer is gone (its event loop closed): stop working for it
            log.debug("dropping a request whose consumer failed: %s", e)
            request.cancelled = True

    # -- draining ----------------------------------------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> None:
        """Stop taking requests (submit raises EngineStopped), finish every queued and running one, stop the worker.
        After ``timeout`` seconds whatever is left is cancelled (it ends with finish_reason "cancelled"). Blocks: from
        the event loop (a lifespan shutdown) call it through ``asyncio.to_thread``."""
        with self._cond:
            self._draining = True
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if not thread.is_alive():
                return
        self._cancel_all()             # the worker never ran, or ran out of time
        if thread is not None:
            thread.join(_CANCEL_GRACE_S)   # it drops the cancelled rows at its next step and exits
            if thread.is_alive():
                log.warning("the inference worker did not stop within %.0f s of cancelling its requests",
                            _CANCEL_GRACE_S)

    def _cancel_all(self) -> None:
        with self._cond:
            pending = list(self._waiting) + list(self._active)
        for request in pending:
            self._cancel(request)

    # -- the worker --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while (requests := self._next_wave()) is not None:
                    self._run_wave(requests)
        except BaseException as e:     # the loop itself failed: nothing more will run
            message = f"{type(e).__name__}: {e}"
            log.exception("the inference worker died")
            with self._cond:
                self.error = message
                pending = list(self._waiting) + list(self._active)
            for request in pending:
                self._finish(request, "error", f"the inference worker failed: {message}")

    def _next_wave(self) -> list[_Request] | None:
        """Block until requests wait; gather a burst for up to batch_window_s; take up to max_batch of them, all for
        the oldest request's model. None when the engine is stopping and nothing is left."""
        with self._cond:
            while True:
                if not self._waiting:
                    if self._stop:
                        return None
                    self._cond.wait()
                    continue
                if self.max_batch > 1 and not self._stop:
                    deadline = self._waiting[0].submitted + self.batch_window_s
                    while 0 < len(self._waiting) < self.max_batch and not self._stop:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if not self._waiting:      # all cancelled while gathering
                        continue
                return self._take(self._waiting[0].model, self.max_batch, skip_other_models=True)

    def _take(self, model: str, limit: int, skip_other_models: bool) -> list[_Request]:
        """Move up to ``limit`` waiting requests for ``model`` to in-flight (oldest first; lock held). Without
        ``skip_other_models`` it stops at the first request for another model, which keeps its priority."""
        taken: list[_Request] = []
        for request in self._waiting:
            if len(taken) >= limit:
                break
            if request.model == model:
                taken.append(request)
            elif not skip_other_models:
                break
        now = time.monotonic()
        for request in taken:
            self._waiting.remove(request)
            request.started = now
        self._in_flight += len(taken)
        if taken:
            self._cond.notify_all()            # queue places are free (blocking submitters wait on it)
        return taken

    def _run_wave(self, requests: list[_Request]) -> None:
        """Decode a wave; if it fails, its requests end with an error and the worker goes on."""
        self._active = list(requests)
        failure = None
        try:
            with self._model_for(requests[0].model):
                self._decode_wave(requests)
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            log.exception("a wave of %d requests failed", len(self._active))
        if failure is not None:
            for request in self._active:
                self._finish(request, "error", failure)
            self._free_device_memory()
        self._active = []

    def _model_for(self, model: str) -> contextlib.AbstractContextManager:
        if self._peft is None:
            return contextlib.nullcontext()
        if model == self.base_name:
            return self._peft.disable_adapter()
        self._peft.set_adapter(model, inference_mode=True)
        return contextlib.nullcontext()

    def _decode_wave(self, requests: list[_Request]) -> None:
        model = requests[0].model
        wave = self._compact(self._prefill(requests))
        while wave.rows:
            room = self.max_batch - len(wave.rows)
            if self.continuous and room > 0 and self._waiting and _plain_cache(wave.cache):
                with self._cond:
                    joining = self._take(model, room, skip_other_models=False)
                if joining:
                    self._active += joining
                    newcomers = self._compact(self._prefill(joining))
                    if newcomers.rows:
                        wave = _merge(wave, newcomers)
            self._step(wave)
            wave = self._compact(wave)

    def _prefill(self, requests: list[_Request]) -> _Wave:
        """One forward pass over the left-padded prompts; samples each row's first token. When every prompt starts
        with the template head, its cached keys/values are copied into each row and only the rest is computed:
        rows are laid out [head][padding][own tokens], positions count real tokens only."""
        import copy

        import torch
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in requests]
        h = len(self.head)
        if not (h and all(n > h and tuple(r.prompt_ids[:h]) == self.head for r, n in zip(requests, lengths))):
            h = 0
        width = max(lengths) - h
        ids = torch.tensor([[self.pad_id] * (width - (n - h)) + r.prompt_ids[h:] for r, n in zip(requests, lengths)],
                           device=self.device)                                     # [rows, width]
        tail = torch.tensor([[0] * (width - (n - h)) + [1] * (n - h) for n in lengths], device=self.device)
        position_ids = h + (tail.cumsum(-1) - 1).clamp(min=0)                      # pads never shift positions
        if h:
            cache = copy.deepcopy(self._head_cache(requests[0].model))
            cache.batch_repeat_interleave(len(requests))
            mask = torch.cat([torch.ones(len(requests), h, dtype=tail.dtype, device=self.device), tail], dim=1)
            self.head_rows += len(requests)
        else:
            cache, mask = DynamicCache(config=self._lm.config), tail
        logits = self._forward(ids, mask, position_ids, cache)
        wave = _Wave(list(requests), cache, mask, torch.tensor(lengths, device=self.device), None)
        self._advance(wave, logits)
        return wave

    def _head_cache(self, model: str) -> Any:
        """The template head's keys/values under ``model`` (an adapter changes them), computed on first use."""
        import torch
        from transformers import DynamicCache

        if model not in self._heads:
            cache = DynamicCache(config=self._lm.config)
            ids = torch.tensor([self.head], device=self.device)
            self._model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            self._heads[model] = cache
        return self._heads[model]

    def _step(self, wave: _Wave) -> None:
        """One decode step: feed every row its last token, sample the next."""
        import torch

        mask = torch.cat([wave.mask, torch.ones_like(wave.mask[:, :1])], dim=1)   # [rows, cache length + 1]
        logits = self._forward(wave.last[:, None], mask, wave.pos[:, None], wave.cache)
        wave.mask = mask
        wave.pos = wave.pos + 1
        self._advance(wave, logits)

    def _forward(self, ids: Any, mask: Any, position_ids: Any, cache: Any) -> Any:
        """Logits of the last position, [rows, vocab] float32; the cache grows by ids.shape[1] columns."""
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _advance(self, wave: _Wave, logits: Any) -> None:
        """Sample a token for every row, stream its text, end the rows that are done."""
        import torch

        with self._cond:
            self._batch_sizes[len(wave.rows)] += 1
        tokens = self._pick(wave.rows, logits)
        wave.last = torch.tensor(tokens, device=self.device)
        self._record_logprobs(wave.rows, logits, tokens)
        for request, token in zip(wave.rows, tokens):
            if request.result is None and not request.cancelled:
                reason = self._on_token(request, token)
                if reason is not None:
                    self._finish(request, reason)

    def _compact(self, wave: _Wave) -> _Wave:
        """End cancelled rows; drop every ended row from the batch and the cache; trim cache columns (on the left)
        that no remaining row attends to."""
        import torch

        for request in wave.rows:
            if request.cancelled and request.result is None:
                self._finish(request, "cancelled")
        keep = [i for i, r in enumerate(wave.rows) if r.result is None]
        if len(keep) == len(wave.rows):
            return wave
        if not keep:
            return _Wave([], None, None, None, None)
        index = torch.tensor(keep, device=self.device)
        wave.cache.batch_select_indices(index)
        wave.rows = [wave.rows[i] for i in keep]
        wave.mask, wave.pos, wave.last = wave.mask[index], wave.pos[index], wave.last[index]
        if _plain_cache(wave.cache):
            first = int(wave.mask.any(dim=0).int().argmax())   # the first column some row attends to
            if first > 0:
                for layer in wave.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                wave.mask = wave.mask[:, first:]
        return wave

    # -- sampling and text -----------------------------------------------------------------------------------

    def _pick(self, rows: list[_Request], logits: Any) -> list[int]:
        """The next token of every row: argmax for temperature 0, else a top-p draw with the row's generator."""
        import torch

        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
            probs = torch.softmax(logits[index] / temperature[:, None], dim=-1).cpu()   # [sampled rows, vocab]
            for j, i in enumerate(sampled):
                tokens[i] = _sample(probs[j], rows[i].params.top_p, rows[i].generator)
        return tokens

    def _record_logprobs(self, rows: list[_Request], logits: Any, tokens: list[int]) -> None:
        """For the rows that asked: the picked token's log-probability and the top alternatives. Special tokens (the
        end-of-sequence one among them) are not part of the text and get none."""
        import torch

        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None and tokens[i] not in self._hidden_ids
                 and r.result is None and not r.cancelled]
        if not asked:
            return
        index = torch.tensor(asked, device=logits.device)
        logp = torch.log_softmax(logits[index], dim=-1)                      # [asked rows, vocab] float32
        k = max(rows[i].params.logprobs or 0 for i in asked)
        top_lp, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in asked], device=logits.device))[:, 0].tolist()
        top_lps, top_tokens = top_lp.tolist(), top_ids.tolist()
        for j, i in enumerate(asked):
            n = rows[i].params.logprobs
            rows[i].logprobs.append(TokenLogprob(tokens[i], chosen[j], tuple(zip(top_tokens[j][:n], top_lps[j][:n]))))

    def _on_token(self, request: _Request, token: int) -> str | None:
        """Take one decoded token of a row: stream what can be shown; the finish reason if the row is done."""
        request.n_tokens += 1
        self.tokens_generated += 1
        eos = token in self.eos_ids
        if not eos:
            request.ids.append(token)
        at_length = request.n_tokens >= request.params.max_tokens
        reason = "stop" if eos else "length" if at_length else None
        self._detokenize(request, final=reason is not None)
        stops = request.params.stop
        if stops:
            # Text only grows at its end, and len(longest stop) - 1 characters are held back: a stop string can
            # only begin in the part not yet sent.
            found = [i for s in stops if (i := request.text.find(s, request.sent)) >= 0]
            if found:
                request.text = request.text[:min(found)]
                reason = "stop"
        hold = 0 if reason is not None or not stops else max(map(len, stops)) - 1
        visible = len(request.text) - hold
        if visible > request.sent:
            new = tuple(request.logprobs[request.logprobs_sent:])
            request.logprobs_sent = len(request.logprobs)
            self._deliver(request, Delta(request.text[request.sent:visible], new))
            request.sent = visible
        return reason

    def _detokenize(self, request: _Request, final: bool) -> None:
        """Extend request.text with the new tokens' text. Decodes a short window (the tokens behind the last emitted
        text, for context, and the new ones) so a step costs the same at token 10 and token 2000; text ending in a
        partial UTF-8 character waits for the next token (unless this is the last)."""
        ids = request.ids
        decode = self.tokenizer.decode
        before = decode(ids[request.prefix_offset:request.read_offset], skip_special_tokens=True)
        now = decode(ids[request.prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith(_REPLACEMENT_CHAR)):
            request.text += now[len(before):]
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)

    # -- failures ----------------------------------------------------------------------------------------------

    def _free_device_memory(self) -> None:
        import gc

        import torch

        if self.device.startswith("cuda") and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Cache and sampling helpers


def _plain_cache(cache: Any) -> bool:
    """Whether every layer of the cache is a plain full-attention DynamicLayer (keys/values we may pad and trim);
    sliding-window and other layers keep their own bookkeeping, so waves over them are neither merged nor trimmed."""
    from transformers.cache_utils import DynamicLayer

    return cache is not None and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


def _merge(wave: _Wave, other: _Wave) -> _Wave:
    """One wave of both waves' rows: caches and masks left-padded to one length (zero keys/values, mask 0) and
    concatenated along the batch. Positions are per row, so padding changes nothing a row attends to."""
    import torch

    width = max(wave.mask.shape[1], other.mask.shape[1])

    def pad(t: Any, dim: int) -> Any:     # left-pad tensor t with zeros to `width` along dim
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for mine, theirs in zip(wave.cache.layers, other.cache.layers):
        mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
        mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
    return _Wave(wave.rows + other.rows, wave.cache, torch.cat([pad(wave.mask, 1), pad(other.mask, 1)], dim=0),
                 torch.cat([wave.pos, other.pos]), torch.cat([wave.last, other.last]))


def _sample(probs: Any, top_p: float, generator: Any) -> int:
    """Draw a token from probs [vocab] (float32, CPU) restricted to the top-p nucleus, by inverse CDF with one
    uniform draw from ``generator``. The nucleus is looked for among the top k tokens first (a full sort of a 50k
    vocabulary costs more than the rest of the step on a CPU); the distribution sampled is exactly top-p's."""
    import torch

    u = float(torch.rand((), generator=generator))
    if top_p >= 1.0:
        cdf = probs.cumsum(0)
        pick = int(torch.searchsorted(cdf, u * cdf[-1:], right=True))
        return min(pick, probs.shape[0] - 1)
    top, ids = probs.topk(min(_TOP_K, probs.shape[0]))                  # descending
    if float(top.sum()) < top_p:                                        # the nucleus is wider than k (rare)
        top, ids = probs.sort(descending=True)
    before = top.cumsum(0) - top                                        # mass ranked above each token
    n = max(1, int((before < top_p).sum()))                             # smallest prefix whose mass reaches top_p
    cdf = top[:n].cumsum(0)
    j = min(int(torch.searchsorted(cdf, u * cdf[-1:], right=True)), n - 1)
    return int(ids[j])


# ---------------------------------------------------------------------------------------------------------------
# The cai Backend over an engine


class EngineBackend:
    """The cai :class:`~cai.backends.base.Backend` protocol over an engine and one of its models, so the server's
    critique and revise routes run :class:`cai.generate.generator.Generator` through the same worker as chat
    completions.

    ``generate`` blocks: call it from a plain thread, never from the event loop. Row i of a batch is seeded with
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
        requests: list[_Request] = []
        issues: list[Issue] = []
        for i, conversation in enumerate(batch):   # check every row before queueing any (like LocalBackend)
            params = GenParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, seed=seed + i)
            try:
                requests.append(self.engine._prepare(self.model_name, conversation, params, None))
            except ContextLengthError as e:
                issues.append(Issue(f"conversation {i} of the batch: {e.message}"))
        if issues:
            raise ContextLengthError("prompt does not fit the model's context", issues)
        handles: list[Handle] = []
        try:
            for request in requests:
                with self._lock:
                    if self._cancelled:
                        break
                self._enqueue_cancellable(request)
                handle = Handle(self.engine, request)
                handles.append(handle)
                with self._lock:
                    self._handles.append(handle)
                    cancelled = self._cancelled
                if cancelled:                  # cancel() ran between the enqueue and the registration above
                    handle.cancel()
            results = [h.result() for h in handles]
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        finally:
            with self._lock:
                self._handles = []
        completions = [_completion(done) for done in results]
        missing = len(batch) - len(completions)          # rows never queued because the call was cancelled
        return completions + [Completion("", 0, 0, "error", error="the request was cancelled")] * missing

    def _enqueue_cancellable(self, request: _Request) -> None:
        """Wait for a queue place (like ``_enqueue(block=True)``), waking every half second to see whether the
        call was cancelled meanwhile (then the request is never queued and ends as cancelled)."""
        while True:
            try:
                self.engine._enqueue(request, block=True, timeout=0.5)
                return
            except QueueFull:
                if self._cancelled:
                    request.cancelled = True
                    request.result = Done("cancelled", len(request.prompt_ids), 0, "")
                    request.finished.set()
                    return


def _completion(done: Done) -> Completion:
    if done.finish_reason in ("stop", "length"):
        # stripped like LocalBackend's, so records from either backend compare equal
        return Completion(done.text.strip(), done.prompt_tokens, done.completion_tokens, done.finish_reason)
    message = done.error or f"the request was {done.finish_reason}"
    return Completion("", done.prompt_tokens, done.completion_tokens, "error", error=message)


__all__ = ["Delta", "Done", "Engine", "EngineBackend", "EngineStopped", "EventStream", "GenParams", "Handle",
           "QueueFull", "TokenLogprob", "UnknownModel"]
