"""The critique→revise extension of chat completions (a request's ``constitution``, ``principles``, ``rounds``), as
both chat handlers share it: the engine's (:mod:`server.openai.serving`) and the gateway's
(:mod:`server.gateway.chat`). Each chat answer is revised through the pipeline (:mod:`server.critique.pipeline`)
with the prompts and code of ``cai generate``; the choice's text becomes the final revision and its ``cai`` field
says how it came about."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cai.backends.base import Completion, Sampling
from cai.core.prompts import Message
from cai.core.record import Record
from server.critique.pipeline import Pipeline, Revision, gather_all
from server.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatExtension,
    ChunkChoice,
    DeltaMessage,
    ExtensionRound,
)


def extension_sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None) -> Sampling:
    """The sampling a choice's critique and revision run with: the chat request's (seed 0 when it gave none)."""
    return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
                    seed=seed if seed is not None else 0)


def check_revisable(pipeline: Pipeline, model: str, messages: list[Message], revision: Revision,
                    sampling: Sampling) -> None:
    """Refuse a conversation the pipeline cannot take (not ending with a user turn, over the context) before it
    is answered."""
    item = pipeline.item(messages)
    backend = pipeline.backend(model)
    pipeline.check_context(revision, backend, pipeline.plan(item, revision, backend, sampling), sampling)


async def revise_answers(pipeline: Pipeline, model: str, messages: list[Message], revision: Revision,
                         samplings: list[Sampling], answers: list[Completion]) -> list[Record]:
    """Each answer (one per choice) through critique→revise, concurrently: one record per choice."""
    item = pipeline.item(messages)
    return await gather_all([pipeline.record(pipeline.backend(model), item, revision, sampling, answer)
                             for sampling, answer in zip(samplings, answers)])


def chat_extension(record: Record) -> ChatExtension:
    """What a chat choice says of its critique→revise run (the ``cai`` field next to ``message``)."""
    return ChatExtension(constitution=record.provenance.constitution, principles=[r.principle for r in record.rounds],
                         initial=record.initial,
                         rounds=[ExtensionRound(principle=r.principle, critique=r.critique, revision=r.revision,
                                                flags=r.flags) for r in record.rounds],
                         flags=record.flags, record_id=record.id)


async def chunks_of(result: ChatCompletion, include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    """A finished chat completion as stream chunks: per choice a role chunk, one content chunk (with the ``cai``
    field) and a finish chunk; then the usage chunk if asked."""
    def chunk(choices: list[ChunkChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=result.id, created=result.created, model=result.model, choices=choices,
                                   usage=usage)

    for choice in result.choices:
        i = choice.index
        yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        yield chunk([ChunkChoice(index=i, delta=DeltaMessage(content=choice.message.content), cai=choice.cai)])
        yield chunk([ChunkChoice(index=i, delta=DeltaMessage(), finish_reason=choice.finish_reason)])
    if include_usage:
        yield chunk([], usage=result.usage)
