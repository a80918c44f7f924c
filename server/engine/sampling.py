"""Each row's next token, and its log-probabilities when asked.

Per-row sampling: temperature 0 is argmax (the same tokens as ``generate(do_sample=False)``); otherwise softmax of
logits / temperature, restricted to the top-p nucleus and drawn by inverse CDF with one uniform from the row's own
``torch.Generator`` (:func:`cai.inference.sampling.draw_row`): the same seed, prompt and settings give the same text
whatever else shares the batch (up to the floating-point noise of batched kernels).

Log-probabilities (``GenParams.logprobs`` = k): for the rows that ask, each step's log_softmax of the raw logits gives
the picked token's log-probability and the k likeliest tokens'; rows that do not ask cost nothing. Special tokens (the
end-of-sequence one among them) are not part of the text and get none.
"""

from __future__ import annotations

from typing import Any

from cai.inference.sampling import draw_row
from server.engine.request import Request, TokenLogprob


def pick(rows: list[Request], logits: Any) -> list[int]:
    """The next token of every row (logits [rows, vocab] float32): argmax for temperature 0, else a top-p draw with
    the row's generator."""
    import torch

    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index] / temperature[:, None], dim=-1).cpu()   # [sampled rows, vocab]
        for j, i in enumerate(sampled):
            tokens[i] = draw_row(probs[j], rows[i].params.top_p, rows[i].generator)
    return tokens


def record_logprobs(rows: list[Request], logits: Any, tokens: list[int], hidden: set[int]) -> None:
    """Append a :class:`TokenLogprob` to every live row that asked for them, unless its token is in ``hidden``
    (special tokens, never part of the text)."""
    import torch

    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None and tokens[i] not in hidden
             and r.result is None and not r.cancelled]
    if not asked:
        return
    index = torch.tensor(asked, device=logits.device)
    logp = torch.log_softmax(logits[index], dim=-1)                      # [asked rows, vocab] float32
    k = max(rows[i].params.logprobs or 0 for i in asked)
    top_lp, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in asked], device=logits.device))[:, 0].tolist()
    top_lps, top_tokens = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(asked):
        n = rows[i].params.logprobs
        rows[i].logprobs.append(TokenLogprob(tokens[i], chosen[j], tuple(zip(top_tokens[j][:n], top_lps[j][:n]))))
