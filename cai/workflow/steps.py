"""Sequences of library calls: each step of the main job (generate, data build, train, eval). The CLI calls one
function here per command; no step calls a command. What a step tells the person goes through a
:class:`~cai.workflow.base.Ui`; work saved as it finishes runs inside :func:`~cai.workflow.base.resumable`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, display_path
from cai.workflow.base import Endpoints, ModelSpec, RunModels, Ui, resumable

# ---------------------------------------------------------------------------------------------------------------
# generate


@dataclass
class GenerateJob:
    """Everything ``cai generate`` needs, checked: a loaded constitution, a prompt source, a backend to make."""

    constitution: Any                       # cai.core.constitution.Constitution
    constitution_path: Path
    prompts: str                            # a prompt file or a hub dataset name
    out: Path
    sampling: Any                           # cai.backends.base.Sampling
    batch_size: int
    backend: str = "local"
    model: str = "default"
    endpoints: Endpoints = field(default_factory=Endpoints)
    device: str | None = None
    dtype: str | None = None                # the local backend's weights (None: fp32 on CPU, bf16 on a GPU)
    split: str = "train"
    rounds: int = 1
    limit: int | None = None
    strict: bool = False
    skip_long: bool = False
    supersede: bool = False


def generate(job: GenerateJob, ui: Ui | None = None, dry_run: bool = False):
    """Answer, critique and revise the prompts into ``job.out`` (records are saved as they finish and reused by the
    next run). ``dry_run``: count calls and tokens, call and write nothing. Returns the Summary (or DryRun)."""
    from cai.backends import make_backend
    from cai.core.prompt_files import load_prompts
    from cai.generate.runner import run_generate

    ui = ui or Ui()
    if not job.constitution.principles:
        raise CaiError(f"constitution {job.constitution.name} has no principles to critique and revise with (only "
                       "preference principles)", hint="Give cai generate a constitution with principles; this one "
                       "labels preferences (cai label --constitution FILE).")
    prompts = load_prompts(job.prompts, strict=job.strict, split=job.split)
    for issue in prompts.issues[:20]:
        ui.note(str(issue), label="skipped")
    if len(prompts.issues) > 20:
        ui.note(f"... and {len(prompts.issues) - 20} more bad rows skipped", label="skipped")
    items = prompts.items[: job.limit] if job.limit else prompts.items
    options = job.endpoints.options() if job.backend == "openai" else {}
    t_load = time.perf_counter()
    with ui.status(f"loading {'the tokenizer of ' if dry_run else ''}model {job.model} ..."):
        backend = make_backend(job.backend, job.model, device=job.device, weights=not dry_run, dtype=job.dtype,
                               **options)
    c = job.constitution
    ui.note(f"model {backend.model} ({job.backend}) loaded in {time.perf_counter() - t_load:.1f}s; "
            f"{len(items)} prompts from {prompts.source}, constitution {c.name} v{c.version}")
    common = {"constitution": c, "items": items, "backend": backend, "out": job.out, "rounds": job.rounds,
              "sampling": job.sampling, "batch_size": job.batch_size, "skip_long": job.skip_long,
              "supersede_all": job.supersede}
    if dry_run:
        from cai.generate.runner import dry_run as count

        with ui.status("counting ..."):
            report = count(**common)
        ui.dry_run(report, job.backend)
        return report
    with resumable(f"finished batches are saved in {display_path(job.out)}"), ui.bar() as bar:
        summary = run_generate(**common, progress=bar.generate(),
                               model_source=job.model if job.backend == "local" else None,
                               constitution_path=job.constitution_path, prompts_source=str(job.prompts))
    ui.generated(summary, prompts.issues)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# data build


def build_data(run: Path, opts, ui: Ui | None = None, *, device: str | None = None,
               endpoints: Endpoints | None = None):
    """``run/records.jsonl`` → ``run/data/`` (``opts``: cai.data.build.BuildOptions). With a helpfulness mix, the
    run's own model answers ordinary prompts first (saved in ``run/helpful/`` as they finish)."""
    from cai.data.build import build_datasets
    from cai.data.helpful import helpful_from_run
    from cai.run import RunFolder

    ui = ui or Ui()
    endpoints = endpoints or Endpoints()
    opts.check()
    folder = RunFolder.open(run)
    if opts.helpful_mix <= 0:
        card = build_datasets(folder, opts)
        ui.built(card)
        return card
    info = folder.info

    def make(kind: str, model: str):
        from cai.backends import make_backend

        options: dict[str, Any] = {}
        if kind == "openai":
            urls = endpoints.base_urls or info.base_urls or []
            if not urls:
                raise CaiError(f"{display_path(run)} was generated with --backend openai and its run.json "
                               "names no endpoint to answer the helpfulness prompts",
                               hint="Pass --base-url URL (repeatable), or build with --helpful-mix 0.")
            options = {"base_urls": urls, "api_key_env": endpoints.api_key_env,
                       "concurrency": endpoints.concurrency}
        with ui.status(f"loading model {model} to answer the helpfulness prompts ..."):
            return make_backend(kind, model, device=device, dtype=info.dtype, **options)

    kept = f"the helpfulness answers finished so far are saved in {folder.shown(folder.helpful_dir)}"
    with resumable(kept, interrupt=False), ui.bar() as bar:
        batch_size = endpoints.concurrency if info.backend == "openai" else 16
        source = helpful_from_run(folder, opts.helpful_prompts, opts.seed, make,
                                  progress=bar.generate("helpful answers"), batch_size=batch_size)
        card = build_datasets(folder, opts, source)
    ui.built(card)
    return card


