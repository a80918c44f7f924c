"""Soft-label DPO (cai.train.soft_dpo) on the tiny model, offline on CPU: the loss against its formula and against
TRL's own sigmoid DPO on a real batch, the label column from the file to the loss, the options it refuses, the
soft-labels recipe, and the whole chain `cai data build --preferences` → `cai train dpo --config soft-labels` with the
labels in the manifest, resumed after an interruption."""

from __future__ import annotations

import json
import math

import pytest

from cai.cli import main
from cai.core.errors import ConfigError, TrainingError, display_path
from cai.core.record import read_records
from cai.resources import recipe_path, shipped_recipes
from cai.train import parse_config, train

from conftest import preference_line, write_preferences
from train_fixtures import copy_run, sha256_file, small_flags

pytest_plugins = ["train_fixtures"]     # base_run, sft_run, load_spy

BETA = 0.1
# the metrics TRL's DPOTrainer logs
TRL_METRICS = {"entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy", "rewards/chosen",
               "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}


# ---------------------------------------------------------------------------------------------------------------
# The loss


def test_soft_dpo_loss_equals_the_formula_on_hand_made_logratios():
    import torch

    from cai.train.soft_dpo import soft_dpo_loss

    chosen = torch.tensor([-1.0, 2.0, 0.5, 30.0, -3.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.5, 3.0, 0.5, -40.0, 1.0], dtype=torch.float64)
    label = torch.tensor([0.8, 0.6, 0.5, 1.0, 0.0])
    beta = 0.7
    got = soft_dpo_loss(chosen, rejected, label, beta)
    c, r, values = chosen.tolist(), rejected.tolist(), got.detach().tolist()

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    for i in range(5):
        x, p = beta * (c[i] - r[i]), float(label[i])
        want = -p * logsig(x) - (1 - p) * logsig(-x)
        assert values[i] == pytest.approx(want, rel=1e-6, abs=1e-7), i
    assert values[2] == pytest.approx(math.log(2))            # Δ = 0: log 2 whatever the label
    assert values[3] == pytest.approx(0.0, abs=1e-12)         # certain and right: no loss, and finite
    # d loss / d chosen_logratio = β·(σ(βΔ) − p): no push once the policy's preference matches the label
    got.sum().backward()
    for i in range(5):
        x, p = beta * (c[i] - r[i]), float(label[i])
        assert float(chosen.grad[i]) == pytest.approx(beta * (1 / (1 + math.exp(-x)) - p), abs=1e-7), i


def _pairs(n: int, labels: list[float] | None) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"prompt": [{"role": "user", "content": f"Test question number {i} about topic {i % 7}?"}],
               "chosen": [{"role": "assistant", "content": f"A careful answer to question {i}."}],
               "rejected": [{"role": "assistant", "content": f"No {i}."}]}
        if labels is not None:
            row["label"] = labels[i]
        rows.append(row)
    return rows


