"""The reports of ``recipes/llama_alps.py``: its result rows, table, protocol and plots.

Imported by the recipe as a sibling (``import _llama_reports as reports``), like ``_common``:
:func:`make_row` (one model's line of ``results.json`` / ``results.csv``), :func:`make_protocol`
(what every number means) and :func:`write_reports` (``results.json`` / ``.csv``, ``table.txt`` and
the PNG plots, each written to a temporary name and renamed).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from robop_lightning.data import TextDataModule
from robop_lightning.robustness.text import PROBE_LABEL

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling helpers, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def write_reports(args, out: Path, rows: list[dict], protocol: dict, saved: dict[str, str],
                  progress: common.Progress) -> dict:  # fmt: skip
    """``results.json`` / ``.csv``, ``table.txt`` and the plots; the table printed."""
    timings = progress.timings
    with progress.phase(f"writing reports to {out}"):
        results = dict(config=vars(args), protocol=protocol, environment=common.environment(), timings=timings,
                       rows=rows)  # fmt: skip
        table = format_table(rows, args)
        common.write_results(out, results, table)
        plot_all(rows, args, out)
    print(f"\n{table}")
    print(f"\n{protocol['perplexity']}\n{protocol['corrupted']}\n{protocol['probe']}")
    print(f"wrote {out}/results.json, results.csv, table.txt, *.png" + (", checkpoints/" if saved else ""))
    print(common.timings_line(timings), flush=True)
    return results


def make_protocol(args, datamodule: TextDataModule, dense) -> dict:
    """What every number means, in words (``results.json``'s ``protocol``)."""
    test = datamodule.splits["test"]
    return dict(
        model=args.model, parameters=sum(p.numel() for p in dense.parameters()), vocab_size=len(datamodule.tokenizer),
        calibration=f"{len(datamodule.splits['calibration'])} windows x {args.seqlen} tokens of {args.corpus} "
        "(their own region), the same for every method",
        perplexity=f"exp(mean token NLL) over every scored token of the first {test.shape[0]} "
        f"{args.corpus} test windows (in-domain) and {datamodule.splits['ood'].shape[0] if 'ood' in datamodule.splits else 0} "
        f"{args.ood_corpus} windows (OOD), BOS-prefixed",
        corrupted=f"{test[: args.corrupt_windows].shape[0]} test windows, the last {args.suffix_len} tokens scored, "
        f"context corrupted by {args.corruptions} at p {args.severities}, seeded per window; PDR = 1 - acc / clean acc",
        probe=f"{PROBE_LABEL}: {test[: args.probe_windows].shape[0]} windows, L2 PGD on context embeddings, "
        f"{args.probe_steps} steps, eps {args.probe_eps} x mean embedding norm; random noise of the same radius beside it",
    )  # fmt: skip


def make_row(name: str, entry: dict, dense: dict) -> dict:
    row = dict(name=name, method=entry["method"], solver=entry["solver"] or "-", uncertainty=entry["uncertainty"] or "-",
               setting=entry["setting"], sparsity=round(entry["sparsity"], 4), pattern=entry["pattern"],
               **entry["scores"])  # fmt: skip
    for kind, results in entry["corrupted"].items():
        for r in results:
            key = "clean" if r["severity"] == 0 else f"{kind}@{r['severity']:g}"
            row[f"suffix_acc/{key}"] = r["acc"]
            row[f"suffix_ppl/{key}"] = r["ppl"]
            if r["severity"]:
                row[f"pdr/{key}"] = r["pdr"]
    for r in entry["probe"]:
        if r["eps"]:
            row[f"probe_acc@{r['eps']:g}"] = r["acc"]
            row[f"probe_ppl@{r['eps']:g}"] = r["ppl"]
            row[f"noise_acc@{r['eps']:g}"] = r["noise_acc"]
            row[f"noise_ppl@{r['eps']:g}"] = r["noise_ppl"]
            row[f"probe_pdr@{r['eps']:g}"] = r["pdr"]
    row.update(ppl_vs_dense=row["ppl"] / dense["scores"]["ppl"], prune_seconds=round(entry["prune_seconds"], 2),
               eval_seconds=round(entry["eval_seconds"], 2), nominal_error=entry.get("nominal_error"),
               robust_error=entry.get("robust_error"))  # fmt: skip
    if "zeros_held" in entry:  # a fine-tuned model
        row.update({k: entry[k] for k in ("zeros_held", "finetune_steps", "devices", "strategy")})
    return row


def format_table(rows: list[dict], args) -> str:
    """The terminal table: one line per model; perplexities, accuracies in %."""
    corrupt = [f"{k}@{s:g}" for k in args.corruptions for s in args.severities]
    header = ["method", "setting", "ppl", "ood ppl", "acc", "ood acc", *[c.replace("tokens", "tok") for c in corrupt],
              *[f"probe {e:g}" for e in args.probe_eps], "prune s"]  # fmt: skip
    lines = []
    for r in rows:
        cells = [r["method"], r["setting"], f"{r['ppl']:.2f}", f"{r.get('ood_ppl', math.nan):.2f}",
                 f"{100 * r['next_token_acc']:.1f}", f"{100 * r.get('ood_next_token_acc', math.nan):.1f}"]  # fmt: skip
        cells += [f"{100 * r[f'suffix_acc/{c}']:.1f}" for c in corrupt]
        cells += [f"{100 * r[f'probe_acc@{e:g}']:.1f}" for e in args.probe_eps]
        cells.append(f"{r['prune_seconds']:.1f}")
        lines.append(cells)
    return common.text_table(header, lines, left=2)


# ----------------------------------------------------------------------------- plots
_COLOURS = {"robop-alps/baseline": "#08519c", "robop-alps/trace": "#3182bd", "robop-alps/e": "#31a354",
            "robop-alps/cte": "#006d2c", "robop-alps/cvar": "#41ab5d", "sparsegpt": "#e6550d", "wanda": "#d62728", "magnitude": "#7f7f7f",
            "dense": "black"}  # fmt: skip


def plot_all(rows: list[dict], args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["method"] == "dense")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    by = {(r["method"], r["setting"]): r for r in rows}

    # perplexity per setting: grouped bars (log scale), in-domain and OOD, dense as a line
    panels = [("ppl", f"in-domain ({args.corpus}) perplexity")]
    if "ood_ppl" in dense:
        panels.append(("ood_ppl", f"OOD ({args.ood_corpus}) perplexity"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.0), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, (key, title) in zip(axes[0], panels):
        for i, method in enumerate(methods):
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(args.settings))]
            ys = [by[(method, s)][key] if (method, s) in by else math.nan for s in args.settings]
            ax.bar(xs, ys, width=width, color=_COLOURS.get(method, "#9467bd"), label=method)
        ax.axhline(dense[key], color="black", linewidth=1.5, label="dense")
        ax.set_yscale("log")
        ax.set_xticks(range(len(args.settings)), args.settings)
        ax.set_xlabel("sparsity / pattern")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("one-shot pruning: perplexity (lower is better)", fontsize=11)
    common.save_png(fig, out / "perplexity.png")
    plt.close(fig)

    # corrupted-context suffix accuracy vs severity and probe accuracy vs eps, one panel per setting
    for kind_key, xs_values, title, fname in [
        *[(kind, [0.0, *args.severities], f"context {kind}: suffix accuracy", f"corrupted_{kind}.png")
          for kind in args.corruptions],
        ("probe", [0.0, *args.probe_eps], "embedding-space probe (L2 PGD): suffix accuracy", "probe.png"),
    ]:  # fmt: skip
        fig, axes = plt.subplots(1, len(args.settings), figsize=(4.4 * len(args.settings), 3.6), squeeze=False)
        for ax, setting in zip(axes[0], args.settings):
            for method in ["dense", *methods]:
                r = dense if method == "dense" else by.get((method, setting))
                if r is None:
                    continue
                keys = ["suffix_acc/clean"] + ([f"probe_acc@{e:g}" for e in args.probe_eps] if kind_key == "probe"
                                               else [f"suffix_acc/{kind_key}@{s:g}" for s in args.severities])  # fmt: skip
                ax.plot(xs_values, [100 * r[k] for k in keys], marker="o" if method.startswith("robop") else "s",
                        color=_COLOURS.get(method, "#9467bd"), label=method, markersize=4,
                        linewidth=2.2 if method == "dense" else 1.2)  # fmt: skip
            ax.set_title(f"{setting}: {title}", fontsize=9)
            ax.set_xlabel("eps (x mean embedding norm)" if kind_key == "probe" else "p")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("suffix next-token accuracy (%)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8,
                   bbox_to_anchor=(0.5, -0.1))  # fmt: skip
        common.save_png(fig, out / fname)
        plt.close(fig)
