"""How fast hostile YAML is refused, as a ratio to loading the shipped constitution, for both parsers.

The tests check that each hostile document (an alias bomb, 100,000 levels of nesting, more values than the limit, a
file over 1 MiB) is refused with its line and in bounded memory; this measures the time, side by side with an
ordinary load in the same run (the machine is shared: a ratio is stable where a time is not). The refusal must take
about as long as reading a normal file, not as long as expanding the document.

    .venv/bin/python bench/hostile_yaml.py
"""

from __future__ import annotations

import statistics
import time

import cai.core.safe_yaml as safe_yaml
from cai.core.constitution import parse_constitution
from cai.core.errors import ConstitutionError
from cai.resources import constitution_path


def bomb(levels: int = 9) -> str:
    lines = ["name: bomb", "version: '1'", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"principles: *a{levels - 1}"]) + "\n"


CASES = {
    "alias bomb": bomb(),
    "100,000 levels": "principles: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "too many values": "principles:\n" + "- a\n" * (safe_yaml.MAX_YAML_NODES + 10),
    "over 1 MiB": "name: x\n# " + "x" * safe_yaml.MAX_YAML_BYTES + "\n",
}


def seconds(text: str, repeats: int = 5) -> float:
    """Median seconds to parse ``text`` (refused or not)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            parse_constitution(text, "c.yaml")
        except ConstitutionError:
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    shipped = constitution_path("default").read_text(encoding="utf-8")
    fast = safe_yaml._FAST_LOADER
    for parser, loader in (("libyaml", fast), ("python", None)):
        if parser == "libyaml" and loader is None:
            print("libyaml: not installed, skipped")
            continue
        safe_yaml._FAST_LOADER = loader
        base = seconds(shipped)
        print(f"[{parser}] shipped constitution: {base * 1000:.1f} ms")
        for name, text in CASES.items():
            t = seconds(text)
            print(f"[{parser}] {name}: {t * 1000:.1f} ms")
            # the one threshold that matters to a user: refused well within a second (ratio to a normal load beside)
            print(f"hostile yaml {parser} {name} / shipped load = {t / base:.2f}  (target <= 100)")
    safe_yaml._FAST_LOADER = fast


if __name__ == "__main__":
    main()
