"""Rule judges: deterministic checks for principles a pattern can see (``cai eval RUN --judge rules:FILE``).

A rules file (YAML) maps a question of the evaluation (a principle id of the run's constitution, or ``refusal``) to
rules; each rule holds regular expressions (``patterns``) and/or literal ``phrases`` and says what a match means:

- ``kind: forbid`` (the default): a match is a violation (for ``refusal``: a refusal);
- ``kind: require``: the absence of a match is ("every medical answer ends with a recommendation to see a
  professional").

``categories`` limits a rule to prompts of those categories; ``where: start | end`` (with ``chars``, default 300)
reads only the opening or the closing characters of the answer. For one answer the question's verdict is 1.0 (yes)
when any rule that applies fires, 0.0 when none does, and ``None`` (not judged) when no rule of the question applies
to the prompt's category. A verdict is a probability of 1.0 or 0.0, so it goes through the same figures, intervals
and paired tests as a model judge's P(yes). Which questions the file covers, its path and its sha256 are in the
report's lineage; the sha256 is part of every rule judgement's key.

Reading: the answer with ’ read as ' and runs of whitespace as one space; case is ignored unless
``case_sensitive: true``. A phrase matches as whole words (``"see a doctor"`` does not match in "oversee a
doctorate"); a pattern is a Python regular expression (the ``regex`` module, which reads ``re``'s syntax).

Bounds (a hostile file is refused, and no answer can stall the evaluation): the YAML limits of
:mod:`cai.core.safe_yaml` (1 MiB, aliases refused), at most :data:`MAX_RULES` rules and :data:`MAX_TERMS` patterns
and phrases a rule; a pattern of at most :data:`MAX_PATTERN_CHARS` characters that does not match the empty text and
does not nest one unbounded repetition inside another (``(a+)+``, ``(\\w*\\s)*``: the shape of catastrophic
backtracking; bound one of them, ``(\\w+\\s){1,5}``); the answer is cut to its first :data:`MAX_ANSWER_CHARS`
characters before matching (``where: end`` reads the last ``chars`` of the whole answer); and each search stops
after :data:`MATCH_TIMEOUT_S` seconds with an error that names the rule, never a silent verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from cai.core.errors import CaiError, Issue, display_path
from cai.core.hashing import sha256_hex
from cai.core.safe_yaml import field_path, refuse_oversized, yaml_with_lines

REFUSAL = "refusal"                 # the refusal question; every other key is a principle id
KINDS = ("forbid", "require")
WHERE = ("anywhere", "start", "end")
MAX_RULES = 256
MAX_TERMS = 256                     # patterns + phrases of one rule
MAX_PATTERN_CHARS = 256
MAX_PHRASE_CHARS = 200
MAX_ANSWER_CHARS = 4000             # ~1,000 tokens: what a rule reads of an answer
DEFAULT_CHARS = 300                 # the window of where: start | end
MATCH_TIMEOUT_S = 1.0               # one search of one pattern on one answer

_RULE_KEYS = ("name", "kind", "patterns", "phrases", "categories", "where", "chars", "case_sensitive")
_TOP_KEYS = ("description", "rules")


class RulesError(CaiError):
    """A rules file that does not validate, or a rule that could not be applied."""


@dataclass(frozen=True)
class Rule:
    question: str
    name: str
    kind: str
    patterns: tuple[str, ...]
    phrases: tuple[str, ...]
    categories: tuple[str, ...] | None
    where: str
    chars: int
    case_sensitive: bool
    source: str
    line: int
    compiled: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def applies(self, category: str | None) -> bool:
        return self.categories is None or category in self.categories

    def window(self, text: str) -> str:
        text = normalise(text)
        if self.where == "start":
            return text[:self.chars]
        if self.where == "end":
            return text[-self.chars:]
        return text[:MAX_ANSWER_CHARS]

    def matches(self, text: str) -> bool:
        window = self.window(text)
        for compiled in self.compiled:
            try:
                if compiled.search(window, timeout=MATCH_TIMEOUT_S) is not None:
                    return True
            except TimeoutError:
                raise RulesError(f"rule {self.name!r} ({self.source}:{self.line}) took over {MATCH_TIMEOUT_S:g} s on "
                                 f"one answer: pattern {compiled.pattern!r} backtracks too much",
                                 hint="Simplify the pattern (bound its repetitions, or use phrases).") from None
        return False

    def fires(self, text: str) -> bool:
        """Whether this rule says yes (a violation, a refusal) about ``text``."""
        return self.matches(text) if self.kind == "forbid" else not self.matches(text)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "patterns": len(self.patterns), "phrases": len(self.phrases),
                "categories": list(self.categories) if self.categories is not None else None, "where": self.where,
                **({"chars": self.chars} if self.where != "anywhere" else {})}


@dataclass(frozen=True)
class RuleSet:
    path: str                       # as shown to people (and written into the report)
    sha256: str                     # of the file's bytes: part of every rule judgement's key
    rules: dict[str, tuple[Rule, ...]]      # by question
    lines: dict[str, int]           # where each question's rules start
    description: str | None = None

    @property
    def questions(self) -> list[str]:
        return list(self.rules)

    def covers(self, question: str) -> bool:
        return question in self.rules

    def verdict(self, question: str, answer: str, category: str | None) -> float | None:
        """1.0 when a rule of ``question`` that applies to ``category`` fires, 0.0 when none fires, None when none
        applies."""
        applicable = [r for r in self.rules[question] if r.applies(category)]
        if not applicable:
            return None
        return 1.0 if any(r.fires(answer) for r in applicable) else 0.0

    def check_questions(self, principles: list[str]) -> None:
        """Every question must be a principle of the run's constitution or ``refusal``."""
        known = set(principles) | {REFUSAL}
        issues = [Issue(f"{q!r} is neither a principle of the run's constitution nor {REFUSAL!r}", self.path,
                        self.lines.get(q), f"rules.{q}") for q in self.rules if q not in known]
        if issues:
            raise RulesError(f"invalid rules file {self.path}", issues,
                             hint=f"The constitution's principles: {', '.join(principles)}.")

    def describe(self) -> dict[str, Any]:
        """For the report's lineage."""
        return {"path": self.path, "sha256": self.sha256, "description": self.description,
                "questions": {q: [r.describe() for r in rules] for q, rules in self.rules.items()}}


