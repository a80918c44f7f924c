"""Checks that stop a training run before it wastes time or writes something wrong, each with a clear error.

- Before training: the chat template ends an assistant turn with a token the model stops on
  (:func:`check_chat_template`).
- At every step (:func:`guarded`): a non-finite loss stops training before the optimizer step, so no checkpoint
  holds poisoned weights; a GPU out-of-memory says which settings to lower.
- Around the writes (:func:`disk_full_as_oserror`): torch and safetensors report a full disk as a RuntimeError or
  their own error type; it becomes an ``OSError`` with ``errno.ENOSPC`` (what the CLI turns into "disk full").
- Library warnings that are not about the user's work (:func:`quiet_library_warnings`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cai.core.errors import TrainingError, display_path
from cai.core.files import disk_full_errno


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
        gen = GenerationConfig.from_pretrained(path, revision=revision or "main")
        eos = gen.eos_token_id
    except OSError:
        eos = None
    eos = eos if eos is not None else tok.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


class NonFiniteLoss(TrainingError):
    pass


def guarded(trainer_cls: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------------------------
# A full disk

@contextlib.contextmanager
def disk_full_as_oserror(folder: Path, kept: Callable[[], str]) -> Iterator[None]:
    """Inside the block, a write that fails for want of space (whatever the library calls it) is raised as
    ``OSError(ENOSPC, ..., folder)``, with ``kept()`` (called then: it may tidy up, and says what is safe on disk)
    as its ``kept`` attribute and a note; any other error passes through untouched."""
    try:
        yield
    except (KeyboardInterrupt, TrainingError):
        raise
    except Exception as e:
        code = disk_full_errno(e, folder)
        if code is None:
            raise
        filename = e.filename if isinstance(e, OSError) and e.filename else str(folder)
        full = OSError(code, os.strerror(code), filename)
        full.kept = kept()                  # type: ignore[attr-defined]
        full.add_note(f"kept: {full.kept}")  # type: ignore[attr-defined]
        raise full from e


# ---------------------------------------------------------------------------------------------------------------
# Warnings

# deprecations TRL and PEFT trigger inside transformers: nothing the user did or can change
_LIBRARY_WARNINGS = (r".*is deprecated and will be removed in v\d", r".*`past_key_values` is deprecated",
                     r".*use_cache=True.* is incompatible with (gradient|activation) checkpointing")


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Hide, inside the block, the warnings libraries raise about each other (deprecations inside transformers that
    TRL and PEFT call); warnings about the user's settings or data still show."""
    with warnings.catch_warnings():
        for pattern in _LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
            warnings.filterwarnings("ignore", message=pattern, category=DeprecationWarning)
        yield
