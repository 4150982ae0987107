"""Whole-model evidence for the uncertainty sets: Gemma 3 270M, every set paired against Baseline,
over several calibration draws and several shifted corpora.

    .venv/bin/python benchmarks/sets_whole.py --threads 2 --draws 3 --settings 0.5 2:4 \\
        --sets baseline trace=0.003 trace --baselines sparsegpt wanda
    .venv/bin/python benchmarks/sets_whole.py --fast --out /tmp/sw    # a tiny random Llama, seconds

**Protocol.** Per calibration draw ``d`` (``--draws``; draw 0 is the Shakespeare calibration region,
draw ``d > 0`` is as many windows drawn at random, seed ``d``, from the Shakespeare training region:
:class:`~robop_lightning.data.TextDataModule` ``calibration_draw``) and per setting (a sparsity, or
an ``N:M`` pattern), every set prunes a fresh copy of the dense model with RobOP-ALPS
(``prune_model``, all decoder linears); ``--baselines`` adds other solvers under the Baseline set.
Every pruned model is scored on the same evaluation windows: ``--eval-windows`` held-out
Shakespeare windows (in-domain) and as many windows of each ``--ood`` corpus (Brown, the Python
documentation, fortune-mod's quotations and verse by default), spread evenly over each corpus. The
summed token NLL of every window is kept.

**Statistics.** Each set's perplexity ratio to the Baseline set of the same draw and setting is
reported per draw and pooled over draws (``exp(sum NLL difference / sum tokens)``), the pooled one
with a two-way (crossed) bootstrap 95 % interval: each resample draws the calibration draws and the
evaluation windows with replacement, the same windows for every draw
(:func:`robop_lightning.robustness.stats.crossed_ratio_ci`), so the interval covers both the
calibration draw and the evaluation sample. Pruning seconds are measured in the same process.

Every finished run is kept under ``--work`` (one JSON per draw x setting x method) and the grid runs
draw by draw: an interrupted grid resumes where it stopped, and the table is built from the draws
that are complete. Writes ``<out>.json`` (``{"command", "commit", "machine", "protocol", "runs",
"comparisons"}``) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning import prune_model  # noqa: E402
from robop_lightning.engine.sets import parse_set_spec  # noqa: E402
from robop_lightning.robustness.stats import crossed_ratio_ci, format_ci  # noqa: E402

OOD_LABELS = {"brown": "Brown", "python_docs": "Python docs", "fortunes": "fortunes", "pydoc_topics": "pydoc"}


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


def spread(windows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` windows evenly spaced over ``windows`` (all of them when there are fewer), so that an
    evaluation sample covers the whole corpus, not its first documents."""
    if count >= len(windows):
        return windows
    return windows[torch.linspace(0, len(windows) - 1, count).round().long()]


def text_data(fast: bool, calibration_windows: int, seqlen: int = 128, draw: int = 0,
              ood: tuple[str, ...] = ("brown",)):
    """The :class:`~robop_lightning.data.TextDataModule` of :func:`text_model` (not set up yet)."""
    from robop_lightning.data import TextDataModule

    ood_corpus = ood[0] if len(ood) == 1 else {name: name for name in ood}
    if not fast:
        return TextDataModule(seqlen=seqlen, calibration_windows=calibration_windows, ood_corpus=ood_corpus,
                              batch_size=8, calibration_draw=draw)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "recipes"))
    from llama_alps import bpe_tokenizer  # noqa: E402

    tok = bpe_tokenizer("pydoc_topics", vocab_size=256)
    pydoc = "pydoc_topics" if len(ood) == 1 else {name: "pydoc_topics" for name in ood}
    return TextDataModule("pydoc_topics", ood_corpus=pydoc, tokenizer=tok, seqlen=32, calibration_windows=8,
                          batch_size=4, calibration_draw=draw)


