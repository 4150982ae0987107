"""Structured RobOP, whole heads and MLP channels removed: CPU speed of a shrunk DeiT-Small, accuracy on the embedded task.

    .venv/bin/python benchmarks/structured_speed.py                  # both parts, ~5 min on 2 shared cores
    .venv/bin/python benchmarks/structured_speed.py --part speed --budgets 0.3 0.5 0.6
    .venv/bin/python benchmarks/structured_speed.py --part accuracy --finetune-batches 300

Speed: timm ``deit_small_patch16_224`` (random weights, ``pretrained=False``), dense and shrunk by
``prune_model(pattern="structured", uncertainty=--speed-set)`` (Baseline by default; speed does not
depend on the set) at several shares of block parameters removed (per-layer budget: every block loses
that share of its parameters, its heads rounded and its MLP channels making up the rest). Latency is
the median of repeated ``torch.inference_mode`` forwards at batch 1 and batch 32 on ``--threads``
threads; models are timed round-robin (dense, 30 %, 50 %, ... then again) so that load from other
jobs hits them alike.
Throughput is images / s at batch 32.

Accuracy: the cached tiny DeiT of ``recipes/deit_cap.py`` (Fashion-MNIST, 28 px) pruned at 50 % of
block parameters with robust structured OBS under each of ``--sets`` (Baseline and Trace by default)
and each of ``--budget`` (per-layer and global, counted in parameters); test accuracy (10k images)
before pruning, after, and after recovery fine-tuning under ``--finetune-sets`` (Trace by default) with
``RobOPCallback(pattern="structured")`` (which shrinks at fit start and rebuilds the optimizer).

Writes ``benchmarks/results/structured.json`` (one row per model) and ``structured.md`` (tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from robop_lightning import RobOPCallback, prune_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for b in model.blocks for n, p in b.named_parameters() if "attn" in n or "mlp" in n)


def deit_small_gflops(heads: int, mlp: int, depth: int = 12, dim: int = 384, hd: int = 64, tokens: int = 197) -> float:
    """Analytic forward GFLOPs of one 224 px image (2 x MACs): linears, attention matmuls, patch embedding, head."""
    per_block = 2 * tokens * (dim * 3 * heads * hd + heads * hd * dim + 2 * dim * mlp) + 4 * tokens**2 * heads * hd
    return (depth * per_block + 2 * 196 * 768 * dim + 2 * dim * 1000) / 1e9


# ----------------------------------------------------------------------------- speed
def speed(args) -> list[dict]:
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    calib = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))]  # 1576 tokens: shapes only
    models = {"dense": (dense, None)}
    for s in args.budgets:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = prune_model(m, calib, sparsity=s, pattern="structured", uncertainty=args.speed_set, progress=False)
        print(f"structured {s:.0%}: pruned in {time.perf_counter() - t0:.1f} s, heads {m.blocks[0].attn.num_heads}, "
              f"MLP {m.blocks[0].mlp.fc1.out_features}, block params removed {report.config['params_removed']:.3f}",
              flush=True)  # fmt: skip
        models[f"structured@{s:g}"] = (m.eval(), report)
    base_block = block_params(dense)
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in models}
    inputs = {b: torch.randn(b, 3, 224, 224) for b in (1, 32)}
    with torch.inference_mode():
        for batch, warm, reps in ((1, 3, args.reps1), (32, 1, args.reps32)):
            for name, (m, _) in models.items():
                for _ in range(warm):
                    m(inputs[batch])
            for _ in range(reps):
                for name, (m, _) in models.items():
                    t0 = time.perf_counter()
                    m(inputs[batch])
                    times[name][batch].append(time.perf_counter() - t0)
            print(f"batch {batch}: " + ", ".join(f"{k} {statistics.median(v[batch]) * 1e3:.0f} ms" for k, v in times.items()),
                  f"(load {load()})", flush=True)  # fmt: skip
    rows = []
    d1, d32 = (statistics.median(times["dense"][b]) for b in (1, 32))
    for name, (m, report) in models.items():
        t1, t32 = statistics.median(times[name][1]), statistics.median(times[name][32])
        rows.append(
            dict(
                part="speed", model="deit_small_patch16_224", method="dense" if report is None else "robop-structured",
                uncertainty=None if report is None else args.speed_set, pattern="dense" if report is None else "structured",
                sparsity=0.0 if report is None else report.config["sparsity"], budget="layer",
                block_params_removed=1 - block_params(m) / base_block, params_m=count(m) / 1e6,
                heads=m.blocks[0].attn.num_heads, mlp_hidden=m.blocks[0].mlp.fc1.out_features,
                latency_b1_ms=t1 * 1e3, latency_b32_ms=t32 * 1e3, throughput_img_s=32 / t32,
                speedup_b1=d1 / t1, speedup_b32=d32 / t32,
                reps_b1=len(times[name][1]), reps_b32=len(times[name][32]),
            )  # fmt: skip
        )
    return rows


# ----------------------------------------------------------------------------- accuracy
def accuracy(args) -> list[dict]:
    from lightning.pytorch import Trainer, seed_everything

    from robop_lightning.data import FashionMNISTDataModule
    from robop_lightning.data.vision import cache_dir
    from robop_lightning.models import DeiTClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    ckpts = sorted((cache_dir() / "recipes").glob("deit_cap-*.ckpt"))
    if not ckpts:
        raise SystemExit("no cached recipe model: run `python recipes/deit_cap.py --fast` (or the full recipe) first.")
    seed_everything(0, verbose=False)
    dense = DeiTClassifier.load_from_checkpoint(ckpts[0], map_location="cpu", pretrained=False).eval()
    dm = FashionMNISTDataModule(img_size=28, batch_size=128, calibration_size=args.calibration_size, seed=0)
    dm.setup()
    test = list(dm.test_dataloader())

    def acc(model) -> float:
        model.eval()
        right = total = 0
        with torch.inference_mode():
            for batch in test:
                x, y = batch[0], batch[1]
                right += int((model(x).argmax(-1) == y).sum())
                total += y.numel()
        return right / total

    def timed_acc(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        a = acc(model)
        return a, time.perf_counter() - t0

    base_block = block_params(dense.model)
    rows = []
    a, t = timed_acc(dense)
    rows.append(dict(part="accuracy", model=type(dense.model).__name__, method="dense", uncertainty=None,
                     pattern="dense", sparsity=0.0, block_params_removed=0.0, params_m=count(dense) / 1e6,
                     test_acc=a, finetuned=False, eval_seconds=t))  # fmt: skip
    print(f"dense: {a:.4f} ({count(dense) / 1e6:.3f} M params, {t:.1f} s eval, load {load()})", flush=True)
    calibration = list(dm.calibration_dataloader())
    for budget, unc in [(b, u) for b in args.budget for u in args.sets]:
        options = {"budget": budget, "cost": "params"}
        m = copy.deepcopy(dense)
        report = prune_model(m, calibration, sparsity=args.sparsity, pattern="structured", uncertainty=unc,
                             progress=False, solver_options=options)  # fmt: skip
        a, t = timed_acc(m)
        rows.append(dict(part="accuracy", model=type(dense.model).__name__, method="robop-structured", uncertainty=unc,
                         pattern="structured", sparsity=args.sparsity, budget=budget,
                         block_params_removed=1 - block_params(m.model) / base_block, params_m=count(m) / 1e6,
                         heads=[b.attn.num_heads for b in m.model.blocks],
                         mlp_hidden=[b.mlp.fc1.out_features for b in m.model.blocks],
                         test_acc=a, finetuned=False, prune_seconds=report.seconds, eval_seconds=t))  # fmt: skip
        print(f"structured/{unc}/{budget} @ {args.sparsity:g}: {a:.4f} (heads {rows[-1]['heads']}, MLP {rows[-1]['mlp_hidden']}, "
              f"pruned in {report.seconds:.1f} s)", flush=True)  # fmt: skip
    # recovery fine-tuning through the callback: it prunes at fit start (same calibration subset), then trains
    for budget, unc in [(b, u) for b in args.budget for u in args.finetune_sets]:
        options = {"budget": budget, "cost": "params"}
        m = copy.deepcopy(dense).train()
        m.hparams.lr, m.hparams.warmup_epochs = args.finetune_lr, 0.0
        robop = RobOPCallback(sparsity=args.sparsity, pattern="structured", uncertainty=unc, calibration_dataloader="calibration",
                              calibration_batches=len(calibration), verbose=False, progress=False,
                              structured_options=options)  # fmt: skip
        trainer = Trainer(max_epochs=1, limit_train_batches=args.finetune_batches, callbacks=[robop], logger=False,
                          enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                          limit_val_batches=0, accelerator="cpu")  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(m, datamodule=dm)
        ft = time.perf_counter() - t0
        a, t = timed_acc(m)
        rows.append(dict(part="accuracy", model=type(dense.model).__name__, method="robop-structured+ft", uncertainty=unc,
                         pattern="structured", sparsity=args.sparsity, budget=budget,
                         block_params_removed=1 - block_params(m.model) / base_block, params_m=count(m) / 1e6,
                         heads=[b.attn.num_heads for b in m.model.blocks],
                         mlp_hidden=[b.mlp.fc1.out_features for b in m.model.blocks], test_acc=a, finetuned=True,
                         finetune_batches=args.finetune_batches, finetune_lr=args.finetune_lr,
                         finetune_seconds=ft, eval_seconds=t))  # fmt: skip
        print(f"structured/{unc}/{budget} @ {args.sparsity:g} + fine-tune ({args.finetune_batches} batches, {ft:.0f} s): {a:.4f} "
              f"(dense eval {rows[0]['eval_seconds']:.1f} s, shrunk eval {t:.1f} s, load {load()})", flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- report
def markdown(rows: list[dict], args, runs: dict[str, dict]) -> str:
    lines = ["# Structured RobOP: physically smaller DeiTs", ""]
    for part, r in runs.items():
        lines += [
            f"{part.capitalize()}: `{r['command']}`  ",
            f"machine {r['machine']}, torch {r['torch']}, timm {timm.__version__}, {r['threads']} threads; load average "
            f"(1/5/15 min) at start / end {r['load_start']} → {r['load_end']}; {r['seconds'] / 60:.1f} min.",
            "",
        ]
    speed_rows = [r for r in rows if r["part"] == "speed"]
    if speed_rows:
        lines += [
            "## CPU latency, DeiT-Small (224 px, random weights)",
            "",
            f"Median of {speed_rows[0]['reps_b1']} (batch 1) / {speed_rows[0]['reps_b32']} (batch 32) "
            f"`torch.inference_mode` forwards, models timed round-robin; structured = "
            f"`prune_model(pattern=\"structured\", uncertainty=\"{args.speed_set}\")`, per-layer budget.",
            "",
            "| model | block params removed | heads / MLP | params (M) | GFLOPs (ratio) | latency b1 (ms) "
            "| latency b32 (ms) | throughput (img/s) | speed-up b1 | speed-up b32 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        dense_flops = deit_small_gflops(6, 1536)
        for r in speed_rows:
            flops = deit_small_gflops(r["heads"], r["mlp_hidden"])
            lines.append(
                f"| {r['method'] if r['pattern'] == 'dense' else 'structured @ ' + format(r['sparsity'], 'g')} "
                f"| {r['block_params_removed']:.1%} | {r['heads']} / {r['mlp_hidden']} | {r['params_m']:.2f} "
                f"| {flops:.2f} ({dense_flops / flops:.2f}x) | {r['latency_b1_ms']:.1f} | {r['latency_b32_ms']:.0f} | {r['throughput_img_s']:.1f} "
                f"| {r['speedup_b1']:.2f}x | {r['speedup_b32']:.2f}x |"
            )
        run = runs.get("speed", {})
        busy = max(float(run.get("load_start", "0").split(" / ")[0]), float(run.get("load_end", "0").split(" / ")[0]))
        cores, own = os.cpu_count() or 1, int(run.get("threads", 1))
        lines += [
            "",
            # the load average counts this benchmark's own threads
            (f"The load average reached {busy:.1f} on {cores} cores with {own} benchmark threads (see above): other "
             "jobs shared the CPU, so absolute latencies are above an idle machine's and the ratios are noisy. "
             if busy > own + 0.5 else f"No other job was running (load average at most {busy:.1f}, the benchmark's "
             f"own {own} threads). ")
            + "The FLOP ratio is the speed-up the shapes allow; batch 32 can beat it because smaller attention "
            "maps and MLP activations stay in cache.",
            "",
        ]
    acc_rows = [r for r in rows if r["part"] == "accuracy"]
    if acc_rows:
        dense_acc = acc_rows[0]["test_acc"]
        lines += [
            f"## Accuracy, embedded task (Fashion-MNIST, the cached tiny DeiT of recipes/deit_cap.py, {acc_rows[0]['model']})",
            "",
            f"Structured pruning at {args.sparsity:.0%} of block parameters (budget by parameters: `layer` = every "
            f"block loses that share of its parameters, heads rounded and MLP channels making up the rest, `global` = one ranking over all units), "
            f"{args.calibration_size} calibration images; recovery fine-tune through `RobOPCallback(pattern=\"structured\")`: "
            f"{args.finetune_batches} batches of 128, lr {args.finetune_lr:g}. Test accuracy on the 10k test images.",
            "",
            "| model | set | budget | block params removed | heads per block | MLP per block | params (M) | test acc | vs dense |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in acc_rows:
            lines.append(
                f"| {r['method']} | {r['uncertainty'] or '-'} | {r.get('budget', '-')} | {r['block_params_removed']:.1%} "
                f"| {r.get('heads', '-')} | {r.get('mlp_hidden', '-')} | {r['params_m']:.3f} | {r['test_acc']:.2%} "
                f"| {(r['test_acc'] - dense_acc) * 100:+.2f} pt |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "accuracy", "both"), default="both")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    p.add_argument("--speed-set", default="baseline", help="uncertainty set of the speed models (speed does not depend on it)")
    p.add_argument("--reps1", type=int, default=20)
    p.add_argument("--reps32", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--budget", choices=("layer", "global"), nargs="+", default=["layer", "global"])
    p.add_argument("--sets", nargs="+", default=["baseline", "trace"])
    p.add_argument("--finetune-sets", nargs="+", default=["trace"])
    p.add_argument("--finetune-batches", type=int, default=300)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--calibration-size", type=int, default=256)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, loads = time.perf_counter(), [load()]
    print(f"load average at start: {loads[0]}", flush=True)
    rows = []
    if args.part in ("speed", "both"):
        rows += speed(args)
    if args.part in ("accuracy", "both"):
        rows += accuracy(args)
    loads.append(load())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = dict(command=" ".join([".venv/bin/python benchmarks/structured_speed.py", *sys.argv[1:]]), threads=args.threads,
               load_start=loads[0], load_end=loads[-1], seconds=time.perf_counter() - start,
               machine=f"{platform.machine()}, {os.cpu_count()} cores (shared)", torch=torch.__version__)  # fmt: skip
    parts = ("speed", "accuracy") if args.part == "both" else (args.part,)
    runs = {p: run for p in parts}
    previous = out / "structured.json"
    if previous.exists() and args.part != "both":  # keep the other part's rows from an earlier run
        old = json.loads(previous.read_text())
        rows = [r for r in old.get("rows", []) if r["part"] not in parts] + rows
        runs = {**{k: v for k, v in old.get("runs", {}).items() if k not in parts}, **runs}
    (out / "structured.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, args, runs)
    (out / "structured.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
