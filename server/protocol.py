"""Wire schemas: the OpenAI chat shapes, our critique/revise shapes, and the error shape.

Validation happens here, strictly: unknown fields are errors (an OpenAI field we do not implement is accepted only at
its neutral value), numbers must be numbers (``"max_tokens": "10"`` is refused, not coerced), floats must be finite,
every list and string has a cap. Caps that depend on the served model (context length, the server's ``max_tokens``
and ``n`` limits) are checked in the service layer, which knows them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

MAX_MESSAGES = 256
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_PRINCIPLES = 64
MAX_ROUNDS = 8
MAX_TOP_LOGPROBS = 20      # alternatives a token's log-probabilities may list (OpenAI's cap)

Role = Literal["system", "user", "assistant"]


def _check_text(value: str) -> str:
    # a lone surrogate (JSON "\ud800") is not text: it cannot be encoded, tokenized or echoed back
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (invalid UTF-16 escape); send valid Unicode text") from None
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=1_000_000)


class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _check_text(v)


class ChatMessage(_Strict):
    role: Role
    content: str | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: str | None = Field(default=None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return _check_text(v)
        return v

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False, strict=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]


class _Sampling(_Strict):
    """Sampling fields shared by every generating route."""

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


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    model: Annotated[str, Field(min_length=1, max_length=256)]
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
    constitution: Annotated[str, Field(min_length=1, max_length=80)] | None = None
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
            _check_text(s)
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


class CritiqueRequest(_Sampling):
    """Critique ``response`` (the assistant's answer to ``messages``) against each principle named, or one drawn."""

    messages: Messages
    response: Annotated[str, Field(max_length=1_000_000)]
    principles: Annotated[list[str], Field(min_length=1, max_length=MAX_PRINCIPLES)] | None = None
    constitution: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @field_validator("response")
    @classmethod
    def _response(cls, v: str) -> str:
        return _check_text(v)


class ReviseRequest(_Sampling):
    """The whole pipeline on one conversation: answer (or take ``response``), then ``rounds`` of critique→revise."""

    messages: Messages
    response: Annotated[str, Field(max_length=1_000_000)] | None = None
    rounds: Annotated[StrictInt, Field(ge=1, le=MAX_ROUNDS)] | None = None
    principles: Annotated[list[str], Field(min_length=1, max_length=MAX_ROUNDS)] | None = None
    constitution: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @field_validator("response")
    @classmethod
    def _response(cls, v: Any) -> Any:
        return _check_text(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _rounds(self) -> ReviseRequest:
        if self.principles is not None and self.rounds is not None and len(self.principles) != self.rounds:
            raise ValueError(f"{len(self.principles)} principles for {self.rounds} rounds: give one per round, or "
                             "leave 'rounds' out")
        return self


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
