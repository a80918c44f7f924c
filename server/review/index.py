"""One run folder's review index: every record and pair with what the queue filters and sorts on, and each one's
outcome under the rule. Built once; :meth:`RunIndex.refresh` (called by every request) costs three ``stat`` calls
when nothing changed on disk.

- ``records.jsonl`` or ``preferences.jsonl`` changed (size, mtime or inode differ: ``cai generate`` or ``cai label``
  wrote more, or superseded records): the items are read again and every outcome recomputed.
- ``reviews.jsonl`` grew (this server, another reviewer's server, ``cai review import``): only the new complete
  lines are read, from where the last read stopped, and only the items they name are resolved again. A file that
  shrank or was replaced is read again whole.

Item ids are keys into this index and nothing else: no id is ever made into a path.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cai.core.preference import Preference, read_preferences
from cai.core.record import Record, read_records
from cai.review.decisions import Outcome, resolve
from cai.review.store import Review, ReviewStore, parse_lines, preference_digest, record_digest
from cai.run import RunFolder

Kind = Literal["record", "preference"]
SNIPPET = 160                      # characters of the last user turn the queue shows


@dataclass
class Item:
    """One row of the queue."""

    id: str
    kind: Kind
    position: int                  # its line in records.jsonl, then preferences.jsonl (the default order)
    digest: str                    # sha256 of the content a reviewer sees (cai.review.store)
    category: str
    flags: tuple[str, ...]
    principles: tuple[str, ...]
    snippet: str
    outcome: Outcome


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _snippet(messages: list) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = " ".join((users[-1] if users else "").split())
    return text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…"


class RunIndex:
    """The review state of one run folder, shared by the requests of one server (thread-safe)."""

    def __init__(self, name: str, root: str | Path, rule: str = "any-reject"):
        self.name, self.folder, self.rule = name, RunFolder(root), rule
        self.store = ReviewStore(self.folder.reviews)
        self.items: list[Item] = []
        self.by_id: dict[str, Item] = {}
        self.records: dict[str, Record] = {}
        self.prefs: dict[str, Preference] = {}
        self.reviews: dict[str, list[Review]] = {}       # target → its reviews in file order
        self.version = 0                                  # bumped by every change the index sees
        self._lock = threading.Lock()
        self._items_sig: tuple | None = ()                # () : never read
        self._reviews_sig: tuple[int, int, int] | None = None
        self._inode: int | None = None                    # of the reviews.jsonl read
        self._offset = 0                                  # bytes of reviews.jsonl read (complete lines only)
        self._lines = 0

    # -- reading ----------------------------------------------------------------------------------------------
    def refresh(self) -> RunIndex:
        with self._lock:
            sig = (_signature(self.folder.records), _signature(self.folder.preferences))
            reload = sig != self._items_sig
            if reload:
                self._load_items()
                self._items_sig = sig
            touched = self._read_reviews()
            if reload or touched is None:
                targets = list(self.by_id)
            else:
                targets = [t for t in touched if t in self.by_id]
            for t in targets:
                self._resolve(self.by_id[t])
            if reload or touched is None or touched:
                self.version += 1
        return self

    def _load_items(self) -> None:
        records = read_records(self.folder.records) if self.folder.records.exists() else []
        prefs = read_preferences(self.folder.preferences) if self.folder.preferences.exists() else []
        items: list[Item] = []
        for r in records:
            items.append(Item(r.id, "record", len(items), record_digest(r), r.category or "", tuple(r.flags),
                              tuple(x.principle for x in r.rounds), _snippet(list(r.messages)), Outcome("unreviewed")))
        for p in prefs:
            principles = tuple(dict.fromkeys(j.principle for j in p.judgements)) or tuple(
                p.provenance.get("principles") or ())
            flags = tuple(f for x in p.responses for f in (getattr(x, "flags", None) or []))
            items.append(Item(p.id, "preference", len(items), preference_digest(p), p.category or "",
                              tuple(dict.fromkeys(flags)), principles, _snippet(list(p.messages)),
                              Outcome("unreviewed")))
        self.records = {r.id: r for r in records}
        self.prefs = {p.id: p for p in prefs}
        self.items = items
        self.by_id = {i.id: i for i in items}

    def _read_reviews(self) -> set[str] | None:
        """Read what was appended since the last time: the targets it names, or None when all was read again."""
        path = self.folder.reviews
        sig = _signature(path)
        if sig == self._reviews_sig:
            return set()
        if sig is None:                            # removed: nothing applies any more
            had = self._inode is not None
            self.reviews, self._offset, self._lines, self._inode, self._reviews_sig = {}, 0, 0, None, None
            return None if had else set()
        whole = sig[2] != self._inode or sig[1] < self._offset      # first read, replaced, or shrunk
        if whole:
            self.reviews, self._offset, self._lines = {}, 0, 0
        with open(path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1               # a line still being written (no newline yet) waits for next time
        new = parse_lines(data[:end], path, self._lines + 1)
        self._offset += end
        self._lines += data[:end].count(b"\n")
        self._inode = sig[2]
        self._reviews_sig = sig if end == len(data) else (0, 0, 0)     # a partial line: look again next time
        for r in new:
            self.reviews.setdefault(r.target, []).append(r)
        return None if whole else {r.target for r in new}

    def _resolve(self, item: Item) -> None:
        mine = [r for r in self.reviews.get(item.id, []) if r.kind == item.kind]
        item.outcome = resolve(mine, {item.id: item.digest}, self.rule)[item.id]

    # -- what requests ask --------------------------------------------------------------------------------------
    def get(self, item_id: str) -> Item | None:
        return self.by_id.get(item_id)

    def reviews_of(self, item: Item) -> list[Review]:
        return [r for r in self.reviews.get(item.id, []) if r.kind == item.kind]

    def append(self, review: Review) -> Review:
        """Write a decision (fsynced), then take it (and whatever else was appended meanwhile) into the index."""
        written = self.store.append(review)
        self.refresh()
        return written
