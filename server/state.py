"""What one app holds (:class:`ServerState`, on ``app.state.server``): settings, metrics, the constitution registry,
and once the model has loaded, the engine and the serving classes built over it (:class:`Services`); in gateway
mode, at once, the upstream and the serving classes over it. No module-level state: two apps in one process (tests)
share nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.admin.metrics import Metrics
from server.admin.protocol import Health, ModelList
from server.admin.serving import ModelListing, UpstreamListing
from server.constitutions import ConstitutionRegistry
from server.critique.pipeline import EngineSource, Pipeline
from server.critique.serving import CritiqueServing
from server.errors import Unavailable
from server.openai.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from server.openai.serving import ChatServing
from server.review.serving import ReviewServing
from server.security import Sessions
from server.settings import Limits, Settings
from server.user_text import SpecialTokenFilter, marker_filter


class ChatHandler(Protocol):
    """What the chat route calls: :class:`ChatServing` (the engine) or ``server.gateway.chat.GatewayChat``."""

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion: ...

    async def stream(self, req: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]: ...


class ModelLister(Protocol):
    def list(self) -> ModelList: ...


@dataclass
class Services:
    """The serving classes over one engine, or the upstream (none knows of HTTP; the routes fetch them through
    ``server.deps``)."""

    chat: ChatHandler
    critique: CritiqueServing
    models: ModelLister
    neutralise: SpecialTokenFilter      # the user-text filter both the chat and the critique routes apply

    @classmethod
    def build(cls, engine: Any, registry: ConstitutionRegistry, limits: Limits, manifests: dict[str, dict | None],
              on_usage: Callable[[str, int, int], None]) -> Services:
        neutralise = SpecialTokenFilter(engine.tokenizer)
        pipeline = Pipeline(EngineSource(engine), registry)
        return cls(ChatServing(engine, pipeline, neutralise, limits, on_usage),
                   CritiqueServing(pipeline, neutralise, limits, on_usage),
                   ModelListing(engine, manifests), neutralise)

    @classmethod
    def gateway(cls, upstream: Any, registry: ConstitutionRegistry, limits: Limits,
                on_usage: Callable[[str, int, int], None]) -> Services:
        """Gateway mode: the serving classes over a server.gateway.Upstream (the pipeline runs over it too)."""
        from server.gateway.chat import GatewayChat

        neutralise = marker_filter()
        pipeline = Pipeline(upstream, registry)
        return cls(GatewayChat(upstream, pipeline, neutralise, limits, on_usage),
                   CritiqueServing(pipeline, neutralise, limits, on_usage),
                   UpstreamListing(upstream.name, upstream.model, upstream.context_length), neutralise)


@dataclass
class ServerState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    registry: ConstitutionRegistry | None = None
    engine: Any = None                          # server.engine.Engine once loaded
    upstream: Any = None                        # gateway mode: server.gateway.Upstream (and no engine)
    services: Services | None = None
    manifests: dict[str, dict | None] = field(default_factory=dict)
    review: ReviewServing | None = None         # the review page's runs (none: no page)
    sessions: Sessions | None = None            # the review page's viewing cookies (with API keys only)
    draining: bool = False
    load_error: str | None = None
    on_fatal: Callable[[BaseException], None] | None = None   # told when the model cannot be loaded

    def ready(self) -> Services:
        """The services, or Unavailable (503) while loading, after a failed load, or once the engine died."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.settings.model is None:
            raise Unavailable("this server serves no model (it was started by `cai review`, for the review page "
                              "only)")
        if self.load_error is not None:
            raise Unavailable(f"the model failed to load: {self.load_error}")
        if self.services is None:
            raise Unavailable("the model is loading", retry_after=5)
        if self.engine is not None and self.engine.error:
            raise Unavailable(f"the inference worker failed: {self.engine.error}")
        return self.services

    async def health(self) -> tuple[int, Health]:
        """(status, body) of ``/health``: 200 only while the engine runs (gateway mode: while an upstream answers)."""
        if self.draining:
            return 503, Health(status="draining")
        if self.upstream is not None:
            upstreams = await self.upstream.health()
            if not any(u.up for u in upstreams):
                return 503, Health(status="failed", error="no upstream answers", models=[self.upstream.name],
                                   upstreams=upstreams)
            return 200, Health(status="ok", models=[self.upstream.name], in_flight=self.upstream.in_flight,
                               upstreams=upstreams)
        if self.load_error is not None:
            return 503, Health(status="failed", error=self.load_error)
        if self.settings.model is None:            # `cai review`: no model to wait for
            return 200, Health(status="ok", models=[])
        if self.engine is None:
            return 503, Health(status="loading")
        if self.engine.error or not self.engine.running:
            return 503, Health(status="failed", error=self.engine.error or "the inference worker is not running")
        return 200, Health(status="ok", models=self.engine.model_names, device=self.engine.device,
                           dtype=self.engine.dtype, compile=self.engine.compile_mode,
                           compiled=self.engine.compiled or None,
                           quantize=self.engine.quantize, queue_depth=self.engine.queue_depth,
                           in_flight=self.engine.in_flight)
