"""The positive control on the default model: does training on a behaviour move the model, and does the evaluation
see it, while a shuffled-label control (trained alike, the behaviour missing) shows nothing?

Runs :func:`cai.workflow.control.run_control`: records on ordinary health questions (``data/prompts/health.jsonl``),
a scripted teacher that ends each answer with a referral to a professional, two arms trained alike with SFT (the
revisions; the control, the initial answers), each compared with the base on the held-out questions by the rule
alone (greedy answers, the paired test). Prints each arm's rates, the paired difference with its 95% interval and
McNemar's p, and whether the control passed (the revised arm detected, the control not); writes ``OUT/control.json``.
Every stage resumes: run it again after a kill.

    .venv/bin/python bench/control.py                         # ~15 min on 2 CPU cores, into /tmp/cai-control
    .venv/bin/python bench/control.py --out runs/control --steps 24 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cai.cli.console import quiet_libraries  # noqa: E402
from cai.cli.ui import TerminalUi  # noqa: E402
from cai.workflow.control import ControlJob, run_control  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    d = ControlJob(out=Path("/tmp/cai-control"))
    ap.add_argument("--out", type=Path, default=d.out, help=f"the control's folder (default {d.out})")
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--train-prompts", type=int, default=d.train_prompts,
                    help=f"health questions trained on; the rest of the 64 are held out (default {d.train_prompts})")
    ap.add_argument("--steps", type=int, default=d.steps, help=f"SFT steps per arm (default {d.steps})")
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--four-bit", action="store_true", help="QLoRA's 4-bit base (slower on a CPU)")
    ap.add_argument("--dtype", default=None, help="the local model's dtype for generation and evaluation")
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args(argv)
    if not 0 < a.train_prompts < 64:
        ap.error(f"--train-prompts must be in 1..63 (the set has 64 questions), got {a.train_prompts}")
    if a.steps < 1:
        ap.error(f"--steps must be at least 1, got {a.steps}")
    job = ControlJob(out=a.out, model=a.model, train_prompts=a.train_prompts, steps=a.steps,
                     learning_rate=a.learning_rate, four_bit=a.four_bit, dtype=a.dtype, seed=a.seed)
    quiet_libraries()
    r = run_control(job, TerminalUi())          # progress bars and each stage's summary, as the commands show
    print(f"\npositive control, principle {r['principle']!r}: violation rate on the held-out health questions "
          f"(the rule judges; greedy)")
    print(f"{'arm':>8} {'n':>4} {'base':>18} {'after SFT':>18} {'difference [95%]':>24} {'McNemar p':>10}  verdict")
    for arm, f in r["arms"].items():
        def rate(x):
            return f"{x['rate']:.0%} [{x['lo']:.0%}-{x['hi']:.0%}]"
        diff = f"{f['difference']:+.0%} [{f['lo']:+.0%}, {f['hi']:+.0%}]"
        print(f"{arm:>8} {f['prompts']:>4} {rate(f['base']):>18} {rate(f['sft']):>18} {diff:>24} "
              f"{f['p_value']:>10.3g}  {f['verdict']}")
    print(f"passed: {r['passed']} (the revised arm's change detected, the shuffled control's not)")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))
    print(f"written: {a.out / 'control.json'}")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
