"""A deterministic backend for tests and dry runs: no model, instant, reproducible.

The reply is derived from a hash of the messages and the seed, so different stages give different texts. Markers in
any user turn steer it (a marker in a prompt acts at every stage, exemplars or not), to exercise the output checks:
``[[empty]]`` gives an empty reply, ``[[echo]]`` repeats the request, ``[[long]]`` is cut off (finish_reason
"length"), ``[[same]]`` gives the same text at every stage (so a revision equals the answer it revises). Tokens are
counted as whitespace-separated words.
``CAI_FAKE_DELAY`` (seconds per call) slows it down, for tests that kill a run midway.
"""

from __future__ import annotations

import hashlib
import os
import time

from cai.backends.base import Completion, Sampling
from cai.core.prompts import Message


class FakeBackend:
    name = "fake"
    model_revision = None

    def __init__(self, model: str = "fake", context_length: int = 4096, delay: float | None = None):
        self.model = model
        self.context_length = context_length
        self.delay = float(os.environ.get("CAI_FAKE_DELAY", "0")) if delay is None else delay
        self.calls = 0          # generate() calls: one per stage per batch
        self.batch_sizes: list[int] = []

    def count_tokens(self, messages: list[Message]) -> int:
        return sum(len(m["content"].split()) + 2 for m in messages)

    def generate(self, batch: list[list[Message]], sampling: Sampling, seed: int) -> list[Completion]:
        self.calls += 1
        self.batch_sizes.append(len(batch))
        if self.delay:
            time.sleep(self.delay)
        return [self._one(messages, sampling, seed) for messages in batch]

    def _one(self, messages: list[Message], sampling: Sampling, seed: int) -> Completion:
        prompt_tokens = self.count_tokens(messages)
        if self.context_length and prompt_tokens + sampling.max_new_tokens > self.context_length:
            raise ValueError("prompt does not fit the context")  # the pipeline checks before calling
        user = [m["content"] for m in messages if m["role"] == "user"]
        steer, last = "\n".join(user), user[-1] if user else ""
        if "[[empty]]" in steer:
            return Completion("", prompt_tokens, 0, "stop")
        if "[[echo]]" in steer:
            return self._cut(last, prompt_tokens, sampling)
        if "[[same]]" in steer:
            return self._cut("A fixed reply that never changes.", prompt_tokens, sampling)
        digest = hashlib.sha256(repr((messages, sampling.temperature, seed)).encode()).hexdigest()[:12]
        words = ["Reply", digest, "to", f"{len(messages)}", "messages:"] + last.split()[:6][::-1]
        if "[[long]]" in steer:
            words = words * 100
        return self._cut(" ".join(words), prompt_tokens, sampling)

    @staticmethod
    def _cut(text: str, prompt_tokens: int, sampling: Sampling) -> Completion:
        words = text.split()
        if len(words) > sampling.max_new_tokens:
            return Completion(" ".join(words[: sampling.max_new_tokens]), prompt_tokens, sampling.max_new_tokens,
                              "length")
        return Completion(text, prompt_tokens, len(words), "stop")
