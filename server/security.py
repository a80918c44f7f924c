"""API keys and request limits, as one pure ASGI middleware in front of every route.

Authorization is decided on the request path the router will actually see (``scope["path"]``), never on the Host
header or a reconstructed URL: only the exact path ``/health`` is open, so ``//health``, ``/health/``, ``/v1//models``
or any route added later all require a key. Keys are compared in constant time against every configured key (no
early exit that would leak which key prefix matched). Bodies larger than the cap are refused with 413 from the
``Content-Length`` header when there is one, and by counting (reading at most the cap) when it is sent chunked.

The one other way in is the review page's session cookie (:class:`Sessions`), and only to *view* ``/review`` pages:
a GET or HEAD under ``/review`` with a valid cookie passes; a POST never does on a cookie alone, so another site
cannot make a reviewer's browser post a decision. A browser opening a review page with no key gets, still with 401,
the small page that asks for one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

from cai.core.errors import CaiError, display_path
from server.errors import error_json

OPEN_PATHS = frozenset({"/health"})
REVIEW_PREFIX = "/review"           # the review pages: viewable with the session cookie (see Sessions)
SESSION_COOKIE = "cai_review"
_DIGITS = re.compile(rb"[0-9]{1,18}")   # a Content-Length value (ASCII digits only)
_NAMED = re.compile(r"([^:]{1,100}):\s+(\S+)")      # "alice: KEY" (a key has no whitespace)
_HOLDER = re.compile(r"[\w .@+-]{1,100}")


def read_api_keys(key_file: str | Path | None = None, env: str | None = None) -> dict[str, str | None]:
    """Keys and who holds each (None: an unnamed key), in order, from a file and/or an environment variable.

    The file holds one key a line; blank lines and ``#`` comments are ignored. A line may name the key's holder
    before it, ``alice: KEY`` (a colon, then whitespace): the name is who the review page records as the reviewer.
    A key is at least 8 characters with no whitespace, so a line with no ``": "`` reads as it always did (a key
    may hold a colon: ``abc:defghijk`` is one key). The variable holds a comma-separated list of the same items.
    No key anywhere means the server runs open (it binds 127.0.0.1 by default)."""
    keys: dict[str, str | None] = {}
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CaiError(f"cannot read the API key file {display_path(path)}: {e}") from None
        for n, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, holder = _key_item(line, f"{display_path(path)}:{n}")
            keys[key] = holder
        if not keys:
            raise CaiError(f"the API key file {display_path(path)} holds no key")
    if env and os.environ.get(env):
        for item in os.environ[env].split(","):
            if item.strip():
                key, holder = _key_item(item.strip(), f"${env}")
                keys[key] = holder
    return keys


def _key_item(text: str, where: str) -> tuple[str, str | None]:
    """``KEY`` or ``NAME: KEY`` → (key, name or None)."""
    holder: str | None = None
    m = _NAMED.fullmatch(text)
    if m:
        holder, text = m.group(1).strip(), m.group(2)
        if not _HOLDER.fullmatch(holder):
            raise CaiError(f"{where}: a key's holder is a name of letters, digits, spaces and . _ @ + - (at most 100 "
                           f"characters), got {holder!r}")
    if len(text) < 8 or any(c.isspace() for c in text):
        raise CaiError(f"{where}: an API key is at least 8 characters with no spaces")
    return text, holder


def load_api_keys(key_file: str | Path | None = None, env: str | None = None) -> list[str]:
    """The keys of :func:`read_api_keys`, without their holders."""
    return list(read_api_keys(key_file, env))


def holder_of(key: str, holders: dict[str, str]) -> str:
    """Who holds ``key`` (a key the guard accepted): the name its line gives, else ``key-`` and the first 8 hex digits
    of its sha256 (the same person every time, and the key itself is never written down)."""
    return holders.get(key) or "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def key_matches(given: bytes | str, keys: list[str]) -> bool:
    """Whether ``given`` is one of ``keys``, in time independent of where (or whether) it differs: the comparison is
    of sha256 digests (equal lengths, so not even a key's length leaks), against every key, without an early exit."""
    given_d = _digest(given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given)
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_d, _digest(key.encode("utf-8")))
    return ok


