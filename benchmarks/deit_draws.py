"""The DeiT main job's set comparison over several calibration draws, per corruption family.

    .venv/bin/python recipes/deit_cap.py            # once: trains and caches the dense DeiT
    .venv/bin/python benchmarks/deit_draws.py --draws 5 --sparsity 0.8 0.9 \\
        --robop-sets baseline trace e --gram-sets baseline --baselines sparsegpt
    .venv/bin/python benchmarks/deit_draws.py --fast --out /tmp/dd    # a tiny DeiT, a minute

**Protocol.** The recipe's own code (``recipes/deit_cap.py``: ``prune_one``, ``evaluate_one``) on its
cached dense DeiT (``--fast``: a tiny one trained here in seconds) and the recipe's options (every
recipe option is accepted, e.g. ``--eval-size``, ``--corruptions``). Per calibration draw ``d``
(``--draws``; draw 0 is the recipe's calibration subset, draw ``d > 0`` another random subset of the
same training split: :class:`~robop_lightning.data.FashionMNISTDataModule` ``calibration_draw``)
and per sparsity, every method prunes a fresh copy of the dense model; every pruned model is scored
on the same test images (clean on all of them, each corruption family on ``--eval-size`` of them,
PGD at the largest ``--eps`` on ``--adv-size``).

**Statistics.** Each method's accuracy minus that of RobOP-CAP (CAP's Fisher) under the Baseline set
of the same draw and sparsity, in points: per draw, and pooled over draws with a two-way (crossed)
bootstrap 95 % interval that resamples draws and images, the same images for every draw
(:func:`robop_lightning.robustness.stats.crossed_difference_ci`). Finished runs are kept under
``--work`` (one JSON per draw x sparsity x method, draw by draw) and resumed. Writes ``<out>.json``
(with the commit) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "recipes"))
import _real_layers as R  # noqa: E402
import deit_cap  # noqa: E402

from robop_lightning.data import FashionMNISTDataModule  # noqa: E402
from robop_lightning.robustness.stats import crossed_difference_ci, format_ci  # noqa: E402

REFERENCE = "robop-cap/baseline"


def _own_args(argv) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("--draws", type=int, default=5, help="calibration draws (0 .. K-1)")
    p.add_argument("--work", default=None, help="finished runs (default: <out>_runs/)")
    p.add_argument("--out", default="benchmarks/results/deit_draws")
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        p.print_help()
        print("\nEvery other option is the recipe's (recipes/deit_cap.py --help).")
        raise SystemExit(0)
    if own.draws < 1:
        p.error("--draws must be >= 1")
    return own, rest


def _dense(args, progress):
    """The recipe's cached dense DeiT (trained by the recipe when missing; seconds with --fast)."""
    datamodule, data_id, in_chans = deit_cap.setup_data(args, progress)
    dense, _ = deit_cap.dense_model(args, datamodule, data_id, in_chans, progress)
    return dense.eval(), datamodule


def _run(args, dense, calibration, inputs, sparsity: float, solver: str, uncertainty: str, draw: int) -> dict:
    entry = deit_cap.prune_one(args, dense, calibration, sparsity, solver, uncertainty)
    raw, correct = deit_cap.evaluate_one(args, entry, inputs)
    return {"draw": draw, "commit": R.git_commit(), "method": entry["method"], "sparsity": sparsity,
            "prune_seconds": entry["prune_seconds"],
            "accuracy": {k: float(torch.as_tensor(v).mean()) for k, v in correct.items() if v is not None},
            "correct": {k: None if v is None else torch.as_tensor(v).tolist() for k, v in correct.items()}}


def compare(runs: dict, keys: list[str], resamples: int, seed: int) -> list[dict]:
    """Per sparsity and method: pooled accuracy, per-draw and pooled differences to the reference."""
    rows = []
    for sparsity, method in dict.fromkeys((r["sparsity"], r["method"]) for r in runs.values()):
        pairs = sorted(((r, runs.get(_key(r["draw"], sparsity, REFERENCE))) for r in runs.values()
                        if r["sparsity"] == sparsity and r["method"] == method), key=lambda rb: rb[0]["draw"])
        pairs = [(r, b) for r, b in pairs if b is not None]
        if not pairs:
            continue
        row = {"sparsity": sparsity, "method": method, "draws": [r["draw"] for r, _ in pairs],
               "prune_seconds": statistics.mean(r["prune_seconds"] for r, _ in pairs)}
        for key in keys:
            if pairs[0][0]["correct"].get(key) is None:
                continue
            a = [r["correct"][key] for r, _ in pairs]
            b = [base["correct"][key] for _, base in pairs]
            row[f"acc_{key}"] = 100 * statistics.mean(r["accuracy"][key] for r, _ in pairs)
            row[f"per_draw_{key}"] = [100 * (r["accuracy"][key] - base["accuracy"][key]) for r, base in pairs]
            row[f"diff_{key}"] = [100 * v for v in crossed_difference_ci(a, b, resamples=resamples, seed=seed)]
        rows.append(row)
    return rows


def _key(draw: int, sparsity: float, method: str) -> str:
    return f"d{draw}_{sparsity:g}_{method.replace('/', '_')}"


