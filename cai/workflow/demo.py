"""The demo: the whole method in one command, as library calls (generate → data build → train sft → eval)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cai.workflow.base import Ui
from cai.workflow.steps import GenerateJob, build_data, evaluate, generate, train_stage

# Small enough to finish in a few minutes on a 2-core CPU with the default model. SmolLM2-135M rambles to the token
# limit: the demo trains on truncated texts on purpose (the card says so).
DEMO_HELPFUL_MIX = 0.25
DEMO_ALLOW_FLAGS = ("truncated",)


def demo_train_flags(steps: int) -> list[str]:
    """Short and CPU-friendly: padding-free batches (same loss, ~1.4x the tokens/s of padded ones on this CPU: see
    bench/README.md), no activation checkpointing (memory is not the constraint on a CPU)."""
    return ["--max_steps", str(steps), "--save_steps", str(max(1, steps // 2)), "--gradient_accumulation_steps", "1",
            "--padding_free", "true", "--max_length", "None", "--activation_checkpointing", "false"]


@dataclass
class DemoJob:
    generate: GenerateJob
    helpful_prompts: str                    # the ordinary prompts of the helpfulness mix and of the evaluation
    train_steps: int = 8                    # 0: generate only
    eval: Any = None                        # cai.evaluation.runner.EvalOptions; None or red_team <= 0: no eval
    seed: int = 0


def demo(job: DemoJob, ui: Ui | None = None) -> bool:
    """Generate, build the data, train a short SFT adapter, evaluate it. Every step reuses what an earlier run of
    the demo finished. Returns True when every step ran (False: it stopped where ``job`` said to)."""
    from cai.data.build import BuildOptions

    ui = ui or Ui()
    g = job.generate
    generate(g, ui)
    if job.train_steps <= 0:
        return False
    data = BuildOptions(helpful_mix=DEMO_HELPFUL_MIX, test_size=0.1, all_rounds=False,
                        allow_flags=DEMO_ALLOW_FLAGS, seed=job.seed, helpful_prompts=job.helpful_prompts)
    build_data(g.out, data, ui, device=g.device, endpoints=g.endpoints)
    train_stage("sft", g.out, ui, flags=demo_train_flags(job.train_steps))
    if job.eval is None or job.eval.red_team <= 0:
        return False
    evaluate(g.out, job.eval, ui, device=g.device)
    return True


