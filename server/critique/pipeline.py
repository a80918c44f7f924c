"""The critique→revise pipeline, shared by ``/v1/critique``, ``/v1/revise`` and the chat extension.

One implementation of the stages. Critique and revise prompts always come from :mod:`cai.core.prompts` and run through
:class:`cai.generate.generator.Generator` over the backend of the pipeline's :class:`Source`: the engine's
(:class:`~server.engine.EngineBackend`), or in gateway mode the upstream's (``server.gateway.backend``, an
OpenAI-compatible ``AsyncBackend``). Either way the Generator's own driver runs (``run_stream``: lockstep over the
engine, per record over the upstream), so a record from ``/v1/revise`` is the record ``cai generate`` would write for
the same conversation, constitution, sampling and model (``--backend local`` in the same dtype: ``cai serve
--dtype auto`` is bf16 on a CPU with bf16 in hardware, ``cai generate`` fp32; ``--backend openai`` for the gateway).
An answer that already exists (the ``response`` of ``/v1/revise``, or the chat answer of the ``constitution``
extension) is handed to the Generator through a :class:`~cai.generate.generator.MemoryStageCache` pre-seeded under
the respond stage's key: the Generator finds its first stage answered and goes on with the rounds, with no second
code path.

Blocking work (a Generator run that waits on the engine) runs in a worker thread, never on the event loop; an
``AsyncBackend`` (the upstream) is awaited on the loop itself. A caller that goes away cancels its asyncio task, and
the pipeline running in the thread is stopped through :meth:`EngineBackend.cancel` (the upstream's requests are
cancelled with the task).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cai.backends.base import Backend, Completion, Sampling
from cai.core.constitution import Constitution
from cai.core.prompt_files import PromptItem, item_from_row
from cai.core.prompts import Message, respond_messages
from cai.core.record import Record
from cai.generate.generator import AsyncBackend, Generator, MemoryStageCache, Plan, record_key, stage_key
from server.constitutions import ConstitutionRegistry
from server.engine import Engine, EngineBackend, UnknownModel
from server.errors import ContextTooLong, GenerationFailed, InvalidRequest, NotFound


class Source(Protocol):
    """Where the pipeline's generation happens: the models it has, and a backend over one of them."""

    @property
    def base_name(self) -> str: ...            # the model a request that names none gets

    @property
    def model_names(self) -> list[str]: ...

    def check_admission(self) -> None:
        """Raise what a busy or stopped source would (QueueFull, EngineStopped), before a multi-stage job starts."""

    def backend(self, model: str) -> Backend: ...


