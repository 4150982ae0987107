"""robop_lightning.report: PruneReport as a table, a dict and a JSON file."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from robop_lightning.engine.layer import prune_layer
from robop_lightning.engine.solvers.structured_obs import select_groups
from robop_lightning.pipeline.prune import PruneReport, prune_model
from robop_lightning.report import LayerResult
from tests.engine_helpers import MLP


def test_report_table_dict_and_json(tmp_path):
    torch.manual_seed(0)
    report = prune_model(MLP(), [torch.randn(8, 16)], sparsity=0.25, solver="wanda", uncertainty="baseline")
    assert isinstance(report, PruneReport)
    text = str(report)
    assert "fc1" in text and "fc2" in text and "total (2 layers" in text and "wanda" in text
    d = report.to_dict()
    assert d["totals"]["parameters"] == 16 * 32 + 32 * 32
    assert d["totals"]["zeros"] == round(0.25 * d["totals"]["parameters"])
    assert d["totals"]["sparsity"] == pytest.approx(0.25)
    path = tmp_path / "report.json"
    report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(d))


# ---------------------------------------------------------------------------- report rows from typed results
def _mask_step_row(name, weight, result):
    """The row MaskStep._prune (robop_lightning.pipeline.prune) built by hand before LayerResult.to_row."""
    return {
        "name": name,
        "shape": list(weight.shape),
        "parameters": weight.numel(),
        "sparsity": float(result.sparsity),
        "nominal_error": float(result.nominal_error),
        "robust_error": float(result.robust_error),
        "heldout_error": None if result.heldout_error is None else float(result.heldout_error),
        "srank": None if result.srank is None or not math.isfinite(result.srank) else float(result.srank),
        "seconds": float(result.seconds),
        **({"selection": result.selection} if result.selection is not None else {}),
    }


@pytest.mark.parametrize("kwargs", [
    {"solver": "sparsegpt", "uncertainty": "trace"},
    {"solver": "sparsegpt", "uncertainty": "minmax-trace", "rounds": 1},  # srank
    {"solver": "sparsegpt", "uncertainty": "auto", "auto": {"folds": 2, "rows": None}},  # selection
])
@pytest.mark.parametrize("heldout", [False, True])
def test_layer_result_to_row_is_the_mask_steps_row(kwargs, heldout):
    g = torch.Generator().manual_seed(0)
    w, x, held = torch.randn(8, 16, generator=g), torch.randn(12, 4, 16, generator=g), torch.randn(6, 16, generator=g)
    r = prune_layer(w, x, sparsity=0.5, heldout=held if heldout else None, **kwargs)
    row = r.to_row("blocks.0.fc1", w.shape)
    assert row == _mask_step_row("blocks.0.fc1", w, r)
    assert list(row) == list(_mask_step_row("blocks.0.fc1", w, r))  # same keys, same order
    assert ("selection" in row) == (kwargs["uncertainty"] == "auto")
    assert (row["srank"] is not None) == (kwargs["uncertainty"] == "minmax-trace")
    assert json.loads(json.dumps(row)) == row
    assert all(type(row[k]) is float for k in ("sparsity", "nominal_error", "robust_error", "seconds"))


@pytest.mark.parametrize("srank", [math.inf, math.nan, 2.5, None])
def test_layer_result_to_row_srank_none_unless_finite(srank):
    r = LayerResult(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.1, 0.2, heldout_error=0.3, srank=srank,
                    sparsity=0.0, seconds=1)
    row = r.to_row("fc", torch.Size([2, 3]))
    assert row == _mask_step_row("fc", torch.zeros(2, 3), r)
    assert row["srank"] == (2.5 if srank == 2.5 else None) and row["parameters"] == 6 and row["shape"] == [2, 3]


def test_structured_result_to_row_is_the_shrink_steps_row():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(6, 12, generator=g), torch.randn(6, generator=g), torch.randn(40, 12, generator=g)
    heads = [list(range(i, i + 3)) for i in range(0, 12, 3)]
    unit = SimpleNamespace(name="blocks.0.attn", kind="heads", n_groups=len(heads), params_per_group=3 * 6 * 4,
                           consumer_name="blocks.0.attn.proj")
    plan = {"unit": unit, "remove": 2}
    r = select_groups(w, x, heads, plan["remove"], bias=b, heldout=torch.randn(10, 12, generator=g))
    shape = list(r.weight.shape)
    # what ShrinkStep.prune_block (robop_lightning.pipeline.shrink_step) built by hand
    by_hand = {
        "name": unit.consumer_name,
        "unit": unit.name,
        "kind": unit.kind,
        "shape": shape,
        "parameters": unit.n_groups * unit.params_per_group,
        "sparsity": plan["remove"] / unit.n_groups,
        "groups": unit.n_groups,
        "kept": unit.n_groups - plan["remove"],
        "removed": sorted(r.removed),
        "nominal_error": float(r.nominal_error),
        "robust_error": float(r.robust_error),
        "heldout_error": r.heldout_error,
        "srank": None,
        "seconds": float(r.seconds),
    }
    row = r.to_row(unit.consumer_name, r.weight.shape, unit.name, unit.kind, unit.params_per_group)
    assert row == by_hand and list(row) == list(by_hand)
    assert json.loads(json.dumps(row)) == row
