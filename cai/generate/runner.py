"""A generation run: prompts + constitution + backend -> ``runs/<name>/records.jsonl``, resumable.

Everything that can be wrong with the inputs (the constitution, the prompts, a prompt that does not fit, an output
folder made with another constitution or model) is checked before the folder is touched. Then prompts whose key is
already in the folder are reused, records whose key changed are moved to ``superseded.jsonl``, and the rest are
generated batch by batch, each batch appended (and fsynced) as soon as it is done. Every stage call goes through the
folder's stage cache (``stages.jsonl``): a regenerated record calls the model only for the stages whose inputs
changed. ``dry_run`` says what a run would do, calling nothing and writing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cai import __version__
from cai.backends.base import Backend
from cai.core.constitution import Constitution
from cai.core.errors import ContextLengthError, RunFolderError, display_path
from cai.core.files import read_jsonl
from cai.core.prompt_files import PromptItem
from cai.core.record import Record
from cai.generate.generator import Generator, MemoryStageCache, StageEvent
from cai.generate.planner import Plan
from cai.generate.store import open_store, read_stage_cache
from cai.run import RUN_FILE, ConstitutionRef, RunFolder, RunInfo


@dataclass
class Summary:
    planned: int = 0
    written: int = 0
    flagged: int = 0
    flag_counts: dict[str, int] = field(default_factory=dict)
    skipped: int = 0            # reused: already in the folder with the same key
    regenerated: int = 0        # written for a prompt whose old record was superseded in this run
    new: int = 0                # written for a prompt that had no record
    calls: int = 0              # model calls made (one per stage per prompt)
    cached_calls: int = 0       # stage outputs taken from the stage cache instead
    superseded: int = 0         # old records moved to superseded.jsonl (their key changed)
    too_long: int = 0           # left out with --skip-long (listed in errors.jsonl)
    failed: int = 0             # requests that failed for good (listed in errors.jsonl; tried again next run)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    torn_bytes: int = 0         # a torn last line cut off on open (a previous run was killed mid-write)
    out: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


@dataclass
class Progress:
    """Callbacks for the terminal: ``start(total_stage_items)`` once, ``stage(event)`` after each backend call."""

    start: Callable[[int, int], None] = lambda total, stages_per_record: None
    stage: Callable[[StageEvent], None] = lambda event: None


def check_run_folder(out: Path, constitution: Constitution, backend: Backend,
                     supersede_all: bool) -> tuple[RunInfo | None, bool]:
    """Read-only check that ``out`` may take this run's records. Returns the folder's run.json (if any) and whether
    it was made with another constitution or model (allowed only with ``supersede_all``)."""
    folder = RunFolder(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {display_path(out)} exists and is not a folder")
    if not folder.exists():
        if folder.records.exists():
            raise RunFolderError(f"{display_path(out)} has records.jsonl but no {RUN_FILE}; not a cai run folder?",
                                 hint="Choose another --out folder.")
        return None, False
    try:
        info = folder.read_info()
    except RunFolderError as e:
        raise RunFolderError(e.message, hint="Fix or delete it, or choose another --out folder.") from None
    old_c, old_model = info.constitution, info.model
    problems = []
    if old_c.name != constitution.name:
        problems.append(f"constitution {old_c.name!r} (version {old_c.version}, sha256 "
                        f"{str(old_c.sha256)[:12]}), not {constitution.name!r}")
    if old_model != backend.model:
        problems.append(f"model {old_model!r}, not {backend.model!r}")
    if problems and not supersede_all:
        raise RunFolderError(
            f"{display_path(out)} holds records made with " + " and ".join(problems),
            hint="Choose another --out folder for this run, or pass --supersede to move the existing records to "
                 f"{display_path(folder.superseded)} and generate afresh here.")
    return info, bool(problems)


@dataclass
class DryRun:
    """What ``run_generate`` would do with the same arguments; nothing called, nothing written."""

    planned: int = 0
    reused: int = 0             # records already there with the same key
    regenerate: int = 0         # prompts whose record would be superseded and generated again
    new: int = 0                # prompts with no record yet
    too_long: int = 0
    calls: int = 0              # model calls the run would make
    cached_calls: int = 0       # stage outputs the stage cache would give instead
    prompt_tokens: int = 0      # estimated (see assumed_tokens)
    completion_tokens: int = 0  # estimated: assumed_tokens per call
    max_completion_tokens: int = 0   # the bound: max_new_tokens per call
    assumed_tokens: int = 0     # length assumed for each output not yet known: the cache's mean, else max_new_tokens
    out: str = ""


@dataclass
class _Prepared:
    gen: Generator
    plans: list[Plan]
    long_issues: dict
    sizes: dict[str, int]
    info: RunInfo | None
    identity_changed: bool


def _prepare(constitution: Constitution, items: list[PromptItem], backend: Backend, out: Path, rounds: int,
             sampling, batch_size: int, skip_long: bool, supersede_all: bool,
             critic: Backend | None = None) -> _Prepared:
    """Every check that comes before the folder is touched (read-only)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    gen = Generator(constitution, backend, rounds=rounds, sampling=sampling, critic=critic)
    plans = gen.plan(items)
    long_issues, sizes = gen.context_issues(plans)
    if long_issues and not skip_long:
        raise ContextLengthError(
            f"{len(long_issues)} prompt(s) may not fit the model's context (nothing was generated)",
            list(long_issues.values())[:20],
            hint="Lower --max-new-tokens, use a model with a longer context, or pass --skip-long to leave these "
                 "prompts out (they are listed in errors.jsonl).")
    info, identity_changed = check_run_folder(out, constitution, backend, supersede_all)
    return _Prepared(gen, plans, long_issues, sizes, info, identity_changed)


