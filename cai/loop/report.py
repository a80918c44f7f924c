"""One report across the loop's iterations (``RUN/iterations/report.{json,html}``; ``cai eval RUN --compare
iterations`` prints it): each iteration's model against the base and against the previous iteration (paired), its
refusals, the diversity of its answers, the judge's base rate, the data it trained on, the time each stage took, and
the stop rules that fired. Pure: it reads what the iterations wrote."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, display_path
from cai.core.files import write_bytes_atomic, write_json_atomic
from cai.loop.state import LoopFolder


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def iteration_row(folder: LoopFolder, k: int, final: str, state) -> dict[str, Any] | None:
    train = folder.train(k)
    report = _read(train / "eval" / "report.json")
    lineage = _read(train / "lineage.json") or {}
    card = _read(train / "data" / "card.json") or {}
    if report is None:
        return None
    harm = report["harmlessness"].get(final, {}).get("overall", {})
    base = report["harmlessness"].get("base", {}).get("overall", {})
    helpful = report.get("helpfulness", {}).get(final, {})
    div = report.get("diversity", {}).get("models", {}).get(final, {}).get("red_team", {})
    comparisons = report.get("comparisons", {}).get(final, {})
    vs_prev = report.get("comparisons_to", {}).get("prev", {}).get(final, {})
    return {
        "iteration": k, "model": final,
        "violations": {k2: harm.get(k2) for k2 in ("rate", "lo", "hi", "k", "n")},
        "base_violations": {k2: base.get(k2) for k2 in ("rate", "lo", "hi")},
        "vs_base": comparisons.get("harm"), "vs_previous": vs_prev.get("harm"),
        "refusal": helpful.get("refusal"), "refusal_vs_base": comparisons.get("refusal"),
        "diversity": {m: div.get(m) for m in ("distinct_2", "self_bleu", "compression_ratio")},
        "judge_not_discriminating": report.get("judge", {}).get("not_discriminating", []),
        "data": {"records": lineage.get("records"), "preferences": lineage.get("preferences"),
                 "from_iterations": len(lineage.get("sources", [])), "rows": card.get("counts")},
        "seconds": state.seconds.get(str(k), {}),
        "stops": state.stops.get(str(k), []),
    }


def write_report(folder: LoopFolder) -> dict[str, Any]:
    """Build and write the report across iterations (JSON and HTML); returns it."""
    settings = folder.read_settings()
    if settings is None:
        raise CaiError(f"{display_path(folder.root)} is not a cai iterate folder (no loop.json)",
                       hint=f"Start one with `cai iterate {display_path(folder.root)} --iterations 3`.")
    state = folder.read_state()
    rows = []
    k = 1
    while folder.iteration(k).is_dir():
        row = iteration_row(folder, k, settings.final_stage, state)
        if row is not None:
            rows.append(row)
        k += 1
    stopped = state.stopped_by()
    report = {"loop": str(folder.root), "method": settings.method, "labels": settings.labels,
              "accumulate": settings.accumulate, "iterations": rows, "stopped_at": state.stopped_at,
              "stopped_by": stopped, "summary": summary_lines(rows, state.stopped_at, stopped)}
    folder.iterations.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder.iterations / "report.json", report)
    write_bytes_atomic(folder.iterations / "report.html", render_html(report).encode("utf-8"))
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _cmp(c: dict | None) -> str:
    if not c or c.get("difference") is None:
        return "n/a"
    return (f"{c['verdict']} ({100 * c['difference']:+.1f} pts [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}], "
            f"unclustered McNemar p {c['p_value']:.2g})")


def summary_lines(rows: list[dict], stopped_at: int | None, stopped: list[dict] | None) -> list[str]:
    lines = []
    for r in rows:
        v = r["violations"]
        refusal = r["refusal"] or {}
        lines.append(f"iteration {r['iteration']}: violations {_pct(v['rate'])} [{_pct(v['lo'])}–{_pct(v['hi'])}] "
                     f"(base {_pct(r['base_violations']['rate'])}); vs base {_cmp(r['vs_base'])}; vs previous "
                     f"{_cmp(r['vs_previous'])}; refuses {_pct(refusal.get('rate'))} of ordinary prompts; trained on "
                     f"{r['data']['records']} records from {r['data']['from_iterations']} iteration(s)")
    if stopped_at:
        lines.append(f"stopped after iteration {stopped_at}: " + "; ".join(s["message"] for s in stopped or []))
    elif rows:
        lines.append("no stop rule fired")
    return lines


def render_html(report: dict) -> str:
    e = html.escape
    head = ["iteration", "violations [95%]", "vs base (paired)", "vs previous (paired)", "refusals", "distinct-2",
            "self-BLEU", "compression", "records", "seconds", "stop rules"]
    body = []
    for r in report["iterations"]:
        v, d = r["violations"], r["diversity"]
        cells = [str(r["iteration"]), f"{_pct(v['rate'])} [{_pct(v['lo'])}–{_pct(v['hi'])}]", _cmp(r["vs_base"]),
                 _cmp(r["vs_previous"]), _pct((r["refusal"] or {}).get("rate")),
                 *(("n/a" if d[m] is None else f"{d[m]:.3f}") for m in ("distinct_2", "self_bleu",
                                                                        "compression_ratio")),
                 str(r["data"]["records"]), f"{sum(r['seconds'].values()):.0f}",
                 "; ".join(s["rule"] for s in r["stops"]) or "none"]
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    summary = "".join(f"<li>{e(line)}</li>" for line in report["summary"])
    return (f"<!doctype html><meta charset='utf-8'><title>cai iterate: {e(report['loop'])}</title>"
            "<style>body{font:14px system-ui;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd}</style>"
            f"<h1>cai iterate: {e(report['loop'])}</h1><p>method {e(report['method'])}, labels "
            f"{e(report['labels'])}, data {'accumulated' if report['accumulate'] else 'replaced'}</p>"
            f"<ul>{summary}</ul><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table>")
