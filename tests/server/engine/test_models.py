"""LoRA adapters served beside the base model (each wave one model), and bad adapters refused as model errors."""

from __future__ import annotations

import pytest
from fixtures.engine_fixtures import GREEDY, Reference, lora_adapter

from cai.core.errors import ModelError
from server.engine import (
    Engine,
)

from conftest import LONG, MEDIUM

pytest_plugins = ["fixtures.engine_fixtures"]     # make_engine, engine, reference


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"sft": lora_adapter(tiny_model_dir, root / "sft", 1),
            "dpo": lora_adapter(tiny_model_dir, root / "dpo", 2)}


def test_adapters_are_served_beside_the_base_model(make_engine, adapter_dirs, tiny_model_dir, reference):
    e = make_engine(start=False, adapters={k: str(v) for k, v in adapter_dirs.items()})
    assert e.model_names == ["base", "sft", "dpo"]
    # interleaved requests for three models: each wave holds one model only
    order = [("base", MEDIUM), ("sft", MEDIUM), ("base", LONG), ("dpo", MEDIUM), ("sft", LONG)]
    handles = [e.submit(name, conv, GREEDY) for name, conv in order]
    e.start()
    results = [h.result(30).text for h in handles]
    refs = {"base": reference, **{k: Reference(tiny_model_dir, v) for k, v in adapter_dirs.items()}}
    for (name, conv), text in zip(order, results):
        assert text == refs[name].greedy(conv, GREEDY.max_tokens)[0], name
    assert results[1] != results[0]                          # the adapter changes the output
    assert results[3] not in (results[0], results[1])
    assert max(e.batch_sizes) == 2                           # base+base, then sft+sft, then dpo


def test_bad_adapters_are_model_errors(tiny_model_dir, tmp_path, adapter_dirs):
    with pytest.raises(ModelError, match="adapter 'x'.*does not exist"):
        Engine(str(tiny_model_dir), {"x": str(tmp_path / "missing")}, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter 'y'.*no adapter_config.json"):
        Engine(str(tiny_model_dir), {"y": str(tmp_path / "empty")}, device="cpu")
    with pytest.raises(ModelError, match="not allowed"):
        Engine(str(tiny_model_dir), {"base": str(adapter_dirs["sft"])}, device="cpu")
