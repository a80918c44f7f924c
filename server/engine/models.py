"""The models an engine serves: one base model and any number of LoRA adapters on it, loaded once.

A wave never mixes models: base requests run with the adapters disabled, adapter requests with their adapter set
(:func:`use_model`). Adapters are checked before PEFT sees them (a missing folder, no ``adapter_config.json``, a
non-LoRA adapter, weights of another base model), each with a :class:`~cai.core.errors.ModelError` that says what to
give instead.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import ModelError
from cai.inference.loading import ChatModel, load_chat_model

ADAPTER_HINT = "Give the folder that training wrote, e.g. runs/<name>/adapters/sft."


@dataclass
class ServedModels:
    base: ChatModel              # the base model, its tokenizer and facts (cai.inference.loading)
    peft: Any = None             # the PeftModel holding every adapter (None without adapters)
    adapters: dict[str, str] = field(default_factory=dict)   # adapter name -> its folder (resolved)
    quantized_layers: int = 0    # linear layers with a 4-bit copy (--quantize int4)
    packed_layers: int = 0       # linear layers whose bf16 weight is prepacked for oneDNN (bf16 on a CPU)

    @property
    def forward_model(self) -> Any:
        """What forward passes go through: the PeftModel when there are adapters, else the base model."""
        return self.peft if self.peft is not None else self.base.lm


def load_models(model: str | None, adapters: dict[str, str], device: str | None, dtype: str | None,
                base_name: str, quantize: str | None = None, prepack: bool = True) -> ServedModels:
    """Load the base model and every adapter (blocking; raises ModelError). The base model's linear layers, before
    the adapters wrap them (:mod:`cai.inference.cpu_linear`): in bf16 on a CPU, their weights prepacked for oneDNN
    (the same products, faster; ``prepack=False``: not); with ``quantize="int4"``, a 4-bit copy for narrow inputs
    too."""
    from cai.inference import cpu_linear

    if quantize not in (None, "int4"):
        raise ModelError(f"unknown quantization {quantize!r}: the one there is is 'int4'")
    served = ServedModels(load_chat_model(model, device, dtype))
    if quantize == "int4":
        served.quantized_layers = cpu_linear.quantize_int4(served.base.lm)
    if prepack:
        served.packed_layers = cpu_linear.prepack(served.base.lm)
    for name, folder in adapters.items():
        _load_adapter(served, name, folder, base_name)
    if served.peft is not None:
        served.peft.eval()
    return served


def use_model(peft: Any, model: str, base_name: str) -> contextlib.AbstractContextManager:
    """Set up ``peft`` (None: no adapters) for a wave of ``model``: adapters off for the base, else that adapter."""
    if peft is None:
        return contextlib.nullcontext()
    if model == base_name:
        return peft.disable_adapter()
    peft.set_adapter(model, inference_mode=True)
    return contextlib.nullcontext()


def _load_adapter(served: ServedModels, name: str, folder: str, base_name: str) -> None:
    model_id = served.base.model_id
    if not name or name == base_name or "." in name:
        raise ModelError(f"adapter name {name!r} is not allowed: it must be non-empty, without '.', and not "
                         f"{base_name!r} (the base model's name)")
    path = Path(folder).expanduser()
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise ModelError(f"adapter {name!r}: folder {folder} does not exist", hint=ADAPTER_HINT)
    if not config_file.exists():
        raise ModelError(f"adapter {name!r}: {folder} has no adapter_config.json (not a PEFT adapter folder)",
                         hint=ADAPTER_HINT)
    try:
        peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError) as e:
        raise ModelError(f"adapter {name!r}: cannot read {config_file}: {e}") from None
    if peft_type not in (None, "LORA"):
        raise ModelError(f"adapter {name!r} in {folder} is a {peft_type} adapter; only LoRA adapters can be "
                         "served")
    try:
        from peft import PeftModel

        if served.peft is None:
            served.peft = PeftModel.from_pretrained(served.base.lm, str(path), adapter_name=name)
        else:
            served.peft.load_adapter(str(path), adapter_name=name)
    except Exception as e:   # peft raises many kinds (shape mismatch, missing weights, bad config)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"adapter {name!r}: cannot load {folder} onto {model_id}: {first}",
                         hint="The adapter must have been trained on this base model.") from None
    served.adapters[name] = str(path.resolve())
