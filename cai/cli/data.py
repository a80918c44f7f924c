"""``cai data build``: a run's records (and, with ``--preferences``, its AI-feedback labels), with people's review
decisions applied → RUN/data/{sft,dpo}_{train,test}.jsonl (+ reward_{train,test}.jsonl) and a dataset card."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed
from cai.resources import HELPFUL

HELP = "training data from a run's records"


@dataclass
class DataBuildArgs:
    run: Path = option(None, "the run folder `cai generate` wrote", positional=True)
    helpful_mix: float = option(0.0, "fraction of SFT rows that are ordinary prompts answered by the same model, in "
                                     "[0, 1) (default: %(default)s)")
    helpful_prompts: str = option(HELPFUL, "the ordinary prompts for --helpful-mix: a file, or a shipped set by "
                                           "name (default: %(default)s, the shipped data/prompts/helpful.jsonl)")
    test_size: float = option(0.1, "fraction of prompts held out (default: %(default)s)")
    all_rounds: bool = option(False, "an SFT row for every round's revision, as the paper trained (default: the "
                                     "final one)")
    allow_flag: list[str] = option([], "keep texts with this flag (empty, echo, truncated, unchanged); repeatable",
                                   metavar="FLAG")
    seed: int = option(0, "seeds the split and the helpful prompts' order")
    preferences: bool = option(False, "the DPO rows (and reward-model rows) from RUN/preferences.jsonl, the "
                                      "AI-feedback labels `cai label RUN` writes, not the records' revision-vs-initial "
                                      "pairs")
    preference_labels: str | None = option(None, "with --preferences: soft (the default: the label is the feedback "
                                                 "model's probability; train on it with `cai train dpo RUN --config "
                                                 "soft-labels`) or hard (label 1.0: plain DPO)", metavar="soft|hard")
    min_confidence: float | None = option(None, "with --preferences: leave out pairs whose label is less sure than "
                                                "this, in [0.5, 1] (default: 0.5, every labelled pair)", metavar="P")
    require_review: bool = option(False, "only what a person accepted or edited on the review page (`cai review "
                                         "RUN`) trains, and pairs they agreed with or flipped; unreviewed items and "
                                         "those changed since their review are left out")
    review_rule: str = option("any-reject", "how reviewers who disagree resolve: any-reject (one reject leaves an "
                                            "item out), latest (the most recent decision stands), unanimous "
                                            "(disagreement leaves it out) (default: %(default)s)",
                              choices=["any-reject", "latest", "unanimous"])
    device: str | None = option(None, "torch device for answering the helpful prompts (default: cuda if available)")
    base_url: list[str] = option([], "a run made with --backend openai: the endpoints that answer the helpful "
                                     "prompts (default: the run's own, from run.json); repeatable", metavar="URL")
    api_key_env: str = option("OPENAI_API_KEY", "a run made with --backend openai: the variable holding the API key "
                                                "(default: %(default)s)")
    concurrency: int = option(64, "a run made with --backend openai: requests in flight (default: %(default)s)")


def add(sub) -> None:
    p = sub.add_parser("data", help=HELP)
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="records (and preferences) → data/{sft,dpo}_{train,test}.jsonl and a "
                                         "dataset card")
    add_options(b, DataBuildArgs)
    b.set_defaults(func=run_build)


def run_build(ns: argparse.Namespace) -> int:
    from cai import workflow
    from cai.cli.console import quiet_libraries
    from cai.cli.ui import TerminalUi
    from cai.data.build import BuildOptions

    a = parsed(DataBuildArgs, ns)
    opts = BuildOptions(helpful_mix=a.helpful_mix, test_size=a.test_size, all_rounds=a.all_rounds,
                        allow_flags=tuple(a.allow_flag), seed=a.seed, helpful_prompts=a.helpful_prompts,
                        preferences=a.preferences, preference_labels=a.preference_labels,
                        min_confidence=a.min_confidence, require_review=a.require_review,
                        review_rule=a.review_rule)
    opts.check()
    if opts.helpful_mix > 0:
        quiet_libraries()
    workflow.build_data(a.run, opts, TerminalUi(), device=a.device,
                        endpoints=workflow.Endpoints(base_urls=a.base_url, api_key_env=a.api_key_env,
                                                     concurrency=a.concurrency))
    return 0
