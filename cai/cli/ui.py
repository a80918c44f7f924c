"""What the workflow's steps show in the terminal: status lines and progress bars on stderr, each step's table or
summary on stdout."""

from __future__ import annotations

from pathlib import Path

from cai.cli.console import console, escape, table
from cai.cli.progress import Bar
from cai.core.errors import display_path
from cai.workflow import Ui


class TerminalUi(Ui):
    def __init__(self):
        self.err = console(stderr=True)

    def status(self, text: str):
        return self.err.status(escape(text))

    def note(self, text: str, label: str | None = None) -> None:
        self.err.print((f"[yellow]{label}[/]" + (": " if label == "note" else " ") if label else "") + escape(text),
                       soft_wrap=label == "note")

    def bar(self):
        return Bar(self.err)

    def generated(self, summary, bad_rows: list) -> None:
        print_summary(summary, bad_rows)

    def dry_run(self, report, backend: str) -> None:
        print_dry_run(report, backend)

    def built(self, card) -> None:
        print_card(card)

    def trained(self, stage: str, out: Path, manifest: dict) -> None:
        print_trained(stage, out, manifest)

    def labelled(self, run: Path, result) -> None:
        print_label_card(run, result.card)

    def checked(self, run: Path, report: dict) -> None:
        print_check(run, report)

    def iterated(self, run: Path, report: dict) -> None:
        print_iterations(run, report)

    def evaluated(self, run: Path, report: dict, seconds: float) -> None:
        out = display_path(run / "eval")
        con = console()
        con.print(f"[bold]cai eval → {escape(out)}[/] ({seconds:.0f}s)")
        for line in report["summary"]:
            con.print(line, markup=False, highlight=False, soft_wrap=True)
        con.print(f"report: {out}/report.html (figures: {out}/report.json)", markup=False)


def print_dry_run(r, backend: str) -> None:
    t = table(f"cai generate --dry-run → {r.out} (nothing called, nothing written)")
    t.add_row("prompts", f"{r.planned}: {r.reused} reused as they are, {r.regenerate} to regenerate, {r.new} new"
              + (f", {r.too_long} too long" if r.too_long else ""))
    t.add_row("model calls", f"{r.calls:,}" + (f" ({r.cached_calls:,} more stages come from the stage cache)"
                                                if r.cached_calls else ""))
    how = "estimated at 4 characters a token" if backend == "openai" else "counted with the model's tokenizer"
    t.add_row("prompt tokens", f"~{r.prompt_tokens:,} ({how}; outputs not generated yet taken as "
                               f"{r.assumed_tokens} tokens)")
    t.add_row("generated tokens", f"~{r.completion_tokens:,} (at most {r.max_completion_tokens:,}: "
                                  "--max-new-tokens per call)")
    console().print(t)


def print_summary(s, bad_rows) -> None:
    t = table(f"cai generate → {s.out}")
    t.add_row("records written", f"{s.written} ({s.new} new, {s.regenerated} regenerated)")
    flags = ", ".join(f"{k} {v}" for k, v in sorted(s.flag_counts.items()))
    t.add_row("flagged", f"{s.flagged}" + (f" ({flags})" if flags else ""))
    t.add_row("reused (already done)", str(s.skipped))
    t.add_row("model calls", f"{s.calls:,}" + (f" (+{s.cached_calls:,} stages from the stage cache)"
                                               if s.cached_calls else ""))
    if s.superseded:
        t.add_row("superseded (moved to superseded.jsonl)", str(s.superseded))
    if s.too_long:
        t.add_row("left out: too long (errors.jsonl)", str(s.too_long))
    if s.failed:
        t.add_row("failed requests (errors.jsonl; retried next run)", str(s.failed))
    if bad_rows:
        t.add_row("bad prompt rows skipped", str(len(bad_rows)))
    if s.torn_bytes:
        t.add_row("repaired", f"cut a torn last line ({s.torn_bytes} bytes) left by an interrupted run")
    t.add_row("tokens", f"{s.completion_tokens:,} generated, {s.prompt_tokens:,} prompt")
    t.add_row("time", f"{s.seconds:.1f}s ({s.tokens_per_second:,.1f} generated tok/s)")
    console().print(t)


def print_card(card) -> None:
    t = table(f"cai data build → {display_path(Path(card.run) / 'data')}")
    t.add_row("records", str(card.records))
    for name, n in card.counts.items():
        t.add_row(name, f"{n} rows")
    if card.helpful:
        h = card.helpful
        t.add_row("helpfulness mix", f"{h['used']} rows, ratio {h['ratio']} (asked {h['requested_ratio']}; "
                                     f"{h['excluded_flagged']} flagged answers left out)")
    if card.preferences:
        p = card.preferences
        cut = f", cut {p['min_confidence']}: {p['below_cut']} below" if p["below_cut"] else ""
        t.add_row("AI-feedback labels", f"{p['used']} of {p['pairs']} pairs, {p['mode']} ({p['unlabelled']} "
                                        f"unlabelled{cut}); mean confidence {p['confidence']['kept_mean']}")
    if card.review:
        r = card.review
        for kind in ("records", "preferences"):
            if kind in r:
                k = r[kind]
                t.add_row(f"reviewed {kind}", f"{k['reviewed']} of {k['items']} ({k['rejected']} rejected, "
                          + (f"{k['edited']} edited" if kind == "records" else f"{k['flipped']} flipped")
                          + f", {k['conflicts']} in conflict, {k['stale']} need review again; rule {r['rule']})")
        t.add_row("rows from reviewed items", ", ".join(f"{kind} {c['reviewed']} of {c['rows']}"
                                                        for kind, c in r["rows"].items())
                  + (" (only reviewed items: --require-review)" if r["require_review"] else ""))
    if card.excluded:
        t.add_row("left out", ", ".join(f"{k} {v}" for k, v in sorted(card.excluded.items())))
    dups = sum(card.duplicates.values())
    if dups:
        t.add_row("duplicates dropped", str(dups))
    t.add_row("prompts held out", f"{card.prompts.get('test', 0)} of {card.prompts.get('total', 0)}")
    t.add_row("dataset sha256", card.sha256)
    console().print(t)


