"""Every failure becomes the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``, with its HTTP
status chosen in one place: :func:`error_body`. The rule is that anything the caller got wrong is a 4xx (a schema
violation, malformed JSON, a wrong content type, an unknown model or principle, a prompt over the context), a busy
server is 429 with ``Retry-After``, a server that is loading or shutting down is 503, and only the server's own
failures are 5xx. In gateway mode an upstream that fails is 502, one that is busy or out of rotation 503 (with
``Retry-After``), one that does not answer in time 504 (:data:`UPSTREAM_STATUS`).

The serving classes raise the exceptions defined here (or the engine's ``UnknownModel``, ``QueueFull``,
``EngineStopped``, cai's ``ContextLengthError``); they know nothing of HTTP statuses.

Bodies are written as ASCII JSON (``ensure_ascii``): a message that quotes the caller's input (an unknown model name
with a lone surrogate in it) can always be encoded.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from cai.core.errors import CaiError, ContextLengthError
from server.engine import EngineStopped, QueueFull, UnknownModel

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# What the serving classes raise


class InvalidRequest(ValueError):
    """The caller asked for something this server will not do (400). ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class ContextTooLong(InvalidRequest):
    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message, param, "context_length_exceeded")


class NotFound(LookupError):
    """A named thing (constitution) this server does not have (404)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Conflict(Exception):
    """The request is about a state that is no longer there (409): a decision about content that changed since the
    reviewer opened it."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class GenerationFailed(RuntimeError):
    """The engine could not finish a request (a failed wave, a shutdown that ran out of time): the server's
    problem, not the caller's (5xx)."""


class UpstreamError(Exception):
    """Gateway mode: the upstream engine did not answer usefully. ``kind`` says how (the failure kinds of
    :mod:`cai.backends.openai`, plus ``auth`` and ``not_found``); :data:`UPSTREAM_STATUS` gives its status. ``code``
    and ``param``, when set, are the upstream's own (a request it refused)."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_after, self.code, self.param = kind, message, retry_after, code, param


# kind -> (status, code). The caller's request was fine: the upstream failed (502), is busy or out (503, with
# Retry-After), or did not answer in time (504); only a request the upstream refused (another 4xx) is the caller's.
UPSTREAM_STATUS: dict[str, tuple[int, str]] = {
    "unreachable": (502, "upstream_unreachable"),     # connection refused, reset or dropped (after retries)
    "error": (502, "upstream_error"),                 # a 5xx (after retries)
    "bad_response": (502, "upstream_bad_response"),   # not JSON, no choices, not an event stream (after retries)
    "auth": (502, "upstream_auth_failed"),            # the upstream refused the gateway's key
    "not_found": (502, "upstream_not_found"),         # the upstream does not serve that URL or model
    "busy": (503, "upstream_busy"),                   # 429 (after retries)
    "unavailable": (503, "upstream_unavailable"),     # 503 (after retries), or every upstream out of rotation
    "timeout": (504, "upstream_timeout"),             # no answer within --upstream-timeout (after retries)
    "rejected": (400, "upstream_rejected"),           # another 4xx: the upstream refused this request
}


class Unavailable(Exception):
    """The server takes no work now: loading the model, failed to load it, or shutting down (503)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class UnsupportedMediaType(Exception):
    """A body that is not declared as JSON (415). Only ``application/json`` (or ``*+json``) is read: a plain
    ``text/plain`` or form POST is what a web page can send cross-site without a CORS preflight, so refusing it
    keeps a browser from driving a key-less server on 127.0.0.1."""


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; nobody reads the response (logged as 499)."""


# ---------------------------------------------------------------------------------------------------------------
# The error body


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_json(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error body as a JSON-ready dict (every key present, null included)."""
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()


# What the OpenAPI description lists for the work routes
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in [
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model or constitution"),
        (413, "body too large"), (415, "body is not JSON"), (429, "queue full (see Retry-After)"),
        (502, "gateway mode: the upstream failed"), (503, "loading, shutting down, or the upstream busy or out"),
        (504, "gateway mode: the upstream did not answer in time")]}


