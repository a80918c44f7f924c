"""cai's :class:`~cai.backends.base.Backend` over the upstream: what the pipeline's Generator runs on in gateway mode.

It is an ``AsyncBackend`` (``acomplete`` on the app's loop, ``run`` for a caller in a worker thread), so the pipeline
awaits the Generator's per-record driver on the loop, as ``cai generate --backend openai`` runs it on the openai
backend's. Each stage's request is that backend's very request (``OpenAIBackend.request``: the same body, seeds from
the same ``stage_seed``), provenance says ``backend: "openai"`` and the upstream's model name, and tokens are counted
with its estimate (4 characters a token, against ``--context-length`` when given): a ``/v1/revise`` record through
the gateway is the record ``cai generate --backend openai --model NAME`` writes for the same conversation,
constitution, sampling and upstream (its ``created_at`` aside).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from cai.backends.base import Completion, Sampling
from cai.core.prompts import Message

if TYPE_CHECKING:
    from server.gateway.upstream import Upstream


class UpstreamBackend:
    name = "openai"                     # as the openai backend's records say

    def __init__(self, upstream: Upstream):
        self.upstream = upstream
        self.model = upstream.model     # the upstream's name for the model, as `cai generate --model` gives it
        self.model_revision: str | None = None
        self.context_length = upstream.context_length

    def count_tokens(self, messages: list[Message]) -> int:
        return self.upstream.client.count_tokens(messages)

    async def acomplete(self, messages: list[Message], sampling: Sampling, seed: int) -> Completion:
        """One stage; raises UpstreamError when it fails for good (the pipeline stops at once with its status)."""
        return await self.upstream.request(messages, sampling, seed)

    async def agenerate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        from server.critique.pipeline import gather_all

        return await gather_all([self.acomplete(m, sampling, seed + i) for i, m in enumerate(batch)])

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        return self.run(self.agenerate(batch, sampling, seed))

    def run(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the app's loop from a worker thread (never from the loop itself: it would block it)."""
        loop = self.upstream.loop
        if loop is None:
            coro.close()
            raise RuntimeError("the upstream is not started")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("UpstreamBackend.run blocks: await acomplete on the loop instead")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()
