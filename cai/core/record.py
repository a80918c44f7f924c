"""The record: one prompt's answer, critiques and revisions, as ``records.jsonl`` holds it (one a line).

The pipeline (``cai.generate.generator``) builds it, the store (``cai.generate.store``) writes it, data building, the
evaluation and the server read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cai.core.files import read_models
from cai.core.prompts import Message

FLAGS = ("empty", "echo", "truncated", "unchanged")


class Round(BaseModel):
    """One critique→revision round: the principle drawn (and the hash of its text), the critique, the revision, and
    the problems found in them (``FLAGS``; a critique's own problems are prefixed ``critique_``)."""

    model_config = ConfigDict(extra="forbid")
    principle: str
    principle_sha256: str
    critique: str
    revision: str
    flags: list[str] = []


class ConstitutionStamp(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    version: str | None = None
    sha256: str


class Provenance(BaseModel):
    """What made a record: constitution (and each principle's hash), prompt format, model, backend, sampling.
    Older or newer versions of cai may write keys this one does not know: they are kept, not refused."""

    model_config = ConfigDict(extra="allow")
    constitution: ConstitutionStamp
    principle_sha256: dict[str, str] = {}
    frame_sha256: str | None = None
    prompt_format: str | None = None
    model: str
    model_revision: str | None = None
    backend: str
    dtype: str | None = None                 # what a local model computed in ("float32", "bfloat16")
    sampling: dict[str, Any] = {}
    seed: int | None = None
    rounds: int | None = None
    created_at: str | None = None
    cai_version: str | None = None


class Record(BaseModel):
    """One line of ``records.jsonl``. ``id`` is the record's key (``cai.core.hashing.record_key``): the prompt, the
    principles drawn, the prompt frame, the model and the sampling; a changed key means a new record."""

    model_config = ConfigDict(extra="forbid")
    id: str
    prompt_id: str
    category: str | None = None
    messages: list[Message]
    initial: str
    initial_flags: list[str] = []
    rounds: list[Round]
    final: str
    flags: list[str]
    usage: dict[str, int]           # prompt_tokens, completion_tokens over every stage
    provenance: Provenance

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``records.jsonl`` (field order as declared)."""
        return self.model_dump(mode="json", exclude_unset=True)


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    return read_models(path / "records.jsonl" if path.is_dir() else path, Record, "record")
