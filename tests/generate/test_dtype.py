"""``--dtype``: what a local model computes in is in each record's provenance and, when it is not fp32, in the record
and stage keys (fp32 keys are the ones earlier versions wrote), so bf16 records are never taken for fp32 ones."""

from __future__ import annotations

import json

from cai.cli import main

from conftest import prompt_rows, write_prompts


def _records(run):
    return [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]


def test_bf16_records_are_other_records_and_say_so(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", prompt_rows(3))
    run = tmp_path / "run"
    base = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(run),
            "--max-new-tokens", "6", "--temperature", "0"]
    assert main(base) == 0
    fp32 = _records(run)
    assert all(r["provenance"]["dtype"] == "float32" for r in fp32)
    assert json.loads((run / "run.json").read_text())["dtype"] == "float32"
    stages = len((run / "stages.jsonl").read_text().splitlines())

    assert main(base + ["--dtype", "bfloat16"]) == 0
    bf16 = _records(run)
    assert {r["prompt_id"] for r in bf16} == {r["prompt_id"] for r in fp32}
    assert not {r["id"] for r in bf16} & {r["id"] for r in fp32}          # other keys: regenerated, not reused
    assert all(r["provenance"]["dtype"] == "bfloat16" for r in bf16)
    superseded = [json.loads(x) for x in (run / "superseded.jsonl").read_text().splitlines()]
    assert {r["id"] for r in superseded} == {r["id"] for r in fp32}       # the fp32 ones are kept aside, not mixed
    # every stage was computed again in bf16: none of the fp32 stage outputs was taken for a bf16 one
    assert len((run / "stages.jsonl").read_text().splitlines()) == 2 * stages
    assert json.loads((run / "run.json").read_text())["dtype"] == "bfloat16"

    assert main(base) == 0                                               # back to fp32: the same keys as at first
    assert {r["id"] for r in _records(run)} == {r["id"] for r in fp32}
