"""The decode step, compiled (``cai serve --compile``): every step in which rows decode, one row (what a single
client waits on, token after token) or many, with the short prompt chunks of requests joining them.

Why. A decode step of a small model is mostly not arithmetic: the default model's eager step runs ~500 small operators
through Python and PyTorch's dispatcher (30 layers of norms, rotary embeddings, projections and attention), and at
one row their overhead costs as much as reading the weights. ``torch.compile`` (Inductor: C++ kernels that fuse the
element-wise work around each matrix product; on a GPU, Triton kernels) turns the step into one call. On the 2-core
CPU (``bench/decode.py``, bf16) the ``default`` mode made a one-row step 1.26-1.39× and a 16-row step 1.32-1.41×
faster than eager; ``max-autotune`` (below) 2.25× and 2.0×; with ``--quantize int4`` as well (4-bit weights for steps
of a few rows, ``cai/inference/cpu_linear.py``) the one-row step was 2.7× faster than eager bf16.

Shape. A compiled graph must see the same shapes each step, so this step does not go through :class:`slots.Step`'s
per-step parts: it is a :class:`~server.engine.slots.Decode`, every token a row with its slot and column as tensors
(written at that column, attending to the columns up to it), the columns read a dynamic dimension, and the tokens'
and the logits' counts dynamic from two. A chunk of a prompt joining a running wave is more rows of one slot at
consecutive columns, so those steps go through the graph too, and so does a short prompt alone: every step whose
prompt tokens x columns read is at most ``Batch.COMPILED_PREFILL`` (4096; each prompt token reads its slot on its own
there). So two graphs per model (one token; two or more; with ``--quantize int4`` more: its layers change path at 4
rows) serve every such step, whatever the lengths and however the cache grows (its capacity is dynamic too). Larger
prefills (a wave of many prompts, a long prompt, a 64-token chunk beside rows already past column 64) run eagerly:
prefill is arithmetic more than overhead.

When. The graphs of every model served (the base and each adapter) are compiled before the engine serves
(:meth:`CompiledDecode.warm`), so no request waits on the compiler. Inductor keeps what it compiled in its on-disk
cache: the first start of the default model spends ~2 min compiling on 2 cores, later starts ~25 s (``max-autotune``
is not cached: ~4 min at every start).

Numerics. The same operators in the same dtypes, fused, so sums may round differently; in bf16 Inductor is told to
round where eager rounds (``emulate_precision_casts``). Tests compare its greedy tokens with ``generate``'s.

torch is imported when an engine is built with ``compile=True``, never at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from cai.core.errors import ModelError

log = logging.getLogger(__name__)


class CompiledDecode:
    """``step(tokens, slots, columns, keep)`` -> next-token logits [kept, vocab] float32 of a step's tokens (rows
    that decode one token each, and chunks of prompts), their keys/values written into the slot cache, through a
    compiled forward pass of ``model`` (the model, or the PEFT model with the wave's adapter set)."""

    def __init__(self, model: Any, cache: Any, cache_argument: str, device: str, mode: str = "default",
                 models: int = 1):
        import torch

        if mode not in MODES:
            raise ModelError(f"unknown compile mode {mode!r}: one of {', '.join(MODES)}")
        configure(models)
        self._model, self._cache, self._argument, self.device, self.mode = model, cache, cache_argument, device, mode
        self._compiled = torch.compile(_own_code(self._forward))
        self.compiled_models: list[str] = []

    @classmethod
    def for_models(cls, model: Any, slot_cache: Callable[[], Any], cache_argument: str, device: str, mode: str,
                   names: list[str], set_up: Callable[[str], AbstractContextManager[Any]]) -> CompiledDecode:
        """A compiled step with the graphs of every served model in ``names`` (``set_up(name)``: the context in
        which ``model`` is that one), compiled under inference mode as the worker runs (a tensor made outside it
        is another kind of input: ``slot_cache()``, which makes the cache on its first call, is called in it).
        With adapters, twice round: switching adapters leaves state (PEFT's flags) that the first model's guards
        saw otherwise, so the second round compiles what serving after a switch would."""
        import torch

        with torch.inference_mode():
            compiled = cls(model, slot_cache(), cache_argument, device, mode, len(names))
            for _ in range(2 if len(names) > 1 else 1):
                for name in names:
                    with set_up(name):
                        compiled.warm(name)
        return compiled

    def _forward(self, ids: Any, slot: Any, column: Any, seen: Any, keep: Any) -> Any:
        from server.engine.slots import Decode

        cache = self._cache
        cache.step = Decode(slot, column, seen)
        try:
            out = self._model(input_ids=ids, attention_mask=cache.no_mask, position_ids=column[None], use_cache=True,
                              logits_to_keep=keep, **{self._argument: cache})
        finally:
            cache.step = None
        return out.logits[0].float()

    def step(self, tokens: list[int], slots: list[int], columns: list[int], keep: list[int] | None = None) -> Any:
        """Logits [len(keep), vocab] float32 of the tokens at ``keep`` (default: every token), each token written at
        its slot and column and attending to the columns before it there. Tokens of one slot at consecutive columns
        are a chunk of a prompt being prefilled (rows of :class:`~server.engine.slots.Decode` like any other)."""
        import torch

        keep = list(range(len(tokens))) if keep is None else keep
        wanted = len(keep)
        if len(tokens) > 1 and wanted < 2:
            keep = [*keep, *keep] if keep else [0, 0]   # a dynamic dimension is never 1 (it would be a constant)
        last = max(columns)
        # capacity > last + 1 always: a length equal to the capacity is a case the graph would compile again for
        self._cache.grow(last + 2)
        device = self.device
        ids = torch.tensor([tokens], device=device)
        slot = torch.tensor(slots, device=device)
        column = torch.tensor(columns, device=device)
        seen = torch.empty(last + 1, device=device)
        at = torch.tensor(keep, device=device)
        self._mark_dynamic(ids, slot, column, seen, at)
        return self._compiled(ids, slot, column, seen, at)[:wanted]

    def _mark_dynamic(self, ids: Any, slot: Any, column: Any, seen: Any, keep: Any) -> None:
        """Dimensions the graph keeps symbolic: the columns read, the tokens and the logits kept (from 2: one token
        is its own graph), and every key/value buffer's capacity (the cache may grow). Later inputs of other sizes
        pass its guards."""
        import torch

        mark = torch._dynamo.mark_dynamic
        mark(seen, 0)
        if len(slot) > 1:
            mark(ids, 1)
            mark(slot, 0)
            mark(column, 0)
            mark(keep, 0)
        for buffer in (*self._cache.keys, *self._cache.values):
            if not getattr(buffer, "_cai_dynamic", False):
                mark(buffer, 2)
                buffer._cai_dynamic = True

    def warm(self, name: str) -> float:
        """Compile the graphs of the model set up now (``name`` is for the log and the error): a step of one token,
        then steps of several whose sizes (tokens, logits kept, columns read) all differ, so that the compiler ties
        none of them to another (it would, given equal sizes, and compile again when they differ): a few tokens,
        and more than 4 tokens with 2 and with 5 logits kept (``--quantize int4``'s layers branch at 4 rows: a graph
        each side; other models need one graph for all of these); a short prompt alone is such a step too. Then the
        pure decode steps of 2 rows and of every slot, which those graphs already serve. Keys/values go to columns
        from 10 of the first slots (the next rows to take those slots overwrite them). Seconds it took; a
        ModelError if it cannot compile."""
        import time

        import torch._inductor.config as inductor

        slots = self._cache.slots
        many = slots + 5
        shapes = [(1, 1), (3, 2), (many, 2), (many, 5)] + ([(2, 2), (slots, slots)] if slots > 1 else [])
        t0 = time.perf_counter()
        try:
            # the mode's settings hold while its graphs compile (torch.compile's options= does not reach freezing)
            with inductor.patch(settings(self.mode, self.device)):
                for tokens, kept in shapes:
                    self.step([0] * tokens, [i % slots for i in range(tokens)], [10 + i for i in range(tokens)],
                              list(range(kept)))
        except Exception as e:     # no C++ compiler, an operator Inductor cannot lower, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"--compile: the decode step of {name!r} did not compile: {first[:300]}",
                             hint="Serve without --compile (it needs a C++ compiler on a CPU; a GPU needs Triton)."
                             ) from None
        if name not in self.compiled_models:
            self.compiled_models.append(name)
        seconds = time.perf_counter() - t0
        log.info("compiled the decode step of %s in %.1f s", name, seconds)
        return seconds


