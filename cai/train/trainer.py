"""Fine-tuning: TRL's SFTTrainer / DPOTrainer with PEFT LoRA on a bitsandbytes 4-bit (NF4) base: QLoRA.

Configuration is TRL's own: ``ModelConfig`` (model, LoRA, quantization), ``SFTConfig`` / ``DPOConfig`` (everything
``transformers.Trainer`` takes) and our few extra fields (:class:`CaiArgs`), parsed by TRL's parser. The values come
from, in order: the shipped recipe ``cai/resources/recipes/<stage>.yaml``, the user's ``--config`` YAML, then ``--flag value``
overrides. An unknown key or an out-of-range value is an error naming the file and line (or the flag).

Layout of ``runs/<name>/adapters/<stage>/``:

- ``checkpoints/checkpoint-N/`` every ``save_steps``: adapter, optimizer, scheduler, RNG and trainer state (written
  last: a checkpoint without ``trainer_state.json`` was cut short and is ignored). Running the same command again
  after a crash or ``kill -9`` resumes from the newest complete one (data position, optimizer and schedule restored).
- ``train_config.json``: the resolved config and dataset hash, written when training starts; a resume with another
  config or dataset is refused (``--overwrite`` moves the old folder aside and starts again).
- the final adapter (``adapter_model.safetensors``, ``adapter_config.json``, tokenizer), ``loss.png``, and
  ``manifest.json`` (lineage: base model, constitution, dataset, config, metrics, library versions, git commit),
  written last: an adapter folder with a manifest is finished.

**DPO after SFT.** DPO starts from the SFT adapter (on the same 4-bit base) and trains it further; the reference
model is a frozen copy of the SFT adapter (TRL's ``ref`` adapter), i.e. base + SFT, which is what the DPO objective
assumes. Nothing is merged, so the DPO adapter alone, on the original base, is the final model.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from cai import __version__
from cai.core.constitution import yaml_with_lines
from cai.data.build import DATA_DIR, check_files, read_card
from cai.core.errors import ConfigError, Issue, RunFolderError, TrainingError, display_path
from cai.core.files import write_json_atomic

STAGES = ("sft", "dpo")
RECIPES = Path(__file__).resolve().parents[1] / "resources" / "recipes"
ADAPTERS_DIR = "adapters"
MANIFEST = "manifest.json"
TRAIN_CONFIG = "train_config.json"
CHECKPOINTS = "checkpoints"
# settings that do not change what is learned: a resume may differ in these
_RESUME_FREE = {"logging_steps", "save_steps", "save_total_limit", "logging_dir", "disable_tqdm", "output_dir",
                "report_to", "dataloader_num_workers", "logging_first_step", "eval_steps", "run_name",
                # read afresh at every step, so a resume may lower it after a non-finite loss (the learning rate and
                # the step count are not: the restored scheduler keeps the ones the run started with)
                "max_grad_norm"}


@dataclass
class CaiArgs:
    """cai's own training settings (everything else is TRL's ``ModelConfig`` and ``SFTConfig`` / ``DPOConfig``)."""

    sft_adapter: str | None = field(default=None, metadata={
        "help": "DPO: the SFT adapter to start from and to use as the reference (default: <run>/adapters/sft)"})
    require_sft_adapter: bool = field(default=True, metadata={
        "help": "DPO: stop when there is no SFT adapter (false: DPO trains a fresh adapter on the base model)"})
    check_eos: bool = field(default=True, metadata={
        "help": "before training, check that the chat template ends an assistant turn with a token the model stops "
                "on"})


@dataclass
class TrainSetup:
    stage: str
    run: Path
    cai: CaiArgs
    model: Any            # trl.ModelConfig
    args: Any             # trl.SFTConfig | trl.DPOConfig
    sources: dict[str, str]   # key -> where its value came from ("file:line" or "--flag")

    @property
    def out(self) -> Path:
        return self.run / ADAPTERS_DIR / self.stage

    def config_dict(self) -> dict:
        """The full resolved config, JSON-safe."""
        return {"cai": dataclasses.asdict(self.cai), "model": _jsonable(dataclasses.asdict(self.model)),
                "train": _jsonable(self.args.to_dict())}


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


def recipe_path(stage: str) -> Path:
    return RECIPES / f"{stage}.yaml"


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
    for path in [recipe_path(stage)] + ([Path(config)] if config else []):
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
    out_dir = Path(run) / ADAPTERS_DIR / stage / CHECKPOINTS
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
            where = s.sources.get(key)
            file, _, line = (where or "").rpartition(":")
            if where and where.startswith("--"):
                issues.append(Issue(f"{value!r} is out of range: expected {want}", None, None, where))
            else:
                issues.append(Issue(f"{value!r} is out of range: expected {want}", file or None,
                                    int(line) if line.isdigit() else None, key))
    if issues:
        raise ConfigError("training settings out of range", issues)


def config_help(stage: str) -> str:
    return _parser(stage).format_help()


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer, guards


def device_and_dtype(model_args) -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        dtype = model_args.dtype if model_args.dtype not in (None, "auto") else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        return "cuda", dtype
    return "cpu", model_args.dtype if model_args.dtype not in (None, "auto") else "float32"


def resolve_base(setup: TrainSetup, run_info: dict, sft_manifest: dict | None = None):
    """The base model: ``model_name_or_path`` if set; for DPO on an SFT adapter, that adapter's base; else the model
    the run's records were generated with."""
    from cai.inference.loading import ResolvedModel, resolve_model

    asked = setup.model.model_name_or_path
    if sft_manifest:
        b = sft_manifest["base_model"]
        if asked and asked not in (b["id"], b["path"]) and str(Path(asked).resolve()) != b["path"]:
            raise TrainingError(f"model_name_or_path {asked!r} is not the SFT adapter's base ({b['id']})",
                                hint="DPO continues the SFT adapter, so it must run on the same base; leave "
                                     "model_name_or_path unset.")
        return ResolvedModel(b["path"], b["id"], b.get("revision"))
    if run_info.get("backend") == "fake" and not asked:
        raise TrainingError(f"{display_path(setup.run)} was generated with the fake backend: there is no model to "
                            "fine-tune", hint="Pass --model_name_or_path MODEL.")
    resolved = resolve_model(asked or run_info.get("model_source") or run_info.get("model"))
    if setup.model.model_revision and setup.model.model_revision != "main":
        resolved = ResolvedModel(resolved.path, resolved.model_id, setup.model.model_revision)
    return resolved


