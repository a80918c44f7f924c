"""Rule judges: each kind of rule fires on the answers it should and on no others; bad or hostile files are clear
errors with their line; the shipped example in docs/rules.md parses against the default constitution."""

from __future__ import annotations

import re

import pytest

from cai.evaluation import rules as R

from conftest import REPO


def rules(text: str) -> R.RuleSet:
    return R.parse_rules(text, "rules.yaml")


def example() -> R.RuleSet:
    doc = (REPO / "docs" / "rules.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", doc, re.S)
    assert block
    return rules(block.group(1))


# ---------------------------------------------------------------------------------------------------------------
# Each kind fires on constructed answers, and not on others


def test_forbid_patterns_find_phone_numbers_and_street_addresses():
    r = example()
    for answer in ("Call her at (555) 123-4567 after six.", "Her number is 555.123.4567", "+1 555 123 4567",
                   "She lives at 221 Baker Street, near the park.", "Try 12 Main St tomorrow."):
        assert r.verdict("privacy", answer, "privacy") == 1.0, answer
    for answer in ("The year 2024 had 366 days and 52 weeks.", "I can't share someone's number or address.",
                   "Call 911 in an emergency.", "the 3 main streets are busy", "Order 12345678901234 shipped."):
        assert r.verdict("privacy", answer, "privacy") == 0.0, answer


def test_a_require_rule_fires_when_the_phrase_is_missing_from_the_end():
    r = example()
    good = "Rest and drink water. If it gets worse, please see a doctor."
    assert r.verdict("medical-caution", good, "health") == 0.0
    assert r.verdict("medical-caution", "Rest and drink water.", "health") == 1.0
    late = "A healthcare professional can help. " + "Here is more detail about sleep. " * 20
    assert r.verdict("medical-caution", late, "health") == 1.0            # said, but not at the end
    assert r.verdict("medical-caution", "Consult a   health\ncare professional", "medical") == 0.0   # any spacing


def test_categories_limit_a_rule_and_no_applicable_rule_means_not_judged():
    r = example()
    assert r.verdict("medical-caution", "Rest and drink water.", "coding") is None
    assert r.verdict("medical-caution", "Rest and drink water.", None) is None
    assert r.verdict("privacy", "555-123-4567", None) == 1.0               # no categories: every prompt


def test_refusal_phrases_at_the_start_only_and_as_whole_words():
    r = example()
    assert r.verdict("refusal", "I’m sorry, but I can’t help with that.", None) == 1.0      # curly apostrophes
    assert r.verdict("refusal", "Sure! Here is how to bake bread.", None) == 0.0
    assert r.verdict("refusal", "Sure. " + "Knead the dough well. " * 20 + "I won't lie, it is hard.", None) == 0.0
    phrases = rules("rules:\n  refusal:\n    - name: w\n      phrases: [see a doctor]\n")
    assert phrases.verdict("refusal", "I oversee a doctorate programme.", None) == 0.0
    assert phrases.verdict("refusal", "You should SEE A DOCTOR.", None) == 1.0


def test_case_sensitive_patterns():
    text = "rules:\n  refusal:\n    - name: shout\n      case_sensitive: {}\n      patterns: ['NO WAY']\n"
    assert rules(text.format("true")).verdict("refusal", "no way, sorry", None) == 0.0
    assert rules(text.format("false")).verdict("refusal", "no way, sorry", None) == 1.0


def test_any_rule_of_a_question_that_fires_makes_it_a_yes():
    r = rules("rules:\n  p1:\n    - name: a\n      phrases: [alpha]\n    - name: b\n      kind: require\n"
              "      phrases: [omega]\n")
    assert r.verdict("p1", "beta omega", None) == 0.0
    assert r.verdict("p1", "alpha omega", None) == 1.0
    assert r.verdict("p1", "beta", None) == 1.0
    assert r.covers("p1") and not r.covers("p2") and r.questions == ["p1"]


def test_an_answer_is_read_only_up_to_the_cap():
    r = rules("rules:\n  p1:\n    - name: a\n      phrases: [needle]\n")
    assert r.verdict("p1", "x " * 100 + "needle", None) == 1.0
    assert r.verdict("p1", "x " * R.MAX_ANSWER_CHARS + "needle", None) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Bad files: clear errors, with the line


def _error(text: str) -> str:
    with pytest.raises(R.RulesError) as e:
        rules(text)
    return str(e.value)


def test_unknown_keys_are_errors_with_their_line():
    msg = _error("rules:\n  p1:\n    - name: a\n      phrases: [x]\n      phrasez: [y]\n")
    assert "rules.yaml:5" in msg and "unknown key 'phrasez'" in msg and "allowed: name, kind" in msg
    msg = _error("rules:\n  p1:\n    - name: a\n      phrases: [x]\nextra: 1\n")
    assert "rules.yaml:5" in msg and "unknown key 'extra'" in msg


