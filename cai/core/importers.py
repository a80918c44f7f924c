"""Constitutions in the public formats, turned into ours.

- Hugging Face's llm-swarm JSON (:func:`import_hf`): critique/revision pairs and six-turn few-shot conversations.
- The CAI paper's CritiqueRevisionInstructions JSON (:func:`import_anthropic`).
- The CAI paper's RL-phase files (:func:`import_anthropic_rl`): the multiple-choice principles
  (``RLMadisonInstructions.json``: a list of strings ending "Options:"), the few-shot comparisons
  (``RLMadisonFewShotPrompts.json``: ``{prompt, corrects, incorrects}``) and, optionally, the chain-of-thought
  few-shots (``RLMadisonPrecogFewShotPrompts.json``: whole worked examples with a ``{}`` for the principle).

Each reads JSON within the size limit of :mod:`cai.core.safe_yaml` and validates the result like a YAML file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cai.core.constitution import ID_PATTERN, Constitution, constitution_from_data
from cai.core.errors import ConstitutionError, Issue, display_path
from cai.core.safe_yaml import refuse_oversized


def _read_json(path: Path) -> Any:
    shown = display_path(path)
    if not path.exists():
        raise ConstitutionError(f"file not found: {shown}")
    refuse_oversized(path, shown, "file to import")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConstitutionError(f"{shown} is nested too deeply to be a constitution") from None
    except json.JSONDecodeError as e:
        raise ConstitutionError(f"{shown} is not valid JSON",
                                [Issue(f"{e.msg} (column {e.colno})", shown, e.lineno)]) from None
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"{shown} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _import_name(path: Path, name: str | None) -> str:
    if name:
        return name
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "imported"
    return slug if re.match(ID_PATTERN, slug) else f"c-{slug}"


def import_hf(path: str | Path, name: str | None = None) -> Constitution:
    """Hugging Face llm-swarm format: ``{"constitutions": [{"critic", "revision"}], "system_chat": [[msg...]]}``.

    Each ``system_chat`` conversation is a few-shot example of six turns: user prompt, assistant response, user
    critique request, assistant critique, user revision request, assistant revision. Its critique request is matched
    to a principle by text, so the exemplar keeps naming the principle it illustrates.
    """
    path = Path(path)
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("constitutions"), list):
        raise ConstitutionError(f"cannot import {shown}",
                                [Issue("expected an object with a 'constitutions' list of {critic, revision}", shown)])
    principles = []
    by_text: dict[str, str] = {}
    issues: list[Issue] = []
    for i, item in enumerate(data["constitutions"]):
        if not isinstance(item, dict) or not isinstance(item.get("critic"), str) \
                or not isinstance(item.get("revision"), str):
            issues.append(Issue("each entry needs string fields 'critic' and 'revision'", shown, None,
                                f"constitutions[{i}]"))
            continue
        pid = f"hf-{i + 1:02d}"
        principles.append({"id": pid, "critique": item["critic"], "revision": item["revision"]})
        by_text.setdefault(item["critic"].strip(), pid)
    exemplars = []
    for i, convo in enumerate(data.get("system_chat") or []):
        where = f"system_chat[{i}]"
        if not isinstance(convo, list) or len(convo) != 6 or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in convo):
            issues.append(Issue("expected 6 messages: prompt, response, critique request, critique, "
                                "revision request, revision", shown, None, where))
            continue
        roles = [m.get("role") for m in convo]
        if roles != ["user", "assistant"] * 3:
            issues.append(Issue(f"roles must alternate user/assistant, got {roles}", shown, None, where))
            continue
        texts = [m["content"] for m in convo]
        # the example keeps its own requests, word for word: editing a principle later does not change it
        exemplars.append({"prompt": texts[0], "response": texts[1], "critique": texts[3], "revision": texts[5],
                          "principle": by_text.get(texts[2].strip()), "critique_request": texts[2],
                          "revision_request": texts[4]})
    if issues:
        raise ConstitutionError(f"cannot import {shown}", issues)
    return constitution_from_data({"name": _import_name(path, name), "version": "1",
                       "description": f"Imported from {path.name} (Hugging Face llm-swarm format).",
                       "principles": principles, "exemplars": exemplars}, shown)


def import_anthropic(path: str | Path, name: str | None = None) -> Constitution:
    """The CAI paper's CritiqueRevisionInstructions format: ``{"harmful0": {"prompt": [str], "edit_request": str}}``."""
    path = Path(path)
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise ConstitutionError(f"cannot import {shown}",
                                [Issue('expected an object like {"harmful0": {"prompt": [...], "edit_request": ...}}',
                                       shown)])
    principles: list[dict[str, str]] = []
    issues: list[Issue] = []
    for key, item in data.items():
        prompt = item.get("prompt") if isinstance(item, dict) else None
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt) \
                or not isinstance(item.get("edit_request"), str):
            issues.append(Issue("needs 'prompt' (a list of critique requests) and 'edit_request' (a string)",
                                shown, None, str(key)))
            continue
        pid = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key)).strip("-.") or f"p{len(principles)}"
        # the paper's files hold one critique request per entry; several are kept together, in order
        principles.append({"id": pid, "critique": "\n".join(p.strip() for p in prompt),
                           "revision": item["edit_request"].strip()})
    if issues:
        raise ConstitutionError(f"cannot import {shown}", issues)
    return constitution_from_data({"name": _import_name(path, name), "version": "1",
                       "description": f"Imported from {path.name} (CAI paper CritiqueRevisionInstructions format).",
                       "principles": principles}, shown)


