"""EngineBackend: the cai Backend protocol over the engine, driving the critique pipeline."""

from __future__ import annotations

import pytest
from fixtures.engine_fixtures import TINY, run

from cai.backends.base import Sampling
from cai.core.errors import ContextLengthError
from cai.generate.generator import Generator
from server.engine import (
    EngineBackend,
    GenParams,
)

from conftest import LONG, MEDIUM, SHORT, items_from, make_constitution, prompt_rows

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


def test_engine_backend_returns_completions_in_order(make_engine):
    e = make_engine(queue_size=2)                            # smaller than the batch: generate waits for room
    backend = EngineBackend(e)
    assert (backend.name, backend.model, backend.context_length) == ("server", e.model_id, e.context_length)
    batch = [SHORT, LONG, MEDIUM, TINY]
    greedy = backend.generate(batch, Sampling(temperature=0.0, max_new_tokens=8), seed=0)
    assert [c.text for c in greedy] == [run(e, "base", conv, GenParams(8, 0.0)).text.strip() for conv in batch]
    assert [c.prompt_tokens for c in greedy] == [e.count_tokens(conv) for conv in batch]
    sampled = backend.generate(batch, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8), seed=100)
    assert [c.text for c in sampled] == [
        run(e, "base", conv, GenParams(8, 1.0, 0.9, seed=100 + i)).text.strip() for i, conv in enumerate(batch)]
    with pytest.raises(ContextLengthError):
        backend.generate([SHORT, LONG], Sampling(max_new_tokens=e.context_length), seed=0)
    assert e.queue_depth == 0 and e.in_flight == 0           # nothing of the refused batch was queued


def test_engine_backend_drives_the_critique_pipeline(make_engine):
    e = make_engine()
    backend = EngineBackend(e)
    gen = Generator(make_constitution(3), backend, rounds=1, sampling=Sampling(temperature=0.0, max_new_tokens=8))
    records = gen.run_batch(gen.plan(items_from(prompt_rows(3))))
    assert [r.prompt_id for r in records] == ["q000", "q001", "q002"]
    for r in records:
        assert len(r.rounds) == 1
        assert r.provenance.backend == "server" and r.provenance.model == e.model_id
        assert r.usage["completion_tokens"] > 0
