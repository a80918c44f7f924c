"""``cai demo``: the main job on the default offline model, generate → data build → train sft → AI-feedback labels →
soft-label DPO → eval → report, as one call to :func:`cai.workflow.demo`. It takes ``cai generate``'s options (with
smaller defaults) and ``cai eval``'s sizes as ``--eval-*``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cai.cli.evaluate import SIZES, EvalArgs
from cai.cli.generate import GenerateArgs
from cai.cli.options import add_options, option, parsed

HELP = ("the main job on the default offline model: generate → data build → train sft → label (AI feedback) → "
        "train dpo (soft labels) → eval → report")
# Small enough to finish in a few minutes on a 2-core CPU with the default model ...
GENERATE_DEFAULTS = {"limit": 16, "rounds": 1, "batch_size": 16, "max_new_tokens": 128}
# ... and its evaluation: small enough to keep the whole job within 15 minutes on that machine
EVAL_DEFAULTS = {"red_team": 16, "helpful": 16, "records": 16, "max_new_tokens": 96}
EVAL_PREFIX = "eval-"


@dataclass
class DemoArgs:
    train_steps: int = option(8, "QLoRA SFT steps after generating (0: generate only; default: %(default)s)")
    dpo_steps: int = option(8, "soft-label DPO steps after labelling pairs of the SFT adapter's answers by AI "
                               "feedback (0: no RL phase; default: %(default)s)")


def add(sub) -> None:
    p = sub.add_parser("demo", help=HELP)
    add_options(p, GenerateArgs, defaults=GENERATE_DEFAULTS, skip=("dry_run",))
    add_options(p, DemoArgs)
    add_options(p, EvalArgs, prefix=EVAL_PREFIX, only=SIZES, defaults=EVAL_DEFAULTS)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai import workflow
    from cai.cli.console import console, quiet_libraries
    from cai.cli.generate import generate_job
    from cai.cli.ui import TerminalUi
    from cai.core.errors import display_path
    from cai.resources import HELPFUL

    g = parsed(GenerateArgs, ns)
    demo = parsed(DemoArgs, ns)
    # the evaluation shares the demo's seed (and device); its other settings are `cai eval`'s defaults
    sizes = parsed(EvalArgs, ns, prefix=EVAL_PREFIX, seed=g.seed)
    job = workflow.DemoJob(generate=generate_job(g), helpful_prompts=HELPFUL,
                           train_steps=demo.train_steps, dpo_steps=demo.dpo_steps, eval=sizes.options(),
                           seed=g.seed)
    quiet_libraries()
    if workflow.demo(job, TerminalUi()):
        run = display_path(g.out)
        final = "dpo" if demo.dpo_steps > 0 else "sft"
        console().print(f"\n[bold]done.[/] report: [bold]{run}/eval/report.html[/]\n"
                        f"serve the adapters: [bold]cai serve --adapter {run}/adapters/sft --adapter "
                        f"{run}/adapters/dpo[/]  (then model \"{final}\" at http://127.0.0.1:8000/v1)\n"
                        f"next: cai label {run} --check (how far to trust the labels), cai review {run}",
                        soft_wrap=True)
    return 0
