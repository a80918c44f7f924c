"""Weight-only 4-bit linear layers for decoding on a CPU (``cai serve --quantize int4``).

Why. A decode step of one row reads every weight once and does little else with it. On this project's 2-core CPU
torch's bf16 matrix-vector product ran at ~8 GB/s, a quarter of what the memory gives (fp32 reached ~19 GB/s), so a
decode step of the default model cost ~40 ms; torch's int4 kernel (``_weight_int4pack_mm_for_cpu``: bf16 activations,
4-bit weights in groups of 32 inputs, each group with a bf16 scale and zero) reads a quarter of the bytes and did the
same product 4-5× faster (``bench/decode.py``).

Format. ``w ≈ (q - 8) · scale + zero`` with ``q`` in 0..15, one (scale, zero) per group of 32 inputs of an output
row, rounded to nearest between the group's minimum (q = 0) and maximum (q = 15). The default model comes from a GGUF
Q4_1 file whose blocks have exactly this shape (32 weights, ``d · q + m``, q = 0 at the block's minimum and 15 at its
maximum), so its layers come back with the integers the file holds, the scale and zero rounded to bf16 (the bf16
model rounds every weight instead). Any other model loses what 4 bits lose: check it on your own prompts.

Where. The int4 product's cost grows with the rows it is given (at 16 rows it was slower than bf16's, at 64 four times
slower), so a layer takes the 4-bit path for inputs of at most :data:`ROWS` rows (decode steps of a few rows) and its
bf16 weight, which it keeps, for wider ones (prefills, a batch of many rows). A layer is an ``nn.Linear`` still (PEFT
wraps it like any other, so LoRA adapters serve on it unchanged); its 4-bit copy is a pair of non-persistent buffers
that ``state_dict`` leaves out.
"""

from __future__ import annotations

from typing import Any

import torch

from cai.core.errors import ModelError

GROUP = 32     # inputs per (scale, zero) group; the layer's inputs must be a multiple of it
ROWS = 4       # inputs of at most this many rows take the 4-bit path, wider ones the bf16 weight


class Int4Linear(torch.nn.Linear):
    """An ``nn.Linear`` (bf16 weight) that also holds its weight in 4 bits and uses that for narrow inputs."""

    int4_weight: torch.Tensor    # [out, in / 2] uint8: the packed 4-bit integers (torch's CPU int4 layout)
    int4_scales: torch.Tensor    # [in / GROUP, out, 2] bf16: each group's scale and zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > ROWS * self.in_features:
            return super().forward(x)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.int4_weight, GROUP,
                                                         self.int4_scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def fits(layer: torch.nn.Linear) -> bool:
    """Whether torch's int4 kernel takes this layer's shape (inputs in whole groups, outputs a multiple of 16)."""
    return layer.in_features % GROUP == 0 and layer.out_features % 16 == 0


def _groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [out, in] int32 in 0..15, scale and zero [out, in / GROUP] as the kernel holds them, bf16): rounded to
    nearest between each group's minimum and maximum, computed in fp32 whatever the weight's dtype."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale.to(torch.bfloat16), (low + 8 * scale).to(torch.bfloat16)


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [out, in] -> (packed 4-bit integers [out, in / 2] uint8, scales and zeros [in / GROUP, out, 2] bf16),
    torch's CPU int4 layout."""
    q, scale, zero = _groups(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] fp32 that the 4-bit path computes with for this weight (for checks and tests)."""
    q, scale, zero = _groups(weight)
    n, k = q.shape
    w = (q.reshape(n, k // GROUP, GROUP).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(n, k)


def quantize_int4(lm: Any, *, lm_head: bool = True) -> int:
    """Give every linear layer of ``lm`` that fits a 4-bit copy (in place; the bf16 weights stay). ``lm_head``: the
    output layer too. Returns how many layers were converted; a ModelError when the model cannot take it (not bf16,
    not on the CPU, no layer fits)."""
    param = next(lm.parameters())
    if param.device.type != "cpu":
        raise ModelError(f"--quantize int4 is for serving on a CPU (torch's int4 CPU kernel); the model is on "
                         f"{param.device}", hint="On a GPU, serve in bfloat16 without --quantize.")
    if param.dtype != torch.bfloat16:
        raise ModelError(f"--quantize int4 computes in bfloat16 (its kernel takes bf16 activations); the model is "
                         f"{str(param.dtype).removeprefix('torch.')}", hint="Use --dtype bfloat16 or auto.")
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    converted = 0
    for module in list(lm.modules()):
        if type(module) is not torch.nn.Linear or not fits(module) or (module is head and not lm_head):
            continue
        packed, scales = pack(module.weight)
        module.__class__ = Int4Linear
        module.register_buffer("int4_weight", packed, persistent=False)
        module.register_buffer("int4_scales", scales, persistent=False)
        converted += 1
    if not converted:
        raise ModelError("--quantize int4: no linear layer of this model fits torch's int4 kernel (inputs a multiple "
                         f"of {GROUP}, outputs a multiple of 16)")
    return converted
