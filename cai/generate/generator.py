"""The critique→revise engine.

For each prompt: the model answers; then, for each of ``rounds`` rounds, a principle is drawn (seeded, a fresh one
each round while unused ones remain), the model critiques its current answer against it and revises the answer. Every
stage runs over a whole batch of prompts in one backend call. Output checks flag answers that are empty, echo the
prompt or the request, are cut off, or come back unchanged; flagged records are kept, with their flags.

Stage cache: every call's output can be kept under a key of what produced it (model, sampling settings, seed, the
exact messages). ``run_batch`` asks the cache first and sends only the misses to the backend, so after a principle
edit the stages before the first round that drew it (and every stage of a record that never drew it) come back from
the cache; only that round and the rounds after it are generated again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from collections.abc import Generator as Gen
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from cai import __version__
from cai.backends.base import Backend, Completion, Sampling
from cai.core.constitution import Constitution
from cai.core.errors import Issue
from cai.core.prompt_files import PromptItem
from cai.core.prompts import PROMPT_FORMAT, Message, critique_messages, frame_sha256, respond_messages, revise_messages
from cai.core.record import Record, Round
from cai.generate.checks import check_output
from cai.generate.planner import Plan, batch_seed, draw_principles, record_key, stage_key, stage_seed


@dataclass(frozen=True)
class StageEvent:
    """Reported after every stage over a batch (one backend call, unless the cache answered every row)."""

    stage: str                # "respond", "critique" or "revise"
    round: int                # 0 for respond, else 1-based round
    items: int                # rows of the stage, called or cached
    prompt_tokens: int        # of the rows sent to the backend
    completion_tokens: int
    seconds: float
    cached: int = 0           # rows answered by the stage cache (not sent)


class StageCache(Protocol):
    def get(self, key: str) -> Completion | None: ...

    def put(self, entries: list[tuple[str, str, Completion]]) -> None:
        """(key, stage, completion) of calls that succeeded."""
        ...


@runtime_checkable
class AsyncBackend(Protocol):
    """A backend that completes one request at a time, concurrently (the openai backend)."""

    def run(self, coro: Coroutine) -> Any:
        """Run a coroutine on the backend's own event loop, from a plain thread; return its result."""
        ...

    async def acomplete(self, messages: list[Message], sampling: Sampling, seed: int) -> Completion: ...


class MemoryStageCache:
    def __init__(self) -> None:
        self.entries: dict[str, Completion] = {}

    def get(self, key: str) -> Completion | None:
        return self.entries.get(key)

    def put(self, entries: list[tuple[str, str, Completion]]) -> None:
        self.entries.update((k, c) for k, _, c in entries if c.error is None)


@dataclass(frozen=True)
class Estimate:
    """What generating one record would take, from the stage cache and the prompts alone (nothing is called)."""

    calls: int
    cached: int
    prompt_tokens: int        # exact for a stage whose inputs are known; earlier outputs assumed ``assumed`` tokens
    completion_tokens: int    # ``assumed`` tokens per call


# ---------------------------------------------------------------------------------------------------------------
# The generator


