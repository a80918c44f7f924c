"""Model calls of a re-run after one principle is edited, as a fraction of a full run (issue target: <= 0.15).

The shipped 16-principle constitution (two principles weigh 1.5, so they are drawn more often), and the same with
equal weights; every red-team prompt, 2 rounds. A full run fills a run folder; then, for each of the 16 principles in
turn, a copy of that folder is re-run with only that principle's critique request edited,
and the calls it makes are counted. Also printed: what the re-run would cost if a touched record were regenerated
whole (the record-level cache alone), and whether ``--dry-run`` predicted the calls exactly.

Which stages are called depends only on the principle draws and the stage cache, not on the model's words, so the
deterministic fake backend gives the same counts a real model would, in a second:

    .venv/bin/python bench/incremental.py
    .venv/bin/python bench/incremental.py --rounds 4 --limit 100
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.backends.base import Sampling  # noqa: E402
from cai.backends.fake import FakeBackend  # noqa: E402
from cai.core.constitution import load_constitution  # noqa: E402
from cai.core.prompt_files import load_prompts  # noqa: E402
from cai.generate.runner import dry_run, run_generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--constitution", default=str(ROOT / "constitution/default.yaml"))
    ap.add_argument("--prompts", default=str(ROOT / "data/prompts/red_team.jsonl"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    shipped = load_constitution(args.constitution)
    equal = type(shipped).model_validate(shipped.model_dump() | {
        "principles": [p.model_dump() | {"weight": 1.0} for p in shipped.principles]})
    items = load_prompts(args.prompts).items[: args.limit]
    for label, constitution in (("shipped weights", shipped), ("equal weights", equal)):
        measure(label, constitution, items, args.rounds)


def measure(label: str, base, items, rounds: int) -> None:
    sampling = Sampling(max_new_tokens=64)
    kw = dict(items=items, rounds=rounds, sampling=sampling, batch_size=32)
    stages = 1 + 2 * rounds
    weights = sorted({p.weight for p in base.principles})
    with tempfile.TemporaryDirectory() as tmp:
        full_dir = Path(tmp) / "full"
        full = run_generate(constitution=base, backend=FakeBackend(), out=full_dir, **kw)
        print(f"\n{base.name}, {label} ({', '.join(map(str, weights))}): {len(base.principles)} principles, "
              f"{len(items)} prompts, {rounds} rounds: full run {full.calls} calls")
        print(f"{'edited':<22}{'weight':>7}{'records':>8}{'calls':>7}{'fraction':>10}{'whole-record':>14}"
              f"{'dry run':>9}")
        fractions, whole = [], []
        for p in base.principles:
            edited = type(base).model_validate(base.model_dump() | {"principles": [
                q.model_dump() | ({"critique": q.critique + " (edited)"} if q.id == p.id else {})
                for q in base.principles]})
            run_dir = Path(tmp) / p.id
            shutil.copytree(full_dir, run_dir)
            predicted = dry_run(constitution=edited, backend=FakeBackend(), out=run_dir, **kw)
            s = run_generate(constitution=edited, backend=FakeBackend(), out=run_dir, **kw)
            fractions.append(s.calls / full.calls)
            whole.append(s.regenerated * stages / full.calls)
            print(f"{p.id:<22}{p.weight:>7}{s.regenerated:>8}{s.calls:>7}{fractions[-1]:>10.3f}{whole[-1]:>14.3f}"
                  f"{'exact' if predicted.calls == s.calls else f'{predicted.calls}?':>9}")
            shutil.rmtree(run_dir)
    print(f"re-run calls / full-run calls after one principle edit ({label}): mean {statistics.mean(fractions):.3f}, "
          f"max {max(fractions):.3f} (target <= 0.15: mean {'met' if statistics.mean(fractions) <= 0.15 else 'NOT met'}"
          f", max {'met' if max(fractions) <= 0.15 else 'NOT met'})")
    print(f"regenerating touched records whole would cost: mean {statistics.mean(whole):.3f}, max {max(whole):.3f}")
    print(f"re-run / full-run calls, mean ({label}) = {statistics.mean(fractions):.3f}  (target <= 0.15)")

if __name__ == "__main__":
    main()
