"""The critique and revise wire format: requests and responses, typed.

Conversations are OpenAI chat messages (:mod:`server.openai.protocol`), sampling fields the chat route's. A revise
answer is the :class:`~cai.core.record.Record` that ``cai generate`` writes for the same conversation, as
``records.jsonl`` holds it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, field_validator, model_validator

from cai.core.record import Record
from server.openai.protocol import (
    MAX_PRINCIPLES,
    MAX_ROUNDS,
    ConstitutionName,
    Messages,
    ModelName,
    SamplingFields,
    Usage,
)
from server.wire import Wire, check_text

# ---------------------------------------------------------------------------------------------------------------
# Requests


class CritiqueRequest(SamplingFields):
    """Critique ``response`` (the assistant's answer to ``messages``) against each principle named, or one drawn."""

    messages: Messages
    response: Annotated[str, Field(max_length=1_000_000)]
    principles: Annotated[list[str], Field(min_length=1, max_length=MAX_PRINCIPLES)] | None = None
    constitution: ConstitutionName | None = None
    model: ModelName | None = None

    @field_validator("response")
    @classmethod
    def _response(cls, v: str) -> str:
        return check_text(v)


class ReviseRequest(SamplingFields):
    """The whole pipeline on one conversation: answer (or take ``response``), then ``rounds`` of critique→revise."""

    messages: Messages
    response: Annotated[str, Field(max_length=1_000_000)] | None = None
    rounds: Annotated[StrictInt, Field(ge=1, le=MAX_ROUNDS)] | None = None
    principles: Annotated[list[str], Field(min_length=1, max_length=MAX_ROUNDS)] | None = None
    constitution: ConstitutionName | None = None
    model: ModelName | None = None

    @field_validator("response")
    @classmethod
    def _response(cls, v: Any) -> Any:
        return check_text(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _rounds(self) -> ReviseRequest:
        if self.principles is not None and self.rounds is not None and len(self.principles) != self.rounds:
            raise ValueError(f"{len(self.principles)} principles for {self.rounds} rounds: give one per round, or "
                             "leave 'rounds' out")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Responses


class ConstitutionRef(Wire):
    name: str
    version: str
    sha256: str


class Critique(Wire):
    principle: str
    principle_sha256: str
    critique: str
    finish_reason: str
    flags: list[str]


class SamplingUsed(Wire):
    """The sampling the critiques were generated with (:class:`cai.backends.base.Sampling`)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


class CritiqueResponse(Wire):
    object: Literal["critique"] = "critique"
    model: str
    prompt_id: str
    constitution: ConstitutionRef
    critiques: list[Critique]
    sampling: SamplingUsed
    usage: Usage


# What /v1/revise answers: the record, serialised as records.jsonl holds it (fields left unset are left out)
RevisionRecord = Record
