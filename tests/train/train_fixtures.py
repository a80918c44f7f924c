"""What the training tests share: small flags, run folders built once per module (a fake-backend run with its data;
a QLoRA SFT on the tiny model), and a spy on the base-model loader. Imported by the tests/train modules."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cai.cli import main
from cai.train import parse_config, train

from conftest import constitution_yaml, prompt_rows, write_prompts

SFT_STEPS = 4


def small_flags(model: Path | None = None, steps: int = SFT_STEPS, **extra) -> list[str]:
    flags = ["--max_steps", str(steps), "--save_steps", "2", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "1", "--max_length", "256"]
    if model is not None:
        flags += ["--model_name_or_path", str(model)]
    for k, v in extra.items():
        flags += [f"--{k}", str(v)]
    return flags


def copy_run(src: Path, dest: Path, *, adapters: bool = False) -> Path:
    shutil.copytree(src, dest, ignore=None if adapters else shutil.ignore_patterns("adapters"))
    return dest


def lora_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LoadSpy:
    """Wraps cai.train.trainer.load_model: counts calls and what the loaded base model is made of."""

    def __init__(self, real):
        self.real = real
        self.calls = 0
        self.linear_4bit = 0
        self.decoder_linear = 0

    def __call__(self, *args, **kwargs):
        import bitsandbytes as bnb
        import torch

        model = self.real(*args, **kwargs)
        self.calls += 1
        self.linear_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.model.layers.modules())
        self.decoder_linear = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
        self.is_loaded_in_4bit = getattr(model, "is_loaded_in_4bit", False)
        self.weight_dtypes = {str(m.weight.dtype) for m in model.model.layers.modules()
                              if isinstance(m, bnb.nn.Linear4bit)}
        return model


@pytest.fixture
def load_spy(monkeypatch):
    import cai.train.trainer

    spy = LoadSpy(cai.train.trainer.load_model)
    monkeypatch.setattr(cai.train.trainer, "load_model", spy)
    return spy


@pytest.fixture(autouse=True)
def _no_fake_delay(monkeypatch):
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Run folders, built once


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A fake-backend run folder with its data built: 24 prompts, 2 rounds."""
    root = tmp_path_factory.mktemp("train")
    constitution = root / "constitution.yaml"
    constitution.write_text(constitution_yaml(4))
    prompts = write_prompts(root / "prompts.jsonl", prompt_rows(24))
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAI_FAKE_DELAY", raising=False)
        assert main(["generate", "--backend", "fake", "--constitution", str(constitution), "--prompts", str(prompts),
                     "--out", str(run), "--limit", "24", "--rounds", "2", "--max-new-tokens", "64"]) == 0
        assert main(["data", "build", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def sft_run(base_run, tiny_model_dir, tmp_path_factory):
    """QLoRA SFT, a few steps, on a copy of the base run; a high learning rate so the adapter visibly matters."""
    import cai.train.trainer

    run = copy_run(base_run, tmp_path_factory.mktemp("sft") / "run")
    with pytest.MonkeyPatch.context() as mp:
        spy = LoadSpy(cai.train.trainer.load_model)
        mp.setattr(cai.train.trainer, "load_model", spy)
        manifest = train(parse_config("sft", run, None, small_flags(tiny_model_dir, learning_rate=5e-3)))
    return run, manifest, spy
