"""The self-improvement loop's folder: its settings (``loop.json``), its progress (``iterations/state.json``) and
the prompts each iteration answers.

::

    RUN/loop.json                   the settings the loop was started with (a later run must match them)
    RUN/heldout.jsonl               the red-team prompts of the fixed evaluation (never generated on, never trained)
    RUN/iterations/state.json       per iteration: the stages done (and how long each took), the stop rules' state
    RUN/iterations/<k>/prompts.jsonl   the prompts iteration k answers (a fresh slice each iteration)
    RUN/iterations/<k>/gen/         a run folder: iteration k's records (its policy answers, the critic revises),
                                    preferences (with AI-feedback labels), reviews
    RUN/iterations/<k>/train/       a run folder: the training view: records, preferences and reviews of iterations
                                    1..k (accumulated; k alone with --replace), lineage.json, data/, adapters/,
                                    adapters/prev (the previous iteration's model, for the paired comparison), eval/
    RUN/iterations/report.{json,html}   the figures of every iteration side by side

Every file is replaced atomically; a stage is marked done only after it finished, so a kill anywhere resumes at the
stage it stopped in (each stage resumes its own work: records, readings, checkpoints, answers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, RunFolderError, display_path
from cai.core.files import write_json_atomic

METHODS = ("sft", "dpo", "sft+dpo")
LABELS = ("revisions", "ai-feedback")
STAGES = ("generate", "label", "review", "data", "train", "eval", "rules")


@dataclass
class LoopSettings:
    """What the loop does each iteration; fixed when the loop starts (``loop.json``)."""

    model: str = "default"
    constitution: str = ""                # the file (absolute)
    prompts: str = ""                     # the red-team prompt file the slices come from (absolute)
    helpful_prompts: str = "helpful"
    method: str = "sft"
    labels: str = "revisions"
    accumulate: bool = True
    continue_adapter: bool = False
    prompts_per_iteration: int = 16
    heldout: int = 16
    helpful_mix: float = 0.25
    allow_flags: tuple[str, ...] = ("truncated",)
    rounds: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 16
    train_steps: int = 8
    dpo_steps: int = 8
    eval_helpful: int = 16
    eval_records: int = 16
    eval_max_new_tokens: int = 96
    dtype: str | None = None
    critic: dict[str, Any] | None = None  # {"backend", "model", "base_urls"}: None = the policy critiques itself
    max_stall: int = 1
    refusal_rise: float = 0.10
    diversity_floor: float = 0.8
    ignore_stops: tuple[str, ...] = ()     # rules reported when they fire, but the loop goes on

    def check(self) -> None:
        if self.method not in METHODS:
            raise CaiError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.labels not in LABELS:
            raise CaiError(f"--labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        if self.labels == "ai-feedback" and self.method == "sft":
            raise CaiError("--labels ai-feedback labels preference pairs: it needs --method dpo or sft+dpo")
        for name in ("prompts_per_iteration", "heldout", "batch_size", "train_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise CaiError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        from cai.loop.rules import RULES

        unknown = [r for r in self.ignore_stops if r not in RULES]
        if unknown:
            raise CaiError(f"--ignore-stop: no stop rule {', '.join(map(repr, unknown))}",
                           hint=f"The rules are {', '.join(RULES)}.")
        if self.max_stall < 0:
            raise CaiError(f"--max-violation-drop-stall must be at least 0, got {self.max_stall}")

    @property
    def final_stage(self) -> str:
        """The adapter an iteration ends with: its model."""
        return "dpo" if "dpo" in self.method else "sft"


# settings a later `cai iterate` may change without starting again
CHANGEABLE = ("max_stall", "refusal_rise", "diversity_floor", "ignore_stops")


@dataclass
class LoopState:
    """``iterations/state.json``: per iteration, the stages done and their seconds; the stop rules' carry-over."""

    done: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    stalled: int = 0
    stops: dict[str, list[dict]] = field(default_factory=dict)     # iteration -> the rules that fired
    stopped_at: int | None = None

    def stopped_by(self) -> list[dict] | None:
        """The rules that stopped the loop (those it was told to ignore left out), or None when it did not stop."""
        if self.stopped_at is None:
            return None
        return [s for s in self.stops.get(str(self.stopped_at), []) if not s.get("ignored")]

    def release(self, ignore: tuple[str, ...]) -> None:
        """A loop that stopped only on rules now ignored goes on: they are marked ignored, the stop is lifted."""
        stops = self.stops.get(str(self.stopped_at), []) if self.stopped_at is not None else []
        if stops and all(s["rule"] in ignore for s in stops):
            for s in stops:
                s["ignored"] = True
            self.stopped_at = None

    def is_done(self, k: int, stage: str) -> bool:
        return stage in self.done.get(str(k), [])

    def mark(self, k: int, stage: str, seconds: float) -> None:
        self.done.setdefault(str(k), [])
        if stage not in self.done[str(k)]:
            self.done[str(k)].append(stage)
        self.seconds.setdefault(str(k), {})[stage] = round(seconds, 1)


class LoopFolder:
    """The paths of a loop folder and its two state files."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def settings_file(self) -> Path:
        return self.root / "loop.json"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.jsonl"

    @property
    def iterations(self) -> Path:
        return self.root / "iterations"

    @property
    def state_file(self) -> Path:
        return self.iterations / "state.json"

    def iteration(self, k: int) -> Path:
        return self.iterations / str(k)

    def gen(self, k: int) -> Path:
        return self.iteration(k) / "gen"

    def train(self, k: int) -> Path:
        return self.iteration(k) / "train"

    def prompts(self, k: int) -> Path:
        return self.iteration(k) / "prompts.jsonl"

    def read_settings(self) -> LoopSettings | None:
        if not self.settings_file.exists():
            return None
        try:
            data = json.loads(self.settings_file.read_text(encoding="utf-8"))
            data["allow_flags"] = tuple(data.get("allow_flags", ()))
            data["ignore_stops"] = tuple(data.get("ignore_stops", ()))
            return LoopSettings(**data)
        except (ValueError, TypeError) as e:
            raise RunFolderError(f"{display_path(self.settings_file)} is unreadable ({e})",
                                 hint="It was not written by cai iterate; choose another folder.") from None

    def write_settings(self, s: LoopSettings) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.settings_file, asdict(s))

    def read_state(self) -> LoopState:
        if not self.state_file.exists():
            return LoopState()
        try:
            return LoopState(**json.loads(self.state_file.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise RunFolderError(f"{display_path(self.state_file)} is unreadable ({e})",
                                 hint="Delete it to go through every stage again (finished work is reused).") from None

    def write_state(self, st: LoopState) -> None:
        self.iterations.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, asdict(st))


def differences(old: LoopSettings, new: LoopSettings) -> list[str]:
    """Settings that differ between the loop's start and now (other than those a rerun may change)."""
    a, b = asdict(old), asdict(new)
    return [f"{k}: {a[k]!r} when the loop started, {b[k]!r} now" for k in a if k not in CHANGEABLE and a[k] != b[k]]
