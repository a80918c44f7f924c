"""The record: one prompt's answer, critiques and revisions, as ``records.jsonl`` holds it (one a line).

The pipeline (``cai.generate.generator``) builds it, the store (``cai.generate.store``) writes it, data building, the
evaluation and the server read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cai.core.errors import RunFolderError, display_path
from cai.core.files import read_jsonl
from cai.core.prompts import Message


FLAGS = ("empty", "echo", "truncated", "unchanged")


class Round(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principle: str
    principle_sha256: str
    critique: str
    revision: str
    flags: list[str] = []


class Record(BaseModel):
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
    provenance: dict[str, Any]


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    out = []
    for n, obj in read_jsonl(path):
        try:
            out.append(Record.model_validate(obj))
        except Exception as e:
            raise RunFolderError(f"{display_path(path)}:{n}: not a valid record: {str(e).splitlines()[0]}") from None
    return out
