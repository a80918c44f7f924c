"""A batch's keys/values kept after ``generate``, so the next batch that extends its rows does not prefill them again.

The revise prompt is the critique prompt, the critique the model just wrote, and the revision request: all but the
last few tokens of each row were computed by the critique stage. So after a ``generate`` call the local backend keeps
its cache (:class:`Kept`): for each row, which cache columns hold its real tokens (not padding, not what was fed after
the row had ended) and which tokens those are. When the next call's rows each start with (most of) a kept row's
tokens, :func:`plan` matches them, and :func:`build` lays out the next call on top of the kept cache: the kept rows
selected in the new order, each row's columns beyond what it shares masked out, and only the rows' new tokens fed,
left-padded, with position ids that count the real tokens before them. Attention over a mask with holes computes what
a fresh prefill would (up to floating-point rounding): masked columns take no part.

Only the last call's cache is kept (it is what the next stage extends); a call whose rows do not all extend it drops
it. Rows are matched by their longest common prefix with a kept row, so a re-tokenised text that differs from the
generated tokens at its end only costs the tokens after the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_REUSE = 32          # tokens a row must share with a kept row for the call to continue the kept cache


@dataclass
class Kept:
    """What a ``generate`` call leaves behind. ``cache``: its cache (a ``SuffixCache`` over ``prefix``, the shared
    prefix held once outside the rows' columns; or a ``DynamicCache`` whose columns hold everything, ``prefix`` then
    empty). ``mask``: [rows, columns] 1 where a column holds a real token of the row. ``tokens``: per row, its real
    tokens after ``prefix``, in column order (one per 1 in its mask row)."""

    cache: Any
    prefix: tuple[int, ...]
    mask: Any
    tokens: list[list[int]]


@dataclass
class Continuation:
    rows: list[int]          # new row i continues kept row rows[i]
    reuse: list[int]         # how many of kept row rows[i]'s tokens new row i shares (and is not fed again)


def _lcp(a: list[int], b: list[int]) -> int:
    n, m = 0, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    return n


def plan(kept: Kept | None, ids: list[list[int]], min_reuse: int = MIN_REUSE) -> Continuation | None:
    """How the new rows ``ids`` continue ``kept`` (each matched to a distinct kept row), or None when one of them
    does not start with the kept prefix or shares fewer than ``min_reuse`` tokens with every free kept row."""
    if kept is None:
        return None
    p = len(kept.prefix)
    free = set(range(len(kept.tokens)))
    rows, reuse = [], []
    for row in ids:
        if len(row) <= p or tuple(row[:p]) != kept.prefix:
            return None
        rest = row[p:]
        best, best_n = -1, -1
        for j in free:
            n = min(_lcp(rest, kept.tokens[j]), len(rest) - 1)    # at least one token is fed: it gives the logits
            if n > best_n:
                best, best_n = j, n
        if best < 0 or best_n < min_reuse:
            return None
        free.discard(best)
        rows.append(best)
        reuse.append(best_n)
    return Continuation(rows, reuse)


def build(kept: Kept, cont: Continuation, ids: list[list[int]], pad_id: int, device: Any):
    """The next call laid out on the kept cache: ``(cache, input_ids, attention_mask, position_ids, mask)`` where
    ``attention_mask`` covers the kept columns and the new ones and ``mask`` is the new rows' kept-column mask."""
    import torch

    index = torch.tensor(cont.rows, device=device)
    cache = kept.cache
    for layer in cache.layers:                   # the kept rows, in the new order (a row may be left out)
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    old = kept.mask.index_select(0, index).clone()
    for i, n in enumerate(cont.reuse):           # keep the first n real columns of each row, mask the rest
        real = old[i].nonzero().flatten()
        old[i, real[n:]] = 0
    p = len(kept.prefix)
    news = [row[p + n:] for row, n in zip(ids, cont.reuse)]
    width = max(len(r) for r in news)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in news], device=device)
    new_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in news], device=device)
    before = torch.tensor(cont.reuse, device=device)[:, None]            # real tokens of the row already cached
    positions = p + before + (new_mask.cumsum(-1) - 1).clamp(min=0)
    attention_mask = torch.cat([old.to(new_mask.dtype), new_mask], dim=1)
    return cache, input_ids, attention_mask, positions, new_mask


def kept_after(cache: Any, prefix: tuple[int, ...], mask: Any, tokens: list[list[int]], generated: list[list[int]],
               eos: set[int]) -> Kept:
    """The :class:`Kept` of a finished call. ``mask``/``tokens``: the columns and real tokens the call's prompt left
    in the cache; ``generated``: each row's generated tokens (as many as the call decoded, padding after a row's
    end). A generated token's keys/values are in the cache only once it was fed back, so the last is not; a token
    fed after the row had ended (padding) is not real."""
    import torch

    steps = max((len(g) for g in generated), default=0)
    fed = max(steps - 1, 0)                       # the last decoded token was never fed
    gen_mask = torch.zeros(len(generated), fed, dtype=mask.dtype, device=mask.device)
    out_tokens = []
    for i, row in enumerate(generated):
        stop = next((k for k, t in enumerate(row) if t in eos), len(row))
        real = min(stop + 1, fed)                 # up to and with the end-of-turn token, when it was fed
        gen_mask[i, :real] = 1
        out_tokens.append(tokens[i] + list(row[:real]))
    return Kept(cache, prefix, torch.cat([mask, gen_mask], dim=1), out_tokens)
