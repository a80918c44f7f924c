"""A key/value cache layer that grows in place, for the local backend's ``generate`` calls.

transformers' ``DynamicLayer`` appends each step's keys/values with ``torch.cat``: every decode step copies the whole
cache of every layer. With 16 rows of a few hundred columns each on the default model that is ~0.3 GB of memory
traffic per generated token, and it grows with the length (on a 2-core CPU, the bench's 16-row fp32 steps went from
136 to 119 ms in the critique stage and from 165 to 143 ms in the revise stage without it). A
:class:`GrowingLayer` keeps a buffer with room to spare and writes each step's columns into it; ``keys``/``values``
are views of its filled part, so a step copies only its own new columns. :func:`reserve` makes room for a whole
call before it starts (prompt and ``max_new_tokens``), so the buffer is allocated once a call; past the reserve it
grows by half again.

Everything that assigns ``layer.keys`` (cropping, selecting or repeating rows, :mod:`cai.inference.continuation`)
keeps working: the assigned tensor becomes the buffer, full, and the next update makes room.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of buffers filled in place."""

    def __init__(self, **kwargs):
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        self._rows: int | None = None   # only the first rows take part in steps (None: all); see activate
        super().__init__(**kwargs)

    def _filled(self, buf: torch.Tensor | None) -> torch.Tensor | None:
        """The part of a buffer steps see: the active rows, the filled columns."""
        if buf is None or buf.dim() < 2:   # none yet, or transformers' empty placeholder
            return buf
        return buf[:self._rows, ..., :self._n, :]

    @property
    def keys(self) -> torch.Tensor | None:
        return self._filled(self._k)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._n = 0 if value is None or value.dim() < 2 else value.shape[-2]
        self._rows = None

    @property
    def values(self) -> torch.Tensor | None:
        return self._filled(self._v)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    @property
    def capacity(self) -> int:
        return 0 if self._k is None or self._k.dim() < 2 else self._k.shape[-2]

    def make_room(self, columns: int) -> None:
        """Room for ``columns`` more columns without another allocation (a no-op before the first update, which
        allocates at least ``self.spare`` columns)."""
        if self._k is None or self._k.dim() < 2 or self._n + columns <= self.capacity:
            return
        self._k, self._v = (_grown(t, self._n, self._n + columns) for t in (self._k, self._v))  # type: ignore[arg-type]

    spare = 0   # columns the first update allocates at least (set by reserve)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self._k is None or self._k.dim() < 2:
            self.device = key_states.device
            self.is_initialized = True
            self._n = 0
            self._k, self._v = (_grown(t, 0, max(t.shape[-2], self.spare)) for t in (key_states, value_states))
        n, k = self._n, key_states.shape[-2]
        if n + k > self.capacity:
            cap = max(n + k, self.capacity + self.capacity // 2)
            self._k, self._v = (_grown(t, n, cap) for t in (self._k, self._v))  # type: ignore[arg-type]
        self._k[:self._rows, ..., n:n + k, :] = key_states
        self._v[:self._rows, ..., n:n + k, :] = value_states   # type: ignore[index]
        self._n = n + k
        return self.keys, self.values


    def swap_rows(self, i: int, j: int) -> None:
        for buf in (self._k, self._v):
            if buf is not None and buf.dim() >= 2:
                row = buf[i, ..., :self._n, :].clone()
                buf[i, ..., :self._n, :] = buf[j, ..., :self._n, :]
                buf[j, ..., :self._n, :] = row


def _grown(t: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    """A buffer of ``capacity`` columns holding ``t``'s first ``filled`` columns, zeros after them (a row that left
    a batch early keeps zeros in the columns written after it left: finite, and masked)."""
    shape = list(t.shape)
    shape[-2] = capacity
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out[..., :filled, :] = t[..., :filled, :]
    return out


def growing(cache: Any) -> Any:
    """``cache`` with each of its plain ``DynamicLayer`` layers (full attention: sliding-window and other layer
    kinds are left alone) replaced by a :class:`GrowingLayer` holding the same keys/values."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            new = GrowingLayer()
            if layer.is_initialized and layer.keys is not None and layer.keys.dim() >= 2:
                new.keys, new.values = layer.keys, layer.values
                new.device, new.is_initialized = layer.device, True
            cache.layers[i] = new
    return cache


def reserve(cache: Any, columns: int) -> None:
    """Room in every growing layer of ``cache`` for ``columns`` more columns: allocated now where the layer holds
    keys already, at its first update otherwise."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.spare = columns
            layer.make_room(columns)


def activate(cache: Any, rows: int | None) -> None:
    """Steps on ``cache`` take its first ``rows`` rows only (None: all of them again); the others keep what they
    hold."""
    for layer in cache.layers:
        layer._rows = rows


def swap_rows(cache: Any, i: int, j: int) -> None:
    """Rows ``i`` and ``j`` of every layer of ``cache`` exchanged (their filled columns)."""
    for layer in cache.layers:
        layer.swap_rows(i, j)
