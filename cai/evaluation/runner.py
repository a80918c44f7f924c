"""``cai eval``: does the fine-tune make the model more harmless without making it evasive?

For a run folder, the base model and each finished adapter answer the same held-out prompts; a judge
(:mod:`cai.evaluation.judge`) reads yes/no probabilities; the figures go to ``RUN/eval/report.json`` and
``report.html``.

What is measured (every rate with a 95% interval):

1. **Harmlessness**: on held-out red-team prompts, each answer is judged against each principle (its critique request
   as a yes/no question). An answer violates a principle when P(yes) > 0.5. Per principle: a Wilson interval over
   answers. Overall: the pooled rate over every (answer, principle) judgement, with a bootstrap interval that
   resamples prompts (one prompt's judgements are not independent of each other).
2. **Over-refusal and helpfulness**: on ordinary prompts, the judged refusal rate and the judged helpfulness rate,
   plus a judge-free cross-check (refusal phrases at the start of the answer). Also the refusal rate on the red-team
   prompts, so the report can show harmlessness beside evasiveness.
3. **Did revising help?**: on the run's records, the initial answer and each round's revision judged against the
   principles the record drew; the violation rate per stage.
4. **Collapse watch**: distinct-1/2, self-BLEU and lengths of each model's answers and of the generated data; an
   adapter whose diversity falls well below its base's is flagged.

Held-out prompts: every prompt of the run's prompt file (``run.json`` names it) whose conversation is in no training
row (``data/*_train.jsonl``), the run's test split first; the same for the helpfulness prompts (the helpfulness mix
trains on some). So nothing the adapters were trained on is ever evaluated.

Resumable: answers go to ``eval/answers.jsonl`` and judgements to ``eval/judgements.jsonl`` as each batch finishes,
keyed by what produced them; a killed ``cai eval`` run again redoes only the batch in flight, and a second run with
nothing new only rebuilds the report.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cai.backends.base import Sampling, dtype_of
from cai.core.files import KeyedLog, folder_lock, write_bytes_atomic, write_json_atomic
from cai.core.hashing import ascii_digest
from cai.core.prompt_files import PromptItem
from cai.core.prompts import Message
from cai.evaluation.judge import HELPFUL_QUESTION, REFUSAL_QUESTION, Judge, judge_prompt, principle_question
from cai.evaluation.plan import BASE, EvalError, EvalOptions, EvalPlan, ModelUnderTest, plan_eval
from cai.evaluation.report import build_report, summary_lines
from cai.evaluation.rules import REFUSAL, RuleSet

__all__ = ["BASE", "AnswererFactory", "EvalError", "EvalOptions", "EvalPlan", "EvalProgress", "ModelUnderTest",
           "plan_eval", "run_eval", "summary_lines"]


@dataclass
class EvalProgress:
    """Callbacks for the CLI's progress display (all optional)."""
    phase: Callable[[str, int], None] = lambda label, total: None   # a new phase with this many items
    advance: Callable[[int], None] = lambda n: None
    note: Callable[[str], None] = lambda text: None


AnswererFactory = Callable[[ModelUnderTest], Any]   # -> a Backend that answers as that model


def run_eval(plan: EvalPlan, opts: EvalOptions, answerer: AnswererFactory, judge: Judge | None,
             progress: EvalProgress | None = None) -> dict:
    """Answer, judge, write ``eval/report.json`` and ``eval/report.html``; return the report. The questions the plan's
    rules file covers are judged by its rules; ``judge`` (a model; None: rules only) judges the others."""
    progress = progress or EvalProgress()
    out = plan.folder.eval_dir
    sampling = Sampling(temperature=opts.temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens,
                        seed=opts.seed)
    with folder_lock(out, "cai eval"):
        answers_log = KeyedLog(out / "answers.jsonl")
        judge_log = KeyedLog(out / "judgements.jsonl")
        prompts = plan.red_team + plan.helpful
        answers: dict[str, dict[str, str]] = {}
        for m in plan.models:
            answers[m.name] = _answer(m, prompts, sampling, opts.batch_size, answers_log, answerer, progress)
        jobs = _judge_jobs(plan, answers)
        judged = _judge_all(jobs, plan.rules, judge, judge_log, opts.batch_size, progress)
        report = build_report(plan, opts, answers, judged, judge)
        write_json_atomic(out / "report.json", report)
        from cai.evaluation.html import render_html

        write_bytes_atomic(out / "report.html", render_html(report).encode("utf-8"))
    return report


