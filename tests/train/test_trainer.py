"""`cai train` and `cai merge` on a tiny model, offline on CPU: config resolution and errors, QLoRA SFT and DPO
through TRL, the manifest, guards, resume (after kill -9, or refused), and merging."""

from __future__ import annotations

import json
import math
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from cai.cli import build_parser, main
from cai.core.errors import ConfigError, RunFolderError, TrainingError, display_path
from cai.core.record import read_records
from cai.data.card import read_card
from cai.run import RunFolder
from cai.train import NonFiniteLoss, parse_config, recipe_path, train

from conftest import copy_model_without_chat_template, subprocess_env
from train_fixtures import SFT_STEPS, copy_run, lora_tensors, sha256_file, small_flags

pytest_plugins = ["train_fixtures"]     # base_run, sft_run, load_spy

RECIPES = sorted((Path(__file__).resolve().parents[2] / "cai" / "resources" / "recipes").glob("*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Recipes and configuration


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_parses_and_names_its_command(recipe, tmp_path):
    """A stage's recipe (sft.yaml, dpo.yaml) is the base of `cai train <stage>`; any other (soft-labels.yaml) is a
    --config by name on top of it. Each names its command on its first line, and every value comes from its line."""
    import yaml

    assert {p.stem for p in RECIPES} == {"sft", "dpo", "soft-labels"}
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# cai train "), first
    args, extra = build_parser().parse_known_args(shlex.split(first[2:])[1:])
    assert (args.command, extra) == ("train", [])
    assert args.run is not None
    stage = args.stage
    if recipe.stem in ("sft", "dpo"):
        assert stage == recipe.stem and args.config is None and recipe == recipe_path(stage)
    else:
        assert str(args.config) == recipe.stem and recipe == recipe_path(recipe.stem)
    setup = parse_config(stage, tmp_path, args.config)
    values = yaml.safe_load(recipe.read_text())
    for key, value in values.items():
        if isinstance(value, (bool, int, float)) and not isinstance(value, str):
            got = next(getattr(o, key) for o in (setup.args, setup.model, setup.cai) if hasattr(o, key))
            assert got == value, key
        # every key's source is the recipe file and a line that holds it
        where = setup.sources[key]
        file, _, line = where.rpartition(":")
        assert file == display_path(recipe)
        assert recipe.read_text().splitlines()[int(line) - 1].startswith(f"{key}:")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_key_in_a_user_yaml_names_file_line_and_a_suggestion(tmp_path):
    cfg = _write(tmp_path / "my.yaml", "# my settings\nlora_r: 8\n\nlerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        parse_config("sft", tmp_path, cfg)
    [issue] = e.value.issues
    assert issue.file == display_path(cfg)
    assert issue.line == 4
    assert issue.field == "lerning_rate"
    assert "did you mean 'learning_rate'" in issue.message
    assert f"{display_path(cfg)}:4" in str(e.value)


def test_bad_types_in_yaml_are_reported_each_with_its_line(tmp_path):
    cfg = _write(tmp_path / "my.yaml", "lora_r: sixteen\nlearning_rate: 1.0e-4\nload_in_4bit: maybe\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        parse_config("sft", tmp_path, cfg)
    by_field = {i.field: i for i in e.value.issues}
    assert set(by_field) == {"lora_r", "load_in_4bit", "bogus"}      # every problem at once; learning_rate is fine
    assert (by_field["lora_r"].file, by_field["lora_r"].line) == (display_path(cfg), 1)
    assert "sixteen" in by_field["lora_r"].message
    assert by_field["load_in_4bit"].line == 3 and "maybe" in by_field["load_in_4bit"].message
    assert by_field["bogus"].line == 4


def test_a_list_for_a_one_value_setting_is_reported_with_its_line(tmp_path):
    cfg = _write(tmp_path / "my.yaml", "seed: 1\nmax_steps: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        parse_config("sft", tmp_path, cfg)
    assert [(i.file, i.line, i.field) for i in e.value.issues] == [(display_path(cfg), 2, "max_steps")]


@pytest.mark.parametrize("key, value", [("learning_rate", 2), ("learning_rate", 0), ("learning_rate", -1),
                                        ("lora_r", 0)])
def test_out_of_range_value_in_yaml_names_key_file_and_line(tmp_path, key, value):
    cfg = _write(tmp_path / "my.yaml", f"seed: 1\n{key}: {value}\n")
    with pytest.raises(ConfigError, match="out of range") as e:
        parse_config("sft", tmp_path, cfg)
    [issue] = e.value.issues
    assert (issue.file, issue.line, issue.field) == (display_path(cfg), 2, key)
    assert "out of range" in issue.message and str(value) in issue.message


@pytest.mark.parametrize("words", [["--learning_rate", "2"], ["--learning_rate", "0"], ["--learning_rate", "-1"],
                                   ["--learning_rate=-1"], ["--lora_r", "0"], ["--lora_r=0"]])
def test_out_of_range_flag_names_the_flag(tmp_path, words):
    with pytest.raises(ConfigError, match="out of range") as e:
        parse_config("sft", tmp_path, None, words)
    [issue] = e.value.issues
    flag = words[0].split("=")[0]
    assert issue.field == flag and issue.file is None
    assert flag in str(e.value)


def test_out_of_range_value_from_the_recipe_is_not_blamed_on_a_flag(tmp_path):
    # the DPO beta must be > 0: set in a user YAML, the error names that file
    cfg = _write(tmp_path / "dpo.yaml", "beta: 0\n")
    with pytest.raises(ConfigError) as e:
        parse_config("dpo", tmp_path, cfg)
    [issue] = e.value.issues
    assert (issue.file, issue.line, issue.field) == (display_path(cfg), 1, "beta")


def test_unknown_or_malformed_flag_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown training flag --lernin_rate") as e:
        parse_config("sft", tmp_path, None, ["--lernin_rate", "1e-4"])
    assert "did you mean --learning_rate" in e.value.message
    with pytest.raises(ConfigError, match="bad training flag"):
        parse_config("sft", tmp_path, None, ["--learning_rate", "fast"])
    with pytest.raises(ConfigError, match="unknown training stage"):
        parse_config("ppo", tmp_path)


def test_flags_override_yaml_which_overrides_the_recipe(tmp_path):
    recipe = yaml_values("sft")
    cfg = _write(tmp_path / "my.yaml", "learning_rate: 1.0e-3\nlora_r: 8\n")
    setup = parse_config("sft", tmp_path, cfg, ["--learning_rate", "3e-3"])
    assert setup.args.learning_rate == 3e-3                       # flag over YAML
    assert setup.sources["learning_rate"] == "--learning_rate"
    assert setup.model.lora_r == 8 != recipe["lora_r"]             # YAML over recipe
    assert setup.sources["lora_r"] == f"{display_path(cfg)}:2"
    assert setup.args.per_device_train_batch_size == recipe["per_device_train_batch_size"]   # recipe
    assert setup.sources["per_device_train_batch_size"].startswith(display_path(recipe_path("sft")) + ":")
    # and without the flag, the YAML value
    assert parse_config("sft", tmp_path, cfg).args.learning_rate == 1e-3
    assert parse_config("sft", tmp_path).args.learning_rate == recipe["learning_rate"]
    # checkpoints go under the run folder
    assert Path(setup.args.output_dir) == tmp_path / "adapters" / "sft" / "checkpoints"


def yaml_values(stage: str) -> dict:
    import yaml

    return yaml.safe_load(recipe_path(stage).read_text())


def test_cli_unknown_training_flag_exits_2_without_traceback(base_run, capsys):
    assert main(["train", "sft", str(base_run), "--lernin_rate", "1"]) == 2
    captured = capsys.readouterr()
    assert "--lernin_rate" in captured.err and "did you mean --learning_rate" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (base_run / "adapters").exists()


def test_cli_help_config_lists_settings(capsys):
    assert main(["train", "sft", "--help-config"]) == 0
    out = capsys.readouterr().out
    for flag in ("--learning_rate", "--lora_r", "--load_in_4bit", "--require_sft_adapter", "--completion_only_loss"):
        assert flag in out
    assert main(["train", "dpo", "--help-config"]) == 0
    assert "--beta" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# SFT


def test_sft_trains_a_4bit_lora_adapter_and_writes_its_manifest(sft_run, base_run, tiny_model_dir):
    import torch

    run, manifest, spy = sft_run
    out = run / "adapters" / "sft"
    # the base really was loaded in 4-bit: every linear layer of the decoder is a bitsandbytes Linear4bit
    assert spy.calls == 1
    assert spy.is_loaded_in_4bit
    assert spy.linear_4bit == spy.decoder_linear > 0
    assert spy.weight_dtypes == {"torch.uint8"}
    assert manifest["quantization"]["load_in_4bit"] is True
    assert manifest["quantization"]["bnb_4bit_quant_type"] == "nf4"
    # the adapter learned: LoRA B starts at zero, so a non-zero B means optimizer steps reached it
    tensors = lora_tensors(out)
    b = {k: v for k, v in tensors.items() if "lora_B" in k}
    a = {k: v for k, v in tensors.items() if "lora_A" in k}
    assert b and len(a) == len(b)
    assert any(v.abs().max() > 0 for v in b.values())
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # lineage
    card = read_card(run)
    assert manifest["dataset"]["sha256"] == card["sha256"] == json.loads(
        (base_run / "data" / "card.json").read_text())["sha256"]
    recs = read_records(run)
    assert {c["sha256"] for c in manifest["constitution"]} == {r.provenance.constitution.sha256 for r in recs}
    assert manifest["base_model"]["path"] == str(tiny_model_dir)
    assert manifest["base_model"]["id"] == str(Path(tiny_model_dir).resolve())
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        assert manifest["versions"][pkg] == version(pkg)
    assert manifest["steps"] == SFT_STEPS
    assert manifest["resumed_from_step"] is None
    assert manifest["stage"] == "sft" and manifest["sft_adapter"] is None
    assert manifest["config"]["train"]["learning_rate"] == 5e-3
    # paths into the run folder are stored relative to it (the folder can be moved); the base model is outside it
    assert manifest["dataset"]["card"] == "data/card.json"
    assert manifest["config"]["train"]["output_dir"] == "adapters/sft/checkpoints"
    assert math.isfinite(manifest["metrics"]["train_loss"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "loss.png").stat().st_size > 1000


def test_same_train_command_again_returns_already_done_without_training(sft_run, tiny_model_dir, tmp_path,
                                                                        load_spy, capsys):
    run = copy_run(sft_run[0], tmp_path / "run", adapters=True)
    out = run / "adapters" / "sft"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    flags = small_flags(tiny_model_dir, learning_rate=5e-3)
    manifest = train(parse_config("sft", run, None, flags))
    assert manifest["already_done"] is True and manifest["steps"] == SFT_STEPS
    assert main(["train", "sft", str(run), *flags]) == 0
    assert "already trained" in capsys.readouterr().out
    assert load_spy.calls == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_overwrite_moves_the_old_adapter_aside_and_trains_again(sft_run, tiny_model_dir, tmp_path, load_spy, capsys):
    run = copy_run(sft_run[0], tmp_path / "run", adapters=True)
    out = run / "adapters" / "sft"
    old_manifest = (out / "manifest.json").read_bytes()
    flags = small_flags(tiny_model_dir, learning_rate=5e-3)
    assert main(["train", "sft", str(run), *flags, "--overwrite"]) == 0, capsys.readouterr().err
    assert load_spy.calls == 1
    aside = list((run / "adapters").glob("sft.old-*"))
    assert len(aside) == 1 and aside[0].is_dir()
    assert (aside[0] / "manifest.json").read_bytes() == old_manifest
    new = json.loads((out / "manifest.json").read_text())
    assert "already_done" not in new and new["steps"] == SFT_STEPS and new["resumed_from_step"] is None
    assert (out / "manifest.json").read_bytes() != old_manifest


def test_base_model_without_chat_template_stops_before_training(base_run, tiny_model_dir, tmp_path, load_spy):
    model = copy_model_without_chat_template(tiny_model_dir, tmp_path / "nochat")
    run = copy_run(base_run, tmp_path / "run")
    with pytest.raises(TrainingError, match="no chat template") as e:
        train(parse_config("sft", run, None, small_flags(model)))
    assert "chat_template_path" in e.value.hint
    assert load_spy.calls == 0
    out = run / "adapters" / "sft"
    assert not (out / "checkpoints").exists() and not (out / "manifest.json").exists()


def test_fake_backend_run_without_model_name_is_a_training_error(base_run, tmp_path, load_spy):
    run = copy_run(base_run, tmp_path / "run")
    with pytest.raises(TrainingError, match="fake backend") as e:
        train(parse_config("sft", run, None, small_flags()))
    assert "--model_name_or_path" in e.value.hint
    assert load_spy.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# DPO


def test_dpo_continues_the_sft_adapter(sft_run, load_spy):
    run, _, _ = sft_run
    sft, dpo = run / "adapters" / "sft", run / "adapters" / "dpo"
    manifest = train(parse_config("dpo", run, None, small_flags(steps=2, learning_rate=1e-3)))
    assert manifest["steps"] == 2 and load_spy.calls == 1
    assert manifest["sft_adapter"]["manifest_sha256"] == sha256_file(sft / "manifest.json")
    assert manifest["sft_adapter"]["path"] == "adapters/sft"          # relative to the run folder
    assert RunFolder(run).resolve(manifest["sft_adapter"]["path"]) == sft.resolve()
    assert manifest["dataset"]["card"] == "data/card.json"
    assert manifest["base_model"] == json.loads((sft / "manifest.json").read_text())["base_model"]
    assert "SFT" in manifest["reference"]
    # the final folder holds the policy adapter alone, not TRL's frozen reference copy
    assert not (dpo / "ref").exists()
    assert (dpo / "adapter_model.safetensors").exists() and (dpo / "manifest.json").exists()
    sft_w, dpo_w = lora_tensors(sft), lora_tensors(dpo)
    assert set(sft_w) == set(dpo_w)
    assert any(not (sft_w[k].float() == dpo_w[k].float()).all() for k in sft_w)
    # ... and it started from the SFT weights (a fresh adapter's B would start at zero, far from SFT's B)
    b_keys = [k for k in sft_w if "lora_B" in k]
    sft_b = sum(float(sft_w[k].float().norm()) ** 2 for k in b_keys) ** 0.5
    moved = sum(float((dpo_w[k].float() - sft_w[k].float()).norm()) ** 2 for k in b_keys) ** 0.5
    assert 0 < moved < 0.5 * sft_b
    assert (dpo / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_dpo_without_an_sft_adapter_is_refused_unless_asked(base_run, tiny_model_dir, tmp_path, load_spy):
    run = copy_run(base_run, tmp_path / "run")
    with pytest.raises(TrainingError, match="no finished SFT adapter") as e:
        train(parse_config("dpo", run, None, small_flags(tiny_model_dir, steps=2)))
    assert "cai train sft" in e.value.hint
    assert load_spy.calls == 0 and not (run / "adapters" / "dpo" / "checkpoints").exists()

    manifest = train(parse_config("dpo", run, None, small_flags(tiny_model_dir, steps=2, require_sft_adapter="false")))
    assert manifest["steps"] == 2 and load_spy.calls == 1
    assert manifest["sft_adapter"] is None
    assert manifest["reference"].startswith("base model")
    b = [v for k, v in lora_tensors(run / "adapters" / "dpo").items() if "lora_B" in k]
    assert b and any(v.abs().max() > 0 for v in b)


# ---------------------------------------------------------------------------------------------------------------
# Guards: non-finite loss, out of memory


def _patch_training_step(monkeypatch, wrap):
    import trl

    orig = trl.SFTTrainer.training_step
    monkeypatch.setattr(trl.SFTTrainer, "training_step", lambda self, *a, **k: wrap(orig, self, *a, **k))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base_run, tiny_model_dir, tmp_path, monkeypatch):
    import torch

    run = copy_run(base_run, tmp_path / "run")
    bad_step = 3

    def nan_from(orig, self, *a, **k):
        loss = orig(self, *a, **k)
        return torch.full_like(loss, float("nan")) if self.state.global_step + 1 >= bad_step else loss

    _patch_training_step(monkeypatch, nan_from)
    flags = small_flags(tiny_model_dir, steps=6)
    with pytest.raises(NonFiniteLoss) as e:
        train(parse_config("sft", run, None, flags))
    assert isinstance(e.value, TrainingError)
    assert f"at step {bad_step}" in e.value.message and "nan" in e.value.message
    assert "learning_rate" in e.value.hint
    out = run / "adapters" / "sft"
    assert not (out / "manifest.json").exists()
    ckpts = sorted(out.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, "the checkpoint saved before the bad step is kept"
    newest = ckpts[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["global_step"] < bad_step
    assert all(torch.isfinite(v).all() for v in lora_tensors(newest).values())
    assert all(math.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)

    # the hint's advice works: run again (here without the fault) and it resumes from that checkpoint
    monkeypatch.undo()
    manifest = train(parse_config("sft", run, None, flags))
    assert manifest["resumed_from_step"] == state["global_step"] and manifest["steps"] == 6


def test_out_of_memory_says_which_setting_to_lower(base_run, tiny_model_dir, tmp_path, monkeypatch):
    import torch

    def oom(orig, self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    _patch_training_step(monkeypatch, oom)
    run = copy_run(base_run, tmp_path / "run")
    with pytest.raises(TrainingError) as e:
        train(parse_config("sft", run, None, small_flags(tiny_model_dir)))
    assert not isinstance(e.value, NonFiniteLoss)
    assert "out of GPU memory at step 1" in e.value.message
    assert "per_device_train_batch_size 2" in e.value.message
    assert "per_device_train_batch_size" in e.value.hint and "gradient_accumulation_steps" in e.value.hint


# ---------------------------------------------------------------------------------------------------------------
# Resume in-process: refused with other settings, continued with the same ones


@pytest.fixture(scope="module")
def interrupted(base_run, tiny_model_dir, tmp_path_factory):
    """SFT interrupted (Ctrl-C) at step 3 with a checkpoint at step 2; then a resume with another lora_r (refused);
    then the same command (resumed). Records the trainable parameters' dtypes at every step."""
    import trl

    run = copy_run(base_run, tmp_path_factory.mktemp("interrupted") / "run")
    flags = small_flags(tiny_model_dir)
    dtypes: dict[int, set[str]] = {}
    orig = trl.SFTTrainer.training_step
    stop = {"at": 3}

    def step(self, *a, **k):
        if self.state.global_step + 1 == stop["at"]:
            raise KeyboardInterrupt
        dtypes[self.state.global_step + 1] = {str(p.dtype) for p in self.model.parameters() if p.requires_grad}
        return orig(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl.SFTTrainer, "training_step", step)
        with pytest.raises(KeyboardInterrupt):
            train(parse_config("sft", run, None, flags))
        checkpoints = sorted(p.name for p in (run / "adapters" / "sft" / "checkpoints").glob("checkpoint-*"))
        with pytest.raises(RunFolderError) as refused:
            train(parse_config("sft", run, None, flags + ["--lora_r", "8"]))
        stop["at"] = None
        manifest = train(parse_config("sft", run, None, flags))
    return {"run": run, "checkpoints": checkpoints, "refused": refused.value, "manifest": manifest,
            "dtypes": dtypes}


def test_resume_with_other_settings_is_refused_listing_the_difference(interrupted):
    assert interrupted["checkpoints"] == ["checkpoint-2"]
    e = interrupted["refused"]
    assert "other settings" in e.message
    assert "--overwrite" in e.hint
    diffs = [str(i) for i in e.issues]
    assert len(diffs) == 1, diffs
    assert "lora_r" in diffs[0] and "16" in diffs[0] and "8" in diffs[0]


def test_resume_with_the_same_settings_continues_from_the_checkpoint(interrupted):
    m = interrupted["manifest"]
    assert m["resumed_from_step"] == 2
    assert m["steps"] == SFT_STEPS
    assert sorted(interrupted["dtypes"]) == [1, 2, 3, 4]        # steps 1-2 before, 3-4 after the resume
    state = json.loads((interrupted["run"] / "adapters" / "sft" / "checkpoints" / f"checkpoint-{SFT_STEPS}" /
                        "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, SFT_STEPS + 1))


def test_resume_keeps_the_adapter_dtype(interrupted):
    dtypes = interrupted["dtypes"]
    assert dtypes[3] == dtypes[4] == dtypes[1] == dtypes[2], dtypes


# ---------------------------------------------------------------------------------------------------------------
# Resume after kill -9 (a real `cai train` process)


KILL_STEPS = 30


def _final_loss(run: Path) -> tuple[int, float]:
    state = json.loads((run / "adapters" / "sft" / "checkpoints" / f"checkpoint-{KILL_STEPS}" /
                        "trainer_state.json").read_text())
    last = [h for h in state["log_history"] if "loss" in h][-1]
    return last["step"], last["loss"]


def _complete_checkpoint(folder: Path) -> Path | None:
    for state in folder.glob("checkpoint-*/trainer_state.json"):
        try:
            json.loads(state.read_text())
        except (ValueError, OSError):
            continue            # still being written
        return state.parent
    return None


@pytest.fixture(scope="module")
def killed_and_resumed(base_run, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    killed = copy_run(base_run, root / "killed")
    whole = copy_run(base_run, root / "whole")

    def args(run: Path) -> list[str]:
        return ["train", "sft", str(run), *small_flags(tiny_model_dir, steps=KILL_STEPS)]

    log = open(root / "train.log", "wb")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cai.cli", *args(killed)], cwd=root, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    checkpoints = killed / "adapters" / "sft" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while True:
            if _complete_checkpoint(checkpoints) is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                break
            if proc.poll() is not None:
                pytest.fail(f"cai train exited (rc {proc.returncode}) before a checkpoint was seen:\n"
                            + (root / "train.log").read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")
                     if (p / "trainer_state.json").exists())
    manifest_at_kill = (killed / "adapters" / "sft" / "manifest.json").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAI_FAKE_DELAY", raising=False)
        rc_resume = main(args(killed))
        rc_whole = main(args(whole))
    return {"killed": killed, "whole": whole, "at_kill": at_kill, "manifest_at_kill": manifest_at_kill,
            "rc": (rc_resume, rc_whole)}


@pytest.mark.timeout(300)
def test_kill_9_mid_training_then_same_command_resumes_to_the_end(killed_and_resumed):
    k = killed_and_resumed
    assert k["rc"] == (0, 0)
    assert not k["manifest_at_kill"], "the kill must land before training finished"
    assert k["at_kill"] and max(k["at_kill"]) < KILL_STEPS
    resumed = json.loads((k["killed"] / "adapters" / "sft" / "manifest.json").read_text())
    whole = json.loads((k["whole"] / "adapters" / "sft" / "manifest.json").read_text())
    assert resumed["steps"] == whole["steps"] == KILL_STEPS
    assert resumed["resumed_from_step"] in k["at_kill"] and resumed["resumed_from_step"] >= 2
    assert whole["resumed_from_step"] is None
    assert resumed["dataset"]["sha256"] == whole["dataset"]["sha256"]
    # the log runs on from the checkpoint: every step logged once, all finite
    state = json.loads((k["killed"] / "adapters" / "sft" / "checkpoints" / f"checkpoint-{KILL_STEPS}" /
                        "trainer_state.json").read_text())
    losses = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    assert [s for s, _ in losses] == list(range(1, KILL_STEPS + 1))
    assert all(math.isfinite(v) for _, v in losses)
    step_r, loss_r = _final_loss(k["killed"])
    step_w, loss_w = _final_loss(k["whole"])
    assert step_r == step_w == KILL_STEPS
    assert loss_r == pytest.approx(loss_w, rel=1e-2)       # same training, roughly (see the strict test below)
    assert lora_tensors(k["killed"] / "adapters" / "sft").keys() == lora_tensors(k["whole"] / "adapters" / "sft").keys()


@pytest.mark.timeout(300)
def test_kill_9_resume_matches_the_uninterrupted_run(killed_and_resumed):
    k = killed_and_resumed
    assert k["rc"] == (0, 0)
    step_r, loss_r = _final_loss(k["killed"])
    step_w, loss_w = _final_loss(k["whole"])
    assert step_r == step_w == KILL_STEPS
    # data position, RNG, optimizer and schedule are restored: on CPU the same run, to float rounding
    assert loss_r == pytest.approx(loss_w, rel=1e-5)


def test_a_checkpoint_with_a_torn_trainer_state_is_skipped_on_resume(base_run, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    run = copy_run(base_run, tmp_path / "run")
    flags = small_flags(tiny_model_dir, steps=6)

    def stop_at_5(orig, self, *a, **k):
        if self.state.global_step + 1 == 5:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    _patch_training_step(monkeypatch, stop_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config("sft", run, None, flags))
    monkeypatch.undo()
    ckpts = run / "adapters" / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text("")      # as a kill between create and write leaves it
    manifest = train(parse_config("sft", run, None, flags))
    assert manifest["resumed_from_step"] == 2 and manifest["steps"] == 6


# ---------------------------------------------------------------------------------------------------------------
# Merge


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merge_equals_dequantized_4bit_base_plus_adapter(sft_run, tiny_model_dir, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run, manifest, _ = sft_run
    adapter = run / "adapters" / "sft"
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "-o", str(out)]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "cai_merge.json").read_text())["dequantized_from_4bit"] is True

    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Test question number 3?"}],
                                                tokenize=True, add_generation_prompt=True, return_dict=False)])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not getattr(merged, "is_loaded_in_4bit", False)

    q = manifest["quantization"]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["bnb_4bit_quant_type"],
                             bnb_4bit_use_double_quant=q["use_bnb_nested_quant"],
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=bnb,
                                                device_map={"": "cpu"}).dequantize()
    base_logits = _logits(base.eval(), ids)
    reference = PeftModel.from_pretrained(base, str(adapter)).eval()
    ref_logits = _logits(reference, ids)
    got = _logits(merged, ids)
    torch.testing.assert_close(got, ref_logits, atol=1e-4, rtol=0)
    # the comparison means something: the adapter changes the output, and so does the 4-bit rounding of the base
    assert (ref_logits - base_logits).abs().max() > 1e-2
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = _logits(PeftModel.from_pretrained(original, str(adapter)).eval(), ids)
    assert (plain - got).abs().max() > 1e-3


def test_merge_of_a_folder_that_is_not_an_adapter_exits_2(tmp_path, capsys):
    (tmp_path / "notadapter").mkdir()
    (tmp_path / "notadapter" / "config.json").write_text("{}")
    assert main(["merge", str(tmp_path / "notadapter"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not an adapter folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# A full disk while a checkpoint is saved


@pytest.mark.parametrize("failure", ["torch.save", "safetensors"])
def test_a_full_disk_during_a_checkpoint_is_a_clear_message_then_resumes(base_run, tiny_model_dir, tmp_path,
                                                                          monkeypatch, capsys, failure):
    """torch.save reports a short write only as "unexpected pos" (the disk is looked at), safetensors in words: both
    end in the CLI's full-disk message; the incomplete checkpoint is skipped and the next run resumes before it."""
    import shutil as real_shutil
    from collections import namedtuple

    import peft.peft_model
    import safetensors
    import torch

    import cai.core.files

    run = copy_run(base_run, tmp_path / "run")
    flags = small_flags(tiny_model_dir)                 # 4 steps, a checkpoint every 2
    real_save, real_st = torch.save, peft.peft_model.safe_save_file       # how PEFT writes the adapter

    def full_at_step_4(path) -> bool:
        return f"checkpoint-{SFT_STEPS}" in str(path)

    def torch_save(obj, f, *a, **k):
        if failure == "torch.save" and full_at_step_4(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *a, **k)

    def st_save(tensors, filename, *a, **k):
        if failure == "safetensors" and full_at_step_4(filename):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        return real_st(tensors, filename, *a, **k)

    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", torch_save)
        m.setattr(peft.peft_model, "safe_save_file", st_save)
        m.setattr(cai.core.files.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
        rc = main(["train", "sft", str(run), *flags])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1, err
    assert "Traceback" not in err and "the disk is full" in err and "checkpoints are in" in err
    assert "run the same command again to resume" in err
    out = run / "adapters" / "sft"
    assert not (out / "manifest.json").exists()
    assert real_shutil.disk_usage(tmp_path).free > 1 << 20       # the real disk was never full: it was the patch

    assert main(["train", "sft", str(run), *flags]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 2 and manifest["steps"] == SFT_STEPS
