"""What every protocol module shares: the strict base of request bodies, the text check, and the base of response
bodies (which may leave out fields that are None, as the wire format does).

Validation happens at this boundary, strictly: unknown fields are errors, numbers must be numbers, floats must be
finite, every list and string has a cap (see each protocol module). Response models are serialised in field order:
the JSON a client receives is exactly what the model declares.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


def check_text(value: str) -> str:
    # a lone surrogate (JSON "\ud800") is not text: it cannot be encoded, tokenized or echoed back
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (invalid UTF-16 escape); send valid Unicode text") from None
    return value


class StrictRequest(BaseModel):
    """A request body: unknown fields are refused, strings capped at 1M characters."""

    model_config = ConfigDict(extra="forbid", str_max_length=1_000_000)


class Wire(BaseModel):
    """A response body. Fields named in ``omit_none`` are left out of the JSON when None (the wire format omits them
    rather than sending null); every other field is always sent, null included."""

    omit_none: ClassVar[tuple[str, ...]] = ()

    # no annotations: pydantic then documents the model's own schema in OpenAPI
    @model_serializer(mode="wrap")
    def _leave_out_none(self, handler):
        data = handler(self)
        for name in self.omit_none:
            if data.get(name, ...) is None:
                del data[name]
        return data
