"""``cai serve``: the model and its adapters, OpenAI-compatible, beside the critique pipeline; or, with ``--upstream``,
the same service in front of OpenAI-compatible engines (gateway mode: no model loaded here). The server package is
imported here only: the library never imports it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed
from cai.inference.dtype import default_device
from cai.inference.loading import DTYPES

HELP = ("serve the model and its adapters (OpenAI-compatible) beside the critique pipeline, or front an inference "
        "fleet (--upstream)")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeArgs:
    model: str = option("default", "base model: 'default' (offline SmolLM2-135M-Instruct), a local folder, or a HF "
                                   "id[@revision]")
    adapter: list[str] = option([], "a LoRA adapter folder, served as model NAME (default: the folder's name); "
                                    "repeatable", metavar="[NAME=]PATH")
    constitution: list[str] = option([], "constitution file or folder of *.yaml, reloaded on edit, or the name of a "
                                         "shipped one; repeatable (default: constitution/, else the shipped default)",
                                     metavar="PATH")
    api_key_file: Path | None = option(None, "API keys, one a line (# comments allowed); `NAME: KEY` names the "
                                             "key's holder, who is the reviewer on the review page")
    api_key_env: str = option("CAI_API_KEYS", "environment variable with comma-separated API keys (default: "
                                              "%(default)s); with no key anywhere the server is open")
    review: list[str] = option([], "a run folder whose records and pairs the review page (/review) shows, as NAME "
                                   "(default: the folder's name); repeatable", metavar="[NAME=]RUN")
    review_rule: str = option("any-reject", "how the review page resolves reviewers who disagree (default: "
                                            "%(default)s)", choices=["any-reject", "latest", "unanimous"])
    host: str = option("127.0.0.1", "address to bind (default: %(default)s)")
    port: int = option(8000, "default: %(default)s")
    max_batch: int = option(16, "rows decoded together (default: %(default)s; 1 turns batching off)")
    queue_size: int = option(64, "requests that may wait; beyond it: 429 with Retry-After (default: %(default)s)")
    max_tokens: int = option(2048, "cap on a request's max_tokens (default: %(default)s)")
    default_max_tokens: int = option(256, "max_tokens of a request that gives none (default: %(default)s)")
    max_n: int = option(4, "cap on a chat request's n (default: %(default)s)")
    max_body_bytes: int = option(1 << 20, "larger request bodies get 413 (default: %(default)s)")
    drain_grace: float = option(0.0, "after SIGTERM, seconds of 503 answers before the listener closes (default: "
                                     "%(default)s)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    dtype: str = option("auto", "weights' dtype (auto: bfloat16 on a GPU or CPU with bf16 in hardware, AVX512-BF16 "
                                "or AMX, else float32; default: %(default)s)", choices=DTYPES)
    compile: str | None = option(None, "compile every model's decode step before serving: default (the same tokens "
                                       "as without; ~25 s a model once cached, ~2 min the first time, on 2 CPU "
                                       "cores) or max-autotune (weights frozen in, the fastest kernels timed and "
                                       "kept: faster, tokens may differ slightly, ~4 min at every start); needs a "
                                       "C++ compiler on a CPU", nargs="?", const="default",
                                 choices=["default", "max-autotune"], metavar="MODE")
    quantize: str | None = option(None, "int4: decode steps of a few rows read 4-bit copies of the weights (groups of "
                                        "32; the default model's own Q4_1 weights), on a CPU in bfloat16; prefills "
                                        "and wide batches keep the bf16 weights", choices=["int4"])
    upstream: list[str] = option([], "gateway mode: an OpenAI-compatible engine (vLLM, TGI, SGLang, llama.cpp, "
                                     "Ollama, cai serve) that does the generation, e.g. http://10.0.0.5:8000/v1; "
                                     "repeatable (balanced, failing ones cooled down); no model is loaded here",
                                 metavar="URL")
    upstream_model: str | None = option(None, "gateway mode: the model name the upstreams serve (required)",
                                        metavar="NAME")
    served_model_name: str | None = option(None, "gateway mode: the name clients ask for (default: the upstream's)",
                                           metavar="NAME")
    upstream_api_key_env: str = option("CAI_UPSTREAM_API_KEY", "gateway mode: environment variable with the key the "
                                                               "upstreams take, if any (default: %(default)s)")
    upstream_timeout: float = option(60.0, "gateway mode: seconds an attempt may take (a whole answer, a stream's "
                                           "first event, a stream gone quiet) (default: %(default)s)")
    upstream_retries: int = option(2, "gateway mode: further attempts of a failed request, on another upstream "
                                      "where one is up (default: %(default)s)")
    upstream_concurrency: int = option(64, "gateway mode: requests in flight to the upstreams; --queue-size more "
                                           "may wait, beyond that 429 (default: %(default)s)")
    context_length: int | None = option(None, "gateway mode: the upstream model's context in tokens, for the "
                                              "pipeline's up-front checks (estimated at 4 characters a token)")


def constitution_sources(given: list[str]) -> list[str | Path]:
    """Files and folders as given (a name that is no path: a shipped constitution); none: the ``constitution/``
    folder here, which people edit, else the shipped default."""
    from cai.core.errors import CaiError
    from cai.resources import DEFAULT_CONSTITUTION, constitution_path

    if not given:
        return ["constitution"] if Path("constitution").is_dir() else [str(constitution_path(DEFAULT_CONSTITUTION))]
    sources: list[str | Path] = []
    for spec in given:
        try:
            sources.append(spec if Path(spec).exists() else str(constitution_path(spec)))
        except CaiError:
            sources.append(spec)      # the registry says what is wrong with it
    return sources


def add(sub) -> None:
    p = sub.add_parser("serve", help=HELP)
    add_options(p, ServeArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    """Check everything that can be checked before loading the model (keys, constitutions, adapters against the
    base), then serve."""
    from cai.cli.console import console, quiet_libraries
    from cai.cli.review import _open
    from cai.core.errors import CaiError
    from cai.inference.loading import resolve_model
    from server.constitutions import ConstitutionRegistry
    from server.runner import serve
    from server.security import read_api_keys
    from server.settings import Limits, Settings, adapter_map, check_adapter, review_map

    a = parsed(ServeArgs, ns)
    err = console(stderr=True)
    if not 0 < a.port < 65536:
        raise CaiError(f"--port must be in 1..65535, got {a.port}")
    if a.max_batch < 1 or a.queue_size < 1:
        raise CaiError("--max-batch and --queue-size must be at least 1")
    device = a.device or (default_device() if a.quantize and not a.upstream else "cpu")
    if a.quantize and not a.upstream and (a.dtype not in ("auto", "bfloat16") or not device.startswith("cpu")):
        raise CaiError(f"--quantize {a.quantize} serves on the CPU in bfloat16; it cannot go with "
                       + ("--dtype " + a.dtype if a.dtype not in ("auto", "bfloat16") else f"--device {device}"
                          + ("" if a.device else " (the default here: a GPU is visible)")),
                       hint="Leave out --quantize, or serve with --dtype bfloat16 (or auto) and --device cpu.")
    limits = Limits(max_tokens=a.max_tokens, default_max_tokens=a.default_max_tokens, max_n=a.max_n,
                    max_body_bytes=a.max_body_bytes)
    keys = read_api_keys(a.api_key_file, a.api_key_env)
    reviews = review_map(a.review)
    for folder in reviews.values():
        _open(folder)
    sources = constitution_sources(a.constitution)
    registry = ConstitutionRegistry(sources)
    if not keys and a.host not in LOCAL_HOSTS:
        err.print(f"[yellow]warning[/]: serving on {a.host} with no API key: anyone who can reach it can use it")
    if a.upstream or a.upstream_model:
        return _gateway(a, ns, limits, keys, sources, registry, reviews)
    adapters = adapter_map(a.adapter)
    with err.status(f"resolving model {a.model} ..."):
        model_id = resolve_model(a.model).model_id
    for name, folder in adapters.items():
        check_adapter(name, folder, model_id)
    err.print(f"constitutions: {', '.join(registry.names())}; models: base ({model_id})"
              + "".join(f", {n}" for n in adapters) + f"; {'API keys required' if keys else 'no API key'}"
              + (f"; review page at /review ({', '.join(reviews)})" if reviews else ""),
              soft_wrap=True, markup=False)
    settings = Settings(model=a.model, adapters=adapters, constitutions=tuple(str(s) for s in sources),
                        api_keys=tuple(keys), key_holders={k: v for k, v in keys.items() if v},
                        review_runs=reviews, review_rule=a.review_rule, limits=limits, device=a.device,
                        dtype=a.dtype, compile=a.compile, quantize=a.quantize, max_batch=a.max_batch,
                        queue_size=a.queue_size, drain_grace_s=a.drain_grace)
    quiet_libraries()
    return serve(settings, host=a.host, port=a.port, log_level="info" if ns.verbose else "warning")


def _gateway(a: ServeArgs, ns: argparse.Namespace, limits, keys: dict[str, str | None], sources, registry,
             reviews: dict) -> int:
    """Gateway mode: check the upstream settings (nothing to load), then serve."""
    from cai.cli.console import console, quiet_libraries
    from cai.core.errors import CaiError
    from server.runner import serve
    from server.settings import Settings, UpstreamSettings

    err = console(stderr=True)
    local = [flag for flag, given in [("--model", a.model != "default"), ("--adapter", bool(a.adapter)),
                                      ("--device", a.device is not None), ("--dtype", a.dtype != "auto"),
                                      ("--compile", a.compile is not None),
                                      ("--quantize", a.quantize is not None)] if given]
    if local:
        raise CaiError(f"{', '.join(local)} cannot go with --upstream: in gateway mode the upstreams serve the model",
                       hint="Leave them out, or leave out --upstream to serve a model here.")
    if not a.upstream:
        raise CaiError("--upstream-model goes with --upstream URL (gateway mode)")
    upstream = UpstreamSettings(urls=tuple(u.rstrip("/") for u in a.upstream), model=a.upstream_model or "",
                                served_name=a.served_model_name, api_key_env=a.upstream_api_key_env,
                                timeout_s=a.upstream_timeout, retries=a.upstream_retries,
                                concurrency=a.upstream_concurrency, context_length=a.context_length)
    err.print(f"constitutions: {', '.join(registry.names())}; gateway: {upstream.name} "
              f"(upstream model {upstream.model}) through {', '.join(upstream.urls)}; "
              f"{'API keys required' if keys else 'no API key'}"
              + (f"; review page at /review ({', '.join(reviews)})" if reviews else ""), soft_wrap=True, markup=False)
    settings = Settings(constitutions=tuple(str(s) for s in sources), api_keys=tuple(keys),
                        key_holders={k: v for k, v in keys.items() if v}, review_runs=reviews,
                        review_rule=a.review_rule, limits=limits, queue_size=a.queue_size,
                        drain_grace_s=a.drain_grace, upstream=upstream)
    quiet_libraries(heavy=False)      # nothing here imports transformers: start-up stays instant
    return serve(settings, host=a.host, port=a.port, log_level="info" if ns.verbose else "warning")