def matching_key(given: bytes | str, keys: list[str]) -> str | None:
    """The key of ``keys`` that ``given`` is, or None; like :func:`key_matches`, every key is compared."""
    given_d = _digest(given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given)
    found = None
    for key in keys:
        if hmac.compare_digest(given_d, _digest(key.encode("utf-8"))):
            found = key
    return found


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer <token>`` header (the scheme in any case), or None."""
    auth = next((v for k, v in headers if k.lower() == b"authorization"), b"")
    scheme, _, token = auth.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def under_review(path: str) -> bool:
    return path == REVIEW_PREFIX or path.startswith(REVIEW_PREFIX + "/")


class Sessions:
    """The cookie that lets a browser *view* the review pages after its user typed a key once.

    A browser cannot put an ``Authorization`` header on a link it follows, so ``POST /review/session`` (which takes
    the key in that header, like every other route) answers with an HttpOnly, SameSite=Strict cookie holding
    HMAC-SHA256(a secret made when the server started, the key): never the key itself, and worthless after a restart.
    The guard accepts it only for GET and HEAD under ``/review``: it shows pages, it never changes anything, so a
    page of another site that makes the browser send it can at most load a page it cannot read. Decisions need the
    key in the header (the page's script keeps it in the tab's sessionStorage)."""

    def __init__(self, keys: list[str]):
        self._secret = secrets.token_bytes(32)
        self._tokens = [(self.token(k), k) for k in keys]

    def token(self, key: str) -> str:
        return hmac.new(self._secret, key.encode("utf-8"), hashlib.sha256).hexdigest()

    def key_of(self, token: bytes | str | None) -> str | None:
        """The key a session cookie stands for (every token compared), or None."""
        if not token:
            return None
        given = _digest(token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token)
        found = None
        for t, key in self._tokens:
            if hmac.compare_digest(given, _digest(t.encode())):
                found = key
        return found


def cookie_value(headers: list[tuple[bytes, bytes]], name: str) -> bytes | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers, or None."""
    want = name.encode()
    for k, v in headers:
        if k.lower() == b"cookie":
            for part in v.split(b";"):
                key, sep, value = part.strip().partition(b"=")
                if sep and key == want:
                    return value.strip()
    return None


async def send_error(send, status: int, message: str, type_: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_json(message, type_, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: bearer keys on every path but /health (HTTP and WebSocket alike), and the body size cap.

    The header is read from the raw ASGI headers (bytes, first ``Authorization`` wins), the scheme case-insensitively
    (``Bearer``, ``bearer``), the key exactly."""

    def __init__(self, app, keys: list[str], max_body_bytes: int, sessions: Sessions | None = None,
                 login_page: tuple[bytes, dict[str, str]] | None = None):
        self.app, self.keys, self.max_body = app, list(keys), max_body_bytes
        self.sessions, self.login_page = sessions, login_page

    def _authorized(self, scope) -> bool:
        if not self.keys or (scope["type"] == "http" and scope.get("path") in OPEN_PATHS):
            return True
        headers = scope.get("headers", [])
        token = bearer_token(headers)
        if token is not None and key_matches(token, self.keys):
            return True
        # the review session cookie: for viewing the review pages only (GET/HEAD), never for a change
        return (self.sessions is not None and scope["type"] == "http" and scope.get("method") in ("GET", "HEAD")
                and under_review(scope.get("path", ""))
                and self.sessions.key_of(cookie_value(headers, SESSION_COOKIE)) is not None)

    def _wants_login_page(self, scope) -> bool:
        """A browser opening a review page with no key yet: it gets the page that asks for one (still a 401)."""
        accept = next((v for k, v in scope.get("headers", []) if k.lower() == b"accept"), b"")
        return (self.login_page is not None and scope.get("method") == "GET" and under_review(scope.get("path", ""))
                and b"text/html" in accept)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if not self._authorized(scope):
                await send({"type": "websocket.close", "code": 1008})   # policy violation
                return
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            if self._wants_login_page(scope):
                assert self.login_page is not None
                body, headers = self.login_page
                raw = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                       (b"www-authenticate", b"Bearer")]
                raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
                await send({"type": "http.response.start", "status": 401, "headers": raw})
                return await send({"type": "http.response.body", "body": body})
            return await send_error(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                    "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        length = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if length is not None:
            if not _DIGITS.fullmatch(length.strip()):
                return await send_error(send, 400, "invalid Content-Length header", "invalid_request_error")
            if int(length) > self.max_body:
                return await send_error(send, 413, f"request body of {int(length)} bytes is over the limit of "
                                        f"{self.max_body} bytes", "invalid_request_error", "body_too_large")
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read it here, up to the cap, then hand it on as one piece
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return                                     # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                return await send_error(send, 413, f"request body over the limit of {self.max_body} bytes",
                                        "invalid_request_error", "body_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
