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
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cai.backends.base import Completion
from cai.core.errors import RunFolderError, display_path
from cai.core.files import (
    append_lines,
    folder_lock,
    fsync_dir,
    json_line,
    read_jsonl,
    repair_tail,
)
from cai.core.record import Record


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

    def append(self, records: list[Record]) -> int:
        """Append records whose id is new, as one write, then fsync. Returns how many were written."""
        fresh = [r.to_json() for r in records if r.id not in self.records]
        if not fresh:
            return 0
        append_lines(self.records_path, fresh)
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
        append_lines(self.root / STAGES_FILE, [_stagejson_line(k, stage, c) for k, stage, c in fresh])
        for k, _, c in fresh:
            self.stages[k] = c

    def append_error(self, entry: dict) -> None:
        append_lines(self.root / "errors.jsonl", [entry])

    def supersede(self, ids: set[str]) -> int:
        """Move these records to superseded.jsonl; rewrite records.jsonl without them (atomically)."""
        moving = [self.records[i] for i in ids if i in self.records]
        if not moving:
            return 0
        already = {obj.get("id") for _, obj in read_jsonl(self.root / "superseded.jsonl")}
        append_lines(self.root / "superseded.jsonl", [r for r in moving if r["id"] not in already])
        keep = [r for i, r in self.records.items() if i not in ids]
        tmp = self.records_path.with_suffix(".jsonl.tmp")
        with open(tmp, "wb") as fh:
            fh.write("".join(json_line(r) for r in keep).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.records_path)
        fsync_dir(self.root)
        self.records = {r["id"]: r for r in keep}
        return len(moving)


@contextlib.contextmanager
def open_store(root: str | Path) -> Iterator[OpenStore]:
    root = Path(root)
    with folder_lock(root, "cai generate", hint="Wait for it to finish, or choose another --out folder."):
        store = OpenStore(root)
        store.torn_bytes = repair_tail(store.records_path)
        for n, obj in read_jsonl(store.records_path):
            if not isinstance(obj, dict) or "id" not in obj or "prompt_id" not in obj:
                raise RunFolderError(f"{display_path(store.records_path)}:{n}: not a record (no id/prompt_id)")
            store.records.setdefault(obj["id"], obj)
        repair_tail(root / STAGES_FILE)
        store.stages = read_stage_cache(root)
        yield store


STAGES_FILE = "stages.jsonl"


def _stagejson_line(key: str, stage: str, c: Completion) -> dict:
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
