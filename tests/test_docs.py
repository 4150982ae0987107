"""The docstring examples of the pruning chain run (``>>>`` lines are executed and their output checked)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "robop_lightning.calibration",
    "robop_lightning.callback",
    "robop_lightning.config",
    "robop_lightning.damping",
    "robop_lightning.dispatch",
    "robop_lightning.export",
    "robop_lightning.gram",
    "robop_lightning.layer",
    "robop_lightning.masks",
    "robop_lightning.offload",
    "robop_lightning.model",
    "robop_lightning.pipeline",
    "robop_lightning.robust",
    "robop_lightning.solvers",
    "robop_lightning.solvers.options",
    "robop_lightning.solvers.structured_obs",
    "robop_lightning.structured",
    "robop_lightning.surgery.decoder",
    "robop_lightning.surgery.io",
    "robop_lightning.surgery.vit",
    "robop_lightning.typed",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, one_thread):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