def print_trained(stage: str, folder: Path, manifest: dict) -> None:
    out = display_path(folder)
    if manifest.get("already_done"):
        console().print(f"{out} is already trained ({manifest['steps']} steps); --overwrite trains it again")
        return
    m = manifest["metrics"]
    t = table(f"cai train {stage} → {out}")
    t.add_row("base model", f"{manifest['base_model']['id']} "
                            f"({'4-bit NF4 + LoRA' if manifest['quantization']['load_in_4bit'] else 'LoRA'})")
    t.add_row("steps", f"{manifest['steps']}" + (f" (resumed from step {manifest['resumed_from_step']})"
                                                 if manifest["resumed_from_step"] else ""))
    if "train_loss" in m:
        t.add_row("train loss (mean)", f"{m['train_loss']:.4f}")
    if "eval_loss" in m:
        t.add_row("eval loss", f"{m['eval_loss']:.4f}")
    t.add_row("time", f"{manifest['seconds_this_run']:.1f}s")
    t.add_row("manifest", f"{out}/manifest.json, loss curve {out}/loss.png")
    console().print(t)


def _rate(r: dict) -> str:
    if r.get("rate") is None:
        return f"n/a (n = {r['n']})"
    return f"{r['rate']:.0%} [{r['lo']:.0%}–{r['hi']:.0%}] ({r['k']}/{r['n']})"


def _bias(b: dict) -> str:
    ci = b.get("mean_p_first_ci")
    mean = "n/a" if b["mean_p_first"] is None else f"{b['mean_p_first']:.2f}"
    return (f"P(first option) {mean}" + (f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci else "")
            + f"; same position in both orders {_rate(b['same_position'])}")


def print_label_card(run: Path, card: dict) -> None:
    t = table(f"cai label → {display_path(run / 'preferences.jsonl')}")
    who = card["feedback"]
    t.add_row("pairs", f"{card['pairs']} ({card['labelled']} labelled, {card['unlabelled']} unlabelled: their "
                       "log-probabilities held neither option)" if card["unlabelled"] else f"{card['pairs']} labelled")
    skipped = card["skipped"]
    if skipped["identical"] or skipped["empty_or_failed"]:
        t.add_row("skipped", f"{skipped['identical']} with two identical answers, {skipped['empty_or_failed']} with "
                             "an empty or failed answer")
    t.add_row("policy", str(card.get("policy")))
    t.add_row("feedback model", f"{who.get('model')} ({who.get('backend')})")
    q = card["questions"]
    t.add_row("questions", f"{q['asked']} asked, {q['reused']} from the cache")
    labels = card["labels"]
    if labels["mean_confidence"] is not None:
        t.add_row("mean confidence", f"{labels['mean_confidence']:.2f}")
    t.add_row("position bias", _bias(card["position_bias"]))
    if "agrees_with_revision" in card:
        t.add_row("prefers the revision", _rate(card["agrees_with_revision"]))
    t.add_row("card", f"{display_path(run / 'label' / 'card.json')}")
    console().print(t)


def print_check(run: Path, r: dict) -> None:
    t = table(f"cai label --check: {r['feedback'].get('model')} on {r['check_set']['items']} comparisons with a "
              "known answer")
    t.add_row("accuracy (orders averaged)", _rate(r["accuracy"]))
    t.add_row("accuracy, one order", _rate(r["accuracy_one_order"]))
    t.add_row("  better answer first / second", f"{_rate(r['accuracy_better_first'])} / "
                                                 f"{_rate(r['accuracy_better_second'])}")
    for kind, rr in r["by_kind"].items():
        t.add_row(f"  {kind}", _rate(rr))
    e = r["ece"]
    if e["value"] is not None:
        t.add_row("calibration error (ECE)", f"{e['value']:.3f} [{e['lo']:.3f}–{e['hi']:.3f}]")
    t.add_row("position bias", _bias(r["position_bias"]))
    t.add_row("report", display_path(run / "label" / "check.json"))
    console().print(t)


def print_iterations(run: Path, report: dict) -> None:
    con = console()
    con.print(f"[bold]cai iterate → {escape(display_path(run / 'iterations'))}[/]")
    for line in report["summary"]:
        con.print(line, markup=False, highlight=False, soft_wrap=True)
    con.print(f"report: {display_path(run / 'iterations' / 'report.html')}", markup=False)
