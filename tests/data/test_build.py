"""`cai data build`: records → SFT prompt/completion rows, DPO pairs, flags, the split by prompt, dedup, the
helpfulness mix and the dataset card; and the files as TRL itself reads and tokenizes them."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

from cai.backends.fake import FakeBackend
from cai.cli import main
from cai.core.errors import DataError, RunFolderError
from cai.core.record import Record, read_records
from cai.data.build import BuildOptions, build_datasets, read_run
from cai.data.card import check_files
from cai.data.helpful import helpful_from_run
from cai.generate.generator import Generator

from conftest import constitution_yaml, items_from, prompt_rows, write_prompts
from data_fixtures import SAMPLING, copy_run, make_run, read_rows

DATA_FILES = ("sft_train", "sft_test", "dpo_train", "dpo_test")


@pytest.fixture(autouse=True)
def _no_fake_delay(monkeypatch):
    monkeypatch.delenv("CAI_FAKE_DELAY", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def convo_key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


def records_by_convo(run: Path) -> dict[str, Record]:
    return {convo_key([dict(m) for m in r.messages]): r for r in read_records(run)}


def marker_rows(marker: str, n: int, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"Marked question {prefix} {i} {marker}"} for i in range(n)]


def helpful_records(n: int, prefix: str = "h") -> list[Record]:
    """Real helpfulness records: the fake backend through the Generator with rounds=0 (an answer, no critique)."""
    c = load_constitution_text(constitution_yaml(4))
    gen = Generator(c, FakeBackend(), rounds=0, sampling=SAMPLING)
    rows = [{"id": f"{prefix}{i:03d}", "prompt": f"Helpful question number {i}: how do I bake bread {i}?"}
            for i in range(n)]
    return gen.run_batch(gen.plan(items_from(rows)))


def load_constitution_text(text: str):
    from cai.core.constitution import parse_constitution

    return parse_constitution(text, "<test>")


# ---------------------------------------------------------------------------------------------------------------
# Shared run folders (generated once; tests build into private copies)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """24 ordinary prompts, two rounds, nothing flagged."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAI_FAKE_DELAY", raising=False)
        run = make_run(tmp_path_factory.mktemp("ds-clean") / "run", prompt_rows(24))
    recs = read_records(run)
    assert len(recs) == 24 and not any(r.flags for r in recs)
    return run


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    """Ordinary prompts plus prompts that the fake backend answers empty, cut off, echoed or unchanged."""
    rows = (prompt_rows(20) + marker_rows("[[empty]]", 2, "e") + marker_rows("[[long]]", 3, "l")
            + marker_rows("[[echo]]", 1, "x") + marker_rows("[[same]]", 2, "s"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAI_FAKE_DELAY", raising=False)
        return make_run(tmp_path_factory.mktemp("ds-mixed") / "run", rows)


def _marked(run: Path, marker: str) -> list[Record]:
    return [r for r in read_records(run) if marker in r.messages[-1]["content"]]


# ---------------------------------------------------------------------------------------------------------------
# SFT rows and DPO pairs


def test_sft_rows_are_trl_prompt_completion_with_the_final_revision(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    card = build_datasets(run, BuildOptions(test_size=0.25))
    by_convo = records_by_convo(run)
    rows = read_rows(run, "sft_train") + read_rows(run, "sft_test")
    assert len(rows) == len(by_convo) == card.counts["sft_train"] + card.counts["sft_test"]
    for row in rows:
        assert set(row) == {"prompt", "completion"}
        rec = by_convo[convo_key(row["prompt"])]
        assert row["prompt"] == [dict(m) for m in rec.messages]
        assert all(m["role"] != "assistant" for m in row["prompt"])
        assert row["completion"] == [{"role": "assistant", "content": rec.final}]
        # the final revision, not the initial answer nor an earlier round's revision
        assert rec.final == rec.rounds[-1].revision != rec.initial
        assert rec.final != rec.rounds[0].revision


def test_all_rounds_gives_one_sft_row_per_round_revision(clean_run, tmp_path, capsys):
    run = copy_run(clean_run, tmp_path / "run")
    assert main(["data", "build", str(run), "--all-rounds", "--test-size", "0"]) == 0, capsys.readouterr().err
    rows = read_rows(run, "sft_train")
    by_convo = records_by_convo(run)
    got: dict[str, list[str]] = {}
    for row in rows:
        got.setdefault(convo_key(row["prompt"]), []).append(row["completion"][0]["content"])
    assert len(rows) == sum(len(r.rounds) for r in by_convo.values()) == 2 * len(by_convo)
    for key, rec in by_convo.items():
        assert got[key] == [rnd.revision for rnd in rec.rounds]
    # DPO is unchanged by --all-rounds: one pair per record
    assert len(read_rows(run, "dpo_train")) == len(by_convo)


def test_dpo_rows_pair_final_revision_against_initial_answer(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    build_datasets(run, BuildOptions(test_size=0.25))
    by_convo = records_by_convo(run)
    rows = read_rows(run, "dpo_train") + read_rows(run, "dpo_test")
    assert len(rows) == len(by_convo)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        rec = by_convo[convo_key(row["prompt"])]
        assert row["chosen"] == [{"role": "assistant", "content": rec.final}]
        assert row["rejected"] == [{"role": "assistant", "content": rec.initial}]
        assert row["chosen"] != row["rejected"]


def test_a_record_whose_final_equals_its_initial_makes_no_dpo_pair(mixed_run, tmp_path):
    run = copy_run(mixed_run, tmp_path / "run")
    same = _marked(run, "[[same]]")
    assert same and all(r.final == r.initial for r in same)          # precondition: the fake backend's [[same]]
    # by default such a revision is flagged (unchanged, and an echo of the critique) and left out of both files
    assert all("unchanged" in r.flags for r in same)
    card = build_datasets(run, BuildOptions(test_size=0))
    assert sum(card.excluded.get(f"dpo:{f}", 0) for f in same[0].flags) >= len(same)
    assert "dpo:no_pair" not in card.excluded
    # allowing the flags keeps the SFT row, but a pair of two equal answers teaches nothing: no_pair
    card = build_datasets(run, BuildOptions(test_size=0, allow_flags=tuple(same[0].flags)))
    assert card.excluded.get("dpo:no_pair") == len(same)
    same_convos = {convo_key([dict(m) for m in r.messages]) for r in same}
    assert not same_convos & {convo_key(r["prompt"]) for r in read_rows(run, "dpo_train")}
    assert same_convos <= {convo_key(r["prompt"]) for r in read_rows(run, "sft_train")}
    assert card.counts["dpo_train"] == card.counts["sft_train"] - len(same)


# ---------------------------------------------------------------------------------------------------------------
# Flags


def test_flagged_texts_are_left_out_by_default_and_counted(mixed_run, tmp_path):
    run = copy_run(mixed_run, tmp_path / "run")
    expected = {"empty": _marked(run, "[[empty]]"), "truncated": _marked(run, "[[long]]"),
                "echo": _marked(run, "[[echo]]"), "unchanged": _marked(run, "[[same]]")}
    for flag, recs in expected.items():          # precondition: the markers gave the flags
        assert recs and all(flag in r.flags for r in recs), flag
    flagged = [r for r in read_records(run) if r.flags]
    card = build_datasets(run, BuildOptions(test_size=0))
    for kind in ("sft", "dpo"):
        # every flagged record is counted once, under one of its own flags
        assert sum(v for k, v in card.excluded.items() if k.startswith(f"{kind}:")) == len(flagged)
        for flag in ("empty", "truncated"):      # records with that one flag only
            assert card.excluded.get(f"{kind}:{flag}") == len(expected[flag]), card.excluded
    assert set(card.excluded) <= {f"{kind}:{f}" for kind in ("sft", "dpo") for r in flagged for f in r.flags}
    n_clean = sum(1 for r in read_records(run) if not r.flags)
    assert card.counts["sft_train"] == card.counts["dpo_train"] == n_clean
    texts = json.dumps(read_rows(run, "sft_train") + read_rows(run, "dpo_train"))
    for marker in ("[[empty]]", "[[long]]", "[[echo]]", "[[same]]"):
        assert marker not in texts
    assert "Left out" in (run / "data" / "README.md").read_text()


def test_allow_flag_truncated_keeps_truncated_texts_only(mixed_run, tmp_path):
    run = copy_run(mixed_run, tmp_path / "run")
    card = build_datasets(run, BuildOptions(test_size=0, allow_flags=("truncated",)))
    long = _marked(run, "[[long]]")
    sft = {convo_key(r["prompt"]): r for r in read_rows(run, "sft_train")}
    dpo = {convo_key(r["prompt"]): r for r in read_rows(run, "dpo_train")}
    for rec in long:
        key = convo_key([dict(m) for m in rec.messages])
        assert sft[key]["completion"][0]["content"] == rec.final
        assert dpo[key]["rejected"][0]["content"] == rec.initial
    assert "sft:truncated" not in card.excluded and "dpo:truncated" not in card.excluded
    # the other flags still exclude
    others = [r for r in read_records(run) if set(r.flags) - {"truncated"}]
    assert others
    for kind in ("sft", "dpo"):
        assert sum(v for k, v in card.excluded.items() if k.startswith(f"{kind}:")) == len(others)
    assert card.counts["sft_train"] == len(read_records(run)) - len(others)


def test_all_records_flagged_is_a_data_error_suggesting_allow_flag(tmp_path):
    run = make_run(tmp_path / "run", marker_rows("[[empty]]", 3, "e"))
    with pytest.raises(DataError) as e:
        build_datasets(run)
    assert "all 3 are flagged" in e.value.message
    assert "empty 3" in e.value.message
    assert "--allow-flag" in e.value.hint
    assert not (run / "data" / "card.json").exists()


def test_unknown_allow_flag_is_a_data_error(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    with pytest.raises(DataError, match="unknown flag"):
        build_datasets(run, BuildOptions(allow_flags=("truncatd",)))


def test_a_run_folder_without_records_is_a_data_error(clean_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(clean_run / "run.json", run / "run.json")
    with pytest.raises(DataError, match="no records"):
        build_datasets(run)
    (run / "records.jsonl").write_text("")
    with pytest.raises(DataError, match="no records"):
        build_datasets(run)


def test_a_folder_without_run_json_is_a_run_folder_error(clean_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(clean_run / "records.jsonl", run / "records.jsonl")
    with pytest.raises(RunFolderError, match="no run.json"):
        build_datasets(run)
    with pytest.raises(RunFolderError, match="not a folder"):
        build_datasets(tmp_path / "missing")
    # the CLI: one message, exit status 2
    assert main(["data", "build", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no run.json" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# The split by prompt


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("CAI_FAKE_DELAY", raising=False)
        return make_run(tmp_path_factory.mktemp("ds-big") / "run", prompt_rows(40))


def _convos(run: Path, name: str) -> set[str]:
    return {convo_key(r["prompt"]) for r in read_rows(run, name)}


@pytest.mark.parametrize("all_rounds", [False, True])
def test_no_prompt_is_in_both_train_and_test_of_any_file(big_run, tmp_path, all_rounds):
    run = copy_run(big_run, tmp_path / "run")
    card = build_datasets(run, BuildOptions(test_size=0.25, all_rounds=all_rounds))
    s_tr, s_te, d_tr, d_te = (_convos(run, n) for n in DATA_FILES)
    assert s_te and d_te and s_tr and d_tr
    assert not s_tr & s_te
    assert not d_tr & d_te
    # one split for both kinds: a prompt held out of SFT is held out of DPO, and the other way round
    assert not s_te & d_tr
    assert not d_te & s_tr
    assert card.prompts["test"] == len(s_te | d_te)
    assert card.prompts["total"] == len(s_tr | s_te | d_tr | d_te) == 40
    # about a quarter held out (exactly how many depends on how the seeded hash falls)
    assert 0.1 <= card.prompts["test"] / card.prompts["total"] <= 0.4


def test_the_split_of_a_prompt_is_stable_when_prompts_are_added(tmp_path):
    run = make_run(tmp_path / "run", prompt_rows(20))
    build_datasets(run, BuildOptions(test_size=0.25))
    before_test, before_train = _convos(run, "sft_test"), _convos(run, "sft_train")
    assert before_test and before_train
    make_run(tmp_path / "run", prompt_rows(80))        # the same 20 (skipped: already done) and 60 new prompts
    assert len(read_records(run)) == 80
    build_datasets(run, BuildOptions(test_size=0.25))
    after_test, after_train = _convos(run, "sft_test"), _convos(run, "sft_train")
    moved_out = before_test - after_test
    moved_in = before_train & after_test
    assert not moved_out and not moved_in, (f"{len(moved_out)} prompts moved from test to train, "
                                            f"{len(moved_in)} from train to test")
    assert before_train <= after_train


def test_test_size_zero_writes_empty_test_files(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    card = build_datasets(run, BuildOptions(test_size=0))
    for name in ("sft_test", "dpo_test"):
        assert (run / "data" / f"{name}.jsonl").read_bytes() == b""
        assert card.counts[name] == 0
    assert card.counts["sft_train"] == card.counts["dpo_train"] == 24
    assert card.prompts == {"total": 24, "test": 0}


# ---------------------------------------------------------------------------------------------------------------
# Duplicates


def test_duplicate_records_under_two_prompt_ids_give_one_row(tmp_path):
    rows = prompt_rows(6)
    rows.append({"id": "dup-of-q002", "prompt": rows[2]["prompt"]})   # same conversation, another id
    # one batch (same seed) and one principle (same draws): the two ids get the same texts
    run = make_run(tmp_path / "run", rows, batch_size=64, principles=1)
    recs = [r for r in read_records(run) if r.messages[-1]["content"] == rows[2]["prompt"]]
    assert len(recs) == 2 and recs[0].prompt_id != recs[1].prompt_id
    assert recs[0].final == recs[1].final and recs[0].initial == recs[1].initial   # precondition
    card = build_datasets(run, BuildOptions(test_size=0))
    assert card.duplicates == {"sft": 1, "dpo": 1}
    assert card.records == 7
    for name in ("sft_train", "dpo_train"):
        prompts = [r["prompt"][-1]["content"] for r in read_rows(run, name)]
        assert prompts.count(rows[2]["prompt"]) == 1
        assert len(prompts) == 6


# ---------------------------------------------------------------------------------------------------------------
# Helpfulness mix


class StubSource:
    """A HelpfulSource over a fixed pool of real rounds=0 records; remembers what it was asked for."""

    def __init__(self, pool: list[Record]):
        self.pool = pool
        self.asked: list[int] = []

    def __call__(self, n: int) -> list[Record]:
        self.asked.append(n)
        return self.pool[:n]


@pytest.fixture(scope="module")
def helpful_pool() -> list[Record]:
    pool = helpful_records(60)
    assert all(r.rounds == [] and r.final == r.initial and not r.flags for r in pool)
    return pool


@pytest.mark.parametrize("mix", [0.1, 0.25, 0.5])
def test_helpful_mix_gives_the_requested_ratio_of_sft_rows(clean_run, tmp_path, helpful_pool, mix):
    run = copy_run(clean_run, tmp_path / "run")
    source = StubSource(helpful_pool)
    card = build_datasets(run, BuildOptions(test_size=0.25, helpful_mix=mix), source)
    assert len(source.asked) == 1
    sft = read_rows(run, "sft_train") + read_rows(run, "sft_test")
    helpful_texts = {r.messages[-1]["content"]: r for r in helpful_pool}
    helpful_rows = [row for row in sft if row["prompt"][-1]["content"] in helpful_texts]
    assert len(helpful_rows) == card.helpful["used"] == source.asked[0] > 0
    ratio = len(helpful_rows) / len(sft)
    assert ratio == pytest.approx(card.helpful["ratio"], abs=1e-4)
    # at least the requested share, and not one row more than needed to reach it
    assert mix <= ratio < mix + 1 / len(sft)
    # a helpfulness row trains on the plain answer
    for row in helpful_rows:
        answer = helpful_texts[row["prompt"][-1]["content"]].final
        assert row["completion"] == [{"role": "assistant", "content": answer}]
    # helpfulness rows are SFT only
    dpo_prompts = {r["prompt"][-1]["content"] for r in read_rows(run, "dpo_train") + read_rows(run, "dpo_test")}
    assert not dpo_prompts & set(helpful_texts)


@pytest.mark.parametrize("mix", [1.0, 1.5, -0.1])
def test_helpful_mix_outside_0_1_is_a_data_error(clean_run, tmp_path, helpful_pool, mix):
    run = copy_run(clean_run, tmp_path / "run")
    source = StubSource(helpful_pool)
    with pytest.raises(DataError, match="helpful-mix"):
        build_datasets(run, BuildOptions(helpful_mix=mix), source)
    assert source.asked == []
    assert not (run / "data").exists()


def test_helpful_from_run_answers_with_the_fake_backend_once_and_reuses_the_answers(clean_run, tmp_path,
                                                                                      monkeypatch, capsys):
    from cai.backends import make_backend

    run = copy_run(clean_run, tmp_path / "run")
    folder, _ = read_run(run)
    assert folder.info.backend == "fake" and folder.constitution_file().exists()   # what a fake run records
    hpath = write_prompts(tmp_path / "helpful.jsonl",
                          [{"id": f"hp{i:02d}", "prompt": f"How do I water plant number {i}?"} for i in range(30)])
    made: list[tuple[str, str]] = []

    def counting(kind, model, **kw):
        made.append((kind, model))
        return make_backend(kind, model, **kw)

    opts = BuildOptions(test_size=0.25, helpful_mix=0.25, helpful_prompts=str(hpath))
    card = build_datasets(run, opts, helpful_from_run(run, str(hpath), 0, counting))
    assert made == [("fake", "fake")]
    helpful = read_records(run / "helpful")
    assert len(helpful) == card.helpful["needed"] == card.helpful["used"] == 8     # ceil(24 * 0.25 / 0.75)
    assert all(r.rounds == [] for r in helpful)
    assert (run / "helpful" / "run.json").exists()
    sft_prompts = {r["prompt"][-1]["content"] for r in read_rows(run, "sft_train") + read_rows(run, "sft_test")}
    assert {r.messages[-1]["content"] for r in helpful} <= sft_prompts

    # a second build reuses the answers: no backend is made, the data is the same
    before = (run / "helpful" / "records.jsonl").read_bytes()
    card2 = build_datasets(run, opts, helpful_from_run(run, str(hpath), 0, counting))
    assert made == [("fake", "fake")]
    assert card2.sha256 == card.sha256

    # and so does the CLI (which builds its backend through cai.backends.make_backend)
    import cai.backends

    monkeypatch.setattr(cai.backends, "make_backend", counting)
    assert main(["data", "build", str(run), "--helpful-mix", "0.25", "--helpful-prompts", str(hpath),
                 "--test-size", "0.25"]) == 0, capsys.readouterr().err
    assert made == [("fake", "fake")]
    assert (run / "helpful" / "records.jsonl").read_bytes() == before
    assert json.loads((run / "data" / "card.json").read_text())["sha256"] == card.sha256


# ---------------------------------------------------------------------------------------------------------------
# The card


def test_card_lists_the_real_sha256_of_every_file(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    card = build_datasets(run, BuildOptions(test_size=0.25))
    on_disk = json.loads((run / "data" / "card.json").read_text())
    assert set(on_disk["files"]) == {f"{n}.jsonl" for n in DATA_FILES}
    for name, sha in on_disk["files"].items():
        assert hashlib.sha256((run / "data" / name).read_bytes()).hexdigest() == sha
    assert on_disk["sha256"] == card.sha256 and len(card.sha256) == 64
    assert on_disk["records"] == 24
    assert on_disk["constitution"] == [{k: getattr(r.provenance.constitution, k) for k in ("name", "version", "sha256")}
                                       for r in read_records(run)[:1]]
    check_files(run, on_disk)            # matches as written


def test_card_sha256_is_stable_and_changes_when_the_data_changes(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    first = build_datasets(run, BuildOptions(test_size=0.25)).sha256
    assert build_datasets(run, BuildOptions(test_size=0.25)).sha256 == first     # same records, same hash
    assert build_datasets(run, BuildOptions(test_size=0.25, all_rounds=True)).sha256 != first
    make_run(run, prompt_rows(26))      # two more records in the same folder
    assert build_datasets(run, BuildOptions(test_size=0.25)).sha256 != first


def test_check_files_raises_after_a_data_file_is_edited(clean_run, tmp_path):
    run = copy_run(clean_run, tmp_path / "run")
    build_datasets(run, BuildOptions(test_size=0.25))
    card = json.loads((run / "data" / "card.json").read_text())
    check_files(run, card)
    path = run / "data" / "dpo_train.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[1:]))          # a row removed by hand
    with pytest.raises(DataError, match="does not match") as e:
        check_files(run, card)
    assert "cai data build" in e.value.hint
    path.unlink()
    with pytest.raises(DataError, match="does not match"):
        check_files(run, card)


# ---------------------------------------------------------------------------------------------------------------
# TRL reads the files as they are


@pytest.fixture(scope="module")
def built_clean_run(clean_run, tmp_path_factory) -> Path:
    run = copy_run(clean_run, tmp_path_factory.mktemp("ds-trl") / "run")
    build_datasets(run, BuildOptions(test_size=0.25))
    return run


def _tiny(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tok


def test_sft_files_pass_trl_preparation_with_loss_on_the_completion_only(built_clean_run, tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    files = {"train": str(built_clean_run / "data" / "sft_train.jsonl"),
             "test": str(built_clean_run / "data" / "sft_test.jsonl")}
    ds = load_dataset("json", data_files=files)
    assert ds["train"].num_rows == len(read_rows(built_clean_run, "sft_train")) > 0
    assert ds["test"].num_rows == len(read_rows(built_clean_run, "sft_test")) > 0
    model, tok = _tiny(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_length=512,
                     completion_only_loss=True, per_device_train_batch_size=2, max_steps=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds["train"], eval_dataset=ds["test"],
                         processing_class=tok)
    processed = trainer.train_dataset
    assert "input_ids" in processed.column_names
    assert "completion_mask" in processed.column_names or "labels" in processed.column_names
    raw = ds["train"]
    for i in range(processed.num_rows):
        ids = processed[i]["input_ids"]
        if "completion_mask" in processed.column_names:
            mask = processed[i]["completion_mask"]
        else:
            mask = [int(label != -100) for label in processed[i]["labels"]]
        assert len(mask) == len(ids)
        n = sum(mask)
        assert 0 < n < len(ids)
        start = mask.index(1)
        assert all(mask[start:]), "the completion is one block at the end"
        prompt_text = tok.apply_chat_template(raw[i]["prompt"], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids[:start]) == prompt_text
        completion = raw[i]["completion"][0]["content"]
        assert tok.decode(ids[start:]).startswith(completion)
        assert tok.eos_token_id in ids[start:], "the completion tokens end the turn (the model learns to stop)"
    # and one step of training on them gives a finite loss
    result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0


def test_dpo_files_pass_trl_preparation(built_clean_run, tiny_model_dir, tmp_path):
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    ds = load_dataset("json", data_files={"train": str(built_clean_run / "data" / "dpo_train.jsonl")})
    model, tok = _tiny(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none", max_length=512,
                     per_device_train_batch_size=2, max_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds["train"], processing_class=tok)
    processed = trainer.train_dataset
    # TRL tokenizes a pair into the prompt's ids and each answer's ids
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(processed.column_names), processed.column_names
    raw = ds["train"]
    assert processed.num_rows == raw.num_rows > 0
    for i in range(processed.num_rows):
        row = processed[i]
        prompt_text = tok.apply_chat_template(raw[i]["prompt"], tokenize=False, add_generation_prompt=True)
        assert tok.decode(row["prompt_ids"]) == prompt_text
        assert tok.decode(row["chosen_ids"]).startswith(raw[i]["chosen"][0]["content"])
        assert tok.decode(row["rejected_ids"]).startswith(raw[i]["rejected"][0]["content"])
        assert row["chosen_ids"] != row["rejected_ids"]
    result = trainer.train()
    # policy == reference at the first step: the sigmoid DPO loss is -log(sigmoid(0)) = log 2
    assert result.training_loss == pytest.approx(math.log(2), abs=1e-3)
