"""Figures about a labelling: what was labelled, how the labels fall, and how much the labeller favours a position.

Position bias is read two ways, both from the raw readings (P(option A), before any averaging):

- ``mean_p_first``: the mean probability given to whatever stands first; 0.5 is no bias. With a 95% interval from a
  bootstrap over pairs.
- ``same_position``: of the pairs asked in both orders, the share where the labeller picked the same position both
  times (so it contradicted itself about the answers); Lee et al. 2023 report 18–56% for their labellers. With a
  Wilson interval. Order-swapped averaging is what cancels this in the labels.

For record pairs (initial answer against final revision) ``agrees_with_revision`` is the share of labels that
prefer the revision: the supervised phase's own signal, as a check of the labeller.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from cai.core.constitution import Constitution
from cai.core.preference import Judgement, Preference
from cai.evaluation.stats import cluster_bootstrap_ci, rate

HISTOGRAM_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)     # confidence bins: [0.5, 0.6), ... [0.9, 1.0]


def position_bias(judgement_sets: list[list[Judgement]], seed: int = 0) -> dict[str, Any]:
    readings = [[j.p_first for j in js if j.p_first is not None] for js in judgement_sets]
    flat = [p for group in readings for p in group]
    ci = cluster_bootstrap_ci(readings, seed=seed)
    same = []
    for js in judgement_sets:
        by_principle: dict[str, dict[str, float]] = {}
        for j in js:
            if j.p_first is not None:
                by_principle.setdefault(j.principle, {})[j.order] = j.p_first
        for orders in by_principle.values():
            if {"ab", "ba"} <= set(orders):
                same.append((orders["ab"] >= 0.5) == (orders["ba"] >= 0.5))
    return {"mean_p_first": round(sum(flat) / len(flat), 4) if flat else None,
            "mean_p_first_ci": [round(x, 4) for x in ci] if ci else None, "readings": len(flat),
            "same_position": rate(same).to_dict()}


def confidence_histogram(prefs: list[Preference]) -> dict[str, int]:
    """How many labels fall in each confidence bin (``"0.5-0.6"``: [0.5, 0.6), ..., ``"0.9-1.0"``: [0.9, 1])."""
    bins = {(lo, hi): f"{lo:.1f}-{min(hi, 1.0):.1f}" for lo, hi in itertools.pairwise(HISTOGRAM_EDGES)}
    counts = dict.fromkeys(bins.values(), 0)
    for p in prefs:
        conf = p.confidence
        for (lo, hi), name in bins.items():
            if conf is not None and lo <= conf < hi:
                counts[name] += 1
    return counts


def label_card(prefs: list[Preference], pairs: Any, stats: Any, feedback: dict[str, Any], settings: Any,
               policy: dict[str, Any], c: Constitution) -> dict[str, Any]:
    """``RUN/label/card.json``: counts, label distribution, position bias, the revision check, lineage."""
    labelled = [p for p in prefs if p.label is not None]
    confidences = [p.confidence for p in labelled if p.confidence is not None]
    drawn = Counter(j.principle for p in prefs for j in p.judgements if j.order == "ab")   # one per principle
    card: dict[str, Any] = {
        "pairs": len(prefs), "labelled": len(labelled), "unlabelled": len(prefs) - len(labelled),
        "skipped": {"identical": pairs.identical, "empty_or_failed": pairs.empty, "unpaired_samples": pairs.unpaired},
        "questions": {"asked": stats.asked, "reused": stats.reused, "unreadable": stats.unreadable},
        "labels": {"mean_confidence": round(sum(confidences) / len(confidences), 4) if confidences else None,
                   "prefers_first": rate(p.label >= 0.5 for p in labelled if p.label is not None).to_dict(),
                   "confidence_histogram": confidence_histogram(labelled)},
        "position_bias": position_bias([p.judgements for p in prefs], settings.seed),
        "principles": dict(sorted(drawn.items())),
        "feedback": feedback, "settings": {"principles_per_pair": settings.principles_per_pair,
                                           "orders": settings.orders, "cot": settings.cot,
                                           "clamp": list(settings.clamp) if settings.cot else None,
                                           "seed": settings.seed},
        **policy, "constitution": {"name": c.name, "version": c.version, "sha256": c.sha256},
    }
    if policy.get("policy") == "records":
        card["agrees_with_revision"] = rate(p.label < 0.5 for p in labelled if p.label is not None).to_dict()
    return card
