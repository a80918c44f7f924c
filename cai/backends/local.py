"""The local backend: a transformers causal LM that generates a whole batch at once.

Prompts are rendered with the model's own chat template, left-padded (so every row's generation starts at the same
column) and decoded together. Generation stops at any of the model's end-of-turn tokens.

Prefix cache: the critique and revise stages of every prompt begin with the same tokens (system prompt and few-shot
exemplars, ~1000 tokens with the default constitution, ~90% of each prompt). Their key/value cache is computed once
and reused by every batch that starts with them; each row then prefills only its own suffix. On the default model this
cuts a critique stage from ~27 s to ~7 s for 8 prompts, with identical greedy output. The rows' suffixes are
left-padded *after* the shared prefix; position ids come from the attention mask, so pads never shift positions (the
layout is :mod:`cai.inference.batching`'s, shared with the judge and the server engine; the top-p draw is
:mod:`cai.inference.sampling`'s).

Decoding: :func:`cai.inference.decode.decode` over a cache grown in place (:mod:`cai.inference.kv`): each step writes
only its new column, and a row leaves the batch the step after its end token (transformers' ``generate``, kept for
caches with other layer kinds, copies the cache every step and runs every row to the end). Same tokens.

Continuation: after a call, its cache is kept (:mod:`cai.inference.continuation`); when the next call's rows extend
its rows (the revise stage's prompts are the critique stage's prompts plus the critiques just written), only their
new tokens are fed. On by default; ``continuation=False`` prefills every call from the prefix cache alone.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cai.backends.base import Completion, Sampling
from cai.core.errors import ContextLengthError, Issue
from cai.core.prompts import Message
from cai.inference.batching import common_prefix, left_pad, prefix_cache, repeat_cache
from cai.inference.continuation import Kept, build, kept_after, plan
from cai.inference.decode import decode
from cai.inference.kv import GrowingLayer, growing, reserve
from cai.inference.loading import load_chat_model
from cai.inference.sampling import TOP_K, draw_rows

log = logging.getLogger(__name__)


class TopPSampler(LogitsProcessor):
    """Temperature + nucleus (top-p) sampling that draws the token itself and leaves it as the only candidate.

    transformers' own top-p sorts the whole vocabulary and samples over it at every step; this draws with
    :func:`cai.inference.sampling.draw_rows` (the nucleus looked for in the top ``k`` tokens first), one generator
    for the whole ``generate`` call. The distribution sampled is exactly top-p's.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, k: int = TOP_K):
        self.temperature, self.top_p, self.k = temperature, top_p, k
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.draw(scores)[:, None]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """One token per row of ``scores`` [rows, vocab]: [rows]."""
        return draw_rows(scores, self.temperature, self.top_p, self.generator, self.k).reshape(-1)


