"""``cai label``: a run folder's pairs, labelled by AI feedback, into ``RUN/preferences.jsonl``.

The pairs come from a policy (``--policy base``, ``sft``, ``dpo`` or an adapter folder: K samples per prompt) or from
the run's records (``--policy records``: initial answer against final revision). The prompts are the run's own (those
its records answer), or a prompt file. The feedback model is the run's base model by default (the one its
constitution was written for), another local model, or an OpenAI-compatible endpoint that returns log-probabilities.

What each step costs is saved as it finishes (answers in ``label/samples.jsonl``, readings in
``label/judgements.jsonl``); ``preferences.jsonl`` and ``label/card.json`` are replaced whole at the end, so they
always hold one complete labelling, and running the same command again reuses everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cai import __version__
from cai.backends.base import Sampling
from cai.core.constitution import Constitution, load_constitution
from cai.core.errors import CaiError, display_path
from cai.core.files import KeyedLog, write_bytes_atomic, write_json_atomic
from cai.core.hashing import adapter_sha256, file_sha256
from cai.core.preference import Preference
from cai.core.prompt_files import PromptItem, load_prompts
from cai.core.record import read_records
from cai.label.card import label_card
from cai.label.labeller import LabelSettings, label_pairs
from cai.label.pairs import PairSet, policy_pairs, record_pairs
from cai.run import RunFolder

RECORDS = "records"


@dataclass
class LabelOptions:
    policy: str = "base"                 # base | records | the name of an adapter of the run | an adapter folder
    samples: int = 2                     # answers per prompt from the policy (pairs: 0-1, 2-3, ...)
    prompts: str | None = None           # None: the prompts the run's records answer; else a prompt file or set
    limit: int | None = None             # prompts (policy pairs) or records (record pairs)
    temperature: float = 1.0             # policy sampling (the paper sampled at T = 1)
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 8                  # prompts a policy batch
    constitution: Path | None = None     # the preference principles (default: the run's constitution)
    settings: LabelSettings = field(default_factory=LabelSettings)

    def check(self) -> None:
        self.settings.check()
        if self.policy != RECORDS and self.samples < 2:
            raise CaiError(f"--samples must be at least 2 (a pair needs two answers), got {self.samples}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise CaiError("--max-new-tokens and --batch-size must be at least 1")
        Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)


@dataclass
class LabelResult:
    preferences: list[Preference]
    card: dict[str, Any]


def preference_constitution(folder: RunFolder, path: Path | None) -> Constitution:
    """The constitution whose preference principles label this run: ``path``, else the run's own."""
    source = path or folder.constitution_file()
    if source is None:
        raise CaiError(f"{folder.shown(folder.run_file)} names no constitution file",
                       hint="Pass --constitution FILE (one with preference_principles).")
    c = load_constitution(source)
    if not c.preference_principles:
        raise CaiError(f"constitution {c.name} ({display_path(source)}) has no preference_principles to label with",
                       hint="Add preference_principles (see constitution/README.md), pass --constitution with a file "
                            "that has them (the shipped default does), or import the paper's with `cai constitution "
                            "import anthropic-rl`.")
    return c


def run_items(folder: RunFolder, prompts: str | None, limit: int | None) -> list[PromptItem]:
    """The prompts to sample pairs for: a prompt file, or the distinct conversations of the run's records."""
    if prompts is not None:
        items = load_prompts(prompts).items
    else:
        seen: dict[str, PromptItem] = {}
        for rec in read_records(folder.records):
            seen.setdefault(rec.prompt_id, PromptItem(rec.prompt_id, list(rec.messages), rec.category))
        items = list(seen.values())
        if not items:
            raise CaiError(f"{folder.shown()} has no records, so no prompts to label",
                           hint=f"Run `cai generate --out {folder.shown()} ...` first, or pass --prompts FILE.")
    return items[:limit] if limit else items


def policy_adapter(folder: RunFolder, policy: str) -> Path | None:
    """The adapter folder ``policy`` names (None for the base), checked to be trained on the run's base model."""
    if policy == "base":
        return None
    path = folder.adapter_dir(policy) if "/" not in policy and not Path(policy).is_dir() else Path(policy)
    if not (path / "adapter_config.json").exists():
        known = ", ".join(["base", RECORDS, *folder.finished_adapters()])
        raise CaiError(f"policy {policy!r}: no finished adapter at {display_path(path)}",
                       hint=f"Use one of: {known}, or an adapter folder.")
    import json

    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    base = (manifest.get("base_model") or {}).get("id")
    if base and base not in (folder.info.model, folder.model_source):
        raise CaiError(f"policy {policy!r} was trained on {base}, but this run's model is {folder.info.model}",
                       hint="An adapter only works on the base it was trained on: label with an adapter of this "
                            "run, or the base.")
    return path


