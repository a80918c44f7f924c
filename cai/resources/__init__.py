"""The one place that finds the shipped files (constitution, prompt sets, training recipes) from any directory.

People edit the top-level ``constitution/`` and ``data/`` folders of the repository. A wheel carries copies of them
inside this package (``cai/resources/constitution/``, ``cai/resources/prompts/``, ``cai/resources/data/`` for the
labeller's comparison set), put there at build time by the ``build_py`` hook in ``setup.py``, so git holds one copy
only. Lookup order: inside the package first (an installed
wheel), then the repository the package sits in (a source checkout or editable install). The training recipes live
in ``cai/resources/recipes/`` in both cases.
"""

from __future__ import annotations

from pathlib import Path

from cai.core.errors import ConfigError, ConstitutionError

DEFAULT_CONSTITUTION = "default"
RED_TEAM = "red_team"
HELPFUL = "helpful"

_PACKAGE = Path(__file__).resolve().parent
_REPO = _PACKAGE.parents[1]

# Where each kind of shipped file is: inside the package (wheel), then in the repository (source checkout).
_CONSTITUTION_DIRS = (_PACKAGE / "constitution", _REPO / "constitution")
_PROMPT_DIRS = (_PACKAGE / "prompts", _REPO / "data" / "prompts")
_RECIPE_DIR = _PACKAGE / "recipes"
_DATA_DIRS = (_PACKAGE / "data", _REPO / "data")           # other shipped data: the labeller's comparison set
LABELLER_CHECK = "labeller_check.jsonl"

_CONSTITUTION_SUFFIX = ".yaml"
_PROMPTS_SUFFIX = ".jsonl"
_RECIPE_SUFFIX = ".yaml"


def _shipped(dirs: tuple[Path, ...], suffix: str) -> dict[str, Path]:
    """Shipped names (file stem) → path; the first folder that has a name wins."""
    found: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{suffix}")):
            if path.is_file():
                found.setdefault(path.stem, path)
    return found


def _name(spec: str, suffix: str, repo_folder: str) -> str:
    """The shipped name ``spec`` may mean: ``default``, ``default.yaml``, or the repository-relative path the docs
    and older defaults use (``constitution/default.yaml``), so those keep working from any directory."""
    spec = spec.replace("\\", "/")
    if spec.startswith(repo_folder + "/") and spec.count("/") == repo_folder.count("/") + 1:
        spec = spec[len(repo_folder) + 1 :]
    return spec[: -len(suffix)] if spec.endswith(suffix) else spec


def shipped_constitutions() -> list[str]:
    """Names of the shipped constitutions (``default``, …), sorted."""
    return sorted(_shipped(_CONSTITUTION_DIRS, _CONSTITUTION_SUFFIX))


def shipped_prompt_sets() -> list[str]:
    """Names of the shipped prompt sets (``helpful``, ``red_team``), sorted."""
    return sorted(_shipped(_PROMPT_DIRS, _PROMPTS_SUFFIX))


def constitution_path(spec: str | Path) -> Path:
    """An existing file as is; else a shipped constitution by name (``default``, ``default.yaml`` or
    ``constitution/default.yaml``).

    Raises ``ConstitutionError`` naming ``spec`` and the shipped names when it is neither.
    """
    path = Path(spec)
    if path.is_file():
        return path
    shipped = _shipped(_CONSTITUTION_DIRS, _CONSTITUTION_SUFFIX)
    name = _name(str(spec), _CONSTITUTION_SUFFIX, "constitution")
    if name in shipped:
        return shipped[name]
    names = ", ".join(sorted(shipped)) or "none found"
    raise ConstitutionError(f"constitution not found: {spec} (not a file, nor a shipped constitution: {names})")


def prompts_path(spec: str | Path) -> str:
    """An existing path as is; a shipped prompt set by name (``red_team``, ``helpful``, with or without ``.jsonl``,
    or as ``data/prompts/red_team.jsonl``) → its path; anything else unchanged (maybe a Hugging Face dataset name)."""
    if Path(spec).exists():
        return str(spec)
    shipped = _shipped(_PROMPT_DIRS, _PROMPTS_SUFFIX)
    name = _name(str(spec), _PROMPTS_SUFFIX, "data/prompts")
    if name in shipped:
        return str(shipped[name])
    return str(spec)


def shipped_recipes() -> list[str]:
    """Names of the shipped training recipes (``dpo``, ``sft``, ``soft-labels``), sorted."""
    return sorted(_shipped((_RECIPE_DIR,), _RECIPE_SUFFIX))


def recipe_file(spec: str | Path) -> Path:
    """A ``--config``: an existing file as is; else a shipped recipe by name (``soft-labels`` or
    ``soft-labels.yaml``). Raises ``ConfigError`` naming ``spec`` and the shipped names when it is neither."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = _shipped((_RECIPE_DIR,), _RECIPE_SUFFIX)
    name = str(spec)[: -len(_RECIPE_SUFFIX)] if str(spec).endswith(_RECIPE_SUFFIX) else str(spec)
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"config file {spec} not found (not a file, nor a shipped recipe: "
                      f"{', '.join(sorted(shipped)) or 'none found'})")


def recipe_path(stage: str) -> Path:
    """The shipped training recipe of a stage (``sft``, ``dpo``): ``cai/resources/recipes/<stage>.yaml``.

    The path is returned even when no such file exists; the caller says which stages there are.
    """
    return _RECIPE_DIR / f"{stage}.yaml"


def labeller_check_path() -> Path:
    """The shipped comparison set for ``cai label --check`` (pairs whose better answer is known)."""
    for folder in _DATA_DIRS:
        if (folder / LABELLER_CHECK).is_file():
            return folder / LABELLER_CHECK
    return _DATA_DIRS[-1] / LABELLER_CHECK
