"""What a training run is, written down: the identity a resume must match, and the finished adapter's manifest.

- ``train_config.json`` (:func:`identity`): the resolved config (less the settings that do not change what is
  learned), the dataset hash, the base model and the SFT adapter's manifest hash. Written when training starts; a
  resume whose identity differs is refused, listing the differences (:func:`diff`).
- ``manifest.json`` (:func:`manifest`): lineage (base model, constitution, dataset, the AI-feedback labels a DPO
  adapter trained on, what people reviewed of its data, config, metrics, library versions, git commit). Written
  last, atomically: an adapter folder with a manifest is finished.

Paths in both that point into the run folder are stored relative to it (``data/card.json``,
``adapters/sft``), so a moved or archived run folder still reads; manifests of older versions hold absolute paths,
which :meth:`cai.run.RunFolder.resolve` reads as well (:func:`stored_path`).
"""

from __future__ import annotations

import hashlib
import math
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai import __version__

if TYPE_CHECKING:
    from cai.run import RunFolder
    from cai.train.config import TrainSetup

TRAIN_CONFIG = "train_config.json"
# settings that do not change what is learned: a resume may differ in these
RESUME_FREE = {"logging_steps", "save_steps", "save_total_limit", "logging_dir", "disable_tqdm", "output_dir",
               "report_to", "dataloader_num_workers", "logging_first_step", "eval_steps", "run_name",
               # read afresh at every step, so a resume may lower it after a non-finite loss (the learning rate and
               # the step count are not: the restored scheduler keeps the ones the run started with)
               "max_grad_norm"}


def identity(setup: TrainSetup, card: dict, base: Any, sft_manifest_sha256: str | None) -> dict:
    """What a resume must match: the config less :data:`RESUME_FREE`, the data, the base and the SFT adapter."""
    cfg = setup.config_dict()
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in RESUME_FREE}
    return {"config": cfg, "dataset_sha256": card["sha256"], "base_model": base.model_id,
            "base_revision": base.revision, "sft_adapter_manifest_sha256": sft_manifest_sha256}


def diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Every leaf that differs, as ``dotted.key: old → new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


def manifest(setup: TrainSetup, *, card: dict, base: Any, dtype: str, device: str, sft_dir: Path | None,
             sft_manifest_sha256: str | None, metrics: dict, steps: int, resumed_from: int | None,
             seconds: float) -> dict:
    """The finished adapter's manifest (``sft_adapter.path`` and ``dataset.card`` relative to the run folder)."""
    folder, m = setup.folder, setup.model
    return {
        "stage": setup.stage,
        "base_model": {"id": base.model_id, "path": base.path, "revision": base.revision},
        "sft_adapter": {"path": folder.rel(sft_dir), "manifest_sha256": sft_manifest_sha256} if sft_dir else None,
        "reference": ("frozen copy of the SFT adapter (base + SFT)" if sft_dir else "base model (adapter disabled)")
        if setup.stage == "dpo" else None,
        "quantization": {"load_in_4bit": m.load_in_4bit, "load_in_8bit": m.load_in_8bit,
                         "bnb_4bit_quant_type": m.bnb_4bit_quant_type,
                         "use_bnb_nested_quant": m.use_bnb_nested_quant, "compute_dtype": dtype},
        "constitution": card["constitution"],
        "dataset": {"sha256": card["sha256"], "counts": card["counts"], "files": card["files"],
                    "card": folder.rel(folder.data_dir / "card.json")},
        "labels": labels(setup, card),
        "review": review(card),
        "config": setup.config_dict(),
        "metrics": jsonable(metrics),
        "steps": steps,
        "resumed_from_step": resumed_from,
        "seconds_this_run": round(seconds, 2),
        "device": device,
        "versions": library_versions(),
        "git": git_state(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cai_version": __version__,
    }


def labels(setup: TrainSetup, card: dict) -> dict | None:
    """Which AI-feedback labels trained a DPO adapter (None for SFT, and for DPO on the records' own pairs): the
    preferences file and its sha256, the feedback model(s), soft or hard, the cut, how many pairs, the loss, and the
    labeller's check card it came with."""
    p = card.get("preferences")
    if setup.stage != "dpo" or not p:
        return None
    check = p.get("check") or {}
    return {"preferences": p["file"], "preferences_sha256": p["sha256"],
            "feedback_models": [m["model"] for m in p["feedback_models"]], "mode": p["mode"],
            "min_confidence": p["min_confidence"], "pairs_used": p["used"],
            "loss": "soft-label sigmoid DPO" if setup.cai.soft_labels else "sigmoid DPO",
            "check": {"file": check["file"], "sha256": check["sha256"]} if check else None}


def review(card: dict) -> dict | None:
    """What people decided about the data an adapter trained on (None when nobody reviewed it): the reviews file
    and its sha256, the conflict rule, whether only reviewed items trained, per kind of item how many were
    reviewed, edited, rejected and in conflict, and per kind of row how many came from reviewed items."""
    r = card.get("review")
    if not r:
        return None
    keep = ("reviewed", "accepted", "edited", "agreed", "flipped", "tie", "rejected", "conflicts", "stale",
            "unreviewed", "disagreements", "items")
    return {"reviews": r["file"], "reviews_sha256": r["sha256"], "rule": r["rule"],
            "require_review": r["require_review"], "reviewers": r["reviewers"],
            **{kind: {k: v for k, v in r[kind].items() if k in keep} for kind in ("records", "preferences")
               if kind in r},
            "rows": r["rows"]}


def stored_path(folder: RunFolder, manifest: dict, key: str) -> Path | None:
    """A path a manifest stores (``sft_adapter`` or ``dataset``, each under ``path``/``card``) as a path that opens
    from here: relative ones are relative to the run folder, absolute ones (older versions) are as they are."""
    entry = manifest.get(key) or {}
    return folder.resolve(entry.get("card" if key == "dataset" else "path"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["cai"] = __version__
    return out


def git_state() -> dict | None:
    """The commit of the cai checkout this ran from (None when not a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def jsonable(obj: Any) -> Any:
    """``obj`` with what JSON cannot hold made into strings (enums by value; inf and nan as ``"inf"``, ``"nan"``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(getattr(obj, "value", obj))
