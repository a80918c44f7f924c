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
                               "CritiqueRevisionInstructions", positional=True, choices=["hf", "anthropic"])
    source: Path = option(None, None, positional=True)
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
    from cai.core.importers import import_anthropic, import_hf

    a = parsed(ImportArgs, ns)
    if a.output.exists() and not a.force:
        raise CaiError(f"{display_path(a.output)} already exists", hint="Pass --force to overwrite it.")
    c = (import_hf if a.format == "hf" else import_anthropic)(a.source, name=a.name)
    text = f"# Imported by `cai constitution import {a.format}` from {a.source.name}\n" + c.to_yaml()
    parse_constitution(text, str(a.output))   # what we write must load back
    a.output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(a.output, text.encode("utf-8"))
    unmatched = sum(1 for e in c.exemplars if e.principle is None)
    console().print(f"[green]wrote[/] {display_path(a.output)}: {len(c.principles)} principles, "
                    f"{len(c.exemplars)} exemplars" + (f" ({unmatched} not matched to a principle)"
                                                        if unmatched else ""))
    return 0
