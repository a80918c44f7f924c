"""The engine on a CUDA GPU (marked ``gpu``: skipped unless run with ``-m gpu`` on a machine with one; CI has none, so
``bench/gpu.sh`` runs these with the GPU benchmarks). Greedy tokens equal transformers' ``generate`` on the same
device, in fp32 and bf16, batched; the compiled decode step gives the eager engine's tokens there too."""

from __future__ import annotations

import pytest
import torch
from fixtures.engine_fixtures import CONVERSATIONS, Reference

from server.engine import Engine, GenParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

pytest_plugins = ["fixtures.engine_fixtures"]


def _answers(engine: Engine, lengths=(24, 31, 38, 45)):
    handles = [engine.submit("base", conv, GenParams(max_tokens=n, temperature=0.0))
               for conv, n in zip(CONVERSATIONS, lengths)]
    return [h.result(120) for h in handles]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_on_cuda_gives_generate_tokens(make_engine, tiny_model_dir, dtype):
    engine = make_engine(device="cuda", dtype=dtype, max_batch=8)
    assert engine.device.startswith("cuda") and engine.dtype == dtype
    reference = Reference(tiny_model_dir, dtype=getattr(torch, dtype))
    reference.lm.to("cuda")
    for conv, n, done in zip(CONVERSATIONS, (24, 31, 38, 45), _answers(engine)):
        assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(conv, n)


def test_the_compiled_decode_step_on_cuda_gives_the_eager_tokens(make_engine):
    compiled = make_engine(device="cuda", dtype="float32", max_batch=8, compile=True)
    eager = make_engine(device="cuda", dtype="float32", max_batch=8)
    assert compiled.compiled == ["base"]
    assert [d.text for d in _answers(compiled)] == [d.text for d in _answers(eager)]
