"""What the HTTP routes do, without HTTP: chat completions (plain, streamed, or run through critique→revise), the
critique and revise stages, the model and constitution listings. Nothing here imports FastAPI; the routes
(``server/routes.py``) parse the wire schemas, call one method, and turn the result (a JSON-ready dict, or an async
iterator of chunk dicts) into a response. Failures are the exceptions below (and the engine's ``UnknownModel``,
``QueueFull``, ``EngineStopped``, cai's ``ContextLengthError``); ``server/errors.py`` maps each to an HTTP status in
one function.

One implementation of the stages. Critique and revise prompts always come from :mod:`cai.core.prompts` and run through
:class:`cai.generate.generator.Generator` over :class:`~server.engine.EngineBackend`, so a record from ``/v1/revise``
is the record ``cai generate`` would write for the same conversation, constitution, sampling and model (in the same
dtype: ``cai serve --dtype auto`` is bf16 on a CPU with bf16 in hardware, ``cai generate`` fp32). An answer that
already exists (the ``response`` of ``/v1/revise``, or the chat answer of the ``constitution`` extension) is handed to
the Generator through a :class:`~cai.generate.generator.MemoryStageCache` pre-seeded under the respond stage's key: the
Generator finds its first stage answered and goes on with the rounds, with no second code path.

User text is data. Every message (and ``response``) goes through :class:`SpecialTokenFilter` before it reaches the
chat template: a special-token string typed by a user (``<|im_end|>``) gets a zero-width space after its first
character, so it tokenizes as plain text and can never close a turn or open a new role. The chat template renders
message contents as Jinja data, never as template source.

Blocking work (tokenizing a long prompt, a Generator run that waits on the engine) runs in worker threads, never on
the event loop. A caller that goes away cancels its asyncio task: engine requests are cancelled (the streams' and
handles' ``cancel``), and a pipeline running in a thread is stopped through :meth:`EngineBackend.cancel`.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

from cai.backends.base import Completion, Sampling
from cai.core.constitution import Constitution
from cai.core.prompt_files import PromptItem, item_from_row
from cai.core.prompts import Message, critique_messages, respond_messages
from cai.core.record import Record
from cai.generate.generator import (
    Generator,
    MemoryStageCache,
    Plan,
    check_output,
    draw_principles,
    record_key,
    stage_key,
)
from server.constitutions import ConstitutionRegistry
from server.engine import Delta, Done, Engine, EngineBackend, Event, GenParams, Handle, TokenLogprob, UnknownModel
from server.protocol import ChatCompletionRequest, ChatMessage, CritiqueRequest, ReviseRequest
from server.settings import Limits, lineage

ZWSP = "\u200b"   # zero-width space: breaks a special-token string without a visible change


# ---------------------------------------------------------------------------------------------------------------
# Errors (HTTP statuses are chosen in server/errors.py)


class InvalidRequest(ValueError):
    """The caller asked for something this server will not do (400). ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class ContextTooLong(InvalidRequest):
    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param, "context_length_exceeded")


class NotFound(LookupError):
    """A named thing (constitution) this server does not have (404)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class GenerationFailed(RuntimeError):
    """The engine could not finish a request (a failed wave, a shutdown that ran out of time): the server's
    problem, not the caller's (5xx)."""


# ---------------------------------------------------------------------------------------------------------------
# User text


class SpecialTokenFilter:
    """Neutralises special-token strings in user text: a zero-width space goes after the first character of every
    occurrence of the tokenizer's special tokens and markup-like added tokens (those without whitespace), so the
    tokenizer reads them as ordinary characters. Inserting a character can never create a new occurrence (no
    special token contains U+200B), so one pass is enough."""

    def __init__(self, tokenizer: Any):
        strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            content = getattr(token, "content", "")
            if getattr(token, "special", False) or (content and not any(c.isspace() for c in content)):
                strings.add(content)
        self.tokens = sorted((s for s in strings if len(s) >= 2), key=len, reverse=True)   # longest first
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: m[0][0] + ZWSP + m[0][1:], text)


# ---------------------------------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Revision:
    """The critique→revise settings of a request (the chat extension, /v1/revise)."""

    constitution: Constitution
    principles: tuple[str, ...] | None     # one per round; None: drawn per prompt, as `cai generate` draws them
    rounds: int