# ---------------------------------------------------------------------------------------------------------------
# The RL phase's files

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|H|A):", re.S)
_OPTION = re.compile(r"\((A|B)\) \[\[\[(.*?)\]\]\]", re.S)
_COT_ANSWER = re.compile(r"So the answer is:\s*\((A|B)\)")


def _turns(text: str, shown: str, where: str) -> list[dict[str, str]]:
    """``\n\nHuman: ...\n\nAssistant: ...`` (or ``H:``/``A:``) as chat messages; the trailing empty assistant turn
    of a prompt is dropped. A conversation must end with the human's turn."""
    parts = _TURN.split(text)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker in ("Human", "H") else "assistant"
        if content.strip():
            messages.append({"role": role, "content": content.strip()})
    if not messages or messages[-1]["role"] != "user":
        raise ConstitutionError(f"cannot import {shown}", [Issue(
            "expected a conversation in the paper's form (Human: ... Assistant: ...) ending with the human's turn",
            shown, None, where)])
    return messages


def _rl_principles(path: Path) -> list[dict[str, str]]:
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, list) or not data or not all(isinstance(x, str) for x in data):
        raise ConstitutionError(f"cannot import {shown}",
                                [Issue("expected a JSON list of principle strings (RLMadisonInstructions.json)",
                                       shown)])
    out = []
    for i, text in enumerate(data):
        if not text.strip():
            raise ConstitutionError(f"cannot import {shown}", [Issue("an empty principle", shown, None, f"[{i}]")])
        out.append({"id": f"rl-{i + 1:02d}", "text": " ".join(text.split())})
    return out


def _rl_fewshots(path: Path) -> list[dict[str, Any]]:
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ConstitutionError(f"cannot import {shown}", [Issue(
            "expected a JSON list of {prompt, corrects, incorrects} (RLMadisonFewShotPrompts.json)", shown)])
    out = []
    for i, item in enumerate(data):
        where = f"[{i}]"
        ok = isinstance(item, dict) and isinstance(item.get("prompt"), str) and all(
            isinstance(item.get(k), list) and item[k] and all(isinstance(x, str) and x.strip() for x in item[k])
            for k in ("corrects", "incorrects"))
        if not ok:
            raise ConstitutionError(f"cannot import {shown}", [Issue(
                "needs 'prompt' (a string) and non-empty 'corrects' and 'incorrects' (lists of strings)", shown,
                None, where)])
        messages = _turns(item["prompt"], shown, where)
        for better, worse in zip(item["corrects"], item["incorrects"]):   # one comparison per pair of answers
            out.append({**_conversation_field(messages), "better": better.strip(), "worse": worse.strip()})
    return out


def _rl_cot_fewshots(path: Path) -> list[dict[str, Any]]:
    shown = display_path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise ConstitutionError(f"cannot import {shown}", [Issue(
            "expected a JSON list of {prompt} worked examples (RLMadisonPrecogFewShotPrompts.json)", shown)])
    out = []
    for i, item in enumerate(data):
        where = f"[{i}]"
        text = item.get("prompt") if isinstance(item, dict) else None
        parsed = _parse_cot(text) if isinstance(text, str) else None
        if parsed is None:
            raise ConstitutionError(f"cannot import {shown}", [Issue(
                "expected the paper's worked example: the conversation, {} for the principle, (A) [[[...]]] and "
                "(B) [[[...]]], \"Let's think step by step:\" and \"So the answer is: (A)\" or (B)", shown, None,
                where)])
        convo, options, reasoning, answer = parsed
        messages = _turns("\n\n" + convo, shown, where)
        other = "B" if answer == "A" else "A"
        out.append({**_conversation_field(messages), "better": options[answer], "worse": options[other],
                    "reasoning": reasoning, "better_option": answer})
    return out


def _parse_cot(text: str) -> tuple[str, dict[str, str], str, str] | None:
    head, sep, rest = text.partition("{}")
    intro = re.search(r"between a human(?: \(H\))? and an assistant(?: \(A\))?:\s*", head)
    options = dict(_OPTION.findall(rest))
    answer = _COT_ANSWER.search(rest)
    think = re.search(r"Let's think step by step:\s*(.*?)\s*(?:\n\nHuman:|$)", rest, re.S)
    if not (sep and intro and set(options) == {"A", "B"} and answer and think and think.group(1).strip()):
        return None
    return (head[intro.end():], {k: v.strip() for k, v in options.items()}, think.group(1).strip(),
            answer.group(1))


def _conversation_field(messages: list[dict[str, str]]) -> dict[str, Any]:
    if len(messages) == 1:
        return {"prompt": messages[0]["content"]}
    return {"messages": messages}


def import_anthropic_rl(principles: str | Path, fewshot: str | Path | None = None, cot: str | Path | None = None,
                        name: str | None = None) -> Constitution:
    """A constitution for labelling (preference principles and exemplars only) from the paper's RL-phase files."""
    principles = Path(principles)
    exemplars = []
    if fewshot is not None:
        exemplars += _rl_fewshots(Path(fewshot))
    if cot is not None:
        exemplars += _rl_cot_fewshots(Path(cot))
    sources = ", ".join(Path(p).name for p in (principles, fewshot, cot) if p is not None)
    return constitution_from_data({"name": _import_name(principles, name), "version": "1",
                                   "description": f"Imported from {sources} (CAI paper RL-phase format).",
                                   "preference_principles": _rl_principles(principles),
                                   "preference_exemplars": exemplars}, display_path(principles))
