"""``cai constitution import``: convert a public constitution format into ours."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed

HELP = "work with constitution files"


@dataclass
class ImportArgs:
    format: str = option(None, "hf: Hugging Face llm-swarm JSON; anthropic: the CAI paper's "
                               "CritiqueRevisionInstructions; anthropic-rl: the paper's RL-phase files "
                               "(principles.json [fewshot.json [cot-fewshot.json]])", positional=True,
                         choices=["hf", "anthropic", "anthropic-rl"])
    sources: list[Path] = option([], "the file(s) to import (anthropic-rl: the multiple-choice principles, then "
                                     "optionally the few-shot comparisons and the chain-of-thought few-shots)",
                                 positional=True, nargs="+", metavar="SOURCE")
    output: Path = option(None, "the YAML file to write", short="-o", required=True)
    name: str | None = option(None, "constitution name (default: from the file name)")
    force: bool = option(False, "overwrite the output file if it exists")


def add(sub) -> None:
    p = sub.add_parser("constitution", help=HELP)
    actions = p.add_subparsers(dest="constitution_command", metavar="ACTION", required=True)
    imp = actions.add_parser("import", help="convert a public constitution format into ours")
    add_options(imp, ImportArgs)
    imp.set_defaults(func=run_import)


def run_import(ns: argparse.Namespace) -> int:
    from cai.cli.console import console
    from cai.core.constitution import parse_constitution
    from cai.core.errors import CaiError, display_path
    from cai.core.files import write_bytes_atomic
    from cai.core.importers import import_anthropic, import_anthropic_rl, import_hf

    a = parsed(ImportArgs, ns)
    most = 3 if a.format == "anthropic-rl" else 1
    if len(a.sources) > most:
        raise CaiError(f"`cai constitution import {a.format}` takes {'up to 3 files' if most > 1 else 'one file'}, "
                       f"got {len(a.sources)}")
    if a.output.exists() and not a.force:
        raise CaiError(f"{display_path(a.output)} already exists", hint="Pass --force to overwrite it.")
    if a.format == "anthropic-rl":
        extra: list[Path | None] = [*a.sources[1:], None, None]
        c = import_anthropic_rl(a.sources[0], extra[0], extra[1], name=a.name)
    else:
        c = (import_hf if a.format == "hf" else import_anthropic)(a.sources[0], name=a.name)
    names = ", ".join(s.name for s in a.sources)
    text = f"# Imported by `cai constitution import {a.format}` from {names}\n" + c.to_yaml()
    parse_constitution(text, str(a.output))   # what we write must load back
    a.output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(a.output, text.encode("utf-8"))
    unmatched = sum(1 for e in c.exemplars if e.principle is None)
    rl = (f", {len(c.preference_principles)} preference principles, {len(c.preference_exemplars)} preference "
          "exemplars" if c.preference_principles else "")
    console().print(f"[green]wrote[/] {display_path(a.output)}: {len(c.principles)} principles, "
                    f"{len(c.exemplars)} exemplars" + (f" ({unmatched} not matched to a principle)"
                                                        if unmatched else "") + rl)
    return 0
