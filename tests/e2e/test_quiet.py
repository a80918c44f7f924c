"""The user's terminal shows our messages and progress only: no library warnings (FutureWarning, deprecation
chatter, transformers' logging) between the progress bars, in a real process on the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import constitution_yaml, prompt_rows, subprocess_env, write_prompts

# what a library's warning looks like on stderr: "FutureWarning: ...", "UserWarning", "WARNING transformers ..."
WARNING = re.compile(r"warn", re.IGNORECASE)


def _cai(args: list[str], cwd, timeout: int) -> subprocess.CompletedProcess:
    # a pipe, not a terminal: rich draws no live bar, so stderr holds every line that would have reached the user
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], cwd=cwd, env=subprocess_env(PYTHONWARNINGS=""),
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def small_inputs(tmp_path):
    constitution = tmp_path / "small.yaml"
    constitution.write_text(constitution_yaml(4))
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_rows(6))
    return constitution, prompts


def test_generate_on_the_tiny_model_prints_no_library_warning(tmp_path, tiny_model_dir, small_inputs):
    constitution, prompts = small_inputs
    r = _cai(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--constitution", str(constitution),
              "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--batch-size", "2", "--max-new-tokens", "8",
              "--temperature", "0"], tmp_path, 180)
    assert r.returncode == 0, r.stderr
    assert "records written" in r.stdout
    assert not WARNING.search(r.stderr), r.stderr


@pytest.mark.slow
def test_demo_on_the_tiny_model_prints_no_library_warning(tmp_path, tiny_model_dir, small_inputs):
    """Every step (generate, the helpfulness answers, training, evaluation) in one process."""
    constitution, prompts = small_inputs
    r = _cai(["demo", "--model", str(tiny_model_dir), "--device", "cpu", "--constitution", str(constitution),
              "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--limit", "6", "--batch-size", "2",
              "--max-new-tokens", "8", "--train-steps", "2", "--eval-red-team", "2", "--eval-helpful", "2",
              "--eval-records", "2", "--eval-max-new-tokens", "8"], tmp_path, 600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done." in r.stdout and (tmp_path / "run" / "eval" / "report.html").exists()
    assert not WARNING.search(r.stderr), r.stderr
