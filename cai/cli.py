"""The ``cai`` command. A thin shell over the library: parse arguments, call, print.

Heavy libraries (torch, transformers) are imported only by the commands that need them, so ``cai --help`` and
``cai validate`` answer at once. User mistakes end in one clear message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from cai import __version__
from cai.errors import CaiError, display_path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# The main job's defaults: small enough to finish in a few minutes on a 2-core CPU with the default model.
DEMO = {"prompts": "data/prompts/red_team.jsonl", "constitution": "constitution/default.yaml", "out": "runs/demo",
        "limit": 16, "rounds": 1, "batch_size": 16, "max_new_tokens": 128}


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai", description="Constitutional AI: critique→revise data generation.")
    parser.add_argument("--version", action="version", version=f"cai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check constitution files: every error with file, line and field")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--hashes", action="store_true", help="also print each principle's sha256")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("constitution", help="work with constitution files")
    csub = p.add_subparsers(dest="constitution_command", metavar="ACTION", required=True)
    imp = csub.add_parser("import", help="convert a public constitution format into ours")
    imp.add_argument("format", choices=["hf", "anthropic"],
                     help="hf: Hugging Face llm-swarm JSON; anthropic: the CAI paper's CritiqueRevisionInstructions")
    imp.add_argument("source", type=Path)
    imp.add_argument("-o", "--output", type=Path, required=True, help="the YAML file to write")
    imp.add_argument("--name", help="constitution name (default: from the file name)")
    imp.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    imp.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="answer prompts, critique and revise the answers → records.jsonl")
    _generate_args(p, demo=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job on the default offline model, with small defaults")
    _generate_args(p, demo=True)
    p.set_defaults(func=cmd_generate)
    return parser


def _generate_args(p: argparse.ArgumentParser, demo: bool) -> None:
    d = DEMO if demo else {}
    p.add_argument("--constitution", type=Path, default=Path(DEMO["constitution"]),
                   help="constitution YAML (default: %(default)s)")
    p.add_argument("--prompts", default=DEMO["prompts"],
                   help="prompt JSONL/Parquet file, or a Hugging Face dataset name (default: %(default)s)")
    p.add_argument("--split", default="train", help="dataset split when --prompts is a hub dataset")
    p.add_argument("--out", type=Path, default=Path(DEMO["out"]), help="run folder (default: %(default)s)")
    p.add_argument("--model", default="default",
                   help="'default' (offline SmolLM2-135M-Instruct), a local folder, or a HF id[@revision]")
    p.add_argument("--backend", default="local", choices=["local", "fake"], help="default: %(default)s")
    p.add_argument("--device", help="torch device for the local backend (default: cuda if available, else cpu)")
    p.add_argument("--rounds", type=int, default=d.get("rounds", 1),
                   help="critique→revise rounds per prompt, a fresh principle each (default: %(default)s; paper: 4)")
    p.add_argument("--limit", type=int, default=d.get("limit"), help="use only the first N prompts")
    p.add_argument("--batch-size", type=int, default=d.get("batch_size", 16), help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=d.get("max_new_tokens", 256),
                   help="per stage (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="seeds principle draws and sampling (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop on any bad prompt row instead of skipping it")
    p.add_argument("--skip-long", action="store_true",
                   help="leave out prompts that may not fit the context (listed in errors.jsonl) instead of stopping")
    p.add_argument("--supersede", action="store_true",
                   help="--out holds another constitution's or model's records: move them to superseded.jsonl")


def cmd_validate(args: argparse.Namespace) -> int:
    from cai.constitution import load_constitution
    from cai.errors import ConstitutionError

    out = _console()
    failed = 0
    for path in args.files:
        try:
            c = load_constitution(path)
        except ConstitutionError as e:
            failed += 1
            _print_error(e)
            continue
        out.print(f"[green]ok[/] {display_path(path)}: {c.name} v{c.version}, {len(c.principles)} principles, "
                  f"{len(c.exemplars)} exemplars, sha256 {c.sha256[:16]}", soft_wrap=True)
        if args.hashes:
            for p in c.principles:
                out.print(f"   {p.sha256[:16]}  {p.id}")
    return EXIT_USER_ERROR if failed else 0


def cmd_import(args: argparse.Namespace) -> int:
    from cai.constitution import import_anthropic, import_hf, parse_constitution

    if args.output.exists() and not args.force:
        raise CaiError(f"{display_path(args.output)} already exists", hint="Pass --force to overwrite it.")
    c = (import_hf if args.format == "hf" else import_anthropic)(args.source, name=args.name)
    text = f"# Imported by `cai constitution import {args.format}` from {args.source.name}\n" + c.to_yaml()
    parse_constitution(text, str(args.output))   # what we write must load back
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.output)
    unmatched = sum(1 for e in c.exemplars if e.principle is None)
    _console().print(f"[green]wrote[/] {display_path(args.output)}: {len(c.principles)} principles, "
                     f"{len(c.exemplars)} exemplars" + (f" ({unmatched} not matched to a principle)"
                                                         if unmatched else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cai.backends import make_backend
    from cai.backends.base import Sampling
    from cai.constitution import load_constitution
    from cai.generate import run_generate
    from cai.prompt_sets import load_prompts

    err = _console(stderr=True)
    constitution = load_constitution(args.constitution)
    if args.rounds < 1:
        raise CaiError(f"--rounds must be at least 1, got {args.rounds}")
    if args.limit is not None and args.limit < 1:
        raise CaiError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise CaiError(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    except ValueError as e:
        raise CaiError(str(e)) from None
    prompts = load_prompts(args.prompts, strict=args.strict, split=args.split)
    for issue in prompts.issues[:20]:
        err.print(f"[yellow]skipped[/] {issue}")
    if len(prompts.issues) > 20:
        err.print(f"[yellow]... and {len(prompts.issues) - 20} more bad rows skipped[/]")
    items = prompts.items[: args.limit] if args.limit else prompts.items

    t_load = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # our own status line covers loading; one progress display at a time
    with err.status(f"loading model {args.model} ..."):
        backend = make_backend(args.backend, args.model, device=args.device)
    err.print(f"model {backend.model} ({args.backend}) loaded in {time.perf_counter() - t_load:.1f}s; "
              f"{len(items)} prompts from {prompts.source}, constitution {constitution.name} v{constitution.version}")

    progress, bar = _progress_bar(err)
    try:
        with bar:
            summary = run_generate(constitution=constitution, items=items, backend=backend, out=args.out,
                                   rounds=args.rounds, sampling=sampling, batch_size=args.batch_size,
                                   skip_long=args.skip_long, supersede_all=args.supersede, progress=progress)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: finished batches are saved in {display_path(args.out)}; "
                  "run the same command again to continue")
        return EXIT_INTERRUPTED
    _print_summary(summary, prompts.issues)
    return 0


def _progress_bar(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from cai.generate import Progress

    bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[stage]}"), TextColumn("{task.fields[rate]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                       transient=False)
    state: dict = {"task": None, "stages": 1, "tokens": 0, "t0": time.perf_counter(), "done": 0.0}

    def start(total_stage_items: int, stages_per_record: int) -> None:
        state["stages"] = stages_per_record
        state["t0"] = time.perf_counter()
        state["task"] = bar.add_task("records", total=total_stage_items // stages_per_record, stage="",
                                     rate="")

    def stage(event) -> None:
        state["tokens"] += event.completion_tokens
        state["done"] += event.items / state["stages"]
        rate = state["tokens"] / max(time.perf_counter() - state["t0"], 1e-9)
        label = event.stage if event.stage == "respond" else f"{event.stage} r{event.round}"
        bar.update(state["task"], completed=state["done"], stage=label, rate=f"{rate:,.0f} tok/s")

    return Progress(start=start, stage=stage), bar


def _print_summary(s, bad_rows) -> None:
    from rich.table import Table

    t = Table(title=f"cai generate → {s.out}", show_header=False, title_justify="left")
    t.add_row("records written", str(s.written))
    flags = ", ".join(f"{k} {v}" for k, v in sorted(s.flag_counts.items()))
    t.add_row("flagged", f"{s.flagged}" + (f" ({flags})" if flags else ""))
    t.add_row("skipped (already done)", str(s.skipped))
    if s.superseded:
        t.add_row("superseded (moved to superseded.jsonl)", str(s.superseded))
    if s.too_long:
        t.add_row("left out: too long (errors.jsonl)", str(s.too_long))
    if bad_rows:
        t.add_row("bad prompt rows skipped", str(len(bad_rows)))
    if s.torn_bytes:
        t.add_row("repaired", f"cut a torn last line ({s.torn_bytes} bytes) left by an interrupted run")
    t.add_row("tokens", f"{s.completion_tokens:,} generated, {s.prompt_tokens:,} prompt")
    t.add_row("time", f"{s.seconds:.1f}s ({s.tokens_per_second:,.1f} generated tok/s)")
    _console().print(t)


def _print_error(e: CaiError) -> None:
    # soft_wrap: one issue stays on one line however narrow the terminal (or a pipe: 80 columns), so that
    # "file:line: field: message" can be grepped and jumped to
    console = _console(stderr=True)
    console.print(f"[bold red]error:[/] {e.message}", markup=True, highlight=False, soft_wrap=True)
    for issue in e.issues:
        console.print(f"  {issue}", markup=False, soft_wrap=True)
    if e.hint:
        console.print(e.hint, markup=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except CaiError as e:
        _print_error(e)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
