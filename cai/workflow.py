"""Sequences of library calls: each step of the main job (generate, data build, train, eval) and the demo that runs
them in a row. The CLI calls one function here per command; no step calls a command. The self-improvement loop
(``iterate``) will live here too.

What a step tells the person at the terminal goes through a :class:`Ui` (progress bars, status lines, the tables at
the end); the default one says nothing, so a library caller gets the same work without a terminal. A step whose
work is saved as it finishes (records, helpfulness answers, checkpoints, eval answers) runs inside
:func:`resumable`: Ctrl-C or a full disk then ends in :class:`Interrupted` or :class:`DiskFull`, which say what was
kept and how to go on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, display_path
from cai.core.files import disk_full_errno

RESUME = "run the same command again to continue"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that is saved as it finishes: ``kept`` says where, ``resume`` how to go on."""

    def __init__(self, kept: str, resume: str = RESUME):
        super().__init__(f"{kept}; {resume}")
        self.kept, self.resume = kept, resume


class DiskFull(OSError):
    """No space left (or a quota reached) during work that is saved as it finishes."""

    def __init__(self, error: OSError, kept: str, resume: str = RESUME):
        super().__init__(error.errno, error.strerror, error.filename)
        self.kept, self.resume = kept, resume


@contextlib.contextmanager
def resumable(kept: str, resume: str = RESUME, interrupt: bool = True) -> Iterator[None]:
    """Turn Ctrl-C (unless ``interrupt`` is False) and a full disk inside the block into errors that say what was
    kept; the innermost block wins."""
    try:
        yield
    except (Interrupted, DiskFull):
        raise
    except KeyboardInterrupt:
        if not interrupt:
            raise
        raise Interrupted(kept, resume) from None
    except OSError as e:
        if disk_full_errno(e) is not None:
            raise DiskFull(e, kept, resume) from e
        raise


class Ui:
    """What the steps tell the terminal. This one says nothing; the CLI's draws bars and tables."""

    def status(self, text: str) -> AbstractContextManager[Any]:
        """A line shown while a slow step without progress runs (loading a model)."""
        return contextlib.nullcontext()

    def note(self, text: str, label: str | None = None) -> None:
        """A line for the person: ``label`` (``skipped``, ``note``) marks one they may want to act on."""

    def bar(self) -> AbstractContextManager[Any]:
        """A progress display; inside it, ``.generate(label)``, ``.train(stage)`` and ``.eval()`` give the
        callbacks the library reports to."""
        return contextlib.nullcontext(_Silent())

    def generated(self, summary, bad_rows: list) -> None: ...
    def dry_run(self, report, backend: str) -> None: ...
    def built(self, card) -> None: ...
    def trained(self, stage: str, out: Path, manifest: dict) -> None: ...
    def evaluated(self, run: Path, report: dict, seconds: float) -> None: ...


class _Silent:
    def generate(self, label: str = "records"):
        from cai.generate.runner import Progress

        return Progress()

    def train(self, stage: str):
        from cai.train.trainer import TrainProgress

        return TrainProgress()

    def eval(self):
        from cai.evaluation.runner import EvalProgress

        return EvalProgress()


@dataclass
class Endpoints:
    """How to reach the model of a run made with ``--backend openai``."""

    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 64
    timeout: float = 120.0
    max_retries: int = 6

    def options(self) -> dict:
        return {"base_urls": self.base_urls, "api_key_env": self.api_key_env, "concurrency": self.concurrency,
                "timeout": self.timeout, "max_retries": self.max_retries}


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
        backend = make_backend(job.backend, job.model, device=job.device, weights=not dry_run, **options)
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
            return make_backend(kind, model, device=device, **options)

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


