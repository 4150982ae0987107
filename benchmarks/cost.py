"""Cost benchmark: time and peak memory to prune a whole model, scaling, and the physical limit.

    .venv/bin/python benchmarks/cost.py --threads 1             # default (~8 min on 2 shared cores)
    .venv/bin/python benchmarks/cost.py --threads 1 --gemma-blocks 18 --widths 256 512 1024 2048 \\
        --tokens 2048 4096 8192 16384                           # the full grid
    .venv/bin/python benchmarks/cost.py --device cuda           # the same on a GPU
    .venv/bin/python benchmarks/cost.py --onload cuda           # model on the host, one block at a time on the GPU
    .venv/bin/python benchmarks/cost.py --fast --out /tmp/cost  # seconds: synthetic parts only

Three parts, measured in one process on the same data so that ratios hold on a loaded machine:

1. **Whole model** (``prune_model``, baseline set, 50 % unstructured): the recipe's tiny DeiT
   (all 4 blocks, 256 Fashion-MNIST images) and Gemma-3-270M restricted to its first
   ``--gemma-blocks`` decoder layers (``targets="re:model\\.layers\\.[0-2]\\."``, 32 windows of 128
   tokens). Per method: wall seconds, the ratio to SparseGPT, and peak memory: the peak RSS
   *above* the resident baseline (model and calibration tokens loaded) sampled every 5 ms by a
   thread, next to the model's bytes and one block's calibration activations (hidden states in and
   out, ``N x d x 4 B x 2``); on CUDA also ``torch.cuda.max_memory_allocated``. The weights are
   restored between methods. With ``--threads 1`` every method runs in its own forked child (memory
   then counts from the same start for every method); with more threads (OpenMP does not survive
   a fork) they run in this process and a method's extra RSS only counts growth beyond the
   high-water mark of the methods before it. CAP (``O(n^3)`` per row) runs on the DeiT only.
2. **Scaling** (synthetic layers, ``prune_layer`` including its Gram): seconds against calibration
   tokens ``N`` (width fixed) and against width ``n`` (square layers, tokens fixed), with the
   exponent of a least-squares fit of ``log t = a + b log size``.
3. **Physical limit**, for each size of part 2: the seconds of the unavoidable work, one Gram
   pass (``N n^2`` multiply-adds, float64 as the engine accumulates it) and one Cholesky
   (``n^3 / 3``), next to each solver's seconds.

Writes ``benchmarks/results/cost.{json,md}``: JSON ``{"command", "machine", "loadavg", "rows",
"scaling", "exponents", "limit"}``; ``rows`` has one row per model x method (``method``,
``uncertainty``, ``sparsity``, ``pattern`` and the metrics).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import threading
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning import LayerInputs, prune_layer  # noqa: E402
from robop_lightning.pipeline.prune import prune_model  # noqa: E402
from robop_lightning.data.synthetic import synthetic_layer  # noqa: E402
from robop_lightning.engine.sets import parse_set_spec  # noqa: E402

METHOD_NAMES = {"alps": "robop-alps", "cap": "robop-cap"}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Current resident set size in bytes (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class PeakRSS:
    """Samples the RSS every ``interval`` seconds in a thread; ``peak - base`` is the extra memory."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _mb(x: float) -> float:
    return x / 2**20


# --------------------------------------------------------------------------- part 1
def whole_model(label, model, batches, targets, methods, device, hidden_bytes, sparsity=0.5, fork=True, sets=("baseline",),
                onload=None):
    """Prune ``model`` with each method x set in turn (weights restored between), timing and memory.

    ``sets`` (``NAME`` or ``NAME=GAMMA``) apply to the solvers that use the Gram; every row also gets
    its time ratio to the same solver under the Baseline set (``time_vs_baseline``). ``onload``: the
    model stays on the host and ``prune_model(device=onload)`` moves one block at a time there.
    """
    model.to(device)
    batches = [b.to(device) for b in batches]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    snapshot = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    jobs = [(solver, spec) for solver in methods for spec in (sets if solver in ("alps", "cap", "sparsegpt") else ("baseline",))]
    for solver, spec in jobs:
        model.load_state_dict(snapshot)
        if fork and device.type == "cpu" and hasattr(os, "fork") and torch.get_num_threads() == 1:
            # a forked child per method: it starts from the parent's pages (model and data
            # resident), so its peak RSS above that start is this method's own memory, not
            # memory a previous method freed and the allocator kept. Only with one thread: a
            # child forked from a process whose OpenMP pool is running can hang.
            import multiprocessing as mp

            ctx = mp.get_context("fork")
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(send, model, batches, sparsity, solver, targets, device,
                                                    model_bytes, hidden_bytes, label, spec, onload))
            proc.start()
            row = recv.recv()
            proc.join()
            if "error" in row:
                raise RuntimeError(f"{label} / {solver}: {row['error']}")
        else:
            row = _one(model, batches, sparsity, solver, targets, device, model_bytes, hidden_bytes, label, spec, onload)
        rows.append(row)
        print(f"{label} {solver:9s} {spec:12s} {row['seconds']:7.2f}s  +{row['peak_extra_rss_mb']:.0f} MiB RSS  "
              f"mean nominal {row['mean_nominal_error']:.5f}", flush=True)
    model.load_state_dict(snapshot)
    ref = [r for r in rows if r["method"] == "sparsegpt" and r["uncertainty"] == "baseline"]
    for r in rows:
        base = [b for b in rows if b["method"] == r["method"] and b["uncertainty"] == "baseline"]
        r["time_vs_baseline"] = r["seconds"] / base[0]["seconds"] if base else None
        r["time_vs_sparsegpt"] = r["seconds"] / ref[0]["seconds"] if ref else None
        r["memory_vs_sparsegpt"] = (r["peak_extra_rss_mb"] / ref[0]["peak_extra_rss_mb"]
                                    if ref and ref[0]["peak_extra_rss_mb"] > 0 else None)
    return rows


