"""The upstream engines of gateway mode (``cai serve --upstream URL ... --upstream-model NAME``), as one object the
serving classes call from the app's event loop.

Every request goes through one :class:`cai.backends.openai.OpenAIBackend`: its endpoints (least outstanding first),
its retries (backoff with jitter, honouring ``Retry-After``, on another upstream where one is in rotation), its
cool-down of upstreams that keep failing, its reading of an answer's status. Here it runs on the app's loop rather
than its own thread, over the gateway's own HTTP client (``server/gateway/http.py``: keep-alive connections to each
upstream, a tenth of httpx's CPU a request): passthrough chat completions, streams and the pipeline's stages all
share it, so balancing sees them all. Each attempt is bounded (``--upstream-timeout``: a whole answer, a stream's
first event, a stream gone quiet), so is the number of attempts (``--upstream-retries``), and so is the wait while
every upstream is out of rotation (:data:`WAIT_FOR_UPSTREAM_S`, then 503): nothing hangs.

What fails for good becomes :class:`~server.errors.UpstreamError` with the kind of failure (``server/errors.py``
maps it to 502, 503 or 504). A request the upstream refuses (another 4xx: a prompt over its context, say) is the
caller's: 400 with the upstream's own message and code.

It is also the pipeline's :class:`~server.critique.pipeline.Source`: one model (the served name), and a
:class:`~server.gateway.backend.UpstreamBackend` over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from cai.backends.base import Completion, Sampling
from cai.backends.openai import (
    BAD_RESPONSE,
    REJECTED,
    TIMEOUT,
    UNREACHABLE,
    AuthError,
    Endpoint,
    EndpointError,
    OpenAIBackend,
    Retryable,
    UpstreamFailure,
    completion_of,
    request_body,
)
from cai.core.prompts import Message
from server.admin.protocol import UpstreamHealth
from server.engine import QueueFull
from server.errors import UpstreamError
from server.gateway.backend import UpstreamBackend
from server.gateway.http import BrokenConnection, Pool, bounded
from server.gateway.protocol import UpstreamCompletion
from server.gateway.stream import UpstreamStream, open_stream
from server.settings import UpstreamSettings

WAIT_FOR_UPSTREAM_S = 1.0     # while every upstream is out of rotation, a request waits this long, then 503
PROBE_EVERY_S = 2.0           # /health asks the upstreams at most this often (it is open: no key needed)
PROBE_TIMEOUT_S = 2.0

WHAT = {"timeout": "did not answer in time", "unreachable": "could not be reached", "error": "failed",
        "bad_response": "sent an answer that is not a chat completion", "busy": "is busy",
        "unavailable": "is unavailable"}


def display_url(url: str) -> str:
    """A URL as shown (health, errors): without a user or password in it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