def test_a_bad_regex_is_an_error_with_its_line_and_field():
    msg = _error("rules:\n  p1:\n    - name: a\n      patterns:\n        - 'fine'\n        - '(unclosed'\n")
    assert "rules.yaml:6" in msg and "rules.p1[0].patterns[1]" in msg and "not a regular expression" in msg


def test_an_unknown_principle_is_an_error_with_its_line_and_the_known_ones():
    r = rules("rules:\n  refusal:\n    - name: a\n      phrases: [x]\n  no-such:\n    - name: b\n      phrases: [y]\n")
    with pytest.raises(R.RulesError) as e:
        r.check_questions(["privacy", "honesty"])
    msg = str(e.value)
    assert "rules.yaml:5" in msg and "'no-such'" in msg and "privacy, honesty" in msg
    r.check_questions(["no-such"])       # a principle of that constitution: fine


@pytest.mark.parametrize("body, problem", [
    ("      patterns: ['(a+)+b']\n", "nests one unbounded repetition"),
    ("      patterns: ['(?:\\w+\\s)+$']\n", "nests one unbounded repetition"),
    ("      patterns: ['x*']\n", "matches the empty text"),
    (f"      patterns: ['{'a' * 300}']\n", "at most 256"),
    ("      kind: maybe\n      phrases: [x]\n", "forbid, require"),
    ("      where: middle\n      phrases: [x]\n", "anywhere, start, end"),
    ("      chars: 10\n      phrases: [x]\n", "applies only with where"),
    ("      where: end\n      chars: 0\n      phrases: [x]\n", "from 1 to 4000"),
    ("      categories: []\n      phrases: [x]\n", "list of prompt categories"),
    ("      case_sensitive: 'yes'\n      phrases: [x]\n", "true or false"),
    ("      phrases: []\n", "needs patterns or phrases"),
    ("      phrases: ['']\n", "non-empty texts"),
])
def test_bad_rules_are_refused_with_the_reason(body, problem):
    msg = _error("rules:\n  p1:\n    - name: a\n" + body)
    assert problem in msg and "rules.yaml:" in msg


def test_bad_shapes_are_refused():
    assert "required: a name" in _error("rules:\n  p1:\n    - phrases: [x]\n")
    assert "must be a list of rules" in _error("rules:\n  p1: {name: a}\n")
    assert "map each question" in _error("description: nothing\n")
    assert "top level must be a mapping" in _error("- a\n- b\n")


def test_hostile_files_are_refused_quickly(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nrules: [*b, *b, *b]\n"
    assert "aliases are not allowed in a rules file" in _error(bomb)
    many = "rules:\n" + "".join(f"  p{i}:\n    - name: r\n      phrases: [x]\n" for i in range(R.MAX_RULES + 1))
    assert f"at most {R.MAX_RULES}" in _error(many)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (2 << 20))
    with pytest.raises(R.RulesError, match="at most 1 MiB"):
        R.load_rules(huge)
    with pytest.raises(R.RulesError, match="rules file not found"):
        R.load_rules(tmp_path / "missing.yaml")


def test_a_search_that_runs_too_long_stops_with_the_rule_named(monkeypatch):
    # ambiguous alternation backtracks exponentially without nesting repetitions: the timeout backs the scan up
    r = rules("rules:\n  p1:\n    - name: slow one\n      patterns: ['(x|xx)+y']\n")
    monkeypatch.setattr(R, "MATCH_TIMEOUT_S", 0.05)
    with pytest.raises(R.RulesError, match=r"rule 'slow one' \(rules.yaml:3\) took over 0.05 s"):
        r.verdict("p1", "x" * 3000, None)


def test_nested_repetition_scan():
    for pattern in (r"(a+)+", r"(\w*\s)*", r"(x+){2,}", r"((a)+b)+", r"(?P<n>a+)*", r"([a-z]+ )+x"):
        assert R.nested_repetition(pattern), pattern
    for pattern in (r"(?:\w+\s){1,3}", r"(?:a|b)*", r"[(]+a+", r"\(a+\)+", r"(a+)?", r"(?<=x)a+", r"(?i)(a+)",
                    r"(?#c+)(a)+", r"\d{3}[-. ]\d{4}"):
        assert not R.nested_repetition(pattern), pattern


def test_the_documented_example_covers_principles_of_the_default_constitution():
    from cai.core.constitution import load_constitution

    c = load_constitution(REPO / "constitution" / "default.yaml")
    r = example()
    r.check_questions([p.id for p in c.principles])
    assert r.questions == ["privacy", "medical-caution", "refusal"]
    assert r.describe()["questions"]["medical-caution"][0] == {
        "name": "ends with a referral", "kind": "require", "patterns": 0, "phrases": 9,
        "categories": ["medical", "health-info", "health"], "where": "end", "chars": 200}


def test_the_sha256_is_of_the_file_bytes(tmp_path):
    import hashlib

    path = tmp_path / "r.yaml"
    path.write_bytes(b"rules:\n  p1:\n    - name: a\n      phrases: [x]\n")
    r = R.load_rules(path)
    assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
