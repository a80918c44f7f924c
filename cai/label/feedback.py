"""Reading a feedback model's choice: the probability it gives option (A) against option (B).

- :class:`LocalFeedback`: a local model. The request is rendered with the model's chat template and its answer turn
  is begun with "The answer is:" (after the reasoning, with chain of thought). The prompt is then tokenized twice,
  continued by " (A)" and by " (B)"; where the two token sequences part is where the model chooses, and the
  next-token log-probabilities of the two tokens there give ``P(A) = p(A) / (p(A) + p(B))``, whatever the tokenizer
  does with the brackets and spaces. The rows of a batch go through one forward pass whose common beginning (the
  worked examples, and a pair's conversation) is computed once (:class:`cai.evaluation.judge.LocalJudge`'s
  shared-prefix pass, the same machinery the judge and generation use).
- :class:`EndpointFeedback`: an OpenAI-compatible endpoint asked for one token at temperature 0 with
  ``top_logprobs``; the alternatives that read as the letter A or B (``A``, ``(A``, `` A``...) are summed. An endpoint
  that returns no log-probabilities, or whose top alternatives hold neither letter, gives no reading (``None``):
  the pair is recorded unlabelled, never guessed.

With ``cot`` the model first writes its reasoning (greedy, at most ``cot_tokens`` tokens); what it wrote after its own
"So the answer is" is cut, so the letter is always read from the probabilities.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from cai.backends.base import Sampling, dtype_of
from cai.core.errors import CaiError
from cai.core.prompts import Message
from cai.label.prompts import ANSWER, COT_ANSWER

ENDPOINT_ASK = "Answer with one letter only: A or B."
ENDPOINT_COT_ASK = "So which option is better? Answer with one letter only: A or B."
_LETTER = re.compile(r"^\W*([AB])\W*$")


class FeedbackError(CaiError):
    pass


@dataclass
class Reading:
    """What the feedback model said about one request: ``p_first`` = P(option A) among A and B (None: unreadable),
    and the reasoning it wrote first (chain of thought)."""

    p_first: float | None
    cot: str | None = None


class Feedback(Protocol):
    name: str                      # "local" or "openai"
    model: str
    model_revision: str | None

    def read(self, requests: list[list[Message]], cot: bool, seed: int) -> list[Reading]:
        """One reading per request (each: the worked examples and one comparison)."""
        ...

    def identity(self) -> dict[str, Any]:
        """What answers: part of every judgement's key."""
        ...


def two_way(logp_a: float, logp_b: float) -> float:
    """P(A) among the two options, from their log-probabilities."""
    return 1.0 / (1.0 + math.exp(max(-700.0, min(700.0, logp_b - logp_a))))


def cut_reasoning(text: str) -> str:
    """The reasoning up to where the model itself announced its answer (that part is read, not parsed)."""
    stop = text.find(COT_ANSWER.rstrip(":"))
    return (text if stop < 0 else text[:stop]).strip()


