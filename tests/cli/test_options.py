"""Options defined once as dataclass fields, turned into argparse (cai.cli.options), and each command's use of it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from cai.cli import build_parser
from cai.cli.options import add_options, option, parsed


@dataclass
class Example:
    run: Path = option(None, "the folder", positional=True)
    count: int = option(3, "how many (default: %(default)s)")
    limit: int | None = option(None, "at most")
    rate: float = option(0.5, "a rate")
    force: bool = option(False, "overwrite")
    url: list[str] = option([], "repeatable", flag="--base-url", metavar="URL")
    ids: list[str] = option([], "several at once", nargs="+")
    kind: str = option("a", "one of a, b", choices=["a", "b"])
    output: Path | None = option(None, "where", short="-o")
    internal: int = 7                       # no help: not an option


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_options(p, Example, **kw)
    return p


def test_types_defaults_and_actions_come_from_the_fields():
    ns = _parser().parse_args(["some/run"])
    e = parsed(Example, ns)
    assert e == Example(run=Path("some/run"))
    ns = _parser().parse_args(["r", "--count", "5", "--limit", "2", "--rate", "0.25", "--force", "--base-url", "u1",
                               "--base-url", "u2", "--ids", "x", "y", "--kind", "b", "-o", "out"])
    e = parsed(Example, ns)
    assert (e.count, e.limit, e.rate, e.force, e.url, e.ids, e.kind, e.output) == (
        5, 2, 0.25, True, ["u1", "u2"], ["x", "y"], "b", Path("out"))
    assert e.internal == 7 and not hasattr(ns, "internal")


def test_bad_values_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["r", "--count", "many"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["r", "--kind", "c"])
    assert "invalid choice" in capsys.readouterr().err


def test_list_defaults_are_not_shared_between_parses():
    a = parsed(Example, _parser().parse_args(["r", "--base-url", "u"]))
    b = parsed(Example, _parser().parse_args(["r"]))
    assert a.url == ["u"] and b.url == [] and Example().url == []


def test_help_shows_the_default():
    assert "how many (default: 3)" in " ".join(_parser().format_help().split())


def test_prefix_only_and_defaults_for_a_second_command_in_one_parser():
    p = argparse.ArgumentParser()
    add_options(p, Example, prefix="ex-", only=("count", "force"), defaults={"count": 9})
    ns = p.parse_args(["--ex-force"])
    assert (ns.ex_count, ns.ex_force) == (9, True)
    e = parsed(Example, ns, prefix="ex-", rate=0.1)
    assert (e.count, e.force, e.rate, e.limit) == (9, True, 0.1, None)   # the rest: the dataclass's defaults


def test_unknown_metadata_is_refused():
    with pytest.raises(TypeError):
        option(1, "x", colour="red")


def test_every_command_option_has_help_and_is_defined_once():
    """Each command module's options come from one dataclass; their flags are the ones the README names."""
    from cai.cli import data, demo, evaluate, generate, merge, serve, train, validate

    for cls in (generate.GenerateArgs, data.DataBuildArgs, evaluate.EvalArgs, train.TrainArgs, merge.MergeArgs,
                serve.ServeArgs, validate.ValidateArgs, demo.DemoArgs):
        for f in dataclasses.fields(cls):
            assert "help" in f.metadata, (cls.__name__, f.name)
    demo_help = " ".join(_sub(build_parser(), "demo").format_help().split())
    for flag in ("--eval-red-team", "--eval-helpful", "--eval-records", "--eval-max-new-tokens", "--train-steps",
                 "--limit", "--max-new-tokens"):
        assert flag in demo_help
    assert "--dry-run" not in demo_help


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_demo_defaults_are_smaller_than_the_commands():
    parser = build_parser()
    demo = parser.parse_args(["demo"])
    gen = parser.parse_args(["generate"])
    ev = parser.parse_args(["eval", "runs/x"])
    assert (demo.limit, demo.batch_size, demo.max_new_tokens, demo.train_steps) == (16, 16, 128, 8)
    assert (gen.limit, gen.batch_size, gen.max_new_tokens) == (None, None, 256)
    assert (demo.eval_red_team, demo.eval_helpful, demo.eval_records, demo.eval_max_new_tokens) == (16, 16, 16, 96)
    assert (ev.red_team, ev.helpful, ev.records, ev.max_new_tokens) == (64, 64, 64, 128)


def test_eval_options_defaults_are_the_parsers():
    """`cai eval`'s library options come from the parsed fields; the demo's evaluation takes the same defaults for
    what it does not set (no second copy of them)."""
    from cai.cli.evaluate import EvalArgs
    from cai.resources import HELPFUL, prompts_path

    ev = parsed(EvalArgs, build_parser().parse_args(["eval", "runs/x", "--adapter", "sft", "--principles", "a", "b"]))
    opts = ev.options()
    assert opts.adapters == ("sft",) and opts.principles == ("a", "b")
    assert (opts.temperature, opts.top_p, opts.batch_size, opts.seed) == (0.7, 0.95, 16, 0)
    assert opts.helpful_prompts == HELPFUL and Path(prompts_path(opts.helpful_prompts)).is_file()
    demo = parsed(EvalArgs, build_parser().parse_args(["demo", "--seed", "3"]), prefix="eval-", seed=3).options()
    assert (demo.red_team, demo.max_new_tokens, demo.seed, demo.batch_size, demo.temperature) == (16, 96, 3, 16, 0.7)
