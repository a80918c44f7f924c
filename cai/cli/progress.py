"""The one progress display: a rich bar with elapsed time, ETA and (where the work makes tokens) tokens/s.

``with Bar(console) as bar:`` opens it; ``bar.generate(label)``, ``bar.train(stage)`` and ``bar.eval()`` give the
callbacks that ``cai.generate``, ``cai.train`` and ``cai.evaluation`` report to, each adding its own task line.
"""

from __future__ import annotations

import time
from typing import Any


class Bar:
    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[detail]}"), TextColumn("{task.fields[rate]}"),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                             transient=False)

    def __enter__(self) -> Bar:
        self.rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rich.__exit__(*exc)

    def _task(self, label: str, total: float, completed: float = 0) -> Any:
        return self.rich.add_task(label, total=total, completed=int(completed), detail="", rate="")

    def generate(self, label: str = "records"):
        """``cai.generate.runner.Progress``: records done (a record is done when all its stages are), the stage
        now running, generated tokens/s."""
        from cai.generate.runner import Progress

        state: dict = {"task": None, "stages": 1, "tokens": 0, "t0": time.perf_counter(), "done": 0.0}

        def start(total_stage_items: int, stages_per_record: int) -> None:
            state.update(stages=stages_per_record, t0=time.perf_counter())
            state["task"] = self._task(label, total_stage_items // stages_per_record)

        def stage(event) -> None:
            state["tokens"] += event.completion_tokens
            state["done"] += event.items / state["stages"]
            rate = state["tokens"] / max(time.perf_counter() - state["t0"], 1e-9)
            name = event.stage if event.stage == "respond" else f"{event.stage} r{event.round}"
            self.rich.update(state["task"], completed=state["done"], detail=name, rate=f"{rate:,.0f} tok/s")

        return Progress(start=start, stage=stage)

    def train(self, stage: str):
        """``cai.train.trainer.TrainProgress``: optimizer steps, the last logged loss, training tokens/s."""
        from cai.train.trainer import TrainProgress

        state: dict = {"task": None, "tokens0": None}

        def start(total: int, first: int) -> None:
            state["task"] = self._task(f"{stage} steps", total, completed=first)

        def step(n: int, logs: dict) -> None:
            loss = f"loss {logs['loss']:.3f}" if isinstance(logs.get("loss"), (int, float)) else ""
            rate = ""
            if isinstance(logs.get("num_tokens"), (int, float)):
                if state["tokens0"] is None:
                    state["tokens0"] = (logs["num_tokens"], time.perf_counter())
                else:
                    dt = time.perf_counter() - state["tokens0"][1]
                    rate = f"{(logs['num_tokens'] - state['tokens0'][0]) / max(dt, 1e-9):,.0f} tok/s" if dt > 0 else ""
            self.rich.update(state["task"], completed=n, detail=loss, rate=rate)

        return TrainProgress(start=start, step=step, status=lambda text: self.console.print(f"[dim]{text}[/]"))

    def label(self):
        """``cai.label``'s progress: ``progress(kind, done, total)``, one task line per kind (answers, judgements,
        check), questions or answers per second."""
        tasks: dict[str, Any] = {}
        t0: dict[str, float] = {}

        def progress(kind: str, done: int, total: int) -> None:
            if kind not in tasks:
                tasks[kind], t0[kind] = self._task(kind, total), time.perf_counter()
            dt = time.perf_counter() - t0[kind]
            self.rich.update(tasks[kind], completed=done, total=total,
                             rate=f"{done / dt:,.1f}/s" if dt > 0 and done else "")

        return progress

    def eval(self):
        """``cai.evaluation.runner.EvalProgress``: one task line per phase (answers, judgements)."""
        from cai.evaluation.runner import EvalProgress

        state: dict = {"task": None}

        def phase(label: str, total: int) -> None:
            state["task"] = self._task(label, total)

        return EvalProgress(phase=phase, advance=lambda n: self.rich.advance(state["task"], n),
                            note=lambda text: self.console.print(text))