def normalise(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").split())


# ---------------------------------------------------------------------------------------------------------------
# Reading a rules file


def load_rules(path: str | Path) -> RuleSet:
    path = Path(path)
    shown = display_path(path)
    if not path.is_file():
        raise RulesError(f"rules file not found: {shown}" if not path.exists() else f"{shown} is not a file",
                         hint="--judge rules:FILE names a YAML file of rules (see docs/rules.md).")
    refuse_oversized(path, shown, "rules file", RulesError)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RulesError(f"{shown} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_rules(text, shown, sha256_hex(data))


def parse_rules(text: str, source: str = "<string>", sha256: str | None = None) -> RuleSet:
    data, lines = yaml_with_lines(text, source, RulesError, "rules file")
    issues: list[Issue] = []

    def bad(message: str, loc: tuple) -> None:
        issues.append(Issue(message, source, _line(lines, loc), field_path(loc) or None))

    if not isinstance(data, dict):
        raise RulesError(f"invalid rules file {source}", [Issue("the top level must be a mapping with rules: "
                                                               "{question: [rule, ...]}", source, 1)])
    for key in data:
        if key not in _TOP_KEYS:
            bad(f"unknown key {key!r} (allowed: {', '.join(_TOP_KEYS)})", (key,))
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        bad("must be text", ("description",))
    by_question = data.get("rules")
    if not isinstance(by_question, dict) or not by_question:
        bad("must map each question (a principle id, or refusal) to a list of rules", ("rules",))
        raise RulesError(f"invalid rules file {source}", issues)
    rules: dict[str, tuple[Rule, ...]] = {}
    total = 0
    for question, items in by_question.items():
        loc: tuple = ("rules", question)
        if not isinstance(question, str) or not regex.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", question):
            bad("a question is a principle id (letters, digits, '_', '-', '.') or refusal", loc)
            continue
        if not isinstance(items, list) or not items:
            bad("must be a list of rules", loc)
            continue
        total += len(items)
        if total > MAX_RULES:
            bad(f"too many rules: a rules file may hold at most {MAX_RULES}", loc + (0,))
            break
        parsed = [_rule(question, i, item, source, lines, bad) for i, item in enumerate(items)]
        rules[question] = tuple(r for r in parsed if r is not None)
    if issues:
        raise RulesError(f"invalid rules file {source}", sorted(issues, key=lambda i: i.line or 0))
    return RuleSet(source, sha256 or sha256_hex(text.encode("utf-8")), rules,
                   {q: _line(lines, ("rules", q)) or 0 for q in rules}, description)


def _line(lines: dict[tuple, int], loc: tuple) -> int | None:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc)


def _rule(question: str, index: int, item: Any, source: str, lines: dict[tuple, int], bad) -> Rule | None:
    loc: tuple = ("rules", question, index)
    if not isinstance(item, dict):
        bad("a rule is a mapping with name, patterns and/or phrases, ...", loc)
        return None
    ok = True

    def fail(message: str, key: str | None = None) -> None:
        nonlocal ok
        ok = False
        bad(message, loc + ((key,) if key else ()))

    for key in item:
        if key not in _RULE_KEYS:
            fail(f"unknown key {key!r} (allowed: {', '.join(_RULE_KEYS)})", key)
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        fail("required: a name for the report" if name is None else "must be text", "name")
    kind = item.get("kind", "forbid")
    if kind not in KINDS:
        fail(f"must be one of {', '.join(KINDS)} (forbid: a match is a violation; require: its absence is)", "kind")
    where = item.get("where", "anywhere")
    if where not in WHERE:
        fail(f"must be one of {', '.join(WHERE)}", "where")
    chars = item.get("chars", DEFAULT_CHARS)
    if "chars" in item and where == "anywhere":
        fail("applies only with where: start or where: end", "chars")
    if not isinstance(chars, int) or isinstance(chars, bool) or not 1 <= chars <= MAX_ANSWER_CHARS:
        fail(f"must be a whole number of characters from 1 to {MAX_ANSWER_CHARS}", "chars")
    case_sensitive = item.get("case_sensitive", False)
    if not isinstance(case_sensitive, bool):
        fail("must be true or false", "case_sensitive")
    categories = item.get("categories")
    if categories is not None and (not isinstance(categories, list) or not categories
                                   or not all(isinstance(c, str) and c for c in categories)):
        fail("must be a list of prompt categories", "categories")
    terms: dict[str, list[str]] = {}
    for key, cap in (("patterns", MAX_PATTERN_CHARS), ("phrases", MAX_PHRASE_CHARS)):
        values = item.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            fail("must be a list of non-empty texts", key)
            values = []
        for j, v in enumerate(values):
            if len(v) > cap:
                bad(f"{len(v)} characters; a {key[:-1]} may have at most {cap}", loc + (key, j))
                ok = False
        terms[key] = values
    if ok and not terms["patterns"] and not terms["phrases"]:
        fail("a rule needs patterns or phrases (or both)")
    if ok and len(terms["patterns"]) + len(terms["phrases"]) > MAX_TERMS:
        fail(f"at most {MAX_TERMS} patterns and phrases a rule")
    if not ok:
        return None
    flags = 0 if case_sensitive else regex.IGNORECASE
    compiled = []
    for j, p in enumerate(terms["patterns"]):
        problem = pattern_problem(p, flags)
        if problem:
            bad(problem, loc + ("patterns", j))
            ok = False
        else:
            compiled.append(regex.compile(p, flags))
    if terms["phrases"]:
        compiled.append(regex.compile("|".join(phrase_regex(p) for p in terms["phrases"]), flags))
    if not ok:
        return None
    return Rule(question, str(name).strip(), kind, tuple(terms["patterns"]), tuple(terms["phrases"]),
                tuple(categories) if categories is not None else None, where, chars, case_sensitive, source,
                _line(lines, loc) or 0, tuple(compiled))


def phrase_regex(phrase: str) -> str:
    """A literal phrase as whole words, any run of whitespace inside it matching any other."""
    words = normalise(phrase).split(" ")
    body = r"\s+".join(regex.escape(w) for w in words)
    head = r"(?<!\w)" if regex.match(r"\w", words[0]) else ""
    tail = r"(?!\w)" if regex.search(r"\w$", words[-1]) else ""
    return f"(?:{head}{body}{tail})"


def pattern_problem(pattern: str, flags: int = 0) -> str | None:
    """Why a pattern is refused (it does not compile, matches the empty text, or nests unbounded repetitions), or
    None."""
    try:
        compiled = regex.compile(pattern, flags)
    except regex.error as e:
        return f"not a regular expression: {e}"
    if compiled.search("") is not None:
        return "matches the empty text, so it would match every answer"
    if nested_repetition(pattern):
        return ("nests one unbounded repetition inside another (like (a+)+): such patterns can take exponential "
                "time; bound one of them, e.g. {1,5}")
    return None


def nested_repetition(pattern: str) -> bool:
    """Whether an unbounded repetition (``*``, ``+``, ``{n,}``) applies to a group that holds one. A scan of the
    pattern's text (escapes and character classes skipped), conservative: the timeout backs it up."""
    holds = [False]           # per open group: does it hold an unbounded repetition?
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch in "\\[":                                  # an escape or a character class: one atom
            unbounded, i = _quantifier(pattern, i + 2 if ch == "\\" else _class_end(pattern, i))
            holds[-1] = holds[-1] or unbounded
            continue
        if ch == "(":
            holds.append(False)
            i += 1
            if pattern.startswith("?#", i):                  # a comment: skip it whole
                i = pattern.find(")", i) + 1 or n
                holds.pop()
            elif pattern.startswith("?", i):                 # (?:, (?P<name>, (?<=, (?i) ...: not quantifiers
                while i < n and pattern[i] not in ":)=!>":
                    i += 1
                i += 1 if i < n and pattern[i] != ")" else 0
            continue
        if ch == ")":
            inner = holds.pop() if len(holds) > 1 else False
            unbounded, i = _quantifier(pattern, i + 1)
            if unbounded and inner:
                return True
            holds[-1] = holds[-1] or inner or unbounded
            continue
        unbounded, i = _quantifier(pattern, i + 1)
        holds[-1] = holds[-1] or unbounded
    return False


def _class_end(pattern: str, i: int) -> int:
    """The index after the character class that opens at ``i``."""
    j = i + 1
    if pattern.startswith("^", j):
        j += 1
    if pattern.startswith("]", j):
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _quantifier(pattern: str, i: int) -> tuple[bool, int]:
    """Whether a quantifier at ``i`` repeats without bound, and the index after it (and its lazy/possessive mark)."""
    m = regex.match(r"\*|\+|\?|\{(\d*)(,?)(\d*)\}", pattern[i:])
    if m is None:
        return False, i
    text = m.group(0)
    unbounded = text in ("*", "+") or (text.startswith("{") and m.group(2) == "," and m.group(3) == "")
    end = i + len(text)
    if end < len(pattern) and pattern[end] in "?+":
        end += 1
    return unbounded, end
