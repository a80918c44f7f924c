"""cai/run.py: the run folder, its run.json and the paths stored in its files."""

from __future__ import annotations

import json
import shutil

import pytest

from cai.core.errors import RunFolderError
from cai.run import RunFolder, RunInfo

# run.json as cai wrote it before the redesign (absolute paths, every key present)
OLD_RUN_JSON = {
    "constitution": {"name": "default", "version": "1", "sha256": "ab" * 32, "path": None},
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_source": "default", "model_revision": None,
    "prompts": None, "backend": "local", "base_urls": None, "rounds": 2,
    "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 64, "seed": 0},
    "created_at": "2026-11-21T10:00:00+00:00", "updated_at": "2026-11-21T10:05:00+00:00", "cai_version": "0.1.0",
}


def _old_folder(tmp_path):
    constitution = tmp_path / "elsewhere" / "c.yaml"
    constitution.parent.mkdir()
    constitution.write_text("name: c\n")
    prompts = tmp_path / "elsewhere" / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    info = json.loads(json.dumps(OLD_RUN_JSON))
    info["constitution"]["path"] = str(constitution)
    info["prompts"] = str(prompts)
    (run / "run.json").write_text(json.dumps(info, indent=2))
    return run, constitution, prompts


def test_a_run_folder_written_before_the_redesign_opens(tmp_path):
    run, constitution, prompts = _old_folder(tmp_path)
    folder = RunFolder.open(run)
    assert folder.info.model == OLD_RUN_JSON["model"] and folder.info.rounds == 2
    assert folder.model_source == "default"
    assert folder.constitution_file() == constitution
    assert folder.prompts_source() == str(prompts)


def test_model_source_falls_back_to_the_model_id(tmp_path):
    run, _, _ = _old_folder(tmp_path)
    info = json.loads((run / "run.json").read_text())
    info["model_source"] = None
    (run / "run.json").write_text(json.dumps(info))
    assert RunFolder.open(run).model_source == OLD_RUN_JSON["model"]


def test_paths_inside_are_relative_and_survive_a_move(tmp_path):
    run, constitution, _ = _old_folder(tmp_path)
    folder = RunFolder(run)
    (run / "adapters" / "sft").mkdir(parents=True)
    stored = folder.rel(run / "adapters" / "sft")
    assert stored == "adapters/sft"
    assert folder.rel(constitution) == str(constitution.resolve())       # outside the folder: absolute
    moved = shutil.move(str(run), str(tmp_path / "archive"))
    again = RunFolder.open(moved)
    assert again.resolve(stored) == (tmp_path / "archive" / "adapters" / "sft").resolve()
    assert again.resolve(stored).is_dir()
    assert again.constitution_file() == constitution


def test_written_run_json_round_trips(tmp_path):
    folder = RunFolder(tmp_path / "new")
    info = RunInfo.model_validate(OLD_RUN_JSON)
    folder.write_info(info)
    assert json.loads(folder.run_file.read_text()) == OLD_RUN_JSON          # same keys, same values
    assert RunFolder.open(folder.root).info == info


@pytest.mark.parametrize("content, match", [
    ("{not json", "is unreadable: line 1 is not JSON"),
    ('{"model": "m"}', "field constitution"),
    ('{"constitution": {"name": "c"}, "model": 3}', "field model"),
])
def test_a_bad_run_json_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(RunFolderError, match=match) as e:
        RunFolder.open(tmp_path)
    assert "run.json" in e.value.message


def test_not_a_run_folder(tmp_path):
    with pytest.raises(RunFolderError, match="no run.json"):
        RunFolder.open(tmp_path)
    with pytest.raises(RunFolderError, match="is not a folder"):
        RunFolder.open(tmp_path / "missing")


def test_manifests_and_finished_adapters(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_manifest("sft") is None and folder.finished_adapters() == []
    folder.write_manifest("sft", {"stage": "sft"})
    (tmp_path / "adapters" / "dpo").mkdir()                                 # unfinished: no manifest
    assert folder.read_manifest("sft") == {"stage": "sft"}
    assert folder.finished_adapters() == ["sft"]
    folder.manifest_path("sft").write_text("{torn")
    with pytest.raises(RunFolderError, match="unreadable"):
        folder.read_manifest("sft")


def test_the_lock_keeps_a_second_process_out(tmp_path):
    folder = RunFolder(tmp_path)
    with folder.lock("cai test"):
        with pytest.raises(RunFolderError, match="in use by another cai process"):
            with RunFolder(tmp_path).lock("cai other"):
                pass
    with folder.lock("cai test"):     # released
        pass
