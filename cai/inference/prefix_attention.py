"""Attention over a shared prefix stored once, for the local backend's prefix cache.

Every critique and revise prompt of a batch starts with the same ~1000 tokens (system prompt and exemplars). Copying
their key/value cache into every row of the batch makes each decode step read (and ``DynamicCache`` re-copy) that
prefix once per row: with 16 rows on the default model that is ~1 GB of memory traffic per generated token, most of
a step's time on a CPU. Here the prefix is kept once (batch 1) and only each row's own suffix lives in the cache;
at each decode step, attention scores against the prefix are computed for all rows in one matmul that reads the
prefix once, then merged with the suffix scores in one softmax. The result equals full attention over [prefix,
suffix]. The prefill of the suffixes (many queries per row: compute-bound) uses SDPA's fused kernel over the prefix
expanded for that one call.

Wiring: :class:`SuffixCache` returns :class:`PrefixedKV` pairs from ``update``; the attention function registered
as ``ATTENTION`` recognises them, and hands plain tensors to transformers' SDPA path unchanged (so the model behaves
as with ``sdpa`` everywhere else). Position ids of the suffix start after the prefix and are passed explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "cai_shared_prefix"


@dataclass(frozen=True)
class PrefixedKV:
    prefix: torch.Tensor   # (1, kv_heads, P, head_dim), shared by every row
    suffix: torch.Tensor   # (batch, kv_heads, S, head_dim), each row's own tokens so far


class SuffixCache(DynamicCache):
    """A DynamicCache of the rows' own tokens, that also hands the shared prefix of each layer to attention."""

    def __init__(self, config, prefix: DynamicCache):
        super().__init__(config=config)
        self.prefix_layers = [(layer.keys, layer.values) for layer in prefix.layers]  # type: ignore[union-attr]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        pk, pv = self.prefix_layers[layer_idx]
        return PrefixedKV(pk, keys), PrefixedKV(pv, values)


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    if not isinstance(key, PrefixedKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pk, sk, pv, sv = key.prefix, key.suffix, value.prefix, value.suffix
    b, h, q, d = query.shape
    kvh, p, s = sk.shape[1], pk.shape[2], sk.shape[2]
    if q > 1:
        # prefill of the suffixes: compute-bound, where SDPA's fused kernel wins; the prefix is expanded for this
        # one call only (a transient per layer), never stored per row
        keys = torch.cat([pk.expand(b, -1, -1, -1), sk], dim=2)
        values = torch.cat([pv.expand(b, -1, -1, -1), sv], dim=2)
        mask = torch.cat([torch.ones(b, 1, q, p, dtype=torch.bool, device=query.device),
                          _suffix_mask(attention_mask, b, 1, q, s, query.device)], dim=-1)
        return sdpa_attention_forward(module, query, keys, values, mask, dropout=dropout, scaling=scaling, **kwargs)
    # decode (one query per row): memory-bound, so read the prefix once for all rows
    g = h // kvh                                        # query heads per key/value head
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(b, kvh, g * q, d)                # head kv*g+j -> group kv, row j*q+t

    # prefix: all rows' queries against the one prefix copy, (kvh, b*g*q, d) @ (kvh, d, p)
    qp = qg.transpose(0, 1).reshape(kvh, b * g * q, d)
    scores_p = torch.matmul(qp, pk[0].transpose(-1, -2)).view(kvh, b, g * q, p).transpose(0, 1)
    scores_s = torch.matmul(qg, sk.transpose(-1, -2))   # (b, kvh, g*q, s)
    scores = torch.cat([scores_p, scores_s], dim=-1).float() * scale
    hidden = ~_suffix_mask(attention_mask, b, g, q, s, query.device)
    scores[..., p:] = scores[..., p:].masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.prefix.dtype)

    probs_p = probs[..., :p].transpose(0, 1).reshape(kvh, b * g * q, p)
    out = torch.matmul(probs_p, pv[0]).view(kvh, b, g * q, d).transpose(0, 1)
    out = out + torch.matmul(probs[..., p:], sv)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


def _suffix_mask(mask, b: int, g: int, q: int, s: int, device) -> torch.Tensor:
    """(b, 1, g*q, s) booleans, True where a query may attend a suffix key."""
    if mask is None:   # no padding: plain causal over the suffix (query t sits at suffix position s-q+t)
        mask = (torch.arange(s, device=device)[None, :] <= torch.arange(s - q, s, device=device)[:, None])
        mask = mask[None, None].expand(b, 1, q, s)
    elif mask.dtype != torch.bool:
        mask = mask == 0   # an additive float mask: 0 where allowed
    mask = mask[..., :s]
    return mask.unsqueeze(2).expand(b, mask.shape[1], g, q, s).reshape(b, mask.shape[1], g * q, s)


def register() -> str:
    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