@dataclass
class ChatJob:
    """A validated chat completion, ready to submit: one GenParams per choice."""

    id: str
    model: str
    messages: list[Message]
    params: list[GenParams]
    prompt_ids: list[int]           # the rendered, tokenized conversation (tokenized once, here)
    revision: Revision | None = None
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class _Choices:
    """The engine requests of one chat completion (one per choice), their events merged into one asyncio queue as
    (choice index, event). Ending the iteration early, or cancelling the task reading it, cancels every request."""

    def __init__(self, handles: list[Handle], queue: asyncio.Queue):
        self.handles, self.queue = handles, queue

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        remaining = len(self.handles)
        try:
            while remaining:
                i, event = await self.queue.get()
                if isinstance(event, Done):
                    remaining -= 1
                yield i, event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


class _Mailbox:
    """Events from the worker thread to one event loop, coalesced: however many requests' events a decode step
    posts, the loop is woken once (``call_soon_threadsafe`` per event costs a wake-up of the loop each, and while
    the loop runs Python the worker waits for the GIL between its kernels)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """On any thread. Raises RuntimeError once the loop is closed (the engine then cancels the request)."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._pending.append((queue, item))
            wake = len(self._pending) == 1        # else a flush is scheduled and has not run yet: it takes this too
        if wake:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)



