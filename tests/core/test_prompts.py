"""Building the messages of each stage (cai/core/prompts.py)."""

from __future__ import annotations

import pytest

from cai.core.prompts import critique_messages, frame_sha256, respond_messages, revise_messages

from conftest import make_constitution

MULTI = [
    {"role": "user", "content": "First question from the user."},
    {"role": "assistant", "content": "A first harmless reply."},
    {"role": "user", "content": "Follow-up that escalates."},
]


@pytest.fixture
def c():
    return make_constitution(4)


def test_critique_messages_layout(c):
    p3 = c.principle("p3")
    msgs = critique_messages(c, MULTI, "The answer under review.", p3)
    roles = [m["role"] for m in msgs]
    contents = [m["content"] for m in msgs]
    # system prompt first
    assert msgs[0] == {"role": "system", "content": "Be good."}
    # two exemplars of 6 turns, in file order; exemplar 1 names p1, exemplar 2 names none (uses the drawn one)
    ex = contents[1:13]
    assert ex[0] == "Exemplar prompt one" and ex[6] == "Exemplar prompt two"
    assert ex[1] == "Exemplar response one" and ex[3] == "Exemplar critique one" and ex[5] == "Exemplar revision one"
    assert ex[2] == c.principle("p1").critique and ex[4] == c.principle("p1").revision
    assert ex[8] == p3.critique and ex[10] == p3.revision
    assert roles[1:13] == ["user", "assistant"] * 6
    # the conversation, whole
    assert msgs[13:16] == MULTI
    # the answer as an assistant turn, then the critique request last
    assert msgs[16] == {"role": "assistant", "content": "The answer under review."}
    assert msgs[17] == {"role": "user", "content": p3.critique}
    assert len(msgs) == 18


def test_revise_messages_extend_critique(c):
    p2 = c.principle("p2")
    crit = critique_messages(c, MULTI, "answer", p2)
    rev = revise_messages(c, MULTI, "answer", p2, "The critique text.")
    assert rev[:len(crit)] == crit
    assert rev[len(crit):] == [{"role": "assistant", "content": "The critique text."},
                               {"role": "user", "content": p2.revision}]


def test_conversation_system_message_is_merged_not_duplicated(c):
    convo = [{"role": "system", "content": "Own system message."}] + MULTI
    msgs = critique_messages(c, convo, "answer", c.principle("p1"))
    systems = [m for m in msgs if m["role"] == "system"]
    assert len(systems) == 1 and msgs[0]["role"] == "system"
    assert "Be good." in systems[0]["content"] and "Own system message." in systems[0]["content"]


def test_no_system_prompt_no_exemplars():
    c = make_constitution(2, exemplars=False, system_prompt=None)
    msgs = critique_messages(c, MULTI, "answer", c.principle("p2"))
    assert msgs[:3] == MULTI
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]


def test_respond_stage_is_the_conversation_alone(c):
    convo = [{"role": "system", "content": "Own system message."}] + MULTI
    msgs = respond_messages(convo)
    assert msgs == convo
    assert all("Exemplar" not in m["content"] and m["content"] != "Be good." for m in msgs)
    msgs[0]["content"] = "changed"   # a copy: the prompt item is not mutated
    assert convo[0]["content"] == "Own system message."


def test_inputs_are_not_mutated(c):
    convo = [dict(m) for m in MULTI]
    critique_messages(c, convo, "a", c.principle("p1"))[13]["content"] = "x"
    assert convo == MULTI


def test_frame_hash_tracks_exemplars_and_system_prompt_only():
    base = make_constitution(3)
    assert frame_sha256(base) == frame_sha256(make_constitution(3))
    assert frame_sha256(base) == frame_sha256(make_constitution(3, critique={"p2": "Another critique."}))
    assert frame_sha256(base) != frame_sha256(make_constitution(3, system_prompt="Be better."))
    assert frame_sha256(base) != frame_sha256(make_constitution(3, exemplars=False))
