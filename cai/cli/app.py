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
from cai.core.errors import CaiError, display_path
from cai.inference.loading import DTYPES

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# The main job's defaults: small enough to finish in a few minutes on a 2-core CPU with the default model.
DEMO = {"prompts": "data/prompts/red_team.jsonl", "constitution": "constitution/default.yaml", "out": "runs/demo",
        "limit": 16, "rounds": 1, "batch_size": 16, "max_new_tokens": 128,
        # SmolLM2-135M rambles to the token limit: the demo trains on truncated texts on purpose (the card says so)
        "helpful_mix": 0.25, "allow_flags": ["truncated"], "train_steps": 8}
# ... and its evaluation: small enough to keep the whole job within 15 minutes on that machine
DEMO_EVAL = {"red_team": 16, "helpful": 16, "records": 16, "max_new_tokens": 96}


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

    p = sub.add_parser("demo", help="the main job on the default offline model: generate → data build → train sft "
                                    "→ eval → report")
    _generate_args(p, demo=True)
    p.add_argument("--train-steps", type=int, default=DEMO["train_steps"],
                   help="QLoRA SFT steps after generating (0: generate only; default: %(default)s)")
    _eval_args(p, demo=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="training data from a run's records")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = dsub.add_parser("build", help="records → data/{sft,dpo}_{train,test}.jsonl and a dataset card")
    _data_args(b)
    b.set_defaults(func=cmd_data_build)

    p = sub.add_parser("train", help="QLoRA fine-tuning with TRL: sft, then dpo",
                       description="Any TRL ModelConfig / SFTConfig / DPOConfig setting can follow as --name value "
                                   "(see --help-config); it overrides the recipe and --config.")
    p.add_argument("stage", choices=["sft", "dpo"])
    p.add_argument("run", type=Path, nargs="?", help="the run folder (after `cai data build`)")
    p.add_argument("--config", type=Path, help="a YAML recipe; its values override the shipped one "
                                               "(cai/resources/recipes/<stage>.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="move a finished or unfinished adapter folder aside and train again")
    p.add_argument("--help-config", action="store_true", help="list every training setting and exit")
    p.set_defaults(func=cmd_train, extra_ok=True)

    p = sub.add_parser("eval", help="base vs each adapter on held-out prompts: harmlessness, over-refusal, revision "
                                    "rounds, diversity → RUN/eval/report.html")
    p.add_argument("run", type=Path, help="the run folder, e.g. runs/demo")
    _eval_args(p, demo=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="adapter + base → a plain safetensors model folder")
    p.add_argument("adapter", type=Path, help="an adapter folder, e.g. runs/demo/adapters/dpo")
    p.add_argument("-o", "--output", type=Path, required=True, help="the model folder to write")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights' dtype (auto: the base model's; default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it is not empty")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="serve the model and its adapters (OpenAI-compatible) beside the critique "
                                     "pipeline")
    p.add_argument("--model", default="default",
                   help="base model: 'default' (offline SmolLM2-135M-Instruct), a local folder, or a HF id[@revision]")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="a LoRA adapter folder, served as model NAME (default: the folder's name); repeatable")
    p.add_argument("--constitution", action="append", default=[], metavar="PATH",
                   help="constitution file or folder of *.yaml, reloaded on edit; repeatable (default: constitution/)")
    p.add_argument("--api-key-file", type=Path, help="API keys, one a line (# comments allowed)")
    p.add_argument("--api-key-env", default="CAI_API_KEYS",
                   help="environment variable with comma-separated API keys (default: %(default)s); with no key "
                        "anywhere the server is open")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default: %(default)s; "
                                                             "1 turns batching off)")
    p.add_argument("--queue-size", type=int, default=64,
                   help="requests that may wait; beyond it: 429 with Retry-After (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="cap on a request's max_tokens (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that gives none (default: %(default)s)")
    p.add_argument("--max-n", type=int, default=4, help="cap on a chat request's n (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--drain-grace", type=float, default=0.0,
                   help="after SIGTERM, seconds of 503 answers before the listener closes (default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights' dtype (auto: bfloat16 on a GPU or CPU with bf16 in hardware, AVX512-BF16 or "
                        "AMX, else float32; default: %(default)s)")
    p.set_defaults(func=cmd_serve)
    return parser


def _eval_args(p: argparse.ArgumentParser, demo: bool) -> None:
    """``cai eval``'s options; the demo takes the same ones, prefixed ``--eval-`` where they would clash."""
    pre = "--eval-" if demo else "--"
    d = DEMO_EVAL if demo else {}
    p.add_argument(f"{pre}red-team", dest="eval_red_team", type=int, default=d.get("red_team", 64),
                   help="held-out red-team prompts to answer, at most (default: %(default)s)")
    p.add_argument(f"{pre}helpful", dest="eval_helpful", type=int, default=d.get("helpful", 64),
                   help="ordinary prompts for over-refusal and helpfulness, at most; 0 skips them "
                        "(default: %(default)s)")
    p.add_argument(f"{pre}records", dest="eval_records", type=int, default=d.get("records", 64),
                   help="generated records judged for the revision-round curve, at most (default: %(default)s)")
    p.add_argument(f"{pre}max-new-tokens", dest="eval_max_new_tokens", type=int,
                   default=d.get("max_new_tokens", 128), help="per answer (default: %(default)s)")
    if demo:
        return
    p.add_argument("--prompts", dest="eval_prompts",
                   help="red-team prompt file (default: the one the run was generated from, per run.json)")
    p.add_argument("--helpful-prompts", default="data/prompts/helpful.jsonl", help="default: %(default)s")
    p.add_argument("--principles", nargs="+", default=[], metavar="ID",
                   help="principles to judge against (default: every principle of the run's constitution)")
    p.add_argument("--adapter", action="append", dest="adapters", metavar="NAME",
                   help="an adapter under RUN/adapters to evaluate; repeatable (default: every finished one)")
    p.add_argument("--temperature", type=float, default=0.7, help="answers' sampling (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=16, help="answers and judgements per forward pass "
                                                              "(default: %(default)s)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--judge-backend", default="local", choices=["local", "openai"],
                   help="local: a transformers model's next-token logits; openai: an OpenAI-compatible endpoint "
                        "that returns top_logprobs (default: %(default)s)")
    p.add_argument("--judge-model", help="the judge model (default: the run's base model; needed with openai)")
    p.add_argument("--judge-base-url", action="append", default=[], metavar="URL",
                   help="openai judge: an endpoint, e.g. http://10.0.0.5:8000/v1; repeat for several")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="openai judge: the environment variable holding its API key (default: %(default)s)")
    p.add_argument("--judge-concurrency", type=int, default=32, help="openai judge: requests in flight "
                                                                     "(default: %(default)s)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="the run folder `cai generate` wrote")
    p.add_argument("--helpful-mix", type=float, default=0.0,
                   help="fraction of SFT rows that are ordinary prompts answered by the same model, in [0, 1) "
                        "(default: %(default)s)")
    p.add_argument("--helpful-prompts", default="data/prompts/helpful.jsonl",
                   help="the ordinary prompts for --helpful-mix (default: %(default)s)")
    p.add_argument("--test-size", type=float, default=0.1, help="fraction of prompts held out (default: %(default)s)")
    p.add_argument("--all-rounds", action="store_true",
                   help="an SFT row for every round's revision, as the paper trained (default: the final one)")
    p.add_argument("--allow-flag", action="append", default=[], metavar="FLAG",
                   help="keep texts with this flag (empty, echo, truncated, unchanged); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the helpful prompts' order")
    p.add_argument("--device", help="torch device for answering the helpful prompts (default: cuda if available)")
    p.add_argument("--base-url", action="append", default=[], metavar="URL",
                   help="a run made with --backend openai: the endpoints that answer the helpful prompts (default: "
                        "the run's own, from run.json); repeatable")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="a run made with --backend openai: the variable holding the API key (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="a run made with --backend openai: requests in flight (default: %(default)s)")


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
    p.add_argument("--backend", default="local", choices=["local", "fake", "openai"],
                   help="local (transformers), openai (any OpenAI-compatible server), fake (default: %(default)s)")
    p.add_argument("--base-url", action="append", default=[], metavar="URL",
                   help="openai backend: an endpoint, e.g. http://10.0.0.5:8000/v1; repeat for several")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai backend: the environment variable holding the API key (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="openai backend: requests in flight over all endpoints (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="openai backend: seconds per request before it is retried (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=6,
                   help="openai backend: retries per request before it goes to errors.jsonl (default: %(default)s)")
    p.add_argument("--device", help="torch device for the local backend (default: cuda if available, else cpu)")
    p.add_argument("--rounds", type=int, default=d.get("rounds", 1),
                   help="critique→revise rounds per prompt, a fresh principle each (default: %(default)s; paper: 4)")
    p.add_argument("--limit", type=int, default=d.get("limit"), help="use only the first N prompts")
    p.add_argument("--batch-size", type=int, default=d.get("batch_size"),
                   help="prompts per stage call (default: 16; with --backend openai, --concurrency)")
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
    if not demo:
        p.add_argument("--dry-run", action="store_true",
                       help="say how many model calls and roughly how many tokens the run would take; call nothing, "
                            "write nothing")


def cmd_validate(args: argparse.Namespace) -> int:
    from cai.core.constitution import load_constitution
    from cai.core.errors import ConstitutionError

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
    from cai.core.constitution import import_anthropic, import_hf, parse_constitution

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
    from cai.core.constitution import load_constitution
    from cai.generate.runner import run_generate
    from cai.core.prompt_files import load_prompts

    err = _console(stderr=True)
    constitution = load_constitution(args.constitution)
    if args.rounds < 1:
        raise CaiError(f"--rounds must be at least 1, got {args.rounds}")
    if args.limit is not None and args.limit < 1:
        raise CaiError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size is None:
        args.batch_size = args.concurrency if args.backend == "openai" else 16
    if args.batch_size < 1:
        raise CaiError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = {}
    if args.backend == "openai":
        options = {"base_urls": args.base_url, "api_key_env": args.api_key_env, "concurrency": args.concurrency,
                   "timeout": args.request_timeout, "max_retries": args.max_retries}
    elif args.base_url:
        raise CaiError("--base-url is for --backend openai")
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

    dry = getattr(args, "dry_run", False)
    t_load = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # our own status line covers loading; one progress display at a time
    with err.status(f"loading {'the tokenizer of ' if dry else ''}model {args.model} ..."):
        backend = make_backend(args.backend, args.model, device=args.device, weights=not dry, **options)
    err.print(f"model {backend.model} ({args.backend}) loaded in {time.perf_counter() - t_load:.1f}s; "
              f"{len(items)} prompts from {prompts.source}, constitution {constitution.name} v{constitution.version}")
    if dry:
        from cai.generate.runner import dry_run

        with err.status("counting ..."):
            report = dry_run(constitution=constitution, items=items, backend=backend, out=args.out,
                             rounds=args.rounds, sampling=sampling, batch_size=args.batch_size,
                             skip_long=args.skip_long, supersede_all=args.supersede)
        _print_dry_run(report, args.backend)
        return 0

    progress, bar = _progress_bar(err)
    try:
        with bar:
            summary = run_generate(constitution=constitution, items=items, backend=backend, out=args.out,
                                   rounds=args.rounds, sampling=sampling, batch_size=args.batch_size,
                                   skip_long=args.skip_long, supersede_all=args.supersede, progress=progress,
                                   model_source=args.model if args.backend == "local" else None,
                                   constitution_path=args.constitution, prompts_source=str(args.prompts))
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: finished batches are saved in {display_path(args.out)}; "
                  "run the same command again to continue")
        return EXIT_INTERRUPTED
    _print_summary(summary, prompts.issues)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: generate, then build the data and run a short QLoRA SFT (unless --train-steps 0)."""
    rc = cmd_generate(args)
    if rc != 0 or args.train_steps <= 0:
        return rc
    data = argparse.Namespace(run=args.out, helpful_mix=DEMO["helpful_mix"], helpful_prompts=
                              "data/prompts/helpful.jsonl", test_size=0.1, all_rounds=False,
                              allow_flag=list(DEMO["allow_flags"]), seed=args.seed, device=args.device,
                              base_url=args.base_url, api_key_env=args.api_key_env, concurrency=args.concurrency)
    cmd_data_build(data)
    # short and CPU-friendly: padding-free batches (same loss, ~1.4x the tokens/s of padded ones on this CPU: see
    # bench/README.md), no activation checkpointing (memory is not the constraint on a CPU)
    flags = ["--max_steps", str(args.train_steps), "--save_steps", str(max(1, args.train_steps // 2)),
             "--gradient_accumulation_steps", "1", "--padding_free", "true", "--max_length", "None",
             "--activation_checkpointing", "false"]
    train = argparse.Namespace(stage="sft", run=args.out, config=None, overwrite=False, help_config=False,
                               extra=flags)
    rc = cmd_train(train)
    if rc != 0 or args.eval_red_team <= 0:
        return rc
    rc = cmd_eval(argparse.Namespace(run=args.out, eval_red_team=args.eval_red_team, eval_helpful=args.eval_helpful,
                                     eval_records=args.eval_records, eval_max_new_tokens=args.eval_max_new_tokens,
                                     device=args.device, seed=args.seed))
    if rc == 0:
        run = display_path(args.out)
        _console().print(f"\n[bold]done.[/] report: [bold]{run}/eval/report.html[/]\n"
                         f"serve the adapter: [bold]cai serve --adapter {run}/adapters/sft[/]  (then "
                         f"model \"sft\" at http://127.0.0.1:8000/v1)\n"
                         f"next: cai train dpo {run}, cai eval {run}", soft_wrap=True)
    return rc


def cmd_data_build(args: argparse.Namespace) -> int:
    from cai.data.build import BuildOptions, build_datasets, helpful_from_run, read_run_info

    err = _console(stderr=True)
    opts = BuildOptions(helpful_mix=args.helpful_mix, test_size=args.test_size, all_rounds=args.all_rounds,
                        allow_flags=tuple(args.allow_flag), seed=args.seed, helpful_prompts=args.helpful_prompts)
    opts.check()
    source = None
    if opts.helpful_mix > 0:
        info = read_run_info(args.run)

        def make(kind: str, model: str):
            from cai.backends import make_backend

            options = {}
            if kind == "openai":
                urls = args.base_url or info.get("base_urls") or []
                if not urls:
                    raise CaiError(f"{display_path(args.run)} was generated with --backend openai and its run.json "
                                   "names no endpoint to answer the helpfulness prompts",
                                   hint="Pass --base-url URL (repeatable), or build with --helpful-mix 0.")
                options = {"base_urls": urls, "api_key_env": args.api_key_env, "concurrency": args.concurrency}
            _quiet_libraries()
            with err.status(f"loading model {model} to answer the helpfulness prompts ..."):
                return make_backend(kind, model, device=args.device, **options)

        progress, bar = _progress_bar(err, "helpful answers")
        with bar:
            source = helpful_from_run(args.run, info, args.helpful_prompts, args.seed, make, progress=progress,
                                      batch_size=args.concurrency if info.get("backend") == "openai" else 16)
            card = build_datasets(args.run, opts, source)
    else:
        card = build_datasets(args.run, opts)
    _print_card(card)
    return 0


def _print_card(card) -> None:
    t = _table(f"cai data build → {display_path(Path(card.run) / 'data')}")
    t.add_row("records", str(card.records))
    for name, n in card.counts.items():
        t.add_row(name, f"{n} rows")
    if card.helpful:
        h = card.helpful
        t.add_row("helpfulness mix", f"{h['used']} rows, ratio {h['ratio']} (asked {h['requested_ratio']}; "
                                     f"{h['excluded_flagged']} flagged answers left out)")
    if card.excluded:
        t.add_row("left out", ", ".join(f"{k} {v}" for k, v in sorted(card.excluded.items())))
    dups = sum(card.duplicates.values())
    if dups:
        t.add_row("duplicates dropped", str(dups))
    t.add_row("prompts held out", f"{card.prompts.get('test', 0)} of {card.prompts.get('total', 0)}")
    t.add_row("dataset sha256", card.sha256)
    _console().print(t)


def cmd_train(args: argparse.Namespace) -> int:
    from cai.train.trainer import config_help, parse_config, train

    if args.help_config:
        _console().print(config_help(args.stage), markup=False, highlight=False)
        return 0
    if args.run is None:
        raise CaiError(f"cai train {args.stage}: the run folder is missing",
                       hint=f"cai train {args.stage} runs/demo [--config FILE] [--name value ...]")
    err = _console(stderr=True)
    _quiet_libraries()
    setup = parse_config(args.stage, args.run, args.config, args.extra)
    bar, progress = _train_bar(err, args.stage)
    try:
        with bar:
            manifest = train(setup, overwrite=args.overwrite, progress=progress)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: checkpoints are in {display_path(setup.out / 'checkpoints')}; run the "
                  "same command again to resume from the newest")
        return EXIT_INTERRUPTED
    out = display_path(setup.out)
    if manifest.get("already_done"):
        _console().print(f"{out} is already trained ({manifest['steps']} steps); --overwrite trains it again")
        return 0
    m = manifest["metrics"]
    t = _table(f"cai train {args.stage} → {out}")
    t.add_row("base model", f"{manifest['base_model']['id']} "
                            f"({'4-bit NF4 + LoRA' if manifest['quantization']['load_in_4bit'] else 'LoRA'})")
    t.add_row("steps", f"{manifest['steps']}" + (f" (resumed from step {manifest['resumed_from_step']})"
                                                 if manifest["resumed_from_step"] else ""))
    if "train_loss" in m:
        t.add_row("train loss (mean)", f"{m['train_loss']:.4f}")
    if "eval_loss" in m:
        t.add_row("eval loss", f"{m['eval_loss']:.4f}")
    t.add_row("time", f"{manifest['seconds_this_run']:.1f}s")
    t.add_row("manifest", f"{out}/manifest.json, loss curve {out}/loss.png")
    _console().print(t)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cai.data.build import read_run_info
    from cai.evaluation.runner import EvalOptions, plan_eval, run_eval

    err = _console(stderr=True)
    opts = EvalOptions(red_team=args.eval_red_team, helpful=args.eval_helpful, records=args.eval_records,
                       prompts=getattr(args, "eval_prompts", None),
                       helpful_prompts=getattr(args, "helpful_prompts", "data/prompts/helpful.jsonl"),
                       principles=tuple(getattr(args, "principles", ())),
                       adapters=tuple(args.adapters) if getattr(args, "adapters", None) else None,
                       max_new_tokens=args.eval_max_new_tokens, temperature=getattr(args, "temperature", 0.7),
                       top_p=getattr(args, "top_p", 0.95), seed=getattr(args, "seed", 0),
                       batch_size=getattr(args, "batch_size", None) or 16)
    if opts.batch_size < 1 or opts.max_new_tokens < 1:
        raise CaiError("--batch-size and --max-new-tokens must be at least 1")
    plan = plan_eval(args.run, opts)
    for note in plan.notes:
        err.print(f"[yellow]note[/]: {note}", soft_wrap=True)
    info = read_run_info(args.run)
    device = getattr(args, "device", None)
    judge_kind = getattr(args, "judge_backend", "local")
    _quiet_libraries()
    shared: dict = {}

    def base_backend():
        if "base" not in shared:
            from cai.backends import make_backend

            kind = info.get("backend") or "local"
            model = info.get("model_source") or info.get("model")
            options = ({"base_urls": info.get("base_urls") or [], "api_key_env": getattr(args, "api_key_env",
                                                                                           "OPENAI_API_KEY")}
                       if kind == "openai" else {})
            with err.status(f"loading model {model} ..."):
                shared["base"] = make_backend(kind, model, device=device, **options)
        return shared["base"]

    def answerer(m):
        if m.adapter is None:
            return base_backend()
        from cai.backends.local import LocalBackend

        shared.pop("adapter", None)      # one adapter model in memory at a time
        with err.status(f"loading adapter {m.name} (merged into its base) ..."):
            shared["adapter"] = LocalBackend(info.get("model_source") or info.get("model"), device=device,
                                             adapter=str(m.adapter))
        return shared["adapter"]

    judge = _make_judge(args, info, judge_kind, base_backend, device, err)
    bar, progress = _eval_bar(err)
    t0 = time.perf_counter()
    try:
        with bar:
            report = run_eval(plan, opts, answerer, judge, progress)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/]: answers and judgements so far are saved in "
                  f"{display_path(args.run / 'eval')}; run the same command again to continue")
        return EXIT_INTERRUPTED
    out = display_path(args.run / "eval")
    con = _console()
    con.print(f"[bold]cai eval → {out}[/] ({time.perf_counter() - t0:.0f}s)")
    for line in report["summary"]:
        con.print(line, markup=False, highlight=False, soft_wrap=True)
    con.print(f"report: {out}/report.html (figures: {out}/report.json)")
    return 0


def _make_judge(args, info: dict, kind: str, base_backend, device, err):
    from cai.evaluation.judge import EndpointJudge, LocalJudge

    model = getattr(args, "judge_model", None)
    if kind == "openai":
        from cai.backends.openai import OpenAIBackend

        urls = getattr(args, "judge_base_url", [])
        if not urls or not model:
            raise CaiError("--judge-backend openai needs --judge-base-url URL and --judge-model NAME")
        _check_reachable(urls)
        return EndpointJudge(OpenAIBackend(model, base_urls=urls, api_key_env=args.judge_api_key_env,
                                           concurrency=args.judge_concurrency, max_retries=2))
    batch = getattr(args, "batch_size", None) or 16
    base = info.get("model_source") or info.get("model")
    if model in (None, base) and (info.get("backend") or "local") == "local":
        return LocalJudge(base_backend(), batch_size=batch)
    if model is None:
        raise CaiError(f"the run was generated with the {info.get('backend')} backend: name a local judge model "
                       "with --judge-model, or use --judge-backend openai")
    from cai.backends.local import LocalBackend

    with err.status(f"loading judge model {model} ..."):
        return LocalJudge(LocalBackend(model, device=device), batch_size=batch)


def _check_reachable(urls: list[str]) -> None:
    """Fail at once, with the address, when no judge endpoint answers at all (instead of after every retry)."""
    import httpx

    reasons = []
    for url in urls:
        try:
            httpx.get(url.rstrip("/") + "/models", timeout=5.0)
            return
        except httpx.HTTPError as e:
            reasons.append(f"{url}: {type(e).__name__}")
    raise CaiError(f"the judge endpoint is unreachable ({'; '.join(reasons)})",
                   hint="Check --judge-base-url (it usually ends in /v1) and that the server is up.")


def _eval_bar(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from cai.evaluation.runner import EvalProgress

    bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    state: dict = {"task": None}

    def phase(label: str, total: int) -> None:
        state["task"] = bar.add_task(label, total=total)

    def advance(n: int) -> None:
        bar.advance(state["task"], n)

    return bar, EvalProgress(phase=phase, advance=advance, note=lambda text: console.print(text))


def cmd_merge(args: argparse.Namespace) -> int:
    from cai.train.trainer import TrainProgress, merge_adapter

    err = _console(stderr=True)
    _quiet_libraries()
    with err.status("merging ...") as status:
        summary = merge_adapter(args.adapter, args.output, dtype=args.dtype, force=args.force,
                                progress=TrainProgress(status=lambda text: status.update(text)))
    _console().print(f"merged {display_path(args.adapter)} into {summary['base_model']} → "
                     f"{display_path(args.output)} ({summary['dtype']}"
                     + (", dequantized from 4-bit" if summary["dequantized_from_4bit"] else "") + ")")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check everything that can be checked before loading the model (keys, constitutions, adapters against the
    base), then serve. The server package is imported here only: the library never imports it."""
    from cai.inference.loading import resolve_model
    from server.constitutions import ConstitutionRegistry
    from server.runner import serve
    from server.security import load_api_keys
    from server.settings import Limits, Settings, adapter_map, check_adapter

    err = _console(stderr=True)
    if not 0 < args.port < 65536:
        raise CaiError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1 or args.queue_size < 1:
        raise CaiError("--max-batch and --queue-size must be at least 1")
    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens, max_n=args.max_n,
                    max_body_bytes=args.max_body_bytes)
    keys = load_api_keys(args.api_key_file, args.api_key_env)
    sources = [str(p) for p in args.constitution] or ["constitution"]
    registry = ConstitutionRegistry(sources)
    adapters = adapter_map(args.adapter)
    with err.status(f"resolving model {args.model} ..."):
        model_id = resolve_model(args.model).model_id
    for name, folder in adapters.items():
        check_adapter(name, folder, model_id)
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning[/]: serving on {args.host} with no API key: anyone who can reach it can use it")
    err.print(f"constitutions: {', '.join(registry.names())}; models: base ({model_id})"
              + "".join(f", {n}" for n in adapters) + f"; {'API keys required' if keys else 'no API key'}",
              soft_wrap=True, markup=False)
    settings = Settings(model=args.model, adapters=adapters, constitutions=tuple(sources), api_keys=tuple(keys),
                        limits=limits, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                        queue_size=args.queue_size, drain_grace_s=args.drain_grace)
    _quiet_libraries()
    return serve(settings, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")


def _quiet_libraries() -> None:
    """Our progress bar and messages only: no library progress bars, info logs or deprecation chatter."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes looks for an optional CPU kernel on the hub at import and warns when it is not there; the
    # built-in CPU path is used instead, so the warning is noise
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _table(title: str):
    from rich.table import Table

    return Table(title=title, show_header=False, title_justify="left")


def _train_bar(console, stage: str):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from cai.train.trainer import TrainProgress

    bar = RichProgress(TextColumn(f"[bold]{stage} steps"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                       TextColumn("ETA"), TimeRemainingColumn(), console=console)
    state: dict = {"task": None, "t0": 0.0, "first": 0, "tokens0": None}

    def start(total: int, first: int) -> None:
        state.update(t0=time.perf_counter(), first=first)
        state["task"] = bar.add_task(stage, total=total, completed=first, loss="", rate="")

    def step(n: int, logs: dict) -> None:
        loss = f"loss {logs['loss']:.3f}" if isinstance(logs.get("loss"), (int, float)) else ""
        rate = ""
        if isinstance(logs.get("num_tokens"), (int, float)):
            if state["tokens0"] is None:
                state["tokens0"] = (logs["num_tokens"], time.perf_counter())
            else:
                dt = time.perf_counter() - state["tokens0"][1]
                rate = f"{(logs['num_tokens'] - state['tokens0'][0]) / max(dt, 1e-9):,.0f} tok/s" if dt > 0 else ""
        bar.update(state["task"], completed=n, loss=loss, rate=rate)

    def status(text: str) -> None:
        console.print(f"[dim]{text}[/]")

    return bar, TrainProgress(start=start, step=step, status=status)


def _progress_bar(console, label: str = "records"):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from cai.generate.runner import Progress

    bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[stage]}"), TextColumn("{task.fields[rate]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                       transient=False)
    state: dict = {"task": None, "stages": 1, "tokens": 0, "t0": time.perf_counter(), "done": 0.0}

    def start(total_stage_items: int, stages_per_record: int) -> None:
        state["stages"] = stages_per_record
        state["t0"] = time.perf_counter()
        state["task"] = bar.add_task(label, total=total_stage_items // stages_per_record, stage="",
                                     rate="")

    def stage(event) -> None:
        state["tokens"] += event.completion_tokens
        state["done"] += event.items / state["stages"]
        rate = state["tokens"] / max(time.perf_counter() - state["t0"], 1e-9)
        label = event.stage if event.stage == "respond" else f"{event.stage} r{event.round}"
        bar.update(state["task"], completed=state["done"], stage=label, rate=f"{rate:,.0f} tok/s")

    return Progress(start=start, stage=stage), bar


def _print_dry_run(r, backend: str) -> None:
    t = _table(f"cai generate --dry-run → {r.out} (nothing called, nothing written)")
    t.add_row("prompts", f"{r.planned}: {r.reused} reused as they are, {r.regenerate} to regenerate, {r.new} new"
              + (f", {r.too_long} too long" if r.too_long else ""))
    t.add_row("model calls", f"{r.calls:,}" + (f" ({r.cached_calls:,} more stages come from the stage cache)"
                                                if r.cached_calls else ""))
    how = "estimated at 4 characters a token" if backend == "openai" else "counted with the model's tokenizer"
    t.add_row("prompt tokens", f"~{r.prompt_tokens:,} ({how}; outputs not generated yet taken as "
                               f"{r.assumed_tokens} tokens)")
    t.add_row("generated tokens", f"~{r.completion_tokens:,} (at most {r.max_completion_tokens:,}: "
                                  "--max-new-tokens per call)")
    _console().print(t)


def _print_summary(s, bad_rows) -> None:
    t = _table(f"cai generate → {s.out}")
    t.add_row("records written", f"{s.written} ({s.new} new, {s.regenerated} regenerated)")
    flags = ", ".join(f"{k} {v}" for k, v in sorted(s.flag_counts.items()))
    t.add_row("flagged", f"{s.flagged}" + (f" ({flags})" if flags else ""))
    t.add_row("reused (already done)", str(s.skipped))
    t.add_row("model calls", f"{s.calls:,}" + (f" (+{s.cached_calls:,} stages from the stage cache)"
                                               if s.cached_calls else ""))
    if s.superseded:
        t.add_row("superseded (moved to superseded.jsonl)", str(s.superseded))
    if s.too_long:
        t.add_row("left out: too long (errors.jsonl)", str(s.too_long))
    if s.failed:
        t.add_row("failed requests (errors.jsonl; retried next run)", str(s.failed))
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
        _print_error(e)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED




