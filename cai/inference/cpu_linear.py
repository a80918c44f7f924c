"""Linear layers for serving on a CPU: oneDNN's prepacked bf16 weights (the same products, faster), and 4-bit copies
for decoding (``cai serve --quantize int4``).

Why. A decode step reads every weight once and does little else with it, so the matrix products' speed is the step's.
On this project's 2-core CPU (a Xeon with AMX, in a VM):

- torch's bf16 ``F.linear`` hands oneDNN the weight in its plain layout, which oneDNN reorders into its blocked one
  on every call: a 576×1536 product took ~150–190 µs at 1 to 16 rows. With the weight reordered once, ahead
  (``mkldnn._reorder_linear_weight``, then ``mkldnn._linear_pointwise``: what Inductor's freezing does), the same
  product took ~95 µs, and gave the same bits at every row count tried (1 to 300): :func:`prepack`, used whenever
  the server runs bf16 on a CPU whose oneDNN has bf16.
- torch's int4 kernel (``_weight_int4pack_mm_for_cpu``: bf16 activations, 4-bit weights in groups of 32 inputs, each
  group with a bf16 scale and zero) reads a quarter of the bytes: ~43 µs for that product at one row. Its cost grows
  with the rows (at 16 rows it was slower than bf16, at 64 four times slower), so a layer takes the 4-bit path for
  inputs of at most :data:`ROWS` rows (decode steps of a few rows) and its bf16 weight for wider ones (prefills,
  batches of many rows): :func:`quantize_int4`.

The 4-bit format. ``w ≈ (q - 8) · scale + zero`` with ``q`` in 0..15, one (scale, zero) per group of 32 inputs of an
output row, rounded to nearest between the group's minimum (q = 0) and maximum (q = 15). The default model comes from
a GGUF Q4_1 file whose blocks have exactly this shape (32 weights, ``d · q + m``, q = 0 at the block's minimum and 15
at its maximum), so its layers come back with the integers the file holds (tested against the file), the scale and
zero rounded to bf16 (the bf16 model rounds every weight instead). Any other model loses what 4 bits lose: check it
on your own prompts.

A converted layer is a :class:`CpuLinear`, an ``nn.Linear`` still (PEFT wraps it like any other, so LoRA adapters
serve on it unchanged), whose bf16 weight stays (adapters, state_dict, the tied embedding); the packed and 4-bit
copies are non-persistent buffers that ``state_dict`` leaves out. The packed copy doubles the weights' memory.
"""

from __future__ import annotations

from typing import Any

import torch

from cai.core.errors import ModelError

GROUP = 32     # inputs per (scale, zero) group of the 4-bit weights; a layer's inputs must be a multiple of it
ROWS = 4       # inputs of at most this many rows take the 4-bit path, wider ones the bf16 weight
PACK_ROWS = 16  # the rows oneDNN's blocked layout is chosen for (at 1 to 64 rows it did as well as any other hint)


@torch.library.custom_op("cai::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
                  ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight in oneDNN's blocked layout. An operator of its own so that
    ``torch.compile`` calls it as it is (Inductor lowers oneDNN's op only for weights it froze itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class CpuLinear(torch.nn.Linear):
    """An ``nn.Linear`` (bf16 weight) that may also hold its weight prepacked for oneDNN and in 4 bits."""

    packed: torch.Tensor | None        # the weight in oneDNN's blocked layout (an opaque mkldnn tensor)
    int4_weight: torch.Tensor | None   # [out, in / 2] uint8: the 4-bit integers (torch's CPU int4 layout)
    int4_scales: torch.Tensor | None   # [in / GROUP, out, 2] bf16: each group's scale and zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4_weight is not None and x.numel() <= ROWS * self.in_features:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.int4_weight,
                                                             GROUP, self.int4_scales)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias, self.out_features)
        return super().forward(x)


def _linears(lm: Any) -> list[torch.nn.Linear]:
    """The model's linear layers, before any adapter wraps them (plain or already converted)."""
    return [m for m in lm.modules() if type(m) in (torch.nn.Linear, CpuLinear)]


def _convert(module: torch.nn.Linear) -> CpuLinear:
    """The layer as a :class:`CpuLinear` (in place), with no copy yet."""
    if type(module) is not CpuLinear:
        module.__class__ = CpuLinear
        for name in ("packed", "int4_weight", "int4_scales"):
            module.register_buffer(name, None, persistent=False)
    return module  # type: ignore[return-value]


def can_prepack(lm: Any) -> bool:
    """Whether :func:`prepack` applies: bf16 weights on a CPU whose oneDNN computes bf16."""
    param = next(lm.parameters())
    return (param.device.type == "cpu" and param.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack(lm: Any) -> int:
    """Give every linear layer of ``lm`` its weight prepacked for oneDNN (in place; the bf16 weights stay), when
    :func:`can_prepack`. Returns how many layers were packed (0 when it does not apply)."""
    if not can_prepack(lm):
        return 0
    layers = _linears(lm)
    for module in layers:
        layer = _convert(module)
        layer.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS),
                              persistent=False)
    return len(layers)


def fits_int4(layer: torch.nn.Linear) -> bool:
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


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    for module in _linears(lm):
        if not fits_int4(module) or (module is head and not lm_head):
            continue
        packed, scales = pack_int4(module.weight)
        layer = _convert(module)
        layer.register_buffer("int4_weight", packed, persistent=False)
        layer.register_buffer("int4_scales", scales, persistent=False)
        converted += 1
    if not converted:
        raise ModelError("--quantize int4: no linear layer of this model fits torch's int4 kernel (inputs a multiple "
                         f"of {GROUP}, outputs a multiple of 16)")
    return converted
