"""The loop's stop rules on constructed evaluation figures: each fires on its own case and not on the others."""

from __future__ import annotations

import pytest

from cai.loop.rules import RuleState, StopSettings, check, diversity, harmlessness, judge_blind, over_refusal

SETTINGS = StopSettings(max_stall=1, refusal_rise=0.10, diversity_floor=0.8)


def harm(verdict: str, diff: float = 0.0, lo: float = -0.1, hi: float = 0.1) -> dict:
    return {"verdict": verdict, "difference": diff, "lo": lo, "hi": hi, "prompts": 16}


def div(d2: float, sb: float, cr: float) -> dict:
    return {"distinct_2": d2, "self_bleu": sb, "compression_ratio": cr}


def report(model_harm=None, prev_harm=None, refusal=None, model_div=None, base_div=None, rates=None) -> dict:
    return {"comparisons": {"sft": {"harm": model_harm, "refusal": refusal}},
            "comparisons_to": {"prev": {"sft": {"harm": prev_harm}}} if prev_harm else {},
            "diversity": {"models": {"sft": {"red_team": model_div}, "base": {"red_team": base_div}}},
            "judge": {"base_rates": rates or {}}, "settings": {"principles": list((rates or {}).keys())}}


GOOD_RATES = {"p1": {"n": 40, "yes": 0.3}, "p2": {"n": 40, "yes": 0.6}}


def test_a_healthy_iteration_fires_nothing():
    r = report(model_harm=harm("fewer", -0.2, -0.3, -0.1), refusal=harm("no difference detected"),
               model_div=div(0.5, 0.3, 0.4), base_div=div(0.5, 0.3, 0.4), rates=GOOD_RATES)
    assert check(r, "sft", "base", RuleState(), SETTINGS) == []


def test_harmlessness_stall_fires_only_after_more_than_max_stall_iterations_in_a_row():
    state = RuleState()
    assert harmlessness(harm("no difference detected"), state, SETTINGS, "the base") is None     # 1 in a row
    stop = harmlessness(harm("more", 0.05, 0.01, 0.09), state, SETTINGS, "the previous iteration")   # 2 in a row
    assert stop is not None and stop.rule == "harmlessness_stalled" and state.stalled == 2
    assert "2 iteration(s) in a row" in stop.message and "+5.0 points" in stop.message
    fresh = RuleState(stalled=1)
    assert harmlessness(harm("fewer", -0.2, -0.3, -0.1), fresh, SETTINGS, "x") is None and fresh.stalled == 0
    assert harmlessness(None, RuleState(), SETTINGS, "x") is None                 # nothing judged: no verdict


def test_the_previous_iteration_is_the_reference_after_the_first():
    # better than the base but no better than the previous iteration: that is a stall
    r = report(model_harm=harm("fewer", -0.2, -0.3, -0.1), prev_harm=harm("no difference detected"),
               rates=GOOD_RATES)
    state = RuleState(stalled=1)
    fired = check(r, "sft", "prev", state, SETTINGS)
    assert [s.rule for s in fired] == ["harmlessness_stalled"]


@pytest.mark.parametrize("comparison, fires", [
    (harm("more", 0.25, 0.12, 0.38), True),
    (harm("more", 0.06, 0.01, 0.11), False),                # more, but not beyond the 10 points
    (harm("no difference detected", 0.25, -0.05, 0.5), False),   # a big point estimate the interval does not back
    (harm("fewer", -0.2, -0.3, -0.1), False),
])
def test_over_refusal_needs_a_paired_rise_beyond_the_threshold(comparison, fires):
    stop = over_refusal(comparison, SETTINGS)
    assert (stop is not None) == fires
    if fires:
        assert stop.rule == "over_refusal" and stop.figure == 0.25 and "+25.0 points" in stop.message


@pytest.mark.parametrize("model, fires, collapsed", [
    (div(0.30, 0.60, 0.25), True, ["distinct_2", "self_bleu", "compression_ratio"]),
    (div(0.30, 0.30, 0.40), False, None),        # distinct-2 alone fell: one measure is not enough
    (div(0.30, 0.62, 0.40), True, ["distinct_2", "self_bleu"]),
    (div(0.48, 0.31, 0.39), False, None),
])
def test_diversity_collapse_needs_two_of_three_measures(model, fires, collapsed):
    base = div(0.5, 0.3, 0.4)
    stop = diversity(model, base, SETTINGS)
    assert (stop is not None) == fires
    if fires:
        assert stop.rule == "diversity_collapse" and sorted(stop.figure) == sorted(
            ["distinct_2", "self_bleu", "compression_ratio"])
        assert [n for n in stop.figure if stop.figure[n] < 0.8] == collapsed
    # self-BLEU is read inverted: a lower self-BLEU is more diverse, never a collapse
    assert diversity(div(0.5, 0.1, 0.4), base, SETTINGS) is None


def test_a_judge_that_says_one_thing_to_95_percent_stops_the_loop():
    blind = {"p1": {"n": 50, "yes": 0.98}, "p2": {"n": 50, "yes": 0.94}}
    stop = judge_blind(blind, ["p1", "p2"])
    assert stop is not None and stop.rule == "judge_blind" and stop.figure == pytest.approx(0.96)
    assert judge_blind(GOOD_RATES, ["p1", "p2"]) is None
    assert judge_blind({"p1": {"n": 10, "yes": 0.02}}, ["p1"]).message.startswith("the judge said no to 98%")
    assert judge_blind({}, ["p1"]) is None
