"""The slot KV cache and chunked prefill on the tiny model: a prompt prefilled in chunks inside a running wave's decode
steps, rows joining and ending without moving any key or value, the cache growing past its first capacity, a
cancelled prefill; greedy tokens equal transformers' ``generate`` throughout, in fp32 and bf16."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fixtures.engine_fixtures import CONVERSATIONS, ENDLESS, GREEDY, TINY, Reference, wait_until

from server.engine import Delta, Engine, GenParams
from server.engine.batch import Batch
from server.engine.slots import Part

from conftest import LONG, MEDIUM, SHORT

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    return {name: Reference(tiny_model_dir, dtype=dtype) for name, dtype in DTYPES.items()}


def _spy_steps(monkeypatch) -> list[tuple[int, int]]:
    """Record (rows decoding, prompt tokens) of every forward pass of every batch."""
    seen: list[tuple[int, int]] = []
    step = Batch.step

    def spy(self, budget):
        decoding = self.decoding
        requests, logits = step(self, budget)
        seen.append((decoding, self.fed - decoding))
        return requests, logits

    monkeypatch.setattr(Batch, "step", spy)
    return seen


def _exact(done, reference, conv, max_tokens):
    assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(conv, max_tokens)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_prompt_joining_a_running_wave_is_prefilled_in_chunks_inside_its_decode_steps(
        make_engine, references, monkeypatch, dtype):
    steps = _spy_steps(monkeypatch)
    e = make_engine(max_batch=4, prefill_chunk=3, dtype=dtype)
    joining_tokens = e.count_tokens(LONG)
    assert joining_tokens > 9

    async def main():
        running = e.stream("base", SHORT, ENDLESS)
        assert isinstance(await running.__anext__(), Delta)        # the long request decodes now
        before = len(steps)
        done = await asyncio.to_thread(e.submit("base", LONG, GREEDY).result, 60)
        assert not running.handle.done
        await running.aclose()
        return done, steps[before:]

    done, during = asyncio.run(main())
    _exact(done, references[dtype], LONG, GREEDY.max_tokens)
    chunks = [p for d, p in during if p]
    # the joining prompt went in 3-token chunks, each in a pass beside the running row (no pass of its own)
    assert sum(chunks) == joining_tokens and max(chunks) == 3 and len(chunks) == -(-joining_tokens // 3)
    assert all(d >= 1 for d, p in during if p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_joining_and_ending_reuse_slots_and_move_no_key_or_value(make_engine, references, dtype):
    e = make_engine(start=False, max_batch=2, dtype=dtype)
    convs = CONVERSATIONS + [MEDIUM, SHORT]
    params = [GenParams(max_tokens=n, temperature=0.0) for n in (5, 17, 9, 24, 3, 11)]
    handles = [e.submit("base", c, p) for c, p in zip(convs, params)]
    e.start()
    assert wait_until(lambda: e._cache is not None, 30)
    buffers = [t.data_ptr() for t in e._cache.keys + e._cache.values]
    results = [h.result(60) for h in handles]
    for conv, p, done in zip(convs, params, results):
        _exact(done, references[dtype], conv, p.max_tokens)
    assert max(e.batch_sizes) == 2 and e._cache.slots == 2        # six requests through two slots
    assert [t.data_ptr() for t in e._cache.keys + e._cache.values] == buffers   # nothing reallocated or copied


def test_the_cache_doubles_when_a_row_outgrows_it_and_tokens_stay_exact(make_engine, reference, monkeypatch):
    monkeypatch.setattr(Engine, "INITIAL_CAPACITY", 8)
    e = make_engine(start=False, max_batch=4)
    handles = [e.submit("base", c, GREEDY) for c in CONVERSATIONS]
    e.start()
    results = [h.result(60) for h in handles]
    for conv, done in zip(CONVERSATIONS, results):
        _exact(done, reference, conv, GREEDY.max_tokens)
    need = max(e.count_tokens(c) for c in CONVERSATIONS) + GREEDY.max_tokens
    assert need <= e._cache.capacity < 2 * need and e._cache.capacity % 8 == 0


def test_a_request_cancelled_during_its_chunked_prefill_ends_and_frees_its_slot(make_engine, reference):
    e = make_engine(max_batch=2, prefill_chunk=1)

    async def main():
        running = e.stream("base", SHORT, ENDLESS)
        assert isinstance(await running.__anext__(), Delta)
        joining = e.submit("base", LONG, GREEDY)           # one prompt token a step: many steps of prefill
        joining.cancel()
        done = await asyncio.to_thread(joining.result, 30)
        assert done.finish_reason == "cancelled" and done.completion_tokens == 0
        after = await asyncio.to_thread(e.submit("base", TINY, GREEDY).result, 30)   # the slot is free again
        await running.aclose()
        return after

    _exact(asyncio.run(main()), reference, TINY, GREEDY.max_tokens)


def test_masks_see_the_rows_own_columns_only_and_honour_a_sliding_window():
    part = Part(first=0, tokens=3, rows=2, width=2, length=5, start=torch.tensor([3, 0]), count=torch.tensor([1, 2]),
                dest=torch.tensor([0, 2, 3]), index=torch.tensor([4, 1]))
    mask = part.mask(None)[:, 0].int().tolist()
    assert mask == [[[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]],       # row 0: one query at column 3; then padding
                    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]]       # row 1: columns 0 and 1, causal
    windowed = part.mask(2)[:, 0].int().tolist()
    assert windowed[0][0] == [0, 0, 1, 1, 0] and windowed[1][1] == [1, 1, 0, 0, 0]


def test_a_wave_of_many_prompts_larger_than_a_step_is_prefilled_over_several_steps(make_engine, reference,
                                                                                    monkeypatch):
    steps = _spy_steps(monkeypatch)
    monkeypatch.setattr(Engine, "MAX_STEP_TOKENS", 16)
    e = make_engine(start=False, max_batch=4)
    handles = [e.submit("base", c, GREEDY) for c in CONVERSATIONS]
    e.start()
    for conv, h in zip(CONVERSATIONS, handles):
        _exact(h.result(60), reference, conv, GREEDY.max_tokens)
    assert steps[0] == (0, 16)                       # no row decodes yet: the step takes its most, 16 tokens
    assert sum(p for _, p in steps) == sum(e.count_tokens(c) for c in CONVERSATIONS)
