"""AI-feedback preferences → training rows: DPO pairs that keep the feedback model's soft label, and reward-model
pairs with a margin (``cai data build RUN --preferences``).

``RUN/preferences.jsonl`` (:mod:`cai.core.preference`) holds pairs of answers and the label ``p`` = P(``responses[0]``
is the better one). Each labelled pair becomes:

- a DPO row ``{"prompt": [conversation], "chosen": [assistant: the answer the label prefers], "rejected":
  [assistant: the other], "label": q}`` where ``q`` is the probability that ``chosen`` is the better answer, in
  [0.5, 1] (:attr:`Preference.confidence`). Mode ``soft`` keeps ``q`` (soft-label DPO trains on it: ``cai train
  dpo RUN --config soft-labels``); mode ``hard`` writes 1.0 (plain DPO), after leaving out the pairs below
  ``min_confidence`` and the exact ties (a hard label on a 50/50 pair is a coin flip).
- a reward row ``{"prompt", "chosen", "rejected", "margin": m}`` for TRL's ``RewardTrainer`` (:func:`margin`).

Left out, and counted: unlabelled pairs (``label: null``: the labeller could not read the log-probabilities, and a
label is never guessed), pairs below the cut, ties in hard mode, a pair whose two answers are the same text
(``no_pair``), and a pair with an answer flagged ``empty`` (or flagged in the record it came from) unless that flag
is allowed, as for the records' own pairs.

The card's ``preferences`` section (:func:`label_figures`) says how many pairs there were, labelled and not, the
labels' distribution, the mode and cut, the feedback model(s) and principles, the sha256 of ``preferences.jsonl``, and
the labeller's own check of its labels (``RUN/label/check.json``) when there is one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from cai.core.errors import DataError
from cai.core.hashing import file_sha256
from cai.core.preference import Preference, Response, read_preferences
from cai.core.record import Record
from cai.review.apply import TAG, ReviewState
from cai.run import RunFolder

LABEL_MODES = ("soft", "hard")
DEFAULT_MIN_CONFIDENCE = 0.5
# The reward margin stops growing at this confidence (see :func:`margin`)
MARGIN_CAP = 0.95
MAX_MARGIN = math.log(MARGIN_CAP / (1 - MARGIN_CAP))    # ≈ 2.944 nats
BIN_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)               # the confidence histogram of the card


@dataclass
class PreferenceRows:
    """The DPO rows of the labelled pairs kept, what was left out (by reason), the confidences seen, and where the
    pairs came from (the file's sha256, the labeller's check card)."""

    prefs: list[Preference]
    mode: str
    min_confidence: float
    dpo: list[dict] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    labelled: list[float] = field(default_factory=list)       # the confidence of every labelled pair
    kept: list[float] = field(default_factory=list)           # the confidence of every pair kept (before hardening)
    sha256: str = ""
    check: dict | None = None


def preference_data(folder: RunFolder, records: list[Record], *, mode: str, min_confidence: float,
                    allow: set[str], reviewed: ReviewState | None = None,
                    loaded: tuple[list[Preference], str] | None = None) -> PreferenceRows:
    """``RUN/preferences.jsonl`` read (unless ``loaded`` by :func:`load_preferences` already), checked and turned
    into DPO rows, with the labeller's check card; ``reviewed``: people's decisions on the pairs
    (:mod:`cai.review.apply`)."""
    prefs, sha256 = loaded or load_preferences(folder)
    rows = preference_rows(prefs, records, mode=mode, min_confidence=min_confidence, allow=allow,
                           shown=folder.shown(folder.preferences), reviewed=reviewed)
    rows.sha256 = sha256
    labelled = [p for p in prefs if p.label is not None and p.status != "unlabelled"]
    rows.check = read_check(folder, sorted({model_name(feedback_identity(p.provenance)) for p in labelled}))
    return rows


def load_preferences(folder: RunFolder) -> tuple[list[Preference], str]:
    """The pairs of ``RUN/preferences.jsonl`` and the file's sha256; a clear error when it is missing or empty."""
    path = folder.preferences
    if not path.exists():
        raise DataError(f"{folder.shown(path)} not found: --preferences builds the DPO rows from AI-feedback labels",
                        hint=f"Run `cai label {folder.shown()}` first (it writes preferences.jsonl), or build "
                             "without --preferences to pair each record's revision against its initial answer.")
    prefs = read_preferences(path)
    if not prefs:
        raise DataError(f"{folder.shown(path)} holds no pairs",
                        hint=f"Run `cai label {folder.shown()}` (again) to label pairs of answers.")
    return prefs, file_sha256(path)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _flags(resp: Response, records: dict[str, Record]) -> list[str]:
    """An answer's flags: its own (a labeller may write ``flags``), those of the record text it is, and ``empty``."""
    own = getattr(resp, "flags", None)
    flags = [str(f) for f in own] if isinstance(own, list) else []
    rec = records.get(resp.record) if resp.record else None
    if rec is not None and resp.source == "record:initial":
        flags += rec.initial_flags
    elif rec is not None and resp.source == "record:final":
        last = rec.rounds[-1].flags if rec.rounds else rec.initial_flags
        flags += [f for f in last if not f.startswith("critique_")]
    if not resp.text.strip():
        flags.append("empty")
    return list(dict.fromkeys(flags))


