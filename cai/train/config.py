"""Training settings: TRL's own config classes plus ours, resolved from the shipped recipe, the user's YAML and flags.

Configuration is TRL's own: ``ModelConfig`` (model, LoRA, quantization), ``SFTConfig`` / ``DPOConfig`` (everything
``transformers.Trainer`` takes) and our few extra fields (:class:`CaiArgs`), parsed by TRL's parser. The values come
from, in order: the shipped recipe (:func:`cai.resources.recipe_path`: ``cai/resources/recipes/<stage>.yaml``), the
``--config`` YAML (a file, or a shipped recipe by name: ``soft-labels``), then ``--flag value`` overrides. An unknown
key or an out-of-range value is an error naming the file and line (or the flag); so is a DPO setting soft labels do
not support when ``soft_labels`` is on.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import ConfigError, Issue, display_path
from cai.core.safe_yaml import yaml_with_lines
from cai.resources import recipe_file, recipe_path
from cai.run import RunFolder
from cai.train.manifest import jsonable

STAGES = ("sft", "dpo")
CHECKPOINTS = "checkpoints"      # <run>/adapters/<stage>/checkpoints/checkpoint-N
_RUN_PATHS = ("output_dir", "logging_dir")     # trainer settings that name folders inside the run folder

__all__ = ["CHECKPOINTS", "STAGES", "CaiArgs", "TrainSetup", "check_ranges", "config_help", "parse_config",
           "recipe_path"]


@dataclass
class CaiArgs:
    """cai's own training settings (everything else is TRL's ``ModelConfig`` and ``SFTConfig`` / ``DPOConfig``)."""

    sft_adapter: str | None = field(default=None, metadata={
        "help": "DPO: the SFT adapter to start from and to use as the reference (default: <run>/adapters/sft); "
                "SFT: an adapter to continue training (default: a fresh one)"})
    require_sft_adapter: bool = field(default=True, metadata={
        "help": "DPO: stop when there is no SFT adapter (false: DPO trains a fresh adapter on the base model)"})
    check_eos: bool = field(default=True, metadata={
        "help": "before training, check that the chat template ends an assistant turn with a token the model stops "
                "on"})
    soft_labels: bool = field(default=False, metadata={
        "help": "DPO: train on the label column of data built with `cai data build RUN --preferences` (the "
                "probability p that chosen is better): soft-label DPO, -p*logsig(beta*D) - (1-p)*logsig(-beta*D) a "
                "pair; the soft-labels recipe (--config soft-labels) sets it. Sigmoid loss only"})


@dataclass
class TrainSetup:
    stage: str
    run: Path
    cai: CaiArgs
    model: Any            # trl.ModelConfig
    args: Any             # trl.SFTConfig | trl.DPOConfig
    sources: dict[str, str]   # key -> where its value came from ("file:line" or "--flag")

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run)

    @property
    def out(self) -> Path:
        """``<run>/adapters/<stage>``: checkpoints, then the finished adapter and its manifest."""
        return self.folder.adapter_dir(self.stage)

    def config_dict(self) -> dict:
        """The full resolved config, JSON-safe; the trainer's own folders relative to the run folder."""
        train = jsonable(self.args.to_dict())
        for key in _RUN_PATHS:
            if isinstance(train.get(key), str):
                train[key] = self.folder.rel(train[key])
        return {"cai": dataclasses.asdict(self.cai), "model": jsonable(dataclasses.asdict(self.model)),
                "train": train}


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def _classes(stage: str):
    from trl import DPOConfig, ModelConfig, SFTConfig

    return CaiArgs, ModelConfig, SFTConfig if stage == "sft" else DPOConfig


def _parser(stage: str):
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):       # argparse would print usage and exit; we want one clear error
            raise ConfigError(f"bad training flag: {message}", hint=f"`cai train {stage} --help-config` lists every "
                                                                    "setting.")

    return Parser(_classes(stage))


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {display_path(path)} not found") from None
    shown = display_path(path)
    data, lines = yaml_with_lines(text, shown, ConfigError, "training config")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid training config {shown}",
                          [Issue("the top level must be a mapping of setting: value", shown, 1)])
    return data, lines


def _as_flags(key: str, value: Any) -> list[str]:
    """A YAML value as the command-line words TRL's parser reads for it."""
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    if value is None:
        return [f"--{key}", "None"]
    return [f"--{key}", str(value)]


