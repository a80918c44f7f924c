"""Keys stored in run folders must not change from one version to the next, or every run folder made before would be
invalidated (records regenerated, the stage cache and eval answers recomputed). The expected digests below were
printed by the code as it was before the package redesign (commit 01c65d3, `cai.pipeline.record_key` and friends)
for the same inputs; the constitution is a frozen copy of the shipped one, so editing the shipped file does not move
them."""

from __future__ import annotations

from pathlib import Path

from cai.backends.base import Sampling
from cai.backends.fake import FakeBackend
from cai.core.constitution import load_constitution
from cai.core.hashing import ascii_digest, content_digest, file_sha256, seeded_order, sha256_hex
from cai.core.prompt_files import item_from_row
from cai.core.prompts import critique_messages, frame_sha256
from cai.generate.planner import draw_principles, record_key, stage_key

FROZEN = Path(__file__).resolve().parents[1] / "fixtures" / "frozen_constitution.yaml"
BEFORE = {
    "constitution": "6baf0d789f098a91d07a4d898bd07a5c54087376ad92d72c718bc2d965efd4d6",
    "principle0": "70de949128ec5a2f93875296793356a41307945c9c232938de6ece6fd734c072",
    "frame": "c6847b69f4a12772c3344bd8f250cc9962dbca6862854fade8cadacbf01120db",
    "principles_drawn": ("harassment-extremism", "self-harm"),
    "record_key": "8941287454539eaf0d1d3db88d6a7d3b500d5367bbb1f654aeecb23bc4b9d299",
    "stage_key": "211015e6830a2ca593177c81278183a073e2abbd243c352665567161d5df8e7e",
    "anon_prompt_id": "h-c413e9556b704b22",
    "data_digest": "770819062a853142a34bfed2d18569a16cf4a2e09a9436b010e31e5d054a2e0f",
    "eval_digest": "65571adadc1f2e6f7055b8a362b6cb495e8699c895a7e8579e7104c75457270a",
    "eval_seeded": "aab5f9ae99b2e38fb462025c8f72f570c9c811705d2a4277dc855d7fa293fe97",
}
ITEM = {"id": "q-ü", "messages": [{"role": "user", "content": "Comment réparer un vélo ? ü 日本"}]}
SAMPLING = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=3)


def test_constitution_and_frame_hashes_are_unchanged():
    c = load_constitution(FROZEN)
    assert c.sha256 == BEFORE["constitution"]
    assert c.principles[0].sha256 == BEFORE["principle0"]
    assert frame_sha256(c) == BEFORE["frame"]


def test_record_and_stage_keys_are_unchanged():
    c = load_constitution(FROZEN)
    item = item_from_row(ITEM, "t")
    drawn = draw_principles(c, item.id, SAMPLING.seed, 2)
    assert drawn == BEFORE["principles_drawn"]
    assert record_key(item, c, drawn, FakeBackend(), SAMPLING) == BEFORE["record_key"]
    messages = critique_messages(c, item.messages, "Réponse ü", c.principle(drawn[0]))
    assert stage_key(FakeBackend(), SAMPLING, messages) == BEFORE["stage_key"]


def test_prompt_ids_training_rows_and_eval_keys_are_unchanged():
    assert item_from_row({"prompt": "Wie geht's? ü"}, "t").id == BEFORE["anon_prompt_id"]
    item = item_from_row(ITEM, "t")
    assert content_digest({"prompt": item.messages}) == BEFORE["data_digest"]
    answer_key = {"model": {"id": "m"}, "sampling": SAMPLING.to_dict(), "messages": item.messages}
    assert ascii_digest(answer_key) == BEFORE["eval_digest"]
    assert seeded_order(3, "abc") == BEFORE["eval_seeded"]


def test_the_two_canonical_forms_differ_only_in_escaping(tmp_path):
    assert content_digest({"a": "x"}) == ascii_digest({"a": "x"})
    assert content_digest({"a": "ü"}) != ascii_digest({"a": "ü"})
    f = tmp_path / "f.bin"
    f.write_bytes(b"\x00" * (3 << 20) + b"end")     # more than one read chunk
    assert file_sha256(f) == sha256_hex(f.read_bytes())
