"""The issue-6 benchmarks run in their tiny modes and write rows with the required keys."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch

from tests.script_loader import load_script

REQUIRED = {"method", "uncertainty", "sparsity", "pattern"}


@pytest.fixture(autouse=True)
def _keep_threads():
    """Benchmarks set torch's thread count (``--threads``, ``--fast``); every test gets it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_layer_real_fast(tmp_path):
    rows = load_script("benchmarks/layer_real.py").main(["--fast", "--out", str(tmp_path / "lr")])
    data = json.loads((tmp_path / "lr.json").read_text())
    assert len(data["rows"]) == len(rows) == 5  # five solvers on one synthetic layer
    assert "command" in data and len(data["loadavg"]) == 3
    for row in data["rows"]:
        assert REQUIRED <= set(row)
        assert 0 <= row["nominal_error"] <= row["robust_error"] and row["heldout_error"] is not None
        assert row["seconds"] > 0 and row["time_vs_sparsegpt"] > 0
    assert "| synthetic.48x64 |" in (tmp_path / "lr.md").read_text()


def test_cost_fast(tmp_path):
    payload = load_script("benchmarks/cost.py").main(["--fast", "--out", str(tmp_path / "cost")])
    data = json.loads((tmp_path / "cost.json").read_text())
    assert data["rows"] == payload["rows"] == []  # --fast skips the whole-model part
    assert {e["axis"] for e in data["exponents"]} == {"tokens", "width"}
    for row in data["scaling"]:
        assert row["seconds"] > 0 and row["limit_seconds"] > 0
    for li in data["limit"]:
        assert li["gram_seconds"] >= 0 and li["cholesky_seconds"] >= 0
    assert len(data["loadavg"]) == 3 and "Physical limit" in (tmp_path / "cost.md").read_text()


def test_whole_model_rows_have_the_required_keys():
    cost = load_script("benchmarks/cost.py")
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    batches = [torch.randn(8, 16) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    rows = cost.whole_model("mlp", model, batches, None, ["magnitude", "sparsegpt", "alps"], torch.device("cpu"), 0,
                            fork=False)
    assert [r["method"] for r in rows] == ["magnitude", "sparsegpt", "robop-alps"]
    for r in rows:
        assert REQUIRED <= set(r) and r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["layers"] == 2
    assert rows[1]["time_vs_sparsegpt"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights restored


def test_sets_whole_fast_pairs_every_set_with_baseline_over_draws_and_resumes(tmp_path, monkeypatch):
    script = load_script("benchmarks/sets_whole.py")
    argv = ["--fast", "--settings", "0.5", "--sets", "baseline", "trace", "--baselines", "sparsegpt", "--draws", "2",
            "--ood", "brown", "fortunes", "--resamples", "200", "--out", str(tmp_path / "sw")]
    payload = script.main(argv)
    rows = {r["method"]: r for r in payload["comparisons"]}
    assert set(rows) == {"robop-alps/baseline", "robop-alps/trace", "sparsegpt"}
    splits = ["in-domain", "ood/brown", "ood/fortunes"]
    base = rows["robop-alps/baseline"]
    assert base["draws"] == [0, 1] and all(base[f"ratio_{s}"] == [1.0, 1.0, 1.0] for s in splits)
    runs = payload["runs"]
    for r in rows.values():
        for split in splits:
            est, low, high = r[f"ratio_{split}"]
            assert low <= est <= high and len(r[f"per_draw_{split}"]) == 2
            # the pooled ratio is the ratio of the pooled perplexities (every draw scores the same windows)
            assert abs(r[f"ppl_{split}"] / base[f"ppl_{split}"] - est) < 1e-9
    for split in splits:  # each draw's ratio is that draw's perplexity ratio
        expected = [runs[f"d{d}_0.5_alps_trace"][split]["ppl"] / runs[f"d{d}_0.5_alps_baseline"][split]["ppl"]
                    for d in (0, 1)]
        assert all(abs(a - b) < 1e-9 for a, b in zip(rows["robop-alps/trace"][f"per_draw_{split}"], expected))
    # the two draws calibrate on different windows, so they prune differently
    assert runs["d0_0.5_alps_baseline"]["layer_nominal_error"] != runs["d1_0.5_alps_baseline"]["layer_nominal_error"]
    assert "| 0.5 | robop-alps/trace | 2 |" in (tmp_path / "sw.md").read_text()
    # finished runs are kept: a second invocation prunes nothing
    monkeypatch.setattr(script, "prune_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-pruned")))
    again = script.main(argv)
    assert again["comparisons"] == json.loads(json.dumps(payload["comparisons"]))


