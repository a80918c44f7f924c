"""Health, metrics, the model listing and the constitutions being served."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from server.admin.protocol import ConstitutionInfo, ConstitutionList, Health, ModelList
from server.deps import WORK, Models, Registry, State
from server.errors import ERROR_RESPONSES, NotFound
from server.responses import json_response

router = APIRouter()


@router.get("/health", summary="liveness and readiness (open: no API key)", response_model=Health)
async def health(state: State) -> Response:
    status, body = await state.health()
    return json_response(body, status)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    return PlainTextResponse(state.metrics.render(state.engine, state.upstream),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", dependencies=WORK, responses=ERROR_RESPONSES, response_model=ModelList)
async def list_models(models: Models) -> ModelList:
    return models.list()


@router.get("/v1/constitutions", dependencies=WORK, responses=ERROR_RESPONSES, response_model=ConstitutionList)
async def constitutions(registry: Registry) -> ConstitutionList:
    return registry.listing()


@router.get("/v1/constitutions/{name}", dependencies=WORK, responses=ERROR_RESPONSES,
            response_model=ConstitutionInfo)
async def constitution(name: str, registry: Registry) -> ConstitutionInfo:
    try:
        return registry.info(name)
    except KeyError:
        raise NotFound(f"unknown constitution {name!r}; this server has: {', '.join(registry.names())}",
                       "name", "constitution_not_found") from None
