"""robop_lightning.report: PruneReport as a table, a dict and a JSON file."""

from __future__ import annotations

import json

import pytest
import torch

from robop_lightning.pipeline.prune import PruneReport, prune_model
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
