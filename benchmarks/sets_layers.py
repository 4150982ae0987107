"""Layer-level evidence for the authors' sets: real layers, a gamma sweep, held-out and OOD error.

    .venv/bin/python benchmarks/sets_layers.py --threads 2                      # Gemma + DeiT (if cached)
    .venv/bin/python benchmarks/sets_layers.py --models deit --threads 2
    .venv/bin/python benchmarks/sets_layers.py --fast --out /tmp/sl             # a synthetic layer, seconds

Every captured layer is pruned at 50 %, 70 % and 2:4 under the Baseline set and under each of the
authors' sets for every gamma of ``--gammas`` (``--e-gammas`` for E, whose useful radius is about
100x Trace's). Each result is scored by its relative error ``tr(E H' E^T) / tr(W H' W^T)`` under
three Grams ``H'``: the calibration Gram (nominal), a Gram of held-out in-domain samples, and a
Gram of out-of-distribution samples:

* Gemma 3 270M (RobOP-ALPS): decoder blocks ``--gemma-blocks`` (default 1, 8, 15), every distinct
  input of the block (``q_proj``, ``o_proj``, ``gate_proj``, ``down_proj``); calibration 32
  Shakespeare windows of 128 tokens, held-out 16 Shakespeare validation windows, OOD 16 Brown windows.
* the recipe's tiny DeiT (RobOP-CAP): every block's ``qkv``, ``proj``, ``fc1``, ``fc2``; calibration
  256 Fashion-MNIST images, held-out 128 validation images, OOD the same 128 images corrupted
  (gaussian noise, contrast and JPEG at severity 3, one third each).

The summary gives, per model x setting x set x gamma, the median [min, max] over layers of the
ratio to the Baseline set's error on the same layer. Writes ``<out>.json`` (every row) and ``<out>.md``.
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

from robop_lightning import LayerInputs, prune_layer  # noqa: E402

SETTINGS = [(0.5, "unstructured"), (0.7, "unstructured"), (None, "2:4")]
GEMMA_WHICH = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
DEIT_WHICH = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def collect_layers(models, gemma_blocks, windows=32, images=256, gemma_which=None, deit_blocks=None):
    """``(model, solver, name, W, X_cal, X_held, X_ood)`` for every captured layer of ``models``."""
    layers = []
    if "gemma" in models:
        layers += gemma_layers(gemma_blocks, windows, gemma_which)
    if "deit" in models:
        layers += deit_layers(images, deit_blocks)
    if "synthetic" in models:
        layers += synthetic_layers()
    return layers


def gemma_layers(blocks, windows, which=None):
    model = R.gemma()
    names = [f"model.layers.{b}.{w}" for b in blocks for w in (which or GEMMA_WHICH)]
    cal = R.capture(model, R.text_batches(windows), names)
    held = R.capture(model, R.text_batches(16, split="val"), names)
    ood = R.capture(model, _brown_batches(16), names)
    return [("gemma-3-270m", "alps", n, model.get_submodule(n).weight.detach().float().clone(), cal[n], held[n], ood[n])
            for n in names]


def _brown_batches(windows, seqlen=128, batch_size=8):
    from robop_lightning.data import TextDataModule

    dm = TextDataModule(seqlen=seqlen, calibration_windows=1, ood_corpus="brown", batch_size=batch_size)
    dm.setup()
    data = dm.splits["ood"][:windows]
    return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]


def deit_layers(images, blocks=None):
    model = R.deit()
    if model is None:
        print("tiny DeiT not cached (run recipes/deit_cap.py once): skipped")
        return []
    from robop_lightning.robustness.corruptions import corrupt

    blocks = range(len(model.model.blocks)) if blocks is None else blocks
    names = [f"model.blocks.{b}.{w}" for b in blocks for w in DEIT_WHICH]
    cal_b = R.image_batches(images)
    held_b = R.image_batches(128, split="val")
    kinds = ["gaussian_noise", "contrast", "jpeg_compression"]
    ood_b = [torch.cat([corrupt(chunk, kind, 3) for chunk, kind in zip(x.chunk(3), kinds)]) for x in held_b]
    cal, held, ood = (R.capture(model, b, names) for b in (cal_b, held_b, ood_b))
    return [("deit-tiny-fmnist", "cap", n, model.get_submodule(n).weight.detach().float().clone(), cal[n], held[n], ood[n])
            for n in names]


def synthetic_layers():
    from robop_lightning.data.synthetic import synthetic_layer

    w, x, xh = synthetic_layer(48, 64, samples=16, tokens=8)
    _, _, xo = synthetic_layer(48, 64, samples=16, tokens=8, shift=1.5)  # a stronger shift: "OOD"
    return [("synthetic", "alps", "synthetic.48x64", w, x, xh, xo)]


def _rel(h, w, err):
    e, w = err.double(), w.double()
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum())


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=["gemma", "deit", "synthetic"])
    p.add_argument("--gemma-blocks", type=int, nargs="+", default=[1, 8, 15])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--sets", nargs="+", default=["trace", "e", "cte"])
    p.add_argument("--gammas", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    p.add_argument("--e-gammas", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", default="benchmarks/results/sets_layers")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["synthetic"] if args.fast else ["gemma", "deit"])
    start = time.perf_counter()
    layers = collect_layers(models, args.gemma_blocks, args.windows, args.images)
    settings = SETTINGS[:1] if args.fast else SETTINGS
    rows = []
    for model_name, solver, lname, w, x, xh, xo in layers:
        grams = {"nominal": LayerInputs(x).gram(), "heldout": LayerInputs(xh).gram(), "ood": LayerInputs(xo).gram()}
        jobs = [("baseline", None)] + [(s, g) for s in args.sets for g in (args.e_gammas if s == "e" else args.gammas)]
        for sparsity, pattern in settings:
            for name, gamma in jobs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t = time.perf_counter()
                    r = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=name,
                                    radius=gamma, name=lname)
                    seconds = time.perf_counter() - t
                err = w - r.weight.float()
                row = {"model": model_name, "layer": lname, "method": f"robop-{solver}", "uncertainty": name,
                       "gamma": gamma, "pattern": r.pattern, "sparsity": round(r.sparsity, 4),
                       "seconds": seconds, "tokens": x.shape[0] * x.shape[1], "shape": list(w.shape)}
                for key, h in grams.items():
                    row[f"{key}_error"] = _rel(h, w, err)
                rows.append(row)
                print(f"{lname} {r.pattern} {r.sparsity:.2f} {name:8s} {gamma!s:6s} held-out {row['heldout_error']:.5f} "
                      f"ood {row['ood_error']:.5f} {seconds:.2f}s", flush=True)
    return _report(args, argv, start, rows)


def _report(args, argv, start, rows):
    base = {(r["layer"], r["pattern"], r["sparsity"]): r for r in rows if r["uncertainty"] == "baseline"}
    for r in rows:
        b = base[(r["layer"], r["pattern"], r["sparsity"])]
        for key in ("nominal", "heldout", "ood"):
            r[f"{key}_vs_baseline"] = r[f"{key}_error"] / b[f"{key}_error"] if b[f"{key}_error"] > 0 else None
        r["time_vs_baseline"] = r["seconds"] / b["seconds"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["uncertainty"] != "baseline":
            setting = R.setting_label(r["pattern"], r["sparsity"])
            groups.setdefault((r["model"], setting, r["uncertainty"], r["gamma"]), []).append(r)

    def stat(vals):
        vals = [v for v in vals if v is not None]
        return f"{statistics.median(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]" if vals else "-"

    summary = []
    lines = [f"Command: `{R.command_line('benchmarks/sets_layers.py', argv)}`", "",
             f"Machine: {R.machine_line(R.machine('cpu'))}", "",
             f"Total {time.perf_counter() - start:.0f} s. Ratio of each set's relative error to the Baseline set's on the "
             "same layer and setting, median [min, max] over layers (below 1: better than Baseline); `wins`: layers "
             "where the set's OOD error is below Baseline's.", "",
             "| model | setting | set | gamma | layers | nominal | held-out | OOD | OOD wins | x Baseline time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, setting, name, gamma), rs in groups.items():
        wins = sum(1 for r in rs if r["ood_vs_baseline"] is not None and r["ood_vs_baseline"] < 1)
        entry = {"model": model, "setting": setting, "set": name, "gamma": gamma, "layers": len(rs),
                 "heldout_median": statistics.median(r["heldout_vs_baseline"] for r in rs),
                 "ood_median": statistics.median(r["ood_vs_baseline"] for r in rs), "ood_wins": wins}
        summary.append(entry)
        lines.append(f"| {model} | {setting} | {name} | {gamma:g} | {len(rs)} | {stat([r['nominal_vs_baseline'] for r in rs])} | "
                     f"{stat([r['heldout_vs_baseline'] for r in rs])} | {stat([r['ood_vs_baseline'] for r in rs])} | "
                     f"{wins}/{len(rs)} | {statistics.median(r['time_vs_baseline'] for r in rs):.2f} |")
    markdown = "\n".join(lines) + "\n"
    payload = {"command": R.command_line("benchmarks/sets_layers.py", argv), "machine": R.machine("cpu"),
               "summary": summary, "rows": rows}
    R.publish(args.out, payload, markdown)
    return rows


if __name__ == "__main__":
    main()
