"""The recipes, benchmarks and README examples run (in their small modes) and say true things."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from tests.script_loader import ROOT, load_script, phases_in_log


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


def _docs_blocks() -> dict[str, list[str]]:
    """The runnable python examples of each docs/ page that has any (``# not run`` blocks left out)."""
    pages = {}
    for path in sorted((ROOT / "docs").glob("*.md")):
        blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
                  if not b.lstrip().startswith("# not run")]
        if blocks:
            pages[path.name] = blocks
    return pages


def test_the_docs_have_runnable_examples():
    assert {"usage.md", "large-models.md", "export.md"} <= set(_docs_blocks())


@pytest.mark.parametrize("page", sorted(_docs_blocks()))
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    """Every python example in docs/ checks its own result (an ``assert``) and runs as written (each page
    in a fresh namespace, in a temporary directory): a failing example fails here."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(_docs_blocks()[page]):
        assert re.search(r"^\s*assert ", block, flags=re.M), f"docs/{page} example {i} checks nothing"
        exec(compile(block, f"docs/{page}", "exec"), namespace)
        assert len(namespace) > 1, f"docs/{page} example {i} defined nothing"


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


def test_every_recipe_loads_by_path_with_its_shared_helpers():
    """The recipes import ``recipes/_common.py`` as a sibling, run as scripts or imported by path."""
    for name in ("deit_cap", "llama_alps", "engine_demo", "prune_then_finetune"):
        recipe = load_script(f"recipes/{name}.py")
        assert pathlib.Path(recipe.common.__file__) == ROOT / "recipes" / "_common.py", name
        assert callable(recipe.main)


def test_recipe_config_becomes_a_command_line():
    common = load_script("recipes/_common.py")
    config = dict(flag=True, sizes=[1, 2], name=None, kw=None, rate=0.5, limit=1.0)
    parser = common.config_parser("doc", config, types={"kw": json.loads, "limit": common.count_or_fraction},
                                  fast_help="tiny")  # fmt: skip
    argv = ["--no-flag", "--sizes", "3", "4", "--kw", '{"a": 1}', "--limit", "30", "--fast"]
    args = parser.parse_args(argv)
    assert (args.flag, args.sizes, args.name, args.kw, args.rate, args.limit) == (False, [3, 4], None, {"a": 1}, 0.5, 30)
    assert isinstance(args.limit, int) and parser.parse_args(["--limit", "0.25"]).limit == 0.25
    common.apply_fast(args, {"rate": 0.1, "sizes": [9]}, argv)  # --fast: its values, except those given
    assert args.rate == 0.1 and args.sizes == [3, 4]
    with pytest.raises(SystemExit):
        common.check_set_specs(parser, "--robop-sets", ["trace=abc"], allow_auto=True)
    with pytest.raises(SystemExit):
        common.check_save_checkpoints(parser, "some")


def test_progress_prints_a_start_and_an_end_line_with_the_time(capsys):
    common = load_script("recipes/_common.py")
    progress = common.Progress("demo")
    with progress.phase("outer", timing="outer_s"):
        with progress.phase("inner (1/1)", timing="outer_s") as inner:
            inner.note = "fine"
    log = capsys.readouterr().out
    assert log.splitlines() == ["[demo] outer ...", "[demo] inner (1/1) ...", "[demo] inner (1/1) done in 0.0 s: fine",
                                "[demo] outer done in 0.0 s"]  # fmt: skip
    assert phases_in_log(log, "demo") == {"inner (1/1)": 0.0, "outer": 0.0}
    assert progress.timings["outer_s"] >= 0  # the same key twice: added up
    with pytest.raises(ValueError):
        with progress.phase("doomed"):
            raise ValueError("no")
    failed = capsys.readouterr().out
    assert failed.splitlines()[-1].startswith("[demo] doomed failed after ")
    with pytest.raises(AssertionError, match="failed after"):
        phases_in_log(failed, "demo")
    with pytest.raises(AssertionError, match="without an end line"):
        phases_in_log("[demo] stuck ...\n", "demo")
