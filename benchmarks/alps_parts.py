"""Where ALPS's time goes on one layer: the eigh, the resolvents, the ADMM products, the mask selection,
the element-wise updates and the CG, against the solver's own wall time.

    .venv/bin/python benchmarks/alps_parts.py --device cuda                   # Llama-3-8B's four linear shapes
    .venv/bin/python benchmarks/alps_parts.py --device cpu --scale 0.25 --threads 2
    .venv/bin/python benchmarks/alps_parts.py --fast --out /tmp/ap             # seconds: CPU, tiny shapes

For each distinct linear shape of the named config (``out x in``; ``--config llama3-8b``: q / o
``4096x4096``, k / v ``1024x4096``, gate / up ``14336x4096``, down ``4096x14336``; ``--scale`` as in
``llm_scale.py``): a random weight and a damped Gram ``X^T X + 0.01 mean(diag) I`` of
``--tokens-per-input`` x ``in`` correlated inputs (Gaussian plus 16 shared directions, so that ALPS
has a support to search for), float64, on the device.

Timed, each as the solver does it (medians of ``--repeats`` calls, ``torch.cuda.synchronize`` around
each on CUDA):

* ``solve``: :func:`robop_lightning.engine.solvers.alps.alps` itself, with ``history`` (iterations,
  values of rho);
* ``eigh``: the float64 eigendecomposition of the normalised Gram (once per Gram; shared by the
  layers that read the same inputs);
* ``resolvent``: ``(H~ + rho I)^-1`` formed in float64 and rounded (once per value of rho; narrow
  layers only, ``in < 2 out``; wide layers apply it as two products instead);
* ``product``: one iteration's ``B`` update, ``select``: one iteration's support (the pattern's
  selection: on an accelerator the radix select of ``engine/solvers/_select.py``), ``kthvalue``: the
  same threshold by ``torch.kthvalue`` (what the solver used on an accelerator before; on a CPU NumPy's
  introselect, which it still uses), ``update``: one iteration's element-wise work;
* ``cg``: the final conjugate-gradient fit (``pcg_iters`` iterations).

For the wide layers (two products per iteration, no formed resolvent) also the alternative that
would skip the ``eigh``: a float64 Cholesky factor of ``H~ + rho I`` per value of rho and two float32
triangular solves per iteration, against the ``eigh`` and the products the solver spends (whether
that route would pay on the device; it is not built).

``model`` adds them up as the solver runs them: eigh + resolvents x values of rho + iterations x
(product + select + update) + CG x 1.3 (the fallback's 3-iteration screen of the start support beside
the 10-iteration fit; a start within 25 % of ADMM's loss gets 7 more, not counted); ``model /
solve`` near 1 says the parts explain the time.

Writes ``OUT.json`` (``{"command", "commit", "machine", "device", "config", "rows"}``) and ``OUT.md``;
``--out`` defaults to ``benchmarks/results/alps_parts``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402
import llm_scale  # noqa: E402

from robop_lightning.engine.patterns import parse_pattern  # noqa: E402
from robop_lightning.engine.solvers.alps import _normalised_eigh, alps, support  # noqa: E402
from robop_lightning.engine.solvers.refit import masked_pcg  # noqa: E402

FAST = ["--config", "llama3-8b", "--scale", "0.016", "--device", "cpu", "--repeats", "1", "--threads", "1"]
PARTS = ("eigh", "resolvent", "product", "select", "update", "cg")


def timed_value(fn, device: torch.device, warmup: int, repeats: int):
    """``(seconds, result)``: :func:`_real_layers.timed`'s median, and the last call's result (so that a
    part the benchmark goes on with is computed once more only for its timing)."""
    last = []
    seconds = R.timed(lambda: last.__setitem__(slice(None), [fn()]), device, warmup, repeats)
    return seconds, last[0]


def layer_shapes(shape: dict) -> list[tuple[str, int, int]]:
    """``(label, out, in)`` of the distinct linear shapes of a Llama block, the largest solves first (a
    run cut short by a time limit keeps those)."""
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    return [("down_proj", h, m), ("gate/up_proj", m, h), ("q/o_proj", h, h), ("k/v_proj", kv, h)]


def problem(rows: int, cols: int, tokens_per_input: float, device: torch.device, seed: int = 0):
    """A float32 weight and a damped float64 Gram of correlated inputs, on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = max(8, int(tokens_per_input * cols))
    mix = torch.randn(16, cols, generator=g, device=device) * 0.5
    w = torch.randn(rows, cols, generator=g, device=device) * 0.02
    h = torch.zeros(cols, cols, dtype=torch.float64, device=device)
    for start in range(0, t, 8192):  # the Gram in chunks of inputs, as the pipeline accumulates it
        n = min(8192, t - start)
        x = torch.randn(n, cols, generator=g, device=device) + torch.randn(n, 16, generator=g, device=device) @ mix
        h.addmm_(x.T.double(), x.double())
    h += 0.01 * float(h.diagonal().mean()) * torch.eye(cols, dtype=torch.float64, device=device)
    return w, h


