"""YAML as people write it and as attackers write it: every key's line kept for error messages, and limits checked
before anything is built.

Used for every YAML file ``cai`` reads (constitutions, training configs). Aliases are refused outright: a few hundred
bytes of nested aliases expand to billions of nodes ("billion laughs"), and none of our files needs them. Documents
over :data:`MAX_YAML_BYTES`, :data:`MAX_YAML_DEPTH` levels of nesting or :data:`MAX_YAML_NODES` values are refused
too, each with the line where the limit was crossed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cai.core.errors import CaiError, ConstitutionError, Issue

MAX_YAML_BYTES = 1 << 20       # a constitution is a few KB; the shipped one is 14 KB
MAX_YAML_DEPTH = 50
MAX_YAML_NODES = 10_000

# libyaml (in PyYAML's wheels) scans a document ~10x faster than the pure-Python parser; limits are checked on its
# events, so a hostile file is refused before anything is built. Malformed YAML is re-read by the pure-Python parser,
# whose messages (and the tab hint below) are the ones users and tests know.
_FAST_LOADER: type | None = getattr(yaml, "CSafeLoader", None) if yaml.__with_libyaml__ else None
_REWORD_NODES = 5_000        # malformed after more values than this: libyaml's own message is kept (see _compose)


class _Refused(Exception):
    """A document over a limit: ``message`` at 1-based ``line`` (or none)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


class _Limits:
    """Counts nodes and nesting as a document is read; raises :class:`_Refused` at the first alias or limit."""

    def __init__(self, what: str):
        self.what = what
        self.depth = 0
        self.nodes = 0
        self.anchors: dict[str, int] = {}

    def alias(self, name: str, line: int) -> _Refused:
        where = f" (&{name} is on line {self.anchors[name]})" if name in self.anchors else ""
        return _Refused(f"YAML aliases are not allowed in a {self.what}: *{name}{where}; write the value out in full",
                        line)

    def node(self, anchor: str | None, line: int, opens: bool) -> None:
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise _Refused(f"too many values: a {self.what} may have at most {MAX_YAML_NODES:,}", line)
        if anchor is not None:
            self.anchors.setdefault(anchor, line)
        if opens:
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(self.too_deep(), line)

    def too_deep(self) -> str:
        return f"nested too deeply: a {self.what} may nest at most {MAX_YAML_DEPTH} levels"


def _scan(loader_class: type, text: str, limits: _Limits) -> None:
    """Walk the parser's events only (nothing is built), enforcing ``limits``; YAML errors propagate."""
    loader = loader_class(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent):
                raise limits.alias(event.anchor, line)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                limits.node(event.anchor, line, opens=True)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                limits.depth -= 1
            elif isinstance(event, yaml.ScalarEvent):
                limits.node(event.anchor, line, opens=False)
    finally:
        loader.dispose()


class _GuardedLoader(yaml.SafeLoader):
    """The pure-Python composer with the same limits, for when libyaml is missing or the document is malformed."""

    def __init__(self, text: str, limits: _Limits):
        super().__init__(text)
        self.limits = limits

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise self.limits.alias(event.anchor, line)
        opens = isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent))
        self.limits.node(getattr(event, "anchor", None), line, opens)
        try:
            return super().compose_node(parent, index)
        finally:
            if opens:
                self.limits.depth -= 1


def _compose(text: str, what: str) -> Any:
    """The node tree of ``text`` within the limits; raises :class:`_Refused` or a ``yaml.YAMLError``."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise _Refused(f"the file is {size:,} bytes; a {what} may be at most 1 MiB ({MAX_YAML_BYTES:,} bytes)")
    if _FAST_LOADER is not None:
        limits = _Limits(what)
        try:
            _scan(_FAST_LOADER, text, limits)
        except yaml.MarkedYAMLError as e:
            if "maximum nesting depth" in (e.problem or ""):      # libyaml's own cap (1,000 levels): above ours
                raise _Refused(limits.too_deep(), e.problem_mark.line + 1 if e.problem_mark else None) from None
            if limits.nodes > _REWORD_NODES:
                raise                # re-reading that much in pure Python would take seconds: libyaml's wording
            # otherwise malformed: the pure-Python parser below words the problem
        except yaml.YAMLError:
            pass
        else:
            return yaml.compose(text, Loader=_FAST_LOADER)
    loader = _GuardedLoader(text, _Limits(what))
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def yaml_with_lines(text: str, source: str, error: type[CaiError] = ConstitutionError,
                    what: str = "constitution") -> tuple[Any, dict[tuple, int]]:
    """Parse YAML into plain Python, recording the 1-based line of every key and item by its path. Problems raise
    ``error`` (``invalid <what> <source>``) with the line of each. Aliases are refused, and so are documents over
    :data:`MAX_YAML_BYTES`, :data:`MAX_YAML_DEPTH` levels or :data:`MAX_YAML_NODES` values: any file gets its
    error quickly (``bench/hostile_yaml.py``) and in a few MB of memory."""
    title = f"invalid {what} {source}"
    try:
        node = _compose(text, what)
    except _Refused as e:
        raise error(title, [Issue(e.message, source, e.line)]) from None
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
                                        key_node.start_mark.line + 1, field_path(path) or None))
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


def refuse_oversized(path: Path, shown: str, what: str, error: type[CaiError] = ConstitutionError) -> None:
    """Refuse a file over :data:`MAX_YAML_BYTES` before reading it into memory."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise error(f"invalid {what} {shown}", [Issue(
            f"the file is {size:,} bytes; a {what} may be at most 1 MiB ({MAX_YAML_BYTES:,} bytes)", shown)])


def field_path(loc: tuple) -> str:
    """``("principles", 2, "id")`` -> ``principles[2].id``: how a field is named in error messages."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
