"""Soft-label DPO: TRL's ``DPOTrainer`` trained on a per-pair probability that ``chosen`` is the better answer, the
AI-feedback labels of the Constitutional AI paper's RL phase (``cai train dpo RUN --config soft-labels``).

With Δ = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected)), each a sum over the answer's
tokens, and ``p`` the pair's ``label`` column, the loss of a pair is::

    −p·logσ(βΔ) − (1−p)·logσ(−βΔ)

the cross-entropy between the label and σ(βΔ), the probability that ``chosen`` is better under the policy's implicit
Bradley–Terry reward. At p = 1 it is TRL's sigmoid loss, −logσ(βΔ). Its gradient in βΔ is σ(βΔ) − p: it stops
pushing once the policy prefers ``chosen`` as strongly as the label does, where a hard label drives Δ on forever.

TRL 1.x has no per-example label (its collator keeps only the ids, ``remove_unused_columns`` drops every other
column, its sigmoid loss ignores ``label_smoothing``), so :class:`SoftDPOTrainer`:

- keeps the ``label`` column through dataset preparation (its signature columns) and checks it is a probability;
- wraps TRL's collator to carry it as a float tensor ``[batch]`` (:class:`LabelCollator`);
- computes the policy's log-probabilities as TRL does (the same forward through the fused LM head) and the
  reference's with TRL's own ``compute_ref_log_probs`` (the frozen ``ref`` copy of an adapter, the adapter disabled,
  a reference model) or the precomputed ones, then the loss above, and logs TRL's metrics plus ``labels/mean`` and
  ``labels/implied`` (the mean of σ(βΔ), which the loss pulls towards each pair's label).

A batch without a ``label`` goes to TRL's own loss unchanged: plain sigmoid DPO. The DPO options soft labels are not
defined for are refused (:func:`unsupported_options`), before any model is loaded when set in a config.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, cast

import torch
import torch.nn.functional as F
from trl import DPOTrainer

from cai.core.errors import ConfigError, DataError, Issue

LABEL = "label"
# inputs of a batch that are not the model's
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", LABEL}


def unsupported_options(args: Any) -> list[tuple[str, str]]:
    """The settings of a ``DPOConfig`` that soft-label DPO does not support, each as (setting, why)."""
    out = []
    losses = list(args.loss_type)
    if losses != ["sigmoid"]:
        out.append(("loss_type", f"{losses}: soft labels are defined for the sigmoid (Bradley–Terry) loss alone; "
                                 "set loss_type: [sigmoid]"))
    if args.ld_alpha is not None:
        out.append(("ld_alpha", f"{args.ld_alpha}: length-desensitised log-probabilities (LD-DPO) are not "
                                "implemented for soft labels; leave ld_alpha unset"))
    divergence = str(getattr(args.f_divergence_type, "value", args.f_divergence_type))
    if divergence != "reverse_kl":
        out.append(("f_divergence_type", f"{divergence}: soft labels are implemented for reverse_kl (standard DPO) "
                                         "alone"))
    if args.use_weighting:
        out.append(("use_weighting", "WPO weighting is not implemented for soft labels; set use_weighting: false"))
    if args.label_smoothing:
        out.append(("label_smoothing", f"{args.label_smoothing}: the soft label already is the smoothing (a label "
                                       "of 1 − ε is conservative DPO); set label_smoothing: 0"))
    return out


def soft_dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, label: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """The loss of each pair, ``[batch]``: −p·logσ(βΔ) − (1−p)·logσ(−βΔ), with Δ = chosen_logratios −
    rejected_logratios (log π − log π_ref, per sequence) and p = ``label``; computed in float32."""
    logits = beta * (chosen_logratios.float() - rejected_logratios.float())
    p = label.to(device=logits.device, dtype=torch.float32)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def check_labels(dataset: Any, name: str) -> None:
    """A dataset's ``label`` column (when it has one) holds probabilities: numbers in [0, 1], none missing."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or LABEL not in columns:
        return
    bad = [(i, v) for i, v in enumerate(dataset[LABEL])
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 1)]
    if bad:
        i, v = bad[0]
        raise DataError(f"the {name} dataset's label column holds {len(bad)} value(s) that are not probabilities in "
                        f"[0, 1] (row {i + 1}: {v!r})",
                        hint="A row's label is the probability that chosen is the better answer; `cai data build "
                             "RUN --preferences` writes them.")


