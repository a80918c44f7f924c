"""Review in Label Studio, for teams that already use it: export tasks, import their annotations as reviews.

``export_tasks`` writes Label Studio's task JSON (a list of ``{"data": {...}}``) and the labelling config that shows
it: a record as its conversation, first answer, rounds and final answer with an accept / reject / edit choice, an
edit box and a reason box; a preference pair as the two answers side by side (Label Studio's ``Pairwise`` tag, as in
its "Human Preference collection for RLHF" template) with the AI label as a note, plus tie / reject. Every task
carries the item's id and the sha256 of the content exported, so an annotation imported after the item changed is
recorded against the old content and does not apply (needs review again).

``import_annotations`` reads Label Studio's JSON export of those tasks and appends one review per annotation
(cancelled ones skipped) to ``reviews.jsonl``; the reviewer is the annotator's email (or ``label-studio:<id>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, Issue, display_path
from cai.core.preference import Preference
from cai.core.record import Record
from cai.review.store import Review, ReviewStore, preference_digest, record_digest

RECORD_CONFIG = """<View>
  <Header value="Conversation"/>
  <Text name="conversation" value="$conversation"/>
  <Header value="First answer"/>
  <Text name="initial" value="$initial"/>
  <Header value="Critiques and revisions"/>
  <Text name="rounds" value="$rounds"/>
  <Header value="Final answer (what would train)"/>
  <Text name="final" value="$final"/>
  <Choices name="decision" toName="final" choice="single" required="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
    <Choice value="edit"/>
  </Choices>
  <TextArea name="edited" toName="final" placeholder="The edited final answer (with edit)" maxSubmissions="1"/>
  <TextArea name="reason" toName="final" placeholder="Why (with reject)" maxSubmissions="1"/>
</View>
"""

PREFERENCE_CONFIG = """<View>
  <Header value="Conversation"/>
  <Text name="conversation" value="$conversation"/>
  <Header value="$question"/>
  <Text name="ai_label" value="$ai_label"/>
  <Pairwise name="preferred" toName="answer1,answer2"/>
  <Text name="answer1" value="$answer1"/>
  <Text name="answer2" value="$answer2"/>
  <Choices name="pair" toName="answer1" choice="single">
    <Choice value="tie"/>
    <Choice value="reject"/>
  </Choices>
  <TextArea name="reason" toName="answer1" placeholder="Why (optional)" maxSubmissions="1"/>
</View>
"""


def _transcript(messages: list) -> str:
    return "\n\n".join(f"{m['role'].title()}: {m['content']}" for m in messages)


def record_task(r: Record) -> dict[str, Any]:
    rounds = "\n\n".join(f"Round {i} ({x.principle})\nCritique: {x.critique}\nRevision: {x.revision}"
                         for i, x in enumerate(r.rounds, 1))
    return {"data": {"cai_kind": "record", "cai_id": r.id, "content_sha256": record_digest(r),
                     "conversation": _transcript(list(r.messages)), "initial": r.initial, "rounds": rounds,
                     "final": r.final, "flags": ", ".join(r.flags), "category": r.category or ""}}


def preference_task(p: Preference) -> dict[str, Any]:
    a, b = (x.text for x in p.responses)
    if p.label is None:
        hint = "AI label: none (unreadable)"
    else:
        hint = f"AI label: answer {1 if p.label >= 0.5 else 2} is better (p = {max(p.label, 1 - p.label):.2f})"
    return {"data": {"cai_kind": "preference", "cai_id": p.id, "content_sha256": preference_digest(p),
                     "conversation": _transcript(list(p.messages)), "answer1": a, "answer2": b, "ai_label": hint,
                     "question": "Which answer is better? (" + ", ".join(p.provenance.get("principles", [])) + ")"}}


def export_tasks(records: list[Record], preferences: list[Preference], out: Path) -> dict[str, Any]:
    """Write the tasks to ``out`` and the two labelling configs beside it; returns counts and paths."""
    from cai.core.files import write_bytes_atomic

    tasks = [record_task(r) for r in records] + [preference_task(p) for p in preferences]
    write_bytes_atomic(out, json.dumps(tasks, ensure_ascii=False, indent=1).encode("utf-8"))
    configs = {}
    for kind, xml, n in (("records", RECORD_CONFIG, len(records)), ("preferences", PREFERENCE_CONFIG,
                                                                    len(preferences))):
        if n:
            path = out.with_name(f"{out.stem}.{kind}.label_config.xml")
            write_bytes_atomic(path, xml.encode("utf-8"))
            configs[kind] = path
    return {"records": len(records), "preferences": len(preferences), "configs": configs}


@dataclass
class Imported:
    reviews: list[Review] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)     # reason → count

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def import_annotations(path: Path, store: ReviewStore, known: set[str]) -> Imported:
    """Append a review per annotation of a Label Studio export; ``known``: the ids this run has now."""
    shown = display_path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise CaiError(f"file not found: {shown}") from None
    except json.JSONDecodeError as e:
        raise CaiError(f"{shown} is not valid JSON", [Issue(f"{e.msg} (column {e.colno})", shown, e.lineno)]) from None
    if not isinstance(tasks, list):
        raise CaiError(f"{shown} is not a Label Studio export (expected a list of tasks)")
    out = Imported()
    for i, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or data.get("cai_kind") not in ("record", "preference") or not data.get(
                "cai_id") or not data.get("content_sha256"):
            raise CaiError(f"{shown}: task [{i}] was not exported by `cai review export` (no cai_id/content_sha256)")
        if data["cai_id"] not in known:
            out.skip("not in this run")
            continue
        for ann in task.get("annotations") or []:
            if not isinstance(ann, dict) or ann.get("was_cancelled"):
                out.skip("cancelled")
                continue
            review, why = _review(data, ann)
            if review is None:
                out.skip(why)
                continue
            try:
                out.reviews.append(store.append(review))
            except ValueError as e:
                out.skip(str(e))
    return out


def _review(data: dict, ann: dict) -> tuple[Review | None, str]:
    """The review an annotation records, or None and why not."""
    values: dict[str, Any] = {}
    for item in ann.get("result") or []:
        if isinstance(item, dict) and isinstance(item.get("value"), dict):
            values[item.get("from_name", "")] = item["value"]
    who = ann.get("completed_by")
    reviewer = (who.get("email") if isinstance(who, dict) else None) or f"label-studio:{who}"
    text = (values.get("edited", {}).get("text") or [None])[0]
    reason = (values.get("reason", {}).get("text") or [None])[0]
    if data["cai_kind"] == "record":
        choice = (values.get("decision", {}).get("choices") or [None])[0]
        if choice not in ("accept", "reject", "edit"):
            return None, "no decision"
        decision = choice
    else:
        pair = (values.get("pair", {}).get("choices") or [None])[0]
        selected = values.get("preferred", {}).get("selected")
        if pair in ("tie", "reject"):
            decision = pair
        elif selected in ("left", "right"):
            ai = data.get("ai_label", "")
            if "answer 1 is better" not in ai and "answer 2 is better" not in ai:
                return None, "a pair without an AI label to agree with or flip"
            decision = "accept" if (selected == "left") == ("answer 1 is better" in ai) else "flip"
        else:
            return None, "no decision"
    return Review(target=data["cai_id"], kind=data["cai_kind"], content_sha256=data["content_sha256"],
                  reviewer=str(reviewer), decision=decision, text=text, reason=reason,
                  at=str(ann.get("updated_at") or ann.get("created_at") or ""), source="label-studio"), ""
