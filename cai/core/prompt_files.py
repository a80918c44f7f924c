"""Loading prompt sets: our JSONL files, any JSONL/Parquet with a ``prompt`` or ``messages`` column, or a Hugging
Face dataset name (where a hub is reachable).

A row is ``{"id": str, "messages": [{"role", "content"}...] | "prompt": str, "category"?: str}``. Other columns are
ignored. A row without an id gets a stable one from a hash of its content. A bad row is reported with its file and
line and skipped (or, with ``strict``, stops the load); the good rows are kept.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import Issue, PromptFileError, display_path
from cai.core.prompts import Message

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptItem:
    id: str
    messages: list[Message]
    category: str | None = None
    source: str = ""          # "file:line", for error messages

    @property
    def last_user(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PromptSet:
    items: list[PromptItem]
    issues: list[Issue] = field(default_factory=list)   # bad rows that were skipped
    source: str = ""


def load_prompts(spec: str | Path, *, strict: bool = False, split: str = "train") -> PromptSet:
    """Load a prompt set from a file path or a Hugging Face dataset name."""
    path = Path(spec)
    shown = display_path(path)
    if path.exists():
        if path.is_dir():
            raise PromptFileError(f"{shown} is a folder; give a .jsonl or .parquet file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            rows = _jsonl_rows(path, shown)
        elif suffix == ".parquet":
            rows = _parquet_rows(path, shown)
        else:
            raise PromptFileError(f"{shown}: unsupported file type {suffix!r} (use .jsonl or .parquet)")
    elif (str(spec).endswith((".jsonl", ".json", ".parquet", ".ndjson")) or str(spec).startswith((".", "/", "~"))
          or str(spec).count("/") > 1):   # a hub dataset is "name" or "org/name": more slashes is a local path
        raise PromptFileError(f"prompt file not found: {shown}")
    else:
        rows = _hub_rows(str(spec), split)
    result = _build(rows, strict)
    result.source = shown
    if not result.items:
        raise PromptFileError(f"no usable prompts in {shown}", result.issues[:20])
    return result


MAX_LINE_BYTES = 16 << 20      # one prompt row; a longer line is reported and skipped, never read whole
_UTF8_BOM = b"\xef\xbb\xbf"       # Windows editors start UTF-8 files with it
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _jsonl_rows(path: Path, shown: str) -> Iterable[tuple[str, int, Any]]:
    with open(path, "rb") as fh:
        head = fh.read(3)
        if head.startswith(_UTF16_BOMS):
            raise PromptFileError(f"{shown} is UTF-16 text; prompt files are UTF-8",
                                  hint="Save it as UTF-8 (in most editors: Save as, Encoding: UTF-8).")
        fh.seek(len(_UTF8_BOM) if head == _UTF8_BOM else 0)
        n = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := fh.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass                                # skip the rest of the line in bounded pieces
                yield shown, n, Issue(f"line longer than {MAX_LINE_BYTES / 2**20:g} MiB", shown, n)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield shown, n, Issue(f"not UTF-8 text ({e.reason})", shown, n)
                continue
            if not line.strip():
                continue
            try:
                yield shown, n, json.loads(line)
            except json.JSONDecodeError as e:
                yield shown, n, Issue(f"malformed JSON: {e.msg} (column {e.colno})", shown, n)


def _parquet_rows(path: Path, shown: str) -> Iterable[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise PromptFileError(f"cannot read {shown} as Parquet: {e}") from None
    for n, row in enumerate(table.to_pylist(), start=1):
        yield shown, n, row


def _hub_rows(name: str, split: str) -> Iterable[tuple[str, int, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise PromptFileError(
            f"{name!r} is not a local file, and loading it as a Hugging Face dataset failed: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
            hint="Check the path, or the dataset name and that the hub is reachable.") from None
    for n, row in enumerate(ds, start=1):
        yield f"{name}[{split}]", n, row


def _build(rows: Iterable[tuple[str, int, Any]], strict: bool) -> PromptSet:
    items: list[PromptItem] = []
    issues: list[Issue] = []
    seen: dict[str, str] = {}
    for shown, n, row in rows:
        if isinstance(row, Issue):
            issues.append(row)
            continue
        try:
            item = item_from_row(row, f"{shown}:{n}")
        except ValueError as e:
            issues.append(Issue(str(e), shown, n))
            continue
        if item.id in seen:
            issues.append(Issue(f"duplicate id {item.id!r} (first at {seen[item.id]})", shown, n, "id"))
            continue
        seen[item.id] = item.source
        items.append(item)
    if strict and issues:
        raise PromptFileError(f"{len(issues)} bad prompt row(s) (strict mode)", issues[:50])
    return PromptSet(items, issues)


def item_from_row(row: Any, where: str) -> PromptItem:
    """One prompt-file row (or a request's conversation) as a PromptItem; ``where`` names it in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    has_messages = row.get("messages") is not None
    has_prompt = row.get("prompt") is not None
    if has_messages == has_prompt:
        raise ValueError("a row needs exactly one of 'prompt' (a string) or 'messages' (a list of turns)")
    if has_prompt:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError("'prompt' must be a non-empty string")
        messages: list[Message] = [{"role": "user", "content": row["prompt"]}]
    else:
        messages = _check_messages(row["messages"])
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise ValueError("'category' must be a string")
    rid = row.get("id")
    if rid is None:
        rid = "h-" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip():
        raise ValueError("'id' must be a non-empty string")
    return PromptItem(str(rid), messages, category, where)


def _check_messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}].content must be a non-empty string")
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if not turns or turns[-1] != "user":
        raise ValueError("the conversation must end with a user turn (the one to answer)")
    if any(a == b for a, b in itertools.pairwise(turns)):
        raise ValueError("user and assistant turns must alternate")
    return out
