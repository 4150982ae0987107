"""Whole-model evidence for the uncertainty sets: Gemma 3 270M, every set paired against Baseline.

    .venv/bin/python benchmarks/sets_whole.py --threads 2 --settings 0.5 0.7 2:4 \\
        --sets baseline trace trace=0.003 e e=1 cte --baselines sparsegpt
    .venv/bin/python benchmarks/sets_whole.py --fast --out /tmp/sw    # a tiny random Llama, seconds

Per setting (a sparsity, or an ``N:M`` pattern) every set prunes a fresh copy of the dense model
with RobOP-ALPS (``prune_model``, all decoder linears) on the same calibration windows (32
Shakespeare windows of 128 tokens); ``--baselines`` adds other solvers under the Baseline set.
Each pruned model is scored on ``--eval-windows`` held-out Shakespeare windows (in-domain) and as
many Brown windows (out of distribution): the summed token NLL of every window is kept, so each
set's perplexity ratio to the Baseline set comes with a paired bootstrap 95 % interval over
windows (:func:`robop_lightning.robustness.stats.perplexity_ratio_ci`). Pruning seconds are measured
in the same process, so the time ratio to Baseline holds under the machine's load.

Every finished run is kept under ``--work`` (one JSON per setting x method): an interrupted grid
resumes where it stopped, and several invocations (one setting each) merge into one table.
Writes ``<out>.json`` (``{"command", "machine", "protocol", "runs", "comparisons"}``) and ``<out>.md``.
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

from robop_lightning import prune_model  # noqa: E402
from robop_lightning.robustness.stats import format_ci, perplexity_ratio_ci  # noqa: E402
from robop_lightning.engine.sets import parse_set_spec  # noqa: E402


def _setting(text: str) -> tuple[str, float | None, str]:
    if ":" in text:
        return text, None, text
    return text, float(text), "unstructured"


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[list[float], list[int]]:
    """Summed next-token NLL and scored-token count of every window ``(W, T+1)`` (BOS first)."""
    nll, tokens = [], []
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll += loss.double().sum(1).tolist()
        tokens += [ids.shape[1] - 1] * len(ids)
    return nll, tokens


def _layer_fit_table(runs: dict, settings: list[str], solver: str) -> list[str]:
    """Median over blocks, per linear type, of each run's calibration error over the Baseline run's.

    The errors are those ``prune_model`` reports while walking the model: each layer's nominal
    error on its own calibration inputs, which come from the already-pruned blocks before it.
    """
    lines = ["", "Calibration (nominal) error of each linear type in the sequential pipeline, as a ratio to the "
             "Baseline run of the same setting (median over blocks): how much calibration fit a set gives up.", ""]
    kinds: list[str] = []
    table = []
    for setting in settings:
        base = runs.get(f"{setting.replace(':', '-')}_{solver}_baseline", {}).get("layer_nominal_error")
        if not base:
            continue
        for r in runs.values():
            errs = r.get("layer_nominal_error")
            if r["setting"] != setting or not errs or r.get("set") == "baseline" and r.get("solver") == solver:
                continue
            by_kind: dict[str, list[float]] = {}
            for name, e in errs.items():
                if name in base and base[name] > 0:
                    by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(e / base[name])
            kinds += [k for k in by_kind if k not in kinds]
            table.append((setting, r["method"], {k: statistics.median(v) for k, v in by_kind.items()}))
    if not table:
        return []
    lines += ["| setting | method | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for setting, method, med in table:
        lines.append(f"| {setting} | {method} | " + " | ".join(f"{med[k]:.2f}" if k in med else "-" for k in kinds) + " |")
    return lines


def text_model(fast: bool, calibration_windows: int, seqlen: int = 128):
    """``(dense model, TextDataModule, label)``: Gemma 3 270M on Shakespeare / Brown, or with ``fast``
    a tiny random Llama on pydoc text (the same corpus as "OOD": ``--fast`` checks the code path, not
    a distribution shift). The datamodule is not set up yet."""
    from robop_lightning.data import TextDataModule

    if not fast:
        dm = TextDataModule(seqlen=seqlen, calibration_windows=calibration_windows, ood_corpus="brown", batch_size=8)
        return R.gemma(), dm, "gemma-3-270m (all 18 decoder layers)"
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "recipes"))
    from llama_alps import bpe_tokenizer  # noqa: E402

    tok = bpe_tokenizer("pydoc_topics", vocab_size=256)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    dm = TextDataModule("pydoc_topics", ood_corpus="pydoc_topics", tokenizer=tok, seqlen=32,
                        calibration_windows=8, batch_size=4)
    return LlamaForCausalLM(cfg).eval(), dm, "tiny random Llama (--fast)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["0.5", "0.7", "2:4"])
    p.add_argument("--sets", nargs="+", default=["baseline", "trace", "e", "cte"], help="NAME or NAME=GAMMA")
    p.add_argument("--solver", default="alps")
    p.add_argument("--auto-scorer", default=None,
                   help="scorer of 'auto' / 'NAME=auto' specs (default: 'admm' for ALPS; 'solver': the solver itself)")
    p.add_argument("--auto-select", default="mean", choices=["mean", "worst"])
    p.add_argument("--auto-candidates", nargs="+", default=None,
                   help="the candidates of 'auto' (NAME=GAMMA specs; default: the library's grid)")
    p.add_argument("--baselines", nargs="*", default=["sparsegpt"], help="other solvers, Baseline set")
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny random Llama on pydoc text (seconds; for tests)")
    p.add_argument("--work", default=None, help="finished runs (default: <out>_runs/)")
    p.add_argument("--out", default="benchmarks/results/sets_whole")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.sets:
        parse_set_spec(spec, allow_auto=True)
    if "baseline" not in args.sets:
        p.error("--sets must include plain 'baseline': every set is compared with it.")
    work = pathlib.Path(args.work or f"{args.out}_runs")
    work.mkdir(parents=True, exist_ok=True)

    dense, dm, label = text_model(args.fast, args.calibration_windows, args.seqlen)
    if args.fast:
        args.eval_windows = min(args.eval_windows, 8)
    dm.setup()
    calibration = [b for b in dm.calibration_dataloader()]
    evals = {"in-domain": dm.splits["test"][: args.eval_windows], "ood": dm.splits["ood"][: args.eval_windows]}

    def run(key: str, fn) -> dict:
        path = work / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        out = fn()
        path.write_text(json.dumps(out))
        return out

    def evaluate(model) -> dict:
        out = {}
        for name, windows in evals.items():
            nll, tokens = window_nll(model, windows)
            out[name] = {"nll": nll, "tokens": tokens, "ppl": float(torch.tensor(nll, dtype=torch.float64).sum().div(sum(tokens)).exp())}
        return out

    runs = {"dense": run("dense", lambda: {"method": "dense", "setting": "dense", "seconds": 0.0, **evaluate(dense)})}
    jobs = [(s, args.solver, spec) for s in args.settings for spec in args.sets]
    jobs += [(s, b, "baseline") for s in args.settings for b in args.baselines]
    for setting, solver, spec in jobs:
        key = f"{setting.replace(':', '-')}_{solver}_{spec}"

        def job(setting=setting, solver=solver, spec=spec):
            name, radius = parse_set_spec(spec, allow_auto=True)
            _, sparsity, pattern = _setting(setting)
            model = copy.deepcopy(dense)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                t = time.perf_counter()
                auto = {"scorer": args.auto_scorer, "select": args.auto_select,
                        **({"candidates": args.auto_candidates} if args.auto_candidates else {})}
                report = prune_model(model, calibration, sparsity=sparsity, pattern=pattern, solver=solver,
                                     uncertainty=name, radius=radius, progress=False,
                                     **({"auto": auto} if "auto" in (name, radius) else {}))
                seconds = time.perf_counter() - t
            chosen = [r["selection"]["chosen"] for r in report.layers if "selection" in r]
            out = {"method": f"robop-{solver}/{spec}" if solver == args.solver else solver, "setting": setting,
                   "chosen": {c: chosen.count(c) for c in sorted(set(chosen))},
                   "layer_nominal_error": {r["name"]: r["nominal_error"] for r in report.layers},
                   "solver": solver, "set": spec, "seconds": seconds, "sparsity": report.totals["sparsity"],
                   **evaluate(model)}
            print(f"{setting:>5} {out['method']:28s} {seconds:7.1f}s  ppl {out['in-domain']['ppl']:8.2f}  "
                  f"OOD {out['ood']['ppl']:8.2f}", flush=True)
            return out

        runs[key] = run(key, job)

    # earlier invocations' finished runs (other settings) join the table: one file for the whole grid
    for path in sorted(work.glob("*.json")):
        runs.setdefault(path.stem, json.loads(path.read_text()))
    order = {"0.5": 0, "0.7": 1, "2:4": 2}
    settings = sorted({r["setting"] for r in runs.values() if r["setting"] != "dense"},
                      key=lambda x: (order.get(x, 9), x))
    comparisons = []
    for setting in settings:
        base = runs.get(f"{setting.replace(':', '-')}_{args.solver}_baseline")
        for key, r in runs.items():
            if r["setting"] != setting:
                continue
            row = {"setting": setting, "method": r["method"], "seconds": r["seconds"],
                   "time_vs_baseline": r["seconds"] / base["seconds"] if base else None}
            for split in evals:
                row[f"ppl_{split}"] = r[split]["ppl"]
                if base is not None:
                    row[f"ratio_{split}"] = list(perplexity_ratio_ci(r[split]["nll"], base[split]["nll"], r[split]["tokens"],
                                                                     resamples=args.resamples))
            comparisons.append(row)

    info = R.machine()
    command = R.command_line("benchmarks/sets_whole.py", argv)
    d = runs["dense"]
    md = [f"Command: `{command}`", "", f"Machine: {R.machine_line(info)}", "",
          f"Model: {label}; calibration {len(dm.splits['calibration'])} Shakespeare windows of {dm.seqlen} tokens; "
          f"perplexity on {len(evals['in-domain'])} held-out Shakespeare windows (in-domain) and "
          f"{len(evals['ood'])} Brown windows (OOD). Dense: {d['in-domain']['ppl']:.2f} / {d['ood']['ppl']:.2f}.", "",
          "Ratios are to the RobOP Baseline set of the same setting, with paired bootstrap 95 % intervals over "
          "windows (below 1: better than Baseline). Sets are the authors' closed forms (`NAME=GAMMA`; "
          "gamma 0.01 when not given).", "",
          "| setting | method | ppl | ratio [95 % CI] | OOD ppl | OOD ratio [95 % CI] | prune s | x Baseline time |",
          "|---|---|---|---|---|---|---|---|"]
    for row in comparisons:
        ci = lambda k: format_ci(*row[k]) if k in row else "-"  # noqa: E731
        tv = f"{row['time_vs_baseline']:.2f}" if row["time_vs_baseline"] else "-"
        md.append(f"| {row['setting']} | {row['method']} | {row['ppl_in-domain']:.2f} | {ci('ratio_in-domain')} | "
                  f"{row['ppl_ood']:.2f} | {ci('ratio_ood')} | {row['seconds']:.0f} | {tv} |")
    md += _layer_fit_table(runs, settings, args.solver)
    markdown = "\n".join(md) + "\n"
    protocol = {"model": label, "calibration_windows": len(dm.splits["calibration"]), "seqlen": dm.seqlen,
                "eval_windows": {k: len(v) for k, v in evals.items()}, "solver": args.solver}
    payload = {"command": command, "machine": info, "protocol": protocol, "runs": runs, "comparisons": comparisons}
    R.publish(args.out, payload, markdown)
    return payload


if __name__ == "__main__":
    main()
