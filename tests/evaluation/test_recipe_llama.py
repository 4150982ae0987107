"""``recipes/llama_alps.py --fast`` runs end to end on real text and writes true, consistent results."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tests.script_loader import load_script, phases_in_log, run_script

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_recipe():
    return load_script("recipes/llama_alps.py")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_alps") / "out"
    # as a new user runs it, its output sent to a log file; the tiny Llama is trained here;
    # Shakespeare / Brown when cached (setup.sh fetches them), else offline text
    run_script("recipes/llama_alps.py", ["--fast", "--out", str(out), "--save-checkpoints", "best", "--threads", "1"],
               log=out.parent / "log.txt")  # fmt: skip
    return out, json.loads((out / "results.json").read_text())


def test_every_method_and_setting_is_scored(fast_run):
    out, results = fast_run
    rows = results["rows"]
    expected = {"dense", "sparsegpt", "wanda", "magnitude"} | {f"robop-alps/{u}" for u in ("baseline", "trace", "e", "cte")}
    assert {r["method"] for r in rows} == expected
    assert {r["setting"] for r in rows if r["method"] != "dense"} == {"0.5", "2:4"}
    assert results["config"]["fast"] is True  # the recipe's arguments are recorded
    for row in rows:
        for key, value in row.items():
            if "acc" in key and isinstance(value, (int, float)) and "pdr" not in key:
                assert 0.0 <= value <= 1.0, (row["name"], key, value)
            if "ppl" in key and key != "ppl_vs_dense" and isinstance(value, float):
                assert math.isfinite(value) and value >= 1.0, (row["name"], key, value)
        if row["method"] != "dense":
            assert abs(row["sparsity"] - 0.5) < 1e-3, row  # 50 % and 2:4 both zero half of every target
            assert row["pattern"] == ("2:4" if row["setting"] == "2:4" else "unstructured")
    dense = next(r for r in rows if r["method"] == "dense")
    # the tiny model learned something: far below the uniform perplexity of its vocabulary
    assert dense["ppl"] < 0.5 * results["protocol"]["vocab_size"]
    by = {(r["method"], r["setting"]): r for r in rows}
    for setting in ("0.5", "2:4"):
        # the engine's ordering on the same calibration data: OBS-type solvers beat magnitude
        assert by[("robop-alps/baseline", setting)]["ppl"] < by[("magnitude", setting)]["ppl"]
        assert by[("sparsegpt", setting)]["ppl"] < by[("magnitude", setting)]["ppl"]
    # the corrupted contexts hurt the dense model and the probe hurts more than random noise
    for row in rows:
        assert row["suffix_ppl/tokens@0.2"] > row["suffix_ppl/clean"], row["name"]
        assert row["probe_ppl@0.1"] > row["noise_ppl@0.1"], row["name"]  # 3 ascent steps beat a random draw
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_files_and_a_checkpoint_that_loads_with_from_pretrained(fast_run):
    out, results = fast_run
    for name in ("results.json", "results.csv", "table.txt", "perplexity.png", "probe.png", "corrupted_tokens.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*.tmp*"))  # every file and folder was renamed into place
    saved = [r for r in results["rows"] if r["checkpoint"]]
    assert len(saved) == 2  # the best RobOP model of each setting
    from transformers import AutoModelForCausalLM

    row = saved[0]
    model = AutoModelForCausalLM.from_pretrained(row["checkpoint"]).eval()
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - row["sparsity"]) < 1e-3
    table = (out / "table.txt").read_text()
    assert all(r["method"] in table for r in results["rows"])


def test_the_log_says_when_every_phase_starts_and_ends_with_its_time(fast_run):
    """``python recipes/llama_alps.py --fast > log.txt``: a line when each phase starts, one when it ends, with seconds."""
    out, results = fast_run
    phases = phases_in_log((out.parent / "log.txt").read_text(), "llama_alps")
    for start in ("data: ", "dense model: training a tiny Llama", "pruning: ", "evaluation of ", "saving 2 checkpoint(s)",
                  "writing reports"):  # fmt: skip
        assert any(p.startswith(start) for p in phases), (start, list(phases))
    for row in results["rows"]:  # one pair of lines per model in the long loops
        assert any(p.startswith(f"evaluating {row['name']} (") for p in phases), row["name"]
        if row["method"] != "dense":
            what = row["setting"] if ":" in row["setting"] else f"{100 * float(row['setting']):g} %"
            assert any(p.startswith(f"pruning {row['method']} {what} (") for p in phases), row["name"]
    assert all(seconds >= 0 for seconds in phases.values())
    setup = sum(v for p, v in phases.items() if p.startswith(("data: ", "dense model: ")))
    assert results["timings"]["setup_s"] == pytest.approx(setup, abs=0.11)  # results.json's timings are the phases'


def test_bad_settings_are_refused_with_a_clear_message(capsys):
    recipe = _load_recipe()
    for bad in (["--settings", "1.5"], ["--settings", "4:2"], ["--settings", "half"], ["--suffix-len", "500"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(bad)
        assert "error" in capsys.readouterr().err


def test_runs_merge_into_one_table_and_other_protocols_are_refused(fast_run, tmp_path):
    """benchmarks/merge_runs.py joins one-setting-per-invocation runs (how the full Gemma grid is made)."""
    merge_runs = load_script("benchmarks/merge_runs.py")
    out, results = fast_run
    merged = merge_runs.main([str(out), str(out / "results.json"), "--out", str(tmp_path / "merged")])
    pruned = [r for r in results["rows"] if r["method"] != "dense"]
    assert [r["method"] for r in merged["rows"]].count("dense") == 1
    assert len(merged["rows"]) == 1 + 2 * len(pruned) and {r["run"] for r in merged["rows"]} == {0, 1}
    assert "--fast" not in merged["runs"][0]["options"] and "--settings 0.5 2:4" in merged["runs"][0]["options"]
    table = (tmp_path / "merged.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(merged["rows"])  # header + rows
    assert json.loads((tmp_path / "merged.json").read_text())["rows"] == merged["rows"]
    other = json.loads((out / "results.json").read_text())
    other["protocol"]["calibration"] = "something else"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="protocol differs"):
        merge_runs.main([str(out), str(tmp_path / "other.json"), "--out", str(tmp_path / "refused")])


def test_prune_then_sharded_fine_tune_on_two_processes(tmp_path):
    """``--finetune-steps K --devices 2 --strategy fsdp``: RobOPCallback prunes whole weights, FSDP2 shards
    them across 2 gloo processes (Lightning re-runs the script for the second), zeros held, then evaluated."""
    out = tmp_path / "out"
    run_script("recipes/llama_alps.py", ["--fast", "--settings", "0.5", "--robop-sets", "baseline", "--baselines",
                                         "magnitude", "--finetune-steps", "4", "--devices", "2", "--strategy", "fsdp",
                                         "--out", str(out), "--threads", "1"], log=tmp_path / "log.txt")  # fmt: skip
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    tuned = rows["robop-alps/baseline@0.5+ft"]
    assert tuned["zeros_held"] is True and tuned["devices"] == 2 and tuned["strategy"] == "fsdp"
    assert abs(tuned["sparsity"] - 0.5) < 1e-3  # the callback's masks: the one-shot setting
    assert math.isfinite(tuned["ppl"]) and tuned["ppl"] >= 1.0
    assert tuned["ppl"] != rows["robop-alps/baseline@0.5"]["ppl"]  # the fine-tune changed the model
    log = (tmp_path / "log.txt").read_text()
    assert "fine-tuning robop-alps/baseline@0.5 for 4 steps on 2 process(es), strategy fsdp done in" in log
