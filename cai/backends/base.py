"""The Backend protocol: a batch of conversations + sampling settings -> a batch of completions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from cai.core.prompts import Message


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7     # 0 means greedy decoding
    top_p: float = 0.95
    max_new_tokens: int = 256    # per stage: the answer, each critique and each revision
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.temperature <= 10):
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str   # "stop" (end of sequence), "length" (hit max_new_tokens: the text is cut off), "error"
    error: str | None = None   # set when the request failed for good: the text is not an answer, never recorded
    top_logprobs: dict[str, float] | None = None   # first token's top alternatives (token -> log-prob), when asked


@runtime_checkable
class Backend(Protocol):
    name: str                      # "local", "fake", ...: recorded in provenance
    model: str                     # model id or path, as recorded in provenance
    model_revision: str | None
    context_length: int | None     # tokens the model can attend to (prompt + generation); None if unknown
    # the local backend also has ``dtype`` ("float32", "bfloat16", ...): read with getattr, see dtype_of()

    def count_tokens(self, messages: list[Message]) -> int:
        """Tokens of the prompt that :meth:`generate` would send for these messages."""
        ...

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        """Complete every conversation of the batch (all at once where the backend can). ``seed`` seeds this call's
        sampling; the same batch, settings and seed give the same completions on the same machine."""
        ...


def dtype_of(backend: object) -> str | None:
    """The dtype a backend computes in, when it is not fp32 (a local backend in bf16, say); None for fp32 and for
    backends that do not say (an endpoint). It goes into record, stage and eval keys only when set, so fp32 keys are
    the ones every earlier version wrote and a bf16 record is never taken for an fp32 one."""
    dtype = getattr(backend, "dtype", None)
    return None if dtype in (None, "float32") else str(dtype)
