"""A LoRA adapter that ``cai train`` wrote, merged into the base it was trained against.

:func:`merged_model` gives base + adapter as one plain model in memory (the local backend, ``cai eval`` and the
server load adapters this way); :func:`merge_adapter` writes it as a safetensors folder any tool can load
(``cai merge``). An adapter trained on a 4-bit base is merged into the dequantized 4-bit weights, the weights it was
trained against, not the original ones.

The adapter's ``manifest.json`` (written by :mod:`cai.train`) names the base model and the quantization; an adapter
trained elsewhere (no manifest) is merged into the base its ``adapter_config.json`` names.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from cai import __version__
from cai.core.errors import ConfigError, RunFolderError, TrainingError, display_path
from cai.core.files import write_json_atomic
from cai.inference.dtype import NAMED, config_dtype, default_device
from cai.inference.hub import hub_source

MANIFEST = "manifest.json"       # cai.run.MANIFEST; the adapter folder need not sit in a run folder
ADAPTER_CONFIG = "adapter_config.json"
MERGE_SUMMARY = "cai_merge.json"


class Status(Protocol):
    """Anything with a ``status(text)`` callback (``cai.train.TrainProgress`` is one)."""

    def status(self, text: str) -> None: ...


class _Quiet:
    def status(self, text: str) -> None:
        pass


def merge_adapter(adapter: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
                  progress: Status | None = None) -> dict:
    """Write base + adapter as one plain safetensors model folder any tool can load (see :func:`merged_model`).
    Written to ``<out>.tmp`` and moved into place at the end. Returns a summary (what was merged, where)."""
    adapter, out = Path(adapter), Path(out)
    adapter_config(adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise RunFolderError(f"{display_path(out)} exists and is not empty", hint="Choose another -o, or --force.")
    model, info = merged_model(adapter, dtype=dtype, progress=progress)
    clean = clean_model(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(str(tmp))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(tmp))
    summary = {"adapter": str(adapter.resolve()), "adapter_manifest": info["manifest"] or None,
               "base_model": info["base_model"], "dequantized_from_4bit": info["dequantized_from_4bit"],
               "dtype": info["dtype"], "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "cai_version": __version__}
    write_json_atomic(tmp / MERGE_SUMMARY, summary)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def adapter_config(adapter: Path) -> Path:
    """``adapter/adapter_config.json``, or a clear error when ``adapter`` is not an adapter folder."""
    cfg_path = adapter / ADAPTER_CONFIG
    if not cfg_path.exists():
        raise TrainingError(f"{display_path(adapter)} is not an adapter folder (no {ADAPTER_CONFIG})",
                            hint="Pass a finished adapter, e.g. runs/demo/adapters/sft.")
    return cfg_path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{display_path(path)} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"{display_path(path)} is not a JSON object")
    return data


def base_source(named: str | None, base: dict, cfg_path: Path) -> str:
    """What ``from_pretrained`` gets for the base an adapter names (``named``: the manifest's ``base_model.path``,
    a folder or a hub id, else the one ``adapter_config.json`` names). A folder recorded relative to the directory
    training ran from, read from elsewhere, falls back to the manifest's absolute ``id``; a hub id goes through
    :func:`hub_source` (a quick probe of the hub, then its cache)."""
    if not named:
        raise TrainingError(f"{display_path(cfg_path)} does not name its base model")
    if Path(named).expanduser().exists():
        return named
    model_id = base.get("id")
    if model_id and Path(model_id).is_absolute() and Path(model_id).exists():
        return model_id
    if named.startswith((".", "/", "~")) or named.count("/") > 1:        # a folder that is gone: say so plainly
        raise TrainingError(f"the base model of {display_path(cfg_path.parent)} is not where it was: {named}",
                            hint="Put the base model back at that path, or merge on the machine that trained it.")
    return hub_source(named, base.get("revision"))


def merged_model(adapter: str | Path, *, dtype: str = "auto", device: str | None = None,
                 progress: Status | None = None) -> tuple[Any, dict]:
    """Base + adapter as one plain model in memory: ``(model, info)``. An adapter trained on a 4-bit base is merged
    into the dequantized 4-bit weights (the weights it was trained against), not the original ones. ``dtype``
    ``auto``: the dtype the base's config names, else fp32. ``info`` names the base, the dtype, whether it was
    dequantized, and the adapter's manifest."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    progress = progress or _Quiet()
    adapter = Path(adapter)
    cfg_path = adapter_config(adapter)
    manifest = _read_json(adapter / MANIFEST) if (adapter / MANIFEST).exists() else {}
    base = manifest.get("base_model") or {}
    named = base.get("path") or _read_json(cfg_path).get("base_model_name_or_path")
    base_path = base_source(named, base, cfg_path)
    revision = base.get("revision") if base_path == named else None
    quant = manifest.get("quantization") or {}
    four_bit = bool(quant.get("load_in_4bit"))
    if dtype == "auto":
        dtype = config_dtype(base_path, revision) or "float32"
    if dtype not in NAMED:
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    progress.status(f"loading {base.get('id') or base_path}" + (" in 4-bit to dequantize" if four_bit else ""))
    device = device or default_device()
    if four_bit:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.get("bnb_4bit_quant_type") or "nf4",
                               bnb_4bit_use_double_quant=bool(quant.get("use_bnb_nested_quant")),
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base_path, revision=revision, dtype=torch.float32,
                                                     quantization_config=q, device_map={"": device})
        model = model.dequantize()
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, revision=revision, dtype=torch.float32)
    progress.status("merging")
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return model, {"base_model": named, "base_id": base.get("id") or named,
                   "dtype": dtype, "dequantized_from_4bit": four_bit, "manifest": manifest}


def clean_model(model: Any) -> Any:
    """A copy of the model with no quantization config (transformers refuses to save a dequantized bnb model
    as it is): the same class from the config, loaded with the merged weights."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    clean.load_state_dict(model.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    return clean
