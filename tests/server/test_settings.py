"""What is checked before any model loads: an adapter trained on another base model is refused."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["fixtures.server_fixtures"]     # files, app, client, served


def test_an_adapter_trained_on_another_base_is_refused(files, tmp_path):
    from cai.core.errors import ModelError
    from server.settings import check_adapter

    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"base_model": {"id": "some/other-model"}}))
    with pytest.raises(ModelError, match="trained on some/other-model"):
        check_adapter("sft", str(folder), str(files["model"].resolve()))
    (folder / "manifest.json").write_text(json.dumps({"base_model": {"id": str(files["model"].resolve())}}))
    assert check_adapter("sft", str(folder), str(files["model"].resolve()))["base_model"]
