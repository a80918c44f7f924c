"""The running batch on the tiny model: greedy output equal to transformers' ``generate``, alone, in a wave of
different lengths, over the cached template head, for a request that joins a running wave, and in bf16."""

from __future__ import annotations

import asyncio

import torch
from fixtures.engine_fixtures import CONVERSATIONS, ENDLESS, GREEDY, Reference, run, wait_until

from server.engine import (
    Delta,
    Engine,
    GenParams,
)

from conftest import MEDIUM, SHORT

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


# ---------------------------------------------------------------------------------------------------------------
# Greedy decoding equals generate, alone and in a wave


def test_greedy_alone_equals_hf_generate(engine, reference):
    for conv in CONVERSATIONS:
        done = run(engine, "base", conv, GREEDY)
        text, tokens, reason = reference.greedy(conv, GREEDY.max_tokens)
        assert (done.text, done.completion_tokens, done.finish_reason) == (text, tokens, reason)


def test_a_bf16_engine_decodes_like_generate_in_bf16(make_engine, tiny_model_dir):
    # `cai serve --dtype auto` picks bf16 on a CPU with bf16 in hardware: that path is the same decode loop
    e = make_engine(dtype="bfloat16", max_batch=8)
    assert e.dtype == "bfloat16" and next(e._lm.parameters()).dtype == torch.bfloat16
    reference = Reference(tiny_model_dir, dtype=torch.bfloat16)
    for conv in CONVERSATIONS:
        done = run(e, "base", conv, GREEDY)
        assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(conv, GREEDY.max_tokens)


def test_greedy_in_a_wave_of_four_different_lengths_equals_hf_generate(make_engine, reference):
    e = make_engine(start=False, max_batch=8)
    lengths = {e.count_tokens(c) for c in CONVERSATIONS}
    assert len(lengths) == 4                        # four different prompt lengths share the wave
    # one of the rows samples and another has a stop string: the greedy rows must not care
    params = [GREEDY, GenParams(max_tokens=24, temperature=1.0, seed=3), GREEDY,
              GenParams(max_tokens=24, temperature=0.0, stop=("zzz-never",))]
    handles = [e.submit("base", c, p) for c, p in zip(CONVERSATIONS, params)]
    e.start()                                       # all four wait: the first wave takes them together
    results = [h.result(30) for h in handles]
    sizes = e.batch_sizes
    assert sizes[4] >= 1 and max(sizes) == 4        # the prefill (at least) ran the four rows in one pass
    for i in (0, 2, 3):
        text, tokens, reason = reference.greedy(CONVERSATIONS[i], 24)
        assert (results[i].text, results[i].completion_tokens, results[i].finish_reason) == (text, tokens, reason)


def test_the_template_head_computed_once_changes_no_token(make_engine, reference, monkeypatch):
    # the tiny chat template's head ("<|im_start|>user\n") is shorter than the default minimum: allow it here
    monkeypatch.setattr(Engine, "MIN_HEAD", 1)
    e = make_engine(start=False, max_batch=8)
    convs = [c for c in CONVERSATIONS if tuple(e.encode(c)[:len(e.head)]) == e.head]
    assert e.head and len(convs) >= 3
    handles = [e.submit("base", c, GREEDY) for c in convs]
    e.start()
    results = [h.result(30) for h in handles]
    assert e.head_rows == len(convs)                 # every row's prefill reused the head
    for conv, done in zip(convs, results):
        text, tokens, reason = reference.greedy(conv, GREEDY.max_tokens)
        assert (done.text, done.completion_tokens, done.finish_reason) == (text, tokens, reason)
    # and a wave joined later reuses the same head cache
    later = run(e, "base", convs[0], GREEDY)
    assert later.text == results[0].text and e.head_rows == len(convs) + 1


def test_a_request_admitted_into_a_running_wave_is_still_exact(make_engine, reference):
    e = make_engine(max_batch=4)

    async def main():
        long_events = e.stream("base", SHORT, ENDLESS)
        first = await long_events.__anext__()                   # the long request is decoding now
        assert isinstance(first, Delta)
        joining = e.submit("base", MEDIUM, GREEDY)
        done = await asyncio.to_thread(joining.result, 30)
        assert not long_events.handle.done                       # it joined the running wave: no wait for the end
        await long_events.aclose()
        return done

    done = asyncio.run(main())
    text, tokens, reason = reference.greedy(MEDIUM, GREEDY.max_tokens)
    assert (done.text, done.completion_tokens, done.finish_reason) == (text, tokens, reason)
    assert e.batch_sizes[2] >= 1


def test_without_continuous_batching_a_new_request_waits_for_the_wave(make_engine):
    e = make_engine(max_batch=4, continuous=False)
    first = e.submit("base", SHORT, GenParams(max_tokens=300, temperature=0.0))
    assert wait_until(lambda: e.in_flight == 1)
    second = e.submit("base", MEDIUM, GenParams(max_tokens=4, temperature=0.0))
    second.result(30)
    assert first.done and first.result().finish_reason == "length"
    assert max(e.batch_sizes) == 1
