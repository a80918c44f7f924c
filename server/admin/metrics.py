"""Prometheus metrics in the text exposition format (version 0.0.4), written here rather than taken from
``prometheus_client``: what the service exposes is a few counters and histograms, and owning them keeps one
registry per app (``prometheus_client`` keeps a process-wide default registry: module-level state, and two apps in
one test process would share counts).

Request metrics are counted by a pure ASGI middleware (:class:`MetricsMiddleware`) labelled by the route's path
template (``/v1/constitutions/{name}``, never the raw path: a client cannot grow the label set); a path no route
matches is counted as ``other``. Engine gauges (queue depth, in flight, batch sizes) are read from the engine at
scrape time.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)   # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)                                                   # rows


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)   # per bucket, not cumulative; last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            running += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(bound)})} {running}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """The counters of one app. Thread-safe (services count tokens from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)     # (route, method, status) -> count
        self.latency: dict[str, Histogram] = {}                                # route -> seconds
        self.prompt_tokens: dict[str, int] = defaultdict(int)                 # model -> tokens
        self.completion_tokens: dict[str, int] = defaultdict(int)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, str(status))] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += prompt
            self.completion_tokens[model] += completion

    def render(self, engine: Any | None, upstream: Any | None = None) -> str:
        """The exposition text; ``engine`` (None while loading) gives the live gauges, ``upstream`` (gateway mode:
        a server.gateway.Upstream, and no engine) its upstreams'."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("cai_requests_total", "counter", "HTTP requests by route template, method and status")
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f"cai_requests_total{_labels({'route': route, 'method': method, 'status': status})} {n}")
            family("cai_request_duration_seconds", "histogram", "HTTP request latency, to the last byte")
            for route, h in sorted(self.latency.items()):
                out += h.lines("cai_request_duration_seconds", {"route": route})
            family("cai_prompt_tokens_total", "counter", "prompt tokens of served generation requests")
            for model, n in sorted(self.prompt_tokens.items()):
                out.append(f"cai_prompt_tokens_total{_labels({'model': model})} {n}")
            family("cai_completion_tokens_total", "counter", "tokens generated for served requests")
            for model, n in sorted(self.completion_tokens.items()):
                out.append(f"cai_completion_tokens_total{_labels({'model': model})} {n}")
        if upstream is not None:
            out += _upstream_lines(upstream)
            return "\n".join(out) + "\n"
        family("cai_engine_up", "gauge", "1 when the inference worker runs")
        out.append(f"cai_engine_up {int(engine is not None and engine.running and not engine.error)}")
        if engine is not None:
            family("cai_queue_depth", "gauge", "requests waiting for the inference worker")
            out.append(f"cai_queue_depth {engine.queue_depth}")
            family("cai_in_flight", "gauge", "requests being decoded")
            out.append(f"cai_in_flight {engine.in_flight}")
            family("cai_engine_tokens_generated_total", "counter", "tokens decoded by the worker")
            out.append(f"cai_engine_tokens_generated_total {engine.tokens_generated}")
            family("cai_batch_size", "histogram", "rows per forward pass (prefills and decode steps)")
            h = Histogram(BATCH_BUCKETS)
            for size, n in engine.batch_sizes.items():
                i = next((i for i, b in enumerate(BATCH_BUCKETS) if size <= b), len(BATCH_BUCKETS))
                h.counts[i] += n
                h.sum += size * n
                h.count += n
            out += h.lines("cai_batch_size", {})
        return "\n".join(out) + "\n"


def _upstream_lines(upstream: Any) -> list[str]:
    """Gateway mode: per upstream (labelled by its URL, a fixed set), whether it is in rotation, its requests in
    progress, answered, and failed attempts."""
    from server.gateway.upstream import display_url

    now = time.monotonic()
    rows = [(display_url(ep.url), ep) for ep in upstream.endpoints]
    out: list[str] = []
    for name, kind, help_, value in [
            ("cai_upstream_in_rotation", "gauge", "1 unless the upstream is cooling down after repeated failures",
             lambda ep: int(ep.down_until <= now)),
            ("cai_upstream_outstanding", "gauge", "requests to the upstream in progress (streams included)",
             lambda ep: ep.outstanding),
            ("cai_upstream_requests_total", "counter", "requests the upstream answered", lambda ep: ep.served),
            ("cai_upstream_errors_total", "counter", "attempts to the upstream that failed", lambda ep: ep.errors)]:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        out += [f"{name}{_labels({'upstream': url})} {value(ep)}" for url, ep in rows]
    return out


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request (the 401s and 413s of the guard inside it included) with its status and
    latency to the last byte sent. A client that went away before a response started is counted as status 499."""

    def __init__(self, app: Any, metrics: Callable[[], Metrics]):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 499

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:                  # an unhandled error (a cancelled request stays 499)
            if status == 499:
                status = 500
            raise
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "other"
            self.metrics().observe_request(label, scope.get("method", ""), status, time.perf_counter() - t0)
