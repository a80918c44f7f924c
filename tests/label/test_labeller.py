"""The labeller: the feedback prompt, the soft label read from a tiny model's log-probabilities (against a hand
computation), order-swap averaging, ensembling, clamping, unreadable readings, keys and the cache."""

from __future__ import annotations

import math

import pytest

from cai.core.constitution import parse_constitution
from cai.core.files import KeyedLog
from cai.core.preference import Response
from cai.core.prompt_files import PromptItem
from cai.label.feedback import LocalFeedback, Reading, endpoint_p_first
from cai.label.labeller import LabelSettings, label_pairs
from cai.label.pairs import Pair, draw_preference_principles
from cai.label.prompts import ANSWER, comparison, feedback_messages, fewshot_messages

from conftest import constitution_yaml

RL = '''preference_principles:
  - id: kinder
    text: "Which of these assistant responses is kinder? Options:"
  - id: helpful
    text: Which response is more helpful?
  - id: honest
    text: Which response is more honest?
preference_exemplars:
  - principle: kinder
    prompt: How do I stop my cat scratching the sofa?
    better: Give her a scratching post.
    worse: Get rid of the cat.
    reasoning: One is kind and solves it; the other is not.
  - principle: helpful
    prompt: How do I kill a stuck process?
    better: Run kill PID.
    worse: I can't help with killing.
'''


@pytest.fixture(scope="module")
def rl():
    return parse_constitution(constitution_yaml(2) + RL, "c.yaml")


def pair(i: int = 0, a: str = "A kind and useful answer.", b: str = "A rude answer.") -> Pair:
    item = PromptItem(f"q{i}", [{"role": "user", "content": f"Question number {i}?"}])
    return Pair(item, (Response(text=a, source="policy:base"), Response(text=b, source="policy:base")))


class Scripted:
    """A feedback model that answers from a rule: ``rule(user_text) -> P(A)`` (None: unreadable); counts calls."""

    name = "scripted"
    model = "scripted"
    model_revision = None

    def __init__(self, rule):
        self.rule, self.asked = rule, 0

    def identity(self):
        return {"backend": "scripted"}

    def read(self, requests, cot, seed):
        self.asked += len(requests)
        return [Reading(self.rule(r[-1]["content"]), "thinking" if cot else None) for r in requests]


def option_a(text: str) -> str:
    return text.split("\n(A) ")[1].split("\n(B) ")[0]


# ---------------------------------------------------------------------------------------------------------------
# The prompt


def test_the_comparison_is_the_papers_layout(rl):
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Help me?"}]
    text = comparison(convo, rl.preference_principle("helpful"), "first", "second")
    assert text == ("Consider the following conversation between a human and an assistant:\n\n"
                    "Human: Hi\n\nAssistant: Hello\n\nHuman: Help me?\n\n"
                    "Which response is more helpful? Options:\n(A) first\n(B) second")
    # a principle that already ends with "Options:" does not get it twice
    assert comparison(convo, rl.preference_principle("kinder"), "x", "y").count("Options:") == 1


def test_worked_examples_come_first_and_alternate_their_better_side(rl):
    shots = fewshot_messages(rl)
    assert [m["role"] for m in shots] == ["user", "assistant"] * 2
    assert shots[1]["content"] == f"{ANSWER} (A)" and option_a(shots[0]["content"]) == "Give her a scratching post."
    assert shots[3]["content"] == f"{ANSWER} (B)" and option_a(shots[2]["content"]) == "I can't help with killing."
    # chain of thought: only the examples with reasoning, answered with it
    cot = fewshot_messages(rl, cot=True)
    assert len(cot) == 2 and cot[1]["content"].startswith("Let's think step by step: One is kind")
    assert cot[1]["content"].endswith("So the answer is: (A)")
    msgs = feedback_messages(rl, [{"role": "user", "content": "Q?"}], rl.preference_principle("honest"), "a", "b")
    assert msgs[:-1] == shots and "Human: Q?" in msgs[-1]["content"]


def test_principle_draws_depend_on_ids_and_weights_not_texts(rl):
    edited = parse_constitution(constitution_yaml(2) + RL.replace("more honest?", "more truthful?"), "c.yaml")
    draws = [draw_preference_principles(rl, pair(i).digest, 0, 2) for i in range(30)]
    assert draws == [draw_preference_principles(edited, pair(i).digest, 0, 2) for i in range(30)]
    assert all(len(set(d)) == 2 for d in draws)                       # without replacement
    assert {p for d in draws for p in d} == {"kinder", "helpful", "honest"}
    assert draws != [draw_preference_principles(rl, pair(i).digest, 1, 2) for i in range(30)]   # the seed counts


# ---------------------------------------------------------------------------------------------------------------
# Averaging, clamping, unreadable readings