class EngineSource:
    """The engine as the pipeline's source: a fresh :class:`EngineBackend` per request (it holds its cancel)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def base_name(self) -> str:
        return self.engine.base_name

    @property
    def model_names(self) -> list[str]:
        return self.engine.model_names

    def check_admission(self) -> None:
        self.engine.check_admission()

    def backend(self, model: str) -> Backend:
        return EngineBackend(self.engine, model)


@dataclass(frozen=True)
class Revision:
    """The critique→revise settings of a request (the chat extension, /v1/revise)."""

    constitution: Constitution
    principles: tuple[str, ...] | None     # one per round; None: drawn per prompt, as `cai generate` draws them
    rounds: int


class Pipeline:
    """What the critique routes and the chat extension share: the checks of a constitution, its principles and a
    conversation against what this server has, and one record's run through the Generator."""

    def __init__(self, source: Source, registry: ConstitutionRegistry):
        self.source = source
        self.registry = registry

    # -- checks ------------------------------------------------------------------------------------------------

    def backend(self, model: str) -> Backend:
        if model not in self.source.model_names:
            raise UnknownModel(model, self.source.model_names)
        return self.source.backend(model)

    def constitution(self, name: str | None) -> Constitution:
        """The constitution named, or the only one (or ``default``) when none is named."""
        if name is None:
            names = self.registry.names()
            if "default" in names:
                name = "default"
            elif len(names) == 1:
                name = names[0]
            else:
                raise InvalidRequest(f"name a constitution: this server has {', '.join(names)}", "constitution")
        try:
            c = self.registry.get(name)
        except KeyError:
            raise NotFound(f"unknown constitution {name!r}; this server has: {', '.join(self.registry.names())}",
                           "constitution", "constitution_not_found") from None
        if not c.principles:
            raise InvalidRequest(f"constitution {name!r} has only preference principles (for labelling): it cannot "
                                 "critique or revise", "constitution", "no_principles")
        return c

    def principles(self, c: Constitution, ids: list[str]) -> tuple[str, ...]:
        unknown = [i for i in dict.fromkeys(ids) if i not in c.ids]
        if unknown:
            raise InvalidRequest(f"unknown principle{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(map(repr, unknown))} in constitution {c.name!r}; it has: "
                                 f"{', '.join(c.ids)}", "principles", "principle_not_found")
        return tuple(ids)

    def revision(self, name: str | None, principles: list[str] | None, rounds: int | None) -> Revision:
        c = self.constitution(name)
        ids = self.principles(c, principles) if principles else None
        if ids is not None and rounds is not None and len(ids) != rounds:
            raise InvalidRequest(f"{len(ids)} principles for {rounds} rounds: give one per round, or leave "
                                 "'rounds' out", "rounds")
        return Revision(c, ids, len(ids) if ids is not None else (rounds or 1))

    def item(self, messages: list[Message]) -> PromptItem:
        """The conversation as the pipeline takes it (and as a prompt file row would be read: same checks, same
        content-hash id)."""
        try:
            return item_from_row({"messages": messages}, "request")
        except ValueError as e:
            raise InvalidRequest(f"for critique and revision, {e}", "messages") from None

    def plan(self, item: PromptItem, revision: Revision, backend: Backend, sampling: Sampling) -> Plan:
        gen = Generator(revision.constitution, backend, rounds=revision.rounds, sampling=sampling)
        if revision.principles is None:
            return gen.plan([item])[0]
        return Plan(item, revision.principles,
                    record_key(item, revision.constitution, revision.principles, backend, sampling))

    def check_context(self, revision: Revision, backend: Backend, plan: Plan, sampling: Sampling) -> None:
        """Refuse a conversation whose stages would not fit the model's context, before any of them runs."""
        gen = Generator(revision.constitution, backend, rounds=revision.rounds, sampling=sampling)
        issues, _ = gen.context_issues([plan])
        if issues:
            issue = next(iter(issues.values()))
            raise ContextTooLong(issue.message.replace(f"prompt {plan.item.id!r}", "the conversation"))

    # -- running -----------------------------------------------------------------------------------------------

    async def record(self, backend: Backend, item: PromptItem, revision: Revision, sampling: Sampling,
                     answer: Completion | None) -> Record:
        """One record through cai.generate.generator.Generator. A given ``answer`` pre-seeds the stage cache under
        the respond stage's key, so the Generator takes it as its first stage's output."""
        gen = Generator(revision.constitution, backend, rounds=revision.rounds, sampling=sampling)
        plan = self.plan(item, revision, backend, sampling)
        cache = MemoryStageCache()
        if answer is not None:
            cache.put([(stage_key(backend, sampling, respond_messages(item.messages)), "respond", answer)])
        records: list[Record] = []
        failures: list[str] = []

        def on_error(_plan: Plan, stage: str, rnd: int, message: str) -> None:
            failures.append(f"{stage} (round {rnd}): {message}")

        if isinstance(backend, AsyncBackend):      # the upstream: on this loop, cancelled with this task
            await gen.run_async([plan], records.extend, window=1, on_error=on_error, cache=cache)
        else:                                      # the engine: blocking, in a thread
            await self.in_thread(backend, gen.run_stream, [plan], records.extend, window=1, on_error=on_error,
                                 cache=cache)
        if not records:
            if getattr(backend, "cancelled", False):
                raise asyncio.CancelledError()
            raise GenerationFailed("; ".join(failures) or "the pipeline produced no record")
        return records[0]

    async def generate(self, backend: Backend, batch: list[list[Message]], sampling: Sampling,
                       seed: int) -> list[Completion]:
        """One backend call over a batch (row i seeded ``seed + i``), on the loop or in a thread as ``record``."""
        if isinstance(backend, AsyncBackend):
            return await gather_all([backend.acomplete(m, sampling, seed + i) for i, m in enumerate(batch)])
        return await self.in_thread(backend, backend.generate, batch, sampling, seed)

    async def in_thread(self, backend: Backend, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run blocking pipeline work in a thread; if the caller goes away, stop it through the backend."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except asyncio.CancelledError:
            cancel = getattr(backend, "cancel", None)
            if cancel is not None:
                cancel()
            raise


async def gather_all(work: list) -> list:
    """Await every coroutine concurrently; if one fails (or the caller is cancelled), cancel the others rather than
    leave them running for nobody."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
