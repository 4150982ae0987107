"""``recipes/deit_cap.py --fast`` runs end to end on real Fashion-MNIST and writes true, loadable results."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tests.script_loader import load_script, phases_in_log, run_script


def _fashion_mnist_present() -> bool:
    from robop_lightning.data.vision import find_fashion_mnist

    return find_fashion_mnist(None) is not None


def _load_recipe():
    return load_script("recipes/deit_cap.py")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    if not _fashion_mnist_present():
        pytest.skip(
            "Fashion-MNIST not found: run `python -m robop_lightning.assets fetch fashion-mnist` "
            "(scripts/setup.sh does it) to run the DeiT recipe test."
        )
    tmp = tmp_path_factory.mktemp("deit_cap")
    out = tmp / "out"
    # as a new user runs it, its output sent to a log file; a fresh cache: the tiny dense model is
    # trained here, not taken from an earlier run
    run_script("recipes/deit_cap.py", ["--fast", "--out", str(out), "--cache", str(tmp / "cache"), "--threads", "1",
                                       "--robop-sets", "baseline", "trace", "e", "cte", "--gram-sets", "baseline", "auto"],
               log=tmp / "log.txt")  # fmt: skip
    return out, json.loads((out / "results.json").read_text())


def test_every_method_is_scored_and_numbers_are_accuracies(fast_run):
    out, results = fast_run
    rows = results["rows"]
    methods = {r["method"] for r in rows}
    expected = {"dense", "sparsegpt", "wanda", "magnitude", "robop-cap-gram/baseline", "robop-cap-gram/auto"}
    expected |= {f"robop-cap/{u}" for u in ("baseline", "trace", "e", "cte")}  # CAP's Fisher, as published
    assert expected <= methods
    assert any(r["finetuned"] for r in rows)  # recovery fine-tuning ran
    for row in rows:
        for key, value in row.items():
            if key.endswith("_acc") or "_acc/" in key or "_acc@" in key:
                assert 0.0 <= value <= 1.0, (row["name"], key, value)
        assert math.isfinite(row["rel_mce"]) and row["rel_mce"] > 0
    dense = next(r for r in rows if r["method"] == "dense")
    assert dense["clean_acc"] > 0.5 and dense["rel_mce"] == 1.0
    for row in rows:
        if row["method"] != "dense":
            assert abs(row["sparsity"] - 0.5) < 1e-3 and row["prune_seconds"] >= 0
            assert row["prune_peak_mb"] is None or row["prune_peak_mb"] >= 0
    for row in rows:
        if row["finetuned"]:
            assert row["masks_match_one_shot"] and row["masks_held"]  # the callback re-derived the same masks and held them
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_files_and_a_checkpoint_that_loads_into_the_stock_class(fast_run):
    out, results = fast_run
    for name in ("results.json", "results.csv", "table.txt", "comparisons.md", "accuracy_vs_sparsity.png", "corruptions.png",
                 "adversarial.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*.tmp*"))  # every file was renamed into place
    saved = [r for r in results["rows"] if r["checkpoint"]]
    assert saved
    from robop_lightning.models import DeiTClassifier

    row = saved[0]
    model = DeiTClassifier.load_from_checkpoint(row["checkpoint"], map_location="cpu", pretrained=False).eval()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".blocks." in n]
    sparsity = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
    assert abs(sparsity - row["sparsity"]) < 1e-3
    assert model.model.head.weight.ne(0).all()  # the output head stays dense
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_every_robop_set_is_compared_with_the_baseline_set_image_by_image(fast_run):
    out, results = fast_run
    rows = {r["name"]: r for r in results["rows"]}
    base = rows["robop-cap/baseline@0.5"]
    assert base["vs_baseline"] == {"clean": [0.0, 0.0, 0.0], "corrupt": [0.0, 0.0, 0.0], "pgd": [0.0, 0.0, 0.0]}
    for u in ("robop-cap/baseline", "robop-cap/trace", "robop-cap/e", "robop-cap/cte", "robop-cap-gram/auto"):
        row = rows[f"{u}@0.5"]
        assert set(row["vs_baseline"]) == {"clean", "corrupt", "pgd"}, u
        for key, (estimate, low, high) in row["vs_baseline"].items():
            assert -1.0 <= low <= estimate + 1e-12 and estimate - 1e-12 <= high <= 1.0, (u, key, low, estimate, high)
        # the paired estimate is the difference of the reported accuracies (same images for both models)
        for key, column in (("clean", "clean_acc"), ("corrupt", "corrupt_acc"), ("pgd", "pgd_acc@8/255")):
            assert row["vs_baseline"][key][0] == pytest.approx(row[column] - base[column], abs=1e-4), (u, key)
    for row in results["rows"]:
        if row["solver"] not in ("cap", "cap-gram"):
            assert row["vs_baseline"] is None, row["name"]
    gram = rows["robop-cap-gram/baseline@0.5"]  # the label-free Gram path, paired with CAP's Fisher
    assert gram["vs_baseline"]["clean"][0] == pytest.approx(gram["clean_acc"] - base["clean_acc"], abs=1e-4)
    assert rows["robop-cap/trace@0.5"]["prune_seconds"] > 0
    assert "accuracy minus that of robop-cap/baseline" in results["protocol"]["vs_baseline"]
    table = (out / "comparisons.md").read_text()
    assert "PGD 8/255 diff" in table
    for u in ("robop-cap/baseline", "robop-cap/trace", "robop-cap/e", "robop-cap/cte", "robop-cap-gram/auto"):
        assert f"| {u} " in table
    assert "+0.00 [+0.00, +0.00]" in table  # the baseline set against itself
    with open(out / "results.csv", newline="") as f:
        csv_rows = {r["name"]: r for r in csv.DictReader(f)}
    high = rows["robop-cap/trace@0.5"]["vs_baseline"]["clean"][2]
    assert float(csv_rows["robop-cap/trace@0.5"]["vs_baseline/clean_high"]) == pytest.approx(high)  # flattened columns


def test_the_log_says_when_every_phase_starts_and_ends_with_its_time(fast_run):
    """``python recipes/deit_cap.py --fast > log.txt``: a line when each phase starts, one when it ends, with seconds."""
    out, results = fast_run
    phases = phases_in_log((out.parent / "log.txt").read_text(), "deit_cap")
    for start in ("data: ", "dense model: training ", "pruning: ", "validation accuracy of ", "fine-tuning 2 model(s)",
                  "evaluation of ", "paired comparisons", "saving ", "writing reports"):  # fmt: skip
        assert any(p.startswith(start) for p in phases), (start, list(phases))
    for row in results["rows"]:  # one pair of lines per model in the long loops
        assert any(p.startswith(f"evaluating {row['name']} (") for p in phases), row["name"]
        if row["finetuned"]:  # validated as the end of its fine-tuning
            assert any(p.startswith(f"fine-tuning {row['name'].removesuffix('+ft')}: ") for p in phases), row["name"]
            continue
        assert any(p.startswith(f"validating {row['name']} (") for p in phases), row["name"]
        if row["method"] != "dense":
            assert any(p.startswith(f"pruning {row['method']} 50 % (") for p in phases), row["name"]
    assert all(seconds >= 0 for seconds in phases.values())
    timings = results["timings"]  # results.json's timings are the phases' times
    assert timings["pruning_s"] == pytest.approx(next(v for p, v in phases.items() if p.startswith("pruning: ")), abs=0.051)


def test_absolute_mce_beside_relative_mce_in_table_csv_and_json(fast_run):
    """mCE (errors under corruption, lower = fewer) is printed beside rel mCE (the drop from the model's own clean accuracy)."""
    out, results = fast_run
    rows = results["rows"]
    config = results["config"]
    dense = next(r for r in rows if r["method"] == "dense")
    for row in rows:  # the two definitions, recomputed from the per-corruption, per-severity accuracies
        ratios, relative = [], []
        for c in config["corruptions"]:
            errors = [1 - row[f"corrupt_acc/{c}@{s}"] for s in config["severities"]]
            dense_errors = [1 - dense[f"corrupt_acc/{c}@{s}"] for s in config["severities"]]
            ratios.append(sum(errors) / sum(dense_errors))
            drop = sum(e - (1 - row["clean_acc_eval_subset"]) for e in errors)
            dense_drop = sum(e - (1 - dense["clean_acc_eval_subset"]) for e in dense_errors)
            if dense_drop > 0:
                relative.append(drop / dense_drop)
        assert row["mce"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-9), row["name"]
        assert row["rel_mce"] == pytest.approx(sum(relative) / len(relative), abs=1e-9), row["name"]
    assert dense["mce"] == 1.0 and dense["rel_mce"] == 1.0
    assert "mce" in results["protocol"] and "lower" in results["protocol"]["mce"]
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["mce"]) for r in csv_rows] == pytest.approx([r["mce"] for r in rows])
    table = (out / "table.txt").read_text()
    lines = table.splitlines()
    header = lines[0].split("  ")
    header = [h.strip() for h in header if h.strip()]
    assert header[header.index("mCE") + 1] == "rel mCE"  # side by side
    for row, line in zip(rows, lines[2:]):
        assert f" {row['mce']:.3f}  " in line and f" {row['rel_mce']:.3f}  " in line, (row["name"], line)
    note = table.split("\n\n", 1)[1]  # under the table: how to read both
    assert "mCE: mean corruption error" in note and "Lower = fewer" in note
    assert "rel mCE: Hendrycks' relative mCE" in note and "little" in note and "left to lose" in note


def test_imagenet_path_fails_clearly_without_data(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        _load_recipe().main(["--model", "deit_small_patch16_224", "--pretrained", "--data", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "out")])  # fmt: skip
