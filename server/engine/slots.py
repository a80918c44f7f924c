"""The engine's key/value cache: preallocated slots, and the attention that reads them.

Layout. Every layer has one key and one value buffer [slots, kv heads, capacity, head dim] (``max_batch`` slots),
allocated once per engine and kept between waves. A row owns one slot for its whole life: its tokens sit at columns
0, 1, 2, ... of that slot (column = position id), so a row joining or finishing moves nothing: it takes a free slot, or
leaves one. When a row outgrows the capacity every buffer is reallocated at twice the size (the one copy, O(log
length) times in an engine's life).

A forward pass is one step over any rows at once, each feeding any number of tokens: one for a row that decodes, a
chunk of its prompt for a row in prefill. The tokens of the step are flattened into one sequence [1, tokens] (so the
linear layers see no padding); :class:`Step` says for each token which slot and column it belongs to.
:meth:`SlotCache.update` (called by each attention layer, through transformers' ``Cache`` protocol) writes the step's
keys/values into their slots and columns, and :func:`slot_attention` (registered as ``ATTENTION`` in transformers'
attention interface) lays the queries out per slot [slots, heads, width, head dim] and runs one SDPA over the slots'
buffers, masked per slot: query j of a row that starts the step at column p sees columns 0..p+j (and, under a sliding
window, not the ones more than the window behind). Plain tensors (a forward pass outside a step) go to transformers'
SDPA path unchanged.

torch and transformers are imported here at import time: :mod:`server.engine.batch` imports this module lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "cai_slots"


@dataclass
class Part:
    """Rows of a step whose queries are laid out together, [rows, heads, width, head dim], and attend to their slots'
    buffers in one SDPA call: slots [offset, offset + rows), read in place, or with ``index`` the listed ones."""

    first: int                       # the part's tokens are tokens [first, first + tokens) of the step
    tokens: int
    rows: int                        # rows of the query layout (slots, or listed rows)
    width: int                       # the most tokens a row of the part feeds
    length: int                      # columns read
    start: torch.Tensor              # [rows] long: each row's first column in this step (0 for a padding row)
    count: torch.Tensor              # [rows] long: tokens each row feeds (0: a padding row)
    dest: torch.Tensor | None        # [tokens] long: row * width + j for each token (None: the identity)
    index: torch.Tensor | None       # [rows] long: the slots of the rows (None: slots [offset, offset + rows))
    offset: int = 0
    causal: bool = False             # one row from column 0: plain causal attention, no mask (as generate runs it)
    full: bool = False               # every row sees every column read: no mask
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """[rows, 1, width, length] bool, True where a query may attend a key (None: no mask needed)."""
        if (self.causal or self.full) and window is None:
            return None
        if window not in self._masks:
            device = self.start.device
            col = torch.arange(self.length, device=device)[None, None, :]               # [1, 1, length]
            j = torch.arange(self.width, device=device)[None, :, None]                 # [1, width, 1]
            at = self.start[:, None, None] + j                                         # column of query j
            mask = col <= at
            if window is not None:
                mask &= col > at - window
            # a query of no token (padding, or a slot outside the step) sees column 0 only: finite, and discarded
            mask = torch.where(j < self.count[:, None, None], mask, col == 0)
            self._masks[window] = mask[:, None]
        return self._masks[window]


@dataclass
class Step:
    """One forward pass over slots: which slot and column each of its (flattened) tokens goes to, and its parts."""

    slot: torch.Tensor               # [tokens] long: the slot of each token
    column: torch.Tensor             # [tokens] long: its column in the slot (= its position id)
    parts: list[Part]


@dataclass
class Decode:
    """A step in which every row decodes one token, in the form a compiled graph keeps from step to step (the
    compiled decode step, :mod:`server.engine.compiled`): row i's token goes to ``column[i]`` of ``slot[i]`` and its
    query attends to columns 0..column[i] of that slot. The columns read are the size of ``seen``, an empty tensor,
    so that the compiler keeps that number symbolic (a dynamic dimension) instead of compiling again for each length;
    the rows' count is the tokens' dimension, dynamic from 2 rows (one row is a graph of its own: its attention reads
    exactly its columns, unmasked, as the eager step's does; attending over more columns, masked, rounds otherwise in
    bf16 and changes tokens)."""

    slot: torch.Tensor               # [rows] long
    column: torch.Tensor             # [rows] long: each row's token's column (= its position id)
    seen: torch.Tensor               # [max(column) + 1], empty: its size is the columns read


@dataclass(frozen=True)
class SlotKV:
    """What :meth:`SlotCache.update` hands to attention: one layer's whole buffer and the step."""

    buffer: torch.Tensor     # [slots, kv heads, capacity, head dim]
    step: Step | Decode


