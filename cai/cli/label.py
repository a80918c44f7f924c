"""``cai label``: pairs of answers labelled by AI feedback (the paper's RL phase) → RUN/preferences.jsonl; with
``--check``, the labeller's accuracy, calibration and position bias on pairs whose better answer is known."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed

HELP = ("AI-feedback preference labels (the paper's RL phase): answer pairs from a policy, soft labels from a "
        "feedback model's (A)/(B) probabilities → RUN/preferences.jsonl; --check: how far to trust the labeller")


@dataclass
class LabelArgs:
    run: Path = option(None, "the run folder, e.g. runs/demo", positional=True)
    policy: str = option("base", "who answers: base (the run's model), an adapter of the run (sft, dpo), an adapter "
                                 "folder, or records (each record's initial answer against its final revision) "
                                 "(default: %(default)s)")
    samples: int = option(2, "answers per prompt from the policy; answers 0-1, 2-3, ... make the pairs "
                             "(default: %(default)s)")
    principles_per_pair: int = option(1, "preference principles drawn per pair, their labels averaged (the paper's "
                                         "ensemble) (default: %(default)s)")
    orders: str = option("both", "both: ask each pair with either answer first and average (cancels position bias); "
                                 "ab: one order (default: %(default)s)", choices=["both", "ab"])
    cot: bool = option(False, "chain of thought: the feedback model reasons first; its probabilities are then "
                              "clamped to --clamp")
    clamp: list[float] = option([0.4, 0.6], "chain-of-thought labels are clamped to [LO, HI] (default: 0.4 0.6, "
                                            "as the paper found best)", nargs=2, metavar="P")
    prompts: str | None = option(None, "a prompt file or shipped set to sample pairs for (default: the prompts the "
                                       "run's records answer)")
    limit: int | None = option(None, "prompts (or records, with --policy records) to label, at most")
    constitution: Path | None = option(None, "the constitution whose preference principles label (default: the "
                                             "run's)")
    temperature: float = option(1.0, "policy sampling temperature (default: %(default)s, as the paper)")
    top_p: float = option(1.0, "default: %(default)s")
    max_new_tokens: int = option(128, "per policy answer (default: %(default)s)")
    batch_size: int = option(8, "prompts per policy batch (default: %(default)s)")
    seed: int = option(0, "sampling, principle draws (default: %(default)s)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    feedback_backend: str = option("local", "local: a transformers model's next-token log-probabilities; openai: "
                                            "an OpenAI-compatible endpoint that returns top_logprobs "
                                            "(default: %(default)s)", choices=["local", "openai"])
    feedback_model: str | None = option(None, "the feedback model (default: the run's base model; needed with "
                                              "openai)")
    feedback_base_url: list[str] = option([], "openai feedback: an endpoint, e.g. http://10.0.0.5:8000/v1; repeat "
                                              "for several", metavar="URL")
    feedback_api_key_env: str = option("OPENAI_API_KEY", "openai feedback: the environment variable holding its "
                                                         "API key (default: %(default)s)")
    feedback_concurrency: int = option(32, "openai feedback: requests in flight (default: %(default)s)")
    feedback_batch_size: int = option(16, "local feedback: questions per forward pass (default: %(default)s)")
    check: bool = option(False, "instead of labelling the run: label the comparison set (pairs whose better answer "
                                "is known) and report accuracy, calibration and position bias → RUN/label/check.json")
    check_set: Path | None = option(None, "the comparison set for --check (default: the shipped "
                                          "data/labeller_check.jsonl)")

    def settings(self):
        from cai.label.labeller import LabelSettings

        lo, hi = self.clamp
        return LabelSettings(principles_per_pair=self.principles_per_pair, orders=self.orders, cot=self.cot,
                             clamp=(lo, hi), seed=self.seed, batch_size=self.feedback_batch_size)

    def options(self):
        from cai.label.runner import LabelOptions
        from cai.resources import prompts_path

        return LabelOptions(policy=self.policy, samples=self.samples,
                            prompts=prompts_path(self.prompts) if self.prompts else None, limit=self.limit,
                            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                            batch_size=self.batch_size, constitution=self.constitution, settings=self.settings())

    def feedback(self):
        from cai.workflow.label import FeedbackSpec

        return FeedbackSpec(backend=self.feedback_backend, model=self.feedback_model,
                            base_urls=self.feedback_base_url, api_key_env=self.feedback_api_key_env,
                            concurrency=self.feedback_concurrency, batch_size=self.feedback_batch_size)


def add(sub) -> None:
    p = sub.add_parser("label", help=HELP)
    add_options(p, LabelArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai.cli.console import quiet_libraries
    from cai.cli.ui import TerminalUi
    from cai.workflow import label as steps

    a = parsed(LabelArgs, ns)
    quiet_libraries()
    if a.check:
        steps.check_labeller(a.run, a.settings(), a.feedback(), TerminalUi(), check_set=a.check_set,
                             constitution=a.constitution, device=a.device)
    else:
        steps.label(a.run, a.options(), a.feedback(), TerminalUi(), device=a.device)
    return 0
