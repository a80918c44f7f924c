"""kill -9 in the middle of `cai generate`, then run it again: nothing lost, nothing written twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cai.cli import main

from conftest import REPO, constitution_yaml, prompt_rows, subprocess_env, write_prompts

N_PROMPTS = 40
CONSTITUTION = REPO / "constitution" / "default.yaml"


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _start(args: list[str], cwd: Path, **env) -> subprocess.Popen:
    # output goes to a file, not a pipe: a pipe nobody reads could fill up and stall the run
    log = open(cwd / "generate.log", "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "cai.cli", "generate", *args], cwd=cwd,
                                env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _kill_after(proc: subprocess.Popen, records: Path, at_least: int, timeout: float = 120.0) -> int:
    """SIGKILL the process once records.jsonl has at least ``at_least`` complete lines; returns the count seen."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            n = _complete_lines(records)
            if n >= at_least:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return n
            if proc.poll() is not None:
                log = (records.parent.parent / "generate.log").read_text(errors="replace")
                pytest.fail(f"cai generate exited (rc {proc.returncode}) before it could be killed at {at_least} "
                            f"records; it wrote {n}.\noutput:\n{log[-3000:]}")
            time.sleep(0.01)
        pytest.fail(f"no {at_least} records within {timeout}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_after_kill(records: Path) -> int:
    """Every complete line parses as a record; at most the bytes after the last newline are torn."""
    data = records.read_bytes()
    complete = data.split(b"\n")[:-1]
    for raw in complete:
        obj = json.loads(raw)
        assert obj["id"] and obj["prompt_id"]
    return len(complete)


def _check_complete(records: Path, prompt_ids: list[str]) -> list[dict]:
    data = records.read_bytes()
    assert data.endswith(b"\n")
    recs = [json.loads(x) for x in data.splitlines()]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert Counter(r["prompt_id"] for r in recs) == Counter(prompt_ids), "a prompt is missing or doubled"
    return recs


@pytest.mark.parametrize("kill_at", [2, 10, 25])
def test_kill_fake_backend_then_resume(tmp_path, kill_at, capsys):
    rows = prompt_rows(N_PROMPTS)
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "run"
    args = ["--backend", "fake", "--prompts", str(prompts), "--constitution", str(CONSTITUTION), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "16", "--rounds", "1"]
    proc = _start(args, tmp_path, CAI_FAKE_DELAY=0.05)
    _kill_after(proc, out / "records.jsonl", kill_at)
    before = _check_after_kill(out / "records.jsonl")
    assert kill_at <= before < N_PROMPTS, "the kill must land mid-run"

    rc = main(["generate", *args])       # in-process, no delay
    assert rc == 0, capsys.readouterr().err
    recs = _check_complete(out / "records.jsonl", [r["id"] for r in rows])
    assert all(r["final"] for r in recs)
    # the records finished before the kill were kept, not redone
    assert "reused (already done)" in capsys.readouterr().out
    # and a third run has nothing left to do
    before_bytes = (out / "records.jsonl").read_bytes()
    assert main(["generate", *args]) == 0
    assert (out / "records.jsonl").read_bytes() == before_bytes


def test_kill_with_torn_line_then_resume(tmp_path, capsys):
    """A kill that tore the last line (simulated on top of a real kill): the rerun repairs it and says so."""
    rows = prompt_rows(20)
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "run"
    args = ["--backend", "fake", "--prompts", str(prompts), "--constitution", str(CONSTITUTION), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "16"]
    proc = _start(args, tmp_path, CAI_FAKE_DELAY=0.05)
    _kill_after(proc, out / "records.jsonl", 4)
    path = out / "records.jsonl"
    data = path.read_bytes()
    last = data.split(b"\n")[-2]
    path.write_bytes(data[: len(data) - len(last) - 1] + last[: len(last) // 3])
    assert main(["generate", *args]) == 0
    assert "torn" in capsys.readouterr().out
    _check_complete(path, [r["id"] for r in rows])


def test_kill_local_backend_then_resume(tmp_path, tiny_model_dir, capsys):
    rows = prompt_rows(N_PROMPTS)
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    # a small constitution keeps the tiny model's prompts short (the default one is ~2000 tokens with its tokenizer)
    constitution = tmp_path / "small.yaml"
    constitution.write_text(constitution_yaml(4))
    out = tmp_path / "run"
    args = ["--backend", "local", "--model", str(tiny_model_dir), "--device", "cpu", "--prompts", str(prompts),
            "--constitution", str(constitution), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "8",
            "--rounds", "1", "--temperature", "0"]
    proc = _start(args, tmp_path)
    _kill_after(proc, out / "records.jsonl", 2)
    before = _check_after_kill(out / "records.jsonl")
    assert 2 <= before < len(rows), "the kill must land mid-run"

    rc = main(["generate", *args])
    assert rc == 0, capsys.readouterr().err
    recs = _check_complete(out / "records.jsonl", [r["id"] for r in rows])
    assert {r["provenance"]["backend"] for r in recs} == {"local"}
    assert {r["provenance"]["model"] for r in recs} == {str(Path(tiny_model_dir).resolve())}
