"""What a server is started with (:class:`Settings`; in gateway mode its :class:`UpstreamSettings`), and the checks
that can be made before any model is loaded.

``cai serve`` builds a Settings from its flags and calls :func:`check_settings` first, so a wrong adapter folder, an
adapter trained on another base model, a bad constitution or key file ends in one clear message (exit 2) before the
model loads. ``create_app(settings)`` then loads the model in the background (``/health`` answers 503 meanwhile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, ModelError, display_path

MANIFEST = "manifest.json"   # written by `cai train` next to each adapter (see cai/train.py)


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for. ``max_tokens`` caps a request's ``max_tokens``; a request that leaves it
    out gets ``default_max_tokens`` (or what is left of the context, if less)."""

    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_n: int = 4
    max_body_bytes: int = 1 << 20      # 1 MiB

    def __post_init__(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise CaiError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            object.__setattr__(self, "default_max_tokens", self.max_tokens)


@dataclass(frozen=True)
class UpstreamSettings:
    """Gateway mode (``cai serve --upstream URL ...``): generation is done by OpenAI-compatible engines (vLLM, TGI,
    SGLang, llama.cpp, Ollama, another ``cai serve``) through :class:`cai.backends.openai.OpenAIBackend`'s
    retries, balancing and cool-down; no model is loaded here."""

    urls: tuple[str, ...]                 # each like http://10.0.0.5:8000/v1 (what ends in /chat/completions)
    model: str                            # the name the upstreams serve the model under
    served_name: str | None = None        # the name clients ask for (default: the upstream's)
    api_key_env: str = "CAI_UPSTREAM_API_KEY"   # the environment variable holding the key the upstreams take
    timeout_s: float = 60.0               # per attempt: a whole answer, a stream's first event, a stream gone quiet
    retries: int = 2                      # further attempts of a request that failed (another upstream if any)
    concurrency: int = 64                 # requests in flight to the upstreams, over all of them
    context_length: int | None = None     # the upstream model's context, if known (for the pipeline's checks)

    def __post_init__(self) -> None:
        if not self.urls:
            raise CaiError("gateway mode needs at least one --upstream URL")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise CaiError(f"--upstream {url!r}: give an http:// or https:// URL, e.g. http://10.0.0.5:8000/v1")
        if not self.model:
            raise CaiError("gateway mode needs --upstream-model: the model name the upstreams serve")
        if self.timeout_s <= 0 or self.retries < 0 or self.concurrency < 1:
            raise CaiError("--upstream-timeout must be positive, --upstream-retries at least 0 and "
                           "--upstream-concurrency at least 1")
        if self.context_length is not None and self.context_length < 1:
            raise CaiError(f"--context-length must be at least 1, got {self.context_length}")

    @property
    def name(self) -> str:
        return self.served_name or self.model


@dataclass(frozen=True)
class Settings:
    model: str | None = "default"            # None: no model at all (``cai review``: the review page only)
    adapters: dict[str, str] = field(default_factory=dict)       # name -> folder
    constitutions: tuple[str, ...] = ("constitution",)            # files or folders
    api_keys: tuple[str, ...] = ()                                # none: the server is open (it binds 127.0.0.1)
    key_holders: dict[str, str] = field(default_factory=dict)     # key -> its holder's name (the reviewer)
    review_runs: dict[str, str] = field(default_factory=dict)     # name -> run folder shown at /review
    review_rule: str = "any-reject"                               # how the page resolves reviewers who disagree
    limits: Limits = field(default_factory=Limits)
    device: str | None = None
    dtype: str = "auto"            # weights' dtype; auto: bf16 where the GPU or CPU has bf16 in hardware, else fp32
    compile: str | None = None     # default | max-autotune: compile every model's decode step (engine/compiled.py)
    quantize: str | None = None    # "int4": 4-bit weights for steps of a few rows, on a CPU (inference/cpu_linear.py)
    max_batch: int = 16
    queue_size: int = 64
    base_name: str = "base"                                       # the base model's name in /v1/models
    watch_interval_s: float = 1.0                                 # how often constitution files are re-stat'ed
    drain_grace_s: float = 0.0     # after SIGTERM: seconds of 503s (load balancers notice) before the listener closes
    drain_timeout_s: float = 300.0  # in-flight requests still running this long after shutdown began are cancelled
    upstream: UpstreamSettings | None = None   # gateway mode: no model here, generation by these upstreams


def parse_adapter(spec: str, flag: str = "--adapter") -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder's name: ``runs/demo/adapters/dpo`` -> ``dpo``)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name
    if not name or not path:
        raise CaiError(f"{flag} {spec!r}: give NAME=PATH or PATH")
    return name, path


def review_map(specs: list[str]) -> dict[str, str]:
    """``--review [NAME=]RUN`` (repeatable) -> name -> run folder; a name is the folder's name unless given, and is
    what the page's addresses hold (``/review/NAME``), so it is letters, digits and ``. _ -``."""
    import re

    runs: dict[str, str] = {}
    for spec in specs:
        name, path = parse_adapter(spec, "--review")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise CaiError(f"--review {spec!r}: the run's name {name!r} is not usable in an address; give "
                           "NAME=PATH with a NAME of letters, digits and . _ -")
        if name in ("api", "static", "session"):
            raise CaiError(f"--review {spec!r}: {name!r} is a name the page's own addresses use; give NAME=PATH")
        if name in runs:
            raise CaiError(f"--review {spec!r}: two runs are named {name!r}; give NAME=PATH")
        runs[name] = path
    return runs


def adapter_map(specs: list[str], base_name: str = "base") -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, path = parse_adapter(spec)
        if name == base_name:
            raise CaiError(f"--adapter {spec!r}: {base_name!r} is the base model's name; use NAME=PATH")
        if name in adapters:
            raise CaiError(f"--adapter {spec!r}: two adapters are named {name!r}; use NAME=PATH")
        adapters[name] = path
    return adapters


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """An adapter's manifest.json (None when there is none: an adapter trained elsewhere)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {display_path(path)}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{display_path(path)} is not a JSON object")
    return data


def check_adapter(name: str, folder: str, model_id: str) -> dict[str, Any] | None:
    """Refuse an adapter whose manifest names another base model than ``model_id`` (the served base's id, as
    :func:`cai.inference.loading.resolve_model` gives it): LoRA weights of another base load without an error when the
    shapes happen to match and then produce garbage. Returns the manifest."""
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"adapter {name!r}: folder {folder} does not exist",
                         hint="Give the folder that training wrote, e.g. runs/<name>/adapters/sft.")
    if not (path / "adapter_config.json").exists():
        raise ModelError(f"adapter {name!r}: {folder} has no adapter_config.json (not a PEFT adapter folder)")
    manifest = read_manifest(path)
    if manifest is None:
        return None
    base = manifest.get("base_model") or {}
    trained_on = base.get("id") if isinstance(base, dict) else base
    if trained_on and trained_on != model_id:
        raise ModelError(f"adapter {name!r} ({folder}) was trained on {trained_on}, but the served base model is "
                         f"{model_id}",
                         hint=f"Serve it with --model {base.get('path') or trained_on}, or leave the adapter out.")
    return manifest


def lineage(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """What /v1/models shows of an adapter's manifest: the constitution, dataset and base it was trained on."""
    if manifest is None:
        return None
    dataset = manifest.get("dataset") or {}
    return {"stage": manifest.get("stage"), "base_model": manifest.get("base_model"),
            "constitution": manifest.get("constitution"),
            "dataset": {"sha256": dataset.get("sha256"), "counts": dataset.get("counts")} if dataset else None,
            "steps": manifest.get("steps"), "created_at": manifest.get("created_at")}
