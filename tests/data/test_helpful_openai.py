"""`cai data build --helpful-mix` on a run made with the openai backend: the helpful prompts are answered by the
run's own endpoints (from run.json) or by --base-url."""

from __future__ import annotations

import json

from fixtures.fault_server import FaultServer

from cai.cli import main

from conftest import constitution_yaml, prompt_rows, write_prompts


def _generate(tmp_path, url: str) -> tuple:
    prompts = write_prompts(tmp_path / "p.jsonl", prompt_rows(12))
    helpful = write_prompts(tmp_path / "h.jsonl", prompt_rows(12, prefix="h"))
    cfile = tmp_path / "c.yaml"
    cfile.write_text(constitution_yaml(4))
    out = tmp_path / "run"
    rc = main(["generate", "--backend", "openai", "--base-url", url, "--model", "m", "--prompts", str(prompts),
               "--constitution", str(cfile), "--out", str(out), "--max-new-tokens", "32"])
    assert rc == 0
    return out, helpful


def test_helpful_answers_come_from_the_runs_endpoints(tmp_path, cli_env, capsys):
    s = FaultServer()
    try:
        out, helpful = _generate(tmp_path, s.url)
        assert json.loads((out / "run.json").read_text())["base_urls"] == [s.url]
        before = s.answered
        rc = main(["data", "build", str(out), "--helpful-mix", "0.25", "--helpful-prompts", str(helpful)])
        assert rc == 0, capsys.readouterr().err
        asked = [user for user, _ in s.log[before:]]
        helpful_ids = {json.loads(line)["prompt_id"] for line in (out / "helpful" / "records.jsonl").open()}
        assert helpful_ids and s.answered - before == len(helpful_ids)   # one answer (rounds 0) per helpful prompt
        assert all(q.startswith("Test question number") for q in asked)
        rows = [json.loads(line) for line in (out / "data" / "sft_train.jsonl").open()]
        rows += [json.loads(line) for line in (out / "data" / "sft_test.jsonl").open()]
        assert any(r["completion"][0]["content"].startswith("Answer ") for r in rows)
    finally:
        s.close()


def test_base_url_overrides_and_a_run_without_endpoints_is_a_clear_error(tmp_path, cli_env, capsys):
    first, second = FaultServer(), FaultServer()
    try:
        out, helpful = _generate(tmp_path, first.url)
        info = json.loads((out / "run.json").read_text())
        info.pop("base_urls")                                 # as written before endpoints were recorded
        (out / "run.json").write_text(json.dumps(info))
        capsys.readouterr()
        rc = main(["data", "build", str(out), "--helpful-mix", "0.25", "--helpful-prompts", str(helpful)])
        err = capsys.readouterr().err
        assert rc == 2 and "names no endpoint" in err and "--base-url" in err and "Traceback" not in err
        before = first.answered
        rc = main(["data", "build", str(out), "--helpful-mix", "0.25", "--helpful-prompts", str(helpful),
                   "--base-url", second.url])
        assert rc == 0
        assert second.answered > 0 and first.answered == before
    finally:
        first.close()
        second.close()