def measure(label: str, rows: int, cols: int, pattern, args, device: torch.device) -> dict:
    w, h = problem(rows, cols, args.tokens_per_input, device)
    history: list = []
    # the solve and the eigh are the long parts: no untimed call (the libraries are warm, see main)
    solve_s = R.timed(lambda: (history.clear(), alps(w, h, pattern, history=history)), device, 0, args.repeats)
    iterations = max([e["iteration"] for e in history], default=0)
    rhos = [e["rho"] for e in history]
    rho_values = 1 + sum(1 for a, b in zip(rhos, rhos[1:]) if a != b)

    eigh_s, (s32, ht, lam, q) = timed_value(lambda: _normalised_eigh(h, device), device, 0, args.repeats)
    explicit = cols < 2 * rows
    b0 = (w.float() * s32[None, :]).T.contiguous()  # (in, out), the solver's layout
    hb0 = (b0.T @ ht).T
    kept = pattern.keep_count(rows, cols)
    rho = 0.1
    if explicit:
        resolvent_s, m32 = timed_value(lambda: (q @ ((1 / (lam + rho)) * q).T).float(), device, 1, args.repeats)
        product_s = R.timed(lambda: m32 @ (hb0 + rho * b0), device, 1, args.repeats)
    else:
        resolvent_s = 0.0
        q32, d32 = q.float(), (lam + rho).float()[:, None]
        product_s = R.timed(lambda: q32 @ ((q32.T @ (rho * b0)) / d32), device, 1, args.repeats)
    scores = b0.abs()
    select_s, supp = timed_value(lambda: support(scores, pattern, kept), device, 1, args.repeats)
    flat = scores.reshape(-1)
    kth_s = (R.timed(lambda: torch.kthvalue(flat, flat.numel() - kept + 1), device, 1, args.repeats)
             if pattern.kind == "unstructured" and device.type != "cpu" else None)
    v = torch.zeros_like(b0)

    def update():  # the iteration's element-wise work outside the product and the selection
        x = (v + rho * b0) / rho
        d = x * supp.to(x.dtype)
        v.add_(rho * (b0 - d))
        return x.abs()

    update_s = R.timed(update, device, 1, args.repeats)
    fits = 1.3  # the fit on ADMM's support (10 iterations) and the fallback's 3-iteration screen of the start's
    cg_s = R.timed(lambda: masked_pcg(b0.T, ht, supp.T, x0=b0.T, iters=10, hw=hb0), device, 1, args.repeats)
    parts = {"eigh": eigh_s, "resolvent": resolvent_s * rho_values, "product": product_s * iterations,
             "select": select_s * iterations, "update": update_s * iterations, "cg": cg_s * fits}
    model = sum(parts.values())
    cholesky = None if explicit else cholesky_route(ht, b0, rho, rho_values, iterations, device, args.repeats)
    print(f"[alps_parts] {label} {rows}x{cols}: solve {solve_s:.2f} s, {iterations} iterations, "
          + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    return {"name": label, "shape": f"{rows}x{cols}", "path": "formed resolvent" if explicit else "two products",
            "solve_seconds": solve_s, "iterations": iterations, "rho_values": rho_values, "parts": parts,
            "per_call": {"eigh": eigh_s, "resolvent": resolvent_s, "product": product_s, "select": select_s,
                         "kthvalue": kth_s, "update": update_s, "cg": cg_s},
            "kthvalue_seconds": None if kth_s is None else kth_s * iterations,
            "model_seconds": model, "model_over_solve": model / solve_s,
            "eigh_route_seconds": None if explicit else parts["eigh"] + parts["product"],
            "cholesky_route_seconds": cholesky}


def cholesky_route(ht: torch.Tensor, b0: torch.Tensor, rho: float, rho_values: int, iterations: int,
                   device: torch.device, repeats: int) -> float:
    """Seconds of the alternative for a wide layer: no ``eigh``, a float64 Cholesky factor of
    ``H~ + rho I`` per value of rho and two float32 triangular solves per iteration (not what the
    solver does; the figure says whether it would pay on this device)."""
    shifted = ht.double() + rho * torch.eye(ht.shape[0], dtype=torch.float64, device=device)
    factor_s, low = timed_value(lambda: torch.linalg.cholesky(shifted).float(), device, 1, repeats)

    def solves():
        return torch.linalg.solve_triangular(low.T, torch.linalg.solve_triangular(low, b0, upper=False), upper=True)

    return factor_s * rho_values + R.timed(solves, device, 1, repeats) * iterations


def markdown(command: str, info: dict, payload: dict) -> str:
    lines = [f"Command: `{command}`", "", f"Commit: {payload['commit']}", "", f"Machine: {R.machine_line(info)}", "",
             f"Pattern: {payload['config']['pattern']}; shapes of {payload['config']['config']} at scale "
             f"{payload['config']['scale']}; Gram of {payload['config']['tokens_per_input']} x in inputs.", "",
             "| layer | out x in | ALPS s | iterations | " + " | ".join(PARTS)
             + " | model / ALPS | kthvalue instead | eigh + products | Cholesky route |",
             "|---|---|---|---|" + "---|" * len(PARTS) + "---|---|---|---|"]
    for r in payload["rows"]:
        share = " | ".join(f"{r['parts'][p]:.2f} ({r['parts'][p] / r['solve_seconds']:.0%})" for p in PARTS)
        kth, eig, chol = (("-" if r[k] is None else f"{r[k]:.2f} s") for k in
                          ("kthvalue_seconds", "eigh_route_seconds", "cholesky_route_seconds"))
        lines.append(f"| {r['name']} | {r['shape']} | {r['solve_seconds']:.2f} | {r['iterations']} | {share} | "
                     f"{r['model_over_solve']:.2f} | {kth} | {eig} | {chol} |")
    lines += ["", "Parts: seconds over the whole solve (share of the ALPS seconds): per-call medians x the calls "
              "the solve makes. `kthvalue instead`: the iterations' selections by `torch.kthvalue` (the "
              "accelerator path before the radix select; not timed on a CPU). Wide layers (two products): "
              "`eigh + products` is what the solver spends on them, `Cholesky route` what a float64 Cholesky "
              "factor per value of rho and two triangular solves per iteration would (not built)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(llm_scale.CONFIGS), default="llama3-8b")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the widths (as llm_scale.py)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (with --sparsity) or N:M")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--tokens-per-input", type=float, default=2.0, help="calibration rows per input feature")
    p.add_argument("--layers", nargs="+", default=None, help="only these labels (q/o_proj k/v_proj ...)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--fast", action="store_true", help="CPU smoke path: " + " ".join(FAST))
    p.add_argument("--out", default="benchmarks/results/alps_parts", help="writes OUT.json and OUT.md")
    args = R.parse_with_fast(p, argv, FAST)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pattern = parse_pattern(args.pattern, args.sparsity if args.pattern == "unstructured" else None)
    shape = llm_scale.scaled_shape(args.config, args.scale)
    w, h = problem(64, 64, 2.0, device)
    alps(w, h, pattern)  # the libraries' first calls (cuBLAS, cuSOLVER handles) before anything is timed
    info = R.machine(device)
    command = R.command_line("benchmarks/alps_parts.py", argv)
    payload = {"command": command, "commit": R.git_commit(), "machine": info, "device": str(device),
               "config": {"config": args.config, "scale": args.scale, "pattern": args.pattern,
                          "sparsity": args.sparsity, "tokens_per_input": args.tokens_per_input,
                          "repeats": args.repeats},
               "rows": []}
    for label, out_f, in_f in layer_shapes(shape):
        if args.layers is None or label in args.layers:
            payload["rows"].append(measure(label, out_f, in_f, pattern, args, device))
            R.write_results(args.out, payload, markdown(command, info, payload))  # each layer as it is done
    R.publish(args.out, payload, markdown(command, info, payload))
    return payload


if __name__ == "__main__":
    main()
