"""Streamed text: deltas that concatenate to the text, partial UTF-8 characters held back, stop strings (held back
until decided, cutting the text before them), and max_tokens."""

from __future__ import annotations

import asyncio

import torch
from fixtures.engine_fixtures import CONVERSATIONS, GREEDY, collect, run

from server.engine import (
    Engine,
    GenParams,
)
from server.engine.request import Request as _Request

from conftest import MEDIUM

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


# ---------------------------------------------------------------------------------------------------------------
# Streaming text and usage


def test_deltas_concatenate_to_the_text_and_usage_is_counted(engine, reference):
    async def main():
        return [await collect(engine.stream("base", c, GREEDY)) for c in CONVERSATIONS]

    for conv, (deltas, done) in zip(CONVERSATIONS, asyncio.run(main())):
        assert all(deltas)                                       # no empty delta
        assert "".join(deltas) == done.text
        assert done.prompt_tokens == engine.count_tokens(conv)
        text, tokens, _ = reference.greedy(conv, GREEDY.max_tokens)
        assert done.text == text and done.completion_tokens == tokens


def _feed(engine: Engine, token_ids: list[int], params: GenParams) -> tuple[list[str], str | None, str]:
    """Push tokens through the engine's per-token text handling, as the worker does; (deltas, reason, text)."""
    events: list = []
    request = _Request("base", [1], params, torch.Generator(), events.append)
    reason = None
    for token in token_ids:
        reason = engine._on_token(request, token)
        if reason:
            break
    return [e.text for e in events], reason, request.text


def test_partial_utf8_characters_are_held_back(engine):
    text = "é€😀 naïve"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) - 3                 # the tokenizer splits these characters into several tokens
    deltas, reason, _ = _feed(engine, ids, GenParams(max_tokens=len(ids), temperature=0.0))
    assert reason == "length"
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)   # never a half character on the wire


def test_stop_strings_hold_back_text_until_decided(engine):
    ids = engine.tokenizer("Hello world, hello moon", add_special_tokens=False)["input_ids"]
    deltas, reason, _ = _feed(engine, ids, GenParams(max_tokens=100, stop=("o moon", "wor")))
    assert reason == "stop"
    assert "".join(deltas) == "Hello "              # the earliest stop string wins; its start was never sent
    deltas, reason, _ = _feed(engine, ids, GenParams(max_tokens=100, stop=("o moon",)))
    assert "".join(deltas) == "Hello world, hell" and reason == "stop"
    deltas, reason, _ = _feed(engine, ids + [engine.eos_ids[0]], GenParams(max_tokens=100, stop=("xyzzy",)))
    assert "".join(deltas) == "Hello world, hello moon" and reason == "stop"   # held-back text flushed at the end


# ---------------------------------------------------------------------------------------------------------------
# max_tokens and stop strings end a request


def test_max_tokens_ends_with_length(engine, reference):
    done = run(engine, "base", MEDIUM, GenParams(max_tokens=5, temperature=0.0))
    assert done.finish_reason == "length" and done.completion_tokens == 5
    assert done.text == reference.greedy(MEDIUM, 5)[0]


def test_a_stop_string_cuts_the_text_before_it(engine, reference):
    full, _, _ = reference.greedy(MEDIUM, 40)
    stop = full[12:15]
    assert stop and full.index(stop) >= 1

    async def main():
        return await collect(engine.stream("base", MEDIUM, GenParams(max_tokens=40, temperature=0.0, stop=(stop,))))

    deltas, done = asyncio.run(main())
    assert done.finish_reason == "stop"
    assert done.text == full[:full.index(stop)]
    assert "".join(deltas) == done.text                      # nothing of the stop string, or after it, was streamed
    assert done.completion_tokens < 40
