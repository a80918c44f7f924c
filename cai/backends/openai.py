"""An OpenAI-compatible chat-completions backend: vLLM, TGI, SGLang, Ollama, llama.cpp's server, hosted APIs, or
``cai serve``, over HTTP, one or many endpoints.

- Requests of a batch run concurrently (async), at most ``concurrency`` in flight over all endpoints.
- Each request goes to the endpoint with the fewest requests outstanding. An endpoint that fails ``trip_after``
  times in a row (refused or dropped connections, timeouts, 502/503/504) is taken out of rotation for a cool-down
  (doubling, up to ``max_cooldown``) and then tried again; while every endpoint is out, requests wait for the first
  to come back.
- Connection errors, timeouts, 408/409/429/5xx, a body that is not JSON and an answer with no choices are retried
  with exponential backoff and full jitter, honouring ``Retry-After``, on another endpoint than the one that just
  failed when another is in rotation; at most ``max_retries`` retries.
- 401/403 stop the whole run at once (:class:`AuthError`): a wrong key is never hammered; so does a 404 (a wrong
  URL or model name, :class:`EndpointError`). The first request of a backend goes alone, so either costs one request.
- A request that still fails becomes a :class:`Completion` with ``error`` set (never a model answer); the pipeline
  leaves that prompt out and lists it in ``errors.jsonl``, and the next run tries it again.
  :meth:`OpenAIBackend.request` raises :class:`UpstreamFailure` instead, saying how it failed (``kind``): what
  ``cai serve --upstream`` maps to a status.
- :meth:`OpenAIBackend.call` is that machinery (endpoint choice, retries, cool-down) around any exchange with an
  endpoint: the gateway uses it for plain and streamed chat completions.
- The API key comes from an environment variable (``api_key_env``) and is never logged or recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cai.backends.base import Completion, Sampling
from cai.core.errors import CaiError
from cai.core.prompts import Message

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = {408, 409, 429}
# answers that say the server (not the request) is unavailable: these, connection errors and timeouts count towards
# taking an endpoint out of rotation; a 500 for one request, a 429 (Retry-After) or a bad body do not
ENDPOINT_DOWN_STATUS = {502, 503, 504}


class AuthError(CaiError):
    """The endpoint refused the API key: stop, do not retry."""


class EndpointError(CaiError):
    """The endpoint does not serve this URL or model (404): a setting to fix, not a fault to retry."""


# How a request failed (Retryable.kind, UpstreamFailure.kind)
TIMEOUT = "timeout"              # no answer within the timeout
UNREACHABLE = "unreachable"      # connection refused, reset or dropped
BUSY = "busy"                    # 429
UNAVAILABLE = "unavailable"      # 503, or every endpoint out of rotation
SERVER_ERROR = "error"           # another 5xx (or 408/409)
BAD_RESPONSE = "bad_response"    # a body that is not JSON, or an answer with no choices
REJECTED = "rejected"            # another 4xx: the endpoint refused this request (not retried)


class Retryable(Exception):
    """One attempt failed in a way worth another attempt (raised by the ``send`` of :meth:`OpenAIBackend.call`)."""

    def __init__(self, reason: str, retry_after: float | None = None, endpoint_down: bool = False,
                 kind: str = SERVER_ERROR):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.endpoint_down = endpoint_down     # says the endpoint, not this request, is in trouble
        self.kind = kind


class UpstreamFailure(Exception):
    """A request that failed for good: after its retries, or at once for a refusal of this request (another 4xx:
    ``status`` and the endpoint's ``body`` text). ``kind`` is one of the module's kinds (TIMEOUT, UNREACHABLE, ...);
    ``retry_after`` is the last Retry-After seen (or how long until an endpoint is back in rotation)."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None, status: int | None = None,
                 body: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_after, self.status, self.body = kind, message, retry_after, status, body


@dataclass
class Endpoint:
    url: str
    outstanding: int = 0
    failures: int = 0             # in a row
    down_until: float = 0.0
    cooldown: float = 0.0
    served: int = 0               # successful requests (for the summary and tests)
    errors: int = 0
    probing: bool = False         # back from a cool-down: one request at a time until one succeeds


@dataclass
class OpenAIBackend:
    model: str
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 64
    timeout: float = 120.0            # seconds per request
    max_retries: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    trip_after: int = 3               # failures in a row that take an endpoint out of rotation
    first_cooldown: float = 2.0
    max_cooldown: float = 30.0
    context_length: int | None = None
    name: str = "openai"
    model_revision: str | None = None
    wait_for_endpoint: float | None = None   # seconds a request waits while every endpoint is out (None: no limit)
    endpoints: list[Endpoint] = field(init=False)

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise CaiError("the openai backend needs at least one --base-url")
        if self.concurrency < 1:
            raise CaiError(f"--concurrency must be at least 1, got {self.concurrency}")
        self.endpoints = [Endpoint(u.rstrip("/")) for u in self.base_urls]
        self._api_key = os.environ.get(self.api_key_env) or None
        self._verified = False
        self._loop: asyncio.AbstractEventLoop | None = None     # one loop and one client for the backend's life:
        self._client: Any = None                                 # connections are reused from stage to stage
        self._sem: asyncio.Semaphore | None = None               # acomplete's limit and first-request lock
        self._first: asyncio.Lock | None = None

    # -- the Backend protocol ------------------------------------------------------------------------------------

    def count_tokens(self, messages: list[Message]) -> int:
        """An estimate (no tokenizer here): about 4 characters a token, plus a few per message for the template."""
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        return self.run(self.agenerate(batch, sampling, seed))

    def run(self, coro):
        """Run ``coro`` on the backend's own event loop (a daemon thread), so the HTTP client and its open
        connections live from one call to the next instead of being set up again each time. Ctrl-C cancels it."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="cai-openai", daemon=True).start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()           # the coroutine's own clean-up (keeping finished work) runs before we return
            with contextlib.suppress(BaseException):
                future.result(timeout=10)
            raise

    async def acomplete(self, messages: list[Message], sampling: Sampling, seed: int) -> Completion:
        """One request, under the backend's concurrency limit. Until one request has succeeded, requests go one
        at a time: a wrong key or URL costs one request, not ``concurrency`` of them."""
        if self._sem is None or self._first is None:
            self._sem, self._first = asyncio.Semaphore(self.concurrency), asyncio.Lock()
        if not self._verified:
            async with self._first:
                if not self._verified:
                    comp = await self._request(self._http(), messages, sampling, seed)
                    self._verified = comp.error is None
                    return comp
        async with self._sem:
            return await self._request(self._http(), messages, sampling, seed)

    def close(self) -> None:
        if self._loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=5)
            self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None

    def _http(self):
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(limits=limits, headers=headers, timeout=self.timeout)
        return self._client

    def first_token_logprobs(self, batch: list[list[Message]], top: int = 20) -> list[Completion]:
        """One greedy token per conversation, with the ``top`` most likely first tokens and their log-probabilities
        (``Completion.top_logprobs``; None where the endpoint returns none). What the judge reads."""
        extra = {"logprobs": True, "top_logprobs": top}
        return self.run(self.agenerate(batch, Sampling(temperature=0.0, max_new_tokens=1), 0, extra=extra))

    async def agenerate(self, batch: list[list[Message]], sampling: Sampling, seed: int,
                        extra: dict | None = None) -> list[Completion]:
        client = self._http()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(i: int, messages: list[Message]) -> Completion:
            async with sem:
                return await self._request(client, messages, sampling, seed + i, extra)

        first: list[Completion] = []
        if not self._verified and batch:
            # the first request goes alone: a wrong key or URL costs one request, not `concurrency` of them
            first = [await one(0, batch[0])]
            self._verified = first[0].error is None
        tasks = [asyncio.create_task(one(i, m)) for i, m in enumerate(batch) if i >= len(first)]
        try:
            return first + list(await asyncio.gather(*tasks))
        except (AuthError, EndpointError):
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # -- one request, with retries --------------------------------------------------------------------------------

    async def _request(self, client, messages: list[Message], sampling: Sampling, seed: int,
                       extra: dict | None = None) -> Completion:
        try:
            return await self.request(messages, sampling, seed, extra, client=client)
        except UpstreamFailure as e:
            return Completion("", 0, 0, "error", error=e.message)

    async def request(self, messages: list[Message], sampling: Sampling, seed: int, extra: dict | None = None, *,
                      client=None) -> Completion:
        """One chat completion with retries, on the running loop. Raises :class:`UpstreamFailure` when it fails for
        good (and AuthError, EndpointError at once)."""
        body = request_body(self.model, messages, sampling, seed, extra)
        http = client if client is not None else self._http()

        async def send(ep: Endpoint) -> Completion:
            return completion_of(await self.post_json(http, ep, body))

        return await self.call(send)

    async def call(self, send: Callable[[Endpoint], Awaitable[T]]) -> T:
        """``await send(endpoint)`` on an endpoint chosen by least outstanding requests, again (on another endpoint
        where one is in rotation) while it raises :class:`Retryable`, with backoff and jitter honouring Retry-After,
        at most ``max_retries`` times; endpoints that keep failing go out of rotation. Returns what ``send``
        returns; raises :class:`UpstreamFailure` once the retries are spent (what ``send`` raises otherwise goes
        through at once). ``send`` is any exchange with the endpoint, over any HTTP client."""
        reason, last, tried = "no attempt", Retryable("no attempt"), None
        for attempt in range(self.max_retries + 1):
            ep = await self._pick(avoid=tried)
            ep.outstanding += 1
            try:
                result = await send(ep)
            except Retryable as e:
                reason, last, tried = f"{ep.url}: {e.reason}", e, ep
                ep.errors += 1
                if e.endpoint_down:
                    self._failed(ep)
                if attempt == self.max_retries:
                    break
                delay = min(self.backoff_max, self.backoff_base * 2 ** attempt) * random.random()
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.backoff_max))
                log.info("retrying after %.2fs (%s)", delay, reason)
                await asyncio.sleep(delay)
                continue
            finally:
                ep.outstanding -= 1
            ep.failures, ep.cooldown, ep.probing = 0, 0.0, False
            ep.served += 1
            return result
        raise UpstreamFailure(last.kind, f"gave up after {self.max_retries + 1} attempts: {reason}", last.retry_after)

    async def post_json(self, client, ep: Endpoint, body: dict) -> dict:
        """POST ``body`` to the endpoint's chat completions within ``timeout`` seconds; the answer as a JSON object.
        Raises Retryable, AuthError (401/403), EndpointError (404) or UpstreamFailure (another 4xx)."""
        import httpx

        try:
            # a deadline on the whole answer (httpx's timeout is per read: a trickling answer would never end)
            r = await asyncio.wait_for(client.post(f"{ep.url}/chat/completions", json=body), self.timeout)
        except (httpx.TimeoutException, asyncio.TimeoutError):
            raise Retryable(f"no answer within {self.timeout:g}s", endpoint_down=True, kind=TIMEOUT) from None
        except httpx.TransportError as e:
            raise Retryable(f"connection failed ({type(e).__name__})", endpoint_down=True, kind=UNREACHABLE) from None
        self.check_status(ep, r.status_code, r.headers, r.text if r.status_code >= 400 else "")
        try:
            data = r.json()
        except ValueError:
            raise Retryable(f"unusable answer body: {_short(r.text)}", kind=BAD_RESPONSE) from None
        if not isinstance(data, dict):
            raise Retryable(f"unusable answer body: {_short(r.text)}", kind=BAD_RESPONSE)
        return data

    def check_status(self, ep: Endpoint, status: int, headers, text: str) -> None:
        """Raise what an answer's status says (nothing for a 2xx or 3xx)."""
        if status in (401, 403):
            raise AuthError(f"{ep.url} refused the API key (HTTP {status})",
                            hint=f"Set the key in ${self.api_key_env} (or name another variable with "
                                 "--api-key-env). Nothing more was sent.")
        if status == 404:
            raise EndpointError(f"{ep.url}/chat/completions answered 404 for model {self.model!r}: {_short(text)}",
                                hint="Check --base-url (it usually ends in /v1) and --model (the name the server "
                                     "serves). Nothing more was sent.")
        if status in RETRY_STATUS or status >= 500:
            kind = BUSY if status == 429 else UNAVAILABLE if status == 503 else SERVER_ERROR
            raise Retryable(f"HTTP {status}", _retry_after(headers.get("retry-after")),
                            endpoint_down=status in ENDPOINT_DOWN_STATUS, kind=kind)
        if status >= 400:
            raise UpstreamFailure(REJECTED, f"{ep.url}: HTTP {status}: {_short(text)}", status=status, body=text)

    # -- endpoint rotation -----------------------------------------------------------------------------------------

    async def _pick(self, avoid: Endpoint | None = None) -> Endpoint:
        waited = 0.0
        while True:
            now = time.monotonic()
            # an endpoint back from a cool-down takes one probe at a time until one succeeds: a dead endpoint
            # that refuses at once (0 outstanding) would otherwise draw every request again
            up = [e for e in self.endpoints if e.down_until <= now and not (e.probing and e.outstanding)]
            if len(up) > 1 and avoid in up:     # a retry goes elsewhere when it can
                up.remove(avoid)
            if up:
                return min(up, key=lambda e: (e.probing, e.outstanding, e.served))
            waits = [e.down_until - now for e in self.endpoints if e.down_until > now]
            pause = max(0.01, min(waits) if waits else 0.05)
            if self.wait_for_endpoint is not None and waited + pause > self.wait_for_endpoint:
                raise UpstreamFailure(UNAVAILABLE, "every endpoint is out of rotation after repeated failures "
                                      f"({', '.join(e.url for e in self.endpoints)})", retry_after=pause)
            await asyncio.sleep(pause)
            waited += pause

    def _failed(self, ep: Endpoint) -> None:
        ep.failures += 1
        if ep.failures >= self.trip_after or ep.probing:     # a failed probe goes straight back to cool-down
            ep.probing = True
            ep.cooldown = min(self.max_cooldown, ep.cooldown * 2 if ep.cooldown else self.first_cooldown)
            ep.down_until = time.monotonic() + ep.cooldown
            ep.failures = 0
            log.warning("endpoint %s out of rotation for %.0fs after repeated failures", ep.url, ep.cooldown)


def request_body(model: str, messages: list[Message], sampling: Sampling, seed: int,
                 extra: dict | None = None) -> dict:
    """What a stage's request sends (the gateway's pipeline sends the same, so its records are this backend's)."""
    return {"model": model, "messages": messages, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed, **(extra or {})}


def completion_of(data: dict) -> Completion:
    """A chat completion's first choice as a Completion; Retryable (BAD_RESPONSE) when it has none."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise Retryable(f"unusable answer body: {_short(str(data))}", kind=BAD_RESPONSE) from None
    usage = data.get("usage") or {}
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return Completion(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                      finish, top_logprobs=_first_top_logprobs(choice))


def _first_top_logprobs(choice: dict) -> dict[str, float] | None:
    """The first generated token's top alternatives from an OpenAI ``logprobs`` object, or None if it has none."""
    try:
        first = choice["logprobs"]["content"][0]
        top = {str(t["token"]): float(t["logprob"]) for t in first.get("top_logprobs") or []}
        top.setdefault(str(first["token"]), float(first["logprob"]))
        return top
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text[:n] + ("…" if len(text) > n else "")


__all__ = ["AuthError", "Endpoint", "EndpointError", "OpenAIBackend", "Retryable", "UpstreamFailure",
           "completion_of", "request_body"]
