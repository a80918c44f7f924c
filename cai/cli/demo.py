"""``cai demo``: the main job on the default offline model, generate → data build → train sft → eval → report, as
one call to :func:`cai.workflow.demo`. It takes ``cai generate``'s options (with smaller defaults) and ``cai eval``'s
sizes as ``--eval-*``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cai.cli.evaluate import SIZES, EvalArgs
from cai.cli.generate import GenerateArgs
from cai.cli.options import add_options, option, parsed

HELP = "the main job on the default offline model: generate → data build → train sft → eval → report"
# Small enough to finish in a few minutes on a 2-core CPU with the default model ...
GENERATE_DEFAULTS = {"limit": 16, "rounds": 1, "batch_size": 16, "max_new_tokens": 128}
# ... and its evaluation: small enough to keep the whole job within 15 minutes on that machine
EVAL_DEFAULTS = {"red_team": 16, "helpful": 16, "records": 16, "max_new_tokens": 96}
EVAL_PREFIX = "eval-"


@dataclass
class DemoArgs:
    train_steps: int = option(8, "QLoRA SFT steps after generating (0: generate only; default: %(default)s)")


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
                           train_steps=demo.train_steps, eval=sizes.options(), seed=g.seed)
    quiet_libraries()
    if workflow.demo(job, TerminalUi()):
        run = display_path(g.out)
        console().print(f"\n[bold]done.[/] report: [bold]{run}/eval/report.html[/]\n"
                        f"serve the adapter: [bold]cai serve --adapter {run}/adapters/sft[/]  (then "
                        f"model \"sft\" at http://127.0.0.1:8000/v1)\n"
                        f"next: cai train dpo {run}, cai eval {run}", soft_wrap=True)
    return 0
