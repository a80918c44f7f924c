"""``cai validate``: check constitution files, every error with file, line and field."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed

HELP = "check constitution files: every error with file, line and field"


@dataclass
class ValidateArgs:
    files: list[str] = option([], "constitution files, or the names of shipped ones (default)", positional=True,
                              nargs="+", metavar="FILE")
    hashes: bool = option(False, "also print each principle's sha256")


def add(sub) -> None:
    p = sub.add_parser("validate", help=HELP)
    add_options(p, ValidateArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai.cli.app import EXIT_USER_ERROR
    from cai.cli.console import console, print_error
    from cai.cli.generate import constitution_file
    from cai.core.constitution import load_constitution
    from cai.core.errors import ConstitutionError, display_path

    a = parsed(ValidateArgs, ns)
    out = console()
    failed = 0
    for spec in a.files:
        try:
            path = constitution_file(spec)
            c = load_constitution(path)
        except ConstitutionError as e:
            failed += 1
            print_error(e)
            continue
        shown = display_path(spec) if Path(spec).exists() else f"{spec} ({display_path(path)})"
        rl = (f", {len(c.preference_principles)} preference principles, {len(c.preference_exemplars)} preference "
              "exemplars" if c.preference_principles else "")
        out.print(f"[green]ok[/] {shown}: {c.name} v{c.version}, {len(c.principles)} principles, "
                  f"{len(c.exemplars)} exemplars{rl}, sha256 {c.sha256[:16]}", soft_wrap=True)
        if a.hashes:
            for p in c.principles:
                out.print(f"   {p.sha256[:16]}  {p.id}")
            for q in c.preference_principles:
                out.print(f"   {q.sha256[:16]}  {q.id} (preference)")
    return EXIT_USER_ERROR if failed else 0
