"""Layer-level benchmark: every solver's error and wall time side by side, in one run.

    python benchmarks/layer_solvers.py                      # 768 x 768 layer, 50 %, baseline set
    python benchmarks/layer_solvers.py --rows 1024 --cols 1024 --sets baseline cte --cap-block 128
    python benchmarks/layer_solvers.py --device cuda        # on a GPU

For each solver it prints nominal and held-out relative error, seconds, and the time ratio to
SparseGPT, next to the unavoidable work for this layer (accumulating the Gram, one Cholesky
factorisation) so the distance to the physical limit is visible. Rows are written as JSON
(``method``, ``uncertainty``, ``sparsity``, ``pattern`` and metric fields) and a markdown table
under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

from robop_lightning import LayerInputs, prune_layer
from robop_lightning.data.synthetic import synthetic_layer

METHOD_NAMES = {"alps": "robop-alps", "cap": "robop-cap"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=768)
    p.add_argument("--cols", type=int, default=768)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--solvers", nargs="+", default=["magnitude", "wanda", "sparsegpt", "alps", "cap"])
    p.add_argument("--sets", nargs="+", default=["baseline"])
    p.add_argument("--cap-block", type=int, default=None, help="CAP block size (None = exact full Gram)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/layer_solvers")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    w, x, x_held = synthetic_layer(args.rows, args.cols, args.samples, args.tokens, seed=args.seed)
    w, x, x_held = w.to(device), x.to(device), x_held.to(device)
    n, tokens = args.cols, args.samples * args.tokens

    # The unavoidable work: one pass of the Gram (N n^2) and one factorisation (n^3 / 3).
    _, t_gram = _timed(lambda: LayerInputs(x).gram(), device)
    h = LayerInputs(x).gram()
    h += 0.01 * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=device)
    _, t_chol = _timed(lambda: torch.linalg.cholesky(h), device)
    print(f"layer {args.rows} x {n}, {tokens} calibration tokens, device {device}")
    print(f"physical limit: Gram {t_gram:.3f}s ({tokens * n * n / 1e9:.2f} GFMA), "
          f"Cholesky {t_chol:.3f}s ({n**3 / 3 / 1e9:.2f} GFMA)")

    rows = []
    for sparsity in args.sparsity:
        for uncertainty in args.sets:
            for solver in args.solvers:
                opts = {"block_size": args.cap_block} if solver == "cap" and args.cap_block else None
                r, seconds = _timed(
                    lambda: prune_layer(w, x, sparsity=sparsity, pattern=args.pattern, solver=solver,
                                        uncertainty=uncertainty, heldout=x_held, solver_options=opts),
                    device,
                )
                rows.append({
                    "method": METHOD_NAMES.get(solver, solver),
                    "uncertainty": uncertainty,
                    "sparsity": sparsity,
                    "pattern": args.pattern,
                    "rows": args.rows,
                    "cols": n,
                    "tokens": tokens,
                    "nominal_error": r.nominal_error,
                    "robust_error": r.robust_error,
                    "heldout_error": r.heldout_error,
                    "seconds": seconds,
                    "limit_seconds": t_gram + t_chol,
                })
    for row in rows:
        ref = [r for r in rows if r["method"] == "sparsegpt" and r["sparsity"] == row["sparsity"]
               and r["uncertainty"] == row["uncertainty"]]
        row["time_vs_sparsegpt"] = row["seconds"] / ref[0]["seconds"] if ref else None

    head = ("| method | set | sparsity | nominal | held-out | seconds | x SparseGPT | x limit |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ratio = "" if r["time_vs_sparsegpt"] is None else f"{r['time_vs_sparsegpt']:.2f}"
        lines.append(f"| {r['method']} | {r['uncertainty']} | {r['sparsity']:.2f} | {r['nominal_error']:.4f} | "
                     f"{r['heldout_error']:.4f} | {r['seconds']:.3f} | {ratio} | {r['seconds'] / r['limit_seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
    if device.type == "cuda":
        machine += f" ({torch.cuda.get_device_name(device)})"
    command = "python benchmarks/layer_solvers.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    for path, text in (
        (out.with_suffix(".json"), json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2)),
        (out.with_suffix(".md"), f"`{command.strip()}` on {machine}\n\n{table}\n"),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