def _post(box: _Mailbox, queue: asyncio.Queue, index: int, deltas: bool, event: Event) -> None:
    # on the worker thread. A whole (unstreamed) completion needs only its Done: no event per token
    if deltas or isinstance(event, Done):
        box.post(queue, (index, event))
    elif box.loop.is_closed():
        raise RuntimeError("the event loop is closed")   # nobody will read the answer: the engine cancels it


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-ins byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen) writes its tokens' bytes in -> byte."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for chr(256 + n) in byte order
    printable = [b for b in range(256) if chr(b) in alphabet]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_bytes(tokenizer: Any, token: int) -> bytes | None:
    """The bytes one token stands for: exact for byte-level BPE tokenizers and SentencePiece byte tokens
    (``<0xE9>``); None where the tokenizer's tokens are not bytes (the caller falls back to the decoded text)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(piece, str):
        return None
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):
        return bytes([int(m.group(1), 16)])
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        alphabet = _byte_level_alphabet()
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
    return None


# ---------------------------------------------------------------------------------------------------------------
# The services


class Services:
    """Everything the routes call. ``on_usage(model, prompt_tokens, completion_tokens)`` is told the usage of every
    answered request (the metrics)."""

    def __init__(self, engine: Engine, registry: ConstitutionRegistry, limits: Limits,
                 manifests: dict[str, dict | None] | None = None,
                 on_usage: Callable[[str, int, int], None] | None = None):
        self.engine = engine
        self.registry = registry
        self.limits = limits
        self.manifests = manifests or {}
        self.on_usage = on_usage or (lambda model, prompt, completion: None)
        self.neutralise = SpecialTokenFilter(engine.tokenizer)
        self.started = int(time.time())
        self._mailbox: _Mailbox | None = None     # the engine's events to the event loop of the requests
        self._tokens: dict[int, tuple[str, list[int]]] = {}   # token id -> (text, bytes), for logprobs

    def _mailbox_for(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox

    # -- listings ----------------------------------------------------------------------------------------------

    def models(self) -> dict:
        e = self.engine
        data = [{"id": e.base_name, "object": "model", "created": self.started, "owned_by": "cai",
                 "cai": {"kind": "base", "model": e.model_id, "revision": e.model_revision,
                         "context_length": e.context_length}}]
        for name, folder in e.adapters.items():
            data.append({"id": name, "object": "model", "created": self.started, "owned_by": "cai",
                         "cai": {"kind": "adapter", "path": folder, "base_model": e.model_id,
                                 "manifest": lineage(self.manifests.get(name))}})
        return {"object": "list", "data": data}

    def constitutions(self) -> dict:
        return self.registry.describe()

    def constitution_info(self, name: str) -> dict:
        try:
            return self.registry.describe(name)
        except KeyError:
            raise self._no_constitution(name) from None

    # -- chat completions ---------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest) -> dict:
        """A whole chat completion (``stream`` is ignored: see :meth:`chat_stream`)."""
        job = await asyncio.to_thread(self.prepare_chat, req)
        return await self._complete(job)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict]:
        """The chunks of a streamed chat completion. Everything that can refuse the request (validation, a full
        queue, a stopped engine) raises here, before the first chunk, so the route can still answer 4xx/503.
        With the critique→revise extension the final revision is only known at the end: it comes as one chunk."""
        job = await asyncio.to_thread(self.prepare_chat, req)
        if job.revision is not None:
            return _chunks_of(await self._complete(job), job.include_usage)
        choices = await self._start(job, deltas=True)
        return self._stream(job, choices)

    def prepare_chat(self, req: ChatCompletionRequest) -> ChatJob:
        """Validate against this server's model and limits (blocking: it tokenizes)."""
        e = self.engine
        if req.model not in e.model_names:
            raise UnknownModel(req.model, e.model_names)
        if not 1 <= req.n <= self.limits.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.limits.max_n} on this server, got {req.n}", "n")
        messages = self._messages(req.messages)
        prompt_ids = e.encode(messages)
        prompt_tokens = len(prompt_ids)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.token_limit, prompt_tokens, param)
        revision = None
        if req.constitution is not None:
            revision = self._revision(req.constitution, req.principles, req.rounds)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [GenParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=req.stops,
                            seed=None if req.seed is None else req.seed + i, logprobs=logprobs)
                  for i in range(req.n)]
        job = ChatJob("chatcmpl-" + secrets.token_hex(12), req.model, messages, params, prompt_ids, revision,
                      include_usage=bool(req.stream_options and req.stream_options.include_usage))
        if revision is not None:       # refuse a conversation the pipeline cannot take before answering it
            item = self._item(messages)
            backend = EngineBackend(e, req.model)
            plan = self._plan(item, revision, backend, self._extension_sampling(job, 0))
            self._check_context(revision, backend, plan, self._extension_sampling(job, 0))
        return job

    async def _start(self, job: ChatJob, deltas: bool) -> _Choices:
        """Submit every choice (in a thread: submitting may block on the engine's lock). If this task is cancelled
        meanwhile, what was submitted is cancelled when the submission ends. ``deltas``: whether the events include
        the text as it is decoded (streaming), or only each choice's Done."""
        loop = asyncio.get_running_loop()
        box = self._mailbox_for(loop)
        queue: asyncio.Queue = asyncio.Queue()

        def submit() -> list[Handle]:
            handles: list[Handle] = []
            try:
                for i, params in enumerate(job.params):
                    handles.append(self.engine.submit(job.model, job.messages, params,
                                                      partial(_post, box, queue, i, deltas),
                                                      prompt_ids=job.prompt_ids))
            except BaseException:
                for h in handles:
                    h.cancel()
                raise
            return handles

        future = loop.run_in_executor(None, submit)
        try:
            handles = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_cancel_handles)
            raise
        return _Choices(handles, queue)

    async def _complete(self, job: ChatJob) -> dict:
        choices = await self._start(job, deltas=False)
        dones: dict[int, Done] = {}
        async for i, event in choices.events():
            if isinstance(event, Done):
                dones[i] = event
        for done in dones.values():
            _check_done(done)
        results = [dones[i] for i in range(len(job.params))]
        usage = {"prompt_tokens": job.prompt_tokens,
                 "completion_tokens": sum(d.completion_tokens for d in results)}
        extensions: list[dict | None] = [None] * len(results)
        texts = [d.text for d in results]
        if job.revision is not None:
            records = await asyncio.gather(*(self._revise_answer(job, i, d) for i, d in enumerate(results)))
            usage = {"prompt_tokens": sum(r.usage["prompt_tokens"] for r in records),
                     "completion_tokens": sum(r.usage["completion_tokens"] for r in records)}
            texts = [r.final for r in records]
            extensions = [_extension_field(r) for r in records]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.on_usage(job.model, usage["prompt_tokens"], usage["completion_tokens"])
        out_choices = []
        for i, (done, text) in enumerate(zip(results, texts)):
            choice = {"index": i, "message": {"role": "assistant", "content": text},
                      "logprobs": self._logprobs(done.logprobs), "finish_reason": done.finish_reason}
            if extensions[i] is not None:
                choice["cai"] = extensions[i]
            out_choices.append(choice)
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                "choices": out_choices, "usage": usage}

    async def _stream(self, job: ChatJob, choices: _Choices) -> AsyncIterator[dict]:
        def chunk(choices_: list[dict], **extra: Any) -> dict:
            return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                    "choices": choices_, **extra}

        completion_tokens = 0
        with_logprobs = job.params[0].logprobs is not None
        sent = [0] * len(job.params)               # per choice: token log-probabilities sent so far
        try:
            for i in range(len(job.params)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for i, event in choices.events():
                if isinstance(event, Delta):
                    part = {"index": i, "delta": {"content": event.text}, "finish_reason": None}
                    if with_logprobs:
                        part["logprobs"] = self._logprobs(event.logprobs)
                        sent[i] += len(event.logprobs)
                    yield chunk([part])
                    continue
                _check_done(event)
                completion_tokens += event.completion_tokens
                part = {"index": i, "delta": {}, "finish_reason": event.finish_reason}
                if with_logprobs:        # the tokens no Delta carried (text held back, then cut by a stop string)
                    part["logprobs"] = self._logprobs((event.logprobs or ())[sent[i]:])
                yield chunk([part])
        finally:
            choices.cancel()
        self.on_usage(job.model, job.prompt_tokens, completion_tokens)
        if job.include_usage:
            yield chunk([], usage={"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": job.prompt_tokens + completion_tokens})

    def _logprobs(self, tokens: tuple[TokenLogprob, ...] | None) -> dict | None:
        """OpenAI's ``logprobs`` object of a choice (or of a streamed chunk): ``{"content": [...]}``."""
        if tokens is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            text, raw = self._token_text(token)
            # -9999 stands for -inf (and NaN), as OpenAI's API does: JSON has neither
            return {"token": text, "logprob": logprob if math.isfinite(logprob) else -9999.0, "bytes": raw}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in tokens]}

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        """A token's text and its bytes (cached: a vocabulary is bounded). A token that holds part of a UTF-8
        character decodes to U+FFFD; its bytes are the real ones, so a client can join them into the character."""
        known = self._tokens.get(token)
        if known is None:
            text = self.engine.tokenizer.decode([token])
            raw = token_bytes(self.engine.tokenizer, token)
            known = self._tokens[token] = (text, list(raw if raw is not None else text.encode("utf-8")))
        return known

    # -- the extension: critique→revise on each chat answer ----------------------------------------------------

    def _extension_sampling(self, job: ChatJob, index: int) -> Sampling:
        p = job.params[index]
        return Sampling(temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_tokens,
                        seed=p.seed if p.seed is not None else 0)

    async def _revise_answer(self, job: ChatJob, index: int, answer: Done) -> Record:
        assert job.revision is not None
        backend = EngineBackend(self.engine, job.model)
        sampling = self._extension_sampling(job, index)
        completion = Completion(answer.text.strip(), answer.prompt_tokens, answer.completion_tokens,
                                answer.finish_reason)
        return await self._in_thread(backend, self._run_pipeline, backend, self._item(job.messages), job.revision,
                                     sampling, completion)

    # -- critique and revise -----------------------------------------------------------------------------------

    async def critique(self, req: CritiqueRequest) -> dict:
        """Critique ``response`` against each principle named (or one drawn, as `cai generate` would draw it for
        this conversation and seed). One batched engine call, with the prompts of
        :func:`cai.core.prompts.critique_messages`."""
        c = self._constitution(req.constitution)
        model = req.model or self.engine.base_name
        backend = self._backend(model)
        item = self._item(self._messages(req.messages))
        sampling = self._sampling(req)
        ids = self._principles(c, req.principles) if req.principles else draw_principles(c, item.id, sampling.seed, 1)
        response = self.neutralise(req.response)
        batch = [critique_messages(c, item.messages, response, c.principle(pid)) for pid in ids]
        self.engine.check_admission()
        completions = await self._in_thread(backend, backend.generate, batch, sampling, sampling.seed)
        critiques = []
        for pid, comp in zip(ids, completions):
            if comp.error is not None:
                raise GenerationFailed(comp.error)
            p = c.principle(pid)
            critiques.append({"principle": pid, "principle_sha256": p.sha256, "critique": comp.text,
                              "finish_reason": comp.finish_reason, "flags": check_output(comp, [p.critique])})
        usage = {"prompt_tokens": sum(x.prompt_tokens for x in completions),
                 "completion_tokens": sum(x.completion_tokens for x in completions)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self.on_usage(model, usage["prompt_tokens"], usage["completion_tokens"])
        return {"object": "critique", "model": model, "prompt_id": item.id,
                "constitution": {"name": c.name, "version": c.version, "sha256": c.sha256},
                "critiques": critiques, "sampling": sampling.to_dict(), "usage": usage}

    async def revise(self, req: ReviseRequest) -> dict:
        """The whole pipeline on one conversation: the record `cai generate` writes (``response``, when given, is
        the initial answer instead of a generated one)."""
        c = self._constitution(req.constitution)
        model = req.model or self.engine.base_name
        backend = self._backend(model)
        revision = self._revision(c.name, req.principles, req.rounds)
        item = self._item(self._messages(req.messages))
        sampling = self._sampling(req)
        plan = self._plan(item, revision, backend, sampling)
        self._check_context(revision, backend, plan, sampling)
        answer = None
        if req.response is not None:
            answer = Completion(self.neutralise(req.response).strip(), 0, 0, "stop")
        self.engine.check_admission()
        record = await self._in_thread(backend, self._run_pipeline, backend, item, revision, sampling, answer)
        self.on_usage(model, record.usage["prompt_tokens"], record.usage["completion_tokens"])
        return record.to_json()

    # -- the pipeline ------------------------------------------------------------------------------------------

    def _run_pipeline(self, backend: EngineBackend, item: PromptItem, revision: Revision, sampling: Sampling,
                      answer: Completion | None) -> Record:
        """One record through cai.generate.generator.Generator (blocking; in a worker thread). A given ``answer``
        pre-seeds the stage cache under the respond stage's key, so the Generator takes it as its first stage's
        output."""
        gen = Generator(revision.constitution, backend, rounds=revision.rounds, sampling=sampling)
        plan = self._plan(item, revision, backend, sampling)
        cache = MemoryStageCache()
        if answer is not None:
            cache.put([(stage_key(backend, sampling, respond_messages(item.messages)), "respond", answer)])
        failures: list[str] = []
        records = gen.run_batch([plan], on_error=lambda _p, stage, rnd, message: failures.append(
            f"{stage} (round {rnd}): {message}"), cache=cache)
        if not records:
            if backend.cancelled:
                raise asyncio.CancelledError()
            raise GenerationFailed("; ".join(failures) or "the pipeline produced no record")
        return records[0]

    def _plan(self, item: PromptItem, revision: Revision, backend: EngineBackend, sampling: Sampling) -> Plan:
        gen = Generator(revision.constitution, backend, rounds=revision.rounds, sampling=sampling)
        if revision.principles is None:
            return gen.plan([item])[0]
        return Plan(item, revision.principles,
                    record_key(item, revision.constitution, revision.principles, backend, sampling))

    def _check_context(self, revision: Revision, backend: EngineBackend, plan: Plan, sampling: Sampling) -> None:
        gen = Generator(revision.constitution, backend, rounds=revision.rounds, sampling=sampling)
        issues, _ = gen.context_issues([plan])
        if issues:
            issue = next(iter(issues.values()))
            raise ContextTooLong(issue.message.replace(f"prompt {plan.item.id!r}", "the conversation"))

    async def _in_thread(self, backend: EngineBackend, fn: Callable, *args: Any) -> Any:
        """Run blocking pipeline work in a thread; if the caller goes away, stop it through the backend."""
        try:
            return await asyncio.to_thread(fn, *args)
        except asyncio.CancelledError:
            backend.cancel()
            raise

    # -- validation helpers ------------------------------------------------------------------------------------

    def _messages(self, messages: list[ChatMessage]) -> list[Message]:
        return [{"role": m.role, "content": self.neutralise(m.text)} for m in messages]

    def _item(self, messages: list[Message]) -> PromptItem:
        """The conversation as the pipeline takes it (and as a prompt file row would be read: same checks, same
        content-hash id)."""
        try:
            return item_from_row({"messages": messages}, "request")
        except ValueError as e:
            raise InvalidRequest(f"for critique and revision, {e}", "messages") from None

    def _backend(self, model: str) -> EngineBackend:
        if model not in self.engine.model_names:
            raise UnknownModel(model, self.engine.model_names)
        return EngineBackend(self.engine, model)

    def _max_tokens(self, requested: int | None, prompt_tokens: int, param: str) -> int:
        ctx = self.engine.context_length
        room = None if not ctx else ctx - prompt_tokens
        if room is not None and room < 1:
            raise ContextTooLong(f"the prompt has {prompt_tokens} tokens; the model's context is {ctx} tokens")
        if requested is None:
            return min(self.limits.default_max_tokens, room) if room is not None else self.limits.default_max_tokens
        if requested < 1:
            raise InvalidRequest(f"{param} must be at least 1, got {requested}", param)
        if requested > self.limits.max_tokens:
            raise InvalidRequest(f"{param} is at most {self.limits.max_tokens} on this server, got {requested}",
                                 param)
        if room is not None and requested > room:
            raise ContextTooLong(f"the prompt has {prompt_tokens} tokens and {param} is {requested}: "
                                 f"{prompt_tokens + requested} tokens, over the model's context of {ctx}; "
                                 f"ask for at most {room}")
        return requested

    def _sampling(self, req: CritiqueRequest | ReviseRequest) -> Sampling:
        d = Sampling()
        max_tokens = req.max_tokens if req.max_tokens is not None else self.limits.default_max_tokens
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {self.limits.max_tokens} on this server, got "
                                 f"{max_tokens}", "max_tokens")
        return Sampling(temperature=d.temperature if req.temperature is None else req.temperature,
                        top_p=d.top_p if req.top_p is None else req.top_p, max_new_tokens=max_tokens,
                        seed=d.seed if req.seed is None else req.seed)

    def _constitution(self, name: str | None) -> Constitution:
        if name is None:
            names = self.registry.names()
            if "default" in names:
                name = "default"
            elif len(names) == 1:
                name = names[0]
            else:
                raise InvalidRequest(f"name a constitution: this server has {', '.join(names)}", "constitution")
        try:
            return self.registry.get(name)
        except KeyError:
            raise self._no_constitution(name) from None

    def _no_constitution(self, name: str) -> NotFound:
        return NotFound(f"unknown constitution {name!r}; this server has: {', '.join(self.registry.names())}",
                        "constitution", "constitution_not_found")

    def _principles(self, c: Constitution, ids: list[str]) -> tuple[str, ...]:
        unknown = [i for i in dict.fromkeys(ids) if i not in c.ids]
        if unknown:
            raise InvalidRequest(f"unknown principle{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(map(repr, unknown))} in constitution {c.name!r}; it has: "
                                 f"{', '.join(c.ids)}", "principles", "principle_not_found")
        return tuple(ids)

    def _revision(self, name: str, principles: list[str] | None, rounds: int | None) -> Revision:
        c = self._constitution(name)
        ids = self._principles(c, principles) if principles else None
        if ids is not None and rounds is not None and len(ids) != rounds:
            raise InvalidRequest(f"{len(ids)} principles for {rounds} rounds: give one per round, or leave "
                                 "'rounds' out", "rounds")
        return Revision(c, ids, len(ids) if ids is not None else (rounds or 1))


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _cancel_handles(future: asyncio.Future) -> None:
    """Cancel what a submit finished after its caller had gone (the caller was cancelled while it ran)."""
    if not future.cancelled() and future.exception() is None:
        for handle in future.result():
            handle.cancel()


