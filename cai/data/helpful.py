"""Helpfulness answers for the SFT mix: ordinary prompts answered by the run's own model, with no critique, so the
fine-tuned model does not turn evasive (the paper mixed these in). They go to ``RUN/helpful/``, a run folder of its
own: resumable, and reused by later builds."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai.core.errors import DataError
from cai.core.hashing import seeded_order
from cai.core.record import Record, read_records
from cai.resources import prompts_path
from cai.run import RunFolder

HelpfulSource = Callable[[int], list[Record]]   # n -> up to n helpfulness records (answers with no rounds)


def helpful_needed(n_harmless: int, mix: float) -> int:
    return math.ceil(n_harmless * mix / (1 - mix)) if mix > 0 else 0


def helpful_from_run(run: str | Path | RunFolder, prompts: str, seed: int, make_backend: Callable[[str, str], Any],
                     progress=None, batch_size: int = 16) -> HelpfulSource:
    """A ``HelpfulSource`` that answers ordinary prompts with the run's model and sampling settings into
    ``run/helpful/`` (rounds=0: the answer only). Prompts are taken in a seeded order; answers already in the
    folder are reused. ``make_backend(kind, model)`` builds the backend (only when something is left to answer)."""
    from cai.backends.base import Sampling
    from cai.core.constitution import load_constitution
    from cai.core.prompt_files import load_prompts
    from cai.generate.runner import run_generate

    folder = run if isinstance(run, RunFolder) else RunFolder.open(run)

    def source(n: int) -> list[Record]:
        items = load_prompts(prompts_path(prompts)).items
        items.sort(key=lambda it: seeded_order(seed, it.id))
        items = items[:n]
        cpath = folder.constitution_file()
        if cpath is None or not cpath.exists():
            raise DataError(f"{folder.shown(folder.run_file)} does not name a constitution file that exists "
                            f"({folder.info.constitution.path!r}); it is needed to answer the helpfulness prompts",
                            hint="Run `cai generate` for this folder again (it records the path), or build with "
                                 "--helpful-mix 0.")
        constitution = load_constitution(cpath)
        kind = folder.info.backend or "local"
        model = folder.model_source
        sampling = Sampling(**folder.info.sampling)
        out = folder.helpful_dir
        have = read_records(out) if (out / "records.jsonl").exists() else []
        wanted = {it.id for it in items}
        if not wanted <= {r.prompt_id for r in have}:
            backend = make_backend(kind, model)
            run_generate(constitution=constitution, items=items, backend=backend, out=out, rounds=0,
                         sampling=sampling, batch_size=batch_size, progress=progress, model_source=model,
                         constitution_path=cpath)
            have = read_records(out)
        return [r for r in have if r.prompt_id in wanted]

    return source