def test_spread_covers_the_whole_corpus():
    script = load_script("benchmarks/sets_whole.py")
    windows = torch.arange(100)[:, None]
    assert script.spread(windows, 5)[:, 0].tolist() == [0, 25, 50, 74, 99]
    assert torch.equal(script.spread(windows[:3], 5), windows[:3])


def test_deit_draws_fast_compares_every_method_with_the_reference_per_draw(tmp_path):
    script = load_script("benchmarks/deit_draws.py")
    argv = ["--fast", "--draws", "2", "--robop-sets", "baseline", "trace", "--gram-sets", "--baselines", "magnitude",
            "--eval-size", "32", "--adv-size", "8", "--bootstrap", "200", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "dd")]
    payload = script.main(argv)
    rows = {r["method"]: r for r in payload["comparisons"]}
    assert set(rows) == {"robop-cap/baseline", "robop-cap/trace", "magnitude"}
    assert rows["robop-cap/baseline"]["diff_clean"] == [0.0, 0.0, 0.0]
    for r in rows.values():
        assert r["draws"] == [0, 1]
        for key in ("clean", "corrupt", "pgd", "corrupt/contrast"):
            est, low, high = r[f"diff_{key}"]
            assert low <= est <= high and len(r[f"per_draw_{key}"]) == 2
            assert abs(est - sum(r[f"per_draw_{key}"]) / 2) < 1e-9  # same images in every draw: the mean difference
    md = (tmp_path / "dd.md").read_text()
    assert "| 0.5 | robop-cap/trace |" in md and "contrast" in md


def test_sets_layers_fast_sweeps_gamma_against_baseline(tmp_path):
    rows = load_script("benchmarks/sets_layers.py").main(
        ["--fast", "--gammas", "0.01", "1e6", "--e-gammas", "0.5", "--out", str(tmp_path / "sl")]
    )
    data = json.loads((tmp_path / "sl.json").read_text())
    assert len(rows) == len(data["rows"]) == 1 + 2 + 1 + 2  # baseline, trace x2, e x1, cte x2
    base = [r for r in rows if r["uncertainty"] == "baseline"][0]
    assert base["heldout_vs_baseline"] == base["ood_vs_baseline"] == 1.0
    huge = [r for r in rows if r["uncertainty"] == "trace" and r["gamma"] == 1e6][0]
    assert huge["nominal_vs_baseline"] > 1  # a huge ridge is magnitude pruning: worse on the calibration Gram
    assert {s["set"] for s in data["summary"]} == {"trace", "e", "cte"}
    assert "| synthetic | 50% | trace | 0.01 | 1 |" in (tmp_path / "sl.md").read_text()


def test_sets_auto_fast_compares_the_two_scorers(tmp_path):
    rows = load_script("benchmarks/sets_auto.py").main(["--fast", "--out", str(tmp_path / "sa")])
    assert len(rows) == 1
    r = rows[0]
    assert r["agree"] == (r["auto_fast_chosen"] == r["auto_full_chosen"])
    assert r["auto_full_seconds"] > 0 and r["baseline_ood"] > 0
    assert r["regret_fast"] >= 1.0 and r["regret_baseline"] >= 1.0  # against the full scorer's best candidate
    assert "| synthetic | 50% | 1 |" in (tmp_path / "sa.md").read_text()


def test_auto_criteria_fast_measures_three_criteria_and_their_rank_correlation(tmp_path):
    script = load_script("benchmarks/auto_criteria.py")
    payload = script.main(["--fast", "--sets", "baseline", "trace=1", "auto", "--out", str(tmp_path / "ac")])
    runs = payload["runs"]
    assert set(runs) == {"0.7_baseline", "0.7_trace=1", "0.7_auto"}
    for r in runs.values():
        assert r["layer"] > 0 and r["block"] > 0 and r["model"] > 0 and r["ppl_ood"] > 0
    assert {c["criterion"] for c in payload["correlations"]} == {"layer", "block", "model"}
    assert all(-1.0 <= c["ood"] <= 1.0 for c in payload["correlations"])
    assert script.spearman([1, 2, 3], [10, 30, 20]) == 0.5 and script.spearman([3, 2, 1], [1, 2, 3]) == -1.0


