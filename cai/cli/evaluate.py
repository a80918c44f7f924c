"""``cai eval``: base vs each adapter on held-out prompts → RUN/eval/report.html."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed
from cai.resources import HELPFUL

HELP = ("base vs each adapter on held-out prompts: harmlessness, over-refusal, revision rounds, diversity → "
        "RUN/eval/report.html")
SIZES = ("red_team", "helpful", "records", "max_new_tokens")   # the options `cai demo` takes too, as --eval-*


@dataclass
class EvalArgs:
    run: Path = option(None, "the run folder, e.g. runs/demo", positional=True)
    red_team: int = option(64, "held-out red-team prompts to answer, at most (default: %(default)s)")
    helpful: int = option(64, "ordinary prompts for over-refusal and helpfulness, at most; 0 skips them "
                              "(default: %(default)s)")
    records: int = option(64, "generated records judged for the revision-round curve, at most (default: %(default)s)")
    max_new_tokens: int = option(128, "per answer (default: %(default)s)")
    prompts: str | None = option(None, "red-team prompt file (default: the one the run was generated from, per "
                                       "run.json)")
    helpful_prompts: str = option(HELPFUL, "a file, or a shipped set by name (default: %(default)s, the shipped "
                                            "data/prompts/helpful.jsonl)")
    principles: list[str] = option([], "principles to judge against (default: every principle of the run's "
                                       "constitution)", nargs="+", metavar="ID")
    adapters: list[str] | None = option(None, "an adapter under RUN/adapters to evaluate; repeatable (default: "
                                              "every finished one)", flag="--adapter", metavar="NAME")
    temperature: float = option(0.7, "answers' sampling (default: %(default)s)")
    top_p: float = option(0.95, "default: %(default)s")
    seed: int = option(0, "default: %(default)s")
    batch_size: int = option(16, "answers and judgements per forward pass (default: %(default)s)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "the models' weights: float32, bfloat16, float16 or auto (default: what the run "
                                     "was generated in); part of every answer's key", choices=["auto", "float32",
                                                                                              "bfloat16", "float16"])
    judge: list[str] = option([], "who judges: model (the model judge below) or rules:FILE (deterministic rules for "
                                  "the principles and questions FILE covers; see docs/rules.md); repeat for both "
                                  "(rules win where they apply). Default: model", metavar="model|rules:FILE")
    judge_backend: str = option("local", "local: a transformers model's next-token logits; openai: an "
                                         "OpenAI-compatible endpoint that returns top_logprobs (default: %(default)s)",
                                choices=["local", "openai"])
    judge_model: str | None = option(None, "the judge model (default: the run's base model; needed with openai)")
    judge_base_url: list[str] = option([], "openai judge: an endpoint, e.g. http://10.0.0.5:8000/v1; repeat for "
                                           "several", metavar="URL")
    judge_api_key_env: str = option("OPENAI_API_KEY", "openai judge: the environment variable holding its API key "
                                                      "(default: %(default)s)")
    judge_concurrency: int = option(32, "openai judge: requests in flight (default: %(default)s)")
    compare: str | None = option(None, "iterations: one report across the iterations of a `cai iterate` folder "
                                       "(RUN/iterations/report.html), from what each iteration's evaluation wrote",
                                 choices=["iterations"])

    def options(self):
        """The library's EvalOptions (it finds a shipped helpful set by name itself; the red-team file is resolved
        here)."""
        from cai.evaluation.runner import EvalOptions
        from cai.resources import prompts_path

        return EvalOptions(red_team=self.red_team, helpful=self.helpful, records=self.records,
                           prompts=prompts_path(self.prompts) if self.prompts else None,
                           helpful_prompts=self.helpful_prompts, principles=tuple(self.principles),
                           adapters=tuple(self.adapters) if self.adapters else None,
                           max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                           seed=self.seed, batch_size=self.batch_size, dtype=self.dtype, **judges(self.judge))


def judges(specs: list[str]) -> dict:
    """``--judge`` values → EvalOptions' ``rules`` and ``model_judge`` (no --judge: the model judge alone)."""
    from cai.core.errors import ConfigError

    rules = [s.removeprefix("rules:") for s in specs if s.startswith("rules:")]
    other = [s for s in specs if not s.startswith("rules:") and s != "model"]
    if other or len(rules) > 1 or any(not r for r in rules):
        raise ConfigError(f"--judge {' '.join(other) or ' '.join('rules:' + r for r in rules)}: give --judge model "
                          "and/or one --judge rules:FILE")
    return {"rules": rules[0] if rules else None, "model_judge": not specs or "model" in specs}


def add(sub) -> None:
    p = sub.add_parser("eval", help=HELP)
    add_options(p, EvalArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai import workflow
    from cai.cli.console import quiet_libraries
    from cai.cli.ui import TerminalUi

    a = parsed(EvalArgs, ns)
    if a.compare == "iterations":
        from cai.loop.report import write_report
        from cai.loop.state import LoopFolder

        TerminalUi().iterated(a.run, write_report(LoopFolder(a.run)))
        return 0
    quiet_libraries()
    judge = workflow.JudgeSpec(backend=a.judge_backend, model=a.judge_model, base_urls=a.judge_base_url,
                               api_key_env=a.judge_api_key_env, concurrency=a.judge_concurrency)
    workflow.evaluate(a.run, a.options(), TerminalUi(), device=a.device, judge=judge)
    return 0