def dry_run(*, constitution: Constitution, items: list[PromptItem], backend: Backend, out: str | Path,
            rounds: int = 1, sampling=None, batch_size: int = 16, skip_long: bool = False,
            supersede_all: bool = False) -> DryRun:
    """Count the calls and estimate the tokens of a run from the prompts, the settings and what the folder already
    holds (records and stage cache). Reads the folder; calls and writes nothing."""
    out = Path(out)
    prep = _prepare(constitution, items, backend, out, rounds, sampling, batch_size, skip_long, supersede_all)
    on_disk = {obj.get("id"): obj.get("prompt_id") for _, obj in read_jsonl(out / "records.jsonl")}
    had_record = set(on_disk.values()) | _superseded_prompts(out)
    reusable = set() if prep.identity_changed else set(on_disk)
    cache = MemoryStageCache()
    cache.entries = read_stage_cache(out)
    m = prep.gen.sampling.max_new_tokens
    known = cache.entries.values()
    assumed = round(sum(c.completion_tokens for c in known) / len(known)) if known else m

    report = DryRun(planned=len(prep.plans), too_long=len(prep.long_issues), assumed_tokens=assumed, out=str(out))
    for plan in prep.plans:
        if plan.item.id in prep.long_issues:
            continue
        if plan.key in reusable:
            report.reused += 1
            continue
        if plan.item.id in had_record:
            report.regenerate += 1
        else:
            report.new += 1
        est = prep.gen.estimate(plan, cache, assumed)
        report.calls += est.calls
        report.cached_calls += est.cached
        report.prompt_tokens += est.prompt_tokens
        report.completion_tokens += est.completion_tokens
    report.max_completion_tokens = report.calls * m
    return report


def _superseded_prompts(out: Path) -> set[str]:
    """Prompts with an old record in superseded.jsonl: generating them again counts as regenerating."""
    return {str(obj["prompt_id"]) for _, obj in read_jsonl(out / "superseded.jsonl") if obj.get("prompt_id")}


