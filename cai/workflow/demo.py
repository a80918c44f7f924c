"""The demo: the whole method in one command, as library calls.

The supervised phase (generate → data build → train sft), then the RL phase (the SFT adapter answers each prompt
twice, the base model labels the pairs by AI feedback → data build with the soft labels → soft-label DPO on top of
the SFT adapter), then the evaluation of the base and both adapters.
"""

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


# The RL phase of the demo: two answers a prompt from the SFT adapter, one principle a pair, both orders.
DEMO_LABEL_SAMPLES = 2
DEMO_DPO_RECIPE = "soft-labels"


@dataclass
class DemoJob:
    generate: GenerateJob
    helpful_prompts: str                    # the ordinary prompts of the helpfulness mix and of the evaluation
    train_steps: int = 8                    # SFT steps; 0: generate only
    dpo_steps: int = 8                      # soft-label DPO steps after AI-feedback labelling; 0: no RL phase
    eval: Any = None                        # cai.evaluation.runner.EvalOptions; None or red_team <= 0: no eval
    seed: int = 0


def demo(job: DemoJob, ui: Ui | None = None) -> bool:
    """Generate, build the data, train a short SFT adapter, label pairs of its answers by AI feedback, train a short
    soft-label DPO on them, evaluate. Every step reuses what an earlier run of the demo finished. Returns True when
    every step ran (False: it stopped where ``job`` said to)."""
    from dataclasses import replace

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
    if job.dpo_steps > 0 and g.backend == "local":
        from cai.label.labeller import LabelSettings
        from cai.label.runner import LabelOptions
        from cai.workflow.label import label

        label(g.out, LabelOptions(policy="sft", samples=DEMO_LABEL_SAMPLES, max_new_tokens=g.sampling.max_new_tokens,
                                  batch_size=g.batch_size, settings=LabelSettings(seed=job.seed)), ui=ui,
              device=g.device)
        build_data(g.out, replace(data, preferences=True), ui, device=g.device, endpoints=g.endpoints)
        train_stage("dpo", g.out, ui, config=DEMO_DPO_RECIPE, flags=demo_train_flags(job.dpo_steps))
    if job.eval is None or job.eval.red_team <= 0:
        return False
    evaluate(g.out, job.eval, ui, device=g.device)
    return True