def load_tokenizer(path: str, revision: str | None, chat_template_path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if chat_template_path:
        tok.chat_template = Path(chat_template_path).read_text(encoding="utf-8")
    return tok


def check_chat_template(tok, generation_eos: list[int], model_name: str) -> None:
    """The tokenizer has a chat template, and an assistant turn rendered by it ends with a token the model stops on
    at inference. (Training on text whose turns end with a token generation does not stop on gives a model that
    never stops: a known failure of the open recipes.)"""
    if not getattr(tok, "chat_template", None):
        raise TrainingError(f"the base model {model_name} has no chat template",
                            hint="Training rows are conversations; give the template with chat_template_path: "
                                 "FILE.jinja in the config (or use an -Instruct model).")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    prompt_ids = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    full_ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    if hasattr(prompt_ids, "input_ids"):
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    turn = list(full_ids[len(prompt_ids):])        # the answer's tokens and whatever the template adds after them
    stops = set(generation_eos)
    if not any(t in stops for t in turn):
        names = [tok.convert_ids_to_tokens(t) for t in sorted(stops)]
        raise TrainingError(
            f"the chat template of {model_name} does not end an assistant turn with a token the model stops on "
            f"({', '.join(map(str, names)) or 'none set'}): a model trained on it would never stop",
            hint="Fix eos_token_id in the model's generation_config.json, set eos_token in the config to the "
                 "template's end-of-turn token, or pass --check_eos false if you know better.")


def generation_eos(path: str, revision: str | None, tok) -> list[int]:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path, revision=revision)
        eos = gen.eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else tok.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def load_model(path: str, revision: str | None, model_args, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    quant = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        m = dataclasses.replace(model_args, dtype=dtype)
        quant = get_quantization_config(m)
    if device == "cuda":      # under `accelerate launch`, each process holds its own copy on its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=getattr(torch, dtype), quantization_config=quant,
        device_map={"": device} if quant is not None else None,
        attn_implementation=model_args.attn_implementation)


