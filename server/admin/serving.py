"""The model listing without HTTP: ``/v1/models`` in OpenAI's shape, with what cai knows of each model (the base
model's id and context; each adapter's folder and the lineage of its training manifest)."""

from __future__ import annotations

import time

from server.admin.protocol import AdapterInfo, BaseModelInfo, ModelCard, ModelList
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
