"""The OpenAI chat wire format: requests and responses, typed.

Requests are validated strictly (see :mod:`server.wire`): an OpenAI field we do not implement is accepted only at its
neutral value, ``"max_tokens": "10"`` is refused rather than coerced. Caps that depend on the served model (context
length, the server's ``max_tokens`` and ``n`` limits) are checked by the serving class, which knows them.

Responses are what the official ``openai`` client reads: :class:`ChatCompletion` for a whole answer,
:class:`ChatCompletionChunk` events for a stream. Two extensions ride along: the ``cai`` field of a choice (the
critique→revise run that produced its text) and, in requests, ``constitution``/``principles``/``rounds``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from cai.core.record import ConstitutionStamp
from server.wire import StrictRequest, Wire, check_text

MAX_MESSAGES = 256
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PRINCIPLES = 64
MAX_ROUNDS = 8
MAX_TOP_LOGPROBS = 20      # alternatives a token's log-probabilities may list (OpenAI's cap)

Role = Literal["system", "user", "assistant"]


# ---------------------------------------------------------------------------------------------------------------
# Requests


class TextPart(StrictRequest):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_text(v)


class ChatMessage(StrictRequest):
    role: Role
    content: str | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: str | None = Field(default=None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return check_text(v)
        return v

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False, strict=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]
ConstitutionName = Annotated[str, Field(min_length=1, max_length=80)]
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class SamplingFields(StrictRequest):
    """Sampling fields shared by every generating route (chat, critique, revise)."""

    max_tokens: StrictInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        if isinstance(v, bool) or (v is not None and not isinstance(v, (int, float))):
            raise ValueError("must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class StreamOptions(StrictRequest):
    include_usage: StrictBool = False


class ResponseFormat(StrictRequest):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    model: ModelName
    messages: Messages
    max_completion_tokens: StrictInt | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # accepted only at their neutral values: clients often send them
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    # extension: run critique→revise on each answer before returning it
    constitution: ConstitutionName | None = None
    principles: Annotated[list[str], Field(min_length=1, max_length=MAX_PRINCIPLES)] | None = None
    rounds: Annotated[StrictInt, Field(ge=1, le=MAX_ROUNDS)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        for s in stops:
            if not s:
                raise ValueError("a stop sequence must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
            check_text(s)
        return v

    @model_validator(mode="after")
    def _extension(self) -> ChatCompletionRequest:
        if (self.principles is not None or self.rounds is not None) and self.constitution is None:
            raise ValueError("'principles' and 'rounds' go with 'constitution' (the critique→revise extension)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.logprobs and self.constitution is not None:
            raise ValueError("'logprobs' cannot go with 'constitution': the answer returned is a revision, not the "
                             "tokens decoded")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------------------------
# Responses


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(Wire):
    token: str
    logprob: float                 # -9999.0 stands for -inf (and NaN), as OpenAI's API does: JSON has neither
    bytes: list[int]               # the token's own bytes (part of a UTF-8 character, possibly)


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Wire):
    content: list[TokenLogprobs]


class AssistantMessage(Wire):
    role: Literal["assistant"] = "assistant"
    content: str


class ExtensionRound(Wire):
    principle: str
    critique: str
    revision: str
    flags: list[str]


class ChatExtension(Wire):
    """The ``cai`` field of a choice: the critique→revise run whose final revision is the choice's text."""

    constitution: ConstitutionStamp
    principles: list[str]
    initial: str
    rounds: list[ExtensionRound]
    flags: list[str]
    record_id: str


class ChatCompletionChoice(Wire):
    omit_none = ("cai",)

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str
    cai: ChatExtension | None = None


class ChatCompletion(Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaMessage(Wire):
    omit_none = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Wire):
    omit_none = ("logprobs", "cai")

    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None     # only in a stream that asked for them
    cai: ChatExtension | None = None           # only in the one content chunk of a revised answer


class ChatCompletionChunk(Wire):
    omit_none = ("usage",)

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None                 # only in the last chunk, with stream_options.include_usage
