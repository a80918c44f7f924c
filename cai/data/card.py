"""The dataset card: what ``cai data build`` wrote and from what (``data/card.json`` and ``data/README.md``). Its
``sha256`` (over every file's hash) is what ``cai train`` writes into an adapter's manifest, and ``check_files`` is
how training knows the files were not edited since."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import __version__
from cai.core.errors import DataError, display_path
from cai.core.hashing import file_sha256
from cai.core.record import Record
from cai.data.preferences import render_labels
from cai.review.apply import render as render_review
from cai.run import DATA_DIR


@dataclass
class Card:
    """What ``data build`` wrote, and from what. Serialised as ``data/card.json``."""

    run: str
    constitution: list[dict]
    model: str | None
    options: dict
    records: int = 0
    excluded: dict[str, int] = field(default_factory=dict)      # by reason: flag names, "no_pair" (DPO)
    duplicates: dict[str, int] = field(default_factory=dict)    # dropped duplicate rows, per file kind
    counts: dict[str, int] = field(default_factory=dict)        # rows per file
    helpful: dict[str, Any] = field(default_factory=dict)       # requested, available, used, ratio
    prompts: dict[str, int] = field(default_factory=dict)       # prompt groups per split
    # DPO rows from AI-feedback labels (--preferences): counts, label distribution, mode and cut, feedback models,
    # principles, preferences.jsonl's sha256, the labeller's check (cai.data.preferences.label_figures); else empty
    preferences: dict[str, Any] = field(default_factory=dict)
    # people's decisions (cai.review.apply.figures): the rule, items reviewed/edited/rejected/in conflict, rows
    # from reviewed items; empty when the run has no reviews
    review: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)         # file name -> sha256
    sha256: str = ""                                            # the dataset's hash (over the files' hashes)
    created_at: str = ""
    cai_version: str = __version__


def read_card(run: str | Path) -> dict:
    path = Path(run) / DATA_DIR / "card.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{display_path(path.parent)} has no training data (no card.json)",
                        hint=f"Run `cai data build {display_path(run)}` first.") from None
    except ValueError:
        raise DataError(f"{display_path(path)} is unreadable", hint="Run `cai data build` again.") from None


def check_files(run: str | Path, card: dict) -> None:
    """The data files still match the card (not edited by hand or half-written since)."""
    data = Path(run) / DATA_DIR
    for name, sha in card["files"].items():
        path = data / name
        if not path.exists() or file_sha256(path) != sha:
            raise DataError(f"{display_path(path)} does not match {display_path(data / 'card.json')}",
                            hint=f"It changed after `cai data build`; run `cai data build {display_path(run)}` "
                                 "again.")


def constitutions_of(records: list[Record]) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in records:
        c = r.provenance.constitution
        if c.sha256 not in seen:
            seen[c.sha256] = {"name": c.name, "version": c.version, "sha256": c.sha256}
    return list(seen.values())


def render_card(card: Card) -> str:
    c = ", ".join(f"{x['name']} v{x['version']} (sha256 {x['sha256'][:12]})" for x in card.constitution) or "?"
    lines = [
        f"# Dataset card: {card.run}", "",
        f"Built by `cai data build` (cai {card.cai_version}) on {card.created_at} from {card.records} records.", "",
        f"- model that generated the records: {card.model}",
        f"- constitution: {c}",
        f"- dataset sha256: `{card.sha256}`",
        f"- options: {json.dumps(card.options)}",
        f"- prompts: {card.prompts.get('total', 0)} ({card.prompts.get('test', 0)} held out for test)", "",
        "| file | rows | sha256 |", "|---|---|---|",
    ]
    lines += [f"| {name} | {card.counts[name[:-6]]} | `{sha[:16]}` |" for name, sha in card.files.items()]
    if card.helpful:
        h = card.helpful
        lines += ["", f"Helpfulness mix: {h['used']} rows of ordinary prompts answered by the same model "
                      f"(asked for ratio {h['requested_ratio']}, got {h['ratio']}; {h['excluded_flagged']} flagged "
                      "answers left out)."]
    if card.excluded:
        lines += ["", "Left out: " + ", ".join(f"{k} {v}" for k, v in sorted(card.excluded.items())) + "."]
    if card.review:
        lines += ["", *render_review(card.review)]
    if card.preferences:
        lines += ["", *render_labels(card.preferences),
                  "", "SFT rows: `prompt` (the conversation), `completion` (the revision). DPO rows: `prompt`, "
                      "`chosen` (the answer the label prefers), `rejected`, `label` (the probability that `chosen` is "
                      "the better answer, in [0.5, 1]). TRL reads both as they are; `cai train dpo --config "
                      "soft-labels` trains on the label.", ""]
        return "\n".join(lines)
    lines += ["", "SFT rows: `prompt` (the conversation), `completion` (the revision). DPO rows: `prompt`, `chosen` "
                  "(final revision), `rejected` (initial answer). TRL reads both as they are.", ""]
    return "\n".join(lines)
