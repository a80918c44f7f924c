"""The critique and revise routes: each fetches the critique handler and calls it."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.critique.protocol import CritiqueRequest, CritiqueResponse, ReviseRequest, RevisionRecord
from server.deps import JSON_WORK, Critique
from server.errors import ERROR_RESPONSES
from server.responses import until_disconnected

router = APIRouter()


@router.post("/v1/critique", dependencies=JSON_WORK, responses=ERROR_RESPONSES, response_model=CritiqueResponse)
async def critique(body: CritiqueRequest, handler: Critique, request: Request) -> CritiqueResponse:
    return await until_disconnected(request, handler.critique(body))


@router.post("/v1/revise", dependencies=JSON_WORK, responses=ERROR_RESPONSES, response_model=RevisionRecord,
             response_model_exclude_unset=True)
async def revise(body: ReviseRequest, handler: Critique, request: Request) -> RevisionRecord:
    return await until_disconnected(request, handler.revise(body))
