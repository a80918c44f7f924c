"""``cai train``: QLoRA fine-tuning with TRL (sft, then dpo). Any TRL setting may follow as ``--name value``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed

HELP = "QLoRA fine-tuning with TRL: sft, then dpo"
DESCRIPTION = ("Any TRL ModelConfig / SFTConfig / DPOConfig setting can follow as --name value (see --help-config); "
               "it overrides the recipe and --config.")


@dataclass
class TrainArgs:
    stage: str = option(None, None, positional=True, choices=["sft", "dpo"])
    run: Path | None = option(None, "the run folder (after `cai data build`)", positional=True, nargs="?")
    config: Path | None = option(None, "a YAML recipe, a file or a shipped one by name (soft-labels: DPO on "
                                       "AI-feedback soft labels); its values override the stage's shipped one "
                                       "(cai/resources/recipes/<stage>.yaml)")
    overwrite: bool = option(False, "move a finished or unfinished adapter folder aside and train again")
    help_config: bool = option(False, "list every training setting and exit")


def add(sub) -> None:
    p = sub.add_parser("train", help=HELP, description=DESCRIPTION)
    add_options(p, TrainArgs)
    p.set_defaults(func=run, extra_ok=True)   # the rest of the line: TRL settings


def run(ns: argparse.Namespace) -> int:
    from cai import workflow
    from cai.cli.console import console, quiet_libraries
    from cai.cli.ui import TerminalUi
    from cai.core.errors import CaiError

    a = parsed(TrainArgs, ns)
    if a.help_config:
        from cai.train.trainer import config_help

        console().print(config_help(a.stage), markup=False, highlight=False)
        return 0
    if a.run is None:
        raise CaiError(f"cai train {a.stage}: the run folder is missing",
                       hint=f"cai train {a.stage} runs/demo [--config FILE] [--name value ...]")
    quiet_libraries()
    workflow.train_stage(a.stage, a.run, TerminalUi(), config=a.config, flags=ns.extra, overwrite=a.overwrite)
    return 0