class LocalBackend:
    name = "local"

    MIN_PREFIX = 32       # tokens: a shorter shared prefix is not worth a cache entry
    MAX_ENTRIES = 4       # cached prefixes kept (least recently used dropped)

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 prefix_cache: bool = True, weights: bool = True, adapter: str | None = None,
                 continuation: bool = True):
        """``weights=False`` loads the tokenizer and config only: enough to count tokens (``cai generate
        --dry-run``), not to generate. ``adapter``: a LoRA adapter folder of this base model, merged in."""
        loaded = load_chat_model(model, device, dtype, weights=weights, adapter=adapter)
        self.adapter = adapter
        self.tokenizer, self.lm, self.device = loaded.tokenizer, loaded.lm, loaded.device
        self.model, self.model_revision = loaded.model_id, loaded.revision
        self.dtype = loaded.dtype
        self.context_length, self.eos_ids = loaded.context_length, loaded.eos_ids
        self.tokenizer.padding_side = "left"
        self.prefix_cache = prefix_cache
        self.shared_prefix = False
        self._prefixes: OrderedDict[tuple[int, ...], object] = OrderedDict()   # token ids -> DynamicCache (batch 1)
        self.prefix_hits = 0      # rows that reused a cached prefix (for tests and benchmarks)
        self.continuation = continuation and prefix_cache
        self.own_loop = True       # cai.inference.decode (rows leave as they end); False: transformers' generate
        self._kept: Kept | None = None
        self.continued_tokens = 0  # prompt tokens not prefilled again: taken from the previous call's cache
        self.shared_prefix = self.lm is not None and prefix_cache and self._use_shared_prefix_attention()

    def _use_shared_prefix_attention(self) -> bool:
        """Switch the model to shared-prefix attention (see prefix_attention.py) where it runs on SDPA; other
        attention kernels keep a per-row copy of the prefix instead."""
        if getattr(self.lm.config, "_attn_implementation", None) != "sdpa":
            return False
        try:
            from cai.inference.prefix_attention import register

            self.lm.set_attn_implementation(register())
            return True
        except Exception as e:   # an architecture that refuses custom attention: the copy path still works
            log.info("shared-prefix attention unavailable for %s (%s); copying the prefix per row", self.model, e)
            return False

    def render(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        if not batch:
            return []
        if self.lm is None:
            raise RuntimeError("this backend was loaded without weights (weights=False): it counts tokens only")
        texts = [self.render(m) for m in batch]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        lengths = [len(x) for x in ids]
        if self.context_length:
            too_long = [Issue(f"conversation {i} of the batch has {n} prompt tokens; with max_new_tokens="
                              f"{sampling.max_new_tokens} it needs {n + sampling.max_new_tokens}, the model's "
                              f"context is {self.context_length}")
                        for i, n in enumerate(lengths) if n + sampling.max_new_tokens > self.context_length]
            if too_long:
                raise ContextLengthError("prompt does not fit the model's context", too_long)
        pad = self.tokenizer.pad_token_id
        kept, self._kept = self._kept, None
        cont = plan(kept, ids) if self.continuation else None
        extra: dict = {}
        if kept is not None and cont is not None:
            # the previous call's cache, its rows extended: only each row's new tokens are fed
            held, input_ids, mask, positions, _ = build(kept, cont, ids, pad, self.device)
            extra["position_ids"] = positions
            prefix, tokens = kept.prefix, [kept.tokens[j][:n] + x[len(kept.prefix) + n:]
                                           for j, n, x in zip(cont.rows, cont.reuse, ids)]
            self.continued_tokens += sum(cont.reuse)
        else:
            prefix, held, mask, input_ids, tokens = self._fresh_layout(ids, extra)
        # grown in place: room for the whole call now, instead of a copy of every layer at every step
        reserve(growing(held), input_ids.shape[1] + sampling.max_new_tokens)
        sampler = TopPSampler(sampling.temperature, sampling.top_p, seed) if sampling.temperature > 0 else None
        slots = list(range(len(ids)))
        with torch.inference_mode():
            if self.own_loop and all(isinstance(layer, GrowingLayer) for layer in held.layers):
                done = decode(self.lm, input_ids, mask, held, max_new_tokens=sampling.max_new_tokens,
                              eos_ids=self.eos_ids, pad_id=pad, positions=extra.get("position_ids"),
                              pick=sampler.draw if sampler else None)
                new_tokens, slots = done.tokens, done.slots
            else:   # other cache layers (sliding windows): transformers' loop, every row to the end
                if sampler is not None:
                    # our processor draws the token (the only one left), decoding stays "greedy"
                    extra["logits_processor"] = LogitsProcessorList([sampler])
                out = self.lm.generate(input_ids=input_ids, attention_mask=mask, past_key_values=held,
                                       max_new_tokens=sampling.max_new_tokens, do_sample=False, temperature=None,
                                       top_p=None, top_k=None, eos_token_id=self.eos_ids, pad_token_id=pad, **extra)
                new_tokens = out[:, input_ids.shape[1]:].tolist()
        if self.continuation:   # kept in the cache's row order
            self._kept = kept_after(held, prefix, mask[slots], [tokens[r] for r in slots],
                                    [new_tokens[r] for r in slots], set(self.eos_ids))
        return [self._completion(row, n) for row, n in zip(new_tokens, lengths)]

    def _fresh_layout(self, ids: list[list[int]], extra: dict):
        """A call laid out from the prefix cache: ``(prefix held apart, cache, attention mask, input ids, each row's
        tokens in the cache's columns)``; position ids go into ``extra``."""
        from transformers import DynamicCache

        prefix, cache = self._cached_prefix(ids) if self.prefix_cache else ((), None)
        p = len(prefix)
        padded = left_pad([x[p:] for x in ids], self.tokenizer.pad_token_id, offset=p, device=self.device)
        if cache is not None:
            self.prefix_hits += len(ids)
        if cache is not None and self.shared_prefix:
            # only the rows' suffixes go in; the prefix lives once in the cache, positions continue after it
            from cai.inference.prefix_attention import SuffixCache

            extra["position_ids"] = padded.positions
            shared = SuffixCache(self.lm.config, cache)  # type: ignore[arg-type]
            return tuple(prefix), shared, padded.mask, padded.ids, [x[p:] for x in ids]
        # [shared prefix][left padding][row suffix], the prefix's cache copied into every row
        input_ids, mask = padded.with_prefix(prefix)
        held = repeat_cache(cache, len(ids)) if cache is not None else DynamicCache(config=self.lm.config)
        return (), held, mask, input_ids, [list(x) for x in ids]

    def _cached_prefix(self, ids: list[list[int]]) -> tuple[tuple[int, ...], object | None]:
        """The longest cached prefix shared by every row, computing one for this batch's common prefix if none
        covers nearly all of it. At least one token of each row stays outside the prefix (generate needs it)."""
        limit = min(len(x) for x in ids) - 1
        common = common_prefix(ids)
        first = ids[0]
        best: tuple[int, ...] = ()
        for key in self._prefixes:
            if len(best) < len(key) <= limit and all(x[:len(key)] == list(key) for x in ids):
                best = key
        if len(best) >= max(self.MIN_PREFIX, common - 64):
            self._prefixes.move_to_end(best)
            return best, self._prefixes[best]
        if len(ids) < 2 or common < self.MIN_PREFIX:   # one row alone: its whole prompt is no shared prefix
            return (best, self._prefixes[best]) if best else ((), None)
        key = tuple(first[:common])
        self._prefixes[key] = prefix_cache(self.lm, key, config=self.lm.config, device=self.device)
        while len(self._prefixes) > self.MAX_ENTRIES:
            self._prefixes.popitem(last=False)
        return key, self._prefixes[key]

    def _completion(self, row: list[int], prompt_tokens: int) -> Completion:
        eos = set(self.eos_ids)
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens = row if stop is None else row[:stop]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Completion(text, prompt_tokens, len(tokens) + (stop is not None), "length" if stop is None else "stop")
