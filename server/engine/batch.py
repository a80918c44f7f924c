"""The running batch: the one owner of the KV cache's layout and of what each forward pass feeds.

Every other part of the engine sees a :class:`Batch` as rows (requests): :meth:`Batch.add` takes new ones in,
:meth:`Batch.step` runs one forward pass and returns the rows that got next-token logits, :meth:`Batch.feed` gives
them their sampled tokens, :meth:`Batch.drop_ended` lets ended rows go. How keys and values are stored is decided
here and in :mod:`server.engine.slots`, nowhere else.

Layout: the engine's :class:`~server.engine.slots.SlotCache`, preallocated, one slot per row: a row's keys/values sit
at columns 0, 1, 2, ... of its slot (column = position id), so nothing is copied when a row joins or ends.

A step (one forward pass) feeds every decoding row its last sampled token and, within a token budget, the next chunk
of the prompts still in prefill (oldest first): a request that joins a running wave is prefilled inside the decode
steps, so the running rows wait for a step a little longer, not for a separate prefill. A row whose prompt ends in
this step's chunk gets logits (its first token) from the same pass. The budget is the engine's (``prefill_chunk``
while rows decode; more when none does).

The chat template's head (:class:`TemplateHead`: the system prompt and first role marker, which nearly every prompt
starts with) is computed once per model; a row whose prompt starts with it gets the head's keys/values copied into
the first columns of its slot and prefills only the rest.

torch and transformers are imported when a batch is built, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cai.inference.batching import prefix_cache
from server.engine.request import Request


class TemplateHead:
    """The tokens nearly every prompt starts with (the chat template's fixed head), and their keys/values under each
    model (an adapter changes them), computed on first use. ``rows`` counts the prefilled rows that reused it."""

    def __init__(self, tokens: tuple[int, ...], config: Any, device: str):
        self.tokens = tokens
        self.config = config
        self.device = device
        self.rows = 0
        self._kv: dict[str, tuple[list[Any], list[Any]]] = {}   # model name -> per-layer keys, values [kv, head, d]

    @staticmethod
    def find(encode: Callable[[list[Any]], list[int]], minimum: int) -> tuple[int, ...]:
        """The tokens one-user-message prompts start with (what differently starting prompts share, through
        ``encode``, the engine's messages-to-tokens), less one so a prompt always has a token of its own after it;
        () if shorter than ``minimum``. A prompt whose first characters merge with the head's last token
        differently simply does not use it (checked per prefill)."""
        probes = [encode([{"role": "user", "content": c}]) for c in ("a", "zz", "Hi", "The 1", " x", "\n?")]
        n = 0
        while n < min(map(len, probes)) - 1 and all(p[n] == probes[0][n] for p in probes):
            n += 1
        return tuple(probes[0][:n]) if n >= minimum else ()

    def starts(self, prompt: list[int]) -> bool:
        """Whether the prompt starts with the head and has a token of its own after it."""
        h = len(self.tokens)
        return bool(h) and len(prompt) > h and tuple(prompt[:h]) == self.tokens

    def kv(self, name: str, model: Any) -> tuple[list[Any], list[Any]]:
        """Per layer, the head's keys and values [kv heads, head length, head dim] under ``model``."""
        if name not in self._kv:
            cache = prefix_cache(model, self.tokens, config=self.config, device=self.device)
            self._kv[name] = ([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers])
        return self._kv[name]


@dataclass
class Row:
    request: Request
    slot: int
    pending: list[int]                # prompt tokens not fed yet
    length: int = 0                   # columns of the slot filled (= tokens fed so far)
    last: int | None = None           # the token sampled last: what the next step feeds


@dataclass
class Batch:
    """Rows decoded together in the slots of ``cache``. ``model`` is what forward passes go through (the model, or
    the PEFT model around it with the wave's adapter set)."""

    # With a compiled step, a step that prefills (chunks beside decoding rows, or short prompts) goes through the
    # graph while (prompt tokens x columns read) is at most this: each prompt token reads its slot's keys/values on
    # its own there (the default model: ~23 KB of them per token and column, so ~90 MB at this bound); a wave's
    # first prefill of many or long prompts runs eagerly.
    COMPILED_PREFILL: ClassVar[int] = 4096

    model: Any
    cache: Any                        # server.engine.slots.SlotCache
    head: TemplateHead | None = None
    cache_argument: str = "past_key_values"   # how the model's forward names its cache (slots.cache_argument)
    compiled: Any = None              # the compiled decode step (compiled.CompiledDecode), if any
    _rows: list[Row] = field(default_factory=list)
    passed: int = 0                   # rows in the last forward pass
    fed: int = 0                      # tokens in the last forward pass

    @property
    def rows(self) -> list[Request]:
        return [r.request for r in self._rows]

    @property
    def decoding(self) -> int:
        """Rows past their prefill."""
        return sum(1 for r in self._rows if not r.pending)

    def add(self, requests: list[Request]) -> None:
        """Take requests in, each into a free slot; their prompts are fed by the next steps."""
        used = {r.slot for r in self._rows}
        free = [s for s in range(self.cache.slots) if s not in used]
        if len(requests) > len(free):
            raise ValueError(f"{len(requests)} rows joining, {len(free)} free slots")
        for request, slot in zip(requests, free):
            row = Row(request, slot, list(request.prompt_ids))
            head = self.head
            if head is not None and head.starts(row.pending):
                keys, values = head.kv(request.model, self.model)
                row.length = len(head.tokens)
                self.cache.grow(row.length + 1)
                self.cache.write(slot, 0, keys, values)
                del row.pending[:row.length]
                head.rows += 1
            self._rows.append(row)

    def step(self, budget: int) -> tuple[list[Request], Any]:
        """One forward pass: every decoding row's last token and up to ``budget`` prompt tokens of rows in prefill
        (oldest first). The rows that got next-token logits, and those logits [rows, vocab] (float32)."""
        import torch

        from server.engine.slots import Part, Step

        decode = sorted((r for r in self._rows if not r.pending), key=lambda r: r.slot)
        prefill: list[tuple[Row, int]] = []
        for r in self._rows:
            if r.pending and budget > 0:
                prefill.append((r, min(len(r.pending), budget)))
                budget -= prefill[-1][1]
        device = self.cache.device

        def long(values: list[int]) -> Any:
            return torch.tensor(values, dtype=torch.long, device=device)

        ids: list[int] = []
        columns: list[int] = []
        slots: list[int] = []
        parts: list[Part] = []
        sampled: list[Row] = []
        keep: list[int] = []
        if decode:
            assert all(r.last is not None for r in decode)
            lo, hi = decode[0].slot, decode[-1].slot
            start, count = [0] * (hi - lo + 1), [0] * (hi - lo + 1)
            for r in decode:
                ids.append(r.last)    # type: ignore[arg-type]
                columns.append(r.length)
                slots.append(r.slot)
                start[r.slot - lo], count[r.slot - lo] = r.length, 1
            length = max(r.length for r in decode) + 1
            holes = len(decode) < hi - lo + 1
            parts.append(Part(first=0, tokens=len(decode), rows=hi - lo + 1, width=1, length=length,
                              start=long(start), count=long(count), offset=lo, index=None,
                              dest=long([r.slot - lo for r in decode]) if holes else None,
                              full=not holes and all(r.length == length - 1 for r in decode)))
            sampled += decode
            keep += range(len(decode))
        if prefill:
            first, width = len(ids), max(n for _, n in prefill)
            dest: list[int] = []
            for b, (r, n) in enumerate(prefill):
                ids += r.pending[:n]
                columns += range(r.length, r.length + n)
                slots += [r.slot] * n
                dest += range(b * width, b * width + n)
                if n == len(r.pending):
                    sampled.append(r)
                    keep.append(len(ids) - 1)
            one = len(prefill) == 1
            parts.append(Part(first=first, tokens=len(ids) - first, rows=len(prefill), width=width,
                              length=max(r.length + n for r, n in prefill),
                              start=long([r.length for r, _ in prefill]), count=long([n for _, n in prefill]),
                              offset=prefill[0][0].slot if one else 0,
                              index=None if one else long([r.slot for r, _ in prefill]),
                              dest=None if one else long(dest), causal=one and prefill[0][0].length == 0))
        prefilling = len(ids) - len(decode)
        last = max(columns)         # 0: one token at column 0, a size the graphs take as a constant (eager)
        if self.compiled is not None and 0 < last and prefilling * (last + 1) <= self.COMPILED_PREFILL:
            # through the compiled graph: a prefill token is one more row of its slot (compiled.py); so is a short
            # prompt alone (what a single client waits on before its first token)
            logits = self.compiled.step(ids, slots, columns, keep)
        else:
            self.cache.grow(max(p.length for p in parts))
            step = Step(slot=long(slots), column=long(columns), parts=parts)
            logits = self._forward(long(ids)[None], step, long(keep))
        for r in decode:
            r.length += 1
            r.last = None
        for r, n in prefill:
            r.length += n
            del r.pending[:n]
        self.passed, self.fed = len(decode) + len(prefill), len(ids)
        return [r.request for r in sampled], logits

    def _forward(self, ids: Any, step: Any, keep: Any) -> Any:
        """Logits [kept tokens, vocab] float32 of the step's tokens at ``keep``; their keys/values are written."""
        self.cache.step = step
        try:
            # a 4-D mask makes transformers skip building its own; the slots' attention masks per part (slots.py)
            out = self.model(input_ids=ids, attention_mask=self.cache.no_mask, position_ids=step.column[None],
                             use_cache=True, logits_to_keep=keep, **{self.cache_argument: self.cache})
        finally:
            self.cache.step = None
        return out.logits[0].float()

    def feed(self, requests: list[Request], tokens: list[int]) -> None:
        """The tokens sampled for these rows (the ones :meth:`step` returned): what the next step feeds them."""
        rows = {id(r.request): r for r in self._rows}
        for request, token in zip(requests, tokens):
            rows[id(request)].last = token

    def drop_ended(self) -> None:
        """Let the rows whose request has ended go (their slots are free for rows joining)."""
        self._rows = [r for r in self._rows if r.request.result is None]

