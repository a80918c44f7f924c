"""Fine-tuning: TRL's SFTTrainer / DPOTrainer with PEFT LoRA on a bitsandbytes 4-bit (NF4) base: QLoRA.

The settings come from :mod:`cai.train.config`, the checks from :mod:`cai.train.guards`, what is written down from
:mod:`cai.train.manifest`. Layout of ``<run>/adapters/<stage>/`` (:meth:`cai.run.RunFolder.adapter_dir`):

- ``checkpoints/checkpoint-N/`` every ``save_steps``: adapter, optimizer, scheduler, RNG and trainer state (written
  last: a checkpoint without ``trainer_state.json`` was cut short and is ignored). Running the same command again
  after a crash or ``kill -9`` resumes from the newest complete one (data position, optimizer and schedule restored).
- ``train_config.json``: the resolved config and dataset hash, written when training starts; a resume with another
  config or dataset is refused (``--overwrite`` moves the old folder aside and starts again).
- the final adapter (``adapter_model.safetensors``, ``adapter_config.json``, tokenizer), ``loss.png``, and
  ``manifest.json`` (lineage: base model, constitution, dataset, config, metrics, library versions, git commit),
  written last: an adapter folder with a manifest is finished.

**A full disk** never costs finished work: the complete checkpoints stay, a checkpoint cut short is removed (it
would never be resumed from, and its space is what the retry needs), the final adapter is written to a temporary
folder first and the manifest atomically. The error is an ``OSError`` with ``errno.ENOSPC`` (attribute ``kept``:
what is safe); running the same command again once there is space resumes from the newest complete checkpoint.

**DPO after SFT.** DPO starts from the SFT adapter (on the same 4-bit base) and trains it further; the reference
model is a frozen copy of the SFT adapter (TRL's ``ref`` adapter), i.e. base + SFT, which is what the DPO objective
assumes. Nothing is merged, so the DPO adapter alone, on the original base, is the final model.

**AI-feedback labels.** DPO rows built with ``cai data build --preferences`` carry a ``label`` column. Soft labels
train with ``soft_labels: true`` (the ``soft-labels`` recipe): :class:`cai.train.soft_dpo.SoftDPOTrainer`; hard ones
(label 1.0) with plain DPO. Soft labels given to plain DPO, or ``soft_labels`` on data without labels, are refused
before any model is loaded; the manifest's ``labels`` names the preferences (sha256, feedback model, mode, cut).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cai.core.errors import Issue, RunFolderError, TrainingError, display_path
from cai.core.files import write_json_atomic
from cai.data.card import check_files, read_card
from cai.inference.dtype import training_dtype
from cai.inference.loading import ResolvedModel
from cai.inference.merge import merge_adapter
from cai.run import MANIFEST, RunFolder
from cai.train import manifest as lineage
from cai.train.config import CHECKPOINTS, TrainSetup, config_help, parse_config
from cai.train.guards import (
    NonFiniteLoss,
    check_chat_template,
    disk_full_as_oserror,
    generation_eos,
    guarded,
    quiet_library_warnings,
)
from cai.train.models import load_model, load_tokenizer, resolve_base, start_adapter

# parse_config, config_help (cai.train.config), merge_adapter (cai.inference.merge) and NonFiniteLoss
# (cai.train.guards) are importable from here as before the split
__all__ = ["NonFiniteLoss", "TrainProgress", "config_help", "last_checkpoint", "load_model", "load_tokenizer",
           "merge_adapter", "parse_config", "resolve_base", "train"]

FINAL_TMP = ".final.tmp"       # the final adapter is written here, then moved into the adapter folder


@dataclass
class TrainProgress:
    """Callbacks for the terminal. ``start(total_steps, first_step)``, ``step(step, last_logs)``, ``status(text)``."""

    start: Callable[[int, int], None] = lambda total, first: None
    step: Callable[[int, dict], None] = lambda step, logs: None
    status: Callable[[str], None] = lambda text: None


def train(setup: TrainSetup, *, overwrite: bool = False, progress: TrainProgress | None = None) -> dict:
    """Train one stage; returns the manifest. A finished adapter (one with a manifest) is returned as it is unless
    ``overwrite``; unfinished work in the folder is resumed from its newest complete checkpoint."""
    progress = progress or TrainProgress()
    folder = RunFolder.open(setup.run)       # a clear error for a folder that is not a run folder
    stage, out = setup.stage, folder.adapter_dir(setup.stage)
    card = read_card(folder.root)
    check_files(folder.root, card)
    rows = folder.data_dir / f"{stage}_train.jsonl"
    if not card["counts"].get(f"{stage}_train"):
        why = ("every labelled pair may have been left out (unlabelled, below the cut) or held out for test"
               if card.get("preferences") else "every pair needs a revision that differs from the initial answer")
        raise TrainingError(f"{display_path(rows)} has no rows",
                            hint=f"For DPO: {why}. Look at {display_path(folder.data_dir / 'README.md')} for what "
                                 "was left out.")
    _check_labels(setup, card)
    done = folder.read_manifest(stage)
    if done is not None and not overwrite:
        done["already_done"] = True
        return done
    if overwrite and out.exists():
        _move_aside(out, stage, progress)

    sft_dir, sft_sha = start_adapter(setup)
    sft_manifest = None
    if sft_dir is not None:
        own = sft_dir.resolve() == folder.adapter_dir("sft").resolve()
        sft_manifest = folder.read_manifest("sft") if own else _read_json(sft_dir / MANIFEST)
    base = resolve_base(setup, folder.info.backend, folder.model_source, sft_manifest, sft_dir)
    identity = lineage.identity(setup, card, base, sft_sha)
    ckpt = last_checkpoint(out / CHECKPOINTS)
    tc_path = out / lineage.TRAIN_CONFIG
    if ckpt is not None and tc_path.exists():
        diffs = lineage.diff(_read_json(tc_path), identity)
        if diffs:
            raise RunFolderError(
                f"{display_path(out)} holds checkpoints of a training run with other settings or data",
                [Issue(d) for d in diffs[:20]],
                hint="Run with the same settings to resume it, or pass --overwrite to move it aside and start again.")
    with disk_full_as_oserror(out, lambda: _kept(out)):
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(tc_path, identity)
        with quiet_library_warnings():
            trainer, tok, device, dtype, metrics, seconds = _fit(setup, base, sft_dir, card, ckpt, progress)
        progress.status("saving the adapter")
        _save_adapter(trainer, tok, out)
        _plot_loss(trainer.state.log_history, out / "loss.png", f"{stage} · {base.model_id}")
        result = lineage.manifest(setup, card=card, base=base, dtype=dtype, device=device, sft_dir=sft_dir,
                                  sft_manifest_sha256=sft_sha, metrics=metrics, steps=trainer.state.global_step,
                                  resumed_from=_step(ckpt) if ckpt else None, seconds=seconds)
        folder.write_manifest(stage, result)
    return result


def _check_labels(setup: TrainSetup, card: dict) -> None:
    """DPO: soft labels train with ``soft_labels`` on, and ``soft_labels`` needs labels (both checked before any
    model is loaded: plain DPO would silently drop the label column and take every pair as certain)."""
    if setup.stage != "dpo":
        return
    labels = card.get("preferences") or {}
    rows = display_path(setup.folder.data_dir / "dpo_train.jsonl")
    run = display_path(setup.run)
    if setup.cai.soft_labels and not labels:
        where = setup.sources.get("soft_labels", "the config")
        raise TrainingError(f"soft_labels is on ({where}), but {rows} has no labels: its pairs are the records' "
                            "revisions against their initial answers",
                            hint=f"Label pairs with `cai label {run}` and build with `cai data build {run} "
                                 "--preferences`, or train plain DPO (without --config soft-labels).")
    if labels.get("mode") == "soft" and not setup.cai.soft_labels:
        raise TrainingError(f"{rows} holds soft labels (built with --preferences), but this config trains plain DPO, "
                            "which would drop them and take every pair as certain",
                            hint=f"Train on them with `cai train dpo {run} --config soft-labels` (or --soft_labels "
                                 f"true), or build hard labels: `cai data build {run} --preferences "
                                 "--preference-labels hard --min-confidence 0.6`.")


def _fit(setup: TrainSetup, base: ResolvedModel, sft_dir: Path | None, card: dict, ckpt: Path | None,
         progress: TrainProgress) -> tuple[Any, Any, str, str, dict, float]:
    """Load the base (and the SFT adapter), train from ``ckpt`` (or the start) to the end; returns the trainer, the
    tokenizer, the device and dtype, the metrics and the seconds it took."""
    device, dtype = training_dtype(setup.model.dtype)
    args = setup.args
    if device == "cpu":
        args.use_cpu = True
        args.bf16 = False if args.bf16 is None else args.bf16
    elif args.bf16 is None and not args.fp16:
        args.bf16 = dtype == "bfloat16"
    args.disable_tqdm = True
    progress.status(f"loading {base.model_id} ({'4-bit NF4' if setup.model.load_in_4bit else dtype}) on {device}")
    tok = load_tokenizer(base.path, base.revision, getattr(args, "chat_template_path", None))
    if setup.cai.check_eos:
        check_chat_template(tok, generation_eos(base.path, base.revision, tok), base.model_id)
    model = load_model(base.path, base.revision, setup.model, device, dtype)

    import datasets as hf_datasets
    from datasets import load_dataset

    hf_datasets.disable_progress_bars()
    from trl import DPOTrainer, SFTTrainer, get_peft_config

    data, stage = setup.folder.data_dir, setup.stage
    files = {"train": str(data / f"{stage}_train.jsonl")}
    has_test = card["counts"].get(f"{stage}_test", 0) > 0
    if has_test:
        files["test"] = str(data / f"{stage}_test.jsonl")
    ds = load_dataset("json", data_files=files)
    evaluate = has_test and str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no"
    peft_config = get_peft_config(setup.model)
    if sft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(sft_dir), is_trainable=True)
        peft_config = None       # TRL copies the loaded adapter to a frozen "ref" adapter: the reference model
    if stage == "sft":
        trainer_cls = guarded(SFTTrainer)
    elif setup.cai.soft_labels:
        from cai.train.soft_dpo import SoftDPOTrainer

        trainer_cls = guarded(SoftDPOTrainer)
    else:
        trainer_cls = guarded(DPOTrainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=ds["train"],
                          eval_dataset=ds["test"] if evaluate else None, processing_class=tok,
                          peft_config=peft_config, callbacks=[_callback(progress)])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)      # it prints raw log dicts; our progress bar shows them
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    seconds = time.perf_counter() - t0
    metrics = dict(result.metrics)
    if evaluate:
        metrics.update(trainer.evaluate())
    return trainer, tok, device, dtype, metrics, seconds


def _move_aside(out: Path, stage: str, progress: TrainProgress) -> None:
    stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
    aside = out.with_name(f"{stage}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{stage}.old-{stamp}-{n}")
    out.rename(aside)
    progress.status(f"moved the previous {stage} folder to {display_path(aside)}")


def _callback(progress: TrainProgress):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.logs: dict = {}

        def on_train_begin(self, args, state, control, **kwargs):
            progress.start(state.max_steps, state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.update(logs or {})

        def on_step_end(self, args, state, control, **kwargs):
            progress.step(state.global_step, dict(self.logs))

    return ProgressCallback()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and the files of a finished adapter


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _complete(checkpoint: Path) -> bool:
    """trainer_state.json is the last file the trainer writes into a checkpoint: one whose state is missing or
    does not parse was cut short."""
    try:
        return "global_step" in _read_json(checkpoint / "trainer_state.json")
    except (OSError, ValueError):
        return False


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (None when there is none)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _complete(p)]
    return max(done, key=_step, default=None)


def _kept(out: Path) -> str:
    """After a full disk: remove what was cut short (a checkpoint newer than the newest complete one, the final
    adapter's temporary folder) so its space is free for the retry, and say what is kept."""
    newest = last_checkpoint(out / CHECKPOINTS)
    for p in (out / CHECKPOINTS).glob("checkpoint-*") if (out / CHECKPOINTS).is_dir() else ():
        if p.name.split("-")[-1].isdigit() and (newest is None or _step(p) > _step(newest)) and not _complete(p):
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(out / FINAL_TMP, ignore_errors=True)
    if newest is None:
        return f"no checkpoint was complete yet; the run folder's data is untouched ({display_path(out)})"
    return f"the checkpoints up to step {_step(newest)} in {display_path(out / CHECKPOINTS)}"


def _save_adapter(trainer, tok, out: Path) -> None:
    """The final adapter, into ``out`` (files written to a temporary folder, then moved in)."""
    tmp = out / FINAL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.model
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(tmp), selected_adapters=["default"])
    else:
        model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_loss = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train_loss:
        ax.plot(*zip(*train_loss), label="train loss", marker="." if len(train_loss) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train_loss or evals:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