def test_block_errors_are_zero_for_the_dense_model_and_positive_when_pruned():
    script = load_script("benchmarks/auto_criteria.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    dense = LlamaForCausalLM(cfg).eval()
    pruned = copy.deepcopy(dense)
    ids = torch.randint(0, 64, (3, 9))
    blocks = ["model.layers.0", "model.layers.1"]
    assert script.block_errors(copy.deepcopy(dense), dense, blocks, ids) == {b: 0.0 for b in blocks}
    assert script.kl_from_dense(copy.deepcopy(dense), dense, ids) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    errs = script.block_errors(pruned, dense, blocks, ids)
    assert errs["model.layers.0"] == 0.0 and errs["model.layers.1"] > 0.0
    assert script.kl_from_dense(pruned, dense, ids) > 0.0


def test_fisher_memory_fast_reports_the_peak_and_the_reference_sizes(tmp_path):
    payload = load_script("benchmarks/fisher_memory.py").main(["--fast", "--out", str(tmp_path / "fm")])
    row = payload["row"]
    assert row["sparsity"] == pytest.approx(0.5, abs=1e-3) and row["seconds"] > 0
    assert 0 < row["one_layer_blocks_mb"] < row["all_layers_blocks_mb"]
    assert "| tiny ViT (--fast) |" in (tmp_path / "fm.md").read_text()


def test_llm_scale_fast(tmp_path):
    payload = load_script("benchmarks/llm_scale.py").main(["--fast", "--out", str(tmp_path / "ls")])
    data = json.loads((tmp_path / "ls.json").read_text())
    assert [r["method"] for r in data["rows"]] == [r["method"] for r in payload["rows"]] == [
        "reference", "sparsegpt", "alps", "alps+trace", "auto"]
    assert {"command", "commit", "machine", "device", "rows", "ratios"} <= set(data) and data["device"] == "cpu"
    for row in data["rows"]:
        assert REQUIRED <= set(row)
        assert row["seconds"] > 0 and row["seconds_per_block"] > 0 and row["vs_floor"] > 0
        assert abs(row["sparsity"] - 0.5) < 0.01  # prune_model: the report's totals; reference: zeros in the weights
        assert row["peak_device_gib"] is None and row["projected_minutes"] > 0
    reference = data["rows"][0]
    assert reference["solver"] == "reference-sparsegpt" and len(reference["blocks"]) == 2
    assert set(reference["breakdown"]) == {"forward", "capture", "solve", "io"}
    assert all(v is not None and v > 0 for v in data["ratios"].values())
    md = (tmp_path / "ls.md").read_text()
    for line in ("prune_model(sparsegpt) / reference:", "prune_model(sparsegpt) per block / floor",
                 "alps+trace / sparsegpt:", "auto / alps+trace:", "| reference | reference-sparsegpt / baseline |"):
        assert line in md


def test_alps_parts_fast_accounts_for_the_solve(tmp_path):
    payload = load_script("benchmarks/alps_parts.py").main(["--fast", "--out", str(tmp_path / "ap")])
    data = json.loads((tmp_path / "ap.json").read_text())
    assert [r["name"] for r in data["rows"]] == [r["name"] for r in payload["rows"]] == [
        "down_proj", "gate/up_proj", "q/o_proj", "k/v_proj"]  # the largest solves first
    assert [r["shape"] for r in data["rows"]] == ["64x228", "228x64", "64x64", "16x64"]  # llm_scale's widths at 0.016
    for row in data["rows"]:
        assert row["solve_seconds"] > 0 and row["iterations"] >= 3 and row["rho_values"] >= 1
        assert set(row["parts"]) == {"eigh", "resolvent", "product", "select", "update", "cg"}
        assert (row["parts"]["resolvent"] > 0) == (row["path"] == "formed resolvent")  # wide layers: two products
        assert row["model_seconds"] == pytest.approx(sum(row["parts"].values()))
        assert row["kthvalue_seconds"] is None  # the old accelerator path is not timed on a CPU
        wide = row["path"] == "two products"
        assert (row["cholesky_route_seconds"] is not None) == wide and (row["eigh_route_seconds"] is not None) == wide
        if wide:
            assert row["cholesky_route_seconds"] > 0 and row["eigh_route_seconds"] >= row["parts"]["eigh"]
    assert [r["path"] for r in data["rows"]] == ["two products", "formed resolvent", "formed resolvent", "two products"]
    assert "| down_proj | 64x228 |" in (tmp_path / "ap.md").read_text()


def test_peer_llmcompressor_fast(tmp_path):
    # no peer venv here: robop's side runs, llm-compressor's is reported missing (nothing installed)
    payload = load_script("benchmarks/peer_llmcompressor.py").main(
        ["--fast", "--threads", "1", "--repeats", "2", "--peer-venv", str(tmp_path / "no-venv"),
         "--out", str(tmp_path / "peer")])
    data = json.loads((tmp_path / "peer.json").read_text())
    assert {"command", "commit", "machine", "protocol", "peer", "rows", "ratios"} <= set(data)
    assert data["peer"]["status"] == "missing" and not (tmp_path / "no-venv").exists()
    rows = {(r["method"], r["side"]): r for r in data["rows"]}
    assert set(rows) == {(m, s) for m in ("sparsegpt", "wanda") for s in ("robop", "llmcompressor")} | {
        ("dense", "dense")}
    for method in ("sparsegpt", "wanda"):
        mine, theirs = rows[method, "robop"], rows[method, "llmcompressor"]
        assert mine["status"] == "ok" and mine["seconds"] > 0 and abs(mine["sparsity"] - 0.5) < 1e-3
        assert len(mine["seconds_all"]) == 2 and mine["seconds"] == statistics.median(mine["seconds_all"])
        assert all(math.isfinite(mine[k]) and mine[k] > 1 for k in ("ppl_in-domain", "ppl_ood"))
        assert theirs["status"] == "missing" and theirs["seconds"] is None and data["ratios"][method] is None
    assert rows["dense", "dense"]["sparsity"] == 0.0 and payload["rows"][0]["method"] == "dense"
    assert "| sparsegpt | llmcompressor | missing |" in (tmp_path / "peer.md").read_text()


def test_sparse_speed_fast(tmp_path):
    # the CPU smoke path: tiny shapes, dense timings, the 2:4 kernel reported unavailable with its reason
    payload = load_script("benchmarks/sparse_speed.py").main(["--fast", "--device", "cpu", "--out",
                                                              str(tmp_path / "ss")])
    data = json.loads((tmp_path / "ss.json").read_text())
    assert {"command", "commit", "machine", "device", "dtype", "kernel", "config", "rows"} <= set(data)
    assert data["device"] == "cpu" and data["kernel"]["available"] is False
    assert "CUDA GPU of compute capability 8.0+" in data["kernel"]["reason"]
    assert [(r["kind"], r["shape"]) for r in data["rows"]] == [
        ("layer", "64x64"), ("layer", "224x64"), ("layer", "64x224"), ("model", "2x32")]
    assert [r["name"] for r in payload["rows"]][:3] == ["q/o_proj", "gate/up_proj", "down_proj"]
    for row in data["rows"]:
        assert row["dense_tokens_per_s"] > 0 and row["sparse_tokens_per_s"] is None and row["speedup"] is None
        assert row["status"] == "2:4 kernel unavailable"
    assert data["rows"][-1]["pruned_layers"] == 14  # every linear of the 2 blocks, 2:4 by magnitude
    md = (tmp_path / "ss.md").read_text()
    assert "| q/o_proj | 64x64 | 64 |" in md and "2:4 kernel: unavailable (to_semi_structured needs" in md


def test_export_sizes_fast(tmp_path):
    payload = load_script("benchmarks/export_sizes.py").main(["--fast", "--out", str(tmp_path / "es")])
    rows = {(r["dtype"], r["setting"], r["format"]): r for r in payload["rows"]}
    assert all(r["round_trip"] for r in rows.values())
    for dtype in ("float32", "bfloat16"):
        assert rows[(dtype, "50%", "hf")]["ratio"] == 1.0  # the hf format stores zeros densely
        assert rows[(dtype, "2:4", "compressed-tensors")]["ratio"] < rows[(dtype, "50%", "compressed-tensors")]["ratio"] < 0.8
    assert "| float32 | 2:4 | compressed-tensors |" in (tmp_path / "es.md").read_text()


def test_gpu_run_script_dry_runs_every_step_on_the_cpu(tmp_path):
    """The prepared device script (scripts/gpu_run.sh) at toy sizes: every step runs and writes its results."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("timeout") is None:
        pytest.skip("scripts/gpu_run.sh needs GNU timeout")

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_run.sh", "--dry"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert [line.split()[0] for line in steps] == ["llm_scale_sparsegpt", "llm_scale_alps_trace", "alps_parts",
                                                   "llm_scale_auto", "sparse_speed"]
    assert all(" rc=0 " in line for line in steps), [(tmp_path / f"{line.split()[0]}.log").read_text()[-1500:]
                                                     for line in steps if " rc=0 " not in line]
    for name in ("llm_scale_sparsegpt", "llm_scale_alps_trace", "alps_parts", "llm_scale_auto", "sparse_speed"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    assert "torch" in (tmp_path / "machine.txt").read_text()
