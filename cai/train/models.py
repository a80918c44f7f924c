"""What training starts from: the base model (the run's, or the SFT adapter's base for DPO), the adapter it
continues, and how the base and its tokenizer are loaded (4-bit NF4 for QLoRA)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cai.core.errors import TrainingError, display_path
from cai.inference.loading import ResolvedModel
from cai.inference.merge import ADAPTER_CONFIG, base_source
from cai.run import MANIFEST
from cai.train import manifest as lineage
from cai.train.config import CHECKPOINTS, TrainSetup


def start_adapter(setup: TrainSetup) -> tuple[Path | None, str | None]:
    """DPO: the finished SFT adapter to start from and the sha256 of its manifest; ``(None, None)`` for DPO on the
    base model alone (``require_sft_adapter: false``). SFT: the adapter named by ``sft_adapter`` to continue (the
    self-improvement loop's option), else ``(None, None)``: a fresh adapter."""
    if setup.stage != "dpo":
        if setup.stage == "sft" and setup.cai.sft_adapter:
            start = Path(setup.cai.sft_adapter)
            if not ((start / ADAPTER_CONFIG).exists() and (start / MANIFEST).exists()):
                raise TrainingError(f"sft_adapter {display_path(start)}: no finished adapter there",
                                    hint="Point sft_adapter at an adapter folder with a manifest.json, or leave it "
                                         "unset to train a fresh adapter.")
            return start, lineage.sha256_file(start / MANIFEST)
        return None, None
    sft_dir = Path(setup.cai.sft_adapter) if setup.cai.sft_adapter else setup.folder.adapter_dir("sft")
    if (sft_dir / ADAPTER_CONFIG).exists() and (sft_dir / MANIFEST).exists():
        return sft_dir, lineage.sha256_file(sft_dir / MANIFEST)
    if setup.cai.require_sft_adapter:
        run = display_path(setup.run)
        raise TrainingError(
            f"no finished SFT adapter at {display_path(sft_dir)}" +
            (" (training there did not finish)" if (sft_dir / CHECKPOINTS).exists() else ""),
            hint=f"Run `cai train sft {run}` first, point sft_adapter at one, or set "
                 "require_sft_adapter: false to train DPO on the base model alone.")
    return None, None


def resolve_base(setup: TrainSetup, backend: str, model_source: str, sft_manifest: dict | None = None,
                 sft_dir: Path | None = None) -> ResolvedModel:
    """The base model: ``model_name_or_path`` if set; for DPO on an SFT adapter, that adapter's base; else the model
    the run's records were generated with (``model_source``; ``backend`` ``fake`` has none)."""
    from cai.inference.loading import resolve_model

    asked = setup.model.model_name_or_path
    if sft_manifest:
        b = sft_manifest["base_model"]
        if asked and asked not in (b["id"], b["path"]) and str(Path(asked).resolve()) != b["path"]:
            raise TrainingError(f"model_name_or_path {asked!r} is not the SFT adapter's base ({b['id']})",
                                hint="DPO continues the SFT adapter, so it must run on the same base; leave "
                                     "model_name_or_path unset.")
        source = base_source(b["path"], b, (sft_dir or setup.folder.adapter_dir("sft")) / ADAPTER_CONFIG)
        return ResolvedModel(source, b["id"], b.get("revision"))
    if backend == "fake" and not asked:
        raise TrainingError(f"{display_path(setup.run)} was generated with the fake backend: there is no model to "
                            "fine-tune", hint="Pass --model_name_or_path MODEL.")
    resolved = resolve_model(asked or model_source)
    if setup.model.model_revision and setup.model.model_revision != "main":
        resolved = ResolvedModel(resolved.path, resolved.model_id, setup.model.model_revision)
    return resolved


def load_tokenizer(path: str, revision: str | None, chat_template_path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if chat_template_path:
        tok.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
    return tok


def load_model(path: str, revision: str | None, model_args, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    quant = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        m = dataclasses.replace(model_args, dtype=dtype)
        quant = get_quantization_config(m)
    if device == "cuda":      # under `accelerate launch`, each process holds its own copy on its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=getattr(torch, dtype), quantization_config=quant,
        device_map={"": device} if quant is not None else None,
        attn_implementation=model_args.attn_implementation)
