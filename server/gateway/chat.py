"""Chat completions in gateway mode, without HTTP: a :class:`ChatCompletionRequest` in (validated by the same strict
protocol as with a local model), the upstream's answer out as a :class:`ChatCompletion` or an async iterator of
:class:`ChatCompletionChunk`, under the served model name. The engine's :class:`~server.openai.serving.ChatServing`
has the same two methods; the routes cannot tell them apart.

What goes upstream: the conversation (special-token strings neutralised), the upstream's model name, ``max_tokens``
(the request's, capped by ``--max-tokens``, or ``--default-max-tokens``), and the sampling fields the request set
(``temperature``, ``top_p``, ``seed``, ``stop``, ``n``, ``logprobs``/``top_logprobs``, ``stream``,
``stream_options``); left out fields take the upstream's defaults. ``n`` and ``seed`` mean what they mean upstream.
Token limits without a tokenizer: the caps above are checked here; whether the prompt fits the model's context is
the upstream's to say (its refusal comes back as a 400 with its message).

Streamed, each upstream chunk is relayed as it comes. With the ``constitution`` extension the whole answer is fetched,
each choice is revised through the pipeline (the Generator over the upstream), and streamed as one chunk at the end,
as with a local model. A caller that goes away cancels its task: the upstream connection is closed with it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cai.backends.base import Completion, Sampling
from cai.core.prompts import Message
from server.critique.pipeline import Pipeline, Revision
from server.engine import UnknownModel
from server.errors import InvalidRequest
from server.gateway.protocol import chunk_of, completion_of, estimate_tokens
from server.gateway.stream import UpstreamStream
from server.gateway.upstream import Upstream
from server.openai.extension import chat_extension, check_revisable, chunks_of, extension_sampling, revise_answers
from server.openai.protocol import AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Usage
from server.settings import Limits
from server.user_text import SpecialTokenFilter


@dataclass
class GatewayJob:
    """A validated chat completion, ready to send upstream."""

    id: str
    served: str                     # the model name the client asked for
    messages: list[Message]
    body: dict                      # what goes upstream
    samplings: list[Sampling]       # per choice: the extension's sampling
    revision: Revision | None = None
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


class GatewayChat:
    """``on_usage(model, prompt_tokens, completion_tokens)`` is told the usage of every answered request."""

    def __init__(self, upstream: Upstream, pipeline: Pipeline, neutralise: SpecialTokenFilter, limits: Limits,
                 on_usage: Callable[[str, int, int], None]):
        self.upstream = upstream
        self.pipeline = pipeline
        self.neutralise = neutralise
        self.limits = limits
        self.on_usage = on_usage

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        job = self.prepare(req)
        self.upstream.check_admission()
        return await self._complete(job)

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        """Everything that can refuse the request (validation, a full gateway, an upstream that fails before its
        first chunk) raises here, so the route can still answer with a status."""
        job = self.prepare(req)
        self.upstream.check_admission()
        if job.revision is not None:
            return chunks_of(await self._complete(job), job.include_usage)
        return self._relay(job, await self.upstream.stream(job.body))

    def prepare(self, req: ChatCompletionRequest) -> GatewayJob:
        """Validate against the gateway's model and limits, and build the upstream request."""
        served = self.upstream.name
        if req.model != served:
            raise UnknownModel(req.model, [served])
        if not 1 <= req.n <= self.limits.max_n:
            raise InvalidRequest(f"n must be between 1 and {self.limits.max_n} on this server, got {req.n}", "n")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.limits.default_max_tokens if req.token_limit is None else req.token_limit
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise InvalidRequest(f"{param} must be between 1 and {self.limits.max_tokens} on this server, got "
                                 f"{max_tokens}", param)
        messages = self.neutralise.messages(req.messages)
        body: dict = {"model": self.upstream.model, "messages": messages, "max_tokens": max_tokens}
        for name in ("temperature", "top_p", "seed"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.stops:
            body["stop"] = list(req.stops)
        if req.n != 1:
            body["n"] = req.n
        if req.logprobs:
            body["logprobs"] = True
            if req.top_logprobs is not None:
                body["top_logprobs"] = req.top_logprobs
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream and include_usage:
            body["stream_options"] = {"include_usage": True}
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        samplings = [extension_sampling(max_tokens, temperature, top_p, None if req.seed is None else req.seed + i)
                     for i in range(req.n)]
        revision = None
        if req.constitution is not None:
            revision = self.pipeline.revision(req.constitution, req.principles, req.rounds)
            check_revisable(self.pipeline, served, messages, revision, samplings[0])
        return GatewayJob("chatcmpl-" + secrets.token_hex(12), served, messages, body, samplings, revision,
                          include_usage)

    async def _complete(self, job: GatewayJob) -> ChatCompletion:
        answer = await self.upstream.complete(job.body)
        result = completion_of(answer, job.served, job.id, job.created, job.prompt_chars)
        if job.revision is not None:
            n = len(result.choices)
            answers = [Completion(c.message.content.strip(), result.usage.prompt_tokens if n == 1 else 0,
                                  result.usage.completion_tokens if n == 1 else
                                  estimate_tokens(len(c.message.content)), c.finish_reason)
                       for c in result.choices]
            samplings = [job.samplings[min(c.index, len(job.samplings) - 1)] for c in result.choices]
            records = await revise_answers(self.pipeline, job.served, job.messages, job.revision, samplings,
                                           answers)
            result.usage = Usage.of(sum(r.usage["prompt_tokens"] for r in records),
                                    sum(r.usage["completion_tokens"] for r in records))
            for choice, record in zip(result.choices, records):
                choice.message = AssistantMessage(content=record.final)
                choice.cai = chat_extension(record)
        self.on_usage(job.served, result.usage.prompt_tokens, result.usage.completion_tokens)
        return result

    async def _relay(self, job: GatewayJob, stream: UpstreamStream) -> AsyncIterator[ChatCompletionChunk]:
        usage: Usage | None = None
        chars = 0
        try:
            async for up in stream:
                chunk = chunk_of(up, job.served, job.id, job.created)
                usage = chunk.usage or usage
                chars += sum(len(c.delta.content or "") for c in chunk.choices)
                yield chunk
        finally:
            await stream.aclose()
            if usage is not None:
                self.on_usage(job.served, usage.prompt_tokens, usage.completion_tokens)
            else:
                self.on_usage(job.served, estimate_tokens(job.prompt_chars), estimate_tokens(chars))

