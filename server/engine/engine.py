"""The inference engine of the HTTP service: one worker thread owns the model(s); requests reach it through a
bounded queue and get their text back token by token, as it is decoded.

Threading. HTTP handlers run on the asyncio event loop and must never block it, and a model must not be driven by two
threads at once (the KV cache, the active adapter). So one worker thread does every forward pass. Handlers call
:meth:`Engine.submit` (thread-safe, never blocks unless asked to) or :meth:`Engine.stream`; the worker hands each
event back through the request's callback (:mod:`server.engine.delivery`: the one path events take). For asyncio
that callback posts to a :class:`~server.engine.delivery.Mailbox`: the worker never waits on the loop.

The parts, each in its module: the queue, admission and waves (:mod:`~server.engine.scheduler`); the running batch,
what each forward pass feeds (decode tokens and prefill chunks, :mod:`~server.engine.batch`) and the preallocated KV
cache it lives in (:mod:`~server.engine.slots`); each row's next token and log-probabilities
(:mod:`~server.engine.sampling`); each row's streamed text and stop strings (:mod:`~server.engine.detokenize`); the
base model and its adapters (:mod:`~server.engine.models`); the cai ``Backend`` over an engine
(:mod:`~server.engine.backend`). This module holds the public API and the worker loop that joins them.

Why a manual decode loop and not ``model.generate``: each row has its own temperature, top-p, seed and stop strings,
streams its own tokens, can be cancelled mid-way, and can join the batch late; ``generate`` gives one setting per call
and returns only at the end.

Failures: an exception inside a wave (a CUDA out-of-memory, say) ends that wave's requests with
``Done(finish_reason="error")`` and the worker goes on; if the worker loop itself dies, :attr:`Engine.error` says why,
every pending request ends with an error, and :meth:`Engine.submit` raises :class:`EngineStopped`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from cai.core.errors import ContextLengthError, Issue
from cai.core.prompts import Message
from cai.inference.batching import cache_argument
from server.engine.batch import Batch, TemplateHead
from server.engine.delivery import EventStream, Handle, Mailbox
from server.engine.detokenize import Detokenizer
from server.engine.models import load_models, use_model
from server.engine.request import Delta, Done, EngineStopped, Event, GenParams, Request, UnknownModel
from server.engine.sampling import pick, record_logprobs
from server.engine.scheduler import Scheduler

log = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1     # torch.Generator.manual_seed takes 64-bit seeds
_CANCEL_GRACE_S = 30.0         # seconds drain waits, after cancelling, for the worker's current step to end


class Engine:
    """One inference worker over a base model and any number of LoRA adapters (see the module docstring)."""

    MIN_HEAD = 8    # tokens: a shorter template head is not worth a cache
    MAX_STEP_TOKENS = 2048   # prompt tokens a step takes when no row is decoding (a longer prompt takes several)
    INITIAL_CAPACITY = 256   # columns per slot of the KV cache at first (it doubles when a row needs more)

    def __init__(self, model: str | None = "default", adapters: dict[str, str] | None = None, *,
                 device: str | None = None, max_batch: int = 16, queue_size: int = 64,
                 batch_window_s: float = 0.005, base_name: str = "base", dtype: str | None = None,
                 continuous: bool = True, prefill_chunk: int = 64, compile: bool | str = False,
                 quantize: str | None = None, prepack: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_window_s = batch_window_s
        self.base_name = base_name
        self.continuous = continuous            # admit waiting requests into a running wave
        self.prefill_chunk = prefill_chunk      # prompt tokens a decode step takes in (rows joining a running wave)
        if quantize == "int4" and dtype in (None, "auto"):
            dtype = "bfloat16"                  # the int4 kernel takes bf16 activations, whatever the CPU
        mode = "default" if compile is True else compile or None       # the compile mode (compiled.py), or None
        # prepacked bf16 weights (a second copy of each) only under --compile's default mode: eager steps are
        # dispatch-bound (no gain measured), and max-autotune freezes and prepacks the weights itself
        served = load_models(model, dict(adapters or {}), device, dtype, base_name, quantize,
                             prepack and mode == "default")
        base = served.base
        self.quantize = quantize if served.quantized_layers else None   # "int4": narrow inputs take 4-bit weights
        self.tokenizer, self.device = base.tokenizer, base.device
        self.dtype = str(base.lm.dtype).removeprefix("torch.")
        self.model_id, self.model_revision = base.model_id, base.revision
        self.context_length: int | None = base.context_length
        self.pad_id: int = self.tokenizer.pad_token_id
        self.eos_ids = base.eos_ids
        self._hidden_ids = set(self.eos_ids) | set(self.tokenizer.all_special_ids)   # never part of the text
        self.adapters: dict[str, str] = served.adapters   # adapter name -> its folder (resolved)
        self.model_names: list[str] = [base_name, *self.adapters]
        self._lm = base.lm                      # the transformers model (its config builds caches)
        self._peft = served.peft                # the PeftModel holding the adapters (None without)
        self._model = served.forward_model      # what forward passes go through
        from server.engine.slots import use_slot_attention

        use_slot_attention(self._lm, base.model_id)   # attention over the slot cache (slots.py)
        self._cache_argument = cache_argument(self._lm)
        self._cache: Any = None                 # the SlotCache, made at the first wave

        self._scheduler = Scheduler(max_batch, queue_size, batch_window_s)
        self._thread: threading.Thread | None = None
        self._text = Detokenizer(self.tokenizer)
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
        self._batch_sizes: Counter[int] = Counter()
        self.tokens_generated = 0
        # the chat template's fixed head (system prompt and the first role marker), which nearly every prompt starts
        # with: its keys/values are computed once per model and copied into each prefill instead of recomputed
        self.head: tuple[int, ...] = TemplateHead.find(self.encode, self.MIN_HEAD)
        self._head = TemplateHead(self.head, self._lm.config, self.device)
        self.compile_mode: str | None = mode      # default | max-autotune | None: how the decode step is compiled
        self._compiled: Any = None              # the compiled decode step (compiled.py), with compile=True
        if mode is not None:     # every served model's graphs, before any request (see compiled.py)
            from server.engine.compiled import CompiledDecode

            self._compiled = CompiledDecode.for_models(self._model, self._slot_cache, self._cache_argument,
                                                       self.device, mode, self.model_names,
                                                       partial(use_model, self._peft, base_name=base_name))

    # -- facts -------------------------------------------------------------------------------------------------

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the worker."""
        return len(self._scheduler.waiting)

    @property
    def in_flight(self) -> int:
        """Requests the worker has taken and not finished."""
        return len(self._scheduler.running)

    @property
    def error(self) -> str | None:
        """Why the worker died (None while it runs, or before it starts)."""
        return self._scheduler.error

    @property
    def batch_sizes(self) -> Counter[int]:
        """A snapshot: rows in each forward pass (prefills and decode steps) -> how many passes had that many."""
        with self._scheduler.lock:
            return Counter(self._batch_sizes)

    @property
    def compiled(self) -> list[str]:
        """The models whose decode step is compiled (none without ``compile=True``)."""
        return list(self._compiled.compiled_models) if self._compiled is not None else []

    @property
    def head_rows(self) -> int:
        """Rows whose prefill reused the template head (for tests and benchmarks)."""
        return self._head.rows

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

    # -- submitting ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (once). Requests submitted before wait in the queue until then."""
        with self._scheduler.lock:
            if self._scheduler.draining or self._scheduler.error:
                raise EngineStopped("the engine was stopped")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="cai-engine", daemon=True)
            self._thread.start()

    def check(self, model_name: str, messages: list[Message], params: GenParams,
              prompt_ids: list[int] | None = None) -> list[int]:
        """The prompt's token ids, after the checks :meth:`submit` makes before queueing: UnknownModel,
        ContextLengthError, ValueError for an empty prompt. ``prompt_ids``: ``encode(messages)``, if known."""
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
        return ids

    def submit(self, model_name: str, messages: list[Message], params: GenParams,
               on_event: Callable[[Event], None] | None = None, *, block: bool = False,
               timeout: float | None = None, prompt_ids: list[int] | None = None) -> Handle:
        """Queue a request; thread-safe. Raises UnknownModel, ContextLengthError, EngineStopped, or QueueFull (with
        ``block=True``: waits for a queue place instead, up to ``timeout`` seconds). ``on_event`` receives every event
        on the worker thread and must not block. ``prompt_ids``: ``encode(messages)``, if the caller has it already."""
        import torch

        ids = self.check(model_name, messages, params, prompt_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(model_name, ids, params, torch.Generator().manual_seed(seed & _SEED_MASK), on_event)
        self._scheduler.enqueue(request, block, timeout)
        return Handle(request, self._cancel)

    def stream(self, model_name: str, messages: list[Message], params: GenParams) -> EventStream:
        """Queue a request from the event loop and return its events as an async iterator.

        Every check happens here, synchronously, before any event: UnknownModel, ContextLengthError, QueueFull and
        EngineStopped are raised by this call (so a route can answer 4xx/503 before it starts a streamed response).
        Closing the iterator, cancelling the task reading it, or dropping it cancels the request."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        box = self.mailbox(asyncio.get_running_loop())
        return EventStream(self.submit(model_name, messages, params, partial(box.post, queue)), queue)

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        """The mailbox that carries events to ``loop``: one per loop, so the events of every request a decode step
        advances wake that loop once (thread-safe: the app's loop and another caller's may ask at once)."""
        with self._scheduler.lock:
            box = self._mailboxes.get(loop)
            if box is None:
                box = self._mailboxes[loop] = Mailbox(loop)
            return box

    def check_admission(self) -> None:
        """Raise what :meth:`submit` would raise now for a full queue or a stopped engine (EngineStopped, QueueFull),
        without queueing anything. A multi-stage job (the critique pipeline) calls it once before its first stage,
        so a busy server refuses it at once rather than after part of the work."""
        self._scheduler.check_admission()

    def _check_name(self, model_name: str) -> None:
        if model_name not in self.model_names:
            raise UnknownModel(model_name, self.model_names)

    # -- ending requests: the one way events leave the worker ------------------------------------------------

    def _cancel(self, request: Request) -> None:
        done = self._scheduler.cancel(request)
        if done is not None:           # a queued request ends here; a running one at the worker's next step
            self._deliver_done(request, done)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        done = self._scheduler.settle(request, reason, error)
        if done is not None:
            self._deliver_done(request, done)

    def _deliver_done(self, request: Request, done: Done) -> None:
        self._deliver(request, done)
        request.finished.set()

    def _deliver(self, request: Request, event: Event) -> None:
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
        with self._scheduler.lock:
            self._scheduler.stop()
            thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if not thread.is_alive():
                return
        for request in self._scheduler.pending():   # the worker never ran, or ran out of time
            self._cancel(request)
        if thread is not None:
            thread.join(_CANCEL_GRACE_S)   # it drops the cancelled rows at its next step and exits
            if thread.is_alive():
                log.warning("the inference worker did not stop within %.0f s of cancelling its requests",
                            _CANCEL_GRACE_S)

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
            for request in self._scheduler.fail(message):
                self._finish(request, "error", f"the inference worker failed: {message}")

    def _next_wave(self) -> list[Request] | None:
        """The requests of the next wave (see scheduler.py); None when the engine is stopping and nothing is left."""
        with self._scheduler.lock:     # held from choosing the model to taking the wave: the oldest request picks
            model = self._scheduler.wait_for_wave()
            return None if model is None else self._take(model, self.max_batch, skip_other_models=True)

    def _take(self, model: str, limit: int, skip_other_models: bool) -> list[Request]:
        return self._scheduler.take(model, limit, skip_other_models)

    def _run_wave(self, requests: list[Request]) -> None:
        """Decode a wave; if it fails, its requests end with an error and the worker goes on."""
        rows = list(requests)              # every request of the wave, the ones that join it later too
        failure = None
        try:
            with use_model(self._peft, requests[0].model, self.base_name):
                self._decode_wave(rows)
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            log.exception("a wave of %d requests failed", len(rows))
        if failure is not None:
            for request in rows:
                self._finish(request, "error", failure)
            self._free_device_memory()

    def _decode_wave(self, rows: list[Request]) -> None:
        model = rows[0].model
        batch = Batch(self._model, self._slot_cache(), self._head, self._cache_argument, self._compiled)
        batch.add(rows)
        while batch.rows:
            room = self.max_batch - len(batch.rows)
            if self.continuous and room > 0 and self._scheduler.waiting:
                joining = self._take(model, room, skip_other_models=False)
                if joining:
                    rows += joining
                    batch.add(joining)
            budget = min(self.prefill_chunk, self.MAX_STEP_TOKENS) if batch.decoding else self.MAX_STEP_TOKENS
            self._advance(batch, *batch.step(budget))

    def _slot_cache(self) -> Any:
        """The KV cache of every wave: max_batch slots, allocated on first use and kept (see slots.py)."""
        if self._cache is None:
            from server.engine.slots import SlotCache

            self._cache = SlotCache(self._lm.config, self.max_batch, self.INITIAL_CAPACITY, self._lm.dtype,
                                    self.device)
        return self._cache

    def _advance(self, batch: Batch, sampled: list[Request], logits: Any) -> None:
        """Sample a token for every row that got logits, stream its text, end the rows that are done (or cancelled)
        and let them go."""
        with self._scheduler.lock:
            self._batch_sizes[batch.passed] += 1
        if sampled:
            tokens = pick(sampled, logits)
            batch.feed(sampled, tokens)
            record_logprobs(sampled, logits, tokens, self._hidden_ids)
            for request, token in zip(sampled, tokens):
                if request.result is None and not request.cancelled:
                    reason = self._on_token(request, token)
                    if reason is not None:
                        self._finish(request, reason)
        for request in batch.rows:
            if request.cancelled and request.result is None:
                self._finish(request, "cancelled")
        batch.drop_ended()

    def _on_token(self, request: Request, token: int) -> str | None:
        """Take one decoded token of a row: stream what can be shown; the finish reason if the row is done."""
        request.n_tokens += 1
        self.tokens_generated += 1
        eos = token in self.eos_ids
        if not eos:
            request.ids.append(token)
        at_length = request.n_tokens >= request.params.max_tokens
        reason = "stop" if eos else "length" if at_length else None
        text, stopped = self._text.advance(request, final=reason is not None)
        if text:
            self._deliver(request, Delta(text, request.unsent_logprobs()))
        return "stop" if stopped else reason

    def _free_device_memory(self) -> None:
        import gc

        import torch

        if self.device.startswith("cuda") and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
