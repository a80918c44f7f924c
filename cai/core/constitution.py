"""Constitutions: the principle files that drive critique and revision.

A constitution is a YAML file (schema in ``constitution/README.md``). Loading validates it strictly and, for every
problem, names the file, the line and the field. A loaded :class:`Constitution` carries a content hash
(``sha256``) and one hash per principle, so a record can say exactly which version of which principle made it.

YAML is read by :mod:`cai.core.safe_yaml` (lines kept, hostile documents refused); the public formats that can be
imported (Hugging Face's llm-swarm JSON, the CAI paper's files) are in :mod:`cai.core.importers`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from cai.core.errors import ConstitutionError, Issue, display_path
from cai.core.safe_yaml import field_path, refuse_oversized, yaml_with_lines

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]


class _Strict(BaseModel):
    # strict: no silent coercion ("1" is not a number, 1.0 is not a string); unknown keys are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Principle(_Strict):
    id: Annotated[str, Field(pattern=ID_PATTERN, max_length=80)]
    critique: Text
    revision: Text
    tags: list[Text] = Field(default_factory=list)
    weight: Annotated[float, Field(gt=0, le=1e6)] = 1.0

    @property
    def sha256(self) -> str:
        """Hash of what the model sees of this principle (id and both texts; tags and weight do not change
        any generated text, so editing them does not invalidate records)."""
        return _sha256({"id": self.id, "critique": self.critique, "revision": self.revision})


class Exemplar(_Strict):
    """A worked few-shot example: a prompt, a flawed response, its critique and its revision.

    The requests the example shows are its own ``critique_request`` / ``revision_request`` when given; else those of
    the principle it names (so editing that principle changes every critique and revise prompt); else those of the
    principle drawn for the round."""

    prompt: Text
    response: Text
    critique: Text
    revision: Text
    principle: str | None = None
    critique_request: Text | None = None
    revision_request: Text | None = None

    def canonical(self) -> dict:
        """The content as hashed: the optional requests only when set, so older files keep their hashes."""
        data = self.model_dump(mode="json")
        for key in ("critique_request", "revision_request"):
            if data[key] is None:
                del data[key]
        return data


class PreferencePrinciple(_Strict):
    """A multiple-choice question for AI feedback (the paper's RL phase): "Which of these assistant responses is less
    harmful? Choose the response that ...". The options follow it; the text may end with "Options:" (Anthropic's
    files do) or not (then "Options:" is added)."""

    id: Annotated[str, Field(pattern=ID_PATTERN, max_length=80)]
    text: Text
    tags: list[Text] = Field(default_factory=list)
    weight: Annotated[float, Field(gt=0, le=1e6)] = 1.0

    @property
    def sha256(self) -> str:
        """Hash of what the feedback model sees (id and text): an edit relabels only the pairs that drew it."""
        return _sha256({"id": self.id, "text": self.text})


class PreferenceExemplar(_Strict):
    """A worked multiple-choice example shown before each comparison: a conversation, a better and a worse answer,
    and optionally the reasoning a chain-of-thought labeller should write. It is shown with its own ``question``
    when it has one; else with the text of the principle it names (so editing that principle changes every
    labelling prompt); else with a principle drawn for it once."""

    prompt: Text | None = None                  # a one-turn conversation: the user's message
    messages: list[dict[str, str]] | None = None  # or a whole conversation, ending with the user's turn
    better: Text
    worse: Text
    reasoning: Text | None = None
    principle: str | None = None
    question: Text | None = None                # the question it is shown with, word for word (else the principle's)
    better_option: Literal["A", "B"] | None = None   # where the better answer is shown; None: balanced by a seed
                                                     # (set it when the reasoning names a letter)

    def conversation(self) -> list[dict[str, str]]:
        return list(self.messages) if self.messages else [{"role": "user", "content": self.prompt or ""}]

    def canonical(self) -> dict:
        return {k: v for k, v in self.model_dump(mode="json").items() if v is not None}


class Constitution(_Strict):
    name: Annotated[str, Field(pattern=ID_PATTERN, max_length=80)]
    version: str
    description: str = ""
    system_prompt: str | None = None
    principles: list[Principle] = Field(default_factory=list)
    exemplars: list[Exemplar] = Field(default_factory=list)
    preference_principles: list[PreferencePrinciple] = Field(default_factory=list)
    preference_exemplars: list[PreferenceExemplar] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f'must be a string: write version: "{value}" (a bare number like 1.10 reads as 1.1)')
        return value

    @property
    def sha256(self) -> str:
        data = self.model_dump(mode="json") | {"exemplars": [e.canonical() for e in self.exemplars]}
        for key in ("preference_principles", "preference_exemplars"):   # absent when empty: older files keep
            if not data[key]:                                             # the hashes their records carry
                del data[key]
        if self.preference_exemplars:
            data["preference_exemplars"] = [e.canonical() for e in self.preference_exemplars]
        return _sha256(data)

    @property
    def principle_sha256(self) -> dict[str, str]:
        return {p.id: p.sha256 for p in self.principles}

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(principle_id)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def preference_principle(self, principle_id: str) -> PreferencePrinciple:
        for p in self.preference_principles:
            if p.id == principle_id:
                return p
        raise KeyError(principle_id)

    @property
    def preference_ids(self) -> list[str]:
        return [p.id for p in self.preference_principles]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data.setdefault("version", self.version)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def _sha256(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Loading with line numbers


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution file; raise :class:`ConstitutionError` listing every problem."""
    path = Path(path)
    shown = display_path(path)
    if not path.exists():
        raise ConstitutionError(f"constitution file not found: {shown}")
    if path.is_dir():
        raise ConstitutionError(f"{shown} is a folder; give a constitution .yaml file")
    refuse_oversized(path, shown, "constitution")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{shown} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_constitution(text, shown)


