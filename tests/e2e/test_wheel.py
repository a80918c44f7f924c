"""The wheel built from the project carries the shipped constitution, prompt sets and training recipes, and what is
installed from it works from any folder: validate by name, generate with the default prompt sets, the demo.

The wheel is unpacked and put first on ``PYTHONPATH`` (its dependencies come from the test environment), so the
commands below run the wheel's code and files, not the repository's."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("cai-*.whl")
    return path


def test_the_wheel_carries_the_shipped_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"cai/resources/constitution/{p.name}" for p in (REPO / "constitution").glob("*.yaml")}
    shipped |= {f"cai/resources/prompts/{p.name}" for p in (REPO / "data" / "prompts").glob("*.jsonl")}
    shipped |= {f"cai/resources/recipes/{p.name}" for p in (REPO / "cai" / "resources" / "recipes").glob("*.yaml")}
    assert "cai/resources/constitution/default.yaml" in shipped and "cai/resources/prompts/red_team.jsonl" in shipped
    assert shipped <= names, sorted(shipped - names)
    assert "cai/cli/__main__.py" in names and "server/app.py" in names
    assert {"server/review/templates/record.html", "server/review/static/review.js"} <= names   # the review page
    assert not any(n.startswith("tests/") for n in names)
    # the copies are the files people edit, byte for byte
    z = zipfile.ZipFile(wheel)
    assert z.read("cai/resources/constitution/default.yaml") == (REPO / "constitution" / "default.yaml").read_bytes()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """The wheel unpacked into a folder (as pip would install it), an empty working folder outside the repo, and an
    environment that imports cai from the unpacked wheel."""
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path_factory.mktemp("work") / "empty"
    work.mkdir()
    env = subprocess_env()
    env["PYTHONPATH"] = str(site)
    return work, env


def cai(installed, *args: str) -> subprocess.CompletedProcess:
    work, env = installed
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_installed_package_is_the_wheel(installed):
    work, env = installed
    proc = subprocess.run([sys.executable, "-c", "import cai, cai.resources as r; print(cai.__file__); "
                           "print(r.constitution_path('default'))"], cwd=work, env=env, capture_output=True,
                          text=True)
    package, constitution = proc.stdout.split()
    site = Path(env["PYTHONPATH"])
    assert Path(package).is_relative_to(site) and Path(constitution).is_relative_to(site), proc.stdout


def test_validate_the_shipped_constitution_by_name(installed):
    proc = cai(installed, "validate", "default")
    assert proc.returncode == 0, proc.stderr
    assert "ok default" in proc.stdout


def test_generate_with_the_default_prompt_sets(installed):
    proc = cai(installed, "generate", "--backend", "fake", "--limit", "2", "--out", "run", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    run = installed[0] / "run"
    records = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    red_team = [json.loads(x)["id"] for x in (REPO / "data" / "prompts" / "red_team.jsonl").read_text().splitlines()]
    assert len(records) == 2 and {r["prompt_id"] for r in records} <= set(red_team)


def test_demo_into_another_folder(installed):
    proc = cai(installed, "demo", "--backend", "fake", "--out", "../elsewhere", "--limit", "2", "--train-steps", "0")
    assert proc.returncode == 0, proc.stderr
    out = installed[0].parent / "elsewhere"
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "run.json").read_text())["constitution"]["name"] == "default"
