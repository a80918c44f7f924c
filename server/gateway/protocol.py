"""What the gateway reads from an upstream, typed, and how it becomes this service's own wire format.

Upstreams differ in the details (vLLM adds ``stop_reason``, llama.cpp and Ollama a ``system_fingerprint``, some
leave ``bytes`` out of log-probabilities or ``usage`` out of an answer), so these models are lenient where the chat
protocol's responses are exact: unknown fields are ignored and optional ones defaulted. What a client receives is
always :mod:`server.openai.protocol`'s :class:`ChatCompletion` and :class:`ChatCompletionChunk`, under the served
model name; what cannot be read as one is a bad answer (502).

Usage: the upstream's where it reports it, else estimated at 4 characters a token (:func:`estimate_tokens`, the
openai backend's own estimate); the estimate only ever feeds the metrics and a response's ``usage``, never a check.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from server.openai.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    TokenLogprobs,
    TopLogprob,
    Usage,
)

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text, estimated (rounded up)."""
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class UpTop(Lenient):
    token: str
    logprob: float | None = None
    bytes: list[int] | None = None


class UpToken(UpTop):
    top_logprobs: list[UpTop] | None = None


class UpLogprobs(Lenient):
    content: list[UpToken] | None = None


class UpUsage(Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UpMessage(Lenient):
    content: str | None = None


class UpChoice(Lenient):
    index: int = 0
    message: UpMessage
    finish_reason: str | None = None
    logprobs: UpLogprobs | None = None


class UpstreamCompletion(Lenient):
    id: str | None = None
    created: int | None = None
    choices: list[UpChoice]
    usage: UpUsage | None = None


class UpDelta(Lenient):
    role: str | None = None
    content: str | None = None


class UpChunkChoice(Lenient):
    index: int = 0
    delta: UpDelta = UpDelta()
    finish_reason: str | None = None
    logprobs: UpLogprobs | None = None


class UpstreamChunk(Lenient):
    id: str | None = None
    created: int | None = None
    choices: list[UpChunkChoice] = []
    usage: UpUsage | None = None


# ---------------------------------------------------------------------------------------------------------------
# Into the service's wire format


def _top(t: UpTop) -> TopLogprob:
    lp = t.logprob if t.logprob is not None and t.logprob > -9999.0 else -9999.0   # -inf, NaN, null: -9999
    return TopLogprob(token=t.token, logprob=lp, bytes=t.bytes if t.bytes is not None else list(t.token.encode()))


def logprobs_of(up: UpLogprobs | None) -> ChoiceLogprobs | None:
    if up is None or up.content is None:
        return None
    return ChoiceLogprobs(content=[TokenLogprobs(**_top(t).model_dump(),
                                                 top_logprobs=[_top(a) for a in t.top_logprobs or []])
                                   for t in up.content])


def completion_of(up: UpstreamCompletion, served: str, fallback_id: str, created: int,
                  prompt_chars: int) -> ChatCompletion:
    """The upstream's answer as this service's, under the served model name."""
    choices = [ChatCompletionChoice(index=c.index, message=AssistantMessage(content=c.message.content or ""),
                                    logprobs=logprobs_of(c.logprobs), finish_reason=c.finish_reason or "stop")
               for c in up.choices]
    if up.usage is not None:
        usage = Usage.of(up.usage.prompt_tokens, up.usage.completion_tokens)
    else:
        usage = Usage.of(estimate_tokens(prompt_chars), sum(estimate_tokens(len(c.message.content)) for c in choices))
    return ChatCompletion(id=up.id or fallback_id, created=up.created or created, model=served, choices=choices,
                          usage=usage)


def chunk_of(up: UpstreamChunk, served: str, fallback_id: str, created: int) -> ChatCompletionChunk:
    """One upstream stream chunk as this service's, under the served model name."""
    choices = [ChunkChoice(index=c.index,
                           delta=DeltaMessage(role="assistant" if c.delta.role else None, content=c.delta.content),
                           finish_reason=c.finish_reason, logprobs=logprobs_of(c.logprobs))
               for c in up.choices]
    usage = Usage.of(up.usage.prompt_tokens, up.usage.completion_tokens) if up.usage is not None else None
    return ChatCompletionChunk(id=up.id or fallback_id, created=up.created or created, model=served,
                               choices=choices, usage=usage)
