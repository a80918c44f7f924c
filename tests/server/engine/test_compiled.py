"""The compiled decode step (``Engine(compile=True)``, ``cai serve --compile``) on the tiny model: every decode
step goes through it, one row or many, with the prompt chunks of requests joining a running wave, and gives
transformers' ``generate`` tokens in fp32 (past the cache's first capacity too, and with ``max-autotune``'s frozen
weights and timed kernels) and the eager engine's tokens in bf16; nothing compiles while it serves; adapters get
graphs of their own, 4-bit layers one each side of their row limit; a step that cannot compile, or an unknown mode,
is a clear model error before anything is served."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fixtures.engine_fixtures import CONVERSATIONS, ENDLESS, GREEDY, Reference, lora_adapter, needs_compiler

from cai.core.errors import ModelError
from server.engine import Engine, GenParams
from server.engine.compiled import CompiledDecode

from conftest import LONG, MEDIUM, SHORT

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _spy(monkeypatch) -> list[int]:
    """Rows of every compiled step."""
    rows: list[int] = []
    step = CompiledDecode.step

    def spy(self, tokens, slots, columns, keep=None):
        rows.append(len(tokens))
        return step(self, tokens, slots, columns, keep)

    monkeypatch.setattr(CompiledDecode, "step", spy)
    return rows


def _answers(engine: Engine, model: str = "base", lengths=(24, 31, 38, 45)):
    """Every conversation at once (rows of a wave decoding together, ending at different steps)."""
    asks = [(conv, n) for conv, n in zip(CONVERSATIONS, lengths)]
    handles = [engine.submit(model, conv, GenParams(max_tokens=n, temperature=0.0)) for conv, n in asks]
    return asks, [h.result(120) for h in handles]


@needs_compiler
def test_compiled_decode_steps_give_generate_tokens_in_fp32(make_engine, reference, monkeypatch):
    e = make_engine(max_batch=8, compile=True)
    assert e.compiled == ["base"]
    rows = _spy(monkeypatch)
    before = _graphs()
    asks, done = _answers(e)
    for (conv, n), d in zip(asks, done):
        assert (d.text, d.completion_tokens, d.finish_reason) == reference.greedy(conv, n)
    # one request alone, past the cache's first capacity (256 columns: the cache grows under the graph)
    long = e.submit("base", SHORT, GenParams(max_tokens=300, temperature=0.0)).result(120)
    assert (long.text, long.completion_tokens, long.finish_reason) == reference.greedy(SHORT, 300)
    assert 1 in rows and len(CONVERSATIONS) in rows          # one row and many went through the graphs
    assert _graphs() == before                              # ... compiled before serving, never while


@needs_compiler
def test_prompts_joining_a_compiled_wave_are_prefilled_through_the_graph(make_engine, reference, monkeypatch):
    e = make_engine(max_batch=4, prefill_chunk=5, compile=True)
    steps: list[tuple[int, int]] = []              # (tokens, logits kept) of every compiled step
    step = CompiledDecode.step

    def spy(self, tokens, slots, columns, keep=None):
        steps.append((len(tokens), len(tokens) if keep is None else len(keep)))
        return step(self, tokens, slots, columns, keep)

    monkeypatch.setattr(CompiledDecode, "step", spy)
    before = _graphs()

    async def main():
        running = e.stream("base", SHORT, ENDLESS)
        await running.__anext__()                   # it decodes now: the next prompts join its wave
        handles = [e.submit("base", conv, GREEDY) for conv in (LONG, MEDIUM)]
        done = [await asyncio.to_thread(h.result, 60) for h in handles]
        await running.aclose()
        return done

    for conv, d in zip((LONG, MEDIUM), asyncio.run(main())):
        assert (d.text, d.completion_tokens, d.finish_reason) == reference.greedy(conv, GREEDY.max_tokens)
    # steps that took prompt chunks (more tokens than logits) beside the decoding rows went through the graphs
    assert any(tokens > kept for tokens, kept in steps)
    assert _graphs() == before


def _other_model(model_dir, out):
    """The tiny model with other weights (its first MLP scaled by -3)."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, out)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in lm.model.layers[0].mlp.parameters():
            p.mul_(-3)
    lm.save_pretrained(out)
    return out


