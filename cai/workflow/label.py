"""``cai label``: AI-feedback preference labels for a run, and the check of the labeller on pairs with a known answer.

The models are loaded here: the policy that answers (the run's base, or an adapter of the run merged into it) and the
feedback model (the run's base by default, the one its constitution was written for; another local model; or an
OpenAI-compatible endpoint, checked up front to return log-probabilities). When the policy and the feedback model are
the same local model, it is loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError
from cai.workflow.base import Ui, resumable
from cai.workflow.steps import check_reachable


@dataclass
class FeedbackSpec:
    """Who labels: ``local`` (a transformers model: the run's base unless ``model`` names another) or ``openai``."""

    backend: str = "local"
    model: str | None = None
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32
    batch_size: int = 16


class _Models:
    """The run's base (loaded once, shared by policy and feedback) and the policy adapter, loaded when needed."""

    def __init__(self, folder, ui: Ui, device: str | None):
        self.folder, self.ui, self.device = folder, ui, device
        self._base: Any = None

    def base(self):
        if self._base is None:
            from cai.backends import make_backend

            info = self.folder.info
            options: dict[str, Any] = ({"base_urls": info.base_urls or [], "api_key_env": "OPENAI_API_KEY"}
                                       if info.backend == "openai" else {})
            with self.ui.status(f"loading model {self.folder.model_source} ..."):
                self._base = make_backend(info.backend, self.folder.model_source, device=self.device, **options)
        return self._base

    def policy(self, adapter: Path | None):
        if adapter is None:
            return self.base()
        if self.folder.info.backend != "local":
            raise CaiError(f"--policy {adapter.name}: an adapter runs on a local model, and this run was generated "
                           f"with the {self.folder.info.backend} backend")
        from cai.backends.local import LocalBackend

        with self.ui.status(f"loading policy {adapter.name} (merged into its base) ..."):
            return LocalBackend(self.folder.model_source, device=self.device, adapter=str(adapter))


def make_feedback(spec: FeedbackSpec, folder, models: _Models, device: str | None, ui: Ui):
    from cai.label.feedback import EndpointFeedback, LocalFeedback, check_logprobs

    if spec.backend == "openai":
        from cai.backends.openai import OpenAIBackend

        if not spec.base_urls or not spec.model:
            raise CaiError("--feedback-backend openai needs --feedback-base-url URL and --feedback-model NAME")
        check_reachable(spec.base_urls, what="feedback", flag="--feedback-base-url")
        backend = OpenAIBackend(spec.model, base_urls=spec.base_urls, api_key_env=spec.api_key_env,
                                concurrency=spec.concurrency, max_retries=2)
        check_logprobs(backend, spec.base_urls[0])
        return EndpointFeedback(backend)
    if spec.backend != "local":
        raise CaiError(f"--feedback-backend must be local or openai, got {spec.backend!r}")
    if spec.model in (None, folder.model_source) and folder.info.backend == "local":
        return LocalFeedback(models.base(), batch_size=spec.batch_size)
    if spec.model is None:
        raise CaiError(f"the run was generated with the {folder.info.backend} backend: name a local feedback model "
                       "with --feedback-model, or use --feedback-backend openai")
    from cai.backends.local import LocalBackend

    with ui.status(f"loading feedback model {spec.model} ..."):
        return LocalFeedback(LocalBackend(spec.model, device=device), batch_size=spec.batch_size)


def label(run: Path, opts, spec: FeedbackSpec | None = None, ui: Ui | None = None, *,
          device: str | None = None):
    """Pairs from ``opts.policy`` labelled by AI feedback into ``run/preferences.jsonl`` (``opts``:
    :class:`cai.label.runner.LabelOptions`). Samples and readings are saved as they finish and reused."""
    from cai.label.runner import RECORDS, label_run, policy_adapter
    from cai.run import RunFolder

    ui = ui or Ui()
    opts.check()
    folder = RunFolder.open(run)
    models = _Models(folder, ui, device)
    adapter = policy_adapter(folder, opts.policy) if opts.policy != RECORDS else None
    policy = models.policy(adapter) if opts.policy != RECORDS else None
    feedback = make_feedback(spec or FeedbackSpec(), folder, models, device, ui)
    with resumable(f"answers and readings so far are saved in {folder.shown(folder.label_dir)}",
                   "run the same command again to continue"), ui.bar() as bar:
        result = label_run(run, opts, feedback, policy_backend=policy, progress=bar.label())
    ui.labelled(run, result)
    return result


def check_labeller(run: Path, settings, spec: FeedbackSpec | None = None, ui: Ui | None = None, *,
                   check_set: Path | None = None, constitution: Path | None = None, device: str | None = None
                   ) -> dict:
    """The feedback model's accuracy, calibration and position bias on the comparison set →
    ``run/label/check.json``."""
    from cai.core.files import KeyedLog, write_json_atomic
    from cai.label.check import check_labeller as score
    from cai.label.check import load_check_set
    from cai.label.runner import preference_constitution
    from cai.resources import labeller_check_path
    from cai.run import RunFolder

    ui = ui or Ui()
    settings.check()
    folder = RunFolder.open(run)
    c = preference_constitution(folder, constitution)
    path = check_set or labeller_check_path()
    items = load_check_set(path)
    feedback = make_feedback(spec or FeedbackSpec(), folder, _Models(folder, ui, device), device, ui)
    with folder.lock("cai label --check"), resumable(
            f"readings so far are saved in {folder.shown(folder.label_dir)}"), ui.bar() as bar:
        folder.label_dir.mkdir(parents=True, exist_ok=True)
        progress = bar.label()
        per_order = sum(1 if it.principle in c.preference_ids else min(settings.principles_per_pair,
                                                                       len(c.preference_ids)) for it in items)
        total = per_order * (2 if settings.orders == "both" else 1)
        progress("check", 0, total)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress("check", done[0], total)

        report = score(items, c, feedback, settings, KeyedLog(folder.label_dir / "judgements.jsonl"), tick)
        report["check_set"] = {"path": folder.rel(path), "items": len(items)}
        write_json_atomic(folder.label_dir / "check.json", report)
    ui.checked(run, report)
    return report
