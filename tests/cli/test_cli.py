"""The `cai` command: help, lazy imports, an end-to-end fake run, argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cai.cli import main

from conftest import REPO, prompt_rows, subprocess_env


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("validate", "generate", "constitution", "demo"):
        assert command in out


def test_generate_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in ("--rounds", "--batch-size", "--max-new-tokens", "--skip-long", "--supersede", "--backend"):
        assert option in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


def test_console_script_module_entry():
    proc = subprocess.run([sys.executable, "-m", "cai.cli", "--version"], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 0
    assert "cai" in proc.stdout


def test_importing_the_cli_does_not_import_torch():
    code = ("import sys, cai.cli; from cai.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules]; "
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_validate_does_not_import_torch():
    code = ("import sys; from cai.cli import main; rc = main(['validate', 'constitution/default.yaml']); "
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] 0" in proc.stdout


def test_generate_fake_end_to_end(cli_env, tmp_path, capsys, prompt_file):
    rows = prompt_rows(5)
    rows[3]["prompt"] = "[[empty]] " + rows[3]["prompt"]
    prompts = prompt_file(rows + ["{broken json"])
    out = tmp_path / "run"
    rc = main(["generate", "--backend", "fake", "--prompts", str(prompts), "--out", str(out), "--rounds", "2",
               "--batch-size", "2", "--max-new-tokens", "32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "records written" in captured.out and "5" in captured.out
    assert "empty 1" in captured.out                       # the flag counts are shown
    assert "bad prompt rows skipped" in captured.out
    assert "skipped" in captured.err and ":6" in captured.err   # the bad row is named with its line
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["prompt_id"] for r in recs) == [r["id"] for r in rows]
    assert all(len(r["rounds"]) == 2 for r in recs)
    assert all(r["provenance"]["constitution"]["name"] == "default" for r in recs)
    assert json.loads((out / "run.json").read_text())["rounds"] == 2
    # rerun: nothing new
    assert main(["generate", "--backend", "fake", "--prompts", str(prompts), "--out", str(out), "--rounds", "2",
                 "--batch-size", "2", "--max-new-tokens", "32"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 5


def test_generate_limit(cli_env, tmp_path, capsys, prompt_file):
    prompts = prompt_file(prompt_rows(6))
    out = tmp_path / "run"
    assert main(["generate", "--backend", "fake", "--prompts", str(prompts), "--out", str(out), "--limit", "2"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


def test_generate_strict_stops_on_a_bad_row(cli_env, tmp_path, capsys, prompt_file):
    prompts = prompt_file(prompt_rows(3) + ["{broken"])
    out = tmp_path / "run"
    rc = main(["generate", "--backend", "fake", "--prompts", str(prompts), "--out", str(out), "--strict"])
    assert rc == 2
    assert ":4" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--rounds", "0"], "--rounds"),
    (["--limit", "0"], "--limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_bad_numbers_exit_2(cli_env, tmp_path, capsys, prompt_file, args, needle):
    prompts = prompt_file(prompt_rows(2))
    out = tmp_path / "run"
    rc = main(["generate", "--backend", "fake", "--prompts", str(prompts), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err
    assert not out.exists()


def test_generate_bad_constitution_exit_2(cli_env, tmp_path, capsys, prompt_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nprinciples: []\n")
    rc = main(["generate", "--backend", "fake", "--constitution", str(bad), "--prompts",
               str(prompt_file(prompt_rows(2))), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.yaml:2" in err and "bad.yaml:3" in err


def test_generate_into_a_folder_of_another_constitution_exit_2(cli_env, tmp_path, capsys, prompt_file):
    from conftest import constitution_yaml

    prompts = str(prompt_file(prompt_rows(2)))
    out = tmp_path / "run"
    assert main(["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out)]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(constitution_yaml(3, name="other"))
    before = (out / "records.jsonl").read_bytes()
    capsys.readouterr()
    rc = main(["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out), "--constitution", str(other)])
    assert rc == 2
    assert "--supersede" in capsys.readouterr().err
    assert (out / "records.jsonl").read_bytes() == before
    rc = main(["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out), "--constitution", str(other),
               "--supersede"])
    assert rc == 0
    assert len((out / "superseded.jsonl").read_text().splitlines()) == 2


def test_generate_too_long_exit_2_and_skip_long(cli_env, tmp_path, capsys, prompt_file):
    rows = prompt_rows(3)
    rows[1]["prompt"] = "word " * 5000
    prompts = str(prompt_file(rows))
    out = tmp_path / "run"
    rc = main(["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "q001" in err and "--skip-long" in err
    assert not out.exists()
    assert main(["generate", "--backend", "fake", "--prompts", prompts, "--out", str(out), "--skip-long"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    assert "left out" in capsys.readouterr().out