def _checked(pref: Preference, shown: str) -> None:
    """What the schema does not say: two answers, and a label that is a probability."""
    if len(pref.responses) != 2:
        raise DataError(f"{shown}: pair {pref.id} has {len(pref.responses)} responses (a pair has exactly two)",
                        hint="This file was not written by `cai label`; fix or regenerate it.")
    if pref.label is not None and not (math.isfinite(pref.label) and 0.0 <= pref.label <= 1.0):
        raise DataError(f"{shown}: pair {pref.id} has label {pref.label!r}: not a probability in [0, 1]",
                        hint="This file was not written by `cai label`; fix or regenerate it.")


def preference_rows(prefs: list[Preference], records: list[Record], *, mode: str, min_confidence: float,
                    allow: set[str], shown: str = "preferences.jsonl",
                    reviewed: ReviewState | None = None) -> PreferenceRows:
    """The DPO rows of ``prefs`` (see the module's docstring); ``shown`` names the file in errors. A pair a person
    agreed with or flipped is certain (label 1.0, no cut); one they tied or rejected is left out
    (:mod:`cai.review.apply`)."""
    by_id = {r.id: r for r in records}
    out = PreferenceRows(prefs, mode, min_confidence)
    skip: Counter[str] = Counter()
    for pref in prefs:
        _checked(pref, shown)
        decision, why = reviewed.pair(pref) if reviewed is not None else (None, None)
        if why:
            skip[why] += 1
            continue
        conf, first = pref.confidence, pref.chosen_index
        if conf is None or first is None or pref.status == "unlabelled":
            skip["unlabelled"] += 1
            continue
        out.labelled.append(conf)
        if decision is not None:           # a person decided: certain, and the cut (on the AI's confidence) is moot
            first, conf = (1 - first if decision == "flipped" else first), 1.0
        elif conf < min_confidence:
            skip["below_cut"] += 1
            continue
        elif mode == "hard" and conf == 0.5:
            skip["tie"] += 1
            continue
        chosen, rejected = pref.responses[first], pref.responses[1 - first]
        bad = next((f for f in _flags(chosen, by_id) + _flags(rejected, by_id) if f not in allow), None)
        if bad:
            skip[bad] += 1
            continue
        if _same(chosen.text, rejected.text):
            skip["no_pair"] += 1
            continue
        out.kept.append(conf)
        row = {"prompt": [dict(m) for m in pref.messages], "chosen": [_assistant(chosen.text)],
               "rejected": [_assistant(rejected.text)], "label": round(conf, 6) if mode == "soft" else 1.0}
        out.dpo.append({**row, TAG: decision} if decision else row)
    out.excluded = dict(skip)
    if not out.labelled:
        raise DataError(f"{shown}: none of its {len(prefs)} pairs is labelled (every label is null)",
                        hint="A pair is unlabelled when the feedback model's log-probabilities held neither option "
                             "letter, (A) nor (B). Label again with `cai label RUN` and a feedback model that "
                             "answers the multiple-choice question.")
    if not out.dpo:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skip.items()))
        hints = []
        if skip["below_cut"]:
            hints.append(f"The most confident label is {max(out.labelled):.3f}: lower --min-confidence (now "
                         f"{min_confidence}).")
        if any(k.startswith("review:") for k in skip):
            hints.append("Pairs people tied or rejected never train; with --require-review only pairs a person "
                         "agreed with or flipped do (`cai review status RUN`).")
        if {k for k in skip if not k.startswith("review:")} - {"unlabelled", "below_cut", "tie", "no_pair"}:
            hints.append("Flagged answers never train silently: allow a flag on purpose with --allow-flag FLAG.")
        raise DataError(f"{shown}: none of the {len(out.labelled)} labelled pairs can be used ({reasons})",
                        hint=" ".join(hints) or None)
    return out


