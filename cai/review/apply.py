"""How people's decisions apply to what trains (``cai data build``), and the card's account of them.

Each record and pair of the run gets its outcome (:func:`cai.review.decisions.resolve`, under ``rule``) from the
reviews of its *current* content; a review of older content does not apply (the item is "stale": it needs review
again). Then:

- **records**: rejected (or, under ``unanimous``, disputed: "conflict") ones are left out of SFT and of the records'
  DPO pairs. An edited one trains on the person's text: it is the SFT completion and the DPO ``chosen`` (the initial
  answer stays ``rejected``); with ``--all-rounds`` it replaces the last round's revision. The flags of the model's
  final text do not apply to a person's text; every other flag still does. An accept is not an exception to the
  flags: a flagged record a person accepted still needs ``--allow-flag`` (the page says so beside the flag).
- **pairs** (``--preferences``): agree keeps the AI label's choice, flip swaps ``chosen`` and ``rejected``; both
  are a person's decision, so the row's ``label`` is 1.0 (certain), whatever the feedback model's probability was
  (its probability says how sure *it* was; after a flip it would say nothing true of the other answer), and the
  ``--min-confidence`` cut, which is about the feedback model's confidence, does not apply to them. Tie and reject
  leave the pair out (a tie has no better answer to learn).
- ``require`` (``--require-review``): only what a person accepted or edited trains (and pairs they agreed with or
  flipped); unreviewed and stale items are left out, and counted.

Rows built from a reviewed item carry a tag (:data:`TAG`) while the build counts them; it is removed before a row
is written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cai.core.errors import DataError
from cai.core.hashing import file_sha256
from cai.core.preference import Preference
from cai.core.record import Record
from cai.review.decisions import RULES, Outcome, resolve, summarize
from cai.review.store import Review, ReviewStore, preference_digest, record_digest
from cai.run import RunFolder

TAG = "_review"                  # a row's review tag while building: "accepted", "edited", "agreed", "flipped"
LEFT_OUT = ("rejected", "conflict", "tie")


@dataclass
class ReviewState:
    """The outcomes of a run's records and pairs, and how the build applies them."""

    rule: str = "any-reject"
    require: bool = False
    reviews: list[Review] = field(default_factory=list)
    records: dict[str, Outcome] = field(default_factory=dict)
    preferences: dict[str, Outcome] = field(default_factory=dict)
    sha256: str | None = None                 # of reviews.jsonl as read
    file: str | None = None

    def record(self, rec: Record) -> tuple[Record | None, str | None, str | None]:
        """(the record to train on, or None; why it is left out; its rows' tag)."""
        o = self.records.get(rec.id)
        status = o.status if o else "unreviewed"
        if status in LEFT_OUT:
            return None, f"review:{status}", None
        if status == "edited" and o is not None and o.text is not None:
            return edited(rec, o.text), None, "edited"
        if status == "accepted":
            return rec, None, "accepted"
        if self.require:
            return None, f"review:{status}", None
        return rec, None, None

    def pair(self, pref: Preference) -> tuple[str | None, str | None]:
        """(``agreed`` | ``flipped`` | None: the AI label stands; why the pair is left out, or None)."""
        o = self.preferences.get(pref.id)
        status = o.status if o else "unreviewed"
        if status in LEFT_OUT:
            return None, f"review:{status}"
        if status in ("accepted", "flipped"):
            if pref.chosen_index is not None:
                return ("agreed" if status == "accepted" else "flipped"), None
            return None, "unlabelled" if self.require else None     # nothing to agree with or flip
        if self.require:
            return None, f"review:{status}"
        return None, None


def edited(rec: Record, text: str) -> Record:
    """``rec`` with a person's final text: the last round's revision (and the final) replaced, that revision's flags
    gone (they were the model's text's); the record's flags recomputed as the generator computes them."""
    if not rec.rounds:
        return rec.model_copy(update={"final": text, "initial_flags": [], "flags": []})
    last = rec.rounds[-1].model_copy(update={"revision": text, "flags": [f for f in rec.rounds[-1].flags
                                                                       if f.startswith("critique_")]})
    rounds = [*rec.rounds[:-1], last]
    flags = list(dict.fromkeys(rec.initial_flags + [f for r in rounds for f in r.flags
                                                    if not f.startswith("critique_")]))
    return rec.model_copy(update={"final": text, "rounds": rounds, "flags": flags})