def _check_done(done: Done) -> None:
    if done.finish_reason == "error":
        raise GenerationFailed(f"generation failed: {done.error}")
    if done.finish_reason == "cancelled":
        raise GenerationFailed("the request was cancelled before it finished (the server is shutting down)")


def _extension_field(record: Record) -> dict:
    """What a chat choice says of its critique→revise run (the ``cai`` field next to ``message``)."""
    return {"constitution": record.provenance.constitution.model_dump(mode="json"),
            "principles": [r.principle for r in record.rounds],
            "initial": record.initial,
            "rounds": [{"principle": r.principle, "critique": r.critique, "revision": r.revision,
                        "flags": r.flags} for r in record.rounds],
            "flags": record.flags,
            "record_id": record.id}


async def _chunks_of(result: dict, include_usage: bool) -> AsyncIterator[dict]:
    """A finished chat completion as stream chunks: per choice a role chunk, one content chunk (with the ``cai``
    field) and a finish chunk; then the usage chunk if asked."""
    base = {"id": result["id"], "object": "chat.completion.chunk", "created": result["created"],
            "model": result["model"]}
    for choice in result["choices"]:
        i = choice["index"]
        yield {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
        content = {"index": i, "delta": {"content": choice["message"]["content"]}, "finish_reason": None}
        if "cai" in choice:
            content["cai"] = choice["cai"]
        yield {**base, "choices": [content]}
        yield {**base, "choices": [{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}]}
    if include_usage:
        yield {**base, "choices": [], "usage": result["usage"]}

