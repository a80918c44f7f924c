"""An iteration's training view: the records, preferences and reviews of the iterations it learns from, in one run
folder (``iterations/<k>/train/``) that ``cai data build`` and ``cai train`` read like any other.

Data accumulate across iterations by default (Gerstgrasser et al. 2024: replacing the data each round makes error grow
with every round, accumulating bounds it); ``--replace`` keeps the current iteration's alone. ``lineage.json`` says
which data came from which iteration (counts and sha256 of each source file). The helpfulness answers (the base
model's answers to the human-written helpful prompts, the same every iteration) are carried from the previous
iteration's folder, so they are generated once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cai.core.files import read_jsonl, write_bytes_atomic, write_json_atomic
from cai.core.hashing import file_sha256
from cai.run import RunFolder


def _lines(path: Path) -> list[dict]:
    return [obj for _, obj in read_jsonl(path)]


def _write(path: Path, rows: list[dict]) -> None:
    write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def assemble(train: Path, sources: list[Path], previous: Path | None, *, preferences: bool) -> dict:
    """Write ``train``'s run.json, records.jsonl (and preferences.jsonl, reviews.jsonl) from ``sources`` (run
    folders, oldest first); returns the lineage written to ``train/lineage.json``."""
    out = RunFolder(train)
    train.mkdir(parents=True, exist_ok=True)
    newest = RunFolder(sources[-1])
    shutil.copyfile(newest.run_file, out.run_file)
    records: dict[str, dict] = {}
    prefs: dict[str, dict] = {}
    reviews: list[dict] = []
    lineage = []
    for src in sources:
        run = RunFolder(src)
        recs = _lines(run.records)
        records.update((r["id"], r) for r in recs)
        entry = {"folder": out.rel(src), "records": len(recs),
                 "records_sha256": file_sha256(run.records) if run.records.exists() else None}
        if preferences:
            ps = _lines(run.preferences)
            prefs.update((p["id"], p) for p in ps)
            entry.update(preferences=len(ps),
                         preferences_sha256=file_sha256(run.preferences) if run.preferences.exists() else None)
        rv = _lines(run.reviews)
        reviews += rv
        entry["reviews"] = len(rv)
        lineage.append(entry)
    _write(out.records, list(records.values()))
    if preferences:
        _write(out.preferences, list(prefs.values()))
    if reviews:
        _write(out.reviews, reviews)
    if previous is not None and (previous / "helpful").is_dir() and not out.helpful_dir.exists():
        shutil.copytree(previous / "helpful", out.helpful_dir)
    info = {"sources": lineage, "records": len(records), "preferences": len(prefs) if preferences else None,
            "reviews": len(reviews)}
    write_json_atomic(train / "lineage.json", info)
    return info
