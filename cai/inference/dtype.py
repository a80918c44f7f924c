"""The one place that picks a device and the dtype weights are loaded (or trained, or merged) in.

Three callers, three defaults, one set of facts about the hardware:

- generation (:func:`choose_dtype`): bf16 where the hardware multiplies bf16 natively, else fp32 (exact records);
- training (:func:`training_dtype`): on a GPU bf16 where it has it, else fp16 (mixed precision); fp32 on a CPU;
- merging (:func:`config_dtype`): the dtype the base model's config names (what it was published in).

A dtype named by the user (``float32``, ``bfloat16``, ``float16``) is always taken as it is.
"""

from __future__ import annotations

from typing import Any

from cai.core.errors import ModelError

DTYPES = ("auto", "float32", "bfloat16", "float16")   # what a --dtype flag takes
NAMED = DTYPES[1:]                                      # the ones that name a dtype outright


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` → ``bfloat16`` (a name passes through)."""
    return str(dtype).removeprefix("torch.")


def native_bf16(device: str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a GPU with bf16, or a CPU with AVX512-BF16 or AMX
    (elsewhere bf16 is emulated on a CPU and slower than fp32)."""
    import torch

    kind = torch.device(device)
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(kind):       # the GPU named (cuda:1), not the current one; emulated bf16 is not native
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, probe, lambda: False)())
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def choose_dtype(device: str, dtype: str | None = None) -> Any:
    """The torch dtype to load weights in for generation. A name (``float32``, ``bfloat16``, ``float16``) is taken
    as is. ``None``, the library's default: bf16 on GPUs that have it, fp32 on CPU (records and merged adapters stay
    exact). ``"auto"``: bf16 wherever :func:`native_bf16` says the hardware has it, CPUs included, else fp32; the
    server's default, where a decode step in bf16 takes about half the time on such a CPU."""
    import torch

    if dtype not in (None, *DTYPES):
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype and dtype != "auto":
        return getattr(torch, dtype)
    bf16 = native_bf16(device) if dtype == "auto" else torch.device(device).type == "cuda" and native_bf16(device)
    return torch.bfloat16 if bf16 else torch.float32


def training_dtype(requested: str | None) -> tuple[str, str]:
    """``(device, dtype name)`` to train on: the GPU when there is one, in ``requested`` if it names a dtype, else
    bf16 where the GPU supports it (emulated counts, as ``torch.cuda.is_bf16_supported()`` says) and fp16 where it
    does not; on a CPU, fp32."""
    import torch

    named = requested if requested not in (None, "auto") else None
    if torch.cuda.is_available():
        return "cuda", named or ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return "cpu", named or "float32"


def config_dtype(path: str, revision: str | None) -> str | None:
    """The dtype a model's config names (``torch_dtype`` / ``dtype``), or None when it names none or has no
    readable config."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, revision=revision)
    except OSError:
        return None
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return dtype_name(d) if d is not None else None