@needs_compiler
def test_max_autotune_engines_each_compute_with_their_own_weights(make_engine, tiny_model_dir, tmp_path, reference):
    # max-autotune freezes the weights into its graphs as constants: an engine must never run graphs compiled for
    # another model of the same shapes (Dynamo's guards compare objects by id, which a freed model's successor may
    # reuse). One slot, so few graphs each: they compile in seconds here.
    other = _other_model(tiny_model_dir, tmp_path / "other")
    answers = {}
    for name, model_dir in (("tiny", tiny_model_dir), ("other", other)):
        e = Engine(str(model_dir), device="cpu", max_batch=1, compile="max-autotune")
        assert (e.compile_mode, e.compiled) == ("max-autotune", ["base"])
        e.start()
        before = _graphs()
        answers[name] = e.submit("base", MEDIUM, GREEDY).result(60).text
        assert _graphs() == before                          # compiled before serving
        e.drain(timeout=5)
        del e                                               # freed: the next engine may take its objects' ids
    assert answers["tiny"] == reference.greedy(MEDIUM, GREEDY.max_tokens)[0]
    assert answers["other"] == Reference(other).greedy(MEDIUM, GREEDY.max_tokens)[0] != answers["tiny"]


@needs_compiler
def test_compiled_decode_steps_give_the_eager_tokens_in_bf16(make_engine, tiny_model_dir):
    compiled = make_engine(max_batch=8, compile=True, dtype="bfloat16")
    eager = make_engine(max_batch=8, dtype="bfloat16")
    _, a = _answers(compiled)
    _, b = _answers(eager)
    assert [(d.text, d.completion_tokens) for d in a] == [(d.text, d.completion_tokens) for d in b]
    one = compiled.submit("base", MEDIUM, GenParams(max_tokens=120, temperature=0.0)).result(120)
    assert (one.text, one.completion_tokens, one.finish_reason) == \
        Reference(tiny_model_dir, dtype=torch.bfloat16).greedy(MEDIUM, 120)


@needs_compiler
def test_each_adapter_has_its_own_compiled_graphs(make_engine, tiny_model_dir, tmp_path, reference):
    adapter = lora_adapter(tiny_model_dir, tmp_path / "sft", 1)
    e = make_engine(start=False, adapters={"sft": str(adapter)}, compile=True)
    assert e.compiled == ["base", "sft"]
    before = _graphs()
    order = [("base", MEDIUM), ("sft", MEDIUM), ("sft", LONG), ("base", LONG)]
    handles = [e.submit(name, conv, GREEDY) for name, conv in order]
    e.start()
    texts = [h.result(60).text for h in handles]
    refs = {"base": reference, "sft": Reference(tiny_model_dir, adapter)}
    for (name, conv), text in zip(order, texts):
        assert text == refs[name].greedy(conv, GREEDY.max_tokens)[0], name
    assert texts[0] != texts[1]                             # the adapter's graph is not the base's
    assert _graphs() == before


@needs_compiler
def test_4_bit_layers_get_a_graph_each_side_of_their_row_limit(make_engine):
    compiled = make_engine(max_batch=8, compile=True, quantize="int4")
    eager = make_engine(max_batch=8, quantize="int4")
    before = _graphs()
    for rows in (1, 3, 8):                                  # the 4-bit path (<= 4 rows), then the bf16 weights
        asks = [(CONVERSATIONS[i % len(CONVERSATIONS)], 20 + i) for i in range(rows)]
        for engine, out in ((compiled, a := []), (eager, b := [])):
            handles = [engine.submit("base", conv, GenParams(max_tokens=n, temperature=0.0)) for conv, n in asks]
            out += [h.result(120).text for h in handles]
        assert a == b, rows
    assert _graphs() == before


def test_a_step_that_cannot_compile_is_a_model_error_before_serving(tiny_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")

    monkeypatch.setattr(CompiledDecode, "_forward", broken)
    with pytest.raises(ModelError, match=r"--compile: the decode step of 'base' did not compile: .*C\+\+ compiler") \
            as caught:
        Engine(str(tiny_model_dir), device="cpu", compile=True)
    assert "without --compile" in caught.value.hint
    with pytest.raises(ModelError, match="unknown compile mode 'fastest': one of default, max-autotune"):
        Engine(str(tiny_model_dir), device="cpu", compile="fastest")
