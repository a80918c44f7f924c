"""What routes depend on, as typed dependencies (``Annotated[X, Depends(...)]``): the app's state, the serving class
of each feature (503 until the model has loaded), the constitution registry, and two guards of work routes (the body
must be declared JSON; no new work once shutdown began)."""

from __future__ import annotations

import email.message
from typing import Annotated

from fastapi import Depends, Request

from server.constitutions import ConstitutionRegistry
from server.critique.serving import CritiqueServing
from server.errors import Unavailable, UnsupportedMediaType
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
    assert state.registry is not None          # set by the lifespan before the first request
    return state.registry


Chat = Annotated[ChatHandler, Depends(chat_serving)]
Critique = Annotated[CritiqueServing, Depends(critique_serving)]
Models = Annotated[ModelLister, Depends(model_listing)]
Registry = Annotated[ConstitutionRegistry, Depends(constitution_registry)]


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
