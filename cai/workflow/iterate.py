"""``cai iterate``: self-improvement that stops itself, as a sequence of the library's own steps.

Iteration k: the policy is the model of iteration k−1 (its final adapter merged into the base; iteration 1's policy
is the base); it answers a fresh slice of the red-team prompts, and the critic (the policy itself by default, as in
the paper, or another model) critiques and revises (``gen/``). With ``--labels ai-feedback`` the policy's answers are
also paired and labelled by the base model. Then (with ``--review-gate``: once a person has reviewed them) the data of
iterations 1..k accumulate (``--replace``: k alone), always mixed with the human-written helpful prompts' answers at a
fixed ratio, and training starts from the base (``--continue-adapter``: from iteration k−1's adapter). The fixed
held-out evaluation compares the iteration's model with the base and with the previous iteration's model, paired, and
the stop rules (:mod:`cai.loop.rules`) decide whether to go on.

Everything is resumable: a stage is marked done in ``iterations/state.json`` only once it finished, and each stage
resumes its own work, so a kill anywhere costs at most the batch in flight.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.core.errors import CaiError, Issue, display_path
from cai.loop.rules import RuleState, StopSettings, check
from cai.loop.state import LoopFolder, LoopSettings, LoopState, differences
from cai.workflow.base import ModelSpec, Ui, resumable


@dataclass
class IterateResult:
    iterations: int                     # iterations finished
    stopped: list[dict] | None          # the rules that stopped the loop, with their figures
    waiting: str | None = None          # what a person must review before the loop can go on
    report: dict | None = None


def iterate(out: Path, settings: LoopSettings, iterations: int, ui: Ui | None = None, *, review_gate: bool = False,
            device: str | None = None) -> IterateResult:
    """Run (or continue) the loop in ``out`` up to ``iterations`` iterations, or until a stop rule fires."""
    from cai.loop.report import write_report

    ui = ui or Ui()
    settings.check()
    folder = LoopFolder(out)
    old = folder.read_settings()
    if old is not None:
        diffs = differences(old, settings)
        if diffs:
            raise CaiError(f"{display_path(out)} is a loop started with other settings", [Issue(d) for d in diffs],
                           hint="Run it with the settings it was started with, or choose another folder.")
    prompts = _split_prompts(folder, settings, iterations)
    folder.write_settings(settings)
    state = folder.read_state()
    state.release(settings.ignore_stops)
    folder.write_state(state)             # from the start: a loop cut in its first stage says so (nothing done)
    rules = RuleState(stalled=state.stalled)
    stop = StopSettings(settings.max_stall, settings.refusal_rise, settings.diversity_floor)
    done = 0
    for k in range(1, iterations + 1):
        if state.stopped_at is not None and state.stopped_at < k:
            break
        ui.note(f"iteration {k} of {iterations}", label="note")
        step = _Iteration(folder, settings, k, prompts[k - 1], state, ui, device, review_gate)
        waiting = step.run()
        if waiting:
            folder.write_state(state)
            return IterateResult(done, None, waiting, write_report(folder))
        if not state.is_done(k, "rules"):
            fired = check(step.report(), settings.final_stage, "prev" if k > 1 else "base", rules, stop)
            state.stalled = rules.stalled
            state.stops[str(k)] = [s.to_dict() | ({"ignored": True} if s.rule in settings.ignore_stops else {})
                                   for s in fired]
            if any(s.rule not in settings.ignore_stops for s in fired):
                state.stopped_at = k
            state.mark(k, "rules", 0.0)
            folder.write_state(state)
        done = k
        for s in state.stops.get(str(k), []):
            ui.note(f"iteration {k}: {s['rule']}: {s['message']}" + (" (ignored: --ignore-stop)" if s.get("ignored")
                                                                     else ""), label="stop")
        if state.stopped_at == k:
            break
    report = write_report(folder)
    ui.iterated(out, report)
    return IterateResult(done, state.stopped_by(), None, report)



def _split_prompts(folder: LoopFolder, s: LoopSettings, iterations: int) -> list[list]:
    """The held-out slice and one fresh slice per iteration, by a seeded order of the prompt ids (stable: adding
    iterations later takes the next slices, the earlier ones stay)."""
    from cai.core.files import write_bytes_atomic
    from cai.core.hashing import seeded_order
    from cai.core.prompt_files import load_prompts

    items = sorted(load_prompts(s.prompts).items, key=lambda it: seeded_order(s.seed, it.id))
    need = s.heldout + iterations * s.prompts_per_iteration
    if len(items) < need:
        raise CaiError(f"{display_path(s.prompts)} has {len(items)} usable prompts; {iterations} iterations of "
                       f"{s.prompts_per_iteration} and {s.heldout} held out need {need}",
                       hint="Lower --prompts-per-iteration or --heldout, or give a larger --prompts file.")

    def write(path: Path, chunk: list) -> None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": it.id, "messages": it.messages, **({"category": it.category} if it.category else {})}
                for it in chunk]
        write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())

    write(folder.heldout, items[: s.heldout])
    slices = []
    for k in range(1, iterations + 1):
        start = s.heldout + (k - 1) * s.prompts_per_iteration
        chunk = items[start:start + s.prompts_per_iteration]
        write(folder.prompts(k), chunk)
        slices.append(chunk)
    return slices


class _Iteration:
    """One iteration's stages, each skipped when the state says it is done."""

    def __init__(self, folder: LoopFolder, s: LoopSettings, k: int, items: list, state: LoopState, ui: Ui,
                 device: str | None, gate: bool):
        self.folder, self.s, self.k, self.items, self.state = folder, s, k, items, state
        self.ui, self.device, self.gate = ui, device, gate
        self.gen, self.train = folder.gen(k), folder.train(k)

    def run(self) -> str | None:
        stages: list[tuple[str, Any]] = [("generate", self._generate)]
        if self.s.labels == "ai-feedback":
            stages.append(("label", self._label))
        for name, fn in stages + [("review", self._review), ("data", self._data), ("train", self._train),
                                  ("eval", self._eval)]:
            if self.state.is_done(self.k, name):
                continue
            t0 = time.perf_counter()
            waiting = fn()
            if waiting:
                return waiting
            self.state.mark(self.k, name, time.perf_counter() - t0)
            self.folder.write_state(self.state)
        return None

    # -- the policy of this iteration: the base, or the previous iteration's model ----------------------------
    def previous_adapter(self) -> Path | None:
        if self.k == 1:
            return None
        return self.folder.train(self.k - 1) / "adapters" / self.s.final_stage

    def _backend(self, adapter: Path | None):
        from cai.backends.local import LocalBackend

        what = f"the model of iteration {self.k - 1}" if adapter else "the base model"
        with self.ui.status(f"loading {what} ..."):
            return LocalBackend(self.s.model, device=self.device, dtype=self.s.dtype,
                                adapter=str(adapter) if adapter else None)

    def _critic(self):
        c = self.s.critic
        if not c:
            return None
        if c.get("backend") == "openai":
            from cai.backends.openai import OpenAIBackend
            from cai.workflow.base import check_reachable

            check_reachable(c["base_urls"], "critic", "--critic-base-url")
            return OpenAIBackend(c["model"], base_urls=c["base_urls"], api_key_env=c.get("api_key_env",
                                                                                       "OPENAI_API_KEY"))
        from cai.backends.local import LocalBackend

        with self.ui.status(f"loading critic {c['model']} ..."):
            return LocalBackend(c["model"], device=self.device, dtype=self.s.dtype)

    # -- the stages --------------------------------------------------------------------------------------------
    def _generate(self) -> None:
        from cai.backends.base import Sampling
        from cai.core.constitution import load_constitution
        from cai.generate.runner import run_generate

        s = self.s
        policy = self._backend(self.previous_adapter())
        sampling = Sampling(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed)
        with resumable(f"finished batches are saved in {display_path(self.gen)}"), self.ui.bar() as bar:
            summary = run_generate(constitution=load_constitution(s.constitution), items=self.items, backend=policy,
                                   out=self.gen, rounds=s.rounds, sampling=sampling, batch_size=s.batch_size,
                                   progress=bar.generate(f"iteration {self.k} records"), model_source=s.model,
                                   constitution_path=s.constitution, prompts_source=str(self.folder.prompts(self.k)),
                                   critic=self._critic())
        self.ui.generated(summary, [])

    def _label(self) -> None:
        from cai.label.labeller import LabelSettings
        from cai.label.runner import LabelOptions
        from cai.workflow.label import label

        adapter = self.previous_adapter()
        opts = LabelOptions(policy=str(adapter) if adapter else "base", samples=2, max_new_tokens=self.s.max_new_tokens,
                            batch_size=self.s.batch_size, constitution=Path(self.s.constitution),
                            settings=LabelSettings(seed=self.s.seed))
        label(self.gen, opts, ModelSpec(), self.ui, device=self.device)

    def _review(self) -> str | None:
        """With the gate: wait until a person reviewed every record (and pair) of this iteration."""
        if not self.gate:
            return None
        from cai.core.preference import read_preferences
        from cai.core.record import read_records
        from cai.review.decisions import resolve
        from cai.review.store import ReviewStore, preference_digest, record_digest
        from cai.run import RunFolder

        run = RunFolder(self.gen)
        digests = {r.id: record_digest(r) for r in read_records(run.records)}
        if run.preferences.exists():
            digests.update({p.id: preference_digest(p) for p in read_preferences(run.preferences)})
        outcomes = resolve(ReviewStore(run.reviews).read(), digests)
        todo = sum(not o.reviewed for o in outcomes.values())
        if todo:
            return (f"iteration {self.k} waits for review: {todo} of {len(outcomes)} items not reviewed (or changed "
                    f"since) in {display_path(self.gen)}. Review them with `cai review {display_path(self.gen)}`, "
                    "then run the same `cai iterate` command again to continue.")
        return None

    def _data(self) -> None:
        from cai.data.build import BuildOptions
        from cai.loop.data import assemble
        from cai.workflow.steps import build_data

        sources = [self.folder.gen(j) for j in (range(1, self.k + 1) if self.s.accumulate else [self.k])]
        assemble(self.train, sources, self.folder.train(self.k - 1) if self.k > 1 else None,
                 preferences=self.s.labels == "ai-feedback")
        opts = BuildOptions(helpful_mix=self.s.helpful_mix, test_size=0.1, allow_flags=self.s.allow_flags,
                            seed=self.s.seed, helpful_prompts=self.s.helpful_prompts,
                            preferences=self.s.labels == "ai-feedback", require_review=self.gate)
        build_data(self.train, opts, self.ui, device=self.device)

    def _train(self) -> None:
        from cai.workflow.demo import DEMO_DPO_RECIPE, demo_train_flags
        from cai.workflow.steps import train_stage

        s, prev = self.s, self.previous_adapter()
        if "sft" in s.method:
            flags = demo_train_flags(s.train_steps)
            if s.continue_adapter and prev is not None and s.final_stage == "sft":
                flags += ["--sft_adapter", str(prev)]
            train_stage("sft", self.train, self.ui, flags=flags)
        if "dpo" in s.method:
            flags = demo_train_flags(s.dpo_steps)
            if s.method == "dpo":              # a fresh adapter on the base: the reference is the base (iteration 0)
                flags += ["--require_sft_adapter", "false"]
                if s.continue_adapter and prev is not None:
                    flags += ["--sft_adapter", str(prev)]
            config = DEMO_DPO_RECIPE if s.labels == "ai-feedback" else None
            train_stage("dpo", self.train, self.ui, config=config, flags=flags)

    def _eval(self) -> None:
        from cai.evaluation.plan import EvalOptions
        from cai.workflow.steps import evaluate

        s, prev = self.s, self.previous_adapter()
        adapters = [x for x in ("sft", "dpo") if x in s.method]
        if prev is not None:                   # the previous iteration's model, compared with this one, paired
            target = self.train / "adapters" / "prev"
            if not (target / "manifest.json").exists():
                shutil.copytree(prev, target, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
            adapters.append("prev")
        opts = EvalOptions(red_team=s.heldout, helpful=s.eval_helpful, records=s.eval_records,
                           max_new_tokens=s.eval_max_new_tokens, prompts=str(self.folder.heldout),
                           helpful_prompts=s.helpful_prompts, adapters=tuple(adapters), seed=s.seed,
                           batch_size=s.batch_size, dtype=s.dtype, compare_to=("prev",) if prev else ())
        evaluate(self.train, opts, self.ui, device=self.device)

    def report(self) -> dict:
        import json

        return json.loads((self.train / "eval" / "report.json").read_text(encoding="utf-8"))

