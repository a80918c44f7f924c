"""The local backend's decode loop: ``generate``'s tokens, with each row leaving the batch once it has ended.

transformers' ``generate`` keeps every row of a batch in every step until the longest is done, feeding padding to the
rows that ended. In the generate pipeline's batches the rows stop at very different lengths (on the bench's default
size a row averages ~95 of 128 tokens), so about a quarter of the rows computed are padding, and each costs a row of
attention over a long prompt. Here a row leaves the batch the step after its end-of-turn token (that token is fed
once, so its keys/values are in the cache as ``generate`` leaves them): its slot is swapped with the last active one
(:meth:`cai.inference.kv.GrowingLayer.swap_rows`, two rows copied, not the cache) and the steps run on the active
slots only. What that saves is each row's own share of a step: in fp32 on a 2-core CPU a step is mostly reading the
weights (16 rows cost ~1.3× 6 rows), so the pipeline gains ~5% there (``bench/generate.py``'s "generate loop" arm);
the share grows with the prompts' length and the rows' number.

The tokens are ``generate``'s (tested): greedy picks the argmax of the float32 logits; sampling draws every row of
the call, active or not, in the call's row order from one generator (an ended row draws from a one-token
distribution), so each row takes the same random numbers as under ``generate``. Position ids are ``generate``'s: given,
or counted from the attention mask, and one more per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cai.inference.batching import cache_argument
from cai.inference.kv import GrowingLayer, activate, swap_rows


@dataclass
class Decoded:
    tokens: list[list[int]]   # per row (the call's order): its new tokens up to and with its end token, then pad
    slots: list[int]          # the cache's row order after the call: slot s holds row slots[s]


def decode(lm: Any, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any, *, max_new_tokens: int,
           eos_ids: list[int], pad_id: int, positions: torch.Tensor | None = None,
           pick: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Decoded:
    """Prefill ``input_ids`` (left-padded rows; ``mask`` covers the cache's columns and theirs; columns the cache
    holds already are not fed again) into ``cache`` (its full-attention layers :class:`GrowingLayer`), then decode
    up to ``max_new_tokens`` per row. ``positions``: the fed columns' position ids (default: counted from ``mask``).
    ``pick``: [rows, vocab] float32 logits in the call's row order -> [rows] tokens (sampling); greedy when None."""
    rows = input_ids.shape[0]
    if not all(isinstance(layer, GrowingLayer) for layer in cache.layers):
        raise TypeError("decode needs a cache of GrowingLayer layers (cai.inference.kv.growing)")
    eos = set(eos_ids)
    if positions is None:   # generate's: real tokens counted, padding at position 1
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    width = mask.shape[1]
    # as generate does: what the cache holds already is not fed again (the copied prefix's columns)
    fresh = width - cache.get_seq_length()
    if not 1 <= fresh <= input_ids.shape[1]:   # each row needs a token fed: its logits pick the first new token
        raise ValueError(f"the cache holds {cache.get_seq_length()} of the mask's {width} columns and "
                         f"{input_ids.shape[1]} are given: no token left to feed")
    input_ids, positions = input_ids[:, -fresh:], positions[:, -fresh:]
    full_mask = torch.zeros(rows, width + max_new_tokens, dtype=mask.dtype, device=mask.device)
    full_mask[:, :width] = mask
    cache_kw = cache_argument(lm)
    slot_row = list(range(rows))
    out: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows            # the row's end token has been picked
    fed_end = [False] * rows          # ... and fed: its keys/values are in the cache, the row may leave
    active = rows
    next_pos = positions[:, -1:] + 1
    logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache}).logits[:, -1]
    for step in range(max_new_tokens):
        picked = _pick(logits, slot_row[:active], rows, pick)
        for s in range(active):
            r = slot_row[s]
            if ended[r]:
                fed_end[r] = True
                continue
            out[r].append(picked[s])
            ended[r] = picked[s] in eos
        if all(ended) or step == max_new_tokens - 1:
            break
        # rows whose end token was fed in the last step leave: swapped behind the active slots
        s = 0
        while s < active:
            if fed_end[slot_row[s]]:
                active -= 1
                if s != active:
                    swap_rows(cache, s, active)
                    full_mask[[s, active]] = full_mask[[active, s]]
                    next_pos[[s, active]] = next_pos[[active, s]]
                    picked[s], picked[active] = picked[active], picked[s]
                    slot_row[s], slot_row[active] = slot_row[active], slot_row[s]
                continue
            s += 1
        activate(cache, active)
        fed = picked[:active]   # a row that just ended feeds its end token once more
        col = width + step
        full_mask[:active, col] = 1
        logits = lm(input_ids=torch.tensor(fed, device=input_ids.device)[:, None],
                    attention_mask=full_mask[:active, :col + 1], position_ids=next_pos[:active],
                    use_cache=True, **{cache_kw: cache}).logits[:, -1]
        next_pos[:active] += 1
    activate(cache, None)
    steps = max(len(t) for t in out)
    return Decoded([t + [pad_id] * (steps - len(t)) for t in out], slot_row)


def _pick(logits: torch.Tensor, rows_of_slots: list[int], rows: int,
          pick: Callable[[torch.Tensor], torch.Tensor] | None) -> list[int]:
    """The token of each active slot: the argmax, or ``pick`` over all the call's rows in their order (an inactive
    row gets a one-token distribution, so the generator's draws for the others are ``generate``'s)."""
    logits = logits.float()
    if pick is None:
        return logits.argmax(-1).tolist()
    full = torch.full((rows, logits.shape[-1]), float("-inf"), device=logits.device)
    full[:, 0] = 0.0
    index = torch.tensor(rows_of_slots, device=logits.device)
    full[index] = logits
    return pick(full).reshape(-1)[index].tolist()