class NonFiniteLoss(TrainingError):
    pass


def _guarded(trainer_cls):
    """The trainer class with two guards on every step: a non-finite loss stops training before the optimizer step
    (so no checkpoint ever holds the poisoned weights), and a GPU out-of-memory says which settings to lower."""
    import torch

    class Guarded(trainer_cls):
        def training_step(self, *args, **kwargs):
            try:
                loss = super().training_step(*args, **kwargs)
            except torch.OutOfMemoryError:
                a = self.args
                raise TrainingError(
                    f"out of GPU memory at step {self.state.global_step + 1} (per_device_train_batch_size "
                    f"{a.per_device_train_batch_size}, max_length {a.max_length}, activation_checkpointing "
                    f"{a.activation_checkpointing})",
                    hint="Lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective "
                         "batch), lower max_length, or set activation_checkpointing true. The last checkpoint is kept; "
                         "run the same command to resume.") from None
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteLoss(
                    f"the loss became {float(loss.detach().float().mean())} at step {self.state.global_step + 1}: "
                    f"training stopped before that step changed the weights",
                    hint=f"The last good checkpoint is kept in {display_path(self.args.output_dir)}: lower "
                         f"max_grad_norm (now {self.args.max_grad_norm}) and run the command again to resume from "
                         f"it, or lower learning_rate (now {self.args.learning_rate}) and pass --overwrite to start "
                         "again.")
            return loss

        def _load_from_checkpoint(self, *args, **kwargs):
            # TRL casts a fresh QLoRA adapter to the compute dtype; transformers loads a checkpoint's adapter back
            # as float32. Keep the dtypes training started with, or a resumed run is not the same run.
            dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
            out = super()._load_from_checkpoint(*args, **kwargs)
            for n, p in self.model.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])
            return out

    Guarded.__name__ = trainer_cls.__name__
    return Guarded