def label_run(run: Path, opts: LabelOptions, feedback: Any, *, policy_backend: Any = None,
              progress: Any = None) -> LabelResult:
    """Sample (or take) the pairs, label them, write ``preferences.jsonl`` and ``label/card.json``. ``feedback`` is
    a :class:`cai.label.feedback.Feedback`; ``policy_backend`` the model that answers (unused for record pairs);
    ``progress(kind, n, total)`` is told how far each phase is."""
    opts.check()
    folder = RunFolder.open(run)
    c = preference_constitution(folder, opts.constitution)
    sampling = Sampling(temperature=opts.temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens,
                        seed=opts.settings.seed)
    with folder.lock("cai label"):
        folder.label_dir.mkdir(parents=True, exist_ok=True)
        if opts.policy == RECORDS:
            pairs = record_pairs(read_records(folder.records), opts.limit)
            policy: dict[str, Any] = {"policy": RECORDS}
        else:
            items = run_items(folder, opts.prompts, opts.limit)
            adapter = getattr(policy_backend, "adapter", None)
            identity = {"model": policy_backend.model, "revision": policy_backend.model_revision,
                        "adapter": _adapter_stamp(folder, adapter)}
            tick = _ticker(progress, "answers", len(items) * opts.samples)
            pairs = policy_pairs(items, policy_backend, opts.policy, sampling, opts.samples,
                                 KeyedLog(folder.label_dir / "samples.jsonl"), opts.batch_size, identity, tick)
            policy = {"policy": opts.policy, "policy_model": _with_manifest(identity, adapter),
                      "sampling": sampling.to_dict(), "samples": opts.samples}
        if not pairs.pairs:
            raise CaiError(f"no pairs to label in {folder.shown()}: {_why_none(pairs)}",
                           hint="Sample at a higher --temperature, or more --samples." if pairs.identical else None)
        provenance = {**policy, "constitution": {"name": c.name, "version": c.version, "sha256": c.sha256},
                      "created_at": _now(), "cai_version": __version__}
        n_questions = len(pairs.pairs) * min(opts.settings.principles_per_pair, len(c.preference_ids)) * (
            2 if opts.settings.orders == "both" else 1)
        labelled = label_pairs(pairs.pairs, c, feedback, opts.settings,
                               KeyedLog(folder.label_dir / "judgements.jsonl"), provenance,
                               _ticker(progress, "judgements", n_questions))
        prefs = labelled.preferences
        card = label_card(prefs, pairs, labelled.stats, feedback.identity(), opts.settings, policy, c)
        _write_jsonl(folder.preferences, [p.to_json() for p in prefs])
        write_json_atomic(folder.label_dir / "card.json", card)
    return LabelResult(prefs, card)


def _adapter_stamp(folder: RunFolder, adapter: str | None) -> dict | None:
    """Which adapter answers, as the samples' keys hold it: its folder (relative to the run) and its weights'
    sha256. Not its manifest's, which changes with the training's timings: the seeds of the samples come from the
    keys, so an adapter retrained to the same weights draws the same answers (``cai demo`` reproducible)."""
    return {"path": folder.rel(adapter), "weights_sha256": adapter_sha256(adapter)} if adapter else None


def _with_manifest(identity: dict, adapter: str | None) -> dict:
    """The policy's identity for the card, with the sha256 of the adapter's manifest (its lineage) beside."""
    if not adapter:
        return identity
    manifest = Path(adapter) / "manifest.json"
    return {**identity, "adapter": {**identity["adapter"],
                                    "manifest_sha256": file_sha256(manifest) if manifest.exists() else None}}


def _ticker(progress: Any, kind: str, total: int):
    if progress is None:
        return None
    progress(kind, 0, total)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        progress(kind, done[0], total)

    return tick


def _why_none(pairs: PairSet) -> str:
    parts = []
    if pairs.identical:
        parts.append(f"{pairs.identical} had two identical answers")
    if pairs.empty:
        parts.append(f"{pairs.empty} had an empty or failed answer")
    return "; ".join(parts) or "there were no prompts or records"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