class Generator:
    """``backend`` answers; ``critic`` (default: the same model, as in the paper) critiques and revises, as when a
    strong model teaches a small one."""

    def __init__(self, constitution: Constitution, backend: Backend, *, rounds: int = 1,
                 sampling: Sampling | None = None, critic: Backend | None = None):
        if rounds < 0:
            raise ValueError(f"rounds must be at least 0, got {rounds}")
        self.constitution = constitution
        self.backend = backend
        self.critic = critic if critic is not None and critic is not backend else None
        self.rounds = rounds
        self.sampling = sampling or Sampling()

    def backend_for(self, stage: str) -> Backend:
        """Who makes a stage: the answer is the policy's, critiques and revisions the critic's."""
        return self.critic if self.critic is not None and stage != "respond" else self.backend

    def plan(self, items: list[PromptItem]) -> list[Plan]:
        plans = []
        for item in items:
            principles = draw_principles(self.constitution, item.id, self.sampling.seed, self.rounds)
            plans.append(Plan(item, principles, record_key(item, self.constitution, principles, self.backend,
                                                           self.sampling, critic=self.critic)))
        return plans

    def context_issues(self, plans: list[Plan]) -> tuple[dict[str, Issue], dict[str, int]]:
        """Prompts that may not fit the model's context, by a worst-case bound: the longest stage (revise) with the
        answer and the critique each at max_new_tokens, plus the revision's own max_new_tokens. Also returns each
        prompt's own token count (used to batch prompts of similar length together). Both are keyed by prompt id."""
        ctx = self.backend.context_length
        m = self.sampling.max_new_tokens
        issues: dict[str, Issue] = {}
        sizes: dict[str, int] = {}
        for plan in plans:
            own = self.backend.count_tokens(respond_messages(plan.item.messages))
            sizes[plan.item.id] = own
            if not ctx:
                continue
            frame = max((self.backend.count_tokens(revise_messages(
                self.constitution, plan.item.messages, "", self.constitution.principle(p), ""))
                for p in set(plan.principles)), default=own)
            need = frame + (3 * m if plan.principles else m)
            if own + m > ctx or need > ctx:
                file, _, line = plan.item.source.rpartition(":")
                issues[plan.item.id] = Issue(
                    f"prompt {plan.item.id!r} needs up to {need} tokens ({frame} of prompt, exemplars and "
                    f"requests + answer, critique and revision of up to {m} each); the model's context is {ctx}",
                    file or None, int(line) if line.isdigit() else None)
        return issues, sizes

    def _chain(self, plan: Plan) -> Gen[tuple[str, int, list[Message]], Completion, Record]:
        """One record's stages, in order: yields (stage, round, messages) for each model call and receives its
        completion; returns the record. Both drivers below run this, so the stages exist once."""
        c, convo = self.constitution, plan.item.messages
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        def count(comp: Completion) -> Completion:
            usage["prompt_tokens"] += comp.prompt_tokens          # a record's usage counts cached stages too
            usage["completion_tokens"] += comp.completion_tokens
            return comp

        first = count((yield "respond", 0, respond_messages(convo)))
        initial_flags = check_output(first, [plan.item.last_user])
        answer = first.text
        rounds: list[Round] = []
        for r, pid in enumerate(plan.principles, start=1):
            pr = c.principle(pid)
            cr = count((yield "critique", r, critique_messages(c, convo, answer, pr)))
            rv = count((yield "revise", r, revise_messages(c, convo, answer, pr, cr.text)))
            # critique problems are kept on the round, prefixed; the revision's own flags reach the record
            flags = ["critique_" + f for f in check_output(cr, [pr.critique])]
            flags += check_output(rv, [pr.revision, pr.critique, cr.text, plan.item.last_user], previous=answer)
            rounds.append(Round(principle=pr.id, principle_sha256=pr.sha256, critique=cr.text, revision=rv.text,
                                flags=flags))
            answer = rv.text
        return self._record(plan, first.text, initial_flags, rounds, usage)

    def run_batch(self, plans: list[Plan], on_stage: Callable[[StageEvent], None] | None = None,
                  on_error: Callable[[Plan, str, int, str], None] | None = None,
                  cache: StageCache | None = None) -> list[Record]:
        """Generate the records of a batch of prompts in lockstep: each stage is one backend call over the rows of
        the batch that ``cache`` cannot answer. A prompt whose request failed for good at some stage
        (``Completion.error``) is dropped from the later stages and reported through ``on_error(plan, stage,
        round, message)``; it has no record."""
        s = self.sampling
        bseed = batch_seed(s.seed, plans)
        chains = {i: self._chain(p) for i, p in enumerate(plans)}
        asks = {i: next(g) for i, g in chains.items()}
        records: dict[int, Record] = {}
        while asks:
            stage, rnd, _ = next(iter(asks.values()))    # every chain has the same stages: they move together
            t0 = time.perf_counter()
            backend = self.backend_for(stage)
            keys = {i: stage_key(backend, s, m) for i, (_, _, m) in asks.items()} if cache is not None else {}
            results = {i: hit for i in keys if (hit := cache.get(keys[i])) is not None}  # type: ignore[union-attr]
            send = [i for i in asks if i not in results]
            out: list[Completion] = []
            if send:
                out = backend.generate([asks[i][2] for i in send], s,
                                            seed=(bseed + 1000 * rnd + len(stage)) % (2 ** 31))
                if len(out) != len(send):
                    raise RuntimeError(f"backend returned {len(out)} completions for {len(send)} conversations")
                results.update(zip(send, out))
                if cache is not None:
                    cache.put([(keys[i], stage, comp) for i, comp in zip(send, out) if comp.error is None])
            if on_stage:
                on_stage(StageEvent(stage, rnd, len(asks), sum(o.prompt_tokens for o in out),
                                    sum(o.completion_tokens for o in out), time.perf_counter() - t0,
                                    cached=len(asks) - len(send)))
            asks = {}
            for i, comp in sorted(results.items()):
                if comp.error is not None:
                    chains[i].close()
                    if on_error:
                        on_error(plans[i], stage, rnd, comp.error)
                    continue
                try:
                    asks[i] = chains[i].send(comp)
                except StopIteration as done:
                    records[i] = done.value
        return [records[i] for i in sorted(records)]

    def run_stream(self, plans: list[Plan], on_records: Callable[[list[Record]], None], *, window: int,
                   on_stage: Callable[[StageEvent], None] | None = None,
                   on_error: Callable[[Plan, str, int, str], None] | None = None,
                   cache: StageCache | None = None) -> None:
        """Generate every plan, handing finished records to ``on_records`` as they come.

        A backend that completes requests one by one (``AsyncBackend``: an HTTP fleet) runs each record's stages on
        its own, ``window`` records at a time: a record moves to its next stage as soon as its answer is back, so no
        stage waits for the slowest request of a batch and every endpoint stays busy. Other backends (the local
        model) run ``window`` records at a time in lockstep through ``run_batch``, one batched call per stage."""
        if isinstance(self.backend, AsyncBackend) and self.critic is None:
            self.backend.run(self._stream_async(plans, on_records, window, on_stage, on_error, cache))
            return
        for start in range(0, len(plans), window):
            on_records(self.run_batch(plans[start:start + window], on_stage, on_error, cache))

    async def run_async(self, plans: list[Plan], on_records: Callable[[list[Record]], None], *, window: int,
                        on_stage: Callable[[StageEvent], None] | None = None,
                        on_error: Callable[[Plan, str, int, str], None] | None = None,
                        cache: StageCache | None = None) -> None:
        """:meth:`run_stream`'s driver for an ``AsyncBackend``, awaited on the caller's own event loop (the backend's
        ``acomplete`` runs there): what ``cai serve --upstream`` runs, so its records are ``run_stream``'s. Cancelling
        the awaiting task cancels every request in flight."""
        await self._stream_async(plans, on_records, window, on_stage, on_error, cache)

    async def _stream_async(self, plans, on_records, window, on_stage, on_error, cache) -> None:
        import asyncio

        s, backend = self.sampling, self.backend
        pending_records: list[Record] = []
        pending_cache: list[tuple[str, str, Completion]] = []
        flush_every = max(1, min(32, window // 4))

        def flush() -> None:
            if cache is not None and pending_cache:
                cache.put(pending_cache[:])
                pending_cache.clear()
            if pending_records:
                on_records(pending_records[:])
                pending_records.clear()

        async def drive(plan: Plan) -> None:
            chain = self._chain(plan)
            stage, rnd, messages = next(chain)
            while True:
                t0 = time.perf_counter()
                key = stage_key(backend, s, messages) if cache is not None else ""
                comp = cache.get(key) if cache is not None else None
                cached = comp is not None
                if comp is None:
                    seed = stage_seed(s.seed, plan, stage, rnd)
                    comp = await backend.acomplete(messages, s, seed % (2 ** 31))  # type: ignore[attr-defined]
                    if comp.error is None and cache is not None:
                        pending_cache.append((key, stage, comp))
                if on_stage:
                    on_stage(StageEvent(stage, rnd, 1, 0 if cached else comp.prompt_tokens,
                                        0 if cached else comp.completion_tokens, time.perf_counter() - t0,
                                        cached=int(cached)))
                if comp.error is not None:
                    chain.close()
                    if on_error:
                        on_error(plan, stage, rnd, comp.error)
                    return
                try:
                    stage, rnd, messages = chain.send(comp)
                except StopIteration as done:
                    pending_records.append(done.value)
                    if len(pending_records) >= flush_every:
                        flush()
                    return

        slots = asyncio.Semaphore(window)
        tasks: list[asyncio.Task] = []

        async def run_one(plan: Plan) -> None:
            try:
                await drive(plan)
            finally:
                slots.release()

        try:
            for plan in plans:
                await slots.acquire()
                for t in tasks:                    # a fatal error (wrong key) stops the run at once
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                tasks.append(asyncio.create_task(run_one(plan)))
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            flush()                                # finished records and stages are kept whatever happened

    def estimate(self, plan: Plan, cache: StageCache, assumed: int) -> Estimate:
        """Walk one record's stages through the cache without calling anything: stages whose inputs are known and
        cached cost nothing; from the first miss on, every stage is a call. A call's prompt is counted exactly
        where its inputs are known, else with each unknown earlier output taken as ``assumed`` tokens."""
        c, s, convo = self.constitution, self.sampling, plan.item.messages
        calls = cached = prompt_tokens = 0
        answer: str | None = None       # None once an output is unknown (it would be generated)
        critique: str | None = None

        def step(stage: str, messages: list[Message], unknown: int) -> str | None:
            nonlocal calls, cached, prompt_tokens
            if not unknown:
                hit = cache.get(stage_key(self.backend_for(stage), s, messages))
                if hit is not None:
                    cached += 1
                    return hit.text
            calls += 1
            prompt_tokens += self.backend_for(stage).count_tokens(messages) + unknown * assumed
            return None

        answer = step("respond", respond_messages(convo), 0)
        for pid in plan.principles:
            pr = c.principle(pid)
            critique = step("critique", critique_messages(c, convo, answer or "", pr), int(answer is None))
            answer = step("revise", revise_messages(c, convo, answer or "", pr, critique or ""),
                          int(answer is None) + int(critique is None))
        return Estimate(calls, cached, prompt_tokens, calls * assumed)

    def _record(self, plan: Plan, initial: str, initial_flags: list[str], rounds: list[Round],
                usage: dict) -> Record:
        c = self.constitution
        # record-level flags: problems in the texts that become training data (the initial answer, each revision)
        flags: list[str] = []
        for f in initial_flags + [f for r in rounds for f in r.flags if not f.startswith("critique_")]:
            if f not in flags:
                flags.append(f)
        return Record.model_validate({
            "id": plan.key,
            "prompt_id": plan.item.id,
            "category": plan.item.category,
            "messages": plan.item.messages,
            "initial": initial,
            "initial_flags": initial_flags,
            "rounds": rounds,
            "final": rounds[-1].revision if rounds else initial,
            "flags": flags,
            "usage": usage,
            "provenance": {
                "constitution": {"name": c.name, "version": c.version, "sha256": c.sha256},
                "principle_sha256": {p: c.principle(p).sha256 for p in dict.fromkeys(plan.principles)},
                "frame_sha256": frame_sha256(c),
                "prompt_format": PROMPT_FORMAT,
                "model": self.backend.model,
                "model_revision": self.backend.model_revision,
                "backend": self.backend.name,
                **_dtype_field(self.backend),
                **_critic_field(self.critic),
                "sampling": self.sampling.to_dict(),
                "seed": self.sampling.seed,
                "rounds": self.rounds,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "cai_version": __version__,
            },
        })


def _dtype_field(backend: Backend) -> dict[str, str]:
    """``{"dtype": ...}`` for a backend that computes in a known dtype (a local model), else nothing."""
    dtype = getattr(backend, "dtype", None)
    return {"dtype": str(dtype)} if dtype else {}


def _critic_field(critic: Backend | None) -> dict[str, dict]:
    """``{"critic": ...}`` when another model critiqued and revised (lineage), else nothing."""
    if critic is None:
        return {}
    return {"critic": {"model": critic.model, "revision": critic.model_revision, "backend": critic.name}}
