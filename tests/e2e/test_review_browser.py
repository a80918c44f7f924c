"""The review page in a real browser (headless Chromium, driven by Playwright): filter the queue, open a record,
accept, edit and reject with the keyboard, and `cai data build --require-review` trains exactly what was accepted
and edited; model text that is HTML renders as text and runs nothing; two reviewers in two browsers at once lose
neither's decisions; pairs and a server with no keys."""

from __future__ import annotations

import json

import pytest
from fixtures.browser import browser, live, missing
from fixtures.review_fixtures import XSS, make_record, pair_of, rows, write_run

from cai.cli import main
from server.app import create_app
from server.settings import Settings

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

KEYS = {"alice-key-00001": "alice", "bob-key-000002": "bob"}
ALICE, BOB = list(KEYS)


def make_app(run, keys: bool = True):
    return create_app(Settings(model=None, constitutions=(), api_keys=tuple(KEYS) if keys else (),
                               key_holders=KEYS if keys else {}, review_runs={"run": str(run)}))


def the_run(tmp_path):
    recs = [make_record(i, category="weapons" if i % 2 else "misc") for i in range(8)]
    recs.append(make_record(8, final=XSS[0], initial=XSS[1], critique="<b>bold</b> critique", category="xss"))
    recs.append(make_record(9, prompt=XSS[1] + " how?", category="xss"))
    lines = [pair_of(recs[0], 0.8), pair_of(recs[1], 0.7, n=0) | {"responses": [
        {"text": XSS[0], "source": "policy:base"}, {"text": "fine", "source": "policy:base"}]}]
    return write_run(tmp_path / "run", recs, lines), recs


def sign_in(page, url: str, key: str) -> None:
    page.goto(url)
    page.fill("#key", key)
    with page.expect_navigation():
        page.click("button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")


def press(page, key: str) -> None:
    """A key press that navigates (a decision saved, or j/k/Enter)."""
    with page.expect_navigation():
        page.keyboard.press(key)
    page.wait_for_selector("body[data-ready='1']")


def test_keyboard_review_then_build_trains_exactly_the_accepted_and_edited(tmp_path):
    run, recs = the_run(tmp_path)
    with live(make_app(run)) as url, browser() as b:
        page = b.new_page()
        sign_in(page, url + "/review/run", ALICE)
        assert "0 of 12 reviewed" in page.text_content("#progress")
        page.select_option("select[name=category]", "weapons")
        with page.expect_navigation():
            page.click("#filters button[type=submit]")
        prompts = page.locator("#queue tbody tr td.prompt").all_text_contents()
        assert prompts == [recs[i].messages[0]["content"] for i in (1, 3, 5, 7)]
        page.keyboard.press("j")                                        # the selection moves to the second row
        page.keyboard.press("k")
        press(page, "Enter")
        assert page.text_content("#final") == recs[1].final
        press(page, "a")                                                # accepted; on to the next weapons record
        assert page.text_content("#final") == recs[3].final
        page.keyboard.press("e")
        page.fill("#edit-text", "A careful answer, written by a person.")
        press(page, "Control+Enter")
        assert page.text_content("#final") == recs[5].final
        page.keyboard.press("r")
        page.keyboard.type("preachy and evasive")
        press(page, "Enter")
        assert page.text_content("#final") == recs[7].final
        press(page, "u")                                                # back to the queue, filters kept
        assert "3 of 12 reviewed" in page.text_content("#progress")
        assert page.input_value("select[name=category]") == "weapons"
    lines = [json.loads(x) for x in (run / "reviews.jsonl").read_text().splitlines()]
    assert [(x["target"], x["decision"], x["reviewer"]) for x in lines] == [
        ("rec00001", "accept", "alice"), ("rec00003", "edit", "alice"), ("rec00005", "reject", "alice")]
    assert lines[2]["reason"] == "preachy and evasive"
    assert main(["data", "build", str(run), "--require-review", "--test-size", "0"]) == 0
    trained = {r["prompt"][-1]["content"]: r["completion"][0]["content"] for r in rows(run, "sft")}
    assert trained == {recs[1].messages[0]["content"]: recs[1].final,
                       recs[3].messages[0]["content"]: "A careful answer, written by a person."}
    chosen = {r["chosen"][0]["content"] for r in rows(run, "dpo")}
    assert chosen == {recs[1].final, "A careful answer, written by a person."}


def test_model_text_that_is_html_renders_as_text_and_runs_nothing(tmp_path):
    run, _recs = the_run(tmp_path)
    with live(make_app(run)) as url, browser() as b:
        page = b.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in(page, url + "/review/run/items/rec00008", ALICE)
        assert page.evaluate("window.__pwned") is None
        assert page.text_content("#final") == XSS[0]                    # the tags are text
        assert page.text_content("#initial") == XSS[1]
        assert page.locator("main script").count() == 0 and page.locator("img").count() == 0
        assert page.locator("main b:has-text('bold')").count() == 0
        assert "<b>bold</b> critique" in page.text_content(".critique")
        assert "<script>" in page.text_content("#diff") and page.locator("#diff script").count() == 0
        assert page.input_value("#edit-text") == XSS[0]
        page.goto(url + "/review/run?category=xss")
        assert XSS[1] in page.text_content("#queue") and page.locator("img").count() == 0
        page.goto(url + "/review/run/items/pair-rec00001-0")
        assert page.text_content("#answer1") == XSS[0] and page.evaluate("window.__pwned") is None
        assert not errors


def test_two_reviewers_in_two_browsers_at_once_lose_neither(tmp_path):
    run, _recs = the_run(tmp_path)
    with live(make_app(run)) as url, browser() as b:
        ann, bob = b.new_context().new_page(), b.new_context().new_page()
        sign_in(ann, url + "/review/run/items/rec00000", ALICE)
        sign_in(bob, url + "/review/run/items/rec00000", BOB)
        for n in range(4):                                             # interleaved, on the same records
            press(ann, "a")
            if n == 2:
                bob.keyboard.press("r")
                bob.keyboard.type("not helpful")
                press(bob, "Enter")
            else:
                press(bob, "a")
        bob.goto(url + "/review/run")
        text = bob.text_content("#progress")
        assert "4 of 12 reviewed" in text and "reviewers disagree on 1" in text
        assert "alice | bob: 75% of 4 both reviewed" in text
    lines = [json.loads(x) for x in (run / "reviews.jsonl").read_text().splitlines()]
    assert sorted((x["reviewer"], x["target"]) for x in lines) == sorted(
        (who, f"rec{i:05d}") for who in ("alice", "bob") for i in range(4))


def test_pair_shortcuts_and_a_server_with_no_keys_asks_for_a_name(tmp_path):
    run, _recs = the_run(tmp_path)
    with live(make_app(run, keys=False)) as url, browser() as b:
        page = b.new_page()
        page.goto(url + "/review/run/items/pair-rec00000-0")
        page.wait_for_selector("body[data-ready='1']")
        assert "answer 1" in page.text_content("#ai-label")
        page.keyboard.press("f")                                       # no name yet: the page asks for one
        page.fill("#name-input", "Dana")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        page.wait_for_selector("body[data-ready='1']")
        assert "Dana" in page.text_content("#who")
        press(page, "t")                                                # the next pair: a tie
    lines = [json.loads(x) for x in (run / "reviews.jsonl").read_text().splitlines()]
    assert [(x["target"], x["decision"], x["reviewer"]) for x in lines] == [
        ("pair-rec00000-0", "flip", "Dana"), ("pair-rec00001-0", "tie", "Dana")]