class LocalFeedback:
    """Feedback from a local model (a :class:`cai.backends.local.LocalBackend`)."""

    name = "local"

    def __init__(self, backend: Any, batch_size: int = 16, cot_tokens: int = 128):
        from cai.evaluation.judge import LocalJudge

        self.backend = backend
        self.model, self.model_revision = backend.model, backend.model_revision
        self.batch_size, self.cot_tokens = batch_size, cot_tokens
        self._forward = LocalJudge(backend, batch_size=batch_size)     # its shared-prefix forward pass
        self.rows_scored = 0

    def identity(self) -> dict[str, Any]:
        out = {"backend": self.name, "model": self.model, "revision": self.model_revision,
               "adapter": getattr(self.backend, "adapter", None)}
        if dtype_of(self.backend):                      # bf16 readings are other readings
            out["dtype"] = dtype_of(self.backend)
        return out

    @property
    def shared_rows(self) -> int:
        """Rows scored over a shared, once-computed prefix (for tests and benchmarks)."""
        return self._forward.shared_rows

    def read(self, requests: list[list[Message]], cot: bool, seed: int) -> list[Reading]:
        reasons: list[str | None] = [None] * len(requests)
        if cot:
            done = self.backend.generate(requests, Sampling(temperature=0.0, top_p=1.0,
                                                            max_new_tokens=self.cot_tokens), seed)
            reasons = [cut_reasoning(c.text) for c in done]
        texts = [self.backend.render(r) + (f"{why}\n{COT_ANSWER}" if why is not None else ANSWER)
                 for r, why in zip(requests, reasons)]
        rows, choices = zip(*(self._choice_point(t) for t in texts)) if texts else ((), ())
        out: list[Reading] = []
        for start in range(0, len(rows), self.batch_size):
            out += [Reading(p) for p in self._score(list(rows[start:start + self.batch_size]),
                                                    list(choices[start:start + self.batch_size]))]
        for reading, why in zip(out, reasons):
            reading.cot = why
        return out

    def _choice_point(self, text: str) -> tuple[list[int], tuple[int, int]]:
        """The tokens up to where " (A)" and " (B)" part, and the two tokens there."""
        tok = self.backend.tokenizer
        ids_a = tok(text + " (A)", add_special_tokens=False)["input_ids"]
        ids_b = tok(text + " (B)", add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
            n += 1
        if n >= min(len(ids_a), len(ids_b)):
            raise FeedbackError("the feedback model's tokenizer spells (A) and (B) the same way")
        return ids_a[:n], (ids_a[n], ids_b[n])

    def _score(self, rows: list[list[int]], choices: list[tuple[int, int]]) -> list[float | None]:
        import torch

        limit = self.backend.context_length
        fits = [i for i, r in enumerate(rows) if not limit or len(r) < limit]
        out: list[float | None] = [None] * len(rows)
        if not fits:
            return out
        logp = torch.log_softmax(self._forward.logits([rows[i] for i in fits]), dim=-1)
        for j, i in enumerate(fits):
            a, b = choices[i]
            out[i] = two_way(logp[j, a].item(), logp[j, b].item())
        self.rows_scored += len(fits)
        return out


@dataclass
class EndpointFeedback:
    """Feedback through an OpenAI-compatible endpoint that returns log-probabilities (``top_logprobs``)."""

    backend: Any                 # a cai.backends.openai.OpenAIBackend
    top_logprobs: int = 20
    cot_tokens: int = 256
    name: str = "openai"

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def model_revision(self) -> str | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model}

    def read(self, requests: list[list[Message]], cot: bool, seed: int) -> list[Reading]:
        reasons: list[str | None] = [None] * len(requests)
        if cot:
            done = self.backend.generate(requests, Sampling(temperature=0.0, top_p=1.0,
                                                            max_new_tokens=self.cot_tokens), seed)
            reasons = [None if c.error else cut_reasoning(c.text) for c in done]
            asks = [[*r, {"role": "assistant", "content": why}, {"role": "user", "content": ENDPOINT_COT_ASK}]
                    for r, why in zip(requests, reasons) if why is not None]
        else:
            asks = [[*r[:-1], {"role": "user", "content": f"{r[-1]['content']}\n\n{ENDPOINT_ASK}"}] for r in requests]
        answered = iter(self.backend.first_token_logprobs(asks, self.top_logprobs))
        out = []
        for why in reasons:
            if cot and why is None:
                out.append(Reading(None))
                continue
            c = next(answered)
            out.append(Reading(None if c.error else endpoint_p_first(c.top_logprobs or {}), why))
        return out


def endpoint_p_first(top: dict[str, float]) -> float | None:
    """P(A) from an endpoint's top alternatives for the first token (token text → log-probability); None when
    neither letter is among them."""
    mass: dict[str, list[float]] = {"A": [], "B": []}
    for token, lp in top.items():
        m = _LETTER.match(token)
        if m:
            mass[m.group(1)].append(lp)
    if not mass["A"] and not mass["B"]:
        return None

    def lse(xs: list[float]) -> float:
        return math.log(sum(math.exp(x) for x in xs)) if xs else -math.inf

    a, b = lse(mass["A"]), lse(mass["B"])
    if a == -math.inf:
        return 0.0
    if b == -math.inf:
        return 1.0
    return two_way(a, b)


def check_logprobs(backend: Any, url: str) -> None:
    """Fail up front, naming the endpoint, when it does not return log-probabilities (labels would all be
    missing)."""
    probe = backend.first_token_logprobs([[{"role": "user", "content": f"Say A. {ENDPOINT_ASK}"}]], 5)[0]
    if probe.error:
        raise FeedbackError(f"the feedback endpoint {url} did not answer: {probe.error}",
                            hint="Check --feedback-base-url, --feedback-model and the API key.")
    if not probe.top_logprobs:
        raise FeedbackError(f"the feedback endpoint {url} returns no log-probabilities (logprobs/top_logprobs)",
                            hint="Labels are read from log-probabilities, never parsed from text: use a server "
                                 "that returns them (vLLM, TGI, llama.cpp, cai serve) or a local feedback model.")
