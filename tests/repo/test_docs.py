"""Every docstring example in the package runs (``>>>`` lines are executed and their output checked)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import robop_lightning


def _modules_with_examples() -> list[str]:
    out = []
    for info in pkgutil.walk_packages(robop_lightning.__path__, "robop_lightning."):
        if info.name.endswith("__main__"):
            continue
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and ">>>" in open(spec.origin).read():
            out.append(info.name)
    return sorted(out)


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert {"robop_lightning.pipeline.prune", "robop_lightning.engine.layer", "robop_lightning.config"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, one_thread):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
