"""The ``cai`` command. A thin shell over the library: parse arguments, call, print.

Heavy libraries (torch, transformers) are imported only by the commands that need them, so ``cai --help`` and
``cai validate`` answer at once. User mistakes end in one clear message and exit status 2, never a traceback; a full
disk in one clear message (what was kept, how to go on) and exit status 1; Ctrl-C in exit status 130.
"""

from __future__ import annotations

import argparse
import logging

from cai import __version__
from cai.cli import (
    constitution,
    data,
    demo,
    evaluate,
    generate,
    iterate,
    label,
    merge,
    review,
    serve,
    train,
    validate,
)
from cai.cli.console import console, escape, print_error
from cai.core.errors import CaiError, display_path
from cai.core.files import disk_full_errno

EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# the order of `cai --help`
COMMANDS = (validate, constitution, generate, demo, label, review, data, train, evaluate, iterate, merge, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI: critique→revise data, AI-feedback "
                                                          "labels, human review, QLoRA training, evaluation, serving.")
    parser.add_argument("--version", action="version", version=f"cai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser


def _print_interrupted(e: KeyboardInterrupt) -> None:
    kept = getattr(e, "kept", None)
    detail = f": {escape(kept)}; {escape(e.resume)}" if kept else ""   # type: ignore[attr-defined]
    console(stderr=True).print(f"[yellow]interrupted[/]{detail}", soft_wrap=True)


def _print_disk_full(e: OSError) -> None:
    err = console(stderr=True)
    where = f" writing {display_path(e.filename)}" if e.filename else ""
    err.print(f"[bold red]error:[/] the disk is full ({escape(e.strerror or 'no space left')}{escape(where)})",
              soft_wrap=True)
    kept = getattr(e, "kept", None)
    err.print((f"Nothing finished is lost: {kept} (each is written and synced to disk as it finishes). " if kept
               else "Work is saved as it finishes, so nothing finished is lost. ")
              + f"Free some space, then {getattr(e, 'resume', None) or 'run the same command again to continue'}.",
              markup=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extra_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except CaiError as e:
        print_error(e)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        _print_interrupted(e)
        return EXIT_INTERRUPTED
    except OSError as e:
        if disk_full_errno(e) is None:
            raise
        _print_disk_full(e)
        return EXIT_FAILURE
