"""``cai iterate``: the self-improvement loop (generate → label? → review? → data → train → eval → stop rules),
each iteration from the previous one's model, until ``--iterations`` or a stop rule."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cai.cli.options import add_options, option, parsed
from cai.resources import DEFAULT_CONSTITUTION, HELPFUL, RED_TEAM

HELP = ("self-improvement that stops itself: each iteration trains on its own critiqued and revised answers (from "
        "the previous iteration's model), evaluated against the base and the previous iteration, until a stop rule "
        "fires")


@dataclass
class IterateArgs:
    run: Path = option(None, "the loop folder, e.g. runs/loop (created, or continued)", positional=True)
    iterations: int = option(3, "iterations to reach (a finished loop can be extended; default: %(default)s)")
    method: str = option("sft", "what each iteration trains (default: %(default)s)", choices=["sft", "dpo", "sft+dpo"])
    labels: str = option("revisions", "DPO pairs: revisions (revision beats initial answer) or ai-feedback (pairs of "
                                      "the policy's answers labelled by the base model; needs dpo) (default: "
                                      "%(default)s)", choices=["revisions", "ai-feedback"])
    replace: bool = option(False, "train each iteration on its own data alone (default: accumulate iterations 1..k, "
                                  "which bounds collapse)")
    continue_adapter: bool = option(False, "continue the previous iteration's adapter (default: train from the "
                                           "base each iteration)")
    review_gate: bool = option(False, "wait for a person to review each iteration's records before it trains "
                                      "(the command says what waits and exits; run it again to continue)")
    max_violation_drop_stall: int = option(1, "stop once this many iterations in a row did not lower violations "
                                              "(paired test) and one more did not either (default: %(default)s)")
    max_refusal_rise: float = option(0.10, "stop when ordinary prompts are refused this much more than by the base "
                                           "(paired; default: %(default)s)")
    diversity_floor: float = option(0.8, "stop when 2 of 3 diversity measures fall below this fraction of the "
                                         "base's (default: %(default)s)")
    model: str = option("default", "the base model (default: %(default)s, the offline SmolLM2-135M-Instruct)")
    constitution: str = option(DEFAULT_CONSTITUTION, "a constitution file or a shipped one by name "
                                                     "(default: %(default)s)")
    prompts: str = option(RED_TEAM, "red-team prompts, a file or a shipped set (default: %(default)s)")
    helpful_prompts: str = option(HELPFUL, "human-written helpful prompts mixed in every iteration (default: "
                                           "%(default)s)")
    prompts_per_iteration: int = option(16, "fresh prompts each iteration answers (default: %(default)s)")
    heldout: int = option(16, "red-team prompts held out for the fixed evaluation (default: %(default)s)")
    helpful_mix: float = option(0.25, "fraction of SFT rows from the helpful prompts (default: %(default)s)")
    ignore_stop: list[str] = option([], "a stop rule to report but not stop on (repeatable; one of "
                                    "harmlessness_stalled, over_refusal, diversity_collapse, judge_blind). Given to "
                                    "a loop that stopped on it, the loop goes on", metavar="RULE")
    allow_flag: list[str] = option(["truncated"], "flags allowed into training (default: truncated: the small "
                                                  "default model rambles to the token limit)", metavar="FLAG")
    rounds: int = option(1, "critique→revise rounds per record (default: %(default)s)")
    max_new_tokens: int = option(128, "per stage (default: %(default)s)")
    temperature: float = option(0.7, "default: %(default)s")
    seed: int = option(0, "default: %(default)s")
    batch_size: int = option(16, "default: %(default)s")
    train_steps: int = option(8, "SFT steps an iteration (default: %(default)s)")
    dpo_steps: int = option(8, "DPO steps an iteration (default: %(default)s)")
    eval_helpful: int = option(16, "ordinary prompts in each evaluation (default: %(default)s)")
    eval_records: int = option(16, "records judged for the revision-round curve (default: %(default)s)")
    eval_max_new_tokens: int = option(96, "default: %(default)s")
    dtype: str | None = option(None, "the models' weights (default: fp32 on CPU)", choices=["auto", "float32",
                                                                                           "bfloat16", "float16"])
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    critic_backend: str | None = option(None, "another model critiques and revises the policy's answers: local or "
                                              "openai (default: the policy critiques itself, as in the paper)",
                                        choices=["local", "openai"])
    critic_model: str | None = option(None, "the critic: a local model, or the name an endpoint serves")
    critic_base_url: list[str] = option([], "openai critic: an endpoint; repeat for several", metavar="URL")

    def settings(self):
        from cai.cli.generate import constitution_file
        from cai.core.errors import CaiError
        from cai.loop.state import LoopSettings
        from cai.resources import prompts_path

        critic = None
        if self.critic_backend:
            if not self.critic_model or (self.critic_backend == "openai" and not self.critic_base_url):
                raise CaiError("--critic-backend needs --critic-model (and, for openai, --critic-base-url URL)")
            critic = {"backend": self.critic_backend, "model": self.critic_model, "base_urls": self.critic_base_url}
        return LoopSettings(
            model=self.model, constitution=str(constitution_file(self.constitution).resolve()),
            prompts=str(Path(prompts_path(self.prompts)).resolve()), helpful_prompts=self.helpful_prompts,
            method=self.method, labels=self.labels, accumulate=not self.replace,
            continue_adapter=self.continue_adapter, prompts_per_iteration=self.prompts_per_iteration,
            heldout=self.heldout, helpful_mix=self.helpful_mix, allow_flags=tuple(self.allow_flag),
            rounds=self.rounds, temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed,
            batch_size=self.batch_size, train_steps=self.train_steps, dpo_steps=self.dpo_steps,
            eval_helpful=self.eval_helpful, eval_records=self.eval_records,
            eval_max_new_tokens=self.eval_max_new_tokens, dtype=self.dtype, critic=critic,
            max_stall=self.max_violation_drop_stall, refusal_rise=self.max_refusal_rise,
            diversity_floor=self.diversity_floor, ignore_stops=tuple(self.ignore_stop))


def add(sub) -> None:
    p = sub.add_parser("iterate", help=HELP)
    add_options(p, IterateArgs)
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from cai.cli.console import console, quiet_libraries
    from cai.cli.ui import TerminalUi
    from cai.workflow.iterate import iterate

    a = parsed(IterateArgs, ns)
    quiet_libraries()
    result = iterate(a.run, a.settings(), a.iterations, TerminalUi(), review_gate=a.review_gate, device=a.device)
    if result.waiting:
        console().print(f"[yellow]waiting:[/] {result.waiting}", soft_wrap=True)
    return 0