def margin(label: float, mode: str) -> float:
    """The reward margin of a row for TRL's ``RewardTrainer``, whose loss is ``-logσ(r_chosen - r_rejected -
    margin)``. Under the Bradley–Terry model the reward model learns, P(chosen is better) = σ(r_chosen -
    r_rejected), so a pair labelled ``q`` asks for a reward gap of logit(q): that is the margin, 0 for a 50/50 pair
    and growing with the labeller's confidence. (TRL's reward loss takes no soft label; a margin is the nearest
    thing it takes.) It is clipped at logit(0.95) ≈ 2.94: q → 1 would ask for an infinite gap, and a feedback
    model's confidence above ~95% is seldom calibrated, so without the clip a few near-certain pairs would dominate
    the loss and stretch the reward scale. Hard labels carry no strength: margin 0, plain Bradley–Terry."""
    if mode == "hard":
        return 0.0
    q = min(max(label, 0.5), MARGIN_CAP)
    return round(math.log(q / (1 - q)), 6)


def reward_row(dpo_row: dict, mode: str) -> dict:
    return {"prompt": dpo_row["prompt"], "chosen": dpo_row["chosen"], "rejected": dpo_row["rejected"],
            "margin": margin(dpo_row["label"], mode)}


# ---------------------------------------------------------------------------------------------------------------
# The card's figures


def histogram(values: list[float]) -> list[dict]:
    """Counts of ``values`` in the bins of :data:`BIN_EDGES` (the last bin holds 1.0)."""
    bins = []
    for lo, hi in pairwise(BIN_EDGES):
        last = hi == BIN_EDGES[-1]
        n = sum(1 for v in values if lo <= v < hi or (last and v == hi))
        bins.append({"from": lo, "to": hi, "pairs": n})
    return bins


def feedback_identity(prov: dict[str, Any]) -> dict[str, Any]:
    """What labelled a pair, as its provenance says: ``feedback`` (``cai label`` writes ``{backend, model, revision,
    adapter}``), or a bare ``feedback_model`` name; ``{"model": "unknown"}`` when it names none."""
    m = prov.get("feedback", prov.get("feedback_model"))
    if isinstance(m, dict) and m.get("model"):
        return {k: v for k, v in m.items() if v is not None}
    return {"model": str(m) if m else "unknown"}


