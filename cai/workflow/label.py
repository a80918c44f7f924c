"""``cai label``: AI-feedback preference labels for a run, and the check of the labeller on pairs with a known answer.

The models are loaded here: the policy that answers (the run's base, or an adapter of the run merged into it) and the
feedback model (the run's base by default, the one its constitution was written for; another local model; or an
OpenAI-compatible endpoint, checked up front to return log-probabilities). When the policy and the feedback model are
the same local model, it is loaded once.
"""

from __future__ import annotations

from pathlib import Path

from cai.workflow.base import ModelSpec, RunModels, Ui, resumable

FeedbackSpec = ModelSpec    # who labels (the name the CLI knows)


def make_feedback(spec: ModelSpec, models: RunModels):
    """The feedback model ``spec`` names (the run's base by default); an endpoint is checked up front to return
    log-probabilities."""
    from cai.label.feedback import EndpointFeedback, LocalFeedback, check_logprobs

    kind, reader = models.reader(spec, "feedback")
    if kind == "openai":
        check_logprobs(reader, spec.base_urls[0])
        return EndpointFeedback(reader)
    return LocalFeedback(reader, batch_size=spec.batch_size)


def label(run: Path, opts, spec: ModelSpec | None = None, ui: Ui | None = None, *,
          device: str | None = None):
    """Pairs from ``opts.policy`` labelled by AI feedback into ``run/preferences.jsonl`` (``opts``:
    :class:`cai.label.runner.LabelOptions`). Samples and readings are saved as they finish and reused."""
    from cai.label.runner import RECORDS, label_run, policy_adapter
    from cai.run import RunFolder

    ui = ui or Ui()
    opts.check()
    folder = RunFolder.open(run)
    models = RunModels(folder, ui, device)
    policy = None
    if opts.policy != RECORDS:
        adapter = policy_adapter(folder, opts.policy)
        policy = models.base() if adapter is None else models.adapter(adapter, f"policy {opts.policy}")
    feedback = make_feedback(spec or ModelSpec(), models)
    with resumable(f"answers and readings so far are saved in {folder.shown(folder.label_dir)}",
                   "run the same command again to continue"), ui.bar() as bar:
        result = label_run(run, opts, feedback, policy_backend=policy, progress=bar.label())
    ui.labelled(run, result)
    return result


def check_labeller(run: Path, settings, spec: ModelSpec | None = None, ui: Ui | None = None, *,
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
    feedback = make_feedback(spec or ModelSpec(), RunModels(folder, ui, device))
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
