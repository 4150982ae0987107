"""Run a repository script (a recipe or a benchmark, not a package module): imported by its path,
or as a new user runs it, ``python recipes/deit_cap.py ... > log.txt 2>&1``; and read its log.

The recipes import their sibling helpers (``recipes/_common.py``) as ``_common``: run as a script,
Python puts ``recipes/`` first on ``sys.path``; imported by path here, the recipe adds its folder itself.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(path: str) -> ModuleType:
    """``load_script("recipes/deit_cap.py")``: the script as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(path: str, argv: list[str], log: pathlib.Path) -> str:
    """``python <path> <argv> > log 2>&1`` from the repository root; the log's text (its tail in the error)."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(ROOT / path), *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert done.returncode == 0, f"{path} {' '.join(argv)} exited with {done.returncode}; its log ends:\n{text[-4000:]}"
    return text


_END = re.compile(r"(?P<what>.*) (?:done in|failed after) (?P<seconds>\d+\.\d) s(?:: .*)?")


def phases_in_log(log: str, recipe: str) -> dict[str, float]:
    """``{phase: seconds}`` from a recipe's ``[recipe] <phase> ...`` / ``[recipe] <phase> done in 4.1 s`` lines.

    Fails (``AssertionError``) when a phase has no end line with its time, when an end line has no
    start line, when phases do not nest (an outer phase ending before an inner one) or when a phase failed.
    """
    started: list[str] = []
    seconds: dict[str, float] = {}
    for line in log.splitlines():
        at = line.find(f"[{recipe}] ")  # a terminal bar may share the line
        if at < 0:
            continue
        body = line[at + len(recipe) + 3 :]
        if body.endswith(" ..."):
            started.append(body.removesuffix(" ..."))
            continue
        end = _END.fullmatch(body)
        if end is None:
            continue  # a plain message
        assert started, f"an end line without a start line: {line!r}"
        assert started[-1] == end["what"], f"{line!r} ends a phase that is not the innermost open one ({started[-1]!r})"
        assert " failed after " not in body, line
        seconds[started.pop()] = float(end["seconds"])
    assert not started, f"phases without an end line: {started}"
    return seconds