def run_generate(*, constitution: Constitution, items: list[PromptItem], backend: Backend, out: str | Path,
                 rounds: int = 1, sampling=None, batch_size: int = 16, skip_long: bool = False,
                 supersede_all: bool = False, progress: Progress | None = None,
                 model_source: str | None = None, constitution_path: str | Path | None = None,
                 prompts_source: str | None = None, critic: Backend | None = None) -> Summary:
    """``model_source`` is the model as the user named it (``default``, a folder, a hub id): later commands (``cai
    data build``, ``cai train``) load the same model from it; ``constitution_path`` is kept for the same reason.
    ``rounds=0`` answers the prompts only (helpfulness data). ``critic``: another model that critiques and
    revises (default: the one that answers)."""
    out = Path(out)
    progress = progress or Progress()
    prep = _prepare(constitution, items, backend, out, rounds, sampling, batch_size, skip_long, supersede_all,
                    critic)
    gen, plans, long_issues, sizes = prep.gen, prep.plans, prep.long_issues, prep.sizes

    summary = Summary(planned=len(plans), out=str(out))
    t0 = time.perf_counter()
    with open_store(out) as store:
        summary.torn_bytes = store.torn_bytes
        superseded_prompts = _superseded_prompts(out)
        if prep.identity_changed:
            superseded_prompts |= {r["prompt_id"] for r in store.records.values()}
            summary.superseded += store.supersede(set(store.records))
        long_ids = set(long_issues)
        wanted = {p.item.id: p.key for p in plans if p.item.id not in long_ids}
        stale = {rid for rid, r in store.records.items() if r["prompt_id"] in wanted and wanted[r["prompt_id"]] != rid}
        superseded_prompts |= {store.records[rid]["prompt_id"] for rid in stale}
        summary.superseded += store.supersede(stale)
        _write_run_file(out, prep.info, constitution, backend, gen, model_source, constitution_path, prompts_source)
        for prompt_id, issue in long_issues.items():
            store.append_error({"prompt_id": prompt_id, "stage": "preflight", "reason": "context_length",
                                "message": str(issue), "at": _now()})
        summary.too_long = len(long_issues)

        todo = [p for p in plans if p.item.id not in long_ids and p.key not in store.records]
        summary.skipped = len(plans) - len(todo) - summary.too_long
        # prompts of similar length share a batch: less padding, and the batch finishes together
        todo.sort(key=lambda p: sizes[p.item.id])
        stages = 1 + 2 * rounds
        progress.start(len(todo) * stages, stages)

        def on_stage(event: StageEvent) -> None:
            summary.prompt_tokens += event.prompt_tokens
            summary.completion_tokens += event.completion_tokens
            summary.calls += event.items - event.cached
            summary.cached_calls += event.cached
            summary.seconds = time.perf_counter() - t0
            progress.stage(event)

        def on_error(plan: Plan, stage: str, rnd: int, message: str) -> None:
            summary.failed += 1
            store.append_error({"prompt_id": plan.item.id, "key": plan.key, "stage": stage, "round": rnd,
                                "reason": "request_failed", "message": message, "at": _now()})

        def on_records(records: list[Record]) -> None:
            summary.written += store.append(records)
            for r in records:
                if r.prompt_id in superseded_prompts:
                    summary.regenerated += 1
                else:
                    summary.new += 1
                if r.flags:
                    summary.flagged += 1
                for f in r.flags:
                    summary.flag_counts[f] = summary.flag_counts.get(f, 0) + 1

        gen.run_stream(todo, on_records, window=batch_size, on_stage=on_stage, on_error=on_error, cache=store)
    summary.seconds = time.perf_counter() - t0
    return summary


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_run_file(out: Path, info: RunInfo | None, c: Constitution, backend: Backend, gen: Generator,
                    model_source: str | None, constitution_path: str | Path | None,
                    prompts_source: str | None = None) -> None:
    folder = RunFolder(out)
    prompts = folder.rel(prompts_source) if prompts_source and Path(prompts_source).exists() else prompts_source
    folder.write_info(RunInfo(
        constitution=ConstitutionRef(name=c.name, version=c.version, sha256=c.sha256,
                                     path=folder.rel(constitution_path) if constitution_path
                                     else (info.constitution.path if info else None)),
        model=backend.model,
        model_source=model_source or (info.model_source if info else None),
        model_revision=backend.model_revision,
        # the prompt file (or hub dataset) the records came from: `cai eval` holds out what was never trained on
        prompts=prompts or (info.prompts if info else None),
        backend=backend.name,
        # the endpoints of an openai-backend run, so `cai data build --helpful-mix` can answer with the same ones
        base_urls=list(getattr(backend, "base_urls", None) or []) or None,
        dtype=getattr(backend, "dtype", None),
        rounds=gen.rounds,
        sampling=gen.sampling.to_dict(),
        created_at=(info.created_at if info else None) or _now(),
        updated_at=_now(),
        cai_version=__version__,
    ))
