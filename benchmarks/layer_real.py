"""Layer-level benchmark on real layers: every solver x uncertainty set x sparsity, one run.

    .venv/bin/python benchmarks/layer_real.py --threads 1            # default grid (~6 min, 2 cores)
    .venv/bin/python benchmarks/layer_real.py --full --threads 1     # every set, 50/60/70/80 % and 2:4
    .venv/bin/python benchmarks/layer_real.py --fast --out /tmp/lr   # seconds: one synthetic layer

Default grid: DeiT layers x {baseline, CTE} x {50 %, 70 %, 2:4}; Gemma layers x baseline x {50 %, 2:4}
(a dynamic set on a Gemma layer costs minutes: its exact refits run 200-iteration float64 PCG);
``--full`` runs all four sets, 50/60/70/80 % and 2:4 on both models (Gemma: 50 % and 80 %,
``--gemma-sparsities`` for more).

Layers are captured from the *dense* models with forward pre-hooks:

* Gemma-3-270M (embedded, offline), decoder layer 3: ``q_proj`` (640 -> 1024), ``o_proj``
  (1024 -> 640), ``gate_proj`` (640 -> 2048) and, with ``--full``, ``down_proj`` (2048 -> 640);
  calibration 32 Shakespeare windows of 128 tokens (+ BOS), held-out 16 validation windows.
* the recipe's tiny DeiT (``deit_cap-*.ckpt``, Fashion-MNIST 28 px, width 96), block 1:
  ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; 256 calibration images, 128 held-out.

For every layer the script times the unavoidable work (accumulating the Gram, ``N n^2``; one
Cholesky, ``n^3/3``) and, per solver x set x sparsity / pattern, reports nominal, robust and
held-out relative error, wall seconds, the ratio to SparseGPT on the same layer and sparsity, and
the ratio to the unavoidable work. CAP is ``O(n^3)`` per row: it runs exactly on layers up to
``--cap-max-width`` inputs (default 384: the DeiT) and is left out of wider ones unless
``--cap-block`` is given (CAP's block approximation). ``--threads 1`` gives stable ratios on a
shared, loaded machine (MKL's threaded eigensolver slows down 30x when its threads are starved).

Writes ``benchmarks/results/layer_real.{json,md}``: JSON ``{"command", "machine", "layers", "rows"}``
with one row per run (``method``, ``uncertainty``, ``sparsity``, ``pattern`` and the metrics).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning import LayerInputs, prune_layer  # noqa: E402

METHOD_NAMES = {"alps": "robop-alps", "cap": "robop-cap"}
GEMMA_LAYERS = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"]
GEMMA_FULL = GEMMA_LAYERS + ["mlp.down_proj"]
DEIT_LAYERS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_until(model, batches, names, last):
    """Like :func:`_real_layers.capture`, but stop each forward after ``last`` has run (saves time)."""
    stop = model.get_submodule(last).register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop()))
    store = {n: [] for n in names}
    hooks = [stop]
    for name in names:
        def hook(mod, args, name=name):
            x = args[0].detach().float()
            store[name].append(x.reshape(x.shape[0], -1, x.shape[-1]))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for batch in batches:
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def gemma_layers(block: int, which: list[str], windows: int, held_windows: int):
    model = R.gemma()
    names = [f"model.layers.{block}.{w}" for w in which]
    last = f"model.layers.{block}.mlp.down_proj"
    x = _capture_until(model, R.text_batches(windows), names, last)
    xh = _capture_until(model, R.text_batches(held_windows, split="val"), names, last)
    out = [("gemma-3-270m", n, model.get_submodule(n).weight.detach().float().clone(), x[n], xh[n]) for n in names]
    del model
    return out


def deit_layers(block: int, which: list[str], images: int, held_images: int):
    model = R.deit()
    if model is None:
        return []
    names = [f"model.blocks.{block}.{w}" for w in which]
    last = f"model.blocks.{block}.mlp.fc2"
    try:
        cal, held = R.image_batches(images), R.image_batches(held_images, split="val")
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # Fashion-MNIST not present
        print(f"tiny DeiT skipped: {err}")
        return []
    x = _capture_until(model, cal, names, last)
    xh = _capture_until(model, held, names, last)
    return [("deit-tiny-fmnist", n, model.get_submodule(n).weight.detach().float().clone(), x[n], xh[n]) for n in names]


def synthetic_layers():
    from robop_lightning.data.synthetic import synthetic_layer

    w, x, xh = synthetic_layer(48, 64, samples=16, tokens=8)
    return [("synthetic", "synthetic.48x64", w, x, xh)]


def _limit(x: torch.Tensor) -> tuple[float, float]:
    """Seconds of the unavoidable work: one Gram pass (float64, chunked) and one Cholesky."""
    t = time.perf_counter()
    h = LayerInputs(x).gram()
    t_gram = time.perf_counter() - t
    h = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    t = time.perf_counter()
    torch.linalg.cholesky(h)
    return t_gram, time.perf_counter() - t


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="a synthetic layer (or --models), 50 %%, baseline: seconds")
    p.add_argument("--full", action="store_true", help="all four sets, 50/60/70/80 %% and 2:4, down_proj too")
    p.add_argument("--models", nargs="+", default=None, choices=["deit", "gemma", "synthetic"],
                   help="default: deit gemma (--fast: synthetic)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None)
    p.add_argument("--patterns", nargs="+", default=None, help="N:M patterns run besides unstructured")
    p.add_argument("--solvers", nargs="+", default=["magnitude", "wanda", "sparsegpt", "alps", "cap"])
    p.add_argument("--sets", nargs="+", default=None)
    p.add_argument("--gemma-block", type=int, default=3)
    p.add_argument("--gemma-layers", nargs="+", default=None)
    p.add_argument("--gemma-sets", nargs="+", default=None,
                   help="sets for Gemma layers (default: baseline; --full: the same as --sets)")
    p.add_argument("--gemma-sparsities", type=float, nargs="+", default=None,
                   help="sparsities for Gemma layers (default: the first and last of --sparsities)")
    p.add_argument("--deit-block", type=int, default=1)
    p.add_argument("--windows", type=int, default=32, help="Gemma calibration windows (128 tokens)")
    p.add_argument("--images", type=int, default=256, help="DeiT calibration images")
    p.add_argument("--cap-max-width", type=int, default=384)
    p.add_argument("--cap-block", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results/layer_real")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = args.sets or (["baseline", "trace", "e", "cte"] if args.full else ["baseline", "cte"])
    sparsities = args.sparsities or ([0.5, 0.6, 0.7, 0.8] if args.full else [0.5, 0.7])
    patterns = args.patterns if args.patterns is not None else ["2:4"]
    gemma_sp = args.gemma_sparsities or ([sparsities[0], sparsities[-1]] if args.full else [sparsities[0]])
    gemma_sets = args.gemma_sets or (sets if args.full else ["baseline"])
    if args.fast:
        sets, sparsities, patterns, gemma_sp = ["baseline"], [0.5], [], [0.5]
    start = time.perf_counter()

    layers = []
    models = args.models or (["synthetic"] if args.fast else ["deit", "gemma"])
    if "deit" in models:
        layers += deit_layers(args.deit_block, DEIT_LAYERS, 64 if args.fast else args.images, 32 if args.fast else 128)
    if "gemma" in models:
        which = args.gemma_layers or (GEMMA_FULL if args.full else GEMMA_LAYERS)
        layers += gemma_layers(args.gemma_block, which, args.windows, 16)
    if "synthetic" in models or not layers:
        layers += synthetic_layers()
    capture_s = time.perf_counter() - start

    rows, layer_info = [], []
    for model_name, lname, w, x, xh in layers:
        n = w.shape[1]
        t_gram, t_chol = _limit(x)
        tokens = x.shape[0] * x.shape[1]
        layer_info.append({"model": model_name, "layer": lname, "shape": list(w.shape), "tokens": tokens,
                           "gram_seconds": t_gram, "cholesky_seconds": t_chol})
        grid = [(s, "unstructured") for s in (gemma_sp if model_name == "gemma-3-270m" else sparsities)]
        grid += [(None, pat) for pat in patterns]
        for sparsity, pattern in grid:
            for uncertainty in (gemma_sets if model_name == "gemma-3-270m" else sets):
                for solver in args.solvers:
                    opts = None
                    if solver == "cap":
                        if args.cap_block and n > args.cap_max_width:
                            opts = {"block_size": args.cap_block}
                        elif n > args.cap_max_width:
                            continue
                    if solver in ("magnitude",) and uncertainty != "baseline" and "baseline" in sets:
                        continue  # data-free: the set changes nothing
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        t = time.perf_counter()
                        r = prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver,
                                        uncertainty=uncertainty, heldout=xh, solver_options=opts, name=lname)
                        seconds = time.perf_counter() - t
                    rows.append({
                        "method": METHOD_NAMES.get(solver, solver),
                        "uncertainty": uncertainty,
                        "sparsity": round(r.sparsity, 4),
                        "pattern": r.pattern,
                        "model": model_name,
                        "layer": lname,
                        "shape": list(w.shape),
                        "tokens": tokens,
                        "nominal_error": r.nominal_error,
                        "robust_error": r.robust_error,
                        "heldout_error": r.heldout_error,
                        "seconds": seconds,
                        "limit_seconds": t_gram + t_chol,
                        "cap_block": (opts or {}).get("block_size"),
                    })
                    print(f"{lname} {r.pattern} {r.sparsity:.2f} {uncertainty:8s} {solver:9s} "
                          f"nominal {r.nominal_error:.5f} held-out {r.heldout_error:.5f} {seconds:.2f}s", flush=True)
        _report(args, argv, start, capture_s, layer_info, rows)  # partial results survive an interruption
    return _report(args, argv, start, capture_s, layer_info, rows, final=True)


def _report(args, argv, start, capture_s, layer_info, rows, final=False):
    for row in rows:
        ref = [r for r in rows if r["method"] == "sparsegpt" and r["layer"] == row["layer"]
               and r["pattern"] == row["pattern"] and abs(r["sparsity"] - row["sparsity"]) < 1e-3
               and r["uncertainty"] == row["uncertainty"]]
        row["time_vs_sparsegpt"] = row["seconds"] / ref[0]["seconds"] if ref else None
        row["time_vs_limit"] = row["seconds"] / row["limit_seconds"] if row["limit_seconds"] > 0 else None

    info = R.machine("cpu")
    command = R.command_line("benchmarks/layer_real.py", argv)
    lines = [f"Command: `{command}`", "", f"Machine: {R.machine_line(info)}", "",
             f"Total {time.perf_counter() - start:.0f} s (capture {capture_s:.0f} s). Errors are relative: "
             "`tr(E H E^T) / tr(W H W^T)` on the calibration Gram (nominal), the set's worst case (robust), "
             "and a Gram of held-out samples (held-out). `x SparseGPT`: wall time over SparseGPT's on the "
             "same layer, pattern, sparsity and set; `x limit`: over the unavoidable work (one Gram pass + one "
             "Cholesky). CAP runs exactly on layers up to "
             f"{args.cap_max_width} inputs" + (f", with block_size={args.cap_block} above." if args.cap_block else
                                                 " and is left out of wider ones (O(n^3) per row)."), "",
             "| layer | shape (out x in) | tokens | Gram s | Cholesky s |", "|---|---|---|---|---|"]
    for li in layer_info:
        lines.append(f"| {li['layer']} | {li['shape'][0]} x {li['shape'][1]} | {li['tokens']} | "
                     f"{li['gram_seconds']:.3f} | {li['cholesky_seconds']:.4f} |")
    lines += ["", "| layer | pattern | sparsity | set | method | nominal | robust | held-out | seconds | x SparseGPT | x limit |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["time_vs_sparsegpt"] is None else f"{r['time_vs_sparsegpt']:.2f}"
        lim = "" if r["time_vs_limit"] is None else f"{r['time_vs_limit']:.1f}"
        short = r["layer"].replace("model.layers.", "L").replace("model.blocks.", "B")
        lines.append(f"| {short} | {r['pattern']} | {r['sparsity']:.2f} | {r['uncertainty']} | {r['method']} | "
                     f"{r['nominal_error']:.5f} | {r['robust_error']:.5f} | {r['heldout_error']:.5f} | "
                     f"{r['seconds']:.2f} | {ratio} | {lim} |")
    markdown = "\n".join(lines) + "\n"
    payload = {"command": command, "machine": info, "loadavg": info["loadavg"], "layers": layer_info, "rows": rows}
    if not final:
        payload["partial"] = True
        markdown = "**Partial results** (the run was interrupted or is still going).\n\n" + markdown
    paths = R.write_results(args.out, payload, markdown)
    if final:
        print(markdown)
        print(f"wrote {paths[0]} and {paths[1]}")
    return rows


if __name__ == "__main__":
    main()