class SlotCache:
    """Per-layer key and value buffers [slots, kv heads, capacity, head dim] (see the module docstring). Follows as
    much of transformers' ``Cache`` protocol as a forward pass of a decoder uses: ``update`` and the length queries."""

    is_compileable = False

    def __init__(self, config: Any, slots: int, capacity: int, dtype: Any, device: Any):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layers_n = text.num_hidden_layers
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.slots, self.dtype, self.device = slots, dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.step: Step | Decode | None = None   # set for the duration of one forward pass
        self.no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)   # a placeholder 4-D mask
        self.grow(capacity)

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` columns per slot (doubling): new zeroed buffers, the old columns copied in."""
        if capacity <= self.capacity:
            return
        new = max(capacity, 2 * self.capacity)
        shape = (self.slots, self.kv_heads, new, self.head_dim)

        def bigger(old: torch.Tensor | None) -> torch.Tensor:
            # zeros, not empty: a masked key still enters SDPA's products, and 0 * NaN would poison its row
            t = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                t[:, :, :old.shape[2]] = old
            return t

        none: list[torch.Tensor | None] = [None] * self.layers_n
        self.keys = [bigger(k) for k in (self.keys or none)]
        self.values = [bigger(v) for v in (self.values or none)]
        self.capacity = new

    def write(self, slot: int, start: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy ready keys/values (per layer [kv heads, columns, head dim]) into a slot from column ``start``."""
        for layer, (k, v) in enumerate(zip(keys, values)):
            n = k.shape[1]
            self.keys[layer][slot, :, start:start + n] = k
            self.values[layer][slot, :, start:start + n] = v

    # -- transformers' Cache protocol (what a decoder's forward pass calls) ------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[SlotKV, SlotKV]:
        """Write the step's keys/values ([1, kv heads, tokens, head dim]) at their slots and columns."""
        step = self.step
        assert step is not None, "SlotCache.update outside a step"
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[step.slot, :, step.column] = key_states[0].transpose(0, 1).to(k.dtype)     # [tokens, kv heads, dim]
        v[step.slot, :, step.column] = value_states[0].transpose(0, 1).to(v.dtype)
        return SlotKV(k, step), SlotKV(v, step)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if isinstance(self.step, Decode):
            return self.step.seen.shape[0]
        return max((p.length for p in self.step.parts), default=0) if self.step is not None else 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.layers_n


def slot_attention(module: Any, query: torch.Tensor, key: Any, value: Any, attention_mask: Any,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of a step's queries ([1, heads, tokens, head dim]) over their slots; [1, tokens, heads, head dim]."""
    if not isinstance(key, SlotKV):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    window = kwargs.get("sliding_window")
    gqa = getattr(module, "num_key_value_groups", 1) > 1      # a plain bool (a shape test is symbolic under compile)
    if isinstance(key.step, Decode):
        return _decode_attention(key.step, query, key.buffer, value.buffer, scaling, window, gqa), None
    outs = [_part_attention(part, query[0, :, part.first:part.first + part.tokens], key.buffer, value.buffer,
                            scaling, window, gqa) for part in key.step.parts]
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None], None


def _part_attention(part: Part, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scaling: float | None, window: int | None, gqa: bool) -> torch.Tensor:
    """One part: queries [heads, tokens, head dim] -> [tokens, heads, head dim]."""
    h, _, d = query.shape
    n, w = part.rows, part.width
    q = query.transpose(0, 1)                                              # [tokens, heads, dim]
    if part.dest is not None:
        q = q.new_zeros(n * w, h, d).index_copy_(0, part.dest, q)
    q = q.reshape(n, w, h, d).transpose(1, 2)                             # [rows, heads, width, dim]
    if part.index is None:
        o = part.offset
        k, v = keys[o:o + n, :, :part.length], values[o:o + n, :, :part.length]
    else:
        k, v = keys[part.index, :, :part.length], values[part.index, :, :part.length]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=part.mask(window), scale=scaling, is_causal=part.causal and window is None,
        enable_gqa=gqa)
    out = out.transpose(1, 2).reshape(n * w, h, d)                        # [rows * width, heads, dim]
    return out if part.dest is None else out[part.dest]


def _decode_attention(step: Decode, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scaling: float | None, window: int | None, gqa: bool) -> torch.Tensor:
    """The rows' queries [1, heads, rows, head dim], each over columns 0..column of its slot (under a sliding window,
    the last ``window`` of them); [1, rows, heads, head dim]."""
    n = step.seen.shape[0]
    q = query.transpose(0, 2)                                                  # [rows, heads, 1, dim]
    k = keys.index_select(0, step.slot)[:, :, :n]                              # [rows, kv heads, n, dim]
    v = values.index_select(0, step.slot)[:, :, :n]
    mask = None
    if q.shape[0] > 1 or window is not None:      # one row reads exactly its columns: no mask (as eager)
        col = torch.arange(n, device=k.device)
        at = step.column[:, None]
        mask = col <= at
        if window is not None:
            mask &= col > at - window
        mask = mask[:, None, None]                                             # [rows, 1, 1, n]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.permute(2, 0, 1, 3)


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def use_slot_attention(lm: Any, model_id: str) -> None:
    """Switch ``lm`` to :func:`slot_attention`, or raise a ModelError for a model it cannot serve: one with layers
    that are not attention (linear-attention or state-space layers keep other state than keys and values), or whose
    attention does not go through transformers' attention interface."""
    from cai.core.errors import ModelError

    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    other = set(getattr(text, "layer_types", None) or ()) - ATTENTION_LAYERS
    if other:
        raise ModelError(f"{model_id} has {', '.join(sorted(other))} layers: the server's engine serves decoders "
                         "whose every layer is attention")
    try:
        lm.set_attn_implementation(register())
    except (ValueError, ImportError, KeyError) as e:
        raise ModelError(f"{model_id} cannot use the server engine's attention: {e}") from None


def register() -> str:
    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)   # forward passes outside a step mask as SDPA's do
    return ATTENTION