# ---------------------------------------------------------------------------------------------------------------
# train


def train_stage(stage: str, run: Path, ui: Ui | None = None, *, config: str | Path | None = None,
                flags: list[str] | tuple[str, ...] = (), overwrite: bool = False) -> dict:
    """QLoRA-train ``stage`` (sft, dpo) on ``run/data`` into ``run/adapters/<stage>``; ``flags`` are TRL settings
    as ``--name value``. Checkpoints are saved as it goes, and the next run resumes from the newest."""
    from cai.train import parse_config, train

    ui = ui or Ui()
    setup = parse_config(stage, run, config, list(flags))
    with resumable(f"checkpoints are in {display_path(setup.out / 'checkpoints')}",
                   "run the same command again to resume from the newest"), ui.bar() as bar:
        manifest = train(setup, overwrite=overwrite, progress=bar.train(stage))
    ui.trained(stage, setup.out, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# eval


JudgeSpec = ModelSpec       # who judges (the name the CLI and tests know)


def evaluate(run: Path, opts, ui: Ui | None = None, *, device: str | None = None,
             judge: JudgeSpec | None = None) -> dict:
    """Base vs each adapter on held-out prompts (``opts``: cai.evaluation.runner.EvalOptions) → ``run/eval/``.
    Answers and judgements are saved as they finish and reused by the next run."""
    from cai.evaluation.judge import EndpointJudge, LocalJudge
    from cai.evaluation.runner import plan_eval, run_eval
    from cai.run import RunFolder

    ui = ui or Ui()
    judge = judge or JudgeSpec()
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise CaiError("--batch-size and --max-new-tokens must be at least 1")
    folder = RunFolder.open(run)
    if folder.info.backend == "local":
        from dataclasses import replace

        from cai.inference.dtype import choose_dtype, default_device, dtype_name

        wanted = opts.dtype or folder.info.dtype
        opts = replace(opts, dtype=dtype_name(choose_dtype(device or default_device(), wanted)))
    plan = plan_eval(folder, opts)
    for note in plan.notes:
        ui.note(note, label="note")
    models = RunModels(folder, ui, device, opts.dtype)
    judge_model: Any = None                 # rules only (--judge rules:FILE): no model judges
    if opts.model_judge:
        kind, reader = models.reader(judge, "judge")
        judge_model = EndpointJudge(reader) if kind == "openai" else LocalJudge(reader, batch_size=opts.batch_size)
    t0 = time.perf_counter()

    def answerer(m):
        return models.base() if m.adapter is None else models.adapter(m.adapter, m.name)

    with resumable(f"answers and judgements so far are saved in {display_path(run / 'eval')}"), ui.bar() as bar:
        report = run_eval(plan, opts, answerer, judge_model, bar.eval())
    ui.evaluated(run, report, time.perf_counter() - t0)
    return report
