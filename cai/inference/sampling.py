"""Temperature and top-p (nucleus) sampling, written once: the local backend's ``generate`` and the server engine's
decode loop both draw their tokens here.

The nucleus is the smallest set of likeliest tokens whose mass reaches ``top_p``: a token is in it when the mass ranked
above it is below ``top_p`` (:func:`in_nucleus`). It almost always lies within the top ``TOP_K`` tokens, so those are
taken first (``topk``); only a row whose top k hold less than ``top_p`` of the mass falls back to a full sort. Sorting
a 49k-token vocabulary at every step is most of a decode step's time on a CPU (~38 ms of ~110 ms for 16 rows of the
default model), and the distribution sampled is exactly top-p's either way.

Two draws, for two ways of seeding (both exact top-p; they give different tokens for one seed):

- :func:`draw_rows`: every row of a batch from one generator, by ``torch.multinomial``. The local backend seeds one
  generator per ``generate`` call.
- :func:`draw_row`: one row from its own generator, by inverse CDF with one uniform draw. The engine gives every
  request its own generator, so a request's text does not depend on what else shares the batch.

Each keeps the tokens it drew before this module existed (seeded runs and stage caches depend on them), which is why
they are not merged into one. torch is imported lazily: the server imports this module at start-up.
"""

from __future__ import annotations

from typing import Any

TOP_K = 1024    # the nucleus is looked for among this many likeliest tokens first


def in_nucleus(probs: Any, top_p: float) -> Any:
    """Booleans, True for the tokens of the top-p nucleus: ``probs`` [..., n] holds probabilities (or unnormalised
    masses) sorted in descending order along its last dimension; the result is a prefix of each row."""
    before = probs.cumsum(-1) - probs            # mass ranked above each token
    return before < top_p


def draw_rows(logits: Any, temperature: float, top_p: float, generator: Any, k: int = TOP_K) -> Any:
    """One token per row of ``logits`` [rows, vocab], drawn from softmax(logits / temperature) restricted to the top-p
    nucleus, by ``torch.multinomial`` with ``generator`` (a CPU ``torch.Generator``). Returns token ids [rows, 1] on
    the logits' device."""
    import torch

    logits = logits.float() / temperature
    k = min(k, logits.shape[-1])
    lse = torch.logsumexp(logits, -1, keepdim=True)
    top, idx = logits.topk(k, dim=-1)                          # descending
    probs = (top - lse).exp()
    short = probs.sum(-1) < top_p                              # nucleus not inside the top k (rare)
    if short.any():
        full, full_idx = logits[short].sort(dim=-1, descending=True)
        pad = logits.shape[-1] - k
        top = torch.cat([top, torch.full((top.shape[0], pad), float("-inf"), device=top.device)], -1)
        idx = torch.cat([idx, torch.zeros((idx.shape[0], pad), dtype=idx.dtype, device=idx.device)], -1)
        top[short], idx[short] = full, full_idx
        probs = (top - lse).exp()
    probs = probs.masked_fill(~in_nucleus(probs, top_p), 0.0)
    pick = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
    return idx.gather(-1, pick)


def draw_row(probs: Any, top_p: float, generator: Any, k: int = TOP_K) -> int:
    """One token from ``probs`` [vocab] (float32, CPU: already softmax(logits / temperature)) restricted to the top-p
    nucleus, by inverse CDF with one uniform draw from ``generator``."""
    import torch

    u = float(torch.rand((), generator=generator))
    if top_p >= 1.0:
        cdf = probs.cumsum(0)
        pick = int(torch.searchsorted(cdf, u * cdf[-1:], right=True))
        return min(pick, probs.shape[0] - 1)
    top, ids = probs.topk(min(k, probs.shape[0]))              # descending
    if float(top.sum()) < top_p:                               # the nucleus is wider than k (rare)
        top, ids = probs.sort(descending=True)
    n = max(1, int(in_nucleus(top, top_p).sum()))              # smallest prefix whose mass reaches top_p
    cdf = top[:n].cumsum(0)
    j = min(int(torch.searchsorted(cdf, u * cdf[-1:], right=True)), n - 1)
    return int(ids[j])
