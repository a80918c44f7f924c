"""Ships the files people edit at the top of the repository inside the wheel.

``constitution/*.yaml`` and ``data/prompts/*.jsonl`` stay where people edit them; at build time they are copied into
the package as ``cai/resources/constitution/`` and ``cai/resources/prompts/``, where :mod:`cai.resources` looks first.
Git holds one copy; an editable install or a source checkout finds them in the repository instead.
Everything else about the package is in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"constitution": ("constitution", "*.yaml"), "prompts": ("data/prompts", "*.jsonl"),
           "data": ("data", "labeller_check.jsonl")}


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:          # an editable install reads the repository's own folders
            return
        resources = Path(self.build_lib) / "cai" / "resources"
        for name, (folder, pattern) in SHIPPED.items():
            files = sorted((ROOT / folder).glob(pattern))
            if not files:
                raise SystemExit(f"setup.py: no {pattern} in {folder}/: the wheel would ship without them")
            out = resources / name
            out.mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy2(path, out / path.name)


setup(cmdclass={"build_py": BuildWithShippedFiles})