def label(rl, pairs, feedback, tmp_path, **settings):
    return label_pairs(pairs, rl, feedback, LabelSettings(**settings), KeyedLog(tmp_path / "j.jsonl"), {})


def test_a_labeller_that_only_likes_position_a_gives_one_half_after_swapping(rl, tmp_path):
    biased = Scripted(lambda text: 0.8)
    (pref,) = label(rl, [pair()], biased, tmp_path).preferences
    assert [j.order for j in pref.judgements] == ["ab", "ba"]
    assert [j.p_first for j in pref.judgements] == [0.8, 0.8]
    assert [j.p_a for j in pref.judgements] == pytest.approx([0.8, 0.2])
    assert pref.label == pytest.approx(0.5)
    # one order only keeps the bias
    (one,) = label(rl, [pair()], biased, tmp_path / "one", orders="ab").preferences
    assert one.label == pytest.approx(0.8)


def test_swapped_readings_of_a_consistent_labeller_agree(rl, tmp_path):
    knows = Scripted(lambda text: 0.9 if option_a(text).startswith("A kind") else 0.1)
    prefs = label(rl, [pair(0), pair(1, a="A rude answer.", b="A kind and useful answer.")], knows,
                  tmp_path).preferences
    assert prefs[0].label == pytest.approx(0.9) and prefs[0].chosen_index == 0
    assert prefs[1].label == pytest.approx(0.1) and prefs[1].chosen_index == 1
    assert prefs[1].confidence == pytest.approx(0.9)


def test_principles_are_ensembled(rl, tmp_path):
    by_principle = {"kinder": 0.9, "helpful": 0.6, "honest": 0.3}

    def rule(text):
        pid = next(k for k in by_principle if {"kinder": "kinder?", "helpful": "helpful?",
                                                "honest": "honest?"}[k] in text.split("\n(A)")[0])
        p = by_principle[pid]
        return p if option_a(text).startswith("A kind") else 1 - p

    (pref,) = label(rl, [pair()], Scripted(rule), tmp_path, principles_per_pair=3).preferences
    assert sorted({j.principle for j in pref.judgements}) == ["helpful", "honest", "kinder"]
    assert pref.label == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert pref.provenance["principles"] == [j.principle for j in pref.judgements if j.order == "ab"]


def test_chain_of_thought_readings_are_clamped(rl, tmp_path):
    sure = Scripted(lambda text: 0.999 if option_a(text).startswith("A kind") else 0.001)
    (pref,) = label(rl, [pair()], sure, tmp_path, cot=True).preferences
    assert [j.p_a for j in pref.judgements] == pytest.approx([0.6, 0.6])
    assert pref.label == pytest.approx(0.6) and all(j.cot == "thinking" for j in pref.judgements)
    (wide,) = label(rl, [pair()], sure, tmp_path / "w", cot=True, clamp=(0.2, 0.8)).preferences
    assert wide.label == pytest.approx(0.8)
    (raw,) = label(rl, [pair()], sure, tmp_path / "r").preferences      # no CoT: not clamped
    assert raw.label == pytest.approx(0.999)


def test_a_missing_reading_leaves_the_pair_unlabelled_never_guessed(rl, tmp_path):
    half = Scripted(lambda text: None if option_a(text).startswith("A rude") else 0.7)
    result = label(rl, [pair()], half, tmp_path)
    (pref,) = result.preferences
    assert pref.label is None and pref.status == "unlabelled" and pref.chosen_index is None
    assert result.stats.unreadable == 1


@pytest.mark.parametrize("bad", [dict(principles_per_pair=0), dict(orders="sideways"), dict(clamp=(0.6, 0.9)),
                                 dict(batch_size=0)])
def test_bad_settings_are_clear_errors(rl, tmp_path, bad):
    from cai.core.errors import CaiError

    with pytest.raises(CaiError):
        label(rl, [pair()], Scripted(lambda t: 0.5), tmp_path, **bad)


# ---------------------------------------------------------------------------------------------------------------
# Keys and the cache


def test_readings_are_cached_and_an_edit_asks_again_only_what_it_touched(rl, tmp_path):
    pairs = [pair(i) for i in range(12)]
    first = Scripted(lambda t: 0.7)
    before = label(rl, pairs, first, tmp_path).preferences
    assert first.asked == 24
    again = Scripted(lambda t: 0.7)
    same = label(rl, pairs, again, tmp_path).preferences
    assert again.asked == 0 and [p.id for p in same] == [p.id for p in before]
    edited = parse_constitution(constitution_yaml(2) + RL.replace("more honest?", "more truthful?"), "c.yaml")
    third = Scripted(lambda t: 0.7)
    after = label(edited, pairs, third, tmp_path).preferences
    touched = [b.id != a.id for b, a in zip(before, after)]
    drew_honest = [b.provenance["principles"] == ["honest"] for b in before]
    assert touched == drew_honest and any(drew_honest) and not all(drew_honest)
    assert third.asked == 2 * sum(drew_honest)
    # a principle a worked example is shown with is in every prompt: editing it asks everything again
    shown = parse_constitution(constitution_yaml(2) + RL.replace("kinder? Options:", "gentler? Options:"), "c.yaml")
    assert all(a.id != b.id for a, b in zip(before, label(shown, pairs, Scripted(lambda t: 0.7),
                                                          tmp_path).preferences))