def parse_config(stage: str, run: str | Path, config: str | Path | None = None,
                 flags: list[str] | None = None) -> TrainSetup:
    """Resolve a stage's settings: shipped recipe < ``config`` YAML < ``flags``. Every YAML key is checked against
    the settings that exist and parsed on its own, so a bad one is reported with its file and line."""
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r} (choose from {', '.join(STAGES)})")
    parser = _parser(stage)
    known = {a.dest for a in parser._actions if a.dest != "help"}
    words: list[str] = []
    sources: dict[str, str] = {}
    issues: list[Issue] = []
    for path in [recipe_path(stage)] + ([recipe_file(config)] if config else []):
        data, lines = _read_yaml(path)
        shown = display_path(path)
        for key, value in data.items():
            line = lines.get((key,))
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                issues.append(Issue(f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                                    shown, line, str(key)))
                continue
            w = _as_flags(key, value)
            try:
                _, rest = parser.parse_known_args(w)
            except ConfigError as e:
                issues.append(Issue(e.message.removeprefix("bad training flag: "), shown, line, key))
                continue
            if rest:
                issues.append(Issue(f"expected one value, got {value!r}", shown, line, key))
                continue
            words += w
            sources[key] = f"{shown}:{line}"
    if issues:
        raise ConfigError(f"invalid training config ({len(issues)} problem(s))", issues,
                          hint=f"`cai train {stage} --help-config` lists every setting.")
    flags = list(flags or [])
    for word in flags:
        if word.startswith("--"):
            key = word[2:].split("=", 1)[0]
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ConfigError(f"unknown training flag --{key}" + (f" (did you mean --{close[0]}?)" if close
                                                                       else ""),
                                  hint=f"`cai train {stage} --help-config` lists every setting.")
            sources[key] = word.split("=", 1)[0]
    out_dir = RunFolder(run).adapter_dir(stage) / CHECKPOINTS
    first = ["--output_dir", str(out_dir)] + ([] if _has_cuda() else ["--use_cpu", "true", "--bf16", "false"])
    try:
        cai_args, model_args, train_args = parser.parse_args_into_dataclasses(args=first + words + flags)
    except ValueError as e:       # the config classes' own cross-field checks
        raise ConfigError(f"invalid training settings: {e}") from None
    setup = TrainSetup(stage, Path(run), cai_args, model_args, train_args, sources)
    check_ranges(setup)
    return setup


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_ranges(s: TrainSetup) -> None:
    """Values that parse but cannot train: each named with where it was set."""
    m, a = s.model, s.args
    checks = [
        ("learning_rate", a.learning_rate, 0 < a.learning_rate <= 0.1, "0 < learning_rate <= 0.1"),
        ("lora_r", m.lora_r, 1 <= m.lora_r <= 1024, "an integer in 1..1024"),
        ("lora_alpha", m.lora_alpha, m.lora_alpha > 0, "> 0"),
        ("lora_dropout", m.lora_dropout, 0 <= m.lora_dropout < 1, "0 <= lora_dropout < 1"),
        ("per_device_train_batch_size", a.per_device_train_batch_size, a.per_device_train_batch_size >= 1, ">= 1"),
        ("gradient_accumulation_steps", a.gradient_accumulation_steps, a.gradient_accumulation_steps >= 1, ">= 1"),
        ("max_length", a.max_length, a.max_length is None or a.max_length >= 16, ">= 16 tokens"),
        ("save_steps", a.save_steps, a.save_steps > 0, "> 0"),
        ("num_train_epochs", a.num_train_epochs, a.max_steps > 0 or a.num_train_epochs > 0,
         "> 0 (or set max_steps)"),
        ("warmup_steps", a.warmup_steps, a.warmup_steps >= 0, ">= 0 (below 1: a fraction of the steps)"),
    ]
    if s.stage == "dpo":
        checks.append(("beta", a.beta, a.beta > 0, "> 0"))
    issues = []
    for key, value, ok, want in checks:
        if value is None and ok:        # e.g. max_length None: no truncation
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
            issues.append(_issue(s, key, f"{value!r} is out of range: expected {want}"))
    if issues:
        raise ConfigError("training settings out of range", issues)
    if s.cai.soft_labels:
        check_soft_labels(s)


def _issue(s: TrainSetup, key: str, message: str) -> Issue:
    """An issue with a setting, named where it was set: the file and line, or the flag."""
    where = s.sources.get(key)
    if where and where.startswith("--"):
        return Issue(message, None, None, where)
    file, _, line = (where or "").rpartition(":")
    return Issue(message, file or None, int(line) if line.isdigit() else None, key)


def check_soft_labels(s: TrainSetup) -> None:
    """``soft_labels`` is for DPO, with the settings soft-label DPO supports (:mod:`cai.train.soft_dpo`)."""
    if s.stage != "dpo":
        raise ConfigError("soft_labels applies to DPO only", [_issue(s, "soft_labels", "set for sft")],
                          hint="Soft labels are preference probabilities: `cai train dpo RUN --config soft-labels`.")
    from cai.train.soft_dpo import unsupported_options

    refused = unsupported_options(s.args)
    if refused:
        raise ConfigError("settings soft-label DPO does not support (soft_labels is on)",
                          [_issue(s, key, why) for key, why in refused],
                          hint=f"`cai train {s.stage} --help-config` lists every setting.")


def config_help(stage: str) -> str:
    return _parser(stage).format_help()
