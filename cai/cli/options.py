"""Each command's options, defined once as dataclass fields, turned into argparse arguments (the TRL
``HfArgumentParser`` pattern, in a few lines of our own).

A field's type gives the argument's type; its metadata gives the rest::

    max_new_tokens: int = option(256, "per stage (default: %(default)s)")
    backend: str = option("local", "...", choices=["local", "fake", "openai"])
    run: Path | None = option(None, "the run folder", positional=True, nargs="?")

``bool`` fields are switches (``--force``); ``list`` fields repeat (``--base-url URL --base-url URL``) unless they
name ``nargs``. The flag is the field name with dashes unless ``flag`` names another; a ``prefix`` puts several
commands' options in one parser without clashes (the demo's ``--eval-max-new-tokens``). :func:`parsed` turns the
parsed namespace back into the dataclass, so a command reads typed fields and never repeats a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_KEYS = {"help", "flag", "short", "choices", "metavar", "positional", "nargs", "const", "required"}


def option(default: Any = None, help: str | None = None, **meta: Any) -> Any:
    """A dataclass field that is also a command-line option; ``meta`` keys: flag, short, choices, metavar,
    positional, nargs, const, required."""
    unknown = set(meta) - _KEYS
    if unknown:
        raise TypeError(f"unknown option metadata: {sorted(unknown)}")
    meta = {"help": help, **meta}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` → (int, False); ``list[str]`` → (str, True)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_options(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", only: tuple[str, ...] | None = None,
                skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add ``cls``'s fields to ``parser``. ``only``/``skip`` choose fields; ``defaults`` overrides some defaults (the
    demo's smaller sizes); ``prefix`` goes before each flag and each destination (dashes and underscores)."""
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip or "help" not in f.metadata:
            continue
        meta = f.metadata
        kind, many = _base_type(hints[f.name])
        default = defaults[f.name] if f.name in defaults else _default(f)
        kw: dict[str, Any] = {"help": meta["help"], "default": default}
        for key in ("choices", "metavar", "nargs", "const", "required"):
            if key in meta:
                kw[key] = meta[key]
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = kind
            if many and "nargs" not in meta:
                kw["action"] = "append"
        dest = prefix.replace("-", "_") + f.name
        if meta.get("positional"):
            parser.add_argument(dest, **kw)
            continue
        flags = [meta["short"]] if "short" in meta else []
        flags.append("--" + prefix + (meta.get("flag") or f.name.replace("_", "-")).removeprefix("--"))
        parser.add_argument(*flags, dest=dest, **kw)


def parsed(cls: type[T], args: argparse.Namespace, *, prefix: str = "", **override: Any) -> T:
    """The dataclass ``cls`` from a parsed namespace: fields the parser did not define keep their defaults."""
    dest = prefix.replace("-", "_")
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in override:
            values[f.name] = override[f.name]
        elif hasattr(args, dest + f.name):
            values[f.name] = getattr(args, dest + f.name)
    return cls(**values)
