"""The reports of ``recipes/deit_cap.py``: its result rows, tables, paired comparisons, protocol and plots.

Imported by the recipe as a sibling (``import _deit_reports as reports``), like ``_common``:
:func:`model_label` / ``ROBOP_SOLVERS`` (how a method is named in every row and table),
:func:`compare_to_baseline` (the paired bootstrap differences against RobOP-CAP under the Baseline
set), :func:`make_row` (one model's line of ``results.json`` / ``results.csv``), :func:`make_protocol`
(what every number means) and :func:`write_reports` (``results.json`` / ``.csv``, ``table.txt``,
``comparisons.md`` and the three PNG plots, each written to a temporary name and renamed).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from robop_lightning.utils.files import atomic_write  # temporary sibling, fsync, rename
from robop_lightning.robustness import relative_mce
from robop_lightning.robustness.metrics import format_eps, mce
from robop_lightning.robustness.stats import accuracy_difference_ci, format_ci
from robop_lightning.engine.sets import parse_set_spec

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling helpers, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


# RobOP-CAP with CAP's empirical Fisher of the loss (as published), and on the layer Gram (label-free)
ROBOP_SOLVERS = ("cap", "cap-gram")


def model_label(solver: str, uncertainty: str) -> str:
    return f"robop-{solver}/{uncertainty}" if solver in ROBOP_SOLVERS else solver


# how to read the two corruption columns: under the table (table.txt, the terminal)
MCE_NOTE = """\
mCE: mean corruption error against the dense model (each corruption's errors summed over
  severities, divided by the dense model's, averaged over corruptions; dense = 1). Lower = fewer
  errors under corruption overall: rank robustness by this column.
rel mCE: Hendrycks' relative mCE, the same ratio of each model's DROP from its own clean accuracy
  (1 = degrades as much as the dense model). It measures degradation, not errors: a poor model has
  little left to lose, so it can score low (even below 0) while making more errors than the dense one."""


def make_row(name: str, entry: dict, raw: dict[str, dict], vs_baseline: dict | None, args, eps: list[float]) -> dict:
    """One model's line of ``results.json`` / ``results.csv``: every accuracy, both mCEs, its costs."""
    r, dense = raw[name], raw["dense"]
    row = dict(
        name=name, method=entry["method"], solver=entry["solver"] or "-", uncertainty=entry["uncertainty"] or "-",
        sparsity=round(entry["sparsity"], 4), pattern="unstructured" if entry["solver"] else "dense",
        finetuned=entry["finetuned"], val_acc=entry["val_acc"], clean_acc=r["clean"]["test/clean_acc"],
        clean_acc_eval_subset=r["corrupted"]["test/clean_acc"],
        corrupt_acc=r["corrupted"].get("test/corrupt_acc", math.nan),
        rel_mce=1.0 if name == "dense" else relative_mce(r["corrupted"], dense["corrupted"]),
        mce=1.0 if name == "dense" else mce(r["corrupted"], dense["corrupted"]),
        vs_baseline=vs_baseline,
    )  # fmt: skip
    for c in args.corruptions:
        row[f"corrupt_acc/{c}"] = r["corrupted"][f"test/corrupt_acc/{c}"]
    if r["attacked"]:
        row["clean_acc_adv_subset"] = r["attacked"]["test/clean_acc"]
    for e in eps:
        row[f"pgd_acc@{format_eps(e)}"] = r["attacked"].get(f"test/adv_acc@linf_{format_eps(e)}", math.nan)
        row[f"fgsm_acc@{format_eps(e)}"] = r["attacked"].get(f"test/fgsm_acc@{format_eps(e)}", math.nan)
    for c in args.corruptions:
        for s in args.severities:
            row[f"corrupt_acc/{c}@{s}"] = r["corrupted"][f"test/corrupt_acc/{c}@{s}"]
    row.update(prune_seconds=round(entry["prune_seconds"], 3), prune_peak_mb=entry.get("prune_peak_mb"),
               finetune_seconds=entry.get("finetune_seconds"),
               eval_seconds=round(entry["eval_seconds"], 2), nominal_error=entry.get("nominal_error"),
               robust_error=entry.get("robust_error"), masks_match_one_shot=entry.get("masks_match_one_shot"),
               masks_held=entry.get("masks_held"), checkpoint=None)  # fmt: skip
    return row


def compare_to_baseline(models: dict[str, dict], correct: dict[str, dict], args) -> tuple[str | None, dict]:
    """Every RobOP-CAP model against RobOP-CAP under the Baseline set, paired image by image.

    The reference is the model of the first Baseline entry of ``--robop-sets`` (plain ``baseline``
    if listed) at the same sparsity and with the same fine-tuning; a model without one is left out.
    Returns the reference method and ``{name: {"clean" | "corrupt" | "pgd": [estimate, low, high]}}``
    (accuracy differences as fractions; ``pgd`` is ``None`` without attacks).
    """
    specs = [u for u in args.robop_sets if parse_set_spec(u, allow_auto=False)[0] == "baseline"]
    if not specs:
        return None, {}
    reference = model_label("cap", "baseline" if "baseline" in specs else specs[0])
    differences = {}
    for name, entry in models.items():
        other = f"{reference}@{entry.get('target_sparsity', 0):g}" + ("+ft" if entry["finetuned"] else "")
        if entry["solver"] not in ROBOP_SOLVERS or other not in correct:
            continue
        differences[name] = {
            key: None if correct[name][key] is None else list(accuracy_difference_ci(
                correct[name][key], correct[other][key], resamples=args.bootstrap, seed=args.seed))
            for key in ("clean", "corrupt", "pgd")
        }  # fmt: skip
    return reference, differences


def make_protocol(args, models: dict[str, dict], reference: str | None, inputs: dict, data_id: str, dense_ckpt: Path,
                  calibration_batches: int) -> dict:  # fmt: skip
    """What every number means, in words (``results.json``'s ``protocol``)."""
    eps, test = inputs["eps"], inputs["test"]
    n_eval, n_adv = len(inputs["eval_positions"]), len(inputs["adv_positions"])
    return dict(
        data=data_id, dense_checkpoint=str(dense_ckpt) if args.epochs else None,
        parameters=sum(p.numel() for p in models["dense"]["model"].parameters()),
        calibration=f"{args.calibration_size} fixed training images ({calibration_batches} batches), the same for every method",
        clean=f"top-1 on the whole test split ({len(test)} images)",
        corrupted=f"{n_eval} random test images (seed {args.seed}) x {len(args.corruptions)} corruptions x "
        f"severities {args.severities}, ImageNet-C-style, {'CIFAR-10-C' if args.img_size <= 32 else 'ImageNet-C'} parameters",
        adversarial=f"{n_adv} of those: PGD L-inf {args.pgd_steps} steps, {args.pgd_restarts} restart(s), "
        f"step eps/4, random start; FGSM; eps {[format_eps(e) for e in eps]}",
        rel_mce="Hendrycks' relative mCE against the dense model on the evaluated subset (1 = same degradation)",
        mce="mean corruption error against the dense model on the evaluated subset (1 = as many errors; lower = "
        "fewer errors under corruption)",
        vs_baseline=f"accuracy minus that of {reference or 'robop-cap/baseline (not run)'} at the same sparsity and "
        f"fine-tuning, [estimate, low, high], a {args.bootstrap}-resample paired percentile bootstrap (95 %) over "
        f"images: clean on the {len(test)} test images; corrupt on the {n_eval} evaluated images, each "
        f"scored by the fraction of its corrupted variants classified correctly; pgd at eps "
        f"{format_eps(max(eps)) if eps else '-'} on the {n_adv} attacked images",
        selection="best = highest validation accuracy (5k held-out training images), never the test set",
    )  # fmt: skip


def write_reports(args, out: Path, rows: list[dict], protocol: dict, reference: str | None, eps: list[float],
                  kept: set[str], progress: common.Progress) -> dict:  # fmt: skip
    """``results.json`` / ``.csv``, ``table.txt``, ``comparisons.md`` and the plots; the table printed."""
    timings = progress.timings
    with progress.phase(f"writing reports to {out}"):
        results = dict(config=vars(args), protocol=protocol, environment=common.environment(), timings=timings,
                       rows=rows)  # fmt: skip
        table = format_table(rows, eps) + "\n\n" + MCE_NOTE
        common.write_results(out, results, table)
        comparisons = format_comparisons(rows, reference, protocol["vs_baseline"], eps)
        atomic_write(out / "comparisons.md", comparisons + "\n")
        plot_all(rows, args, eps, out)
    print(f"\n{table}", flush=True)
    print(f"\n{protocol['corrupted']}; {protocol['adversarial']}")
    print()
    print(comparisons)
    print(f"\nwrote {out}/results.json, results.csv, table.txt, comparisons.md, *.png" + (", checkpoints/" if kept else ""))
    print(common.timings_line(timings), flush=True)
    return results


# ----------------------------------------------------------------------------- tables
def format_table(rows: list[dict], eps: list[float]) -> str:
    """The terminal table: one line per model, accuracies in %, absolute and relative mCE side by side."""
    adv = [f"pgd {format_eps(e).replace('/255', '')}" for e in eps]
    header = ["method", "sparsity", "val", "clean", "corrupt", "mCE", "rel mCE", *adv]
    if eps:
        header.append(f"fgsm {format_eps(eps[-1]).replace('/255', '')}")
    header += ["prune s", "prune MiB"]
    lines = []
    for r in rows:
        cells = [r["method"], f"{r['sparsity']:.2f}", f"{100 * r['val_acc']:.1f}", f"{100 * r['clean_acc']:.1f}",
                 f"{100 * r['corrupt_acc']:.1f}", f"{r['mce']:.3f}", f"{r['rel_mce']:.3f}"]  # fmt: skip
        cells += [f"{100 * r[f'pgd_acc@{format_eps(e)}']:.1f}" for e in eps]
        if eps:
            cells.append(f"{100 * r[f'fgsm_acc@{format_eps(eps[-1])}']:.1f}")
        cells.append(f"{r['prune_seconds']:.1f}")
        cells.append("-" if r.get("prune_peak_mb") is None else f"{r['prune_peak_mb']:.0f}")
        lines.append(cells)
    return common.text_table(header, lines)


def format_comparisons(rows: list[dict], reference: str | None, note: str, eps: list[float]) -> str:
    """The paired-difference table (markdown): accuracy minus the Baseline set's, in percentage points."""
    if reference is None:
        return "No paired comparisons: --robop-sets has no baseline set."
    header = ["method", "sparsity", "clean diff [95 % CI]", "corrupt diff [95 % CI]",
              f"PGD {format_eps(max(eps)) if eps else '-'} diff [95 % CI]"]  # fmt: skip
    points = lambda ci: "n/a" if ci is None else format_ci(*(100 * v for v in ci), fmt="{:+.2f}")  # noqa: E731
    lines = [[r["method"], f"{r['sparsity']:.2f}", *(points(r["vs_baseline"][k]) for k in ("clean", "corrupt", "pgd"))]
             for r in rows if r.get("vs_baseline")]  # fmt: skip
    return f"Paired differences in percentage points: {note}.\n\n" + common.markdown_table(header, lines)


# ----------------------------------------------------------------------------- plots
def _style(method: str) -> dict:
    """RobOP sets in cool colours with circles, the other methods warm with squares, dense black."""
    colours = {"robop-cap/baseline": "#08519c", "robop-cap/trace": "#3182bd", "robop-cap/e": "#31a354",
               "robop-cap/cte": "#006d2c", "robop-cap/minmax-trace": "#6baed6", "robop-cap/minmax-e": "#74c476",
               "robop-cap/cvar": "#41ab5d", "sparsegpt": "#e6550d", "wanda": "#d62728", "magnitude": "#7f7f7f",
               "dense": "black"}  # fmt: skip
    base = method.removesuffix("+ft")
    style = dict(color=colours.get(base, "#9467bd"), marker="o" if base.startswith("robop") else "s", markersize=5)
    if method.endswith("+ft"):
        style.update(linestyle="--", marker="^", markersize=7)
    if method == "dense":
        style.update(marker="D", linewidth=2.2, zorder=4)
    return style


def plot_all(rows: list[dict], args, eps: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["method"] == "dense")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))

    # accuracy vs sparsity: clean, corrupted, PGD at each of the two middle radii
    panels = [("clean_acc", "clean (test set)"), ("corrupt_acc", "corrupted (mean over corruptions x severities)")]
    panels += [(f"pgd_acc@{format_eps(e)}", f"PGD L-inf eps {format_eps(e)}") for e in eps[:2]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for method in methods:
            points = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == method)
            if not method.endswith("+ft"):
                points = [(0.0, dense[key]), *points]
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], label=method, **_style(method))
        ax.scatter([0.0], [100 * dense[key]], color="black", zorder=5, label="dense")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(sorted({0.0, *args.sparsity}))
        ax.set_xlabel("sparsity of the pruned linears")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, bbox_to_anchor=(0.5, -0.12))
    fig.suptitle("DeiT one-shot pruning: accuracy vs sparsity (dashed: + fine-tuning)", fontsize=11)
    common.save_png(fig, out / "accuracy_vs_sparsity.png")
    plt.close(fig)

    # corrupted accuracy per corruption: one heat map per sparsity (rows: models, columns: corruptions)
    top = max(args.sparsity)
    fig, axes = plt.subplots(1, len(args.sparsity), figsize=(1.0 + 0.75 * (len(args.corruptions) + 1) * len(args.sparsity),
                                                            1.2 + 0.42 * (len(methods) + 1)), squeeze=False)  # fmt: skip
    for ax, s in zip(axes[0], sorted(args.sparsity)):
        chosen = [dense] + [r for r in rows if r["method"] != "dense" and abs(r.get("sparsity", 0) - s) < 0.01
                            and (not r["finetuned"] or s == top)]  # fmt: skip
        columns = [f"corrupt_acc/{c}" for c in args.corruptions] + ["corrupt_acc", "clean_acc_eval_subset"]
        values = torch.tensor([[100 * r[c] for c in columns] for r in chosen])
        image = ax.imshow(values, cmap="viridis", vmin=float(values.min()), vmax=float(values.max()), aspect="auto")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                dark = float(values[i, j]) < float(values.min() + 0.55 * (values.max() - values.min()))
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(len(columns)), [c.split("/")[-1].replace("_", " ") for c in columns[:-2]] + ["MEAN", "clean"],
                      rotation=55, ha="right", fontsize=8)  # fmt: skip
        ax.set_yticks(range(len(chosen)), [r["method"] for r in chosen], fontsize=8)
        ax.set_title(f"sparsity {s:g}: accuracy (%) per corruption", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03)
    common.save_png(fig, out / "corruptions.png")
    plt.close(fig)

    # adversarial accuracy vs eps: one panel per sparsity, dense in every panel
    if eps:
        fig, axes = plt.subplots(1, len(args.sparsity), figsize=(4.6 * len(args.sparsity), 3.8), squeeze=False)
        xs = [0.0] + [e * 255 for e in eps]
        for ax, s in zip(axes[0], sorted(args.sparsity)):
            chosen = [dense] + [r for r in rows if r["method"] != "dense" and abs(r["sparsity"] - s) < 0.01]
            for r in chosen:
                ys = [r["clean_acc_adv_subset"]] + [r[f"pgd_acc@{format_eps(e)}"] for e in eps]
                ax.plot(xs, [100 * y for y in ys], label=r["method"], **_style(r["method"]))
            ax.set_title(f"sparsity {s:g}: PGD L-inf ({args.pgd_steps} steps)", fontsize=10)
            ax.set_xlabel("eps (x 1/255)")
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("robust accuracy (%)")
        handles, labels = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, bbox_to_anchor=(0.5, -0.14))
        common.save_png(fig, out / "adversarial.png")
        plt.close(fig)
