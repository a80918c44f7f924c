"""Constitutions: the principle files that drive critique and revision.

A constitution is a YAML file (schema in ``constitution/README.md``). Loading validates it strictly and, for every
problem, names the file, the line and the field. A loaded :class:`Constitution` carries a content hash
(``sha256``) and one hash per principle, so a record can say exactly which version of which principle made it.

Two public formats can be imported: Hugging Face's llm-swarm JSON and the CAI paper's
CritiqueRevisionInstructions JSON (see :func:`import_hf` and :func:`import_anthropic`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from cai.core.errors import CaiError, ConstitutionError, Issue, display_path

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


class Constitution(_Strict):
    name: Annotated[str, Field(pattern=ID_PATTERN, max_length=80)]
    version: str
    description: str = ""
    system_prompt: str | None = None
    principles: Annotated[list[Principle], Field(min_length=1)]
    exemplars: list[Exemplar] = Field(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f'must be a string: write version: "{value}" (a bare number like 1.10 reads as 1.1)')
        return value

    @property
    def sha256(self) -> str:
        return _sha256(self.model_dump(mode="json") | {"exemplars": [e.canonical() for e in self.exemplars]})

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
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as e:
        issues = [_issue_from_pydantic(err, source, lines) for err in e.errors()]
        raise ConstitutionError(f"invalid constitution {source}", issues) from None
    issues = _cross_checks(constitution, source, lines)
    if issues:
        raise ConstitutionError(f"invalid constitution {source}", issues)
    return constitution


def _cross_checks(c: Constitution, source: str, lines: dict[tuple, int]) -> list[Issue]:
    issues: list[Issue] = []
    seen: dict[str, int] = {}
    for i, p in enumerate(c.principles):
        loc = ("principles", i, "id")
        if p.id in seen:
            first = lines.get(("principles", seen[p.id], "id"))
            issues.append(Issue(f"duplicate principle id {p.id!r} (first defined on line {first})", source,
                                _line_for(loc, lines), _field(loc)))
        else:
            seen[p.id] = i
    for i, ex in enumerate(c.exemplars):
        if ex.principle is not None and ex.principle not in seen:
            loc = ("exemplars", i, "principle")
            issues.append(Issue(f"names principle {ex.principle!r}, which is not in this constitution "
                                f"(known: {', '.join(seen)})", source, _line_for(loc, lines), _field(loc)))
    return issues


def _issue_from_pydantic(err: dict, source: str, lines: dict[tuple, int]) -> Issue:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _field(loc[:-1])
        allowed = _allowed_keys(loc[:-1])
        msg = f"unknown key {loc[-1]!r}" + (f" in {parent}" if parent else "") + f" (allowed: {allowed})"
        return Issue(msg, source, _line_for(loc, lines), None)
    if kind == "missing":
        return Issue("required field is missing", source, _line_for(loc, lines), _field(loc))
    msg = err["msg"]
    if kind == "string_pattern_mismatch":
        msg = "must start with a letter or digit and hold only letters, digits, '_', '-', '.'"
    elif kind == "too_short" and loc == ("principles",):
        msg = "the principle list is empty: a constitution needs at least one principle"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return Issue(msg, source, _line_for(loc, lines), _field(loc))


def _allowed_keys(parent: tuple) -> str:
    model: type[BaseModel] = Constitution
    if parent[:1] == ("principles",):
        model = Principle
    elif parent[:1] == ("exemplars",):
        model = Exemplar
    return ", ".join(model.model_fields)


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    # the deepest enclosing node that exists in the file (a missing field points at its parent)
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def yaml_with_lines(text: str, source: str, error: type[CaiError] = ConstitutionError,
                    what: str = "constitution") -> tuple[Any, dict[tuple, int]]:
    """Parse YAML into plain Python, recording the 1-based line of every key and item by its path. Problems raise
    ``error`` (``invalid <what> <source>``) with the line of each."""
    title = f"invalid {what} {source}"
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or str(e)
        if "\\t" in problem or "\t" in problem or "tab" in problem:
            problem += " (indent with spaces, not tabs)"
        line = mark.line + 1 if mark else None
        if e.context and e.context_mark and mark is not e.context_mark and e.context_mark.line + 1 != line:
            # e.g. an unclosed quote is only noticed at the end of the file: say where it started
            problem += f" ({e.context} started on line {e.context_mark.line + 1})"
        raise error(title, [Issue(f"malformed YAML: {problem}", source, line)]) from None
    except yaml.YAMLError as e:
        raise error(title, [Issue(f"malformed YAML: {e}", source)]) from None
    if node is None:
        raise error(title, [Issue("the file is empty", source)])
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")
    issues: list[Issue] = []

    def convert(n: yaml.Node, path: tuple) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in n.value:
                key = constructor.construct_object(key_node, deep=True)
                child = path + (key,)
                if key in out:
                    issues.append(Issue(f"duplicate key {key!r} (first on line {lines[child]})", source,
                                        key_node.start_mark.line + 1, _field(path) or None))
                    continue
                lines[child] = key_node.start_mark.line + 1
                out[key] = convert(value_node, child)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [convert(item, path + (i,)) for i, item in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    try:
        data = convert(node, ())
    except yaml.YAMLError as e:
        raise error(title, [Issue(f"malformed YAML: {e}", source)]) from None
    if issues:
        raise error(title, issues)
    return data, lines


# ---------------------------------------------------------------------------------------------------------------
# Import of the public formats


def _read_json(path: Path) -> Any:
    shown = display_path(path)
    if not path.exists():
        raise ConstitutionError(f"file not found: {shown}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConstitutionError(f"{shown} is not valid JSON",
                                [Issue(f"{e.msg} (column {e.colno})", shown, e.lineno)]) from None
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{shown} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _import_name(path: Path, name: str | None) -> str:
    if name:
        return name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "imported"
    return slug if re.match(ID_PATTERN, slug) else f"c-{slug}"


def _validated(data: dict, source: str) -> Constitution:
    try:
        c = Constitution.model_validate(data)
    except ValidationError as e:
        issues = [Issue(_issue_from_pydantic(err, source, {}).message, source, None, _field(tuple(err["loc"])))
                  for err in e.errors()]
        raise ConstitutionError(f"cannot import {source}", issues) from None
    issues = _cross_checks(c, source, {})
    if issues:
        raise ConstitutionError(f"cannot import {source}", issues)
    return c


def import_hf(path: str | Path, name: str | None = None) -> Constitution:
    """Hugging Face llm-swarm format: ``{"constitutions": [{"critic", "revision"}], "system_chat": [[msg...]]}``.

    Each ``system_chat`` conversation is a few-shot example of six turns: user prompt, assistant response, user
    critique request, assistant critique, user revision request, assistant revision. Its critique request is matched
    to a principle by text, so the exemplar keeps naming the principle it illustrates.
    """
    path = Path(path)
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("constitutions"), list):
        raise ConstitutionError(f"cannot import {shown}",
                                [Issue("expected an object with a 'constitutions' list of {critic, revision}", shown)])
    principles = []
    by_text: dict[str, str] = {}
    issues: list[Issue] = []
    for i, item in enumerate(data["constitutions"]):
        if not isinstance(item, dict) or not isinstance(item.get("critic"), str) \
                or not isinstance(item.get("revision"), str):
            issues.append(Issue("each entry needs string fields 'critic' and 'revision'", shown, None,
                                f"constitutions[{i}]"))
            continue
        pid = f"hf-{i + 1:02d}"
        principles.append({"id": pid, "critique": item["critic"], "revision": item["revision"]})
        by_text.setdefault(item["critic"].strip(), pid)
    exemplars = []
    for i, convo in enumerate(data.get("system_chat") or []):
        where = f"system_chat[{i}]"
        if not isinstance(convo, list) or len(convo) != 6 or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in convo):
            issues.append(Issue("expected 6 messages: prompt, response, critique request, critique, "
                                "revision request, revision", shown, None, where))
            continue
        roles = [m.get("role") for m in convo]
        if roles != ["user", "assistant"] * 3:
            issues.append(Issue(f"roles must alternate user/assistant, got {roles}", shown, None, where))
            continue
        texts = [m["content"] for m in convo]
        # the example keeps its own requests, word for word: editing a principle later does not change it
        exemplars.append({"prompt": texts[0], "response": texts[1], "critique": texts[3], "revision": texts[5],
                          "principle": by_text.get(texts[2].strip()), "critique_request": texts[2],
                          "revision_request": texts[4]})
    if issues:
        raise ConstitutionError(f"cannot import {shown}", issues)
    return _validated({"name": _import_name(path, name), "version": "1",
                       "description": f"Imported from {path.name} (Hugging Face llm-swarm format).",
                       "principles": principles, "exemplars": exemplars}, shown)


def import_anthropic(path: str | Path, name: str | None = None) -> Constitution:
    """The CAI paper's CritiqueRevisionInstructions format: ``{"harmful0": {"prompt": [str], "edit_request": str}}``."""
    path = Path(path)
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise ConstitutionError(f"cannot import {shown}",
                                [Issue('expected an object like {"harmful0": {"prompt": [...], "edit_request": ...}}',
                                       shown)])
    principles = []
    issues: list[Issue] = []
    for key, item in data.items():
        prompt = item.get("prompt") if isinstance(item, dict) else None
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt) \
                or not isinstance(item.get("edit_request"), str):
            issues.append(Issue("needs 'prompt' (a list of critique requests) and 'edit_request' (a string)",
                                shown, None, str(key)))
            continue
        pid = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key)).strip("-.") or f"p{len(principles)}"
        # the paper's files hold one critique request per entry; several are kept together, in order
        principles.append({"id": pid, "critique": "\n".join(p.strip() for p in prompt),
                           "revision": item["edit_request"].strip()})
    if issues:
        raise ConstitutionError(f"cannot import {shown}", issues)
    return _validated({"name": _import_name(path, name), "version": "1",
                       "description": f"Imported from {path.name} (CAI paper CritiqueRevisionInstructions format).",
                       "principles": principles}, shown)