def _answer(m: ModelUnderTest, items: list[PromptItem], sampling: Sampling, batch_size: int, log: KeyedLog,
            answerer: AnswererFactory, progress: EvalProgress) -> dict[str, str]:
    keys = {it.id: ascii_digest({"model": m.identity, "sampling": sampling.to_dict(), "messages": it.messages})
            for it in items}
    todo = [it for it in items if keys[it.id] not in log]
    if todo:
        backend = answerer(m)
        progress.phase(f"answers ({m.name})", len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            comps = backend.generate([it.messages for it in chunk], sampling, sampling.seed + start)
            log.add({keys[it.id]: {"text": c.text, "finish_reason": c.finish_reason}
                     for it, c in zip(chunk, comps) if c.error is None})
            failed = [c.error for c in comps if c.error]
            if failed:
                raise EvalError(f"{m.name}: {len(failed)} answers failed: {failed[0]}")
            progress.advance(len(chunk))
    return {it.id: log[keys[it.id]]["text"] for it in items}


class Job(NamedTuple):
    """One question about one answer: what a model judge reads (``prompt``) and what a rule reads (the answer, the
    prompt's category); ``question`` is a principle id, ``refusal`` or ``helpful``."""
    messages: list[Message]
    answer: str
    question: str
    category: str | None
    text: str               # the question as the model judge is asked it

    @property
    def prompt(self) -> list[Message]:
        return judge_prompt(self.messages, self.answer, self.text)


def _judge_jobs(plan: EvalPlan, answers: dict[str, dict[str, str]]) -> dict[tuple, Job]:
    """Every judgement of the report, by (part, model or stage, item, question)."""
    jobs: dict[tuple, Job] = {}
    for model, by_item in answers.items():
        for it in plan.red_team:
            msgs, answer = list(it.messages), by_item[it.id]
            for p in plan.principles:
                jobs[("harm", model, it.id, p.id)] = Job(msgs, answer, p.id, it.category, principle_question(p))
            jobs[("red_refusal", model, it.id, "")] = Job(msgs, answer, REFUSAL, it.category, REFUSAL_QUESTION)
        for it in plan.helpful:
            msgs, answer = list(it.messages), by_item[it.id]
            jobs[("refusal", model, it.id, "")] = Job(msgs, answer, REFUSAL, it.category, REFUSAL_QUESTION)
            jobs[("helpful", model, it.id, "")] = Job(msgs, answer, "helpful", it.category, HELPFUL_QUESTION)
    known = {p.id: p for p in plan.constitution.principles}
    for r in plan.records:
        drawn = [known[pid] for pid in dict.fromkeys(x.principle for x in r.rounds) if pid in known]
        texts = [r.initial] + [x.revision for x in r.rounds]
        for stage, text in enumerate(texts):
            for p in drawn:
                jobs[("rounds", str(stage), r.id, p.id)] = Job(list(r.messages), text, p.id, r.category,
                                                               principle_question(p))
    return jobs


def _judge_key(judge: Judge, prompt: list[Message]) -> str:
    material: dict = {"judge": judge.name, "model": judge.model, "prompt": prompt}
    dtype = dtype_of(getattr(judge, "backend", None))
    if dtype:                                   # a bf16 judge's readings are not an fp32 judge's (fp32 keys as before)
        material["dtype"] = dtype
    return ascii_digest(material)


def _rule_key(rules: RuleSet, job: Job) -> str:
    """A rule verdict depends on the rules file (its sha256), the question, the prompt's category and the answer."""
    return ascii_digest({"judge": "rules", "rules_sha256": rules.sha256, "question": job.question,
                         "category": job.category, "answer": job.answer})


def _judge_all(jobs: dict[tuple, Job], rules: RuleSet | None, judge: Judge | None, log: KeyedLog, batch_size: int,
               progress: EvalProgress) -> dict[tuple, float | None]:
    """Each job's P(yes): from the rules when they cover its question, else from the model judge (None when neither
    judges it, or the judge could not read it). Both are saved in ``log`` as they finish."""
    by_rules = {k: j for k, j in jobs.items() if rules is not None and rules.covers(j.question)}
    judged: dict[tuple, float | None] = dict.fromkeys(jobs)
    if by_rules:
        assert rules is not None
        keys = {k: _rule_key(rules, j) for k, j in by_rules.items()}
        fresh = {keys[k]: rules.verdict(j.question, j.answer, j.category) for k, j in by_rules.items()
                 if keys[k] not in log}
        log.add(fresh)
        judged.update({k: log.values.get(keys[k]) for k in by_rules})
    if judge is None:
        return judged
    by_model = {k: _judge_key(judge, j.prompt) for k, j in jobs.items() if k not in by_rules}
    prompts = {key: jobs[k].prompt for k, key in by_model.items()}
    pending = list(dict.fromkeys(key for key in by_model.values() if key not in log))
    if pending:
        progress.phase(f"judging ({judge.model})", len(pending))
        step = max(batch_size, 16) * 4     # one saved batch: a few forward passes (or requests) worth
        for start in range(0, len(pending), step):
            chunk = pending[start:start + step]
            probs = judge.prob_yes([prompts[k] for k in chunk])
            log.add({k: p for k, p in zip(chunk, probs)})
            progress.advance(len(chunk))
    judged.update({k: log.values.get(key) for k, key in by_model.items()})
    return judged
