"""What routes depend on, as typed dependencies (``Annotated[X, Depends(...)]``): the app's state, the serving class
of each feature (503 until the model has loaded; the review page's needs no model), the constitution registry, who
is reviewing, and two guards of work routes (the body must be declared JSON; no new work once shutdown began)."""

from __future__ import annotations

import email.message
from typing import Annotated

from fastapi import Depends, Request

from server.constitutions import ConstitutionRegistry
from server.critique.serving import CritiqueServing
from server.errors import NotFound, Unavailable, UnsupportedMediaType
from server.review.serving import ReviewServing
from server.security import SESSION_COOKIE, bearer_token, cookie_value, holder_of, matching_key
from server.state import ChatHandler, ModelLister, ServerState


async def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


async def chat_serving(state: State) -> ChatHandler:
    return state.ready().chat


async def critique_serving(state: State) -> CritiqueServing:
    return state.ready().critique


async def model_listing(state: State) -> ModelLister:
    return state.ready().models


async def constitution_registry(state: State) -> ConstitutionRegistry:
    if state.registry is None:                 # set by the lifespan, unless the server serves no constitution
        raise Unavailable("this server serves no constitution (it was started by `cai review`)")
    return state.registry


async def review_serving(state: State) -> ReviewServing:
    if state.review is None:
        raise NotFound("this server shows no run for review (start it with `cai serve --review RUN` or "
                       "`cai review RUN`)", None, "review_not_enabled")
    return state.review


async def reviewer(request: Request, state: State) -> str | None:
    """Who is asking, by the API key that let them in (the header's, else the review session cookie's): the name
    the key file gives the key, else ``key-`` and its hash's first digits. None on a server with no keys (the
    reviewer names themself)."""
    keys = list(state.settings.api_keys)
    if not keys:
        return None
    headers = request.scope.get("headers", [])
    token = bearer_token(headers)
    key = matching_key(token, keys) if token else None
    if key is None and state.sessions is not None:
        key = state.sessions.key_of(cookie_value(headers, SESSION_COOKIE))
    return holder_of(key, state.settings.key_holders) if key else None


Chat = Annotated[ChatHandler, Depends(chat_serving)]
Critique = Annotated[CritiqueServing, Depends(critique_serving)]
Models = Annotated[ModelLister, Depends(model_listing)]
Registry = Annotated[ConstitutionRegistry, Depends(constitution_registry)]
Review = Annotated[ReviewServing, Depends(review_serving)]
Reviewer = Annotated[str | None, Depends(reviewer)]


async def require_json(request: Request) -> None:
    """Only a body declared as JSON is read (see UnsupportedMediaType for why)."""
    value = request.headers.get("content-type")
    if value:
        m = email.message.Message()
        m["content-type"] = value
        if m.get_content_maintype() == "application" and (
                m.get_content_subtype() == "json" or m.get_content_subtype().endswith("+json")):
            return
    raise UnsupportedMediaType(f"send the body as JSON with 'Content-Type: application/json' (got "
                               f"{value or 'no content type'!s})")


async def accepting(state: State) -> None:
    """New work is refused (503) once shutdown began."""
    if state.draining:
        raise Unavailable("the server is shutting down")


WORK = [Depends(accepting)]                             # the guards of a route that takes work
JSON_WORK = [Depends(require_json), Depends(accepting)]  # ... and reads a JSON body