@dataclass
class TrainProgress:
    """Callbacks for the terminal. ``start(total_steps, first_step)``, ``step(step, last_logs)``, ``status(text)``."""

    start: Callable[[int, int], None] = lambda total, first: None
    step: Callable[[int, dict], None] = lambda step, logs: None
    status: Callable[[str], None] = lambda text: None


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


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: trainer_state.json is the last file the trainer writes into one, so a
    checkpoint whose state is missing or does not parse was cut short."""
    if not folder.is_dir():
        return None

    def complete(p: Path) -> bool:
        try:
            return "global_step" in _read_json(p / "trainer_state.json")
        except (OSError, ValueError):
            return False

    done = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and complete(p)]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _identity(setup: TrainSetup, card: dict, base, sft_manifest: str | None) -> dict:
    cfg = setup.config_dict()
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in _RESUME_FREE}
    return {"config": cfg, "dataset_sha256": card["sha256"], "base_model": base.model_id,
            "base_revision": base.revision, "sft_adapter_manifest_sha256": sft_manifest}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def train(setup: TrainSetup, *, overwrite: bool = False, progress: TrainProgress | None = None) -> dict:
    """Train one stage; returns the manifest. A finished adapter (one with a manifest) is returned as it is unless
    ``overwrite``; unfinished work in the folder is resumed from its newest complete checkpoint."""
    progress = progress or TrainProgress()
    run, out, stage = setup.run, setup.out, setup.stage
    try:
        run_info = _read_json(run / "run.json")
    except (FileNotFoundError, ValueError):
        raise RunFolderError(f"{display_path(run)} is not a cai run folder (no readable run.json)",
                             hint="Pass the folder `cai generate` wrote.") from None
    card = read_card(run)
    check_files(run, card)
    data = run / DATA_DIR
    if not card["counts"].get(f"{stage}_train"):
        raise TrainingError(f"{display_path(data / f'{stage}_train.jsonl')} has no rows",
                            hint="For DPO: every pair needs a revision that differs from the initial answer. Look at "
                                 f"{display_path(data / 'README.md')} for what was left out.")
    if (out / MANIFEST).exists():
        if not overwrite:
            manifest = _read_json(out / MANIFEST)
            manifest["already_done"] = True
            return manifest
    if overwrite and out.exists():
        stamp = datetime.now().strftime('%Y%m%d-%H%M%S')
        aside = out.with_name(f"{stage}.old-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = out.with_name(f"{stage}.old-{stamp}-{n}")
        out.rename(aside)
        progress.status(f"moved the previous {stage} folder to {display_path(aside)}")

    sft_dir, sft_manifest = None, None
    if stage == "dpo":
        sft_dir = Path(setup.cai.sft_adapter) if setup.cai.sft_adapter else run / ADAPTERS_DIR / "sft"
        if (sft_dir / "adapter_config.json").exists() and (sft_dir / MANIFEST).exists():
            sft_manifest = _sha256_file(sft_dir / MANIFEST)
        elif setup.cai.require_sft_adapter:
            raise TrainingError(
                f"no finished SFT adapter at {display_path(sft_dir)}" +
                (" (training there did not finish)" if (sft_dir / CHECKPOINTS).exists() else ""),
                hint=f"Run `cai train sft {display_path(run)}` first, point sft_adapter at one, or set "
                     "require_sft_adapter: false to train DPO on the base model alone.")
        else:
            sft_dir = None

    base = resolve_base(setup, run_info, _read_json(sft_dir / MANIFEST) if sft_manifest else None)
    identity = _identity(setup, card, base, sft_manifest)
    ckpt = last_checkpoint(out / CHECKPOINTS)
    tc_path = out / TRAIN_CONFIG
    if ckpt is not None and tc_path.exists():
        diffs = _diff(_read_json(tc_path), identity)
        if diffs:
            raise RunFolderError(
                f"{display_path(out)} holds checkpoints of a training run with other settings or data",
                [Issue(d) for d in diffs[:20]],
                hint="Run with the same settings to resume it, or pass --overwrite to move it aside and start again.")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(tc_path, identity)

    device, dtype = device_and_dtype(setup.model)
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
    trainer_cls = _guarded(SFTTrainer if stage == "sft" else DPOTrainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=ds["train"],
                          eval_dataset=ds["test"] if evaluate else None, processing_class=tok,
                          peft_config=peft_config, callbacks=[_callback(progress)])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)      # it prints raw log dicts; our progress bar shows them
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    seconds = time.perf_counter() - t0
    metrics = {k: v for k, v in result.metrics.items()}
    if evaluate:
        metrics.update(trainer.evaluate())

    progress.status("saving the adapter")
    _save_adapter(trainer, tok, out)
    _plot_loss(trainer.state.log_history, out / "loss.png", f"{stage} · {base.model_id}")
    manifest = {
        "stage": stage,
        "base_model": {"id": base.model_id, "path": base.path, "revision": base.revision},
        "sft_adapter": {"path": str(sft_dir.resolve()), "manifest_sha256": sft_manifest} if sft_dir else None,
        "reference": ("frozen copy of the SFT adapter (base + SFT)" if sft_dir else "base model (adapter disabled)")
        if stage == "dpo" else None,
        "quantization": {"load_in_4bit": setup.model.load_in_4bit, "load_in_8bit": setup.model.load_in_8bit,
                         "bnb_4bit_quant_type": setup.model.bnb_4bit_quant_type,
                         "use_bnb_nested_quant": setup.model.use_bnb_nested_quant, "compute_dtype": dtype},
        "constitution": card["constitution"],
        "dataset": {"sha256": card["sha256"], "counts": card["counts"], "files": card["files"],
                    "card": str((data / "card.json").resolve())},
        "config": setup.config_dict(),
        "metrics": _jsonable(metrics),
        "steps": trainer.state.global_step,
        "resumed_from_step": int(ckpt.name.split("-")[-1]) if ckpt else None,
        "seconds_this_run": round(seconds, 2),
        "device": device,
        "versions": library_versions(),
        "git": git_state(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cai_version": __version__,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _save_adapter(trainer, tok, out: Path) -> None:
    """The final adapter, into ``out`` (files written to a temporary folder, then moved in)."""
    tmp = out / ".final.tmp"
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

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
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
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(getattr(obj, "value", obj))


# ---------------------------------------------------------------------------------------------------------------
# Merge


def merge_adapter(adapter: str | Path, out: str | Path, *, dtype: str = "auto", force: bool = False,
                  progress: TrainProgress | None = None) -> dict:
    """Write base + adapter as one plain safetensors model folder any tool can load (see :func:`merged_model`).
    Returns a summary (what was merged, where)."""
    adapter, out = Path(adapter), Path(out)
    _adapter_config(adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise RunFolderError(f"{display_path(out)} exists and is not empty", hint="Choose another -o, or --force.")
    model, info = merged_model(adapter, dtype=dtype, progress=progress)
    clean = clean_model(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(str(tmp))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(tmp))
    summary = {"adapter": str(adapter.resolve()), "adapter_manifest": info["manifest"] or None,
               "base_model": info["base_model"], "dequantized_from_4bit": info["dequantized_from_4bit"],
               "dtype": info["dtype"], "merged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "cai_version": __version__}
    write_json_atomic(tmp / "cai_merge.json", summary)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def _adapter_config(adapter: Path) -> Path:
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.exists():
        raise TrainingError(f"{display_path(adapter)} is not an adapter folder (no adapter_config.json)",
                            hint="Pass a finished adapter, e.g. runs/demo/adapters/sft.")
    return cfg_path


def merged_model(adapter: str | Path, *, dtype: str = "auto", device: str | None = None,
                 progress: TrainProgress | None = None):
    """Base + adapter as one plain model in memory: ``(model, info)``. An adapter trained on a 4-bit base is merged
    into the dequantized 4-bit weights (the weights it was trained against), not the original ones. ``info`` names
    the base, the dtype, whether it was dequantized, and the adapter's manifest."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    progress = progress or TrainProgress()
    adapter = Path(adapter)
    cfg_path = _adapter_config(adapter)
    manifest = _read_json(adapter / MANIFEST) if (adapter / MANIFEST).exists() else {}
    base = manifest.get("base_model") or {}
    base_path = base.get("path") or _read_json(cfg_path).get("base_model_name_or_path")
    if not base_path:
        raise TrainingError(f"{display_path(cfg_path)} does not name its base model")
    quant = manifest.get("quantization") or {}
    four_bit = bool(quant.get("load_in_4bit"))
    if dtype == "auto":
        dtype = _config_dtype(base_path, base.get("revision")) or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    progress.status(f"loading {base.get('id') or base_path}" + (" in 4-bit to dequantize" if four_bit else ""))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if four_bit:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.get("bnb_4bit_quant_type") or "nf4",
                               bnb_4bit_use_double_quant=bool(quant.get("use_bnb_nested_quant")),
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base_path, revision=base.get("revision"), dtype=torch.float32,
                                                     quantization_config=q, device_map={"": device})
        model = model.dequantize()
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, revision=base.get("revision"), dtype=torch.float32)
    progress.status("merging")
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return model, {"base_model": base_path, "base_id": base.get("id") or base_path, "dtype": dtype,
                   "dequantized_from_4bit": four_bit, "manifest": manifest}


def _config_dtype(path: str, revision: str | None) -> str | None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, revision=revision)
    except OSError:
        return None
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return str(d).removeprefix("torch.") if d is not None else None


def clean_model(model):
    """A copy of the model with no quantization config (transformers refuses to save a dequantized bnb model
    as it is): the same class from the config, loaded with the merged weights."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    clean.load_state_dict(model.state_dict(), assign=True, strict=False)
    clean.tie_weights()
    return clean
