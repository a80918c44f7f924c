"""The review page with a large run: time to first paint of the queue, time to open a record, and review throughput
with the keyboard only, in a real browser (headless Chromium through Playwright), against a real `cai review` server.

A run of ``--records`` records (10,000) and one of ``--small`` (100) are made side by side; each is served by its own
`cai review` process; the same browser measures both, so the ratios say how the page scales with the run's size
(the absolute times depend on this shared machine):

- first paint: the queue page opened afresh, ``first-contentful-paint`` from the browser's performance timeline,
  median of ``--repeats``; with a filter and a sort as well (``status=todo``, sorted by category);
- open a record: a row of that filtered queue clicked, the record page's first paint (its neighbours in the
  filtered queue are found on the server);
- throughput: ``--decisions`` records accepted one after another with the ``a`` key alone, each saved (fsynced)
  before the next page loads, as the browser test drives it: decisions per minute.

    .venv/bin/python bench/review.py                     # 10,000 vs 100 records
    .venv/bin/python bench/review.py --records 2000 --decisions 20 --shots /tmp/review-shots
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

KEY = "bench-key-0001"
PRINCIPLES = ("harmless", "honest", "ethical", "not-preachy", "legal")
CATEGORIES = ("weapons", "drugs", "hacking", "self-harm", "misc")


def make_run(root: Path, n: int) -> Path:
    from cai.core.record import Provenance, Record, Round
    from cai.run import RunFolder, RunInfo

    sha = hashlib.sha256(b"bench").hexdigest()
    folder = RunFolder(root)
    folder.write_info(RunInfo(constitution={"name": "bench", "version": "1", "sha256": sha}, model="fake",
                              backend="fake"))
    prov = Provenance(constitution={"name": "bench", "version": "1", "sha256": sha}, model="fake", backend="fake")
    with open(folder.records, "w", encoding="utf-8") as fh:
        for i in range(n):
            words = " ".join(f"word{(i * 7 + k) % 97}" for k in range(120))
            rounds = [Round(principle=PRINCIPLES[(i + r) % 5], principle_sha256=sha, critique=f"Critique {r}: {words}",
                            revision=f"Revision {r} of {i}: {words[::-1]}", flags=["truncated"] if i % 13 == 0 else [])
                      for r in range(2)]
            rec = Record(id=f"r{i:06d}", prompt_id=f"q{i:06d}", category=CATEGORIES[i % 5],
                         messages=[{"role": "user", "content": f"Red-team question {i}: {words[:200]}"}],
                         initial=f"First answer {i}: {words}", rounds=rounds, final=rounds[-1].revision,
                         flags=list(rounds[-1].flags), usage={"prompt_tokens": 100, "completion_tokens": 300},
                         provenance=prov)
            fh.write(json.dumps(rec.to_json()) + "\n")
    return root


class Server:
    def __init__(self, run: Path, keys: Path):
        from fixtures.browser import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "cai.cli", "review", f"run={run}", "--api-key-file",
                                      str(keys), "--port", str(self.port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        import httpx

        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit("cai review did not start")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0          # the run indexed, the socket open

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def fcp(page) -> float:
    """The first contentful paint of the page now loaded, in ms from its navigation start."""
    page.wait_for_selector("body[data-ready='1']")
    return page.evaluate("""() => new Promise(done => {
        const get = () => performance.getEntriesByName('first-contentful-paint')[0];
        const e = get();
        if (e) { done(e.startTime); return; }
        new PerformanceObserver(() => { const x = get(); if (x) done(x.startTime); }).observe({type: 'paint'});
    })""")


def measure(b, server: Server, repeats: int, decisions: int, shots: Path | None, tag: str) -> dict:
    page = b.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/review/run")
    page.fill("#key", KEY)
    with page.expect_navigation():
        page.click("button[type=submit]")
    queue, filtered, opened = [], [], []
    for _ in range(repeats):
        page.goto(server.url + "/review/run")
        queue.append(fcp(page))
        page.goto(server.url + "/review/run?status=todo&sort=category")
        filtered.append(fcp(page))
        with page.expect_navigation():
            page.click(f"#queue tbody tr:nth-child({len(opened) + 1}) td.prompt a")
        opened.append(fcp(page))
    if shots:
        page.goto(server.url + "/review/run?status=todo&sort=category")
        page.wait_for_selector("body[data-ready='1']")
        page.screenshot(path=str(shots / f"queue-{tag}.png"))
        with page.expect_navigation():
            page.click("#queue tbody tr:nth-child(3) td.prompt a")
        page.wait_for_selector("body[data-ready='1']")
        page.screenshot(path=str(shots / f"record-{tag}.png"), full_page=True)
    page.goto(server.url + "/review/run/items/r000001?status=todo")
    page.wait_for_selector("body[data-ready='1']")
    t0 = time.perf_counter()
    for _ in range(decisions):
        with page.expect_navigation():
            page.keyboard.press("a")
        page.wait_for_selector("body[data-ready='1']")
    per_minute = decisions / (time.perf_counter() - t0) * 60
    page.close()
    return {"queue_ms": statistics.median(queue), "filtered_ms": statistics.median(filtered),
            "open_ms": statistics.median(opened), "per_minute": per_minute, "startup_s": server.startup_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decisions", type=int, default=40)
    ap.add_argument("--shots", type=Path, default=None, help="save screenshots of the queue and a record here")
    a = ap.parse_args()
    from fixtures.browser import browser, missing

    if missing():
        raise SystemExit(f"cannot run: {missing()}")
    if a.shots:
        a.shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.txt"
        keys.write_text(f"bench: {KEY}\n")
        t0 = time.perf_counter()
        runs = {n: make_run(Path(tmp) / f"run{n}", n) for n in (a.small, a.records)}
        print(f"made runs of {a.small} and {a.records} records in {time.perf_counter() - t0:.1f}s "
              f"(records.jsonl {runs[a.records].joinpath('records.jsonl').stat().st_size / 1e6:.1f} MB)")
        got = {}
        with browser() as b:
            for n, run in runs.items():
                server = Server(run, keys)
                try:
                    got[n] = measure(b, server, a.repeats, a.decisions, a.shots, f"{n}")
                finally:
                    server.stop()
    print(f"{'records':>8} {'start s':>8} {'queue FCP ms':>13} {'filtered FCP ms':>16} {'open record ms':>15} "
          f"{'decisions/min':>14}")
    for n, g in got.items():
        print(f"{n:>8} {g['startup_s']:>8.2f} {g['queue_ms']:>13.0f} {g['filtered_ms']:>16.0f} {g['open_ms']:>15.0f} "
              f"{g['per_minute']:>14.0f}")
    big, small = got[a.records], got[a.small]
    print(f"queue first paint, {a.records} / {a.small} records = {big['queue_ms'] / small['queue_ms']:.2f}  "
          "(target <= 3)")
    print(f"open a record, {a.records} / {a.small} records = {big['open_ms'] / small['open_ms']:.2f}  (target <= 3)")
    print(f"keyboard decisions per minute, {a.records} records = {big['per_minute']:.0f}  (target >= 60)")
    if a.shots:
        print(f"screenshots: {', '.join(str(p) for p in sorted(a.shots.glob('*.png')))}")


if __name__ == "__main__":
    main()
