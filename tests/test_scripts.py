"""The recipes, benchmarks and README examples run (in their small modes) and say true things."""

from __future__ import annotations

import json
import re

import pytest

from tests.script_loader import ROOT, load_script



def test_engine_demo_fast(tmp_path):
    out = tmp_path / "demo.json"
    rows = load_script("recipes/engine_demo.py").main(["--fast", "--out", str(out)])
    saved = json.loads(out.read_text())["rows"]
    assert len(rows) == len(saved) == 3 * 4  # 3 solvers x 4 sets
    for row in saved:
        assert 0 <= row["nominal_error"] <= row["robust_error"]
        assert row["heldout_error"] is not None and abs(row["sparsity"] - 0.5) < 1e-3


def test_layer_benchmark_small(tmp_path):
    out = tmp_path / "bench"
    rows = load_script("benchmarks/layer_solvers.py").main(
        ["--rows", "16", "--cols", "32", "--samples", "8", "--tokens", "4", "--out", str(out)]
    )
    data = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in data["rows"]} == {"magnitude", "wanda", "sparsegpt", "robop-alps", "robop-cap"}
    assert all(r["time_vs_sparsegpt"] > 0 for r in rows)
    assert "| robop-alps |" in out.with_suffix(".md").read_text()


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
    blocks = _readme_blocks()
    assert blocks, "README has no python examples"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    commands = [line for line in first if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def _fashion_mnist_present() -> bool:
    from robop_lightning.data.vision import find_fashion_mnist

    return find_fashion_mnist(None) is not None


def test_prune_then_finetune_fast(tmp_path):
    if not _fashion_mnist_present():
        pytest.skip("Fashion-MNIST not found: python -m robop_lightning.assets fetch fashion-mnist")
    summary = load_script("recipes/prune_then_finetune.py").main(["--fast", "--out", str(tmp_path)])
    assert sorted(summary["val_acc_per_epoch"]) == [0, 1]  # dense epoch 0, pruned at its end, epoch 1 fine-tunes
    assert abs(summary["sparsity"] - 0.6) < 1e-3 and summary["layers"] == 16
    assert summary["test_acc"] > 0.3  # ten classes: far above chance after a few dozen steps
