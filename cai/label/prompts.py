"""The feedback prompt of the paper's RL phase (Bai et al. 2022, §4.1), as chat messages.

One comparison is one user turn::

    Consider the following conversation between a human and an assistant:

    Human: ...
    Assistant: ...
    Human: ...

    <the preference principle> Options:
    (A) <response A>
    (B) <response B>

and the feedback model's answer starts "The answer is:". The label is read from its probability of continuing with
" (A)" or " (B)" (:mod:`cai.label.feedback`), never parsed from text it wrote. The constitution's worked examples
come first, as earlier turns answered "The answer is: (X)"; each is shown with its own principle (or one drawn for it
once, by its position: the paper sampled each example's principle independently), so every comparison starts with
the same turns and their tokens are computed once. Which position holds an example's better answer alternates (or
is the example's ``better_option``), so the examples do not teach the labeller a letter.

Chain of thought: the user turn asks for reasoning, the model writes it (an example shows "Let's think step by step:
... So the answer is: (X)"), then "So the answer is:" is appended and read the same way. User and model texts are
data here: they are placed in the prompt, never used as template source.
"""

from __future__ import annotations

import random
from typing import cast

from cai.core.constitution import Constitution, PreferenceExemplar, PreferencePrinciple
from cai.core.hashing import content_digest
from cai.core.prompts import Message

PREFERENCE_FORMAT = "cai-preference-1"       # part of every label key: change it when the layout below changes
INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER = "The answer is:"
COT_ASK = "Think step by step about which response is better before you answer."
COT_START = "Let's think step by step:"
COT_ANSWER = "So the answer is:"
LETTERS = ("A", "B")


def transcript(messages: list[Message]) -> str:
    """The conversation as the paper wrote it: ``Human:`` and ``Assistant:`` turns (a system turn as ``System:``)."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def question(principle: PreferencePrinciple) -> str:
    """The principle as a multiple-choice question: ending "Options:" whether or not its text does."""
    text = " ".join(principle.text.split())
    return text if text.rstrip().endswith("Options:") else f"{text} Options:"


def comparison(messages: list[Message], principle: PreferencePrinciple, option_a: str, option_b: str,
               cot: bool = False) -> str:
    """One comparison's user turn."""
    body = (f"{INTRO}\n\n{transcript(messages)}\n\n{question(principle)}\n"
            f"(A) {option_a.strip()}\n(B) {option_b.strip()}")
    return f"{body}\n\n{COT_ASK}" if cot else body


def answer_text(letter: str, reasoning: str | None = None) -> str:
    """What a worked example's answer turn says."""
    if reasoning is not None:
        return f"{COT_START} {' '.join(reasoning.split())}\n{COT_ANSWER} ({letter})"
    return f"{ANSWER} ({letter})"


def exemplar_principle(c: Constitution, index: int, exemplar: PreferenceExemplar) -> PreferencePrinciple:
    """The principle an example is shown with: its own question (word for word), else the principle it names, else
    one drawn for it once (by its position)."""
    if exemplar.question is not None:
        return PreferencePrinciple(id=exemplar.principle or f"exemplar-{index}", text=exemplar.question)
    if exemplar.principle is not None:
        return c.preference_principle(exemplar.principle)
    rng = random.Random(index)
    ids = c.preference_ids
    return c.preference_principle(rng.choices(ids, weights=[c.preference_principle(i).weight for i in ids])[0])


def exemplar_better_option(index: int, exemplar: PreferenceExemplar) -> str:
    """Where an example's better answer stands: its ``better_option``, else A and B in turn."""
    return exemplar.better_option or LETTERS[index % 2]


def fewshot_messages(c: Constitution, cot: bool = False) -> list[Message]:
    """The worked examples as earlier turns: a comparison each, answered. With ``cot``, examples without reasoning
    are left out (they would teach the model to answer without thinking)."""
    out: list[Message] = []
    for i, ex in enumerate(c.preference_exemplars):
        if cot and ex.reasoning is None:
            continue
        letter = exemplar_better_option(i, ex)
        a, b = (ex.better, ex.worse) if letter == "A" else (ex.worse, ex.better)
        convo = cast(list[Message], ex.conversation())
        out.append({"role": "user", "content": comparison(convo, exemplar_principle(c, i, ex), a, b, cot)})
        out.append({"role": "assistant", "content": answer_text(letter, ex.reasoning if cot else None)})
    return out


def feedback_messages(c: Constitution, messages: list[Message], principle: PreferencePrinciple, option_a: str,
                      option_b: str, cot: bool = False) -> list[Message]:
    """The whole request for one comparison: the worked examples, then the comparison."""
    return [*fewshot_messages(c, cot), {"role": "user", "content": comparison(messages, principle, option_a,
                                                                              option_b, cot)}]


def frame_sha256(c: Constitution, cot: bool) -> str:
    """Hash of everything around a comparison that the feedback model reads: the layout and the worked examples
    (with the principles they are shown with). Part of every label key."""
    shown = [{"exemplar": ex.canonical(), "principle": exemplar_principle(c, i, ex).sha256}
             for i, ex in enumerate(c.preference_exemplars)]
    return content_digest({"format": PREFERENCE_FORMAT, "cot": cot, "exemplars": shown})
