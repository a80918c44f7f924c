"""Planning ``cai eval``: which models, which held-out prompts, which records, which principles. Everything that can
be wrong (a missing constitution, an unknown principle, no held-out prompt) is found here, before a model loads.

Held-out prompts: every prompt of the run's prompt file (``run.json`` names it) whose conversation is in no training
row (``data/*_train.jsonl``), the run's test split first; the same for the helpfulness prompts (the helpfulness mix
trains on some). So nothing the adapters were trained on is ever evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cai.core.constitution import Constitution, Principle, load_constitution
from cai.core.errors import CaiError, ConfigError, DataError, display_path
from cai.core.hashing import adapter_sha256, content_digest, seeded_order
from cai.core.prompt_files import PromptItem, load_prompts
from cai.core.record import Record, read_records
from cai.evaluation.rules import RuleSet, load_rules
from cai.resources import HELPFUL, prompts_path
from cai.run import RunFolder, RunInfo

BASE = "base"
THRESHOLD = 0.5          # P(yes) above this is a "yes"


class EvalError(CaiError):
    pass


@dataclass
class EvalOptions:
    red_team: int = 64                      # held-out red-team prompts, at most
    helpful: int = 64                       # ordinary prompts, at most
    prompts: str | None = None              # red-team prompt file (default: the run's, from run.json)
    helpful_prompts: str = HELPFUL                    # a shipped prompt set by name, or a file
    principles: tuple[str, ...] = ()        # principle ids to judge (default: all of the constitution)
    adapters: tuple[str, ...] | None = None  # adapter names under RUN/adapters (default: every finished one)
    records: int = 64                       # the run's records judged for the revision-round curve, at most
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 16
    dtype: str | None = None                # the models' weights, resolved ("float32", "bfloat16"); None: fp32
    compare_to: tuple[str, ...] = ()        # more references than the base: each model is compared with these too
    rules: str | None = None                # a rules file (cai.evaluation.rules): its questions are judged by rules
    model_judge: bool = True                # the model judge judges what no rule covers (False: rules only)


@dataclass
class ModelUnderTest:
    name: str                   # "base" or the adapter's folder name
    adapter: Path | None
    identity: dict              # what makes its answers: model id, adapter file hash


@dataclass
class EvalPlan:
    folder: RunFolder
    constitution: Constitution
    constitution_path: str
    principles: list[Principle]
    models: list[ModelUnderTest]
    red_team: list[PromptItem]
    helpful: list[PromptItem]
    records: list[Record]
    held_out_from_test_split: int
    notes: list[str] = field(default_factory=list)
    card: dict | None = None
    rules: RuleSet | None = None
    model_judge: bool = True

    @property
    def run(self) -> Path:
        return self.folder.root

    @property
    def info(self) -> RunInfo:
        return self.folder.info


# ---------------------------------------------------------------------------------------------------------------
# Planning: everything that can be wrong is found before a model is loaded


def plan_eval(run: str | Path | RunFolder, opts: EvalOptions) -> EvalPlan:
    folder = run if isinstance(run, RunFolder) else RunFolder.open(run)
    run, info = folder.root, folder.info
    if opts.red_team < 1 or opts.helpful < 0 or opts.records < 0:
        raise ConfigError("--red-team must be at least 1; --helpful and --records at least 0")
    c_path = folder.constitution_file()
    if c_path is None or not c_path.exists():
        raise EvalError(f"{folder.shown(folder.run_file)} names constitution file {info.constitution.path!r}, which "
                        "is not there", hint="The judge asks the constitution's critique requests: restore the file.")
    constitution = load_constitution(c_path)
    known = {p.id: p for p in constitution.principles}
    unknown = [p for p in opts.principles if p not in known]
    if unknown:
        raise ConfigError(f"--principles names {', '.join(map(repr, unknown))}, not in constitution "
                          f"{constitution.name} ({display_path(c_path)})",
                          hint=f"Its principles: {', '.join(known)}.")
    principles = [known[p] for p in opts.principles] if opts.principles else list(constitution.principles)
    rules = None
    if opts.rules is not None:
        rules = load_rules(opts.rules)
        rules.check_questions(list(known))
    elif not opts.model_judge:
        raise ConfigError("nothing would judge the answers: without the model judge, name a rules file",
                          hint="Use --judge rules:FILE, or --judge model (the default).")

    notes: list[str] = []
    # answers are keyed by what made them: a bf16 answer is another answer than an fp32 one (fp32 keys as before)
    dtype = {"dtype": opts.dtype} if opts.dtype not in (None, "float32") else {}
    models = [ModelUnderTest(BASE, None, {"model": info.model, "revision": info.model_revision, **dtype})]
    models += [ModelUnderTest(m.name, m.adapter, {**m.identity, **dtype}) for m in _adapters(run, opts.adapters, notes)]
    if len(models) == 1:
        notes.append(f"{display_path(run)} has no trained adapter: the base model is evaluated alone "
                     f"(train one with `cai train sft {display_path(run)}`)")

    trained, test_groups, card = _training_groups(run)
    spec = opts.prompts or folder.prompts_source()
    if not spec:
        raise EvalError(f"{folder.shown(folder.run_file)} does not name the prompt file the run used",
                        hint="Pass the red-team prompts with --prompts FILE.")
    red_items = load_prompts(spec).items
    red, from_test = _held_out(red_items, trained, test_groups, opts.red_team, opts.seed)
    if not red:
        raise DataError(f"no held-out red-team prompts: every prompt of {display_path(spec)} was trained on "
                        f"({len(red_items)} prompts, the run's test split is empty)",
                        hint="Rebuild the data with a larger --test-size, or pass --prompts with prompts the run "
                             "never trained on.")
    helpful: list[PromptItem] = []
    if opts.helpful:
        help_items = load_prompts(prompts_path(opts.helpful_prompts)).items
        helpful, _ = _held_out(help_items, trained, test_groups, opts.helpful, opts.seed)
        if not helpful:
            raise DataError(f"no held-out helpfulness prompts: every prompt of {display_path(opts.helpful_prompts)} "
                            "was trained on (the helpfulness mix)",
                            hint="Pass --helpful-prompts with other prompts, or --helpful 0 to skip over-refusal.")
    records = [r for r in read_records(folder.records) if r.rounds]
    records = sorted(records, key=lambda r: seeded_order(opts.seed, r.id))[:opts.records]
    if not card:
        notes.append("the run has no training data (`cai data build`): every prompt counts as held out")
    if rules is not None and not opts.model_judge:
        unjudged = [p.id for p in principles if not rules.covers(p.id)]
        unjudged += [q for q in ("refusal", "helpful")[:2 if helpful else 1] if not rules.covers(q)]
        if unjudged:
            notes.append(f"rules only ({rules.path}): {', '.join(unjudged)} not judged")
    return EvalPlan(folder, constitution, str(c_path), principles, models, red, helpful, records, from_test,
                    notes, card, rules, opts.model_judge)


def _adapters(run: Path, names: tuple[str, ...] | None, notes: list[str]) -> list[ModelUnderTest]:
    folder = run / "adapters"
    found = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()} if folder.is_dir() else {}
    finished = {n: p for n, p in found.items()
                if (p / "manifest.json").exists() and (p / "adapter_config.json").exists()}
    if names is not None:
        missing = [n for n in names if n not in finished]
        if missing:
            raise EvalError(f"--adapter {', '.join(missing)}: no finished adapter of that name in "
                            f"{display_path(folder)}", hint=f"Finished adapters: {', '.join(finished) or 'none'}.")
        finished = {n: finished[n] for n in names}
    for n in found:
        if n not in finished and names is None and not n.endswith((".old", ".tmp")) and "." not in n:
            notes.append(f"adapter {n} is not finished (no manifest.json): left out")
    out = []
    for n, p in finished.items():
        out.append(ModelUnderTest(n, p, {"adapter": n, "adapter_sha256": adapter_sha256(p)}))
    return out


def _training_groups(run: Path) -> tuple[set[str], set[str], dict | None]:
    """Digests of every conversation in a training row, and of those in the test split."""
    from cai.data.card import read_card
    from cai.run import DATA_DIR

    data = run / DATA_DIR
    if not (data / "card.json").exists():
        return set(), set(), None
    card = read_card(run)
    trained: set[str] = set()
    test: set[str] = set()
    for name in card.get("files", {}):
        target = trained if "_train" in name else test
        for line in (data / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                target.add(content_digest(json.loads(line)["prompt"]))
    return trained, test - trained, card


def _held_out(items: list[PromptItem], trained: set[str], test: set[str], limit: int,
              seed: int) -> tuple[list[PromptItem], int]:
    """Prompts whose conversation no training row holds: the test split's first, then the rest in a seeded order."""
    fresh = [(it, content_digest([dict(m) for m in it.messages])) for it in items]
    fresh = [(it, d) for it, d in fresh if d not in trained]
    fresh.sort(key=lambda x: (x[1] not in test, seeded_order(seed, x[0].id)))
    chosen = fresh[:limit]
    return [it for it, _ in chosen], sum(1 for _, d in chosen if d in test)
