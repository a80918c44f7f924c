"""The local backend: a transformers causal LM that generates a whole batch at once.

Prompts are rendered with the model's own chat template, left-padded (so every row's generation starts at the same
column) and decoded together in one ``generate`` call. Generation stops at any of the model's end-of-turn tokens.
"""

from __future__ import annotations

import logging

from cai.backends.base import Completion, Sampling
from cai.errors import ContextLengthError, Issue, ModelError
from cai.models import resolve_model
from cai.prompts import Message

log = logging.getLogger(__name__)


class LocalBackend:
    name = "local"

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        resolved = resolve_model(model)
        self.model = resolved.model_id
        self.model_revision = resolved.revision
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 on GPUs that have it; fp32 on CPU (bf16 matmuls are slower than fp32 on most CPUs)
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.path, revision=resolved.revision)
            self.lm = AutoModelForCausalLM.from_pretrained(resolved.path, revision=resolved.revision,
                                                           dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model {model!r}: {str(e).splitlines()[0]}",
                             hint="Give a local folder written by save_pretrained, a Hugging Face id (needs the "
                                  "hub or its cache), or 'default' for the offline SmolLM2-135M-Instruct.") from None
        self.lm.to(self.device).eval()
        if not self.tokenizer.chat_template:
            raise ModelError(f"model {self.model!r} has no chat template",
                             hint="Use an instruction-tuned (chat) model, or add a chat_template to its "
                                  "tokenizer_config.json.")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        cfg = self.lm.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        gen_eos = getattr(self.lm.generation_config, "eos_token_id", None)
        for value in (self.tokenizer.eos_token_id, gen_eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        if not ids:
            raise ModelError(f"model {self.model!r} defines no end-of-sequence token")
        return sorted(ids)

    def render(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        import torch

        if not batch:
            return []
        texts = [self.render(m) for m in batch]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        if self.context_length:
            too_long = [Issue(f"conversation {i} of the batch has {n} prompt tokens; with max_new_tokens="
                              f"{sampling.max_new_tokens} it needs {n + sampling.max_new_tokens}, the model's "
                              f"context is {self.context_length}")
                        for i, n in enumerate(lengths) if n + sampling.max_new_tokens > self.context_length]
            if too_long:
                raise ContextLengthError("prompt does not fit the model's context", too_long)
        enc = enc.to(self.device)
        torch.manual_seed(seed)
        do_sample = sampling.temperature > 0
        with torch.inference_mode():
            out = self.lm.generate(
                **enc,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=do_sample,
                temperature=sampling.temperature if do_sample else None,
                top_p=sampling.top_p if do_sample else None,
                top_k=None,
                eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
        return [self._completion(row, n) for row, n in zip(new_tokens, lengths)]

    def _completion(self, row: list[int], prompt_tokens: int) -> Completion:
        eos = set(self.eos_ids)
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens = row if stop is None else row[:stop]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Completion(text, prompt_tokens, len(tokens) + (stop is not None), "length" if stop is None else "stop")