def load_reviews(folder: RunFolder, records: list[Record], prefs: list[Preference] | None, *, rule: str = "any-reject",
                 require: bool = False) -> ReviewState:
    """The outcomes of ``records`` and ``prefs`` from ``RUN/reviews.jsonl`` (none there: every item unreviewed)."""
    if rule not in RULES:
        raise DataError(f"--review-rule must be one of {', '.join(RULES)}, got {rule!r}")
    state = ReviewState(rule=rule, require=require)
    path = folder.reviews
    if path.exists():
        state.reviews = ReviewStore(path).read()
        state.sha256, state.file = file_sha256(path), folder.rel(path)
    elif require:
        raise DataError(f"--require-review: {folder.shown()} has no reviews yet (no {path.name})",
                        hint=f"Review its records first: `cai review {folder.shown()}` serves the review page.")
    by_kind: dict[str, list[Review]] = {"record": [], "preference": []}
    for r in state.reviews:
        by_kind[r.kind].append(r)
    state.records = resolve(by_kind["record"], {r.id: record_digest(r) for r in records}, rule)
    if prefs is not None:
        state.preferences = resolve(by_kind["preference"], {p.id: preference_digest(p) for p in prefs}, rule)
    return state


def figures(state: ReviewState, rows: dict[str, list[dict]]) -> dict[str, Any]:
    """The card's ``review`` section ({} when the run has no reviews and none were required): the rule, the file,
    per kind of item how many were reviewed, accepted, edited, rejected, in conflict, stale, unreviewed, and the
    reviewers' disagreements and agreement; per kind of row (sft, dpo) how many written rows a person reviewed,
    edited (or agreed with, flipped)."""
    if not state.reviews and not state.require:
        return {}
    out: dict[str, Any] = {"rule": state.rule, "require_review": state.require, "file": state.file,
                           "sha256": state.sha256, "reviews": len(state.reviews),
                           "reviewers": sorted({r.reviewer for r in state.reviews})}
    kinds = [("records", state.records)] + ([("preferences", state.preferences)] if state.preferences else [])
    agreement: dict[str, Any] = {}
    for name, outcomes in kinds:
        s = summarize(outcomes)
        b = s.by_status
        out[name] = {"items": s.items, "reviewed": s.reviewed, "stale": s.stale,
                     "unreviewed": b.get("unreviewed", 0), "rejected": b.get("rejected", 0),
                     "conflicts": b.get("conflict", 0), "disagreements": len(s.disagreements),
                     **({"accepted": b.get("accepted", 0), "edited": b.get("edited", 0)} if name == "records" else
                        {"agreed": b.get("accepted", 0), "flipped": b.get("flipped", 0), "tie": b.get("tie", 0)})}
        if s.agreement:
            agreement[name] = s.agreement
    out["agreement"] = agreement
    counted: dict[str, dict[str, int]] = {}
    for kind in ("sft", "dpo"):
        tags = Counter(row.get(TAG) for name, rs in rows.items() if name.startswith(kind) for row in rs)
        counted[kind] = {"rows": sum(tags.values()), "reviewed": sum(n for t, n in tags.items() if t),
                         **{t: n for t, n in sorted((t, n) for t, n in tags.items() if t)}}
    out["rows"] = counted
    return out


def render(r: dict[str, Any]) -> list[str]:
    """The card's README section on the reviews."""
    lines = ["## Human review", "",
             f"Decisions from `{r['file']}` (sha256 `{(r['sha256'] or '')[:16]}`; {r['reviews']} reviews by "
             f"{', '.join(r['reviewers']) or 'nobody'}), conflicts resolved by `{r['rule']}`"
             + ("; **only reviewed items trained** (`--require-review`)." if r["require_review"] else
                "; items nobody reviewed trained as generated."), ""]
    for name in ("records", "preferences"):
        k = r.get(name)
        if k:
            decided = (f"{k['accepted']} accepted, {k['edited']} edited" if name == "records" else
                       f"{k['agreed']} agreed with the AI label, {k['flipped']} flipped, {k['tie']} tie")
            lines.append(f"- {name}: {k['reviewed']} of {k['items']} reviewed ({decided}, {k['rejected']} rejected, "
                         f"{k['conflicts']} in conflict); {k['stale']} need review again, {k['unreviewed']} "
                         f"unreviewed; reviewers disagreed on {k['disagreements']}")
    for kind, c in r["rows"].items():
        detail = ", ".join(f"{t} {n}" for t, n in c.items() if t not in ("rows", "reviewed"))
        lines.append(f"- {kind} rows: {c['reviewed']} of {c['rows']} from reviewed items"
                     + (f" ({detail})" if detail else ""))
    for name, pairs in r.get("agreement", {}).items():
        lines.append(f"- agreement ({name}): " + ", ".join(f"{who} {a['agree']:.0%} of {a['items']}"
                                                           for who, a in pairs.items()))
    return lines
