"""API keys and request limits, as one pure ASGI middleware in front of every route.

Authorization is decided on the request path the router will actually see (``scope["path"]``), never on the Host
header or a reconstructed URL: only the exact path ``/health`` is open, so ``//health``, ``/health/``, ``/v1//models``
or any route added later all require a key. Keys are compared in constant time against every configured key (no
early exit that would leak which key prefix matched). Bodies larger than the cap are refused with 413 from the
``Content-Length`` header when there is one, and by counting (reading at most the cap) when it is sent chunked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

from cai.core.errors import CaiError, display_path
from server.errors import error_json

OPEN_PATHS = frozenset({"/health"})
_DIGITS = re.compile(rb"[0-9]{1,18}")   # a Content-Length value (ASCII digits only)


def load_api_keys(key_file: str | Path | None = None, env: str | None = None) -> list[str]:
    """Keys from a file (one a line; blank lines and ``#`` comments ignored) and/or an environment variable holding
    a comma-separated list. No key anywhere means the server runs open (it binds 127.0.0.1 by default)."""
    keys: list[str] = []
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
            if len(line) < 8 or any(c.isspace() for c in line):
                raise CaiError(f"{display_path(path)}:{n}: an API key is at least 8 characters with no spaces")
            keys.append(line)
        if not keys:
            raise CaiError(f"the API key file {display_path(path)} holds no key")
    if env and os.environ.get(env):
        keys += [k.strip() for k in os.environ[env].split(",") if k.strip()]
    return keys


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

    def __init__(self, app, keys: list[str], max_body_bytes: int):
        self.app, self.keys, self.max_body = app, list(keys), max_body_bytes

    def _authorized(self, scope) -> bool:
        if not self.keys or (scope["type"] == "http" and scope.get("path") in OPEN_PATHS):
            return True
        auth = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        scheme, _, token = auth.strip().partition(b" ")
        return scheme.lower() == b"bearer" and key_matches(token.strip(), self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            if not self._authorized(scope):
                await send({"type": "websocket.close", "code": 1008})   # policy violation
                return
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
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
