"""Pairs → soft preference labels: each pair asked under its principles, in both orders, and averaged.

For a pair (a, b) and each principle drawn for it, the feedback model is asked with a shown as (A) ("ab") and, by
default, again with a shown as (B) ("ba"). Each reading is P(option A); as a judgement of the pair it is
``p_a = P(A)`` in order ab and ``1 − P(A)`` in order ba. With chain of thought each reading is first clamped to
``clamp`` (the paper: 40–60%). The label is the mean of the pair's judgements: averaging the two orders cancels a
labeller's preference for a position (Lee et al. 2023 found it preferring the same position 18–56% of the time),
averaging principles is the paper's ensemble. If any judgement could not be read, the pair is unlabelled.

Every reading is cached in ``RUN/label/judgements.jsonl`` under a key of the feedback model, the exact messages and
the settings, written as each batch finishes: a kill loses at most the batch in flight, and a principle edit asks
again only the questions that used it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from cai.core.constitution import Constitution
from cai.core.files import KeyedLog
from cai.core.hashing import feedback_key, preference_key
from cai.core.preference import Judgement, Order, Preference
from cai.core.prompts import Message
from cai.label.feedback import Feedback, Reading
from cai.label.pairs import Pair, draw_preference_principles
from cai.label.prompts import PREFERENCE_FORMAT, feedback_messages, frame_sha256

ORDERS: dict[str, tuple[Order, ...]] = {"both": ("ab", "ba"), "ab": ("ab",)}


@dataclass(frozen=True)
class LabelSettings:
    principles_per_pair: int = 1
    orders: str = "both"                      # "both" (debiased) or "ab" (one order: cheaper, biased)
    cot: bool = False
    clamp: tuple[float, float] = (0.4, 0.6)   # chain-of-thought readings are clamped to this (no effect without)
    seed: int = 0
    batch_size: int = 16                      # requests per call to the feedback model

    def check(self) -> None:
        from cai.core.errors import CaiError

        if self.principles_per_pair < 1:
            raise CaiError(f"--principles-per-pair must be at least 1, got {self.principles_per_pair}")
        if self.orders not in ORDERS:
            raise CaiError(f"--orders must be one of {', '.join(ORDERS)}, got {self.orders!r}")
        lo, hi = self.clamp
        if not (0.0 <= lo <= 0.5 <= hi <= 1.0):
            raise CaiError(f"--clamp must be two probabilities lo <= 0.5 <= hi, got {lo} {hi}")
        if self.batch_size < 1:
            raise CaiError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class _Question:
    pair: int
    principle: str
    order: Order
    messages: list[Message]
    key: str


@dataclass
class LabelStats:
    asked: int = 0          # questions sent to the feedback model now
    reused: int = 0         # questions answered from the cache
    unreadable: int = 0     # readings with no probability for either letter


@dataclass
class Labelled:
    preferences: list[Preference]
    stats: LabelStats = field(default_factory=LabelStats)


def label_pairs(pairs: list[Pair], c: Constitution, feedback: Feedback, settings: LabelSettings,
                cache: KeyedLog, provenance: dict[str, Any], progress: Callable[[int], None] | None = None,
                principles: list[tuple[str, ...] | None] | None = None) -> Labelled:
    """Label every pair; readings come from ``cache`` when it has them and are added to it as they are made.
    ``principles`` may name a pair's principles (None: drawn for it, ``settings.principles_per_pair`` of them)."""
    settings.check()
    orders = ORDERS[settings.orders]
    who = feedback.identity()
    frame = frame_sha256(c, settings.cot)
    given = principles or [None] * len(pairs)
    drawn = [g or draw_preference_principles(c, p.digest, settings.seed, settings.principles_per_pair)
             for p, g in zip(pairs, given)]
    questions: list[_Question] = []
    for i, (pair, pids) in enumerate(zip(pairs, drawn)):
        a, b = (r.text for r in pair.responses)
        for pid in pids:
            principle = c.preference_principle(pid)
            for order in orders:
                shown = (a, b) if order == "ab" else (b, a)
                messages = feedback_messages(c, pair.item.messages, principle, *shown, cot=settings.cot)
                questions.append(_Question(i, pid, order, messages,
                                           feedback_key(who, messages, settings.cot, settings.seed)))
    stats = LabelStats()
    todo = [q for q in questions if q.key not in cache]
    stats.reused = len(questions) - len(todo)
    if progress is not None and stats.reused:
        progress(stats.reused)
    for start in range(0, len(todo), settings.batch_size):      # questions of one pair stay together
        chunk = todo[start:start + settings.batch_size]
        readings = feedback.read([q.messages for q in chunk], settings.cot, settings.seed)
        cache.add({q.key: {"p_first": r.p_first, "cot": r.cot} for q, r in zip(chunk, readings)})
        stats.asked += len(chunk)
        if progress is not None:
            progress(len(chunk))
    judgements: list[list[Judgement]] = [[] for _ in pairs]
    for q in questions:
        reading = Reading(**cache[q.key])
        if reading.p_first is None:
            stats.unreadable += 1
        judgements[q.pair].append(_judgement(c, q, reading, settings))
    prefs = [_preference(pair, principles, js, c, who, frame, settings, provenance)
             for pair, principles, js in zip(pairs, drawn, judgements)]
    return Labelled(prefs, stats)


def _judgement(c: Constitution, q: _Question, r: Reading, settings: LabelSettings) -> Judgement:
    p = r.p_first
    if p is not None and settings.cot:
        lo, hi = settings.clamp
        p = min(hi, max(lo, p))
    p_a = None if p is None else (p if q.order == "ab" else 1.0 - p)
    return Judgement(principle=q.principle, principle_sha256=c.preference_principle(q.principle).sha256,
                     order=q.order, p_a=_round(p_a), p_first=_round(r.p_first), cot=r.cot)


def _preference(pair: Pair, principles: tuple[str, ...], judgements: list[Judgement], c: Constitution,
                who: dict[str, Any], frame: str, settings: LabelSettings, provenance: dict[str, Any]) -> Preference:
    values = [j.p_a for j in judgements]
    label = None if any(v is None for v in values) else _round(mean(v for v in values if v is not None))
    how = {"orders": list(ORDERS[settings.orders]), "cot": settings.cot,
           "clamp": list(settings.clamp) if settings.cot else None, "seed": settings.seed}
    key = preference_key({"messages": pair.item.messages, "responses": [r.text for r in pair.responses],
                          "principles": [c.preference_principle(p).sha256 for p in principles],
                          "frame": frame, "feedback": who, **how})
    return Preference(
        id=key, prompt_id=pair.item.id, category=pair.item.category, messages=list(pair.item.messages),
        responses=list(pair.responses), judgements=judgements, label=label,
        status="unlabelled" if label is None else "labelled",
        provenance={"feedback": who, "principles": list(principles), "format": PREFERENCE_FORMAT,
                    "frame_sha256": frame, **how, **provenance})


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)
