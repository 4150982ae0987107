"""Engine demo: one layer, every solver under every uncertainty set, side by side.

    python recipes/engine_demo.py                 # ~3 minutes on 2 CPU cores
    python recipes/engine_demo.py --fast          # seconds, for CI
    python recipes/engine_demo.py --rows 768 --cols 768 --sparsity 0.5 0.7

Prints nominal / robust / held-out relative error and wall time per (solver, set), and writes
every number to ``outputs/engine_demo.json``. The held-out inputs come from a shifted
distribution (see ``robop_lightning.data.synthetic``), so the held-out column is where robustness shows.
The DeiT recipe (``recipes/deit_cap.py``) will replace this as the main job.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import torch
from tqdm import tqdm

from robop_lightning import prune_layer
from robop_lightning.data.synthetic import synthetic_layer

if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # the sibling helpers, however this file is loaded
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# ----------------------------------------------------------------------------- defaults
config = dict(
    rows=256,  # out_features of the demo layer
    cols=384,  # in_features (CAP's exact elimination is O(cols^3) per row)
    samples=64,  # calibration samples (images / sequences)
    tokens=32,  # tokens per sample
    sparsity=[0.5, 0.7],
    solvers=["magnitude", "wanda", "sparsegpt", "alps", "cap"],
    sets=["baseline", "trace", "e", "cte"],
    rounds=3,
    seed=0,
    out="outputs/engine_demo.json",
)


def main(argv=None) -> list[dict]:
    parser = common.config_parser(__doc__, config, nargs="+", fast_help="a tiny layer, two solvers: seconds")
    args = parser.parse_args(argv)
    if args.fast:
        args.rows, args.cols, args.samples, args.tokens = 32, 64, 16, 8
        args.solvers, args.sparsity = ["sparsegpt", "alps", "cap"], [0.5]
    torch.manual_seed(args.seed)

    w, x, x_held = synthetic_layer(args.rows, args.cols, args.samples, args.tokens, seed=args.seed)
    print(f"layer {args.rows} x {args.cols}, {args.samples} samples x {args.tokens} tokens, "
          f"held-out: {x_held.shape[0]} samples from a shifted distribution")
    rows = []
    jobs = [(s, solver, u) for s in args.sparsity for solver in args.solvers for u in args.sets]
    for sparsity, solver, uncertainty in tqdm(jobs, desc="pruning", disable=None):
        start = time.perf_counter()
        r = prune_layer(w, x, sparsity=sparsity, solver=solver, uncertainty=uncertainty,
                        rounds=args.rounds, heldout=x_held)
        row = r.to_dict() | {"set": uncertainty, "seconds": time.perf_counter() - start}
        rows.append(row)

    header = f"{'sparsity':>8} {'solver':>10} {'set':>9} {'nominal':>9} {'robust':>9} {'held-out':>9} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['sparsity']:>8.2f} {row['solver']:>10} {row['set']:>9} {row['nominal_error']:>9.4f} "
              f"{row['robust_error']:>9.4f} {row['heldout_error']:>9.4f} {row['seconds']:>8.2f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
