"""The review page's work, without HTTP: the queue (filtered, sorted, paged on the server), one item with what the
page shows beside it, a decision, a run's progress. Raises the server's own errors (``NotFound``,
``InvalidRequest``, ``Conflict``); the routes turn answers into HTML or JSON."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cai.core.preference import Preference
from cai.core.record import Record
from cai.review.decisions import summarize
from cai.review.store import PREFERENCE_DECISIONS, RECORD_DECISIONS, Review
from server.errors import Conflict, InvalidRequest, NotFound
from server.review.diff import word_diff
from server.review.index import Item, RunIndex
from server.review.protocol import (
    DecisionRequest,
    DecisionResponse,
    Progress,
    QueuePage,
    QueueQuery,
    QueueRow,
    RunStatus,
)

_SORT_KEYS = {
    "position": lambda i: i.position,
    "id": lambda i: i.id,
    "category": lambda i: (i.category, i.position),
    "status": lambda i: (i.outcome.status, i.position),
    "flags": lambda i: (len(i.flags), i.flags, i.position),
    "principle": lambda i: (i.principles[:1], i.position),
    "prompt": lambda i: (i.snippet.lower(), i.position),
}


def _matches(i: Item, q: QueueQuery, words: list[str]) -> bool:
    o = i.outcome
    if q.kind and i.kind != q.kind:
        return False
    if q.flag and not (bool(i.flags) if q.flag == "any" else not i.flags if q.flag == "none" else q.flag in i.flags):
        return False
    if q.principle and q.principle not in i.principles:
        return False
    if q.category and i.category != q.category:
        return False
    if q.status and not (o.status in ("unreviewed", "stale") if q.status == "todo" else o.reviewed
                         if q.status == "reviewed" else o.disagreement if q.status == "disagreement"
                         else o.status == q.status):
        return False
    if q.reviewer and q.reviewer not in o.decisions:
        return False
    return all(w in i.snippet.lower() for w in words)


@dataclass
class ItemView:
    """What the record or pair page shows."""

    run: str
    item: Item
    record: Record | None
    pair: Preference | None
    reviews: list[tuple[Review, bool]]             # every review of the item, and whether it is of this content
    diff: list[tuple[str, str]] | None = None      # the first answer → the final text, word by word
    prev_id: str | None = None
    next_id: str | None = None
    place: int = 0                                  # 1-based, in the queue as filtered
    total: int = 0
    query: dict[str, str] = field(default_factory=dict)


class ReviewServing:
    """The review state of the run folders one server shows, by name."""

    def __init__(self, runs: dict[str, str], rule: str = "any-reject"):
        self.indexes = {name: RunIndex(name, path, rule) for name, path in runs.items()}
        # (run, version, query) → the rows in order, and ("status" | ..., run, version) → a summary: until it changes
        self._rows: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def load(self) -> None:
        for idx in self.indexes.values():
            idx.refresh()

    def names(self) -> list[str]:
        return list(self.indexes)

    def index(self, run: str) -> RunIndex:
        idx = self.indexes.get(run)
        if idx is None:
            raise NotFound(f"unknown run {run!r}; this server shows: {', '.join(self.indexes) or 'none'}", "run",
                           "run_not_found")
        return idx.refresh()

    # -- the queue ----------------------------------------------------------------------------------------------
    def rows(self, idx: RunIndex, q: QueueQuery) -> list[Item]:
        """The items matching ``q`` in its order (every page of them), cached until the index changes."""
        key = (idx.name, idx.version, tuple(sorted(q.params(page=1, per_page=0).items())))
        with self._lock:
            hit = self._rows.get(key)
            if hit is not None:
                self._rows.move_to_end(key)
                return hit
        words = (q.q or "").lower().split()
        out = sorted((i for i in idx.items if _matches(i, q, words)), key=_SORT_KEYS[q.sort],
                     reverse=q.order == "desc")
        with self._lock:
            self._rows[key] = out
            while len(self._rows) > 64:
                self._rows.popitem(last=False)
        return out

    def _memo(self, what: str, idx: RunIndex, make):
        """``make()``, computed once per version of the index (the queue page asks for several summaries)."""
        key = (what, idx.name, idx.version)
        with self._lock:
            if key in self._rows:
                return self._rows[key]
        value = make()
        with self._lock:
            self._rows[key] = value
            while len(self._rows) > 64:
                self._rows.popitem(last=False)
        return value

    def progress(self, idx: RunIndex) -> Progress:
        return self._memo("progress", idx, lambda: self._progress(idx))

    def _progress(self, idx: RunIndex) -> Progress:
        items = idx.items
        return Progress(items=len(items), reviewed=sum(i.outcome.reviewed for i in items),
                        stale=sum(i.outcome.status == "stale" for i in items),
                        conflicts=sum(i.outcome.disagreement for i in items))

    def queue(self, run: str, q: QueueQuery) -> QueuePage:
        idx = self.index(run)
        rows = self.rows(idx, q)
        pages = max(1, math.ceil(len(rows) / q.per_page))
        start = (q.page - 1) * q.per_page
        return QueuePage(run=run, total=len(rows), page=q.page, pages=pages, per_page=q.per_page,
                         rows=[QueueRow(id=i.id, kind=i.kind, category=i.category, flags=list(i.flags),
                                        principles=list(i.principles), prompt=i.snippet, status=i.outcome.status,
                                        decisions=dict(i.outcome.decisions)) for i in rows[start:start + q.per_page]],
                         progress=self.progress(idx))

    def choices(self, run: str) -> dict[str, list[str]]:
        """The values the queue's filters offer: flags, principles, categories, reviewers seen in the run."""
        idx = self.index(run)
        return self._memo("choices", idx, lambda: {
            "flag": sorted({f for i in idx.items for f in i.flags}),
            "principle": sorted({p for i in idx.items for p in i.principles}),
            "category": sorted({i.category for i in idx.items if i.category}),
            "reviewer": sorted({r.reviewer for rs in idx.reviews.values() for r in rs})})

    def status(self, run: str) -> RunStatus:
        idx = self.index(run)
        return self._memo("status", idx, lambda: self._status(run, idx))

    def _status(self, run: str, idx: RunIndex) -> RunStatus:
        s = summarize({i.id: i.outcome for i in idx.items})
        return RunStatus(run=run, path=str(idx.folder.root), records=len(idx.records), preferences=len(idx.prefs),
                         progress=self.progress(idx), by_status=s.by_status, reviewers=s.reviewers,
                         agreement=s.agreement, disagreements=s.disagreements)

    # -- one item -----------------------------------------------------------------------------------------------
    def _item(self, idx: RunIndex, item_id: str) -> Item:
        item = idx.get(item_id)
        if item is None:
            raise NotFound(f"run {idx.name!r} has no record or pair with id {item_id!r}", "id", "item_not_found")
        return item

    def item(self, run: str, item_id: str, q: QueueQuery) -> ItemView:
        idx = self.index(run)
        item = self._item(idx, item_id)
        reviews = [(r, r.content_sha256 == item.digest) for r in idx.reviews_of(item)]
        view = ItemView(run, item, idx.records.get(item_id) if item.kind == "record" else None,
                        idx.prefs.get(item_id) if item.kind == "preference" else None, reviews,
                        query=q.params(page=1))
        if view.record is not None:
            view.diff = word_diff(view.record.initial, view.record.final)
        rows = self.rows(idx, q)
        at = next((n for n, i in enumerate(rows) if i.id == item_id), None)
        view.total = len(rows)
        if at is not None:
            view.place = at + 1
            view.prev_id = rows[at - 1].id if at > 0 else None
            view.next_id = rows[at + 1].id if at + 1 < len(rows) else None
        return view

    def decide(self, run: str, item_id: str, body: DecisionRequest, reviewer: str) -> DecisionResponse:
        """Record one decision (fsynced before this returns) and answer with the item's outcome now."""
        idx = self.index(run)
        item = self._item(idx, item_id)
        allowed = RECORD_DECISIONS if item.kind == "record" else PREFERENCE_DECISIONS
        if body.decision not in allowed:
            raise InvalidRequest(f"a {item.kind} can be {', '.join(allowed)}, not {body.decision!r}", "decision",
                                 "invalid_decision")
        if body.content_sha256 != item.digest:
            raise Conflict(f"{item.kind} {item_id} changed since it was opened (it was regenerated or relabelled); "
                           "reload it and review what it says now", "content_sha256", "content_changed")
        text = body.text if body.decision == "edit" else None
        if body.decision == "edit" and not (text or "").strip():
            raise InvalidRequest("an edit needs the edited text", "text", "missing_text")
        if body.decision == "reject" and not (body.reason or "").strip():
            raise InvalidRequest("a reject needs a reason (it tells the next reviewer, and the card, why)", "reason",
                                 "missing_reason")
        if item.kind == "preference" and body.decision in ("accept", "flip") and idx.prefs[item_id].label is None:
            raise InvalidRequest("this pair has no AI label to agree with or flip; tie or reject it", "decision",
                                 "no_label")
        written = idx.append(Review(target=item_id, kind=item.kind, content_sha256=item.digest, reviewer=reviewer,
                                    decision=body.decision, text=text, reason=body.reason or None, source="page"))
        now = idx.get(item_id) or item
        return DecisionResponse(id=item_id, kind=item.kind, decision=written.decision, reviewer=reviewer,
                                at=written.at, status=now.outcome.status, decisions=dict(now.outcome.decisions),
                                progress=self.progress(idx))


def ai_label(pref: Preference) -> dict[str, Any]:
    """The AI label as the pair page suggests it: which answer (1 or 2) and how sure, or none."""
    if pref.chosen_index is None:
        return {"answer": None, "confidence": None}
    return {"answer": pref.chosen_index + 1, "confidence": round(pref.confidence or 0.0, 3)}
