"""``RUN/reviews.jsonl``: what people decided about records and preference pairs, append-only.

One :class:`Review` a line: the item (a record's or a preference's id), the sha256 of the content the reviewer saw
(:func:`record_digest`, :func:`preference_digest`), who, the decision, an edited text or a reason, and when. Lines
are only ever appended, each in one write, fsynced, under a lock (a thread lock for the server's requests and a file
lock for other processes), so two reviewers at once lose neither's decisions and a crash loses at most the line in
flight (a torn last line is cut off on the next open). Nothing is rewritten: a changed mind is a new line, and the
latest line per reviewer and item is that reviewer's decision.

A review applies only to the content it was made on: a record regenerated after a constitution edit has new content
(and usually a new id), so an old review of it no longer applies ("needs review again").
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.core.errors import RunFolderError, display_path
from cai.core.hashing import content_digest
from cai.core.preference import Preference
from cai.core.record import Record

Decision = Literal["accept", "reject", "edit", "flip", "tie"]
Kind = Literal["record", "preference"]
RECORD_DECISIONS = ("accept", "reject", "edit")
PREFERENCE_DECISIONS = ("accept", "flip", "tie", "reject")    # accept: agree with the AI label
MAX_TEXT = 100_000          # characters of an edited text or a reason


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str
    kind: Kind
    content_sha256: str
    reviewer: str = Field(min_length=1, max_length=200)
    decision: Decision
    text: str | None = Field(default=None, max_length=MAX_TEXT)    # the edited final text ("edit")
    reason: str | None = Field(default=None, max_length=MAX_TEXT)
    at: str = ""                                                   # ISO time, UTC
    source: str | None = None                                      # "page", "label-studio", ...

    def check(self) -> None:
        allowed = RECORD_DECISIONS if self.kind == "record" else PREFERENCE_DECISIONS
        if self.decision not in allowed:
            raise ValueError(f"a {self.kind} can be {', '.join(allowed)}, not {self.decision!r}")
        if self.decision == "edit" and not (self.text or "").strip():
            raise ValueError("an edit needs the edited text")
        if not self.reviewer.strip():
            raise ValueError("a review needs a reviewer")


def record_digest(record: Record) -> str:
    """What a reviewer of a record sees: the conversation, the first answer, each round, the final text."""
    return content_digest({"messages": record.messages, "initial": record.initial, "final": record.final,
                           "rounds": [[r.principle, r.critique, r.revision] for r in record.rounds]})


def preference_digest(pref: Preference) -> str:
    """What a reviewer of a pair sees: the conversation, both answers and which one the AI label prefers."""
    return content_digest({"messages": pref.messages, "responses": [r.text for r in pref.responses],
                           "chosen": pref.chosen_index})


class ReviewStore:
    """The reviews of one run folder. Safe for many threads in one process and for several processes."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, review: Review) -> Review:
        """Write one decision (stamped with the time if it has none), fsynced before it returns; returns it as
        written. A torn last line left by a crash is cut off first, under the same lock, so the new line never joins
        it (which would make both unreadable)."""
        review.check()
        if not review.at:
            review = review.model_copy(update={"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
        line = (json.dumps(review.model_dump(mode="json", exclude_none=True), ensure_ascii=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    _cut_torn_tail(fh)
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        return review

    def read(self) -> list[Review]:
        """Every decision, in the order they were made. A torn last line (a crash mid-write) is cut off: under the
        file lock, so a line another process is writing at this moment is never taken for a torn one."""
        with self._lock:
            if not self.path.exists():
                return []
            with open(self.path, "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    _cut_torn_tail(fh)
                    fh.seek(0)
                    data = fh.read()
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return parse_lines(data, self.path)


def parse_lines(data: bytes, path: Path, first_line: int = 1) -> list[Review]:
    """The reviews of complete lines of ``reviews.jsonl`` (``data`` ends with a newline, or its last piece is
    ignored); ``first_line`` numbers the first of them in errors."""
    out = []
    for n, raw in enumerate(data.split(b"\n")[:-1], start=first_line):
        if not raw.strip():
            continue
        try:
            out.append(Review.model_validate_json(raw))
        except Exception as e:
            raise RunFolderError(f"{display_path(path)}:{n}: not a review: {str(e).splitlines()[0]}",
                                 hint="reviews.jsonl is append-only and written by cai; fix or remove "
                                      "that line by hand.") from None
    return out


def _cut_torn_tail(fh) -> None:
    """Truncate ``fh`` (open for reading and appending, locked) after its last newline."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    pos, keep = size, 0
    while pos > 0:
        start = max(0, pos - (1 << 16))
        fh.seek(start)
        idx = fh.read(pos - start).rfind(b"\n")
        if idx != -1:
            keep = start + idx + 1
            break
        pos = start
    fh.truncate(keep)
    fh.flush()
    os.fsync(fh.fileno())
