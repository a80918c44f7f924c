"""A batch of prompts over a shared prefix, laid out once: the local backend's ``generate``, the local judge's scoring
pass and the server engine's prefill all build their batches here.

Rows of token ids that start with the same ``prefix`` (a stage's system prompt and exemplars, a chat template's head)
are laid out as [prefix][padding][the row's own tokens]. The prefix's keys/values are computed once
(:func:`prefix_cache`) and then either shared by every row (``cai.inference.prefix_attention``: only the suffixes are
in the batch) or copied into each row (:func:`repeat_cache`). The suffixes are left-padded to one width
(:func:`left_pad`) so every row's next token comes from the last column. Position ids count real tokens only,
continuing after the prefix, so padding never shifts a row's positions: a padded row computes what it would alone.

torch is imported lazily: the server imports this module at start-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


def common_prefix(rows: list[list[int]]) -> int:
    """How many tokens every row starts with, leaving at least one token of each row outside (a forward pass needs
    a token of each row to produce its next-token logits)."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    first = rows[0]
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


@dataclass(frozen=True)
class Padded:
    """Rows left-padded to one width (all long tensors [rows, width], on one device)."""

    ids: Any          # each row's tokens after the prefix, pad ids in front
    mask: Any         # 1 on a real token, 0 on padding
    positions: Any    # position ids: the prefix's length + the row's real tokens before (a pad gets the first)

    def with_prefix(self, prefix: tuple[int, ...] | list[int]) -> tuple[Any, Any]:
        """(ids, mask) with the prefix's own tokens in front of every row: [prefix][padding][suffix], for a model
        call (``generate``) that is given the whole sequence and a cache already holding the prefix."""
        return self._prepend(list(prefix), self.ids), self.prefix_mask(len(prefix))

    def prefix_mask(self, p: int) -> Any:
        """The mask with ``p`` ones in front: the columns of a prefix held in each row's cache."""
        if not p:
            return self.mask
        return self._prepend([1] * p, self.mask)

    def _prepend(self, values: list[int], t: Any) -> Any:
        import torch

        if not values:
            return t
        head = torch.tensor([values], dtype=t.dtype, device=t.device).expand(t.shape[0], -1)
        return torch.cat([head, t], dim=1)


def left_pad(rows: list[list[int]], pad_id: int, *, offset: int = 0, device: Any = None) -> Padded:
    """``rows`` (each row's tokens after a prefix of ``offset`` tokens) left-padded with ``pad_id`` to the longest."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = offset + (mask.cumsum(-1) - 1).clamp(min=0)
    return Padded(ids, mask, positions)


def cache_argument(model: Any) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` in recent transformers (which deprecates
    ``past_key_values``, the only name older 5.x releases know). ``model`` may be a PEFT model: its base is asked."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def prefix_cache(model: Any, tokens: tuple[int, ...] | list[int], *, config: Any, device: Any) -> Any:
    """The keys/values of ``tokens`` under ``model`` (a ``DynamicCache`` of batch 1, laid out by the transformers
    ``config``), for rows that start with them. ``model`` may be a PEFT model around the one ``config`` describes."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    ids = torch.tensor([list(tokens)], device=device)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
              **{cache_argument(model): cache})
    return cache


def repeat_cache(cache: Any, rows: int) -> Any:
    """A copy of a batch-1 cache with one copy of it per row (the prefix copied into every row)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out