def parse_constitution(text: str, source: str = "<string>") -> Constitution:
    data, lines = yaml_with_lines(text, source)
    if not isinstance(data, dict):
        raise ConstitutionError(
            f"invalid constitution {source}",
            [Issue("the top level must be a mapping with name, version, principles, ...", source, 1)],
        )
    empty = _no_principles(data, source, lines)
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as e:
        issues = [_issue_from_pydantic(err, source, lines) for err in e.errors()]
        raise ConstitutionError(f"invalid constitution {source}", sorted(issues + empty, key=_by_line)) from None
    issues = empty + _cross_checks(constitution, source, lines)
    if issues:
        raise ConstitutionError(f"invalid constitution {source}", issues)
    return constitution


def _cross_checks(c: Constitution, source: str, lines: dict[tuple, int]) -> list[Issue]:
    issues: list[Issue] = []
    lists: tuple[tuple[str, list[Any], list[Any]], ...] = (
        ("principles", c.principles, c.exemplars),
        ("preference_principles", c.preference_principles, c.preference_exemplars))
    for field, principles, exemplars in lists:
        seen: dict[str, int] = {}
        for i, p in enumerate(principles):
            loc: tuple = (field, i, "id")
            if p.id in seen:
                first = lines.get((field, seen[p.id], "id"))
                issues.append(Issue(f"duplicate principle id {p.id!r} (first defined on line {first})", source,
                                    _line_for(loc, lines), field_path(loc)))
            else:
                seen[p.id] = i
        ex_field = "exemplars" if field == "principles" else "preference_exemplars"
        for i, ex in enumerate(exemplars):
            if ex.principle is not None and ex.principle not in seen:
                loc = (ex_field, i, "principle")
                issues.append(Issue(f"names {'preference ' if ex_field != 'exemplars' else ''}principle "
                                    f"{ex.principle!r}, which is not in this constitution (known: "
                                    f"{', '.join(seen) or 'none'})", source, _line_for(loc, lines), field_path(loc)))
    for i, ex in enumerate(c.preference_exemplars):
        loc = ("preference_exemplars", i)
        problem = _exemplar_conversation_problem(ex)
        if problem:
            issues.append(Issue(problem, source, _line_for(loc, lines), field_path(loc)))
    return issues


def _no_principles(data: dict, source: str, lines: dict[tuple, int]) -> list[Issue]:
    """Neither principles (critique and revision) nor preference principles: checked on the raw data, so it is
    reported together with any other problem of the file."""
    if data.get("principles") or data.get("preference_principles"):
        return []
    what = "the principle list is empty" if "principles" in data else "required field is missing"
    return [Issue(f"{what}: a constitution needs at least one principle (or preference_principles, to label "
                  "preferences with alone)", source, _line_for(("principles",), lines), "principles")]


def _by_line(issue: Issue) -> int:
    return issue.line or 0


def _exemplar_conversation_problem(ex: PreferenceExemplar) -> str | None:
    if (ex.prompt is None) == (ex.messages is None):
        return "give either prompt (one user message) or messages (a conversation), not both or neither"
    if ex.messages is not None:
        if not ex.messages or any(set(m) != {"role", "content"} or m["role"] not in ("user", "assistant")
                                  or not m["content"].strip() for m in ex.messages):
            return "messages must be {role: user|assistant, content} turns, none empty"
        if ex.messages[-1]["role"] != "user":
            return "messages must end with the user's turn (the one both answers reply to)"
    return None


def _issue_from_pydantic(err: Any, source: str, lines: dict[tuple, int]) -> Issue:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = field_path(loc[:-1])
        allowed = _allowed_keys(loc[:-1])
        msg = f"unknown key {loc[-1]!r}" + (f" in {parent}" if parent else "") + f" (allowed: {allowed})"
        return Issue(msg, source, _line_for(loc, lines), None)
    if kind == "missing":
        return Issue("required field is missing", source, _line_for(loc, lines), field_path(loc))
    msg = err["msg"]
    if kind == "string_pattern_mismatch":
        msg = "must start with a letter or digit and hold only letters, digits, '_', '-', '.'"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return Issue(msg, source, _line_for(loc, lines), field_path(loc))


def _allowed_keys(parent: tuple) -> str:
    model: type[BaseModel] = Constitution
    if parent[:1] == ("principles",):
        model = Principle
    elif parent[:1] == ("exemplars",):
        model = Exemplar
    elif parent[:1] == ("preference_principles",):
        model = PreferencePrinciple
    elif parent[:1] == ("preference_exemplars",):
        model = PreferenceExemplar
    return ", ".join(model.model_fields)


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    # the deepest enclosing node that exists in the file (a missing field points at its parent)
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def constitution_from_data(data: dict, source: str) -> Constitution:
    """A :class:`Constitution` from plain data that has no lines (an import): problems name the field."""
    empty = _no_principles(data, source, {})
    try:
        c = Constitution.model_validate(data)
    except ValidationError as e:
        issues = [Issue(_issue_from_pydantic(err, source, {}).message, source, None, field_path(tuple(err["loc"])))
                  for err in e.errors()]
        raise ConstitutionError(f"cannot import {source}", empty + issues) from None
    issues = empty + _cross_checks(c, source, {})
    if issues:
        raise ConstitutionError(f"cannot import {source}", issues)
    return c
