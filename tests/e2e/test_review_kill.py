"""kill -9 of a real `cai review` server in the middle of a burst of decisions: every decision that got its 200 is in
reviews.jsonl, readable, and the restarted server counts it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
from fixtures.review_fixtures import make_record, write_run

from cai.review.store import ReviewStore

from conftest import REPO, subprocess_env

KEYS = {"alice": "alice-key-00001", "bob": "bob-key-000002", "carol": "carol-key-00003"}
N_RECORDS = 400


def _start(run, keys, port, log):
    return subprocess.Popen([sys.executable, "-m", "cai.cli", "review", str(run), "--api-key-file", str(keys),
                             "--port", str(port)], cwd=REPO, env=subprocess_env(CAI_API_KEYS=""), stdout=log,
                            stderr=subprocess.STDOUT)


def _wait_healthy(url: str, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "cai review exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("cai review did not start")


def test_kill_9_during_a_burst_loses_no_acknowledged_decision(tmp_path):
    from fixtures.browser import free_port

    recs = [make_record(i) for i in range(N_RECORDS)]
    run = write_run(tmp_path / "run", recs)
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{who}: {key}\n" for who, key in KEYS.items()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "review.log", "wb")
    proc = _start(run, keys, port, log)
    acknowledged: list[tuple[str, str]] = []
    lock = threading.Lock()
    try:
        _wait_healthy(url, proc)
        shas = {}
        with httpx.Client(timeout=10) as c:
            rows = c.get(url + "/review/api/run/queue", params={"per_page": 500},
                         headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()["rows"]
            assert len(rows) == N_RECORDS
            for r in rows[:150]:
                shas[r["id"]] = c.get(f"{url}/review/api/run/items/{r['id']}",
                                      headers={"Authorization": f"Bearer {KEYS['alice']}"}).json()["content_sha256"]

        def burst(who: str):
            with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {KEYS[who]}"}) as c:
                for item, sha in shas.items():
                    try:
                        r = c.post(f"{url}/review/api/run/items/{item}/decision",
                                   json={"decision": "accept", "content_sha256": sha})
                    except httpx.HTTPError:
                        return                                    # the server is gone
                    if r.status_code == 200:
                        with lock:
                            acknowledged.append((who, item))

        threads = [threading.Thread(target=burst, args=(who,)) for who in KEYS]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)                          # mid-burst: requests are in flight
        proc.wait(30)
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert 60 <= len(acknowledged) < 3 * len(shas), "the kill must land mid-burst"
    written = {(r.reviewer, r.target) for r in ReviewStore(run / "reviews.jsonl").read()}
    missing = set(acknowledged) - written
    assert not missing, f"{len(missing)} decisions got a 200 and were lost: {sorted(missing)[:5]}"

    port = free_port()                                            # restarted, it counts them all
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "review2.log", "wb") as log2:
        proc = _start(run, keys, port, log2)
        try:
            _wait_healthy(url, proc)
            status = httpx.get(url + "/review/api/run/status", headers={"Authorization": f"Bearer {KEYS['bob']}"},
                               timeout=10).json()
            assert status["progress"]["reviewed"] == len({item for _, item in written})
            r = httpx.post(f"{url}/review/api/run/items/rec00399/decision", timeout=10,
                           headers={"Authorization": f"Bearer {KEYS['bob']}"},
                           json={"decision": "reject", "reason": "after the restart",
                                 "content_sha256": "0" * 64})
            assert r.status_code == 409                                      # and still checks what it is told
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
