"""``create_app(settings)``: the FastAPI application of the service. No module-level state: everything an app
holds (engine, constitution registry, metrics, the serving classes, the draining flag) lives in one
:class:`~server.state.ServerState` on ``app.state.server``, so two apps in one process (tests) share nothing.

The routes are by feature: ``server/openai`` (chat completions), ``server/critique`` (critique, revise),
``server/admin`` (health, metrics, models, constitutions), ``server/review`` (the review page, with
``Settings.review_runs``; with ``Settings.model`` None it is all the server does: no model is loaded). Each fetches
its serving class through a typed dependency (``server/deps.py``) and calls it.

Life of an app. The lifespan loads the constitutions (strict: a bad file stops the start), starts the watch that
picks up their edits, and loads the model and adapters **in the background**: the server answers at once, ``/health``
says 503 ``loading`` until the engine runs (then 200), and the work routes answer 503 with ``Retry-After`` meanwhile.
A model that fails to load leaves ``/health`` at 503 ``failed`` and calls ``ServerState.on_fatal`` (``cai serve``
stops the process with the error). Shutdown: :attr:`ServerState.draining` is set first (new work and ``/health``
get 503; see ``server/runner.py`` for SIGTERM), the requests in flight finish, then the engine drains.

Gateway mode (``Settings.upstream``: ``cai serve --upstream URL``): no model is loaded; the lifespan builds the
upstream (``server/gateway``) and its serving classes at once, ``/health`` says which upstreams answer, and the
upstream's HTTP client is closed after the requests in flight have finished.

Middleware, outermost first: metrics (counts every request, the refused ones too), the guard (API keys on every
path but ``/health``; body size cap), then FastAPI. Every exception goes through ``server.errors.handle_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.admin.metrics import MetricsMiddleware
from server.admin.routes import router as admin_router
from server.constitutions import ConstitutionRegistry, watch
from server.critique.routes import router as critique_router
from server.errors import HANDLED, handle_error
from server.openai.routes import router as openai_router
from server.responses import AsciiJSONResponse
from server.review.pages import login_page
from server.review.routes import router as review_router
from server.review.serving import ReviewServing
from server.security import Guard, Sessions
from server.settings import Settings, check_adapter
from server.state import ServerState, Services

log = logging.getLogger("cai.server")


def load_engine(settings: Settings) -> tuple[Any, dict[str, dict | None]]:
    """The engine over the base model and the adapters (blocking), after checking each adapter's manifest against
    the base (see settings.check_adapter). Returns the engine (not started) and the manifests by adapter name."""
    from cai.inference.loading import resolve_model
    from server.engine import Engine

    model_id = resolve_model(settings.model).model_id
    manifests = {name: check_adapter(name, folder, model_id) for name, folder in settings.adapters.items()}
    engine = Engine(settings.model, dict(settings.adapters), device=settings.device, dtype=settings.dtype,
                    max_batch=settings.max_batch, queue_size=settings.queue_size, base_name=settings.base_name,
                    compile=settings.compile or False, quantize=settings.quantize)
    return engine, manifests


def create_app(settings: Settings, *, on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    st = ServerState(settings, on_fatal=on_fatal)
    if settings.review_runs:
        st.review = ReviewServing(dict(settings.review_runs), settings.review_rule)
        st.sessions = Sessions(list(settings.api_keys)) if settings.api_keys else None

    async def load() -> None:
        if settings.model is None:                   # `cai review`: the review page only
            return
        try:
            engine, manifests = await asyncio.to_thread(load_engine, settings)
            engine.start()
        except Exception as e:
            st.load_error = str(e) if str(e) else type(e).__name__
            log.error("cannot serve: %s", e)
            if st.on_fatal is not None:
                st.on_fatal(e)
            return
        st.engine, st.manifests = engine, manifests
        st.services = Services.build(engine, st.registry, settings.limits, manifests,  # type: ignore[arg-type]
                                     on_usage=st.metrics.count_tokens)
        log.info("serving %s on %s (%s)", ", ".join(engine.model_names), engine.device, engine.dtype)

    def start_gateway() -> None:
        from server.gateway import Upstream

        assert settings.upstream is not None and st.registry is not None
        upstream = Upstream(settings.upstream, settings.queue_size)
        upstream.start()
        st.upstream = upstream
        st.services = Services.gateway(upstream, st.registry, settings.limits, on_usage=st.metrics.count_tokens)
        log.info("serving %s through %s", upstream.name, ", ".join(settings.upstream.urls))

    async def nothing() -> None:
        return None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.constitutions:                  # `cai review` serves none
            st.registry = await asyncio.to_thread(ConstitutionRegistry, list(settings.constitutions))
        if st.review is not None:                   # every run indexed once, before the first request
            await asyncio.to_thread(st.review.load)
        if settings.upstream is not None:
            start_gateway()
        loading = asyncio.create_task(load() if settings.upstream is None else nothing())
        watching = asyncio.create_task(watch(st.registry, settings.watch_interval_s)) if st.registry else None
        try:
            yield
        finally:
            st.draining = True
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            await asyncio.shield(loading)           # a model being loaded is waited for, then drained
            if st.engine is not None:
                await asyncio.to_thread(st.engine.drain, settings.drain_timeout_s)
            if st.upstream is not None:
                await st.upstream.aclose()

    app = FastAPI(title="cai", version=_version(), lifespan=lifespan, redirect_slashes=False,
                  default_response_class=AsciiJSONResponse,
                  description="Constitutional AI service: an OpenAI-compatible chat endpoint over the base model "
                              "and its adapters, beside the live critique→revise pipeline.")
    app.state.server = st
    routers = [admin_router] + ([openai_router, critique_router] if settings.model is not None else [])
    for router in routers + ([review_router] if st.review is not None else []):
        app.include_router(router)
    for exc_class in HANDLED:
        app.add_exception_handler(exc_class, handle_error)
    app.add_middleware(Guard, keys=list(settings.api_keys), max_body_bytes=settings.limits.max_body_bytes,
                       sessions=st.sessions, login_page=login_page() if st.review is not None else None)
    app.add_middleware(MetricsMiddleware, metrics=lambda: st.metrics)
    return app


def _version() -> str:
    from cai import __version__

    return __version__