def test_the_key_covers_the_feedback_model_and_the_settings(rl, tmp_path):
    a = label(rl, [pair()], Scripted(lambda t: 0.7), tmp_path).preferences[0].id
    other = Scripted(lambda t: 0.7)
    other.identity = lambda: {"backend": "scripted", "model": "another"}
    assert label(rl, [pair()], other, tmp_path).preferences[0].id != a
    assert label(rl, [pair()], Scripted(lambda t: 0.7), tmp_path, orders="ab").preferences[0].id != a
    assert label(rl, [pair()], Scripted(lambda t: 0.7), tmp_path, cot=True).preferences[0].id != a


# ---------------------------------------------------------------------------------------------------------------
# A real model: the label is the hand-computed normalised probability


def test_the_local_soft_label_is_the_normalised_probability_of_the_two_letters(rl, tiny_backend, tmp_path):
    import torch

    feedback = LocalFeedback(tiny_backend, batch_size=8)
    pairs = [pair(0), pair(1, a="Short.", b="A much longer answer with several more words in it.")]
    prefs = label(rl, pairs, feedback, tmp_path).preferences
    tok = tiny_backend.tokenizer
    for p, pr in zip(pairs, prefs):
        for j in pr.judgements:
            a, b = (x.text for x in p.responses)
            shown = (a, b) if j.order == "ab" else (b, a)
            text = tiny_backend.render(feedback_messages(rl, p.item.messages, rl.preference_principle(j.principle),
                                                         *shown)) + ANSWER
            ids_a = tok(text + " (A)", add_special_tokens=False)["input_ids"]
            ids_b = tok(text + " (B)", add_special_tokens=False)["input_ids"]
            n = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
            with torch.inference_mode():
                logits = tiny_backend.lm(input_ids=torch.tensor([ids_a[:n]])).logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            la, lb = logp[ids_a[n]].item(), logp[ids_b[n]].item()
            expected = math.exp(la) / (math.exp(la) + math.exp(lb))
            assert j.p_first == pytest.approx(expected, abs=1e-4)
        assert pr.label == pytest.approx(sum(j.p_a for j in pr.judgements) / 2, abs=1e-6)
    assert feedback.shared_rows > 0          # the questions' common beginning was computed once


def test_local_chain_of_thought_writes_reasoning_then_reads_the_letters(rl, tiny_backend, tmp_path):
    feedback = LocalFeedback(tiny_backend, batch_size=8, cot_tokens=8)
    (pref,) = label(rl, [pair()], feedback, tmp_path, cot=True).preferences
    assert all(isinstance(j.cot, str) for j in pref.judgements)
    assert all(0.4 <= j.p_a <= 0.6 for j in pref.judgements) and pref.label is not None


def test_endpoint_letters_are_read_from_top_logprobs_whatever_their_spelling():
    assert endpoint_p_first({"A": math.log(0.6), " B": math.log(0.2), "(A": math.log(0.1)}) == pytest.approx(
        0.7 / 0.9)
    assert endpoint_p_first({"B)": -0.1, "The": -2.0}) == 0.0
    assert endpoint_p_first({"The": -0.1, "Answer": -1.0}) is None


def test_an_example_with_its_own_question_does_not_tie_every_prompt_to_its_principle(rl, tmp_path):
    own = RL.replace("  - principle: kinder\n", "  - principle: kinder\n    question: Which is kinder? Options:\n")
    c = parse_constitution(constitution_yaml(2) + own.replace("Which is kinder? Options:",
                                                              '"Which is kinder? Options:"'), "c.yaml")
    assert "Which is kinder? Options:" in fewshot_messages(c)[0]["content"]
    pairs = [pair(i) for i in range(12)]
    before = label(c, pairs, Scripted(lambda t: 0.7), tmp_path).preferences
    edited = parse_constitution(constitution_yaml(2) + own.replace("Which is kinder? Options:",
                                                                   '"Which is kinder? Options:"').replace(
        "kinder? Options:\"\n  - id: helpful", "gentler? Options:\"\n  - id: helpful"), "c.yaml")
    assert edited.preference_principle("kinder").text.endswith("gentler? Options:")
    after = label(edited, pairs, Scripted(lambda t: 0.7), tmp_path).preferences
    drew_kinder = [b.provenance["principles"] == ["kinder"] for b in before]
    assert [a.id != b.id for a, b in zip(after, before)] == drew_kinder and not all(drew_kinder)
