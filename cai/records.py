"""Records and the run folder's JSONL store.

``records.jsonl`` holds one record a line. Writes append whole lines, one ``write`` per batch, then ``fsync``: a
``kill -9`` can at worst leave one torn last line, which the next open cuts off (it is the batch that was in flight;
its records are generated again). Records are keyed (``id``); a key already in the file is never written again, and a
lock file keeps two writers out of one folder.

When a prompt's key changes (an edited principle it used, other sampling settings), the old record is moved to
``superseded.jsonl`` before the new one is generated: ``records.jsonl`` holds at most one record per prompt, and
nothing finished is ever deleted.

``stages.jsonl`` is the stage cache: one line per model call that succeeded, keyed by what produced it (model,
sampling settings, seed and the exact messages sent; see ``pipeline.stage_key``), appended and fsynced after every
stage call. A regenerated record reuses every stage whose inputs did not change, and a run killed mid-batch loses
only the stage that was in flight. The file only saves calls: deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

from cai.backends.base import Completion
from cai.errors import RunFolderError, display_path
from cai.prompts import Message

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


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Read a JSONL file written by this module: (line number, object) pairs. A torn last line (no newline: a write
    cut short by a kill) is skipped; any other unreadable line is an error naming its line."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    complete = lines[:-1]      # the piece after the last newline is empty, or a torn line
    for n, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            yield n, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{display_path(path)}:{n}: unreadable line ({e})",
                                 hint="This line was not written by cai (a kill only ever tears the last line). "
                                      "Remove or fix it by hand.") from None


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


@dataclass
class OpenStore:
    """A run folder opened for writing (``open_store`` holds its lock while it is open)."""

    root: Path
    records: dict[str, dict] = field(default_factory=dict)     # id -> record, as on disk
    torn_bytes: int = 0          # size of a torn last line cut off on open (0 if none)
    stages: dict[str, Completion] = field(default_factory=dict)   # the stage cache: stage key -> completion

    @property
    def records_path(self) -> Path:
        return self.root / "records.jsonl"

    def append(self, records: list[dict]) -> int:
        """Append records whose id is new, as one write, then fsync. Returns how many were written."""
        fresh = [r for r in records if r["id"] not in self.records]
        if not fresh:
            return 0
        _append_lines(self.records_path, fresh)
        for r in fresh:
            self.records[r["id"]] = r
        return len(fresh)

    def get(self, key: str) -> Completion | None:
        """The stage cache's lookup (``pipeline.StageCache``)."""
        return self.stages.get(key)

    def put(self, entries: list[tuple[str, str, Completion]]) -> None:
        """Add (key, stage, completion) entries to the stage cache: one write, then fsync. Failed requests are never
        cached."""
        fresh = [(k, stage, c) for k, stage, c in entries if c.error is None and k not in self.stages]
        if not fresh:
            return
        _append_lines(self.root / STAGES_FILE, [_stage_line(k, stage, c) for k, stage, c in fresh])
        for k, _, c in fresh:
            self.stages[k] = c

    def append_error(self, entry: dict) -> None:
        _append_lines(self.root / "errors.jsonl", [entry])

    def supersede(self, ids: set[str]) -> int:
        """Move these records to superseded.jsonl; rewrite records.jsonl without them (atomically)."""
        moving = [self.records[i] for i in ids if i in self.records]
        if not moving:
            return 0
        already = {obj.get("id") for _, obj in read_jsonl(self.root / "superseded.jsonl")}
        _append_lines(self.root / "superseded.jsonl", [r for r in moving if r["id"] not in already])
        keep = [r for i, r in self.records.items() if i not in ids]
        tmp = self.records_path.with_suffix(".jsonl.tmp")
        with open(tmp, "wb") as fh:
            fh.write("".join(_line(r) for r in keep).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.records_path)
        _fsync_dir(self.root)
        self.records = {r["id"]: r for r in keep}
        return len(moving)


@contextlib.contextmanager
def open_store(root: str | Path) -> Iterator[OpenStore]:
    root = Path(root)
    with folder_lock(root, "cai generate", hint="Wait for it to finish, or choose another --out folder."):
        store = OpenStore(root)
        store.torn_bytes = _repair_tail(store.records_path)
        for n, obj in read_jsonl(store.records_path):
            if not isinstance(obj, dict) or "id" not in obj or "prompt_id" not in obj:
                raise RunFolderError(f"{display_path(store.records_path)}:{n}: not a record (no id/prompt_id)")
            store.records.setdefault(obj["id"], obj)
        _repair_tail(root / STAGES_FILE)
        store.stages = read_stage_cache(root)
        yield store


STAGES_FILE = "stages.jsonl"


def _stage_line(key: str, stage: str, c: Completion) -> dict:
    return {"key": key, "stage": stage, "text": c.text, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}


def read_stage_cache(root: str | Path) -> dict[str, Completion]:
    """The run folder's stage cache (read-only; a torn last line is skipped). A line that is not a cache entry is
    an error naming it."""
    path = Path(root) / STAGES_FILE
    cache: dict[str, Completion] = {}
    for n, obj in read_jsonl(path):
        try:
            cache[obj["key"]] = Completion(str(obj["text"]), int(obj["prompt_tokens"]),
                                           int(obj["completion_tokens"]), str(obj["finish_reason"]))
        except (KeyError, TypeError, ValueError):
            raise RunFolderError(f"{display_path(path)}:{n}: not a stage cache entry",
                                 hint=f"Delete {display_path(path)}: it only saves model calls.") from None
    return cache


def _repair_tail(path: Path) -> int:
    """Cut a torn last line (bytes after the final newline) off the file. Returns the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        # scan back from the end for the last newline; torn tails are at most one batch of lines
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx != -1:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        if keep == size:
            return 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def _line(obj: dict) -> str:
    # ensure_ascii keeps lone surrogates and odd bytes from breaking the UTF-8 file; one object, one line
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n"


def _append_lines(path: Path, objs: list[dict]) -> None:
    data = "".join(_line(o) for o in objs).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step (a temporary file, fsynced, renamed over it): a reader or a kill
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class KeyedLog:
    """An append-only ``{"key": ..., "value": ...}`` JSONL file: work that is expensive to redo (``cai eval``'s
    answers and judgements), saved as it finishes. Each :meth:`add` is one write plus fsync, so a kill loses at most
    the batch in flight; a torn last line is cut off on open. Deleting the file only costs recomputation."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        self.values: dict[str, Any] = {}
        for n, obj in read_jsonl(path):
            if not isinstance(obj, dict) or "key" not in obj or "value" not in obj:
                raise RunFolderError(f"{display_path(path)}:{n}: not a cache entry (no key/value)",
                                     hint=f"Delete {display_path(path)}: it only saves recomputation.")
            self.values[obj["key"]] = obj["value"]

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def add(self, entries: dict[str, Any]) -> None:
        fresh = {k: v for k, v in entries.items() if k not in self.values}
        if fresh:
            _append_lines(self.path, [{"key": k, "value": v} for k, v in fresh.items()])
            self.values.update(fresh)


@contextlib.contextmanager
def folder_lock(root: Path, what: str, hint: str = "Wait for it to finish.") -> Iterator[None]:
    """Keep two cai processes out of one folder (a second one gets a clear error, not interleaved writes)."""
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RunFolderError(f"{display_path(root)} is in use by another cai process ({what})", hint=hint) from None
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