def _child(send, *args):
    try:
        send.send(_one(*args))
    except BaseException as err:  # report, never hang the parent
        send.send({"error": repr(err)})
        raise
    finally:
        send.close()


def _one(model, batches, sparsity, solver, targets, device, model_bytes, hidden_bytes, label, spec="baseline",
         onload=None):
    name, radius = parse_set_spec(spec, allow_auto=True)
    gpu = torch.device(onload) if onload is not None else device
    if gpu.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gpu)
        torch.cuda.empty_cache()
    with warnings.catch_warnings(), PeakRSS() as mem:
        warnings.simplefilter("ignore", RuntimeWarning)
        R.sync(device)
        t = time.perf_counter()
        report = prune_model(model, batches, sparsity=sparsity, solver=solver, uncertainty=name, radius=radius,
                             targets=targets, progress=False, device=onload)
        R.sync(device)
        seconds = time.perf_counter() - t
    layers = report.layers
    row = {
        "method": METHOD_NAMES.get(solver, solver),
        "uncertainty": spec,
        "sparsity": sparsity,
        "pattern": "unstructured",
        "model": label,
        "device": str(device),
        "blocks_on": str(gpu),  # where blocks were calibrated and solved (onloading when != device)
        "layers": len(layers),
        "parameters_pruned": sum(r["parameters"] for r in layers),
        "seconds": seconds,
        "solver_seconds": sum(r["seconds"] for r in layers),
        "mean_nominal_error": sum(r["nominal_error"] for r in layers) / max(len(layers), 1),
        "peak_rss_mb": _mb(mem.peak),
        "peak_extra_rss_mb": _mb(mem.peak - mem.base),
        "model_mb": _mb(model_bytes),
        "block_activations_mb": _mb(hidden_bytes),
    }
    if gpu.type == "cuda":
        row["peak_gpu_mb"] = _mb(torch.cuda.max_memory_allocated(gpu))
    return row


# --------------------------------------------------------------------------- parts 2 and 3
def _timed(fn, device):
    R.sync(device)
    t = time.perf_counter()
    fn()
    R.sync(device)
    return time.perf_counter() - t


def limit_seconds(x: torch.Tensor, device) -> tuple[float, float]:
    n = x.shape[-1]
    t_gram = _timed(lambda: LayerInputs(x).gram(), device)
    h = LayerInputs(x).gram()
    h = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    t_chol = _timed(lambda: torch.linalg.cholesky(h), device)
    return t_gram, t_chol


def scaling(widths, tokens_list, fixed_width, fixed_tokens, solvers, device, cap_max, seq=64):
    rows, limits = [], []
    grid = [("tokens", fixed_width, t) for t in tokens_list] + [("width", w, fixed_tokens) for w in widths]
    for axis, n, tokens in grid:
        w, x, _ = synthetic_layer(n, n, samples=max(tokens // seq, 1), tokens=seq, heldout_samples=1)
        w, x = w.to(device), x.to(device)
        t_gram, t_chol = limit_seconds(x, device)
        limits.append({"axis": axis, "width": n, "tokens": tokens, "gram_seconds": t_gram, "cholesky_seconds": t_chol,
                       "gram_gflop": 2 * tokens * n * n / 1e9, "cholesky_gflop": 2 * n**3 / 3 / 1e9})
        for solver in solvers:
            if solver == "cap" and n > cap_max:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                s = _timed(lambda: prune_layer(w, x, sparsity=0.5, solver=solver), device)
            rows.append({"axis": axis, "method": METHOD_NAMES.get(solver, solver), "width": n, "tokens": tokens,
                         "seconds": s, "limit_seconds": t_gram + t_chol})
            print(f"scaling {axis:6s} n={n:5d} N={tokens:6d} {solver:9s} {s:.3f}s (limit {t_gram + t_chol:.3f}s)",
                  flush=True)
    exps = []
    for axis in ("tokens", "width"):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r[axis], r["seconds"]) for r in rows if r["axis"] == axis and r["method"] == method]
            if len(pts) >= 2:
                exps.append({"axis": axis, "method": method, "exponent": _slope(pts), "points": len(pts)})
    return rows, limits, exps


