"""Records → training data: SFT rows, DPO pairs, helpfulness mixing, a split by prompt, a dataset card.

``build_datasets(run)`` reads ``runs/<name>/records.jsonl`` and writes ``runs/<name>/data/``:

- ``sft_{train,test}.jsonl``: ``{"prompt": [...conversation], "completion": [{"role": "assistant", "content":
  revision}]}``; the final revision of each record, or (``all_rounds``) every round's revision, as the paper trained
  on all of them. Prompt/completion rows make TRL train on the answer only, never on the red-team prompt.
- ``dpo_{train,test}.jsonl``: ``{"prompt": [...conversation], "chosen": [assistant: final revision],
  "rejected": [assistant: initial answer]}``. A pair whose two answers are the same text is left out.
- ``card.json`` and ``README.md``: counts, the helpfulness ratio, the constitution(s), every file's sha256 and the
  dataset's (the hash ``cai train`` writes into an adapter's manifest).

**From AI-feedback labels** (``preferences``): the DPO rows come from ``runs/<name>/preferences.jsonl`` instead of the
records' pairs, each with a ``label`` column (the probability that ``chosen`` is the better answer), and
``reward_{train,test}.jsonl`` holds the same pairs with a ``margin`` column for TRL's ``RewardTrainer``; see
:mod:`cai.data.preferences`. SFT rows still come from the records.

These are TRL's conversational column names, so ``trl sft`` / ``trl dpo`` read the files unchanged.

**Helpfulness mixing** (``helpful_mix``): the fraction of the SFT rows that are ordinary prompts answered by the same
model with no critique (the paper mixed these in so the model does not turn evasive). The answers are generated
into ``runs/<name>/helpful/`` (a run folder of its own: resumable, reused by later builds) with the run's model and
sampling settings.

**Flagged texts** (empty, echo, truncated, unchanged) are left out unless their flag is named in ``allow_flags``:
an SFT row when the revision it trains on is flagged, a DPO pair when either of its answers is. The card counts what
was left out and why.

**Split by prompt**: rows are grouped by their conversation (the same prompt under two ids is one group); a group
goes to test when its seeded hash falls in the first ``test_size`` of the hash range (so about that fraction, not
exactly). No prompt is in both splits, and the split of a prompt does not change when other prompts are added.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cai.core.errors import DataError
from cai.core.files import write_bytes_atomic, write_json_atomic
from cai.core.hashing import content_digest, seeded_order, sha256_hex
from cai.core.record import FLAGS, Record, read_records
from cai.data.card import Card, constitutions_of, render_card
from cai.data.helpful import HelpfulSource, helpful_needed
from cai.data.preferences import (
    DEFAULT_MIN_CONFIDENCE,
    LABEL_MODES,
    PreferenceRows,
    label_figures,
    load_preferences,
    preference_data,
    reward_row,
)
from cai.resources import HELPFUL
from cai.review import apply as review
from cai.review.decisions import RULES
from cai.run import RunFolder

FILES = ("sft_train", "sft_test", "dpo_train", "dpo_test")
REWARD_FILES = ("reward_train", "reward_test")      # written when the DPO rows come from preferences


@dataclass
class BuildOptions:
    helpful_mix: float = 0.0          # fraction of SFT rows that are helpfulness rows, in [0, 1)
    test_size: float = 0.1            # fraction of prompts held out, in [0, 1)
    all_rounds: bool = False          # an SFT row per round's revision, not only the final one
    allow_flags: tuple[str, ...] = ()  # flags that do not exclude a record
    seed: int = 0                     # the split and the choice of helpful prompts
    helpful_prompts: str = HELPFUL    # a shipped prompt set by name, or a file
    preferences: bool = False         # DPO (and reward) rows from RUN/preferences.jsonl, not the records' pairs
    preference_labels: str | None = None    # soft (the default: keep the probability) | hard (1.0)
    min_confidence: float | None = None     # leave out labelled pairs less confident than this, in [0.5, 1]
    require_review: bool = False      # only what a person accepted or edited (pairs: agreed with or flipped) trains
    review_rule: str = "any-reject"   # how disagreeing reviewers resolve: any-reject | latest | unanimous

    @property
    def label_mode(self) -> str:
        return self.preference_labels or "soft"

    @property
    def cut(self) -> float:
        return DEFAULT_MIN_CONFIDENCE if self.min_confidence is None else self.min_confidence

    def check(self) -> None:
        if not 0 <= self.helpful_mix < 1:
            raise DataError(f"--helpful-mix must be in [0, 1), got {self.helpful_mix}",
                            hint="It is the fraction of SFT rows that are helpfulness rows: 0.5 = as many as the "
                                 "harmlessness rows.")
        if not 0 <= self.test_size < 1:
            raise DataError(f"--test-size must be in [0, 1), got {self.test_size}")
        unknown = [f for f in self.allow_flags if f not in FLAGS]
        if unknown:
            raise DataError(f"unknown flag(s) {', '.join(map(repr, unknown))} (flags are {', '.join(FLAGS)})")
        if not self.preferences and (self.preference_labels is not None or self.min_confidence is not None):
            raise DataError("--preference-labels and --min-confidence apply only to --preferences",
                            hint="Add --preferences to build the DPO rows from RUN/preferences.jsonl.")
        if self.label_mode not in LABEL_MODES:
            raise DataError(f"--preference-labels must be one of {', '.join(LABEL_MODES)}, got "
                            f"{self.preference_labels!r}",
                            hint="soft keeps the feedback model's probability as the label (soft-label DPO); hard "
                                 "writes 1.0 (plain DPO) after the --min-confidence cut.")
        if self.review_rule not in RULES:
            raise DataError(f"--review-rule must be one of {', '.join(RULES)}, got {self.review_rule!r}",
                            hint="any-reject: one reviewer's reject leaves an item out; latest: the most recent "
                                 "decision stands; unanimous: reviewers who disagree leave it out.")
        if not (isinstance(self.cut, (int, float)) and 0.5 <= self.cut <= 1):
            raise DataError(f"--min-confidence must be in [0.5, 1], got {self.min_confidence}",
                            hint="It is the probability that the preferred answer is the better one: 0.5 keeps "
                                 "every labelled pair, 0.6 leaves out those the feedback model was less sure of.")


# ---------------------------------------------------------------------------------------------------------------
# Rows


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _conversation(record: Record) -> list[dict]:
    return [dict(m) for m in record.messages]


def _allowed(flags: list[str], allow: set[str]) -> str | None:
    """The first flag that excludes a text, or None."""
    return next((f for f in flags if f not in allow), None)


def sft_rows(record: Record, all_rounds: bool, allow: set[str]) -> tuple[list[dict], list[str]]:
    """SFT rows of one record, and the reasons for rows left out."""
    convo = _conversation(record)
    if all_rounds and record.rounds:
        rows, reasons = [], []
        for rnd in record.rounds:
            own = [f for f in rnd.flags if not f.startswith("critique_")]
            bad = _allowed(own, allow)
            if bad:
                reasons.append(bad)
            else:
                rows.append({"prompt": convo, "completion": [_assistant(rnd.revision)]})
        return rows, reasons
    # the final revision: left out when that text is flagged (a flagged earlier answer does not spoil it)
    bad = _allowed(_final_flags(record), allow)
    return ([], [bad]) if bad else ([{"prompt": convo, "completion": [_assistant(record.final)]}], [])


def _final_flags(record: Record) -> list[str]:
    if not record.rounds:
        return record.initial_flags
    return [f for f in record.rounds[-1].flags if not f.startswith("critique_")]


def dpo_row(record: Record, allow: set[str]) -> tuple[dict | None, str | None]:
    """The DPO pair of one record (chosen = final revision, rejected = initial answer), or the reason there is none."""
    if not record.rounds:
        return None, "no_pair"
    bad = _allowed(record.flags, allow)
    if bad:
        return None, bad
    if " ".join(record.final.split()) == " ".join(record.initial.split()):
        return None, "no_pair"
    return {"prompt": _conversation(record), "chosen": [_assistant(record.final)],
            "rejected": [_assistant(record.initial)]}, None


def _group(row: dict) -> str:
    """The prompt a row belongs to (its conversation before the answer), for the split."""
    return content_digest(row["prompt"])


def split_groups(groups: list[str], test_size: float, seed: int) -> set[str]:
    """The groups that go to test: those whose seeded hash falls below ``test_size`` of the hash range, so a prompt's
    split depends on that prompt alone (adding prompts never moves another). When that picks none of two or more
    groups, the lowest hash goes to test; when it picks all, the highest stays in train."""
    unique = sorted(set(groups), key=lambda g: seeded_order(seed, g))
    if test_size <= 0 or len(unique) < 2:
        return set()
    cut = test_size * 2 ** 256
    test = {g for g in unique if int(seeded_order(seed, g), 16) < cut}
    if not test:
        test = {unique[0]}
    if len(test) == len(unique):
        test.discard(unique[-1])
    return test


def _dedup(rows: list[dict]) -> tuple[list[dict], int]:
    seen, out = set(), []
    for row in rows:
        d = content_digest({k: v for k, v in row.items() if k != review.TAG})
        if d not in seen:
            seen.add(d)
            out.append(row)
    return out, len(rows) - len(out)


# ---------------------------------------------------------------------------------------------------------------
# Building


def read_run(run: str | Path | RunFolder) -> tuple[RunFolder, list[Record]]:
    """The run folder (checked to be one) and its records (at least one)."""
    folder = run if isinstance(run, RunFolder) else RunFolder.open(run)
    records = read_records(folder.records)
    if not records:
        raise DataError(f"{folder.shown()} has no records (records.jsonl is missing or empty)",
                        hint="Run `cai generate --out " + folder.shown() + " ...` first.")
    return folder, records


def build_datasets(run: str | Path | RunFolder, options: BuildOptions | None = None,
                   helpful_source: HelpfulSource | None = None) -> Card:
    """Write ``run/data/`` from ``run/records.jsonl``. ``helpful_source(n)`` returns up to ``n`` helpfulness records
    (answers with no rounds); it is called only when ``options.helpful_mix`` > 0."""
    opts = options or BuildOptions()
    opts.check()
    folder, records = read_run(run)
    allow = set(opts.allow_flags)

    card = Card(run=str(folder.root), model=folder.info.model, options=asdict(opts),
                constitution=constitutions_of(records), records=len(records))
    sft: list[dict] = []
    dpo: list[dict] = []
    labels: PreferenceRows | None = None
    loaded = load_preferences(folder) if opts.preferences else None
    reviewed = review.load_reviews(folder, records, loaded[0] if loaded else None, rule=opts.review_rule,
                                   require=opts.require_review)
    if loaded:                  # read (and checked) before anything is generated for the helpfulness mix
        labels = preference_data(folder, records, mode=opts.label_mode, min_confidence=opts.cut, allow=allow,
                                 reviewed=reviewed, loaded=loaded)
        dpo = labels.dpo
        for label_reason, n in labels.excluded.items():
            card.excluded[f"dpo:{label_reason}"] = n
    for original in records:
        rec, why, tag = reviewed.record(original)
        if rec is None:
            for kind in ("sft",) if labels is not None else ("sft", "dpo"):
                card.excluded[f"{kind}:{why}"] = card.excluded.get(f"{kind}:{why}", 0) + 1
            continue
        rows, reasons = sft_rows(rec, opts.all_rounds, allow)
        sft += [{**row, review.TAG: tag} for row in rows] if tag else rows
        for r in reasons:
            card.excluded[f"sft:{r}"] = card.excluded.get(f"sft:{r}", 0) + 1
        if labels is not None:
            continue
        pair, reason = dpo_row(rec, allow)
        if pair:
            dpo.append({**pair, review.TAG: tag} if tag else pair)
        else:
            card.excluded[f"dpo:{reason}"] = card.excluded.get(f"dpo:{reason}", 0) + 1
    if not sft and not dpo and opts.require_review:
        raise DataError(f"--require-review: no record of {folder.shown()} is both accepted (or edited) by a "
                        "reviewer and usable (" + ", ".join(f"{k} {v}" for k, v in sorted(card.excluded.items()))
                        + ")", hint=f"Review more with `cai review {folder.shown()}`; see how far it got with "
                                    f"`cai review status {folder.shown()}`.")
    if not sft and not dpo:
        flagged = sum(1 for r in records if r.flags)
        raise DataError(
            f"none of the {len(records)} records in {folder.shown()} can be used: "
            + (f"all {flagged} are flagged ({_flag_summary(records)})" if flagged == len(records)
               else "no usable revisions"),
            hint="Flagged records never train silently. Allow a flag on purpose with --allow-flag FLAG (e.g. "
                 "--allow-flag truncated for a small model that rambles to the token limit), or regenerate with a "
                 "larger --max-new-tokens or a stronger model.")
    sft, card.duplicates["sft"] = _dedup(sft)
    dpo, card.duplicates["dpo"] = _dedup(dpo)
    if labels is not None:
        card.preferences = label_figures(labels, used=len(dpo))

    helpful_rows: list[dict] = []
    if opts.helpful_mix > 0:
        want = helpful_needed(len(sft), opts.helpful_mix)
        got = helpful_source(want) if helpful_source else []
        excluded = 0
        for rec in got:
            rows, reasons = sft_rows(rec, False, allow)
            helpful_rows += rows
            excluded += len(reasons)
        helpful_rows, dup = _dedup(helpful_rows)
        helpful_rows = helpful_rows[:want]
        card.helpful = {"requested_ratio": opts.helpful_mix, "needed": want, "answered": len(got),
                        "excluded_flagged": excluded, "duplicates": dup, "used": len(helpful_rows),
                        "ratio": round(len(helpful_rows) / (len(helpful_rows) + len(sft)), 4) if sft else 0.0,
                        "source": opts.helpful_prompts}

    # one split for every file: a prompt held out of SFT is held out of DPO (and of the reward rows) too
    test_groups = split_groups([_group(r) for r in sft + dpo + helpful_rows], opts.test_size, opts.seed)
    kinds = [("sft", sft + helpful_rows), ("dpo", dpo)]
    if labels is not None:
        kinds.append(("reward", [reward_row(r, opts.label_mode) for r in dpo]))
    out_rows: dict[str, list[dict]] = {f"{kind}_{split}": [] for kind, _ in kinds for split in ("train", "test")}
    for kind, rows in kinds:
        for row in rows:
            out_rows[f"{kind}_{'test' if _group(row) in test_groups else 'train'}"].append(row)
    if not out_rows["sft_train"] and not out_rows["dpo_train"]:
        raise DataError("no training rows left after the split", hint="Lower --test-size or generate more records.")
    groups = {_group(r) for r in sft + dpo + helpful_rows}
    card.prompts = {"total": len(groups), "test": len(test_groups & groups)}

    data = folder.data_dir
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in out_rows.items():
        card.files[f"{name}.jsonl"] = _write_jsonl(data / f"{name}.jsonl", rows)
        card.counts[name] = len(rows)
    card.sha256 = content_digest(card.files)
    card.review = review.figures(reviewed, out_rows)
    card.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(data / "card.json", asdict(card))
    write_bytes_atomic(data / "README.md", render_card(card).encode("utf-8"))
    return card


def _flag_summary(records: list[Record]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        for f in r.flags:
            counts[f] = counts.get(f, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    data = "".join(json.dumps({k: v for k, v in r.items() if k != review.TAG}, ensure_ascii=False) + "\n"
                   for r in rows).encode()
    write_bytes_atomic(path, data)
    return sha256_hex(data)



