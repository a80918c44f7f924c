"""Every benchmark, one after another, then one table of the ratios they printed against their targets.

Each script prints its ratios as lines of the form ``NAME = VALUE  (target >= T)`` (or ``<=``); this runs the scripts
in turn (never two at once: they measure a shared 2-core machine), keeps each one's full output in a log folder, and
collects those lines. A script that fails is reported as failed in the table; the others still run.

    .venv/bin/python bench/all.py            # everything (~35 minutes on the 2-core CPU)
    .venv/bin/python bench/all.py --quick    # smaller sizes (~10 minutes): the same ratios, noisier
    .venv/bin/python bench/all.py --only generate serve
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# script -> (full arguments, --quick arguments)
BENCHES = {
    "generate": ([], ["--prompts", "8", "--batch-size", "8", "--max-new-tokens", "64"]),
    "scale": ([], ["--prompts", "48", "--repeats", "1"]),
    "incremental": ([], ["--limit", "64"]),
    "train": ([], ["--rows", "24", "--steps", "4"]),
    # --quick leaves out the max-autotune arms: each compiles for ~4 minutes at every start
    "serve": ([], ["--requests", "1", "--single", "3", "--arms", "ours", "ours-compiled", "ours-unbatched", "peer",
                   "llama.cpp"]),
    "hostile_yaml": ([], []),
    "label": ([], ["--pairs", "8"]),
    "review": ([], ["--records", "2000", "--repeats", "3", "--decisions", "15"]),
    "gateway": ([], ["--requests", "4", "--repeats", "2", "--seconds", "4"]),
}
RATIO = re.compile(r"^(?P<name>.+?)\s*=\s*(?P<value>[-+0-9.eE]+)\s+\(target\s*(?P<op>>=|<=)\s*(?P<target>[-+0-9.eE]+)")


def parse(output: str) -> list[tuple[str, float, str, float]]:
    """The ``NAME = VALUE  (target OP T)`` lines of a benchmark's output."""
    found = []
    for line in output.splitlines():
        m = RATIO.match(line.strip())
        if m:
            found.append((m["name"].strip(), float(m["value"]), m["op"], float(m["target"])))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes: faster, noisier")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="cai-bench-all-"))
    rows: list[tuple[str, str, str, str, str]] = []
    for name, (full, quick) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *(quick if args.quick else full)]
        print(f"[{name}] {' '.join(cmd[1:])}  (log: {logs / name}.log)", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        (logs / f"{name}.log").write_text(proc.stdout + proc.stderr)
        found = parse(proc.stdout)
        print(f"[{name}] exit {proc.returncode} in {time.perf_counter() - t0:.0f}s, {len(found)} ratios", flush=True)
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append((name, "(failed)", "", "", tail[0][:60]))
            continue
        for what, value, op, target in found:
            met = value >= target if op == ">=" else value <= target
            rows.append((name, what, f"{value:.3g}", f"{op} {target:g}", "met" if met else "NOT met"))
    head = ("bench", "ratio", "value", "target", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    print()
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nfull outputs: {logs}")


if __name__ == "__main__":
    main()