def train_stage(stage: str, run: Path, ui: Ui | None = None, *, config: Path | None = None,
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


@dataclass
class JudgeSpec:
    """Who judges: ``local`` (a transformers model: the run's base unless ``model`` names another) or ``openai``."""

    backend: str = "local"
    model: str | None = None
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32


def evaluate(run: Path, opts, ui: Ui | None = None, *, device: str | None = None,
             judge: JudgeSpec | None = None) -> dict:
    """Base vs each adapter on held-out prompts (``opts``: cai.evaluation.runner.EvalOptions) → ``run/eval/``.
    Answers and judgements are saved as they finish and reused by the next run."""
    from cai.evaluation.runner import plan_eval, run_eval
    from cai.run import RunFolder

    ui = ui or Ui()
    judge = judge or JudgeSpec()
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise CaiError("--batch-size and --max-new-tokens must be at least 1")
    folder = RunFolder.open(run)
    plan = plan_eval(folder, opts)
    for note in plan.notes:
        ui.note(note, label="note")
    models = _EvalModels(folder, ui, device)
    judge_model = _make_judge(judge, folder, models, opts.batch_size, device, ui)
    t0 = time.perf_counter()
    with resumable(f"answers and judgements so far are saved in {display_path(run / 'eval')}"), ui.bar() as bar:
        report = run_eval(plan, opts, models.answerer, judge_model, bar.eval())
    ui.evaluated(run, report, time.perf_counter() - t0)
    return report


class _EvalModels:
    """The models under test, loaded when first needed: the run's base (kept), one adapter at a time."""

    def __init__(self, folder, ui: Ui, device: str | None):
        self.folder, self.ui, self.device = folder, ui, device
        self.loaded: dict[str, Any] = {}

    def base(self):
        if "base" not in self.loaded:
            from cai.backends import make_backend

            info = self.folder.info
            options: dict[str, Any] = ({"base_urls": info.base_urls or [], "api_key_env": "OPENAI_API_KEY"}
                                       if info.backend == "openai" else {})
            with self.ui.status(f"loading model {self.folder.model_source} ..."):
                self.loaded["base"] = make_backend(info.backend, self.folder.model_source, device=self.device,
                                                   **options)
        return self.loaded["base"]

    def answerer(self, m):
        if m.adapter is None:
            return self.base()
        from cai.backends.local import LocalBackend

        self.loaded.pop("adapter", None)      # one adapter model in memory at a time
        with self.ui.status(f"loading adapter {m.name} (merged into its base) ..."):
            self.loaded["adapter"] = LocalBackend(self.folder.model_source, device=self.device,
                                                  adapter=str(m.adapter))
        return self.loaded["adapter"]


def _make_judge(spec: JudgeSpec, folder, models: _EvalModels, batch_size: int, device: str | None, ui: Ui):
    from cai.evaluation.judge import EndpointJudge, LocalJudge

    if spec.backend == "openai":
        from cai.backends.openai import OpenAIBackend

        if not spec.base_urls or not spec.model:
            raise CaiError("--judge-backend openai needs --judge-base-url URL and --judge-model NAME")
        check_reachable(spec.base_urls)
        return EndpointJudge(OpenAIBackend(spec.model, base_urls=spec.base_urls, api_key_env=spec.api_key_env,
                                           concurrency=spec.concurrency, max_retries=2))
    if spec.model in (None, folder.model_source) and folder.info.backend == "local":
        return LocalJudge(models.base(), batch_size=batch_size)
    if spec.model is None:
        raise CaiError(f"the run was generated with the {folder.info.backend} backend: name a local judge model "
                       "with --judge-model, or use --judge-backend openai")
    from cai.backends.local import LocalBackend

    with ui.status(f"loading judge model {spec.model} ..."):
        return LocalJudge(LocalBackend(spec.model, device=device), batch_size=batch_size)


def check_reachable(urls: list[str]) -> None:
    """Fail at once, with the address, when no endpoint answers at all (instead of after every retry)."""
    import httpx

    reasons = []
    for url in urls:
        try:
            httpx.get(url.rstrip("/") + "/models", timeout=5.0)
            return
        except httpx.HTTPError as e:
            reasons.append(f"{url}: {type(e).__name__}")
    raise CaiError(f"the judge endpoint is unreachable ({'; '.join(reasons)})",
                   hint="Check --judge-base-url (it usually ends in /v1) and that the server is up.")


# ---------------------------------------------------------------------------------------------------------------
# the demo: generate → data build → train sft → eval

# Small enough to finish in a few minutes on a 2-core CPU with the default model. SmolLM2-135M rambles to the token
# limit: the demo trains on truncated texts on purpose (the card says so).
DEMO_HELPFUL_MIX = 0.25
DEMO_ALLOW_FLAGS = ("truncated",)


def demo_train_flags(steps: int) -> list[str]:
    """Short and CPU-friendly: padding-free batches (same loss, ~1.4x the tokens/s of padded ones on this CPU: see
    bench/README.md), no activation checkpointing (memory is not the constraint on a CPU)."""
    return ["--max_steps", str(steps), "--save_steps", str(max(1, steps // 2)), "--gradient_accumulation_steps", "1",
            "--padding_free", "true", "--max_length", "None", "--activation_checkpointing", "false"]


@dataclass
class DemoJob:
    generate: GenerateJob
    helpful_prompts: str                    # the ordinary prompts of the helpfulness mix and of the evaluation
    train_steps: int = 8                    # 0: generate only
    eval: Any = None                        # cai.evaluation.runner.EvalOptions; None or red_team <= 0: no eval
    seed: int = 0


def demo(job: DemoJob, ui: Ui | None = None) -> bool:
    """Generate, build the data, train a short SFT adapter, evaluate it. Every step reuses what an earlier run of
    the demo finished. Returns True when every step ran (False: it stopped where ``job`` said to)."""
    from cai.data.build import BuildOptions

    ui = ui or Ui()
    g = job.generate
    generate(g, ui)
    if job.train_steps <= 0:
        return False
    data = BuildOptions(helpful_mix=DEMO_HELPFUL_MIX, test_size=0.1, all_rounds=False,
                        allow_flags=DEMO_ALLOW_FLAGS, seed=job.seed, helpful_prompts=job.helpful_prompts)
    build_data(g.out, data, ui, device=g.device, endpoints=g.endpoints)
    train_stage("sft", g.out, ui, flags=demo_train_flags(job.train_steps))
    if job.eval is None or job.eval.red_team <= 0:
        return False
    evaluate(g.out, job.eval, ui, device=g.device)
    return True