def _slope(pts):
    xs = [math.log(a) for a, _ in pts]
    ys = [math.log(max(b, 1e-9)) for _, b in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((a - mx) ** 2 for a in xs)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / den if den else float("nan")


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="synthetic parts 2-3 only, tiny sizes (seconds)")
    p.add_argument("--models", nargs="+", default=["deit", "gemma"], choices=["deit", "deit-small", "gemma"],
                   help="deit-small: timm's DeiT-Small (random weights: its layer shapes for time and memory)")
    p.add_argument("--deit-small-blocks", type=int, default=1, help="prune DeiT-Small's first K blocks")
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "alps", "cap"])
    p.add_argument("--gemma-blocks", type=int, default=3, help="prune Gemma's first K decoder layers")
    p.add_argument("--sets", nargs="+", default=["baseline"],
                   help="uncertainty sets (NAME or NAME=GAMMA) for the Gram solvers; each row gets x Baseline time")
    p.add_argument("--sparsity", type=float, default=0.5, help="whole-model sparsity")
    p.add_argument("--no-scaling", action="store_true", help="skip parts 2-3 (synthetic scaling and limit)")
    p.add_argument("--windows", type=int, default=32, help="Gemma calibration windows of 128 tokens")
    p.add_argument("--images", type=int, default=256, help="DeiT calibration images")
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--fixed-width", type=int, default=512)
    p.add_argument("--fixed-tokens", type=int, default=4096)
    p.add_argument("--scaling-methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "alps", "cap"])
    p.add_argument("--cap-max-width", type=int, default=256)
    p.add_argument("--no-fork", action="store_true", help="run every method in this process (memory then "
                   "counts only growth beyond earlier methods' high-water mark)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--onload", default=None, help="keep the model on --device (the host) and onload one block at "
                   "a time to this device (prune_model(device=...)); cpu:0 runs the path on a CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results/cost")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.fast:
        args.models, args.widths, args.tokens = [], [32, 64], [256, 512]
        args.fixed_width, args.fixed_tokens, args.cap_max_width = 32, 256, 64
    start = time.perf_counter()
    rows = []
    if "deit" in args.models:
        model = R.deit()
        if model is None:
            print("tiny DeiT not cached: skipped")
        else:
            batches = R.image_batches(args.images)
            d, tok = model.model.embed_dim, 18  # (28 / 7)^2 patches + class + distillation token
            hidden = 2 * args.images * tok * d * 4
            rows += whole_model("deit-tiny-fmnist (4 blocks, all linears)", model, batches, None,
                                args.methods, device, hidden, sparsity=args.sparsity, fork=not args.no_fork,
                                sets=args.sets, onload=args.onload)
            del model
    if "deit-small" in args.models:  # the layer shapes of a real ViT (384 x 1536 MLP), random weights
        import timm

        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(16, 3, 224, 224, generator=g) for _ in range(max(1, args.images // 16))]
        k = args.deit_small_blocks
        if not 1 <= k <= 12:
            p.error(f"--deit-small-blocks must be between 1 and 12, got {k}")
        targets = f"re:blocks\\.({'|'.join(str(i) for i in range(k))})\\."
        hidden = 2 * len(batches) * 16 * 197 * 384 * 4
        rows += whole_model(f"deit-small (random weights, first {k} of 12 blocks)", model, batches, targets,
                            args.methods, device, hidden, sparsity=args.sparsity, fork=not args.no_fork,
                            sets=args.sets, onload=args.onload)
        del model
    if "gemma" in args.models:
        model = R.gemma()
        batches = [b for b in R.text_batches(args.windows)]
        k = args.gemma_blocks
        targets = f"re:model\\.layers\\.({'|'.join(str(i) for i in range(k))})\\."
        hidden = 2 * args.windows * 129 * model.config.hidden_size * 4
        rows += whole_model(f"gemma-3-270m (first {k} of 18 decoder layers)", model, batches, targets,
                            [m for m in args.methods if m != "cap"], device, hidden, sparsity=args.sparsity,
                            fork=not args.no_fork, sets=args.sets, onload=args.onload)
        del model
    whole_s = time.perf_counter() - start
    scale_rows, limits, exps = [], [], []
    if not args.no_scaling:
        scale_rows, limits, exps = scaling(args.widths, args.tokens, args.fixed_width, args.fixed_tokens,
                                           args.scaling_methods, device, args.cap_max_width)

    info = R.machine(device)
    command = R.command_line("benchmarks/cost.py", argv)
    md = [f"Command: `{command}`", "", f"Machine: {R.machine_line(info)}", "",
          f"Total {time.perf_counter() - start:.0f} s. All numbers come from this one process, so the ratios "
          "compare methods under the same load.", ""]
    if rows:
        md += [f"## 1. Whole model, {args.sparsity:.0%} unstructured, sets {', '.join(args.sets)}", "",
               "`extra RSS`: peak resident memory above the baseline (model and data loaded) while pruning, "
               "sampled every 5 ms; `block acts`: one block's calibration hidden states in and out.", "",
               "| model | method | set | seconds | x SparseGPT | x Baseline set | solver s | extra RSS MiB | x SparseGPT | "
               "model MiB | block acts MiB | mean nominal |" + (" peak GPU MiB |" if device.type == "cuda" else ""),
               "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else "")]
        for r in rows:
            tv = "" if r["time_vs_sparsegpt"] is None else f"{r['time_vs_sparsegpt']:.2f}"
            mv = "" if r["memory_vs_sparsegpt"] is None else f"{r['memory_vs_sparsegpt']:.2f}"
            gpu = f" {r['peak_gpu_mb']:.0f} |" if "peak_gpu_mb" in r else ""
            bv = "" if r["time_vs_baseline"] is None else f"{r['time_vs_baseline']:.2f}"
            md.append(f"| {r['model']} | {r['method']}{' (onloaded to ' + r['blocks_on'] + ')' if r['blocks_on'] != r['device'] else ''} | {r['uncertainty']} | {r['seconds']:.1f} | {tv} | {bv} | "
                      f"{r['solver_seconds']:.1f} | "
                      f"{r['peak_extra_rss_mb']:.0f} | {mv} | {r['model_mb']:.0f} | {r['block_activations_mb']:.0f} | "
                      f"{r['mean_nominal_error']:.5f} |{gpu}")
        md += ["", f"(whole-model part: {whole_s:.0f} s)", ""]
    if scale_rows:  # parts 2-3 (skipped with --no-scaling)
        md += ["## 2. Scaling (synthetic square layers, 50 %, `prune_layer` including its Gram)", "",
               "| axis | method | width n | tokens N | seconds | x limit |", "|---|---|---|---|---|---|"]
        for r in scale_rows:
            md.append(f"| {r['axis']} | {r['method']} | {r['width']} | {r['tokens']} | {r['seconds']:.3f} | "
                      f"{r['seconds'] / r['limit_seconds']:.1f} |")
        md += ["", "Fitted exponents (`t ~ size^b`, least squares in log-log):", "",
               "| method | b vs tokens N | b vs width n |", "|---|---|---|"]
        for method in dict.fromkeys(e["method"] for e in exps):
            by = {e["axis"]: e["exponent"] for e in exps if e["method"] == method}
            md.append(f"| {method} | {by.get('tokens', float('nan')):.2f} | {by.get('width', float('nan')):.2f} |")
        md += ["", "## 3. Physical limit: the unavoidable work per size", "",
               "| width n | tokens N | Gram s (N n^2) | Gram GFLOP/s | Cholesky s (n^3/3) | "
               + " | ".join(f"{m} s" for m in dict.fromkeys(r["method"] for r in scale_rows)) + " |",
               "|---|---|---|---|---|" + "---|" * len(dict.fromkeys(r["method"] for r in scale_rows))]
        for li in limits:
            cells = []
            for m in dict.fromkeys(r["method"] for r in scale_rows):
                hit = [r for r in scale_rows if r["method"] == m and r["width"] == li["width"] and r["tokens"] == li["tokens"]
                       and r["axis"] == li["axis"]]
                cells.append(f"{hit[0]['seconds']:.3f}" if hit else "-")
            rate = li["gram_gflop"] / li["gram_seconds"] if li["gram_seconds"] > 0 else float("nan")
            md.append(f"| {li['width']} | {li['tokens']} | {li['gram_seconds']:.3f} | {rate:.1f} | "
                      f"{li['cholesky_seconds']:.4f} | " + " | ".join(cells) + " |")
    markdown = "\n".join(md) + "\n"
    payload = {"command": command, "machine": info, "loadavg": info["loadavg"], "rows": rows,
               "scaling": scale_rows, "exponents": exps, "limit": limits}
    R.publish(args.out, payload, markdown)
    return payload


if __name__ == "__main__":
    main()
