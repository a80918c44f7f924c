"""A disk that fills up during `cai generate`: one clear message (what was kept, how to go on), exit 1, no
traceback; the records written before stay intact and the same command, run again, finishes the job."""

from __future__ import annotations

import errno
import json
import os

import pytest

from cai.cli import main

from conftest import prompt_rows


def _fill_disk_after(monkeypatch, writes: int, code: int = errno.ENOSPC) -> list[int]:
    """``os.write`` (what the run folder's JSONL appends use) fails with ``code`` after ``writes`` calls."""
    real = os.write
    calls = [0]

    def write(fd, data):
        calls[0] += 1
        if calls[0] > writes:
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return calls


def _records(path) -> list[dict]:
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data.split(b"\n")[:-1]]   # complete lines only


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_generate_on_a_full_disk_says_what_was_kept_then_resumes(cli_env, tmp_path, capsys, prompt_file,
                                                                 monkeypatch, code):
    rows = prompt_rows(12)
    prompts = str(prompt_file(rows))
    out = tmp_path / "run"
    args = ["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "16"]
    with monkeypatch.context() as m:
        calls = _fill_disk_after(m, 6, code)
        rc = main(args)
    captured = capsys.readouterr()
    assert calls[0] > 6, "the disk never filled up: the test did not exercise anything"
    assert rc == 1, captured.err
    err = " ".join(captured.err.split())
    assert "Traceback" not in captured.err and "Errno" not in captured.err
    assert "the disk is full" in err
    assert "finished batches are saved in" in err and "Free some space" in err
    assert "run the same command again to continue" in err
    kept = _records(out / "records.jsonl")
    assert 0 < len(kept) < len(rows)
    assert all(r["final"] and r["prompt_id"] for r in kept)

    assert main(args) == 0
    done = _records(out / "records.jsonl")
    assert sorted(r["prompt_id"] for r in done) == sorted(r["id"] for r in rows)
    assert len({r["id"] for r in done}) == len(done)
    assert done[: len(kept)] == kept                    # the records written before are untouched and not redone
    assert "reused (already done)" in capsys.readouterr().out


def test_another_os_error_is_not_called_a_full_disk(cli_env, tmp_path, prompt_file, monkeypatch):
    prompts = str(prompt_file(prompt_rows(4)))
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as e:
        main(["generate", "--backend", "fake", "--prompts", prompts, "--out", str(tmp_path / "run")])
    assert e.value.errno == errno.EIO


def test_data_build_on_a_full_disk_is_a_clear_message(cli_env, tmp_path, capsys, prompt_file, monkeypatch):
    """Files replaced whole (the data files, the card): the old ones stay, and the same command builds them again."""
    out = tmp_path / "run"
    assert main(["generate", "--backend", "fake", "--prompts", str(prompt_file(prompt_rows(8))), "--out", str(out),
                 "--max-new-tokens", "16"]) == 0
    capsys.readouterr()

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        rc = main(["data", "build", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "the disk is full" in err and "run the same command again" in " ".join(err.split())
    assert main(["data", "build", str(out)]) == 0
    assert (out / "data" / "card.json").exists()


def test_ctrl_c_during_generate_says_what_was_kept(cli_env, tmp_path, capsys, prompt_file, monkeypatch):
    rows = prompt_rows(12)
    prompts = str(prompt_file(rows))
    out = tmp_path / "run"
    args = ["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "16"]
    real, calls = os.write, [0]

    def write(fd, data):
        calls[0] += 1
        if calls[0] > 4:
            raise KeyboardInterrupt
        return real(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", write)
        rc = main(args)
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 130
    assert "interrupted: finished batches are saved in" in err and "run the same command again to continue" in err
    assert main(args) == 0
    assert len(_records(out / "records.jsonl")) == len(rows)
