"""The preference: two answers to one conversation and a feedback model's soft label of which is better, as
``preferences.jsonl`` holds it (one a line).

The labeller (``cai.label``) builds it, data building (``cai data build --preferences``) turns it into DPO rows (the
label kept as a probability column) and reward-model rows, the review page shows it.

``label`` is the probability that ``responses[0]`` is the better answer: the mean, over the principles drawn for the
pair and over both orders the pair was shown in, of the feedback model's normalised probability of that answer's
option letter (``(A)`` or ``(B)``). Averaging the two orders cancels the labeller's preference for a position;
chain-of-thought labels are clamped (to 40–60% by default, as the paper found best) before they are averaged. A pair
whose log-probabilities could not be read has ``label: null`` and ``status: "unlabelled"``: never a guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from cai.core.files import read_models
from cai.core.prompts import Message

Order = Literal["ab", "ba"]          # "ab": responses[0] shown as (A); "ba": responses[0] shown as (B)
Status = Literal["labelled", "unlabelled"]


class Response(BaseModel):
    """One answer of the pair and where it came from: ``source`` is ``policy:<name>`` (sampled from the base model or
    an adapter of the run: ``policy:base``, ``policy:sft``), ``record:initial`` or ``record:final`` (the answers of
    a record of ``records.jsonl``, whose id is ``record``)."""

    model_config = ConfigDict(extra="allow")
    text: str
    source: str
    sample: int | None = None           # which of the K samples of the prompt (policy pairs)
    seed: int | None = None
    record: str | None = None           # the record the answer comes from (record pairs)


class Judgement(BaseModel):
    """One question to the feedback model: a principle, an order, and the probability it gave to the option that is
    ``responses[0]`` (``p_first`` is what it gave to option (A), whatever stands there: position bias is read from
    it). ``None`` when the log-probabilities held neither option."""

    model_config = ConfigDict(extra="allow")
    principle: str
    principle_sha256: str
    order: Order
    p_a: float | None                   # P(responses[0] is better) as this judgement says
    p_first: float | None               # P(option (A)), the raw reading
    cot: str | None = None              # the reasoning, when chain-of-thought labelling was used


class Preference(BaseModel):
    """One line of ``preferences.jsonl``. ``id`` is the pair's key (:func:`cai.core.hashing.preference_key`): the
    conversation, both answers, the principles drawn (and their hashes), the feedback model and how it was asked; a
    changed key means a new preference."""

    model_config = ConfigDict(extra="forbid")
    id: str
    prompt_id: str
    category: str | None = None
    messages: list[Message]
    responses: list[Response]           # exactly two
    judgements: list[Judgement]
    label: float | None                 # P(responses[0] is better); None: unlabelled
    status: Status
    provenance: dict[str, Any]          # feedback model, principles, orders, cot and clamp, policy, sampling, seed

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def chosen_index(self) -> int | None:
        """0 or 1: the answer the label prefers (ties go to ``responses[0]``); None when unlabelled."""
        if self.label is None:
            return None
        return 0 if self.label >= 0.5 else 1

    @property
    def confidence(self) -> float | None:
        """The probability that the chosen answer is the better one: ``max(label, 1 - label)``, in [0.5, 1]."""
        return None if self.label is None else max(self.label, 1.0 - self.label)


def read_preferences(path: str | Path) -> list[Preference]:
    path = Path(path)
    return read_models(path / "preferences.jsonl" if path.is_dir() else path, Preference, "preference")
