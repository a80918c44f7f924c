"""Sequences of library calls, one per command: the steps of the main job, the labeller, and the demo that runs them
in a row. The CLI calls one function here per command; no step calls a command. The self-improvement loop
(``iterate``) will live here too.

- :mod:`cai.workflow.base`: the :class:`Ui` a step reports to, :func:`resumable` (Ctrl-C, a full disk).
- :mod:`cai.workflow.steps`: generate, data build, train, eval.
- :mod:`cai.workflow.label`: AI-feedback labels and the labeller check.
- :mod:`cai.workflow.demo`: the demo.
"""

from cai.workflow.base import (
           RESUME,
           DiskFull,
           Endpoints,
           Interrupted,
           ModelSpec,
           RunModels,
           Ui,
           check_reachable,
           resumable,
)
from cai.workflow.demo import DemoJob, demo, demo_train_flags
from cai.workflow.steps import GenerateJob, JudgeSpec, build_data, evaluate, generate, train_stage

__all__ = ["RESUME", "DemoJob", "DiskFull", "Endpoints", "GenerateJob", "Interrupted", "JudgeSpec", "ModelSpec",
           "RunModels", "Ui",
           "build_data", "check_reachable", "demo", "demo_train_flags", "evaluate", "generate", "resumable",
           "train_stage"]
