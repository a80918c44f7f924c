"""The running batch and its KV cache: the one owner of the cache's layout.

Every other part of the engine sees a :class:`Batch` as rows (requests) that each get next-token logits from
:meth:`Batch.prefill` and :meth:`Batch.step`; how their keys and values are stored is decided here alone. (A
preallocated cache, chunked prefill or a compiled decode step would replace this module and nothing else.)

Layout today: one transformers ``DynamicCache`` for the batch, keys/values [rows, kv heads, cache length, head dim],
with a mask [rows, cache length] (1 where the row has a real token, 0 for padding), each row's position id [rows]
(= its real tokens so far, so padding never shifts a position) and the token it feeds next [rows].

- Prefill: prompts are left-padded to one width and run in one forward pass (:mod:`cai.inference.batching`). When
  every prompt starts with the chat template's head (:class:`TemplateHead`: the system prompt and first role marker),
  the head's keys/values, computed once per model, are copied into each row and only the rest is computed: rows are
  laid out [head][padding][own tokens].
- Joining rows (continuous batching): a batch prefilled for newcomers is merged into the running one; both caches are
  left-padded with zero keys/values (and mask zeros) to one length and concatenated along the batch.
- Compaction: ended rows are dropped from the batch and the cache at once, and cache columns that no remaining row
  attends to are trimmed (on the left), so a finished row costs nothing.

Sliding-window and other non-plain cache layers keep their own bookkeeping: a batch over them is neither merged nor
trimmed (:attr:`Batch.mergeable`). torch and transformers are imported when a batch is built, never at import time.
"""

from __future__ import annotations

from typing import Any

from cai.inference.batching import left_pad, prefix_cache, repeat_cache
from server.engine.request import Request


def plain_cache(cache: Any) -> bool:
    """Whether every layer of the cache is a plain full-attention DynamicLayer (keys/values we may pad and trim)."""
    from transformers.cache_utils import DynamicLayer

    return cache is not None and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


class TemplateHead:
    """The tokens nearly every prompt starts with (the chat template's fixed head), and their keys/values under each
    model (an adapter changes them), computed on first use. ``rows`` counts the prefilled rows that reused it."""

    def __init__(self, tokens: tuple[int, ...], config: Any, device: str):
        self.tokens = tokens
        self.config = config
        self.device = device
        self.rows = 0
        self._caches: dict[str, Any] = {}       # model name -> DynamicCache of the head (batch 1)

    def starts(self, prompts: list[list[int]]) -> bool:
        """Whether every prompt starts with the head and has a token of its own after it."""
        h = len(self.tokens)
        return bool(h) and all(len(p) > h and tuple(p[:h]) == self.tokens for p in prompts)

    def cache(self, name: str, model: Any) -> Any:
        if name not in self._caches:
            self._caches[name] = prefix_cache(model, self.tokens, config=self.config, device=self.device)
        return self._caches[name]


class Batch:
    """Rows decoded together and their tensors (all on the model's device). ``model`` is what forward passes go
    through (the model, or the PEFT model around it with the wave's adapter set)."""

    def __init__(self, model: Any, rows: list[Request], cache: Any, mask: Any, pos: Any):
        self.model = model
        self.rows = rows
        self.cache = cache    # DynamicCache; keys/values [rows, kv heads, cache length, head dim]
        self.mask = mask      # [rows, cache length] long: 1 where the row has a real token, 0 for padding
        self.pos = pos        # [rows] long: position id of the token fed next (= real tokens of the row so far)
        self.last: Any = None  # [rows] long: the token fed next (the last one sampled)

    @classmethod
    def prefill(cls, model: Any, requests: list[Request], *, config: Any, pad_id: int, device: str,
                head: TemplateHead | None = None) -> tuple[Batch, Any]:
        """One forward pass over the left-padded prompts: the batch, and each row's next-token logits [rows, vocab]
        (float32). The head's cache is reused when every prompt starts with it."""
        import torch
        from transformers import DynamicCache

        prompts = [r.prompt_ids for r in requests]
        h = len(head.tokens) if head is not None and head.starts(prompts) else 0
        padded = left_pad([p[h:] for p in prompts], pad_id, offset=h, device=device)
        if h:
            assert head is not None
            cache = repeat_cache(head.cache(requests[0].model, model), len(requests))
            mask = padded.prefix_mask(h)
            head.rows += len(requests)
        else:
            cache, mask = DynamicCache(config=config), padded.mask
        batch = cls(model, list(requests), cache, mask, torch.tensor([len(p) for p in prompts], device=device))
        return batch, batch._forward(padded.ids, mask, padded.positions)

    def step(self) -> Any:
        """One decode step: feed every row its last token; each row's next-token logits [rows, vocab] (float32)."""
        import torch

        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)   # [rows, cache length + 1]
        logits = self._forward(self.last[:, None], mask, self.pos[:, None])
        self.mask = mask
        self.pos = self.pos + 1
        return logits

    def feed(self, tokens: list[int]) -> None:
        """The tokens sampled for every row: what the next step feeds."""
        import torch

        self.last = torch.tensor(tokens, device=self.pos.device)

    def _forward(self, ids: Any, mask: Any, position_ids: Any) -> Any:
        """Logits of the last position, [rows, vocab] float32; the cache grows by ids.shape[1] columns."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    @property
    def mergeable(self) -> bool:
        """Whether rows can join this batch (and its cache be trimmed): a plain full-attention cache."""
        return plain_cache(self.cache)

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (in order): drop the others from the batch and the cache, and trim
        cache columns (on the left) that no remaining row attends to."""
        import torch

        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.pos, self.last = [], None, None, None, None
            return
        index = torch.tensor(keep, device=self.pos.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos, self.last = self.mask[index], self.pos[index], self.last[index]
        if plain_cache(self.cache):
            first = int(self.mask.any(dim=0).int().argmax())   # the first column some row attends to
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                self.mask = self.mask[:, first:]

    def merge(self, other: Batch) -> None:
        """Take ``other``'s rows in after this batch's: caches and masks left-padded to one length (zero keys/values,
        mask 0) and concatenated along the batch. Positions are per row, so padding changes nothing a row attends to."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: Any, dim: int) -> Any:     # left-pad tensor t with zeros to `width` along dim
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
        self.rows = self.rows + other.rows
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)], dim=0)
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])
