"""Does the fast scorer of ``uncertainty="auto"`` choose what the full solver would, and what does auto cost?

    .venv/bin/python benchmarks/sets_auto.py --threads 2                      # Gemma layers + DeiT (if cached)
    .venv/bin/python benchmarks/sets_auto.py --fast --out /tmp/sa             # a synthetic layer, seconds

For every captured layer (the captures of ``benchmarks/sets_layers.py``: calibration, held-out
in-domain and OOD inputs; by default Gemma blocks 1 and 15 (q, o, gate) and DeiT blocks 1 and 3) and setting (50 %, 70 %, 2:4) it runs the per-layer selection of
:mod:`robop_lightning.engine.selection` twice, with the default grid and 4 folds: scored by the default
``"admm"`` scorer (a short ADMM sharing one eigendecomposition per fold, on 32 sampled rows) and by
the pruning solver itself on all rows (RobOP-ALPS for Gemma, RobOP-CAP for the DeiT). It reports
how often the two choose the same candidate; the **regret** of the fast choice (its mean fold error
as the full solver scores it, over the best candidate's; Baseline's regret beside it); the
held-out and OOD error of the layer pruned with each choice as a ratio to the Baseline set; and
the time of each auto run (selection plus the final solve) as a ratio to one Baseline solve.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402
import sets_layers as SL  # noqa: E402

from robop_lightning import LayerInputs, prune_layer  # noqa: E402


def _rel(h, w, err):
    e, w = err.double(), w.double()
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=["gemma", "deit", "synthetic"])
    p.add_argument("--gemma-blocks", type=int, nargs="+", default=[1, 15])
    p.add_argument("--gemma-layers", nargs="+", default=["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"])
    p.add_argument("--deit-blocks", type=int, nargs="+", default=[1, 3])
    p.add_argument("--select", default="mean", choices=["mean", "worst"])
    p.add_argument("--fast-scorer", default="admm", help="the scorer compared with the full solver ('solver': the solver on --rows rows)")
    p.add_argument("--rows", type=int, default=32, help="rows the fast scorer scores on")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", default="benchmarks/results/sets_auto")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["synthetic"] if args.fast else ["gemma", "deit"])
    start = time.perf_counter()
    layers = SL.collect_layers(models, args.gemma_blocks, gemma_which=args.gemma_layers, deit_blocks=args.deit_blocks)
    settings = SL.SETTINGS[:1] if args.fast else SL.SETTINGS
    rows = []
    for model_name, solver, lname, w, x, xh, xo in layers:
        grams = {"heldout": LayerInputs(xh).gram(), "ood": LayerInputs(xo).gram()}
        for sparsity, pattern in settings:
            row = {"model": model_name, "layer": lname, "solver": solver, "pattern": pattern, "sparsity": sparsity}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                for label, kw in (("baseline", dict(uncertainty="baseline")),
                                  ("auto_fast", dict(uncertainty="auto", auto={"select": args.select, "scorer": args.fast_scorer,
                                                                               "rows": args.rows})),
                                  ("auto_full", dict(uncertainty="auto",
                                                     auto={"select": args.select, "scorer": "solver", "rows": None}))):
                    t = time.perf_counter()
                    r = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, name=lname, **kw)
                    row[f"{label}_seconds"] = time.perf_counter() - t
                    err = w - r.weight.float()
                    for key, h in grams.items():
                        row[f"{label}_{key}"] = _rel(h, w, err)
                    if r.selection is not None:
                        row[f"{label}_chosen"] = r.selection["chosen"]
                        row[f"{label}_fold_errors"] = r.selection["fold_errors"]
            row["agree"] = row["auto_fast_chosen"] == row["auto_full_chosen"]
            full = {k: statistics.mean(v) for k, v in row["auto_full_fold_errors"].items()}
            best = min(full.values())
            row["regret_fast"] = full[row["auto_fast_chosen"]] / best if best > 0 else 1.0
            row["regret_baseline"] = full["baseline"] / best if best > 0 else 1.0
            rows.append(row)
            print(f"{lname} {pattern} {sparsity} fast {row['auto_fast_chosen']:12s} full {row['auto_full_chosen']:12s} "
                  f"OOD x{row['auto_fast_ood'] / row['baseline_ood']:.3f} / x{row['auto_full_ood'] / row['baseline_ood']:.3f} "
                  f"regret {row['regret_fast']:.3f} (baseline {row['regret_baseline']:.3f}) "
                  f"time x{row['auto_fast_seconds'] / row['baseline_seconds']:.1f} / "
                  f"x{row['auto_full_seconds'] / row['baseline_seconds']:.1f}", flush=True)
    return _report(args, argv, start, rows)


def _report(args, argv, start, rows):
    def med(vals):
        vals = list(vals)
        return f"{statistics.median(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"

    lines = [f"Command: `{R.command_line('benchmarks/sets_auto.py', argv)}`", "",
             f"Machine: {R.machine_line(R.machine('cpu'))}", "",
             f"Total {time.perf_counter() - start:.0f} s. Per model and setting, over layers (median [min, max]): how "
             f"often the fast scorer (`{args.fast_scorer}` on {args.rows} rows) chose the candidate that the pruning solver itself chose; "
             "the regret of the fast choice (its mean fold error as the full solver scores it, over the best "
             "candidate's) and of always choosing Baseline; held-out and OOD error of the layer pruned with each "
             "choice over the Baseline set's; time of each auto run (selection + final solve) over one Baseline "
             "solve.", "",
             "| model | setting | layers | agree | regret fast | regret Baseline | held-out fast | held-out full | "
             "OOD fast | OOD full | time fast | time full |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for key in dict.fromkeys((r["model"], r["pattern"], r["sparsity"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["pattern"], r["sparsity"]) == key]
        setting = R.setting_label(key[1], key[2])
        agree = sum(r["agree"] for r in rs)
        entry = {"model": key[0], "setting": setting, "layers": len(rs), "agree": agree}
        cells = []
        for kind in ("fast", "baseline"):
            vals = [r[f"regret_{kind}"] for r in rs]
            entry[f"regret_{kind}_median"] = statistics.median(vals)
            cells.append(med(vals))
        for part in ("heldout", "ood"):
            for kind in ("fast", "full"):
                vals = [r[f"auto_{kind}_{part}"] / r[f"baseline_{part}"] for r in rs]
                entry[f"{part}_{kind}_median"] = statistics.median(vals)
                cells.append(med(vals))
        for kind in ("fast", "full"):
            vals = [r[f"auto_{kind}_seconds"] / r["baseline_seconds"] for r in rs]
            entry[f"time_{kind}_median"] = statistics.median(vals)
            cells.append(med(vals))
        summary.append(entry)
        lines.append(f"| {key[0]} | {setting} | {len(rs)} | {agree}/{len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", f"| layer | setting | chosen (fast: {args.fast_scorer}) | chosen (solver) |", "|---|---|---|---|"]
    for r in rows:
        setting = R.setting_label(r["pattern"], r["sparsity"])
        lines.append(f"| {r['layer']} | {setting} | {r['auto_fast_chosen']} | {r['auto_full_chosen']} |")
    markdown = "\n".join(lines) + "\n"
    payload = {"command": R.command_line("benchmarks/sets_auto.py", argv), "machine": R.machine("cpu"),
               "summary": summary, "rows": rows}
    R.publish(args.out, payload, markdown)
    return rows


if __name__ == "__main__":
    main()