class Upstream:
    def __init__(self, settings: UpstreamSettings, queue_size: int = 64):
        s = settings
        self.settings = s
        self.model = s.model                        # the upstreams' name for it (what requests upstream say)
        self.name = s.name                          # the served name (what clients ask for)
        self.context_length = s.context_length
        self.client = OpenAIBackend(s.model, list(s.urls), api_key_env=s.api_key_env, concurrency=s.concurrency,
                                    timeout=s.timeout_s, max_retries=s.retries, backoff_base=0.1, backoff_max=2.0,
                                    context_length=s.context_length, wait_for_endpoint=WAIT_FOR_UPSTREAM_S)
        self.max_in_flight = s.concurrency + queue_size   # beyond it: 429, as a full queue
        key = os.environ.get(s.api_key_env) or None           # never logged or shown
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._pools: dict[str, Pool] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._probe: asyncio.Future | None = None
        self._probed_at = 0.0

    def start(self) -> None:
        """Bind to the running loop (the app's): the connections to the upstreams belong to it."""
        self.loop = asyncio.get_running_loop()

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()

    def pool(self, ep: Endpoint) -> Pool:
        pool = self._pools.get(ep.url)
        if pool is None:
            pool = self._pools[ep.url] = Pool(ep.url, self.settings.concurrency, self._headers)
        return pool

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.client.endpoints

    @property
    def in_flight(self) -> int:
        """Requests to the upstreams in progress (streams included), over all of them."""
        return sum(ep.outstanding for ep in self.endpoints)

    # -- the pipeline's Source -------------------------------------------------------------------------------

    @property
    def base_name(self) -> str:
        return self.name

    @property
    def model_names(self) -> list[str]:
        return [self.name]

    def check_admission(self) -> None:
        if self.in_flight >= self.max_in_flight:
            raise QueueFull(1.0, self.in_flight)

    def backend(self, model: str) -> UpstreamBackend:
        return UpstreamBackend(self)

    # -- requests ----------------------------------------------------------------------------------------------

    async def complete(self, body: dict) -> UpstreamCompletion:
        """A whole chat completion (``body`` as the upstream takes it); its choices are checked inside the attempt,
        so an answer with none is retried like any bad answer."""
        async def send(ep: Endpoint) -> UpstreamCompletion:
            data = await self.post_json(ep, body)
            try:
                answer = UpstreamCompletion.model_validate(data)
            except ValidationError as e:
                raise Retryable(f"not a chat completion: {e.errors()[0]['msg']}", kind=BAD_RESPONSE) from None
            if not answer.choices:
                raise Retryable("an answer with no choices", kind=BAD_RESPONSE)
            return answer

        with self.failures():
            return await self.client.call(send)

    async def stream(self, body: dict) -> UpstreamStream:
        """A streamed chat completion, opened (its first chunk read); see server/gateway/stream.py."""
        async def send(ep: Endpoint) -> UpstreamStream:
            return await open_stream(self.client, self.pool(ep), ep, {**body, "stream": True},
                                     self.settings.timeout_s)

        with self.failures():
            return await self.client.call(send)

    async def request(self, messages: list[Message], sampling: Sampling, seed: int) -> Completion:
        """One pipeline stage: the very request ``cai generate --backend openai`` sends for it (the openai
        backend's body, its reading of the answer)."""
        body = request_body(self.model, messages, sampling, seed)

        async def send(ep: Endpoint) -> Completion:
            return completion_of(await self.post_json(ep, body))

        with self.failures():
            return await self.client.call(send)

    async def post_json(self, ep: Endpoint, body: dict) -> dict:
        """POST ``body`` to one upstream's chat completions; its whole answer within the timeout, as a JSON object.
        Raises as the openai backend's ``post_json`` does (Retryable, AuthError, EndpointError, UpstreamFailure)."""
        timeout = self.settings.timeout_s
        payload = json.dumps(body).encode()

        async def exchange() -> tuple[int, dict[str, str], bytes]:
            r = await self.pool(ep).request("POST", "/chat/completions", payload)
            return r.status, r.headers, await r.read()

        try:
            status, headers, raw = await bounded(exchange(), timeout)
        except asyncio.TimeoutError:
            raise Retryable(f"no answer within {timeout:g}s", endpoint_down=True, kind=TIMEOUT) from None
        except BrokenConnection as e:
            raise Retryable(str(e), endpoint_down=True, kind=UNREACHABLE) from None
        self.client.check_status(ep, status, headers, raw.decode("utf-8", "replace") if status >= 400 else "")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise Retryable(f"unusable answer body: {raw[:200].decode('utf-8', 'replace')}", kind=BAD_RESPONSE)
        return data

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """The openai backend's failures as UpstreamError (server/errors.py gives each its status)."""
        try:
            yield
        except UpstreamFailure as e:
            if e.kind == REJECTED:
                raise _rejected(e) from None
            what = WHAT.get(e.kind, "failed")
            raise UpstreamError(e.kind, self._shown(f"the upstream {what}: {e.message}"), e.retry_after) from None
        except AuthError as e:
            raise UpstreamError("auth", self._shown(f"{e.message}: set the key the upstreams take in "
                                                    f"${self.settings.api_key_env} on the gateway")) from None
        except EndpointError as e:
            raise UpstreamError("not_found", self._shown(f"{e.message} (check --upstream, which usually ends in "
                                                         "/v1, and --upstream-model)")) from None

    def _shown(self, message: str) -> str:
        for ep in self.endpoints:
            message = message.replace(ep.url, display_url(ep.url))
        return message

    # -- health ------------------------------------------------------------------------------------------------

    async def health(self) -> list[UpstreamHealth]:
        """Whether each upstream answers ``GET /models`` now (asked at most every PROBE_EVERY_S: concurrent and
        later calls share one probe), with its place in the rotation. Asked from another loop than the app's (a
        test client without a lifespan), the probe still runs on the app's, where the HTTP client lives."""
        if self.loop is not None and asyncio.get_running_loop() is not self.loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.health(), self.loop))
        if self._probe is None or (self._probe.done() and time.monotonic() - self._probed_at > PROBE_EVERY_S):
            self._probed_at = time.monotonic()
            self._probe = asyncio.ensure_future(asyncio.gather(*(self._ask(ep) for ep in self.endpoints)))
        answers = await asyncio.shield(self._probe)
        now = time.monotonic()
        return [UpstreamHealth(url=display_url(ep.url), up=error is None, error=error,
                               in_rotation=ep.down_until <= now, outstanding=ep.outstanding, served=ep.served,
                               errors=ep.errors)
                for ep, error in zip(self.endpoints, answers)]

    async def _ask(self, ep: Endpoint) -> str | None:
        """None if the upstream answers its model listing, else why not."""
        async def ask() -> int:
            r = await self.pool(ep).request("GET", "/models")
            await r.read()
            return r.status

        try:
            status = await bounded(ask(), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return f"no answer within {PROBE_TIMEOUT_S:g}s"
        except BrokenConnection as e:
            return str(e)
        if status in (401, 403):
            return f"HTTP {status}: it refused the gateway's key (${self.settings.api_key_env})"
        return None if status < 400 else f"HTTP {status}"


def _rejected(e: UpstreamFailure) -> UpstreamError:
    """A request the upstream refused, with its own message, code and param where its body has them (an OpenAI
    error body, or vLLM's, or anything else: then its text)."""
    message, code, param = (e.body or "").strip()[:500], None, None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(e.body or "")
        error = error.get("error", error) if isinstance(error, dict) else error
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code") if isinstance(error.get("code"), str) else None
            param = error.get("param") if isinstance(error.get("param"), str) else None
    if code is None and "context length" in message.lower():
        code = "context_length_exceeded"
    return UpstreamError(REJECTED, f"the upstream refused the request (HTTP {e.status}): {message}", code=code,
                         param=param)