# ---------------------------------------------------------------------------------------------------------------
# The one map


def _param(loc: tuple | list) -> str | None:
    """A validation error location as a field path: ("body", "messages", 0, "role") -> "messages[0].role".
    Pydantic's union-member tags ("str", "list[TextPart]", "constrained-str", "function-after[...]") are left out
    (field names are Python identifiers: never a "[" or a "-")."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        item = str(item)
        if "[" in item or "-" in item or item in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue
        parts.append(item)
    return ".".join(parts) or None


def _validation(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, None
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON: {detail}".rstrip(": "), None, "invalid_json"
    param = _param(first.get("loc", ()))
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object", None, "invalid_type"
    if param is None and kind == "missing":
        return "the request needs a JSON body", None, "missing_body"
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else message + more), param, kind or None


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for any exception: the one mapping of the service."""
    headers: dict[str, str] = {}
    body = error_json

    if isinstance(exc, RequestValidationError):
        message, param, code = _validation(exc)
        return 400, body(message, "invalid_request_error", param, code), headers
    if isinstance(exc, InvalidRequest):          # ContextTooLong among them
        return 400, body(exc.message, "invalid_request_error", exc.param, exc.code), headers
    if isinstance(exc, ContextLengthError):
        message = "; ".join([exc.message] + [i.message for i in exc.issues])
        return 400, body(message, "invalid_request_error", "messages", "context_length_exceeded"), headers
    if isinstance(exc, UnknownModel):
        return 404, body(str(exc), "invalid_request_error", "model", "model_not_found"), headers
    if isinstance(exc, NotFound):
        return 404, body(exc.message, "invalid_request_error", exc.param, exc.code), headers
    if isinstance(exc, Conflict):
        return 409, body(exc.message, "invalid_request_error", exc.param, exc.code), headers
    if isinstance(exc, UnsupportedMediaType):
        return 415, body(str(exc), "invalid_request_error", None, "unsupported_media_type"), headers
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return 429, body(str(exc), "rate_limit_error", None, "queue_full"), headers
    if isinstance(exc, Unavailable):
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        return 503, body(exc.message, "server_error", None, "unavailable"), headers
    if isinstance(exc, UpstreamError):
        status, code = UPSTREAM_STATUS.get(exc.kind, (502, "upstream_error"))
        if status == 503:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after or 1)))
        kind = "invalid_request_error" if status < 500 else "server_error"
        return status, body(exc.message, kind, exc.param, exc.code or code), headers
    if isinstance(exc, EngineStopped):
        return 503, body(str(exc), "server_error", None, "unavailable"), headers
    if isinstance(exc, ClientDisconnected):
        return 499, body("the client closed the connection", "invalid_request_error", None, "client_closed"), headers
    if isinstance(exc, StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return exc.status_code, body(detail, kind, None, codes.get(exc.status_code)), dict(exc.headers or {})
    if isinstance(exc, GenerationFailed):
        return 500, body(str(exc), "server_error", None, "generation_failed"), headers
    if isinstance(exc, CaiError):
        return 400, body(exc.message, "invalid_request_error"), headers
    log.error("unhandled error", exc_info=exc)
    return 500, body("internal server error", "server_error", None, "internal_error"), headers


def error_response(exc: BaseException) -> Response:
    status, content, headers = error_body(exc)
    return Response(json.dumps(content, ensure_ascii=True), status_code=status, headers=headers,
                    media_type="application/json")


async def handle_error(request: Any, exc: Exception) -> Response:
    """The exception handler registered for every exception class (see create_app)."""
    return error_response(exc)


HANDLED = (RequestValidationError, StarletteHTTPException, InvalidRequest, NotFound, Conflict, UnknownModel,
           ContextLengthError, QueueFull, EngineStopped, Unavailable, UpstreamError, UnsupportedMediaType,
           ClientDisconnected, GenerationFailed, CaiError, Exception)
