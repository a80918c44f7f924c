"""Backends generate completions for a batch of conversations. ``make_backend`` picks one by name."""

from __future__ import annotations

from cai.backends.base import Backend, Completion, Sampling

__all__ = ["BACKENDS", "Backend", "Completion", "Sampling", "make_backend"]

BACKENDS = ("local", "fake", "openai")


def make_backend(kind: str, model: str | None = None, device: str | None = None, weights: bool = True,
                 dtype: str | None = None, **options) -> Backend:
    """``options`` go to the openai backend (base_urls, api_key_env, concurrency, timeout, max_retries).
    ``weights=False``: the local backend loads its tokenizer only (counting tokens for a dry run). ``dtype``: the local
    backend's weights (None: fp32 on CPU, bf16 on a GPU that has it; ``auto``: bf16 wherever the hardware has it)."""
    if kind == "local":
        from cai.backends.local import LocalBackend

        return LocalBackend(model, device=device, weights=weights, dtype=dtype)
    if kind == "openai":
        from cai.backends.openai import OpenAIBackend

        if model in (None, "", "default"):
            from cai.core.errors import CaiError

            raise CaiError("the openai backend needs --model: the model name the endpoint serves")
        return OpenAIBackend(model, **options)
    if kind == "fake":
        from cai.backends.fake import FakeBackend

        return FakeBackend("fake" if model in (None, "", "default") else model)  # type: ignore[return-value]
    raise ValueError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")
