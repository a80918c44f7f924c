"""From the log of reviews to one outcome per item: what trains, what is left out, what needs a look again.

Per item, each reviewer's latest review of the item's *current* content counts (reviews of older content are
"stale": the item needs review again). When reviewers disagree, ``rule`` decides:

- ``any-reject`` (default): one reject leaves the item out; otherwise the latest edit's text (or an accept) stands.
- ``latest``: the most recent decision of any reviewer stands.
- ``unanimous``: reviewers who disagree leave the item out (as a conflict).

Every disagreement is reported (:func:`summarize`), with the agreement between each two reviewers over the items
both reviewed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from cai.review.store import Review

RULES = ("any-reject", "latest", "unanimous")
Status = Literal["unreviewed", "stale", "accepted", "rejected", "edited", "flipped", "tie", "conflict"]
_STATUS = {"accept": "accepted", "reject": "rejected", "edit": "edited", "flip": "flipped", "tie": "tie"}


@dataclass
class Outcome:
    """One item's outcome. ``text``: the edited final text (status "edited"); ``decisions``: each reviewer's."""

    status: Status
    text: str | None = None
    decisions: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    @property
    def reviewed(self) -> bool:
        return self.status not in ("unreviewed", "stale")

    @property
    def disagreement(self) -> bool:
        return len(set(self.decisions.values())) > 1


def latest_by_reviewer(reviews: Iterable[Review]) -> dict[str, dict[str, Review]]:
    """target → reviewer → that reviewer's latest review of the target (any content)."""
    out: dict[str, dict[str, Review]] = {}
    for r in reviews:               # in file order: a later line is a later decision
        out.setdefault(r.target, {})[r.reviewer] = r
    return out


def resolve(reviews: list[Review], digests: dict[str, str], rule: str = "any-reject") -> dict[str, Outcome]:
    """The outcome of every item in ``digests`` (item id → sha256 of its current content)."""
    if rule not in RULES:
        raise ValueError(f"unknown review rule {rule!r} (choose from {', '.join(RULES)})")
    latest = latest_by_reviewer(reviews)
    order = {id(r): n for n, r in enumerate(reviews)}
    out: dict[str, Outcome] = {}
    for target, digest in digests.items():
        mine = latest.get(target, {})
        current = {who: r for who, r in mine.items() if r.content_sha256 == digest}
        if not current:
            out[target] = Outcome("stale" if mine else "unreviewed")
            continue
        decisions: dict[str, str] = {who: r.decision for who, r in current.items()}
        ranked = sorted(current.values(), key=lambda r: order[id(r)])
        out[target] = _apply(rule, ranked, decisions)
    return out


def _apply(rule: str, ranked: list[Review], decisions: dict[str, str]) -> Outcome:
    last = ranked[-1]
    if len(set(decisions.values())) > 1:
        if rule == "unanimous":
            return Outcome("conflict", decisions=decisions)
        if rule == "any-reject":
            rejects = [r for r in ranked if r.decision == "reject"]
            if rejects:
                return Outcome("rejected", decisions=decisions, reason=rejects[-1].reason)
            edits = [r for r in ranked if r.decision == "edit"]
            if edits:
                return Outcome("edited", edits[-1].text, decisions, edits[-1].reason)
    return Outcome(_STATUS[last.decision], last.text if last.decision == "edit" else None, decisions, last.reason)  # type: ignore[arg-type]


@dataclass
class Summary:
    items: int
    reviewed: int
    stale: int
    by_status: dict[str, int]
    disagreements: list[str]                               # item ids where reviewers differ
    agreement: dict[str, dict[str, float | int]]           # "a | b" → {"items": n, "agree": share}
    reviewers: list[str]


def summarize(outcomes: dict[str, Outcome]) -> Summary:
    by_status: dict[str, int] = {}
    for o in outcomes.values():
        by_status[o.status] = by_status.get(o.status, 0) + 1
    reviewers = sorted({who for o in outcomes.values() for who in o.decisions})
    agreement: dict[str, dict[str, float | int]] = {}
    for a, b in itertools.combinations(reviewers, 2):
        both = [o for o in outcomes.values() if a in o.decisions and b in o.decisions]
        if both:
            same = sum(o.decisions[a] == o.decisions[b] for o in both)
            agreement[f"{a} | {b}"] = {"items": len(both), "agree": round(same / len(both), 4)}
    return Summary(items=len(outcomes), reviewed=sum(o.reviewed for o in outcomes.values()),
                   stale=by_status.get("stale", 0), by_status=dict(sorted(by_status.items())),
                   disagreements=sorted(t for t, o in outcomes.items() if o.disagreement), agreement=agreement,
                   reviewers=reviewers)