def model_name(identity: dict[str, Any]) -> str:
    """A feedback identity as one name: the model, ``@revision`` when pinned, ``+ adapter`` when one was on."""
    name = str(identity.get("model"))
    if identity.get("revision") not in (None, "main"):
        name += f"@{identity['revision']}"
    adapter = identity.get("adapter")
    if adapter:
        name += f" + {adapter.get('path') or adapter.get('name') or 'adapter'}" if isinstance(adapter, dict) \
            else f" + {adapter}"
    return name


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def label_figures(rows: PreferenceRows, used: int) -> dict[str, Any]:
    """The card's ``preferences`` section; ``used``: the DPO rows written (after duplicates are dropped)."""
    labelled = [p for p in rows.prefs if p.label is not None and p.status != "unlabelled"]
    models = Counter(model_name(feedback_identity(p.provenance)) for p in labelled)
    principles: dict[tuple[str, str], int] = Counter()
    for p in labelled:
        for j in p.judgements:
            principles[(j.principle, j.principle_sha256)] += 1
    lv = rows.labelled
    return {
        "file": "preferences.jsonl", "sha256": rows.sha256, "pairs": len(rows.prefs), "labelled": len(lv),
        "unlabelled": rows.excluded.get("unlabelled", 0), "mode": rows.mode, "min_confidence": rows.min_confidence,
        "below_cut": rows.excluded.get("below_cut", 0),
        "left_out": {k: v for k, v in sorted(rows.excluded.items()) if k not in ("unlabelled", "below_cut")},
        "used": used,
        "confidence": {"mean": _mean(lv), "min": round(min(lv), 4), "max": round(max(lv), 4),
                       "kept_mean": _mean(rows.kept), "histogram": histogram(lv)},
        "feedback_models": [{"model": m, "pairs": n} for m, n in sorted(models.items())],
        "feedback_identities": [json.loads(x) for x in sorted({json.dumps(feedback_identity(p.provenance),
                                                                          sort_keys=True) for p in labelled})],
        "principles": [{"id": i, "sha256": s, "judgements": n} for (i, s), n in sorted(principles.items())],
        "check": rows.check,
    }


def read_check(folder: RunFolder, feedback: list[str]) -> dict | None:
    """The labeller's check card (``RUN/label/check.json``, written by ``cai label RUN --check``) as the card holds
    it: the file, its sha256, its figures, and ``other_feedback`` when the model it checked is none of ``feedback``
    (the models that labelled the pairs: then its figures do not qualify these labels); None when there is none."""
    path = folder.label_check
    if not path.exists():
        return None
    again = f"Run `cai label {folder.shown()} --check` again, or remove the file to build without it."
    try:
        figures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{folder.shown(path)} is unreadable ({e})",
                        hint=f"It is the labeller's check of its labels. {again}") from None
    if not isinstance(figures, dict):
        raise DataError(f"{folder.shown(path)} is not a JSON object of figures", hint=again)
    checked = figures.get("feedback")
    other = isinstance(checked, dict) and model_name(feedback_identity({"feedback": checked})) not in feedback
    return {"file": folder.rel(path), "sha256": file_sha256(path), "figures": figures,
            "feedback": model_name(feedback_identity({"feedback": checked})) if checked else None,
            "other_feedback": other}


# ---------------------------------------------------------------------------------------------------------------
# The card's text


# entries of check.json that say how the check was made, not how good the labels are
_NOT_FIGURES = {"feedback", "settings", "constitution", "check_set"}
_POINT = ("value", "rate", "estimate", "mean", "point")


def _number(v: Any) -> str | None:
    return f"{v:.3g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _interval(v: Any) -> str:
    lo_hi = v if isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(x) for x in v) else None
    return f" [{_number(lo_hi[0])}, {_number(lo_hi[1])}]" if lo_hi else ""


