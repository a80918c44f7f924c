"""The admin wire format: health, the model listing (OpenAI's ``/v1/models`` shape, with a ``cai`` field), and the
constitutions being served."""

from __future__ import annotations

from typing import Any, Literal

from server.wire import Wire

# ---------------------------------------------------------------------------------------------------------------
# Health


class UpstreamHealth(Wire):
    """Gateway mode: one upstream, as ``/health`` shows it."""

    omit_none = ("error",)

    url: str
    up: bool                         # it answered GET /models just now
    error: str | None = None         # why not
    in_rotation: bool                # not cooling down after repeated failures
    outstanding: int                 # requests to it in progress
    served: int                      # requests it answered
    errors: int                      # attempts that failed


class Health(Wire):
    """``/health``: ``status`` is ok, loading, failed or draining; the engine's facts come with ok, ``error`` with
    failed. In gateway mode: ``upstreams`` (ok while one of them answers)."""

    omit_none = ("error", "models", "device", "dtype", "compile", "compiled", "quantize", "queue_depth",
                 "in_flight", "upstreams")

    status: Literal["ok", "loading", "failed", "draining"]
    error: str | None = None
    models: list[str] | None = None
    device: str | None = None
    dtype: str | None = None
    compile: str | None = None           # how the decode step is compiled (--compile MODE)
    compiled: list[str] | None = None    # the models whose decode step is compiled
    quantize: str | None = None          # "int4" (--quantize)
    queue_depth: int | None = None
    in_flight: int | None = None
    upstreams: list[UpstreamHealth] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Models


class BaseModelInfo(Wire):
    kind: Literal["base"] = "base"
    model: str                       # the base model's id
    revision: str | None
    context_length: int | None


class AdapterInfo(Wire):
    kind: Literal["adapter"] = "adapter"
    path: str                        # the adapter folder
    base_model: str
    manifest: dict[str, Any] | None  # the lineage of its training manifest (None: trained elsewhere)


class UpstreamModelInfo(Wire):
    """Gateway mode: the model the upstreams serve."""

    kind: Literal["upstream"] = "upstream"
    model: str                       # the upstreams' name for it
    context_length: int | None       # as given by --context-length (None: unknown here)


class ModelCard(Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cai"
    cai: BaseModelInfo | AdapterInfo | UpstreamModelInfo


class ModelList(Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------------------------
# Constitutions (the shapes of ConstitutionRegistry.describe)


class LoadErrorInfo(Wire):
    """A file whose latest edit did not load (what is served from it, if anything, is older)."""

    path: str
    message: str
    issues: list[str]
    at: str                          # ISO time (UTC) the failure was first seen


class PrincipleInfo(Wire):
    id: str
    sha256: str
    tags: list[str]
    weight: float


class ConstitutionInfo(Wire):
    name: str
    version: str
    description: str
    sha256: str
    path: str
    loaded_at: str
    principles: list[PrincipleInfo]
    exemplars: int                   # how many
    error: LoadErrorInfo | None


class ConstitutionList(Wire):
    data: list[ConstitutionInfo]
    errors: list[LoadErrorInfo]
