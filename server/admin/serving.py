"""The model listing without HTTP: ``/v1/models`` in OpenAI's shape, with what cai knows of each model (the base
model's id and context; each adapter's folder and the lineage of its training manifest; in gateway mode, the
upstreams' model under the served name)."""

from __future__ import annotations

import time

from server.admin.protocol import AdapterInfo, BaseModelInfo, ModelCard, ModelList, UpstreamModelInfo
from server.engine import Engine
from server.settings import lineage


class ModelListing:
    def __init__(self, engine: Engine, manifests: dict[str, dict | None]):
        self.engine = engine
        self.manifests = manifests
        self.started = int(time.time())     # every model's "created": when the server began serving it

    def list(self) -> ModelList:
        e = self.engine
        data = [ModelCard(id=e.base_name, created=self.started,
                          cai=BaseModelInfo(model=e.model_id, revision=e.model_revision,
                                            context_length=e.context_length))]
        for name, folder in e.adapters.items():
            data.append(ModelCard(id=name, created=self.started,
                                  cai=AdapterInfo(path=folder, base_model=e.model_id,
                                                  manifest=lineage(self.manifests.get(name)))))
        return ModelList(data=data)


class UpstreamListing:
    """Gateway mode: the one model, under the name clients ask for."""

    def __init__(self, served_name: str, upstream_model: str, context_length: int | None):
        self.card = ModelCard(id=served_name, created=int(time.time()),
                              cai=UpstreamModelInfo(model=upstream_model, context_length=context_length))

    def list(self) -> ModelList:
        return ModelList(data=[self.card])
