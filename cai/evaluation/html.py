"""``eval/report.html``: the evaluation report as one self-contained page (inline SVG plots from matplotlib, no
scripts, no network). Every figure in it comes from ``report.json``; model text is escaped, never markup."""

from __future__ import annotations

import html
import io
from typing import Any

SECTIONS = ("summary", "harmlessness", "over-refusal", "revision-rounds", "diversity", "samples", "lineage")
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff6d5;border-left:4px solid #e0b400;padding:.4em .8em;margin:.5em 0}
.flag{color:#b00;font-weight:600}pre{white-space:pre-wrap;margin:0;font-size:.9em;max-height:14em;overflow:auto}
code{background:#f4f4f4;padding:0 .2em}figure{margin:1em 0}
"""


def render_html(report: dict) -> str:
    models = report["models"]
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>cai eval: "
             f"{_e(report['run'])}</title><style>{CSS}</style></head><body>",
             f"<h1>cai eval — {_e(report['run'])}</h1>",
             f"<p>{_e(report['created_at'])} · cai {_e(report['cai_version'])} · models: "
             f"{_e(', '.join(models))} · judge: {_e(_judges(report['lineage']['judge']))}</p>"]
    parts.append(_section("summary", "Summary", "".join(f"<div class='note'>{_e(n)}</div>" for n in report["notes"])
                          + "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in report["summary"]) + "</ul>"
                          + _prompt_counts(report)))
    parts.append(_section("harmlessness", "Harmlessness: violation rate per principle (held-out red-team prompts)",
                          _harm_table(report) + _figure(_plot_principles(report))))
    parts.append(_section("over-refusal", "Harmlessness vs over-refusal", _refusal_table(report)
                          + _figure(_plot_tradeoff(report))))
    rounds = report.get("revision_rounds")
    parts.append(_section("revision-rounds", "Did revising help? Violation rate per revision round",
                          (_rounds_table(rounds) + _figure(_plot_rounds(rounds))) if rounds else
                          "<p>The run has no records with revision rounds.</p>"))
    parts.append(_section("diversity", "Collapse watch: diversity", _diversity_table(report)
                          + _figure(_plot_diversity(report))))
    parts.append(_section("samples", "Sample answers", _samples(report)))
    parts.append(_section("lineage", "Lineage", _lineage(report)))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>{body}</section>"


def _prompt_counts(report: dict) -> str:
    p = report["prompts"]
    return (f"<p>{p['red_team']} held-out red-team prompts ({p['red_team_from_test_split']} from the run's test split, "
            f"the rest never used by the run), {p['helpful']} ordinary prompts, {p['records']} generated records. "
            f"An answer violates a principle when the judge's P(yes) &gt; {report['settings']['threshold']}.</p>")


def _judges(judge: dict) -> str:
    """Who judged: the model judge, a rules file, or both."""
    parts = [f"{judge['model']} ({judge['backend']})"] if judge.get("model") else []
    if judge.get("rules"):
        parts.append(f"rules {judge['rules']['path']} (sha256 {judge['rules']['sha256'][:12]})")
    return " + ".join(parts) or "none"


def _harm_table(report: dict) -> str:
    models = report["models"]
    harm = report["harmlessness"]
    by = report.get("judge", {}).get("by_question", {})
    head = "<tr><th>principle</th>" + "".join(f"<th>{_e(m)}</th>" for m in models) + "<th>judged by</th></tr>"
    rows = ["<tr><td><b>overall</b></td>" + "".join(f"<td class='num'>{_rate(harm[m]['overall'])}</td>"
                                                     for m in models) + "<td></td></tr>"]
    for pid in report["settings"]["principles"]:
        rows.append(f"<tr><td>{_e(pid)}</td>" + "".join(
            f"<td class='num'>{_rate(harm[m]['per_principle'][pid])}</td>" for m in models)
            + f"<td>{_e(by.get(pid, 'model'))}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _refusal_table(report: dict) -> str:
    models = report["models"]
    hp, harm = report["helpfulness"], report["harmlessness"]
    cols = [("violation rate (red-team)", lambda m: harm[m]["overall"]),
            ("refusal, ordinary prompts (judge)", lambda m: hp[m].get("refusal")),
            ("refusal, ordinary prompts (phrases)", lambda m: hp[m].get("refusal_phrase")),
            ("helpful, ordinary prompts (judge)", lambda m: hp[m].get("helpful")),
            ("refusal, red-team (judge)", lambda m: hp[m]["red_team_refusal"]),
            ("refusal, red-team (phrases)", lambda m: hp[m]["red_team_refusal_phrase"])]
    head = "<tr><th>model</th>" + "".join(f"<th>{_e(c)}</th>" for c, _ in cols) + "</tr>"
    rows = "".join(f"<tr><td>{_e(m)}</td>" + "".join(f"<td class='num'>{_rate(f(m))}</td>" for _, f in cols)
                   + "</tr>" for m in models)
    return (f"<table>{head}{rows}</table><p>Harmlessness bought with evasiveness is a failure: a model should move "
            "down (fewer violations) without moving right (more refusals of ordinary prompts).</p>")


def _rounds_table(rounds: dict) -> str:
    rows = "".join(f"<tr><td>{_e(s['stage'])}</td><td class='num'>{_rate(s)}</td></tr>" for s in rounds["stages"])
    return (f"<p>{rounds['records']} records; each text judged against {_e(rounds['judged_against'])}.</p>"
            f"<table><tr><th>stage</th><th>violation rate</th></tr>{rows}</table>")


def _diversity_table(report: dict) -> str:
    div = report["diversity"]
    rows = []
    for m, parts in div["models"].items():
        for part, d in parts.items():
            flags = div["collapse"].get(m, {}).get(part, [])
            rows.append((f"{m} ({part} prompts)", d, flags))
    rows.append(("data: initial answers", div["data"]["initial"], []))
    rows.append(("data: final revisions", div["data"]["final"], div["data_collapse"]))
    head = ("<tr><th>texts</th><th>n</th><th>distinct-1</th><th>distinct-2</th><th>self-BLEU</th>"
            "<th>words: mean</th><th>p10–p90</th><th>collapse flags</th></tr>")
    body = "".join(
        f"<tr><td>{_e(name)}</td><td class='num'>{d['n']}</td><td class='num'>{_num(d['distinct_1'])}</td>"
        f"<td class='num'>{_num(d['distinct_2'])}</td><td class='num'>{_num(d['self_bleu'])}</td>"
        f"<td class='num'>{_num(d['length']['mean'], 1)}</td>"
        f"<td class='num'>{_num(d['length']['p10'], 0)}–{_num(d['length']['p90'], 0)}</td>"
        f"<td class='flag'>{_e(', '.join(flags))}</td></tr>" for name, d, flags in rows)
    return (f"<table>{head}{body}</table><p>Higher distinct-n and lower self-BLEU mean more varied answers. A "
            "fine-tune is flagged when a measure falls well below its base's (below 0.8×); training on "
            "self-generated data loses the tails first.</p>")


def _samples(report: dict) -> str:
    models = report["models"]
    out = []
    for s in report["samples"]:
        cells = "".join(f"<td><pre>{_e(s['answers'][m])}</pre></td>" for m in models)
        out.append(f"<tr><td><pre>{_e(s['prompt'])}</pre><small>{_e(s.get('category') or '')}</small></td>{cells}</tr>")
    head = "<tr><th>prompt</th>" + "".join(f"<th>{_e(m)}</th>" for m in models) + "</tr>"
    return f"<table>{head}{''.join(out)}</table>"


def _lineage(report: dict) -> str:
    import json

    return f"<pre>{_e(json.dumps(report['lineage'], indent=2, ensure_ascii=False))}</pre>"


def _rate(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    ci = f" [{100 * r['lo']:.0f}–{100 * r['hi']:.0f}]" if r.get("lo") is not None and r.get("hi") is not None else ""
    return f"{100 * r['rate']:.1f}%{ci} <small>(n={r['n']})</small>"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg, inline SVG)


def _figure(svg: str | None) -> str:
    return f"<figure>{svg}</figure>" if svg else ""


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.find("<svg"):]      # drop the XML prolog and doctype: inline in HTML


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(r: dict) -> tuple[float, float]:
    if r.get("rate") is None or r.get("lo") is None:
        return 0.0, 0.0
    return max(0.0, r["rate"] - r["lo"]), max(0.0, r["hi"] - r["rate"])


def _plot_principles(report: dict) -> str:
    plt = _plt()
    models = report["models"]
    pids = report["settings"]["principles"]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(pids) * max(1, len(models)) / 1.5 + 1.5))
    height = 0.8 / len(models)
    for j, m in enumerate(models):
        rs = [report["harmlessness"][m]["per_principle"][p] for p in pids]
        ys = [i + j * height for i in range(len(pids))]
        xs = [r["rate"] or 0.0 for r in rs]
        errs: list = list(zip(*[_err(r) for r in rs])) if rs else [[], []]
        ax.barh(ys, xs, height=height, xerr=errs, color=COLORS[j % len(COLORS)], label=m, capsize=2)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(pids))], pids)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("violation rate (95% interval)")
    ax.legend(loc="lower right")
    return _svg(fig)


def _plot_tradeoff(report: dict) -> str | None:
    plt = _plt()
    points = []
    for j, m in enumerate(report["models"]):
        harm = report["harmlessness"][m]["overall"]
        ref = report["helpfulness"][m].get("refusal") or report["helpfulness"][m]["red_team_refusal"]
        if harm["rate"] is not None and ref["rate"] is not None:
            points.append((j, m, harm, ref))
    if not points:                  # nothing judged on one of the axes (rules that cover neither)
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for j, m, harm, ref in points:
        ex, ey = _err(ref), _err(harm)
        ax.errorbar([ref["rate"]], [harm["rate"]], xerr=[[ex[0]], [ex[1]]], yerr=[[ey[0]], [ey[1]]], fmt="o",
                    color=COLORS[j % len(COLORS)], label=m, capsize=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("refusal rate on ordinary prompts" if report["prompts"]["helpful"] else
                  "refusal rate on red-team prompts")
    ax.set_ylabel("violation rate on red-team prompts")
    ax.set_title("lower is more harmless, left is less evasive", fontsize=9)
    ax.legend()
    return _svg(fig)


def _plot_rounds(rounds: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    stages = rounds["stages"]
    xs = list(range(len(stages)))
    ys = [s["rate"] if s["rate"] is not None else float("nan") for s in stages]
    errs = list(zip(*[_err(s) for s in stages]))
    ax.errorbar(xs, ys, yerr=errs, fmt="-o", capsize=3, color=COLORS[0])
    ax.set_xticks(xs, [s["stage"] for s in stages])
    ax.set_ylim(0, 1)
    ax.set_ylabel("violation rate (95% interval)")
    return _svg(fig)


def _plot_diversity(report: dict) -> str:
    plt = _plt()
    div = report["diversity"]
    series = [(f"{m} ({part})", d) for m, parts in div["models"].items() for part, d in parts.items()]
    series += [("data: initial", div["data"]["initial"]), ("data: final", div["data"]["final"])]
    measures = [("distinct-1", lambda d: d["distinct_1"]), ("distinct-2", lambda d: d["distinct_2"]),
                ("1 − self-BLEU", lambda d: None if d["self_bleu"] is None else 1 - d["self_bleu"])]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(series)
    for j, (name, d) in enumerate(series):
        vals = [f(d) or 0.0 for _, f in measures]
        ax.bar([i + j * width for i in range(len(measures))], vals, width=width, label=name,
               color=COLORS[j % len(COLORS)] if j < len(COLORS) else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(measures))], [m for m, _ in measures])
    ax.set_ylim(0, 1)
    ax.set_ylabel("higher = more diverse")
    ax.legend(fontsize=7, ncol=2)
    return _svg(fig)
