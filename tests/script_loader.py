"""Import a repository script (a recipe or a benchmark, not a package module) by its path."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(path: str) -> ModuleType:
    """``load_script("recipes/deit_cap.py")``: the script as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
