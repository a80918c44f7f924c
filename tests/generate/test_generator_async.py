"""The per-record driver for backends that complete requests one by one (an HTTP fleet): no stage barrier, records
handed over as they finish, the same records whatever the window, finished work kept when the run is stopped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cai.backends.base import Completion, Sampling
from cai.backends.fake import FakeBackend
from cai.generate.generator import AsyncBackend, Generator, MemoryStageCache

from conftest import items_from, make_constitution, prompt_rows


class AsyncFake(FakeBackend):
    """The fake backend's answers, one request at a time on an event loop; ``slow`` prompts answer late."""

    def __init__(self, slow: dict[str, float] | None = None, fail_after: int | None = None):
        super().__init__()
        self.slow = slow or {}
        self.fail_after = fail_after
        self.log: list[tuple[str, str]] = []        # (last user message, stage kind) in the order calls started
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def acomplete(self, messages, sampling, seed):
        kind = "respond" if len(messages) == 1 else messages[-1]["content"].split()[0].lower()
        # the red-team prompt: the conversation's turn before the answer under review (see cai/prompts.py)
        first_user = messages[{"respond": 0, "critique": -3, "revision": -5}[kind]]["content"]
        self.log.append((first_user, kind))
        if self.fail_after is not None and len(self.log) > self.fail_after:
            raise RuntimeError("stopped")                 # the run stops mid-way (a fatal error)
        for word, delay in self.slow.items():
            if word in first_user and kind == "respond":
                await asyncio.sleep(delay)
        return self._one(messages, sampling, seed)


def _plans(gen: Generator, n: int):
    return gen.plan(items_from(prompt_rows(n)))


def test_the_fake_counts_as_an_async_backend():
    assert isinstance(AsyncFake(), AsyncBackend) and not isinstance(FakeBackend(), AsyncBackend)


def test_a_slow_answer_does_not_hold_back_the_other_records():
    backend = AsyncFake(slow={"number 0 ": 0.5})
    gen = Generator(make_constitution(4), backend, rounds=2, sampling=Sampling(max_new_tokens=16))
    batches: list[list[str]] = []
    gen.run_stream(_plans(gen, 4), lambda recs: batches.append([r.prompt_id for r in recs]), window=4)
    finished = [pid for b in batches for pid in b]
    assert sorted(finished) == ["q000", "q001", "q002", "q003"]
    assert finished[-1] == "q000"                      # the slow one finished last ...
    slow_first_critique = next(i for i, (u, k) in enumerate(backend.log) if "number 0 " in u and k == "critique")
    others_last_revise = max(i for i, (u, k) in enumerate(backend.log) if "number 0 " not in u and k == "revision")
    assert others_last_revise < slow_first_critique    # ... and the others went through every stage meanwhile


def test_records_do_not_depend_on_the_window():
    def run(window: int) -> dict[str, dict]:
        gen = Generator(make_constitution(4), AsyncFake(), rounds=2, sampling=Sampling(max_new_tokens=16, seed=3))
        out: dict[str, dict] = {}
        gen.run_stream(_plans(gen, 9), lambda recs: out.update((r.prompt_id, r.to_json()) for r in recs), window=window)
        return out

    one, four = run(1), run(4)
    strip = lambda r: {k: v for k, v in r.items() if k != "provenance"}  # noqa: E731
    assert {k: strip(v) for k, v in one.items()} == {k: strip(v) for k, v in four.items()}


def test_the_async_and_lockstep_drivers_write_the_same_record_shape():
    c, s = make_constitution(4), Sampling(max_new_tokens=16)
    lock = Generator(c, FakeBackend(), rounds=2, sampling=s).run_batch(_plans(Generator(c, FakeBackend(), rounds=2,
                                                                                      sampling=s), 3))
    got: list = []
    gen = Generator(c, AsyncFake(), rounds=2, sampling=s)
    gen.run_stream(_plans(gen, 3), got.extend, window=3)
    assert {r.id for r in got} == {r.id for r in lock}          # same keys
    for ra, rb in zip(sorted(got, key=lambda r: r.id), sorted(lock, key=lambda r: r.id)):
        a, b = ra.to_json(), rb.to_json()
        assert a.keys() == b.keys() and [rd["principle"] for rd in a["rounds"]] == [rd["principle"]
                                                                                  for rd in b["rounds"]]
        assert a["usage"]["completion_tokens"] > 0


def test_a_stopped_run_keeps_its_finished_records_and_stages():
    backend = AsyncFake(fail_after=14)                 # 3 records x 5 stages would be 15 calls
    gen = Generator(make_constitution(4), backend, rounds=2, sampling=Sampling(max_new_tokens=16))
    cache = MemoryStageCache()
    got: list = []
    with pytest.raises(RuntimeError, match="stopped"):
        gen.run_stream(_plans(gen, 3), got.extend, window=1, cache=cache)
    assert len(got) == 2                               # the two finished records were handed over
    assert len(cache.entries) == 14                    # and every finished stage, the third record's included


def test_a_failed_request_drops_only_its_record():
    class FailsOne(AsyncFake):
        async def acomplete(self, messages, sampling, seed):
            if "number 1 " in messages[0]["content"] and len(messages) == 1:
                return Completion("", 0, 0, "error", error="HTTP 500")
            return await super().acomplete(messages, sampling, seed)

    gen = Generator(make_constitution(4), FailsOne(), rounds=1, sampling=Sampling(max_new_tokens=16))
    errors: list[tuple] = []
    got: list = []
    gen.run_stream(_plans(gen, 3), got.extend, window=3, on_error=lambda p, st, r, m: errors.append((p.item.id, st, m)))
    assert sorted(r.prompt_id for r in got) == ["q000", "q002"]
    assert errors == [("q001", "respond", "HTTP 500")]