MODES = ("default", "max-autotune")


def _own_code(method: Any) -> Any:
    """``method`` with a code object of its own. Dynamo keeps compiled graphs per code object and tells them apart by
    guards on the inputs' shapes and types, not on which model's weights they are: a second engine of the same
    architecture in this process would run the first one's graphs, and with ``max-autotune`` those hold the first
    model's weights as constants. A fresh code object gives each engine its own graphs (the on-disk cache still
    serves identical ones)."""
    import types

    fn = method.__func__
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, method.__self__)


def settings(mode: str, device: str) -> dict[str, Any]:
    """Inductor's settings for a mode. ``default``: fused kernels around the same matrix products (greedy tokens equal
    the eager engine's). ``max-autotune``: the weights frozen into the graph as constants (prepacked for oneDNN) and
    each matrix product timed against Inductor's own C++ kernels (AMX or AVX-512 micro-kernels; Triton on a GPU),
    the fastest kept: faster, but its sums round otherwise (tokens may differ from the eager engine's, as bf16's do
    from fp32's), and a graph with prepacked weights is not kept in the on-disk cache, so every start compiles it."""
    opts: dict[str, Any] = {"emulate_precision_casts": True}     # bf16: round where eager rounds
    if mode == "max-autotune":
        opts |= {"freezing": True, "max_autotune": True,
                 "max_autotune_gemm_backends": "TRITON,ATEN" if device.startswith("cuda") else "CPP,ATEN"}
    return opts


def configure(models: int = 1) -> None:
    """Process-wide compiler settings this step relies on, for ``models`` served models (base and adapters)."""
    import torch._dynamo

    # a few graphs per served model (one token; several, on each side of int4's row limit; after an adapter switch),
    # told apart by guards on the sizes and the active adapter: past the limit Dynamo would run eagerly, unseen
    need = 16 * models
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64, need)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256,
                                                           4 * need)
