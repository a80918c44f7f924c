"""Constitutions in the public formats, turned into ours.

- Hugging Face's llm-swarm JSON (:func:`import_hf`): critique/revision pairs and six-turn few-shot conversations.
- The CAI paper's CritiqueRevisionInstructions JSON (:func:`import_anthropic`).

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
