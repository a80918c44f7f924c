"""``cai label --check``: can this feedback model be trusted? Its labels on pairs whose better side is known.

The comparison set (``data/labeller_check.jsonl``, written for this project: harm, over-refusal traps where the
refusal is the worse answer, honesty, quality) is labelled exactly as a run's pairs are: the same prompt layout,
principles, orders and settings. Each item is asked under its own principle when the constitution has a preference
principle of that id, else under the drawn ones. Reported, each with a 95% interval:

- ``accuracy``: the share of items whose label prefers the better answer, after order-swapped averaging; and before
  it: with the better answer shown first (``accuracy_better_first``), second (``accuracy_better_second``), and in
  one seeded order per item (``accuracy_one_order``: what labelling without swapping would give). Wilson intervals.
- ``ece``: expected calibration error of the averaged labels (10 equal bins of confidence over [0.5, 1]): how far
  the labeller's confidence is from how often it is right. Bootstrap interval over items.
- ``position_bias``: as in the label card (:mod:`cai.label.card`).
- ``by_kind``: accuracy per kind of item (a labeller that prefers refusals fails the over-refusal traps).

A 135M labeller is expected to be weak; the point is that the figures are honest and the machinery is right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cai.core.constitution import Constitution
from cai.core.errors import CaiError, Issue, display_path
from cai.core.files import KeyedLog
from cai.core.hashing import seed_from
from cai.core.preference import Response
from cai.core.prompt_files import PromptItem
from cai.evaluation.stats import rate
from cai.label.card import position_bias
from cai.label.labeller import LabelSettings, label_pairs
from cai.label.pairs import Pair

KEYS = {"id", "category", "kind", "messages", "better", "worse", "principle", "why"}
BINS = 10


@dataclass(frozen=True)
class CheckItem:
    id: str
    kind: str
    category: str
    messages: list[dict[str, str]]
    better: str
    worse: str
    principle: str | None


def load_check_set(path: Path) -> list[CheckItem]:
    """The comparison set; every bad line is reported with its line number."""
    shown = display_path(path)
    if not path.is_file():
        raise CaiError(f"comparison set not found: {shown}")
    items, issues = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = {"id", "kind", "messages", "better", "worse"} - set(row)
            if missing or set(row) - KEYS:
                raise ValueError(f"missing {sorted(missing)}" if missing else f"unknown keys {sorted(set(row) - KEYS)}")
            messages = row["messages"]
            if not messages or messages[-1].get("role") != "user" or not all(
                    isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant") for m in messages):
                raise ValueError("messages must be user/assistant turns ending with the user's")
            if not row["better"].strip() or not row["worse"].strip():
                raise ValueError("better and worse must not be empty")
            items.append(CheckItem(str(row["id"]), str(row["kind"]), str(row.get("category") or ""),
                                   [{"role": m["role"], "content": m["content"]} for m in messages],
                                   row["better"], row["worse"], row.get("principle")))
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            issues.append(Issue(str(e), shown, n))
    if issues:
        raise CaiError(f"invalid comparison set {shown}", issues[:20])
    if not items:
        raise CaiError(f"{shown} holds no comparisons")
    return items


def check_labeller(items: list[CheckItem], c: Constitution, feedback: Any, settings: LabelSettings,
                   cache: KeyedLog, progress: Any = None) -> dict[str, Any]:
    """Label the comparison set (better answer first; both orders are asked unless ``settings.orders`` is "ab")
    and score the labels against the known better side."""
    pairs = [Pair(PromptItem(it.id, list(it.messages), it.category),  # type: ignore[arg-type]
                  (Response(text=it.better, source="check:better"), Response(text=it.worse, source="check:worse")))
             for it in items]
    own: list[tuple[str, ...] | None] = [(it.principle,) if it.principle in c.preference_ids else None
                                         for it in items]
    labelled = label_pairs(pairs, c, feedback, settings, cache, {"check": True}, progress, principles=own)
    prefs = labelled.preferences
    ok = [p.label is not None for p in prefs]
    p_better = np.array([p.label for p, good in zip(prefs, ok) if good], dtype=float)
    kinds = [it.kind for it, good in zip(items, ok) if good]
    first = [_order_mean(p.judgements, "ab") for p in prefs]
    second = [_order_mean(p.judgements, "ba") for p in prefs]
    one = [(f if seed_from(f"{settings.seed}:{it.id}") % 2 == 0 else s) if settings.orders == "both" else f
           for it, f, s in zip(items, first, second)]
    report: dict[str, Any] = {
        "items": len(items), "labelled": int(sum(ok)),
        "accuracy": rate(p_better > 0.5).to_dict(),
        "accuracy_better_first": rate(x > 0.5 for x in first if x is not None).to_dict(),
        "accuracy_better_second": rate(x > 0.5 for x in second if x is not None).to_dict(),
        "accuracy_one_order": rate(x > 0.5 for x in one if x is not None).to_dict(),
        "ece": _ece_with_interval(p_better, settings.seed),
        "position_bias": position_bias([p.judgements for p in prefs], settings.seed),
        "by_kind": {k: rate(p_better[[i for i, kk in enumerate(kinds) if kk == k]] > 0.5).to_dict()
                    for k in sorted(set(kinds))},
        "feedback": feedback.identity(),
        "settings": {"principles_per_pair": settings.principles_per_pair, "orders": settings.orders,
                     "cot": settings.cot, "clamp": list(settings.clamp) if settings.cot else None,
                     "seed": settings.seed},
        "constitution": {"name": c.name, "version": c.version, "sha256": c.sha256},
    }
    return report


def _order_mean(judgements: list, order: str) -> float | None:
    """P(better) from one order's judgements alone (None when any of them is unreadable or there are none)."""
    values = [j.p_a for j in judgements if j.order == order]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values) / len(values))


def ece(p_better: np.ndarray) -> float | None:
    """Expected calibration error: the labels' confidence in the side they prefer, against how often that side is
    the better one, averaged over equal-width confidence bins weighted by their size."""
    if len(p_better) == 0:
        return None
    confidence = np.maximum(p_better, 1.0 - p_better)
    correct = (p_better > 0.5).astype(float)
    bins = np.minimum(((confidence - 0.5) * 2 * BINS).astype(int), BINS - 1)
    total = 0.0
    for b in range(BINS):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def _ece_with_interval(p_better: np.ndarray, seed: int, iterations: int = 1000) -> dict[str, Any]:
    value = ece(p_better)
    if value is None:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    draws = [ece(p_better[rng.integers(0, len(p_better), len(p_better))]) for _ in range(iterations)]
    lo, hi = np.quantile(np.array(draws, dtype=float), [0.025, 0.975])
    return {"value": round(value, 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4), "n": len(p_better),
            "interval": "bootstrap over items, 95%"}
