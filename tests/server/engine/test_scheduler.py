"""The queue and the life of a request: cancellation (queued or running), the bounded queue, drain, and bad requests
refused before any event."""

from __future__ import annotations

import asyncio

import pytest
from fixtures.engine_fixtures import CONVERSATIONS, ENDLESS, GREEDY, run, wait_until

from cai.core.errors import ContextLengthError
from server.engine import (
    Delta,
    EngineStopped,
    GenParams,
    QueueFull,
    UnknownModel,
)

from conftest import MEDIUM, SHORT

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


# ---------------------------------------------------------------------------------------------------------------
# Cancellation


def test_closing_the_stream_cancels_the_request(make_engine):
    e = make_engine()

    async def main():
        events = e.stream("base", SHORT, ENDLESS)
        first = await events.__anext__()
        assert isinstance(first, Delta)
        await events.aclose()
        return events.handle

    handle = asyncio.run(main())
    done = handle.result(timeout=2)
    assert done.finish_reason == "cancelled"
    assert 0 < done.completion_tokens < ENDLESS.max_tokens
    assert wait_until(lambda: e.in_flight == 0)
    assert run(e, "base", MEDIUM, GenParams(max_tokens=4, temperature=0.0)).finish_reason == "length"


def test_cancelling_the_reading_task_cancels_the_request(make_engine):
    e = make_engine()

    async def main():
        events = e.stream("base", SHORT, ENDLESS)
        started = asyncio.Event()

        async def read():
            async for _ in events:
                started.set()

        task = asyncio.create_task(read())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return events.handle

    assert asyncio.run(main()).result(timeout=2).finish_reason == "cancelled"
    assert wait_until(lambda: e.in_flight == 0)


def test_cancelling_a_queued_request_frees_its_place_at_once(make_engine):
    e = make_engine(start=False, queue_size=1)
    handle = e.submit("base", SHORT, GREEDY)
    assert e.queue_depth == 1
    handle.cancel()
    assert e.queue_depth == 0
    assert handle.result(timeout=0).finish_reason == "cancelled"
    e.submit("base", SHORT, GREEDY)                          # the place is free again


# ---------------------------------------------------------------------------------------------------------------
# The bounded queue


def test_queue_full_is_raised_with_a_retry_estimate(make_engine):
    e = make_engine(start=False, max_batch=1, queue_size=1)
    first = e.submit("base", SHORT, ENDLESS)
    with pytest.raises(QueueFull) as info:
        e.submit("base", MEDIUM, GREEDY)
    assert info.value.retry_after >= 1

    async def from_the_loop():
        with pytest.raises(QueueFull):
            e.stream("base", MEDIUM, GREEDY)                 # raised by the call itself, before any event

    asyncio.run(from_the_loop())
    with pytest.raises(QueueFull):
        e.submit("base", MEDIUM, GREEDY, block=True, timeout=0.05)
    e.start()
    assert wait_until(lambda: e.queue_depth == 0)            # the worker took the first: a place is free
    second = e.submit("base", MEDIUM, GREEDY)
    first.cancel()
    assert second.result(30).finish_reason == "length"


# ---------------------------------------------------------------------------------------------------------------
# Drain


def test_drain_finishes_everything_then_refuses_work(make_engine, reference):
    e = make_engine(max_batch=2, queue_size=8)
    handles = [e.submit("base", c, GREEDY) for c in CONVERSATIONS + CONVERSATIONS[:2]]
    e.drain(timeout=30)
    assert not e.running
    for conv, h in zip(CONVERSATIONS + CONVERSATIONS[:2], handles):
        done = h.result(timeout=0)
        assert done.finish_reason in ("stop", "length")
        assert done.text == reference.greedy(conv, GREEDY.max_tokens)[0]
    with pytest.raises(EngineStopped):
        e.submit("base", SHORT, GREEDY)


def test_drain_with_a_timeout_cancels_what_is_left(make_engine):
    e = make_engine(max_batch=1)
    running = e.submit("base", SHORT, ENDLESS)
    queued = e.submit("base", MEDIUM, ENDLESS)
    assert wait_until(lambda: e.in_flight == 1)
    e.drain(timeout=0.1)
    assert not e.running
    assert running.result(timeout=0).finish_reason == "cancelled"
    assert queued.result(timeout=0).finish_reason == "cancelled"


# ---------------------------------------------------------------------------------------------------------------
# Bad requests fail before any event


def test_a_prompt_tokenized_by_the_caller_is_not_tokenized_again(engine, reference, monkeypatch):
    ids = engine.encode(SHORT)
    monkeypatch.setattr(engine, "encode", lambda messages: pytest.fail("tokenized twice"))
    done = engine.submit("base", SHORT, GREEDY, prompt_ids=ids).result(30)
    assert done.prompt_tokens == len(ids)
    assert (done.text, done.completion_tokens, done.finish_reason) == reference.greedy(SHORT, GREEDY.max_tokens)


def test_unknown_model_and_too_long_prompts_raise_before_any_event(engine):
    with pytest.raises(UnknownModel, match="nope"):
        engine.submit("nope", SHORT, GREEDY)
    assert isinstance(UnknownModel("a", ["b"]), ValueError)
    too_long = GenParams(max_tokens=engine.context_length, temperature=0.0)
    with pytest.raises(ContextLengthError):
        engine.submit("base", SHORT, too_long)

    async def main():
        with pytest.raises(UnknownModel):
            engine.stream("nope", SHORT, GREEDY)
        with pytest.raises(ContextLengthError):
            engine.stream("base", SHORT, too_long)

    asyncio.run(main())
    assert engine.queue_depth == 0
    with pytest.raises(ValueError):
        GenParams(max_tokens=0)
    with pytest.raises(ValueError):
        GenParams(max_tokens=4, top_p=0)