def text_model(fast: bool, calibration_windows: int, seqlen: int = 128, draw: int = 0,
               ood: tuple[str, ...] = ("brown",)):
    """``(dense model, TextDataModule, label)``: Gemma 3 270M on Shakespeare with the ``ood`` corpora
    (splits ``ood/<name>``; one corpus: split ``ood``), or with ``fast`` a tiny random Llama on pydoc
    text (the same corpus as "OOD": ``--fast`` checks the code path, not a distribution shift). The
    datamodule is not set up yet."""
    dm = text_data(fast, calibration_windows, seqlen, draw, ood)
    if not fast:
        return R.gemma(), dm, "gemma-3-270m (all 18 decoder layers)"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # 512 rows hold the BPE's 256 bytes + merges + specials
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), dm, "tiny random Llama (--fast)"


def _layer_fit_table(runs: dict, settings: list[str], solver: str) -> list[str]:
    """Median over blocks and draws, per linear type, of each run's calibration error over the
    Baseline run's of the same draw (the errors ``prune_model`` reports while walking the model)."""
    ratios: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in runs.values():
        if r["method"] == "dense" or r.get("set") == "baseline" and r.get("solver") == solver:
            continue
        base = runs.get(_key(r["draw"], r["setting"], solver, "baseline"), {}).get("layer_nominal_error")
        for name, e in (r.get("layer_nominal_error") or {}).items():
            if base and base.get(name, 0) > 0:
                ratios.setdefault((r["setting"], r["method"]), {}).setdefault(name.rsplit(".", 1)[-1], []).append(e / base[name])
    if not ratios:
        return []
    kinds = list(dict.fromkeys(k for by_kind in ratios.values() for k in by_kind))
    lines = ["", "Calibration (nominal) error of each linear type in the sequential pipeline, as a ratio to the "
             "Baseline run of the same draw and setting (median over blocks and draws): how much calibration "
             "fit a method gives up.", "",
             "| setting | method | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for setting in settings:
        for (s, method), by_kind in ratios.items():
            if s == setting:
                cells = [f"{statistics.median(by_kind[k]):.2f}" if k in by_kind else "-" for k in kinds]
                lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    return lines


def _key(draw: int, setting: str, solver: str, spec: str) -> str:
    return f"d{draw}_{setting.replace(':', '-')}_{solver}_{spec}"


def _prune_and_score(dense, calibration, setting: str, solver: str, spec: str, args, evaluate) -> dict:
    name, radius = parse_set_spec(spec, allow_auto=True)
    _, sparsity, pattern = _setting(setting)
    model = copy.deepcopy(dense)
    auto = {"scorer": args.auto_scorer, "select": args.auto_select,
            **({"candidates": args.auto_candidates} if args.auto_candidates else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = time.perf_counter()
        report = prune_model(model, calibration, sparsity=sparsity, pattern=pattern, solver=solver,
                             uncertainty=name, radius=radius, progress=False,
                             **({"auto": auto} if "auto" in (name, radius) else {}))
        seconds = time.perf_counter() - t
    chosen = [r["selection"]["chosen"] for r in report.layers if "selection" in r]
    return {"method": f"robop-{solver}/{spec}" if solver == args.solver else solver, "setting": setting,
            "commit": R.git_commit(),
            "chosen": {c: chosen.count(c) for c in sorted(set(chosen))},
            "layer_nominal_error": {r["name"]: r["nominal_error"] for r in report.layers},
            "solver": solver, "set": spec, "seconds": seconds, "sparsity": report.totals["sparsity"],
            **evaluate(model)}


def compare(runs: dict, splits: list[str], solver: str, resamples: int) -> list[dict]:
    """Per setting and method: pooled perplexity, the per-draw ratios to Baseline and the pooled ratio
    with its crossed interval, over the draws where both the method and Baseline finished."""
    rows = []
    methods = list(dict.fromkeys((r["setting"], r["method"], r["solver"], r["set"]) for r in runs.values()
                                 if r["method"] != "dense"))
    for setting, method, msolver, spec in methods:
        pairs = [(r, runs.get(_key(r["draw"], setting, solver, "baseline"))) for r in runs.values()
                 if r["setting"] == setting and r["method"] == method]
        pairs = sorted(((r, b) for r, b in pairs if b is not None), key=lambda rb: rb[0]["draw"])
        if not pairs:
            continue
        row = {"setting": setting, "method": method, "draws": [r["draw"] for r, _ in pairs],
               "seconds": statistics.mean(r["seconds"] for r, _ in pairs),
               "time_vs_baseline": sum(r["seconds"] for r, _ in pairs) / sum(b["seconds"] for _, b in pairs)}
        for split in splits:
            nll = [r[split]["nll"] for r, _ in pairs]
            base = [b[split]["nll"] for _, b in pairs]
            tokens = pairs[0][0][split]["tokens"]
            row[f"ppl_{split}"] = math.exp(sum(map(sum, nll)) / (len(nll) * sum(tokens)))
            row[f"per_draw_{split}"] = [math.exp((sum(a) - sum(b)) / sum(tokens)) for a, b in zip(nll, base)]
            row[f"ratio_{split}"] = list(crossed_ratio_ci(nll, base, tokens, resamples=resamples))
        rows.append(row)
    return rows


def markdown(payload: dict, label: str, dm, splits: list[str]) -> str:
    rows, proto = payload["comparisons"], payload["protocol"]
    tail = " (pydoc in --fast)" if proto["fast"] else ""
    names = {"in-domain": "Shakespeare (in-domain)" + tail,
             **{s: OOD_LABELS.get(s.split("/")[-1], s.split("/")[-1]) + tail for s in splits if s != "in-domain"}}
    dense = payload["runs"]["dense"]
    draws = sorted({d for r in rows for d in r["draws"]})
    md = [f"Command: `{payload['command']}`", "", f"Commit (of the runs): `{payload['commit']}`", "",
          f"Machine: {R.machine_line(payload['machine'])}", "",
          f"Model: {label}; {len(draws)} calibration draws ({', '.join(map(str, draws))}) of "
          f"{proto['calibration_windows']} Shakespeare windows of {proto['seqlen']} tokens (draw 0: the calibration "
          f"region; draw d > 0: windows drawn with seed d from the training region); perplexity on "
          + ", ".join(f"{proto['eval_windows'][s]} {names[s]}" for s in splits)
          + " windows, spread evenly over each corpus. Dense: "
          + " / ".join(f"{dense[s]['ppl']:.2f}" for s in splits) + ".", "",
          "Ratios are each method's perplexity over the RobOP Baseline set's of the same draw and setting, pooled "
          "over the draws, with a two-way bootstrap 95 % interval that resamples draws and windows (below 1: "
          "better than Baseline). Sets are the authors' closed forms (`NAME=GAMMA`; gamma 0.01 when not given).", "",
          "| setting | method | draws | " + " | ".join(f"{names[s]} ratio [95 % CI]" for s in splits)
          + " | prune s | x Baseline time |",
          "|---|---|---|" + "---|" * (len(splits) + 2)]
    for row in rows:
        md.append(f"| {row['setting']} | {row['method']} | {len(row['draws'])} | "
                  + " | ".join(format_ci(*row[f"ratio_{s}"]) for s in splits)
                  + f" | {row['seconds']:.0f} | {row['time_vs_baseline']:.2f} |")
    md += ["", "Pooled perplexity (over the draws) and each draw's ratio to Baseline:", "",
           "| setting | method | " + " | ".join(f"{names[s]} ppl; per draw" for s in splits) + " |",
           "|---|---|" + "---|" * len(splits)]
    for row in rows:
        md.append(f"| {row['setting']} | {row['method']} | " + " | ".join(
            f"{row[f'ppl_{s}']:.2f}; " + " ".join(f"{v:.3f}" for v in row[f"per_draw_{s}"]) for s in splits) + " |")
    md += _layer_fit_table(payload["runs"], list(dict.fromkeys(r["setting"] for r in rows)), proto["solver"])
    return "\n".join(md) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--sets", nargs="+", default=["baseline", "trace=0.003", "trace"], help="NAME or NAME=GAMMA")
    p.add_argument("--solver", default="alps")
    p.add_argument("--auto-scorer", default=None,
                   help="scorer of 'auto' / 'NAME=auto' specs (default: 'admm' for ALPS; 'solver': the solver itself)")
    p.add_argument("--auto-select", default="mean", choices=["mean", "worst"])
    p.add_argument("--auto-candidates", nargs="+", default=None,
                   help="the candidates of 'auto' (NAME=GAMMA specs; default: the library's grid)")
    p.add_argument("--baselines", nargs="*", default=["sparsegpt", "wanda"], help="other solvers, Baseline set")
    p.add_argument("--draws", type=int, default=3, help="calibration draws (0 .. K-1)")
    p.add_argument("--ood", nargs="+", default=["brown", "python_docs", "fortunes"],
                   help="out-of-distribution corpora (names of robop_lightning.data.load_corpus)")
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny random Llama on pydoc text (seconds; for tests)")
    p.add_argument("--work", default=None, help="finished runs (default: <out>_runs/)")
    p.add_argument("--out", default="benchmarks/results/sets_whole")
    return p


def main(argv=None) -> dict:
    p = _parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.sets:
        parse_set_spec(spec, allow_auto=True)
    if "baseline" not in args.sets:
        p.error("--sets must include plain 'baseline': every set is compared with it.")
    if args.draws < 1:
        p.error("--draws must be >= 1")
    work = pathlib.Path(args.work or f"{args.out}_runs")
    work.mkdir(parents=True, exist_ok=True)
    if args.fast:
        args.eval_windows = min(args.eval_windows, 8)

    def stored(key: str, fn) -> dict:
        path = work / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        out = fn()
        path.write_text(json.dumps(out))
        return out

    evals = None
    runs: dict[str, dict] = {}
    jobs = [(s, args.solver, spec) for s in args.settings for spec in args.sets]
    jobs += [(s, b, "baseline") for s in args.settings for b in args.baselines]
    dense, _, label = text_model(args.fast, args.calibration_windows, args.seqlen, 0, tuple(args.ood))
    for draw in range(args.draws):
        dm = text_data(args.fast, args.calibration_windows, args.seqlen, draw, tuple(args.ood))
        dm.setup()
        calibration = list(dm.calibration_dataloader())
        if evals is None:  # the same evaluation windows for every draw
            evals = {"in-domain": spread(dm.splits["test"], args.eval_windows),
                     **{name: spread(dm.splits[name], args.eval_windows) for name in dm.ood_corpora}}

        def evaluate(m) -> dict:
            out = {}
            for name, windows in evals.items():
                nll, tokens = window_nll(m, windows)
                out[name] = {"nll": nll, "tokens": tokens,
                             "ppl": math.exp(math.fsum(nll) / sum(tokens))}
            return out

        runs["dense"] = stored("dense", lambda: {"method": "dense", "setting": "dense", "draw": None, "seconds": 0.0,
                                                 **evaluate(dense)})
        for setting, solver, spec in jobs:
            key = _key(draw, setting, solver, spec)

            def job(setting=setting, solver=solver, spec=spec, draw=draw):
                out = {"draw": draw, **_prune_and_score(dense, calibration, setting, solver, spec, args, evaluate)}
                print(f"draw {draw} {setting:>5} {out['method']:28s} {out['seconds']:7.1f}s  "
                      + "  ".join(f"{s} {out[s]['ppl']:.2f}" for s in evals), flush=True)
                return out

            runs[key] = stored(key, job)

    splits = list(evals)
    for path in sorted(work.glob("d*_*.json")):  # earlier invocations' finished runs join the table
        runs.setdefault(path.stem, json.loads(path.read_text()))
    comparisons = compare(runs, splits, args.solver, args.resamples)
    protocol = {"model": label, "fast": args.fast, "calibration_windows": args.calibration_windows, "seqlen": dm.seqlen,
                "draws": args.draws, "eval_windows": {k: len(v) for k, v in evals.items()}, "solver": args.solver,
                "interval": "two-way (crossed) percentile bootstrap over calibration draws and evaluation windows"}
    commits = sorted({r.get("commit") or "unrecorded" for r in runs.values() if r["method"] != "dense"})
    payload = {"command": R.command_line("benchmarks/sets_whole.py", argv), "commit": ", ".join(commits),
               "machine": R.machine(), "protocol": protocol, "runs": runs, "comparisons": comparisons}
    R.publish(args.out, payload, markdown(payload, label, dm, splits))
    return payload


if __name__ == "__main__":
    main()
