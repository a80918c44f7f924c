"""The review tests' app: a `cai review`-style server (no model) over a run of 12 records and 3 pairs whose texts the
tests choose, with keys for alice and bob and one unnamed key."""

from __future__ import annotations

from pathlib import Path

from fixtures.review_fixtures import XSS, make_record, pair_of, write_run

from server.app import create_app
from server.settings import Settings

ALICE, BOB, UNNAMED = "alice-key-0001", "bob-key-000002", "unnamed-key-03"
HOLDERS = {ALICE: "alice", BOB: "bob"}


def auth(key: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def review_run(root: Path) -> tuple[Path, list, list]:
    """Records 0-9: categories misc/weapons alternating, principles harmless or honest, record 3 flagged truncated,
    record 4 flagged echo; records 10 and 11 hold hostile HTML; pairs about records 0, 1 (labelled) and 2
    (unlabelled)."""
    recs = [make_record(i, category="weapons" if i % 2 else "misc",
                        principles=("honest",) if i in (5, 6) else ("harmless",),
                        flags=("truncated",) if i == 3 else ("echo",) if i == 4 else ()) for i in range(10)]
    recs.append(make_record(10, final=XSS[0], initial=XSS[1], critique="<b>bold</b> & <i>more</i>"))
    recs.append(make_record(11, prompt=XSS[1], final="ok"))
    prefs = [pair_of(recs[0], 0.8), pair_of(recs[1], 0.3), pair_of(recs[2], None)]
    return write_run(root, recs, prefs), recs, prefs


def review_app(run: Path, *, keys: bool = True, max_body_bytes: int | None = None):
    from server.settings import Limits

    limits = Limits(max_body_bytes=max_body_bytes) if max_body_bytes else Limits()
    return create_app(Settings(model=None, constitutions=(), api_keys=(ALICE, BOB, UNNAMED) if keys else (),
                               key_holders=HOLDERS if keys else {}, review_runs={"run": str(run)}, limits=limits))


def digest(client, item_id: str, key: str = ALICE) -> str:
    return client.get(f"/review/api/run/items/{item_id}", headers=auth(key)).json()["content_sha256"]


def decide(client, item_id: str, decision: str, key: str | None = ALICE, **body):
    body.setdefault("content_sha256", digest(client, item_id, key or ALICE))
    return client.post(f"/review/api/run/items/{item_id}/decision", json={"decision": decision, **body},
                       headers=auth(key) if key else {})
