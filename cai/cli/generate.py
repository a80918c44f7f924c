"""``cai generate``: answer prompts, critique and revise the answers → RUN/records.jsonl."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed
from cai.core.errors import CaiError
from cai.resources import DEFAULT_CONSTITUTION, RED_TEAM

HELP = "answer prompts, critique and revise the answers → records.jsonl"
BACKENDS = ["local", "fake", "openai"]


@dataclass
class GenerateArgs:
    constitution: str = option(DEFAULT_CONSTITUTION, "constitution YAML, or a shipped one by name "
                                                     "(default: %(default)s, the shipped constitution/default.yaml)")
    prompts: str = option(RED_TEAM, "prompt JSONL/Parquet file, a shipped set by name (red_team, helpful), or a "
                                    "Hugging Face dataset name (default: %(default)s, the shipped "
                                    "data/prompts/red_team.jsonl)")
    split: str = option("train", "dataset split when --prompts is a hub dataset")
    out: Path = option(Path("runs/demo"), "run folder (default: %(default)s)")
    model: str = option("default", "'default' (offline SmolLM2-135M-Instruct), a local folder, or a HF id[@revision]")
    backend: str = option("local", "local (transformers), openai (any OpenAI-compatible server), fake "
                                   "(default: %(default)s)", choices=BACKENDS)
    base_url: list[str] = option([], "openai backend: an endpoint, e.g. http://10.0.0.5:8000/v1; repeat for several",
                                 metavar="URL")
    api_key_env: str = option("OPENAI_API_KEY", "openai backend: the environment variable holding the API key "
                                                "(default: %(default)s)")
    concurrency: int = option(64, "openai backend: requests in flight over all endpoints (default: %(default)s)")
    request_timeout: float = option(120.0, "openai backend: seconds per request before it is retried "
                                           "(default: %(default)s)")
    max_retries: int = option(6, "openai backend: retries per request before it goes to errors.jsonl "
                                 "(default: %(default)s)")
    device: str | None = option(None, "torch device for the local backend (default: cuda if available, else cpu)")
    dtype: str | None = option(None, "the local model's weights: float32, bfloat16, float16, or auto (bf16 where the "
                                     "hardware has it, this CPU included: about twice as fast); default: fp32 on CPU, "
                                     "bf16 on a GPU. Recorded in provenance and in every record's key (bf16 records "
                                     "are other records)", choices=["auto", "float32", "bfloat16", "float16"])
    rounds: int = option(1, "critique→revise rounds per prompt, a fresh principle each (default: %(default)s; "
                            "paper: 4)")
    limit: int | None = option(None, "use only the first N prompts")
    batch_size: int | None = option(None, "prompts per stage call (default: 16; with --backend openai, "
                                          "--concurrency)")
    max_new_tokens: int = option(256, "per stage (default: %(default)s)")
    temperature: float = option(0.7, "0 = greedy (default: %(default)s)")
    top_p: float = option(0.95, "default: %(default)s")
    seed: int = option(0, "seeds principle draws and sampling (default: %(default)s)")
    strict: bool = option(False, "stop on any bad prompt row instead of skipping it")
    skip_long: bool = option(False, "leave out prompts that may not fit the context (listed in errors.jsonl) "
                                    "instead of stopping")
    supersede: bool = option(False, "--out holds another constitution's or model's records: move them to "
                                    "superseded.jsonl")
    dry_run: bool = option(False, "say how many model calls and roughly how many tokens the run would take; call "
                                  "nothing, write nothing")


def constitution_file(spec: str) -> Path:
    """A constitution the user named: a path as it is (a missing file or a folder gets load_constitution's
    message), else a shipped constitution by name (``default``)."""
    from cai.resources import constitution_path

    return Path(spec) if Path(spec).exists() else constitution_path(spec)


def generate_job(a: GenerateArgs):
    """The checked job for :func:`cai.workflow.generate` (also the demo's first step); user mistakes are CaiErrors,
    found in the order a person would fix them: the constitution, the numbers, the backend's options."""
    from cai.backends.base import Sampling
    from cai.core.constitution import load_constitution
    from cai.resources import prompts_path
    from cai.workflow import Endpoints, GenerateJob

    path = constitution_file(a.constitution)
    constitution = load_constitution(path)
    if a.rounds < 1:
        raise CaiError(f"--rounds must be at least 1, got {a.rounds}")
    if a.limit is not None and a.limit < 1:
        raise CaiError(f"--limit must be at least 1, got {a.limit}")
    batch_size = a.batch_size if a.batch_size is not None else (a.concurrency if a.backend == "openai" else 16)
    if batch_size < 1:
        raise CaiError(f"--batch-size must be at least 1, got {batch_size}")
    if a.backend != "openai" and a.base_url:
        raise CaiError("--base-url is for --backend openai")
    try:
        sampling = Sampling(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed)
    except ValueError as e:
        raise CaiError(str(e)) from None
    return GenerateJob(constitution=constitution, constitution_path=path, prompts=prompts_path(a.prompts),
                       out=a.out, sampling=sampling, batch_size=batch_size, backend=a.backend, model=a.model,
                       endpoints=Endpoints(base_urls=a.base_url, api_key_env=a.api_key_env,
                                           concurrency=a.concurrency, timeout=a.request_timeout,
                                           max_retries=a.max_retries),
                       device=a.device, dtype=a.dtype, split=a.split, rounds=a.rounds, limit=a.limit, strict=a.strict,
                       skip_long=a.skip_long, supersede=a.supersede)


def add(sub) -> None:
    p = sub.add_parser("generate", help=HELP)
    add_options(p, GenerateArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai import workflow
    from cai.cli.console import quiet_libraries
    from cai.cli.ui import TerminalUi

    a = parsed(GenerateArgs, ns)
    job = generate_job(a)
    quiet_libraries()   # our own status line covers loading; one progress display at a time
    workflow.generate(job, TerminalUi(), dry_run=a.dry_run)
    return 0
