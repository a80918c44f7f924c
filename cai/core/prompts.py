"""The messages of each stage: respond, critique, revise. Pure functions, no model in sight.

Layout of the critique and revise stages (chat turns, oldest first)::

    system        constitution.system_prompt (if any), then the conversation's own system message (if any)
    few-shot      per exemplar: user prompt / assistant response / user critique request / assistant critique /
                  user revision request / assistant revision
    conversation  the red-team conversation (multi-turn kept whole), ending with a user turn
    assistant     the answer under review (the initial answer in round 1, the last revision after that)
    user          the principle's critique request             -> the model writes the critique
    assistant     the critique
    user          the principle's revision request             -> the model writes the revision

Each round starts from a fresh context holding only the current answer (not every earlier critique): the context
stays short enough for small models, and a round's inputs are exactly (conversation, current answer, principle),
which is what makes a round's output reusable when other principles change.

The respond stage sends the conversation alone (plus its own system message): the initial answer is the model's
natural answer, the thing the constitution is meant to improve, so neither the constitution's system prompt nor its
exemplars are shown there.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict

from cai.core.constitution import Constitution, Exemplar, Principle
from cai.core.hashing import content_digest

# Bump when the layout above changes: it is part of every record's key, so old records are not passed off as new.
PROMPT_FORMAT = "cai-prompts-1"


class Message(TypedDict):
    role: str
    content: str


def _system(constitution: Constitution, conversation: list[Message]) -> tuple[list[Message], list[Message]]:
    """Split the conversation's own system message off, merged with the constitution's system prompt."""
    own = conversation[0]["content"] if conversation and conversation[0]["role"] == "system" else None
    rest = conversation[1:] if own is not None else conversation
    parts = [t for t in (constitution.system_prompt, own) if t]
    return ([{"role": "system", "content": "\n\n".join(parts)}] if parts else []), [dict(m) for m in rest]  # type: ignore[misc]


def _exemplar_turns(constitution: Constitution, principle: Principle) -> list[Message]:
    turns: list[Message] = []
    for ex in constitution.exemplars:
        p = constitution.principle(ex.principle) if ex.principle else principle
        turns += _exemplar(ex, p)
    return turns


def _exemplar(ex: Exemplar, p: Principle) -> list[Message]:
    return [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": ex.response},
        {"role": "user", "content": ex.critique_request or p.critique},
        {"role": "assistant", "content": ex.critique},
        {"role": "user", "content": ex.revision_request or p.revision},
        {"role": "assistant", "content": ex.revision},
    ]


def respond_messages(conversation: list[Message]) -> list[Message]:
    return [dict(m) for m in conversation]  # type: ignore[misc]


def critique_messages(constitution: Constitution, conversation: list[Message], answer: str,
                      principle: Principle) -> list[Message]:
    system, convo = _system(constitution, conversation)
    return (system + _exemplar_turns(constitution, principle) + convo
            + [{"role": "assistant", "content": answer}, {"role": "user", "content": principle.critique}])


def revise_messages(constitution: Constitution, conversation: list[Message], answer: str, principle: Principle,
                    critique: str) -> list[Message]:
    return critique_messages(constitution, conversation, answer, principle) + [
        {"role": "assistant", "content": critique}, {"role": "user", "content": principle.revision}]


def frame_sha256(constitution: Constitution) -> str:
    """Hash of everything around the drawn principles that shapes the prompts: the system prompt, the exemplars, the
    requests of the principles that exemplars name without requests of their own (such an exemplar shows them in
    every critique and revise prompt) and the prompt layout. Part of every record key, so a changed exemplar (or a
    principle an exemplar names) invalidates every record, while any other changed principle invalidates only the
    records that drew it."""
    shown = {e.principle: constitution.principle(e.principle) for e in constitution.exemplars
             if e.principle and not (e.critique_request and e.revision_request)}
    frame: dict[str, Any] = {"format": PROMPT_FORMAT, "system_prompt": constitution.system_prompt,
             "exemplars": [e.canonical() for e in constitution.exemplars]}
    if shown:
        frame["exemplar_requests"] = {pid: [p.critique, p.revision] for pid, p in sorted(shown.items())}
    return content_digest(frame)
