"""Which criterion should ``uncertainty="auto"`` choose by: the layer, the block or the model?

    .venv/bin/python benchmarks/auto_criteria.py --threads 2 --settings 0.7 \\
        --sets baseline trace trace=0.003 e=1 auto
    .venv/bin/python benchmarks/auto_criteria.py --fast --out /tmp/ac      # a tiny random Llama, seconds

A criterion is worth choosing by if it ranks the candidates the way the model's quality does. For
each candidate (one of the authors' sets applied to every layer, or ``auto``) the whole Gemma 3 270M
is pruned with RobOP-ALPS on 24 of the 32 calibration windows (``prune_model(heldout_fraction=0.25)``).
The 8 windows left out are held-out *calibration* samples, on which three label-free criteria are
measured, the three that auto could choose by:

- **layer**: each decoder linear's relative reconstruction error on the held-out samples, with the
  pipeline's own inputs (``prune_model``'s ``heldout_error``), mean over linears;
- **block**: each decoder block's relative output error on the held-out samples, the pruned block
  against the dense block fed the same input (the pruned model's), mean over blocks;
- **model**: the KL divergence of the pruned model's next-token distribution from the dense model's,
  mean over held-out tokens.

What the model actually does is its perplexity on the 32 held-out Shakespeare windows (in-domain)
and 32 Brown windows (out of distribution) of ``benchmarks/sets_whole.py``. Per setting the report
gives every criterion and both perplexities per candidate, and each criterion's Spearman rank
correlation with each perplexity over the candidates (1: the criterion orders the candidates exactly
as the model's quality does). Finished runs are kept under ``--work`` and resumed.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402
from sets_whole import _setting, text_model, window_nll  # noqa: E402

from robop_lightning import prune_model  # noqa: E402
from robop_lightning.engine.sets import parse_set_spec  # noqa: E402

CRITERIA = ("layer", "block", "model")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_errors(pruned, dense, blocks: list[str], windows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Relative output error of each pruned block against the dense block on the pruned model's own input."""
    num = {b: 0.0 for b in blocks}
    den = {b: 0.0 for b in blocks}
    hooks = []
    for name in blocks:
        dense_block = dense.get_submodule(name)

        def hook(module, args, kwargs, output, name=name, dense_block=dense_block):
            ref = _first(dense_block(*args, **kwargs)).double()
            num[name] += float((_first(output).double() - ref).pow(2).sum())
            den[name] += float(ref.pow(2).sum())

        hooks.append(pruned.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        for i in range(0, len(windows), batch_size):
            pruned(input_ids=windows[i : i + batch_size, :-1])
    finally:
        for h in hooks:
            h.remove()
    return {b: num[b] / den[b] if den[b] > 0 else 0.0 for b in blocks}


@torch.no_grad()
def kl_from_dense(pruned, dense, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean over tokens of KL(dense || pruned) of the next-token distributions."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size, :-1]
        p = torch.log_softmax(dense(input_ids=ids).logits.double(), -1)
        q = torch.log_softmax(pruned(input_ids=ids).logits.double(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += ids.numel()
    return total / count


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var > 0 else 0.0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["0.7"])
    p.add_argument("--sets", nargs="+", default=["baseline", "trace", "trace=0.003", "e=1", "auto"])
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--heldout-fraction", type=float, default=0.25)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny random Llama on pydoc text (seconds; for tests)")
    p.add_argument("--work", default=None, help="finished runs (default: <out>_runs/)")
    p.add_argument("--out", default="benchmarks/results/auto_criteria")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.sets:
        parse_set_spec(spec, allow_auto=True)
    work = pathlib.Path(args.work or f"{args.out}_runs")
    work.mkdir(parents=True, exist_ok=True)

    dense, dm, _ = text_model(args.fast, args.calibration_windows)
    if args.fast:
        args.eval_windows = min(args.eval_windows, 8)
    dm.setup()
    calibration = [b for b in dm.calibration_dataloader()]
    windows = torch.cat(calibration)
    heldout = windows[len(windows) - round(args.heldout_fraction * len(windows)) :]  # prune_model holds out the last ones
    evals = {"in-domain": dm.splits["test"][: args.eval_windows], "ood": dm.splits["ood"][: args.eval_windows]}
    blocks = [f"model.layers.{i}" for i in range(len(dense.model.layers))]

    runs = {}
    for setting in args.settings:
        for spec in args.sets:
            key = f"{setting.replace(':', '-')}_{spec}"
            path = work / f"{key}.json"
            if path.exists():
                runs[key] = json.loads(path.read_text())
                continue
            name, radius = parse_set_spec(spec, allow_auto=True)
            _, sparsity, pattern = _setting(setting)
            model = copy.deepcopy(dense)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t = time.perf_counter()
                report = prune_model(model, calibration, sparsity=sparsity, pattern=pattern, solver="alps",
                                     uncertainty=name, radius=radius, heldout_fraction=args.heldout_fraction,
                                     progress=False)
                seconds = time.perf_counter() - t
            out = {"setting": setting, "set": spec, "seconds": seconds,
                   "layer": statistics.mean(r["heldout_error"] for r in report.layers),
                   "block": statistics.mean(block_errors(model, dense, blocks, heldout).values()),
                   "model": kl_from_dense(model, dense, heldout)}
            for split, data in evals.items():
                nll, tokens = window_nll(model, data)
                out[f"ppl_{split}"] = float(torch.tensor(nll, dtype=torch.float64).sum().div(sum(tokens)).exp())
            print(f"{setting:>5} {spec:12s} {seconds:6.0f}s layer {out['layer']:.4f} block {out['block']:.4f} "
                  f"KL {out['model']:.4f}  ppl {out['ppl_in-domain']:.2f} OOD {out['ppl_ood']:.2f}", flush=True)
            path.write_text(json.dumps(out))
            runs[key] = out
            del model

    command = R.command_line("benchmarks/auto_criteria.py", argv)
    md = [f"Command: `{command}`", "", f"Machine: {R.machine_line(R.machine())}", "",
          f"Pruned on {len(windows) - len(heldout)} calibration windows; criteria on the {len(heldout)} held-out "
          f"calibration windows; perplexity on {len(evals['in-domain'])} held-out Shakespeare (in-domain) and "
          f"{len(evals['ood'])} Brown (OOD) windows.", "",
          "| setting | set | layer error | block error | model KL | ppl | OOD ppl | prune s |",
          "|---|---|---|---|---|---|---|---|"]
    correlations = []
    for setting in args.settings:
        rs = [runs[f"{setting.replace(':', '-')}_{spec}"] for spec in args.sets]
        for r in rs:
            md.append(f"| {setting} | {r['set']} | {r['layer']:.4f} | {r['block']:.4f} | {r['model']:.4f} | "
                      f"{r['ppl_in-domain']:.2f} | {r['ppl_ood']:.2f} | {r['seconds']:.0f} |")
        for crit in CRITERIA:
            correlations.append({"setting": setting, "criterion": crit,
                                 **{split: spearman([r[crit] for r in rs], [r[f"ppl_{split}"] for r in rs])
                                    for split in evals}})
    md += ["", "Spearman rank correlation over the candidates between each criterion and the model's perplexity "
           "(1: the criterion orders the candidates exactly as the model's quality does):", "",
           "| setting | criterion | with in-domain ppl | with OOD ppl |", "|---|---|---|---|"]
    for c in correlations:
        md.append(f"| {c['setting']} | {c['criterion']} | {c['in-domain']:+.2f} | {c['ood']:+.2f} |")
    payload = {"command": command, "machine": R.machine(), "runs": runs, "correlations": correlations}
    R.publish(args.out, payload, "\n".join(md) + "\n")
    return payload


if __name__ == "__main__":
    main()
