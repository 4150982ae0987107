"""The docstring examples of the pruning chain run (``>>>`` lines are executed and their output checked)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "robop_lightning.pipeline.calibration",
    "robop_lightning.callback",
    "robop_lightning.config",
    "robop_lightning.engine.damping",
    "robop_lightning.pipeline.dispatch",
    "robop_lightning.export",
    "robop_lightning.engine.gram",
    "robop_lightning.engine.layer",
    "robop_lightning.pipeline.masks",
    "robop_lightning.utils.offload",
    "robop_lightning.pipeline.prune",
    "robop_lightning.pipeline.walk",
    "robop_lightning.engine.alternation",
    "robop_lightning.engine.solvers",
    "robop_lightning.engine.solvers.options",
    "robop_lightning.engine.solvers.structured_obs",
    "robop_lightning.pipeline.shrink_step",
    "robop_lightning.pipeline.surgery.decoder",
    "robop_lightning.pipeline.surgery.io",
    "robop_lightning.pipeline.surgery.vit",
    "robop_lightning.utils.typed",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, one_thread):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
