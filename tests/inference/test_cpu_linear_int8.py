"""8-bit copies of the weights for serving on a CPU (``cai serve --quantize int8``, ``cai/inference/cpu_linear.py``):
each output row rounded against its own scale; eagerly a narrow input takes the 8-bit path and a wide one the bf16
weight's exact product; inside a compiled graph of ``--compile max-autotune`` every row count takes the 8-bit path
(eager steps outside it still do not); the engine serves with them, giving what ``generate`` gives on the same
layers; models that cannot take 8 bits are refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from fixtures.engine_fixtures import CONVERSATIONS, Reference, needs_compiler

from cai.core.errors import ModelError
from cai.inference.cpu_linear import ROWS, CpuLinear, int8_in_graphs, pack_int8, quantize_int8
from server.engine import GenParams

from conftest import LONG, MEDIUM

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine


def _layer(n_in: int = 64, n_out: int = 48, bias: bool = True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=bias)).to(torch.bfloat16)


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (the 8-bit weight, dequantized)ᵀ + bias, in fp32."""
    q, scale = pack_int8(weight)
    out = x.float() @ (q.float() * scale.float()[:, None]).t()
    return out if bias is None else out + bias.float()


def test_each_output_is_rounded_against_its_own_scale():
    torch.manual_seed(3)
    w = torch.randn(40, 96) * torch.logspace(-3, 0, 40)[:, None]    # outputs of very different magnitudes
    w[7] = 0                                                          # and one all-zero output
    q, scale = pack_int8(w)
    assert q.dtype == torch.int8 and q.shape == (40, 96) and scale.dtype == torch.bfloat16 and scale.shape == (40,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (q.float() * scale.float()[:, None] - w).abs()
    assert torch.all(err <= scale.float()[:, None] * 0.5 + 1e-7)     # nearest of the row's own steps
    assert torch.all(q[7] == 0) and torch.isfinite(scale).all()
    rows = torch.tensor([i for i in range(40) if i != 7])
    big = w[rows].abs().argmax(1)
    assert torch.all(q[rows, big].abs() >= 126)                       # each row's largest weight near the top
    half = w.to(torch.bfloat16)                                       # bf16 weights: rounded in fp32 as well
    assert torch.equal(pack_int8(half)[0], pack_int8(half.float())[0])


def test_narrow_inputs_take_the_8_bit_weights_and_wide_ones_the_bf16_weights():
    model = _layer()
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert quantize_int8(model) == 1
    layer = model[0]
    assert isinstance(layer, CpuLinear) and isinstance(layer, torch.nn.Linear)   # PEFT wraps it as a Linear
    narrow = torch.randn(1, 3, 64, dtype=torch.bfloat16)                          # 3 rows <= ROWS
    got = layer(narrow)
    assert got.shape == (1, 3, 48) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _product(narrow, weight, bias), atol=2e-2, rtol=1e-2)
    assert not torch.equal(got, torch.nn.functional.linear(narrow, weight, bias))  # ... the 8-bit weight, not bf16
    wide = torch.randn(ROWS + 1, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(wide), torch.nn.functional.linear(wide, weight, bias))
    assert int8_in_graphs(model) == 1 and layer.int8_in_graphs
    assert torch.equal(layer(wide), torch.nn.functional.linear(wide, weight, bias))   # eagerly: still bf16
    assert sorted(model.state_dict()) == ["0.bias", "0.weight"]                      # the 8-bit copy is not saved


def test_inside_a_compiled_graph_every_row_count_takes_the_8_bit_weights_when_told_to():
    model = _layer(n_in=96, n_out=64)
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    quantize_int8(model)
    wide = torch.randn(16, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch._dynamo.reset()
        plain = torch.compile(model)(wide)                  # not told: the bf16 weight's product, as eagerly
        torch.testing.assert_close(plain.float(), torch.nn.functional.linear(wide, weight, bias).float(),
                                   atol=1e-2, rtol=1e-2)
        int8_in_graphs(model)
        torch._dynamo.reset()
        eight = torch.compile(model)(wide)
    torch.testing.assert_close(eight.float(), _product(wide, weight, bias), atol=2e-2, rtol=1e-2)
    far = (eight.float() - torch.nn.functional.linear(wide.float(), weight.float(), bias.float())).abs().max()
    near = (plain.float() - torch.nn.functional.linear(wide.float(), weight.float(), bias.float())).abs().max()
    assert far > near                                       # ... it is the 8-bit weight's product
    int8_in_graphs(model, False)
    assert not model[0].int8_in_graphs


def test_models_that_cannot_take_8_bit_weights_are_refused():
    with pytest.raises(ModelError, match=r"--quantize int8 computes in bfloat16.*float32") as caught:
        quantize_int8(_layer().float())
    assert "--dtype bfloat16" in caught.value.hint


def test_the_engine_serves_8_bit_weights_as_generate_does_on_the_same_layers(make_engine, tiny_model_dir,
                                                                             monkeypatch):
    e = make_engine(quantize="int8")
    assert e.quantize == "int8" and e.dtype == "bfloat16"        # auto dtype: bf16, which the kernel takes
    paths: list[str] = []
    forward = CpuLinear.forward
    monkeypatch.setattr(CpuLinear, "forward",
                        lambda self, x: paths.append("int8" if x.numel() <= ROWS * self.in_features else "bf16")
                        or forward(self, x))
    reference = Reference(tiny_model_dir, dtype=torch.bfloat16, int8=True)
    for conv in (MEDIUM, LONG):
        done = e.submit("base", conv, GenParams(max_tokens=24, temperature=0.0)).result(60)
        assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(conv, 24)
    assert "int8" in paths and "bf16" in paths            # decode steps read 8 bits, prefills the bf16 weights
    with pytest.raises(ModelError, match="--quantize int8 computes in bfloat16"):
        make_engine(quantize="int8", dtype="float32", start=False)


@needs_compiler
def test_a_max_autotune_engine_takes_8_bits_at_every_row_count_in_its_graphs(make_engine):
    e = make_engine(max_batch=8, compile="max-autotune", quantize="int8")
    layers = [m for m in e._lm.modules() if isinstance(m, CpuLinear)]
    assert layers and all(m.int8_weight is not None and m.int8_in_graphs for m in layers)
    eager = make_engine(max_batch=8, quantize="int8")
    assert not any(m.int8_in_graphs for m in eager._lm.modules() if isinstance(m, CpuLinear))
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for rows in (1, 8):                                     # one row, and wider than the eager 8-bit limit
        asks = [(CONVERSATIONS[i % len(CONVERSATIONS)], 12 + i) for i in range(rows)]
        handles = [e.submit("base", conv, GenParams(max_tokens=n, temperature=0.0)) for conv, n in asks]
        done = [h.result(300) for h in handles]
        assert [d.completion_tokens <= n for d, (_, n) in zip(done, asks)] == [True] * rows
        assert all(d.completion_tokens > 0 and d.finish_reason in ("stop", "length") for d in done)
    assert counters["stats"]["unique_graphs"] == before     # compiled before serving, 8-bit graphs and all
