"""``cai review``: people read what the model wrote, with the critique and principle beside it, and decide what
trains (``RUN/reviews.jsonl``; ``cai data build`` applies it).

::

    cai review RUN [RUN ...]                                 the review page, no model loaded (cai serve --review
                                                             serves it beside the model)
    cai review status RUN [--review-rule R] [--json]         how far review got: reviewed, conflicts, agreement
    cai review export RUN --format label-studio -o FILE      tasks for Label Studio (and its labelling configs)
    cai review import RUN FILE                               Label Studio's annotations, as reviews

The first word is an action when it is one of those three, else a run folder (``./status`` for a folder of that
name). The server is imported only to serve: the library never imports it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed

HELP = "review what the model wrote (a web page) and decide what trains; status, export, import"
ACTIONS = ("status", "export", "import")
USAGE = """cai review RUN [RUN ...] [--port N] [--api-key-file FILE]     serve the review page (no model loaded)
       cai review status RUN [--review-rule R] [--json]
       cai review export RUN --format label-studio -o FILE
       cai review import RUN FILE"""


@dataclass
class ReviewArgs:
    words: list[str] = option([], "a run folder (or several) to serve, or an action (status, export, import) and "
                                  "its run folder (and, for import, the annotations file)", positional=True,
                              nargs="+", metavar="ACTION|RUN")
    api_key_file: Path | None = option(None, "serve: API keys, one a line; `NAME: KEY` names the key's holder, who "
                                             "is the reviewer (# comments allowed)")
    api_key_env: str = option("CAI_API_KEYS", "serve: environment variable with comma-separated keys (default: "
                                              "%(default)s); with no key anywhere the page asks for a name")
    host: str = option("127.0.0.1", "serve: address to bind (default: %(default)s)")
    port: int = option(8000, "serve: default: %(default)s")
    review_rule: str = option("any-reject", "how reviewers who disagree resolve, for the page and status "
                                            "(default: %(default)s)", choices=["any-reject", "latest", "unanimous"])
    format: str = option("label-studio", "export: the format (default: %(default)s)", choices=["label-studio"])
    out: Path | None = option(None, "export: the tasks file to write", short="-o")
    json: bool = option(False, "status: print the figures as JSON")


def add(sub) -> None:
    p = sub.add_parser("review", help=HELP, usage=USAGE, description=__doc__.split("::")[0].strip())
    add_options(p, ReviewArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai.core.errors import CaiError

    a = parsed(ReviewArgs, ns)
    action, rest = (a.words[0], a.words[1:]) if a.words[0] in ACTIONS else ("serve", a.words)
    want = {"status": 1, "export": 1, "import": 2}.get(action)
    if want is not None and len(rest) != want:
        raise CaiError(f"cai review {action} takes {'RUN FILE' if want == 2 else 'one RUN'}, got "
                       f"{' '.join(rest) or 'nothing'}", hint="Usage:\n       " + USAGE)
    if not rest:
        raise CaiError("name a run folder to review", hint="Usage:\n       " + USAGE)
    if action == "export" and a.out is None:
        raise CaiError("cai review export needs -o FILE (the tasks file to write)")
    return {"serve": serve, "status": status, "export": export, "import": import_}[action](a, rest)


def _open(path: str):
    from cai.core.errors import CaiError
    from cai.run import RunFolder

    folder = RunFolder.open(path)
    if not folder.records.exists() and not folder.preferences.exists():
        raise CaiError(f"{folder.shown()} has nothing to review yet (no records.jsonl, no preferences.jsonl)",
                       hint=f"Generate records first: `cai generate --out {folder.shown()} ...`.")
    return folder


def _items(folder):
    from cai.core.preference import read_preferences
    from cai.core.record import read_records

    records = read_records(folder.records) if folder.records.exists() else []
    prefs = read_preferences(folder.preferences) if folder.preferences.exists() else []
    return records, prefs


def serve(a: ReviewArgs, runs: list[str]) -> int:
    from cai.cli.console import console
    from cai.cli.serve import LOCAL_HOSTS
    from cai.core.errors import CaiError
    from server.runner import serve as run_server
    from server.security import read_api_keys
    from server.settings import Settings, review_map

    if not 0 < a.port < 65536:
        raise CaiError(f"--port must be in 1..65535, got {a.port}")
    mapped = review_map(runs)
    for path in mapped.values():
        _open(path)
    keys = read_api_keys(a.api_key_file, a.api_key_env)
    err = console(stderr=True)
    if not keys and a.host not in LOCAL_HOSTS:
        err.print(f"[yellow]warning[/]: serving the review page on {a.host} with no API key: anyone who can reach "
                  "it can decide what trains")
    where = f"http://{a.host}:{a.port}/review"
    err.print(f"review page: {where} ({', '.join(mapped)}; "
              + ("API keys required" if keys else "no API key: reviewers give their name") + ")",
              soft_wrap=True, markup=False)
    settings = Settings(model=None, constitutions=(), api_keys=tuple(keys),
                        key_holders={k: v for k, v in keys.items() if v}, review_runs=mapped,
                        review_rule=a.review_rule)
    return run_server(settings, host=a.host, port=a.port, log_level="warning")


def status(a: ReviewArgs, rest: list[str]) -> int:
    from cai.cli.console import console
    from cai.review.apply import load_reviews
    from cai.review.decisions import summarize

    folder = _open(rest[0])
    records, prefs = _items(folder)
    state = load_reviews(folder, records, prefs, rule=a.review_rule)
    kinds = {"records": summarize(state.records), "pairs": summarize(state.preferences)}
    items = sum(s.items for s in kinds.values())
    reviewed = sum(s.reviewed for s in kinds.values())
    figures = {"run": folder.shown(), "rule": a.review_rule, "items": items, "reviewed": reviewed,
               "reviews": len(state.reviews),
               **{k: {"items": s.items, "reviewed": s.reviewed, "stale": s.stale, "by_status": s.by_status,
                      "disagreements": s.disagreements, "agreement": s.agreement, "reviewers": s.reviewers}
                  for k, s in kinds.items()}}
    out = console()
    if a.json:
        out.print_json(json.dumps(figures))
        return 0
    parts = [f"{k} {s.reviewed} of {s.items}" for k, s in kinds.items() if s.items]
    out.print(f"{folder.shown()}: {reviewed} of {items} reviewed ({', '.join(parts)})", markup=False,
              soft_wrap=True)
    for k, s in kinds.items():
        if not s.items:
            continue
        shown = ", ".join(f"{'needs review again' if st == 'stale' else st} {n}" for st, n in s.by_status.items())
        out.print(f"  {k}: {shown}", markup=False, soft_wrap=True)
        if s.disagreements:
            out.print(f"  {k}: reviewers disagree on {len(s.disagreements)} ({', '.join(s.disagreements[:10])}"
                      f"{' ...' if len(s.disagreements) > 10 else ''}); rule {a.review_rule}", markup=False,
                      soft_wrap=True)
        for who, ag in s.agreement.items():
            out.print(f"  {k}: agreement {who}: {ag['agree']:.0%} of {ag['items']} both reviewed", markup=False)
    return 0


def export(a: ReviewArgs, rest: list[str]) -> int:
    from cai.cli.console import console
    from cai.core.errors import display_path
    from cai.review.labelstudio import export_tasks

    folder = _open(rest[0])
    records, prefs = _items(folder)
    assert a.out is not None
    info = export_tasks(records, prefs, a.out)
    console().print(f"wrote {info['records']} record tasks and {info['preferences']} pair tasks to "
                    f"{display_path(a.out)}; labelling configs: "
                    + ", ".join(f"{k} {display_path(p)}" for k, p in info["configs"].items()), markup=False,
                    soft_wrap=True)
    return 0


def import_(a: ReviewArgs, rest: list[str]) -> int:
    from cai.cli.console import console
    from cai.review.labelstudio import import_annotations
    from cai.review.store import ReviewStore

    folder = _open(rest[0])
    records, prefs = _items(folder)
    known = {r.id for r in records} | {p.id for p in prefs}
    got = import_annotations(Path(rest[1]), ReviewStore(folder.reviews), known)
    skipped = ", ".join(f"{why} {n}" for why, n in sorted(got.skipped.items()))
    console().print(f"imported {len(got.reviews)} reviews into {folder.shown(folder.reviews)}"
                    + (f"; skipped: {skipped}" if skipped else ""), markup=False, soft_wrap=True)
    return 0