def _trainer(tiny_model_dir, tmp_path, rows: list[dict], cls=None, **config):
    """A trainer on the tiny model (full fine-tuning, float32) whose reference is the same model with its weights
    nudged, so the policy and the reference differ and Δ ≠ 0 from the first step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from cai.train.soft_dpo import SoftDPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_length=256,
                     per_device_train_batch_size=2, max_steps=2, beta=BETA, save_strategy="no", **config)
    return (cls or SoftDPOTrainer)(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tok)


def _batch(trainer, indices: list[int]) -> dict:
    ds = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([ds[i] for i in indices]))


def _metrics(trainer) -> dict:
    out = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return out


def test_at_label_one_the_loss_and_metrics_equal_trls_sigmoid_dpo_on_a_real_batch(tiny_model_dir, tmp_path):
    import torch
    from trl import DPOTrainer

    trainer = _trainer(tiny_model_dir, tmp_path, _pairs(4, [1.0, 1.0, 1.0, 1.0]))
    trainer.model.train()
    batch = _batch(trainer, [0, 1, 2, 3])
    assert batch["label"].tolist() == [1.0] * 4
    plain = {k: v for k, v in batch.items() if k != "label"}
    with torch.no_grad():
        ours = trainer._compute_loss(trainer.model, batch, False)
        ours_metrics = _metrics(trainer)
        trainer._total_train_tokens = 0          # the running token count, logged as num_tokens
        trls = DPOTrainer._compute_loss(trainer, trainer.model, plain, False)
        trls_metrics = _metrics(trainer)
    assert float(ours) == pytest.approx(float(trls), rel=1e-5)
    assert abs(float(trls) - math.log(2)) > 1e-3          # the policy and the reference differ: Δ ≠ 0
    assert TRL_METRICS <= set(ours_metrics)
    for key in TRL_METRICS:
        assert ours_metrics[key] == pytest.approx(trls_metrics[key], rel=1e-5, abs=1e-6), key
    assert ours_metrics["labels/mean"] == [1.0]
    # and a batch without a label column is TRL's own loss, exactly
    with torch.no_grad():
        assert float(trainer._compute_loss(trainer.model, plain, False)) == float(trls)


@pytest.mark.parametrize("p", [0.9, 0.6, 0.5, 0.2])
def test_a_soft_label_gives_the_formula_on_trls_own_delta(tiny_model_dir, tmp_path, p):
    """One pair a batch: TRL's logged reward margin is that pair's βΔ, so the soft loss must be the formula at it."""
    import torch
    from trl import DPOTrainer

    trainer = _trainer(tiny_model_dir, tmp_path, _pairs(2, [p, p]))
    trainer.model.train()
    batch = _batch(trainer, [0])
    with torch.no_grad():
        ours = float(trainer._compute_loss(trainer.model, batch, False))
        _metrics(trainer)
        trls = float(DPOTrainer._compute_loss(trainer, trainer.model,
                                              {k: v for k, v in batch.items() if k != "label"}, False))
    x = _metrics(trainer)["rewards/margins"][0]
    assert abs(x) > 1e-3
    sig = 1 / (1 + math.exp(-x))
    assert ours == pytest.approx(-p * math.log(sig) - (1 - p) * math.log(1 - sig), rel=1e-5)
    assert trls == pytest.approx(-math.log(sig), rel=1e-5)
    assert ours != pytest.approx(trls, rel=1e-5)       # a soft label changes the loss


def test_the_label_column_survives_dataset_preparation_and_reaches_the_loss(tiny_model_dir, tmp_path, monkeypatch):
    import cai.train.soft_dpo as soft_dpo

    labels = [0.9, 0.6, 0.75, 0.55]
    trainer = _trainer(tiny_model_dir, tmp_path, _pairs(4, labels))
    # TRL's tokenization keeps the column, the column removal keeps it, the collator turns it into a tensor
    assert trainer.train_dataset["label"] == pytest.approx(labels)
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].dtype.is_floating_point and batch["label"].shape == (2,)
    assert set(batch) >= {"input_ids", "attention_mask", "completion_mask", "label"}
    seen: list[float] = []
    real = soft_dpo.soft_dpo_loss

    def spy(chosen, rejected, label, beta):
        seen.extend(label.tolist())
        return real(chosen, rejected, label, beta)

    monkeypatch.setattr(soft_dpo, "soft_dpo_loss", spy)
    trainer.train()
    assert len(seen) == 4 and sorted(seen) == pytest.approx(sorted(labels))   # 2 steps x 2 pairs: every label once
    # TRL's own trainer drops the column: why the subclass exists
    from trl import DPOTrainer

    plain = _trainer(tiny_model_dir, tmp_path / "plain", _pairs(4, labels), cls=DPOTrainer)
    assert "label" not in next(iter(plain.get_train_dataloader()))


def test_precomputed_reference_log_probs_and_evaluate_on_a_new_dataset_take_the_label(tiny_model_dir, tmp_path):
    from datasets import Dataset

    trainer = _trainer(tiny_model_dir, tmp_path, _pairs(4, [0.9, 0.6, 0.75, 0.55]), precompute_ref_log_probs=True)
    assert {"ref_chosen_logps", "ref_rejected_logps", "label"} <= set(trainer.train_dataset.column_names)
    assert math.isfinite(trainer.train().training_loss)
    # evaluate() on a dataset given then precomputes its reference log-probs through the collator that adds the label
    metrics = trainer.evaluate(Dataset.from_list(_pairs(2, [0.8, 0.7])))
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_labels/mean"] == pytest.approx(0.75)


def test_without_a_label_column_it_trains_as_trls_sigmoid_dpo(tiny_model_dir, tmp_path):
    from trl import DPOTrainer

    ours = _trainer(tiny_model_dir, tmp_path / "a", _pairs(4, None))
    assert "label" not in ours.train_dataset.column_names
    assert "label" not in next(iter(ours.get_train_dataloader()))
    trls = _trainer(tiny_model_dir, tmp_path / "b", _pairs(4, None), cls=DPOTrainer)
    a, b = ours.train(), trls.train()
    assert a.training_loss == pytest.approx(b.training_loss, rel=1e-6)
    assert not any(k.startswith("labels/") for h in ours.state.log_history for k in h)


def test_a_label_that_is_not_a_probability_is_refused_before_training(tiny_model_dir, tmp_path):
    from cai.core.errors import DataError

    with pytest.raises(DataError, match=r"label column holds 1 value\(s\) that are not probabilities") as e:
        _trainer(tiny_model_dir, tmp_path, _pairs(3, [0.7, 1.5, 0.9]))
    assert "row 2: 1.5" in e.value.message


@pytest.mark.parametrize("config, key", [({"loss_type": ["ipo"]}, "loss_type"), ({"ld_alpha": 0.5}, "ld_alpha"),
                                         ({"f_divergence_type": "forward_kl"}, "f_divergence_type"),
                                         ({"use_weighting": True}, "use_weighting"),
                                         ({"label_smoothing": 0.1}, "label_smoothing")])
def test_the_trainer_refuses_options_soft_labels_do_not_support(tiny_model_dir, tmp_path, config, key):
    with pytest.raises(ConfigError) as e:
        _trainer(tiny_model_dir, tmp_path, _pairs(2, [0.8, 0.8]), **config)
    assert [i.field for i in e.value.issues] == [key]


# ---------------------------------------------------------------------------------------------------------------
# Configuration: the recipe, our option, the refusals named where they were set


def test_the_soft_labels_recipe_by_name_turns_the_loss_on(tmp_path):
    assert "soft-labels" in shipped_recipes()
    setup = parse_config("dpo", tmp_path, "soft-labels")
    assert setup.cai.soft_labels is True and setup.args.loss_type == ["sigmoid"]
    recipe = recipe_path("soft-labels")
    assert setup.sources["soft_labels"].startswith(display_path(recipe) + ":")
    # the stage's recipe still lies under it
    assert setup.sources["learning_rate"].startswith(display_path(recipe_path("dpo")) + ":")
    assert parse_config("dpo", tmp_path, "soft-labels.yaml").cai.soft_labels is True
    assert parse_config("dpo", tmp_path, str(recipe)).cai.soft_labels is True      # a path, as before
    assert parse_config("dpo", tmp_path).cai.soft_labels is False                  # off by default
    with pytest.raises(ConfigError, match="config file soft-label not found") as e:
        parse_config("dpo", tmp_path, "soft-label")
    assert "soft-labels" in e.value.message and "sft" in e.value.message


@pytest.mark.parametrize("words, key", [(["--loss_type", "hinge"], "--loss_type"),
                                        (["--ld_alpha", "0.5"], "--ld_alpha"),
                                        (["--f_divergence_type", "js_divergence"], "--f_divergence_type"),
                                        (["--use_weighting", "true"], "--use_weighting"),
                                        (["--label_smoothing", "0.1"], "--label_smoothing")])
def test_unsupported_options_with_soft_labels_are_a_config_error_naming_the_flag(tmp_path, words, key):
    with pytest.raises(ConfigError, match="soft-label DPO does not support") as e:
        parse_config("dpo", tmp_path, "soft-labels", words)
    assert [i.field for i in e.value.issues] == [key]
    parse_config("dpo", tmp_path, None, words)           # plain DPO takes them


def test_an_unsupported_option_in_a_yaml_is_named_with_its_file_and_line(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("soft_labels: true\nbeta: 0.2\nloss_type: [sigmoid, sft]\n")
    with pytest.raises(ConfigError) as e:
        parse_config("dpo", tmp_path, cfg)
    [issue] = e.value.issues
    assert (issue.file, issue.line, issue.field) == (display_path(cfg), 3, "loss_type")
    assert "sigmoid" in issue.message


def test_soft_labels_for_sft_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="soft_labels applies to DPO only") as e:
        parse_config("sft", tmp_path, None, ["--soft_labels", "true"])
    assert e.value.issues[0].field == "--soft_labels"


def test_help_config_documents_soft_labels(capsys):
    assert main(["train", "dpo", "--help-config"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--soft_labels" in out and "--preferences" in out and "soft-labels" in out


# ---------------------------------------------------------------------------------------------------------------
# The whole chain on the tiny model


LABELS = (0.9, 0.3, 0.65, 0.8, 0.55, 0.2)


@pytest.fixture(scope="module")
def labelled_sft_run(sft_run, tmp_path_factory):
    """The SFT run (adapter included) with a hand-written preferences.jsonl over its records."""
    run = copy_run(sft_run[0], tmp_path_factory.mktemp("labelled") / "run", adapters=True)
    recs = read_records(run)
    write_preferences(run, [preference_line(r, LABELS[i % len(LABELS)]) for i, r in enumerate(recs)]
                      + [preference_line(recs[0], None, n=1)])
    return run


def test_data_build_preferences_then_train_dpo_soft_labels_names_the_labels(labelled_sft_run, tmp_path, capsys):
    run = copy_run(labelled_sft_run, tmp_path / "run", adapters=True)
    assert main(["data", "build", str(run), "--preferences", "--test-size", "0.25"]) == 0, capsys.readouterr().err
    card = json.loads((run / "data" / "card.json").read_text())
    assert card["preferences"]["unlabelled"] == 1 and card["counts"]["dpo_test"] > 0
    flags = small_flags(steps=4, learning_rate=1e-3) + ["--eval_strategy", "steps", "--eval_steps", "2"]
    assert main(["train", "dpo", str(run), "--config", "soft-labels", *flags]) == 0, capsys.readouterr().err
    out = run / "adapters" / "dpo"
    manifest = json.loads((out / "manifest.json").read_text())
    labels = manifest["labels"]
    assert labels == {"preferences": "preferences.jsonl",
                      "preferences_sha256": sha256_file(run / "preferences.jsonl"),
                      "feedback_models": ["judge-7b"], "mode": "soft", "min_confidence": 0.5,
                      "pairs_used": card["counts"]["dpo_train"] + card["counts"]["dpo_test"],
                      "loss": "soft-label sigmoid DPO", "check": None}
    assert manifest["config"]["cai"]["soft_labels"] is True
    assert manifest["dataset"]["sha256"] == card["sha256"] and manifest["steps"] == 4
    assert manifest["sft_adapter"]["path"] == "adapters/sft"
    # the soft-label trainer trained it: the labels' mean is logged beside TRL's metrics, in training and in eval
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    train_labels = [r["label"] for r in map(json.loads, (run / "data" / "dpo_train.jsonl").read_text().splitlines())]
    assert len(steps) == 4 and all(TRL_METRICS <= set(h) for h in steps)
    assert all(min(train_labels) <= h["labels/mean"] <= max(train_labels) for h in steps)
    assert any(h["labels/mean"] < 1 for h in steps)
    assert all(math.isfinite(h["loss"]) for h in steps)
    assert any("eval_labels/mean" in h for h in state["log_history"])
    assert math.isfinite(manifest["metrics"]["eval_loss"])


def test_hard_labels_train_with_plain_dpo_and_soft_labels_never_do(labelled_sft_run, tmp_path, load_spy, capsys):
    run = copy_run(labelled_sft_run, tmp_path / "run", adapters=True)
    assert main(["data", "build", str(run), "--preferences"]) == 0
    # soft labels, plain DPO: refused before any model is loaded (it would drop the labels)
    with pytest.raises(TrainingError, match="holds soft labels") as e:
        train(parse_config("dpo", run, None, small_flags(steps=2)))
    assert "--config soft-labels" in e.value.hint and "--preference-labels hard" in e.value.hint
    assert load_spy.calls == 0
    # hard labels: plain DPO, and the manifest says which labels
    assert main(["data", "build", str(run), "--preferences", "--preference-labels", "hard", "--min-confidence",
                 "0.7"]) == 0
    manifest = train(parse_config("dpo", run, None, small_flags(steps=2)))
    assert (manifest["labels"]["mode"], manifest["labels"]["min_confidence"]) == ("hard", 0.7)
    assert manifest["labels"]["loss"] == "sigmoid DPO" and manifest["config"]["cai"]["soft_labels"] is False
    state = json.loads((run / "adapters" / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert not any("labels/mean" in h for h in state["log_history"])


def test_soft_labels_on_the_records_own_pairs_is_refused(base_run, tmp_path, load_spy):
    run = copy_run(base_run, tmp_path / "run")
    with pytest.raises(TrainingError, match="soft_labels is on .*soft-labels.yaml.* has no labels") as e:
        train(parse_config("dpo", run, "soft-labels", small_flags(steps=2, require_sft_adapter="false")))
    assert "--preferences" in e.value.hint and "cai label" in e.value.hint
    assert load_spy.calls == 0


def test_soft_label_dpo_resumes_from_its_checkpoint_and_refuses_other_labels(labelled_sft_run, tmp_path):
    from cai.core.errors import RunFolderError
    from cai.train.soft_dpo import SoftDPOTrainer

    run = copy_run(labelled_sft_run, tmp_path / "run", adapters=True)
    assert main(["data", "build", str(run), "--preferences"]) == 0
    flags = small_flags(steps=4, learning_rate=1e-3)
    orig = SoftDPOTrainer.training_step
    stop = {"at": 3}

    def step(self, *a, **k):
        if self.state.global_step + 1 == stop["at"]:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SoftDPOTrainer, "training_step", step)
        with pytest.raises(KeyboardInterrupt):
            train(parse_config("dpo", run, "soft-labels", flags))
    ckpts = run / "adapters" / "dpo" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2"]
    # other labels (a cut) are other data: the resume is refused, naming the dataset
    assert main(["data", "build", str(run), "--preferences", "--min-confidence", "0.7"]) == 0
    with pytest.raises(RunFolderError, match="other settings or data") as e:
        train(parse_config("dpo", run, "soft-labels", flags))
    assert any("dataset_sha256" in str(i) for i in e.value.issues)
    # the same labels again: it resumes from step 2 to the end
    assert main(["data", "build", str(run), "--preferences"]) == 0
    manifest = train(parse_config("dpo", run, "soft-labels", flags))
    assert manifest["resumed_from_step"] == 2 and manifest["steps"] == 4
    assert manifest["labels"]["mode"] == "soft"
    state = json.loads((ckpts / "checkpoint-4" / "trainer_state.json").read_text())
    resumed = [(h["step"], h["loss"], h["labels/mean"]) for h in state["log_history"] if "loss" in h]
    assert [s for s, _, _ in resumed] == [1, 2, 3, 4]
    # the same run as one without the interruption: data order (labels included), optimizer and schedule restored
    whole = copy_run(labelled_sft_run, tmp_path / "whole", adapters=True)
    assert main(["data", "build", str(whole), "--preferences"]) == 0
    train(parse_config("dpo", whole, "soft-labels", flags))
    state = json.loads((whole / "adapters" / "dpo" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    uninterrupted = [(h["step"], h["loss"], h["labels/mean"]) for h in state["log_history"] if "loss" in h]
    assert [m for _, _, m in resumed] == [m for _, _, m in uninterrupted]
    assert [x for _, x, _ in resumed] == pytest.approx([x for _, x, _ in uninterrupted], rel=1e-5)
