"""``cai merge``: an adapter and its base → a plain safetensors model folder."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed
from cai.inference.loading import DTYPES

HELP = "adapter + base → a plain safetensors model folder"


@dataclass
class MergeArgs:
    adapter: Path = option(None, "an adapter folder, e.g. runs/demo/adapters/dpo", positional=True)
    output: Path = option(None, "the model folder to write", short="-o", required=True)
    dtype: str = option("auto", "weights' dtype (auto: the base model's; default: %(default)s)", choices=DTYPES)
    force: bool = option(False, "replace the output folder if it is not empty")


def add(sub) -> None:
    p = sub.add_parser("merge", help=HELP)
    add_options(p, MergeArgs)
    p.set_defaults(func=run)


class _Status:
    """merge_adapter's progress: each step's text on the spinner line."""

    def __init__(self, spinner):
        self.spinner = spinner

    def status(self, text: str) -> None:
        self.spinner.update(text)


def run(ns: argparse.Namespace) -> int:
    from cai.cli.console import console, quiet_libraries
    from cai.core.errors import display_path
    from cai.inference.merge import merge_adapter

    a = parsed(MergeArgs, ns)
    quiet_libraries()
    with console(stderr=True).status("merging ...") as status:
        summary = merge_adapter(a.adapter, a.output, dtype=a.dtype, force=a.force, progress=_Status(status))
    console().print(f"merged {display_path(a.adapter)} into {summary['base_model']} → {display_path(a.output)} "
                    f"({summary['dtype']}" + (", dequantized from 4-bit" if summary["dequantized_from_4bit"] else "")
                    + ")")
    return 0