class LabelCollator:
    """TRL's preference collator, with each example's ``label`` added to the batch as a float tensor ``[batch]``
    (TRL's collator keeps only the ids and the reference log-probabilities)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        if examples and LABEL in examples[0]:
            batch[LABEL] = torch.tensor([float(e[LABEL]) for e in examples], dtype=torch.float32)
        return batch


class SoftDPOTrainer(DPOTrainer):
    """``DPOTrainer`` whose loss takes each pair's ``label`` (P(chosen is better)) when the data has that column."""

    def __init__(self, model: Any, ref_model: Any = None, args: Any = None, **kwargs: Any):
        if args is not None:
            refused = unsupported_options(args)
            if refused:
                raise ConfigError("settings soft-label DPO does not support",
                                  [Issue(why, field=key) for key, why in refused],
                                  hint="`cai train dpo --help-config` lists every setting.")
        check_labels(kwargs.get("train_dataset"), "train")
        evals = kwargs.get("eval_dataset")
        for key, ds in (evals.items() if isinstance(evals, dict) else [("eval", evals)]):
            check_labels(ds, str(key))
        super().__init__(model, ref_model, args, **kwargs)
        self.data_collator = LabelCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        columns = cast("list[str]", self._signature_columns)      # set by TRL just now
        if LABEL not in columns:
            columns.append(LABEL)

    def compute_ref_log_probs(self, model, inputs):
        # TRL passes every key it does not know on to the model, and its precompute (at evaluate(dataset)) calls this
        # with batches from the wrapped collator: the label is not the model's (a forward that takes **kwargs would
        # ignore it, one that checks its arguments would fail)
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != LABEL})

    def _compute_loss(self, model, inputs, return_outputs):
        if LABEL not in inputs:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if model.training else "eval"
        label = inputs[LABEL]
        inputs = {k: v for k, v in inputs.items() if k != LABEL}
        outputs, model_kwargs, (chosen_logps, rejected_logps) = self._policy_logps(model, inputs)
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        per_pair = soft_dpo_loss(chosen_logratios, rejected_logratios, label, self.beta)
        loss = per_pair.mean() * self.loss_weights[0]
        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_metrics(mode, inputs, outputs, (chosen_logps, rejected_logps),
                          (chosen_logratios, rejected_logratios), label)
        if return_outputs:        # as TRL: the fused LM head builds no logits, so they are recomputed
            warnings.warn("`return_outputs=True` is deprecated in TRL and recomputes the logits with an extra "
                          "forward pass.", FutureWarning, stacklevel=2)
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _policy_logps(self, model, inputs):
        """The policy's forward as TRL's ``_compute_loss`` runs it; returns the outputs, the model's keyword
        arguments, and the summed log-probabilities of the chosen and of the rejected answers (``[batch]`` each)."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:       # MoE: the router logits give the load-balancing loss
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        # prompt-learning PEFT prepends virtual tokens to the outputs: keep the positions of the real tokens
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        return outputs, model_kwargs, logps.chunk(2, dim=0)          # the batch is [chosen..., rejected...]

    def _reference_logps(self, inputs):
        """The reference's summed log-probabilities of the chosen and rejected answers: precomputed, or TRL's own
        ``compute_ref_log_probs`` (no grad; the ``ref`` adapter, the adapter disabled, or the reference model)."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ref = self.ref_model if self.ref_model is not None else self.model
        return self.compute_ref_log_probs(ref, inputs)

    def _log_metrics(self, mode, inputs, outputs, logps, logratios, label) -> None:
        """The metrics TRL's ``_compute_loss`` logs, computed the same way, plus the labels'."""
        acc, m = self.accelerator, self._metrics[mode]
        mask = inputs["completion_mask"][..., 1:]
        seq_len = mask.size(1)
        entropy = acc.gather_for_metrics((outputs.entropy[:, -seq_len:].detach() * mask).sum()).sum()
        tokens = acc.gather_for_metrics(mask.sum()).sum()
        m["entropy"].append((entropy / tokens).item() if tokens > 0 else 0.0)
        if mode == "train":
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for name, logits, part in (("chosen", chosen_logits, chosen_mask),
                                   ("rejected", rejected_logits, rejected_mask)):
            total = acc.gather_for_metrics(logits[part.bool()].sum()).sum().item()
            count = acc.gather_for_metrics(part.sum()).sum().item()
            m[f"logits/{name}"].append(total / count if count > 0 else 0.0)
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        correct = acc.gather_for_metrics((chosen_top1 & chosen_mask.bool()).sum()).sum()
        count = acc.gather_for_metrics(chosen_mask.sum()).sum()
        m["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        chosen_rewards, rejected_rewards = (self.beta * r.detach() for r in logratios)
        m["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        m["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        m["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        m["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        m["logps/chosen"].append(acc.gather(logps[0].detach()).mean().item())
        m["logps/rejected"].append(acc.gather(logps[1].detach()).mean().item())
        m["labels/mean"].append(acc.gather(label.float()).mean().item())
        implied = torch.sigmoid((chosen_rewards - rejected_rewards).float())
        m["labels/implied"].append(acc.gather(implied).mean().item())
