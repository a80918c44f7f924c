"""The worker's failures: a failing wave ends its requests with an error and the worker goes on; a dead worker is
reported and refuses work."""

from __future__ import annotations

import pytest
from fixtures.engine_fixtures import GREEDY, run, wait_until

from cai.backends.base import Sampling
from server.engine import (
    EngineBackend,
    EngineStopped,
)

from conftest import MEDIUM, SHORT

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


class _Broken:
    """A model whose forward pass fails (like a CUDA out-of-memory error would)."""

    def __call__(self, **kwargs):
        raise RuntimeError("simulated out of memory")


def test_a_failing_wave_ends_its_requests_with_an_error_and_the_worker_goes_on(make_engine, monkeypatch):
    e = make_engine()
    working = e._model
    monkeypatch.setattr(e, "_model", _Broken())
    done = run(e, "base", SHORT, GREEDY)
    assert done.finish_reason == "error" and "simulated out of memory" in done.error
    failed = EngineBackend(e).generate([SHORT, MEDIUM], Sampling(max_new_tokens=4), seed=0)
    assert [c.finish_reason for c in failed] == ["error", "error"] and all(c.error for c in failed)
    assert e.error is None and e.in_flight == 0
    monkeypatch.setattr(e, "_model", working)
    assert run(e, "base", SHORT, GREEDY).finish_reason == "length"


def test_a_dead_worker_is_reported_and_refuses_work(make_engine, monkeypatch):
    e = make_engine(start=False)

    def explode(*args, **kwargs):
        raise RuntimeError("worker bug")

    monkeypatch.setattr(e, "_take", explode)
    pending = e.submit("base", SHORT, GREEDY)
    e.start()
    done = pending.result(timeout=5)
    assert done.finish_reason == "error" and "worker bug" in done.error
    assert wait_until(lambda: not e.running)
    assert "worker bug" in e.error
    with pytest.raises(EngineStopped):
        e.submit("base", SHORT, GREEDY)
