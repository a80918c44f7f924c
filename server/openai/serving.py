"""Chat completions without HTTP: plain, streamed, or run through critique→revise (the ``constitution`` extension).
A :class:`ChatCompletionRequest` in; a :class:`ChatCompletion`, or an async iterator of :class:`ChatCompletionChunk`,
out. Failures are exceptions (:mod:`server.errors` maps them to statuses).

Blocking work (tokenizing a long prompt, submitting to the engine) runs in worker threads, never on the event loop.
The engine's events reach the loop through its :class:`~server.engine.Mailbox` (one wake-up per decode step); a whole
(unstreamed) completion asks for its Done events only. A caller that goes away cancels its asyncio task, and with it
the engine requests of every choice.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

from cai.backends.base import Completion, Sampling
from cai.core.prompts import Message
from server.critique.pipeline import Pipeline, Revision
from server.engine import Delta, Done, Engine, Event, GenParams, Handle, Mailbox, UnknownModel
from server.errors import ContextTooLong, GenerationFailed, InvalidRequest
from server.openai.extension import chat_extension, check_revisable, chunks_of, extension_sampling, revise_answers
from server.openai.logprobs import LogprobFormatter
from server.openai.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatExtension,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    Usage,
)
from server.settings import Limits
from server.user_text import SpecialTokenFilter


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

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


class ChatServing:
    """``on_usage(model, prompt_tokens, completion_tokens)`` is told the usage of every answered request."""

    def __init__(self, engine: Engine, pipeline: Pipeline, neutralise: SpecialTokenFilter, limits: Limits,
                 on_usage: Callable[[str, int, int], None]):
        self.engine = engine
        self.pipeline = pipeline
        self.neutralise = neutralise
        self.limits = limits
        self.on_usage = on_usage
        self.logprobs = LogprobFormatter(engine.tokenizer)

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        """A whole chat completion (``stream`` is ignored: see :meth:`stream`)."""
        job = await asyncio.to_thread(self.prepare, req)
        return await self._complete(job)

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """The chunks of a streamed chat completion. Everything that can refuse the request (validation, a full
        queue, a stopped engine) raises here, before the first chunk, so the route can still answer 4xx/503.
        With the critique→revise extension the final revision is only known at the end: it comes as one chunk."""
        job = await asyncio.to_thread(self.prepare, req)
        if job.revision is not None:
            return chunks_of(await self._complete(job), job.include_usage)
        choices = await self._start(job, deltas=True)
        return self._stream(job, choices)

    def prepare(self, req: ChatCompletionRequest) -> ChatJob:
        """Validate against this server's model and limits (blocking: it tokenizes)."""
        e = self.engine
        if req.model not in e.model_names:
            raise UnknownModel(req.model, e.model_names)
        if not 1 <= req.n <= self.limits.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.limits.max_n} on this server, got {req.n}", "n")
        messages = self.neutralise.messages(req.messages)
        prompt_ids = e.encode(messages)
        prompt_tokens = len(prompt_ids)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.token_limit, prompt_tokens, param)
        revision = None
        if req.constitution is not None:
            revision = self.pipeline.revision(req.constitution, req.principles, req.rounds)
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [GenParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=req.stops,
                            seed=None if req.seed is None else req.seed + i, logprobs=logprobs)
                  for i in range(req.n)]
        job = ChatJob("chatcmpl-" + secrets.token_hex(12), req.model, messages, params, prompt_ids, revision,
                      include_usage=bool(req.stream_options and req.stream_options.include_usage))
        if revision is not None:       # refuse a conversation the pipeline cannot take before answering it
            check_revisable(self.pipeline, req.model, messages, revision, _extension_sampling(job, 0))
        return job

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

    # -- running the choices -----------------------------------------------------------------------------------

    async def _start(self, job: ChatJob, deltas: bool) -> _Choices:
        """Submit every choice (in a thread: submitting may block on the engine's lock). If this task is cancelled
        meanwhile, what was submitted is cancelled when the submission ends. ``deltas``: whether the events include
        the text as it is decoded (streaming), or only each choice's Done."""
        loop = asyncio.get_running_loop()
        box = self.engine.mailbox(loop)
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

    async def _complete(self, job: ChatJob) -> ChatCompletion:
        choices = await self._start(job, deltas=False)
        dones: dict[int, Done] = {}
        async for i, event in choices.events():
            if isinstance(event, Done):
                dones[i] = event
        for done in dones.values():
            _check_done(done)
        results = [dones[i] for i in range(len(job.params))]
        usage = Usage.of(job.prompt_tokens, sum(d.completion_tokens for d in results))
        extensions: list[ChatExtension | None] = [None] * len(results)
        texts = [d.text for d in results]
        if job.revision is not None:
            answers = [Completion(d.text.strip(), d.prompt_tokens, d.completion_tokens, d.finish_reason)
                       for d in results]
            records = await revise_answers(self.pipeline, job.model, job.messages, job.revision,
                                           [_extension_sampling(job, i) for i in range(len(results))], answers)
            usage = Usage.of(sum(r.usage["prompt_tokens"] for r in records),
                             sum(r.usage["completion_tokens"] for r in records))
            texts = [r.final for r in records]
            extensions = [chat_extension(r) for r in records]
        self.on_usage(job.model, usage.prompt_tokens, usage.completion_tokens)
        return ChatCompletion(id=job.id, created=job.created, model=job.model, usage=usage, choices=[
            ChatCompletionChoice(index=i, message=AssistantMessage(content=text), logprobs=self.logprobs(done.logprobs),
                                 finish_reason=done.finish_reason, cai=extensions[i])
            for i, (done, text) in enumerate(zip(results, texts))])

    async def _stream(self, job: ChatJob, choices: _Choices) -> AsyncIterator[ChatCompletionChunk]:
        completion_tokens = 0
        with_logprobs = job.params[0].logprobs is not None
        sent = [0] * len(job.params)               # per choice: token log-probabilities sent so far
        try:
            for i in range(len(job.params)):
                yield job.chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for i, event in choices.events():
                logprobs: ChoiceLogprobs | None = None
                if isinstance(event, Delta):
                    if with_logprobs:
                        logprobs = self.logprobs(event.logprobs)
                        sent[i] += len(event.logprobs)
                    yield job.chunk([ChunkChoice(index=i, delta=DeltaMessage(content=event.text), logprobs=logprobs)])
                    continue
                _check_done(event)
                completion_tokens += event.completion_tokens
                if with_logprobs:        # the tokens no Delta carried (text held back, then cut by a stop string)
                    logprobs = self.logprobs((event.logprobs or ())[sent[i]:])
                yield job.chunk([ChunkChoice(index=i, delta=DeltaMessage(), finish_reason=event.finish_reason,
                                             logprobs=logprobs)])
        finally:
            choices.cancel()
        self.on_usage(job.model, job.prompt_tokens, completion_tokens)
        if job.include_usage:
            yield job.chunk([], usage=Usage.of(job.prompt_tokens, completion_tokens))

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


def _post(box: Mailbox, queue: asyncio.Queue, index: int, deltas: bool, event: Event) -> None:
    # on the worker thread. A whole (unstreamed) completion needs only its Done: no event per token
    if deltas or isinstance(event, Done):
        box.post(queue, (index, event))
    elif box.closed:
        raise RuntimeError("the event loop is closed")   # nobody will read the answer: the engine cancels it


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


def _extension_sampling(job: ChatJob, index: int) -> Sampling:
    p = job.params[index]
    return extension_sampling(p.max_tokens, p.temperature, p.top_p, p.seed)