def markdown(payload: dict, keys: list[str]) -> str:
    rows, proto = payload["comparisons"], payload["protocol"]
    label = {"clean": "clean", "corrupt": "corrupted (all)", "pgd": f"PGD {proto['pgd_eps']}"}
    families = [k for k in keys if k.startswith("corrupt/")]
    main = [k for k in ("clean", "corrupt", "pgd") if any(f"diff_{k}" in r for r in rows)]
    draws = sorted({d for r in rows for d in r["draws"]})
    cell = lambda r, k: format_ci(*r[f"diff_{k}"], fmt="{:+.2f}") if f"diff_{k}" in r else "-"  # noqa: E731
    md = [f"Command: `{payload['command']}`", "", f"Commit (of the runs): `{payload['commit']}`", "",
          f"Machine: {R.machine_line(payload['machine'])}", "",
          f"{proto['model']}; {len(draws)} calibration draws ({', '.join(map(str, draws))}) of "
          f"{proto['calibration_size']} training images (draw 0: the recipe's subset); clean accuracy on "
          f"{proto['test_images']} test images, corruptions on {proto['eval_images']}, PGD on {proto['adv_images']}.", "",
          f"Accuracy minus that of {REFERENCE} (CAP's Fisher, Baseline set) of the same draw and sparsity, in points, "
          "pooled over draws, with a two-way bootstrap 95 % interval over draws and images (above 0: better than "
          "Baseline); the mean accuracy over draws in the second table.", "",
          "| sparsity | method | " + " | ".join(f"{label[k]} diff [95 % CI]" for k in main) + " | prune s |",
          "|---|---|" + "---|" * (len(main) + 1)]
    for r in rows:
        md.append(f"| {r['sparsity']:g} | {r['method']} | " + " | ".join(cell(r, k) for k in main)
                  + f" | {r['prune_seconds']:.1f} |")
    md += ["", "Mean accuracy over draws (%) and each draw's difference to Baseline (points):", "",
           "| sparsity | method | " + " | ".join(f"{label[k]}; per draw" for k in main) + " |",
           "|---|---|" + "---|" * len(main)]
    for r in rows:
        md.append(f"| {r['sparsity']:g} | {r['method']} | " + " | ".join(
            f"{r[f'acc_{k}']:.2f}; " + " ".join(f"{v:+.2f}" for v in r[f"per_draw_{k}"]) for k in main) + " |")
    if families:
        md += ["", "Per corruption family (mean over its severities): difference to Baseline, pooled over draws, "
               "[95 % CI] in points.", "",
               "| sparsity | method | " + " | ".join(k.split("/", 1)[1] for k in families) + " |",
               "|---|---|" + "---|" * len(families)]
        for r in rows:
            if r["method"] != REFERENCE:
                md.append(f"| {r['sparsity']:g} | {r['method']} | " + " | ".join(cell(r, k) for k in families) + " |")
    return "\n".join(md) + "\n"


def main(argv=None) -> dict:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = _own_args(raw_argv)
    args = deit_cap.parse_args(rest)
    if args.data is not None:
        raise SystemExit("deit_draws.py runs on Fashion-MNIST (the recipe's default data); drop --data.")
    if "baseline" not in args.robop_sets:
        raise SystemExit("--robop-sets must include plain 'baseline': every method is compared with it.")
    torch.set_num_threads(max(1, args.threads))
    work = pathlib.Path(own.work or f"{own.out}_runs")
    work.mkdir(parents=True, exist_ok=True)
    dense, datamodule = _dense(args, deit_cap.common.Progress("deit_draws"))
    inputs = deit_cap.evaluation_inputs(args, datamodule)
    jobs = [(s, "cap", u) for s in args.sparsity for u in args.robop_sets]
    jobs += [(s, "cap-gram", u) for s in args.sparsity for u in args.gram_sets]
    jobs += [(s, b, "baseline") for s in args.sparsity for b in args.baselines]
    runs: dict[str, dict] = {}
    for draw in range(own.draws):
        dm = FashionMNISTDataModule(img_size=args.img_size, batch_size=args.batch_size,
                                    calibration_size=args.calibration_size, seed=args.seed, calibration_draw=draw)
        dm.setup()
        calibration = list(dm.calibration_dataloader())
        for sparsity, solver, uncertainty in jobs:
            key = _key(draw, sparsity, deit_cap.reports.model_label(solver, uncertainty))
            path = work / f"{key}.json"
            if not path.exists():
                run = _run(args, dense, calibration, inputs, sparsity, solver, uncertainty, draw)
                path.write_text(json.dumps(run))
                print(f"draw {draw} {sparsity:g} {run['method']:26s} prune {run['prune_seconds']:6.1f}s  "
                      + "  ".join(f"{k} {100 * v:.2f}" for k, v in run["accuracy"].items() if "/" not in k), flush=True)
            runs[key] = json.loads(path.read_text())
    keys = ["clean", "corrupt", "pgd", *(f"corrupt/{c}" for c in args.corruptions)]
    comparisons = compare(runs, keys, args.bootstrap, args.seed)
    protocol = {"model": f"DeiT {args.model_kwargs} on Fashion-MNIST (the recipe's cached dense model)",
                "calibration_size": args.calibration_size, "draws": own.draws, "test_images": len(inputs["test"]),
                "eval_images": len(inputs["eval_positions"]), "adv_images": len(inputs["adv_positions"]),
                "pgd_eps": f"{max(args.eps):g}/255" if args.eps else None,
                "interval": "two-way (crossed) percentile bootstrap over calibration draws and test images"}
    commits = ", ".join(sorted({r.get("commit") or "unrecorded" for r in runs.values()}))
    payload = {"command": R.command_line("benchmarks/deit_draws.py", argv), "commit": commits,
               "machine": R.machine(), "protocol": protocol, "comparisons": comparisons,
               "runs": {k: {f: v for f, v in r.items() if f != "correct"} for k, r in runs.items()}}
    R.publish(own.out, payload, markdown(payload, keys))
    return payload


if __name__ == "__main__":
    main()