def figure_text(v: Any, depth: int = 0) -> str | None:
    """A check figure as text, None for what is not one (it is still in card.json): a number (``0.041``); a point
    with its interval (``{"rate"|"value"|"estimate"|"mean", "lo", "hi"}`` or an ``interval``/``ci`` list: ``0.82
    [0.75, 0.88]``, with ``(k/n)`` when it counts); a mapping of such (``position_bias``, ``by_kind``), one level
    deep, where ``x_ci`` is the interval of ``x``."""
    if _number(v):
        return _number(v)
    if not isinstance(v, dict):
        return None
    point = next((_number(v[k]) for k in _POINT if _number(v.get(k))), None)
    if point is not None:
        iv = next((v[k] for k in ("interval", "ci", "ci95") if isinstance(v.get(k), (list, tuple))), None)
        for lo, hi in (("lo", "hi"), ("low", "high")):
            if iv is None and _number(v.get(lo)) and _number(v.get(hi)):
                iv = [v[lo], v[hi]]
        counts = f" ({v['k']}/{v['n']})" if isinstance(v.get("k"), int) and isinstance(v.get("n"), int) else ""
        return point + _interval(iv) + counts
    if depth > 0 or any(k in v for k in _POINT):
        return None     # a point that is not a number (none measured) or a mapping too deep to read in one line
    parts = []
    for key, sub in v.items():
        if key.endswith("_ci"):
            continue
        text = figure_text(sub, depth + 1)
        if text is not None:
            parts.append(f"{key} {text}{_interval(v.get(f'{key}_ci')) if _number(sub) else ''}")
    return "(" + ", ".join(parts) + ")" if parts else None


def render_labels(p: dict[str, Any]) -> list[str]:
    """The card's README section on the labels."""
    c = p["confidence"]
    cut = (f"pairs below confidence {p['min_confidence']} left out ({p['below_cut']})"
           if p["min_confidence"] > DEFAULT_MIN_CONFIDENCE else "no cut")
    how = ("soft: `label` is the feedback model's probability that `chosen` is the better answer"
           if p["mode"] == "soft" else "hard: `label` is 1.0 (the preferred answer is taken as certain)")
    lines = [
        "## AI-feedback labels", "",
        f"The DPO and reward rows come from `{p['file']}` (sha256 `{p['sha256']}`), not from the records' "
        "revision-vs-initial pairs.", "",
        f"- pairs: {p['pairs']} ({p['labelled']} labelled, {p['unlabelled']} unlabelled: left out)",
        f"- labels: {how}; {cut}",
        f"- used: {p['used']} pairs; mean confidence {c['kept_mean']} (of all labelled pairs: {c['mean']}, "
        f"from {c['min']} to {c['max']})",
    ]
    if p["left_out"]:
        lines.append("- also left out: " + ", ".join(f"{k} {v}" for k, v in p["left_out"].items()))
    lines.append("- feedback model(s): " + (", ".join(f"{m['model']} ({m['pairs']} pairs)"
                                                      for m in p["feedback_models"]) or "?"))
    lines.append("- principles: " + (", ".join(f"{x['id']} ({x['judgements']} judgements)" for x in p["principles"])
                                     or "?"))
    lines += ["", "| confidence | labelled pairs | |", "|---|---|---|"]
    top = max((b["pairs"] for b in c["histogram"]), default=0) or 1
    for b in c["histogram"]:
        close = "]" if b["to"] == BIN_EDGES[-1] else ")"
        lines.append(f"| [{b['from']}, {b['to']}{close} | {b['pairs']} | {'█' * round(20 * b['pairs'] / top)} |")
    check = p.get("check")
    if check:
        shown = [(k, figure_text(v)) for k, v in check["figures"].items() if k not in _NOT_FIGURES]
        who = f" of {check['feedback']}" if check.get("feedback") else ""
        lines += ["", f"The labeller's check{who} on pairs whose better answer is known (`{check['file']}`, sha256 "
                      f"`{check['sha256'][:16]}`): " + ("; ".join(f"{k} {t}" for k, t in shown if t) or "no figures")
                      + "."]
        if check.get("other_feedback"):
            lines.append("**The check was made with another feedback model than the one that labelled these pairs: "
                         "its figures do not qualify these labels.**")
    lines += ["", "Reward rows (`reward_{train,test}.jsonl`, for TRL's RewardTrainer): `prompt`, `chosen`, `rejected`, "
                  "`margin` = the log-odds of the label, clipped at logit(0.95) ≈ 2.94 (0 for hard labels)."]
    return lines
