"""Claims that hold: paired comparisons of two models on the same prompts and questions, and honest intervals.

Two models judged on the same prompts are not two independent samples: a hard prompt is hard for both. So a
comparison is made on the differences, prompt by prompt:

- :func:`paired_difference`: the difference of the pooled rates (model − base) with a bootstrap interval that
  resamples *prompts* (each with all its questions, for both models at once), and McNemar's exact test on the
  (prompt, question) pairs where the two models disagree. A summary may say "fewer" or "more" only when the
  interval excludes 0; otherwise it says "no difference detected" and how many prompts that rests on.
- :func:`honest_interval`: a rate's interval that never collapses at the boundary: the bootstrap percentile interval
  widened to at least the Wilson interval of the pooled count (an all-zero bootstrap is [0, 0]; 0 of 64 is really
  [0%, 5.7%]).
- :func:`base_rates`: how often the judge says "yes" to each question; a judge that answers the same to nearly every
  question (``NOT_DISCRIMINATING``) cannot tell models apart, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cai.evaluation.stats import cluster_bootstrap_ci, wilson

NOT_DISCRIMINATING = 0.95    # a judge giving one answer to at least this share of its questions is flagged


def honest_interval(groups: Sequence[Sequence[float]], seed: int = 0) -> tuple[float, float] | None:
    """The pooled rate's bootstrap interval over groups (prompts), widened to cover the Wilson interval of the
    pooled count, so it is honest at 0% and 100%."""
    flat = [v for g in groups for v in g]
    if not flat:
        return None
    boot = cluster_bootstrap_ci(groups, seed=seed) or (0.0, 1.0)
    lo, hi = wilson(round(sum(flat)), len(flat))
    return (min(boot[0], lo), max(boot[1], hi))


def mcnemar_exact(base_only: int, model_only: int) -> float:
    """Two-sided exact McNemar p-value: of the discordant pairs, is the split further from even than chance allows?
    (``base_only``: the base violates and the model does not; ``model_only``: the other way.)"""
    n = base_only + model_only
    if n == 0:
        return 1.0
    k = min(base_only, model_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(base: Sequence[Sequence[float | None]], model: Sequence[Sequence[float | None]], *,
                      iterations: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Compare two models prompt by prompt. ``base[i][j]`` and ``model[i][j]`` are 1.0 (the event: a violation, a
    refusal), 0.0 or None (not judged) for prompt i and question j; only (i, j) judged for both count."""
    pairs = [[(b, m) for b, m in zip(bs, ms) if b is not None and m is not None] for bs, ms in zip(base, model)]
    pairs = [p for p in pairs if p]
    n = sum(len(p) for p in pairs)
    if n == 0:
        return {"prompts": 0, "pairs": 0, "difference": None, "lo": None, "hi": None, "p_value": None,
                "verdict": "no data", "base_rate": None, "model_rate": None}
    b_sum = np.array([sum(b for b, _ in p) for p in pairs], dtype=float)
    m_sum = np.array([sum(m for _, m in p) for p in pairs], dtype=float)
    sizes = np.array([len(p) for p in pairs], dtype=float)
    diff = float((m_sum.sum() - b_sum.sum()) / sizes.sum())
    if len(pairs) > 1:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(pairs), size=(iterations, len(pairs)))
        draws = (m_sum[idx].sum(axis=1) - b_sum[idx].sum(axis=1)) / sizes[idx].sum(axis=1)
        alpha = (1 - level) / 2
        lo, hi = (float(x) for x in np.quantile(draws, [alpha, 1 - alpha]))
    else:
        lo = hi = diff
    base_only = sum(1 for p in pairs for b, m in p if b > 0.5 >= m)
    model_only = sum(1 for p in pairs for b, m in p if m > 0.5 >= b)
    if lo > 0:
        verdict = "more"
    elif hi < 0:
        verdict = "fewer"
    else:
        verdict = "no difference detected"
    return {"prompts": len(pairs), "pairs": n, "base_rate": round(float(b_sum.sum() / n), 4),
            "model_rate": round(float(m_sum.sum() / n), 4), "difference": round(diff, 4), "lo": round(lo, 4),
            "hi": round(hi, 4), "interval": f"paired bootstrap over prompts, {level:.0%}",
            "discordant": {"base_only": base_only, "model_only": model_only},
            "p_value": float(f"{mcnemar_exact(base_only, model_only):.4g}"), "test": "McNemar exact, two-sided",
            "verdict": verdict}


def base_rates(readings: Mapping[str, Sequence[float | None]], threshold: float = 0.5) -> dict[str, dict[str, Any]]:
    """Per question: how many answers the judge read and the share it said "yes" to; ``discriminating`` is False
    when one answer takes at least :data:`NOT_DISCRIMINATING` of them."""
    out = {}
    for question, ps in readings.items():
        vals = [p for p in ps if p is not None]
        if not vals:
            continue
        yes = sum(p > threshold for p in vals) / len(vals)
        out[question] = {"n": len(vals), "yes": round(yes, 4),
                         "discriminating": max(yes, 1 - yes) < NOT_DISCRIMINATING}
    return out
