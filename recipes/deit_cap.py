"""RobOP-CAP on a DeiT: train once, prune one-shot, fine-tune, and measure clean / corrupted / adversarial accuracy.

    python recipes/deit_cap.py                    # Fashion-MNIST, tiny DeiT, about 16 min on 2 CPU cores
    python recipes/deit_cap.py --fast             # the same path in a minute or two (CI)
    python recipes/deit_cap.py --sparsity 0.5 0.6 0.7 --eval-size 1000 --pgd-steps 50 --pgd-restarts 2
    python recipes/deit_cap.py --model deit_small_patch16_224 --pretrained --data /path/to/imagenet --devices 4

Steps (each cached or timed, every number written to ``--out``):

1. The dense model: a small timm DeiT (``VisionTransformerDistilled``: 28 px, 7 px patches, dim 96,
   depth 4, 3 heads, 456k parameters) trained on Fashion-MNIST once; the checkpoint is cached under
   ``~/.cache/robop_lightning/recipes/`` (``$ROBOP_CACHE``), keyed by everything that shapes it.
   With ``--pretrained`` (ImageNet) timm's weights are used and nothing is trained.
2. One-shot ``prune_model`` at every sparsity: RobOP-CAP as its authors pair it, CAP's empirical
   block Fisher of the loss (``solver="cap"``, ``curvature="fisher"``: per-sample gradients of the
   calibration images with their labels, OBS per block, one threshold over all layers) under the
   authors' Baseline, Trace, E and CTE sets (gamma 0.01; ``--robop-sets trace=0.003`` for others);
   beside it RobOP-CAP on each layer's input Gram (``curvature="gram"``, label-free, per-layer
   sparsity; ``--gram-sets``, where ``auto`` lets each layer choose its set and gamma by 4-fold
   cross-validation), and SparseGPT, Wanda and magnitude pruning; all on the SAME fixed calibration
   subset (``--calibration-size`` training images).
3. Recovery fine-tuning with ``RobOPCallback`` (masks held) of the best RobOP model and the best
   other method at the highest sparsity, "best" by validation accuracy (never the test set).
4. Every model is scored on identical inputs (corruption and attack noise seeded by dataset index):
   clean accuracy on the whole test set; ImageNet-C-style corruptions x 5 severities (CIFAR-10-C
   parameters for small images) on a fixed random test subset (``--eval-size``); PGD L-inf and FGSM
   on a random ``--adv-size`` of those images; against the dense model, the mCE (errors under
   corruption: lower = fewer errors) and the relative mCE (the drop from each model's own clean
   accuracy: a poor model has little left to lose, so it can look robust there).
   Every RobOP model is compared with RobOP-CAP under the Baseline set at the same sparsity, image by
   image: the difference in clean, corrupted and PGD (largest eps) accuracy with a 95 % paired
   bootstrap interval over the images.
5. ``--out`` gets ``results.json``, ``results.csv``, ``table.txt``, ``comparisons.md`` (those paired
   differences), three PNG plots and checkpoints that load with the stock
   ``DeiTClassifier.load_from_checkpoint``. Files are written to a temporary name and renamed, never
   overwritten in place.

Every phase prints a flushed line when it starts and one when it ends, with its time
(``[deit_cap] pruning robop-cap/trace 80 % (6/24) done in 4.1 s``), so a run sent to a log file
(``python recipes/deit_cap.py > log.txt 2>&1``) shows where it is.

PGD here runs ``--pgd-steps 10`` with one restart by default so that every model fits a CPU budget;
pass ``--pgd-steps 50 --pgd-restarts 2`` for numbers to publish (docs/evaluation.md, "Vision").
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from robop_lightning import RobOPCallback, prune_model
from robop_lightning.data import FashionMNISTDataModule, ImageFolderDataModule
from robop_lightning.data.vision import cache_dir
from robop_lightning.utils.memory import PeakRSS
from robop_lightning.models import DeiTClassifier
from robop_lightning.robustness import CORRUPTIONS, evaluate_robustness
from robop_lightning.robustness.metrics import format_eps
from robop_lightning.engine.sets import parse_set_spec

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling helpers, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import _deit_reports as reports  # noqa: E402

# ----------------------------------------------------------------------------- defaults
config = dict(
    # model: a tiny DeiT trained here (85.4 % test accuracy after 3 epochs, ~80 s on 2 cores); any timm DeiT / ViT works
    model="deit_tiny_distilled_patch16_224",
    model_kwargs=None,  # JSON; None: the tiny Fashion-MNIST DeiT below, or {} for --data (timm's own sizes)
    pretrained=False,  # timm's ImageNet weights (needs hub access); then --epochs defaults to 0
    data=None,  # None: Fashion-MNIST (offline); else an ImageNet-style folder with train/ and val/
    img_size=None,  # None: 28 for Fashion-MNIST, 224 for --data
    # training (once; cached)
    epochs=None,  # None: 3 (Fashion-MNIST), 0 with --pretrained
    train_batches=None,  # limit batches per epoch (None: all)
    batch_size=128,
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=0.3,
    label_smoothing=0.1,
    devices=1,  # >1: training and fine-tuning use DDP (spawned); pruning and evaluation run on one device
    # pruning: up to 70 % every OBS method keeps the dense accuracy; the methods separate at 80-90 %
    sparsity=[0.7, 0.8, 0.9],
    # the authors' sets (gamma 0.01 each); NAME=GAMMA sets a radius (trace=0.003), and the extension's
    # minmax-trace / minmax-e / cvar can be added
    robop_sets=["baseline", "trace", "e", "cte"],  # RobOP-CAP (CAP's Fisher) under each set
    gram_sets=["baseline"],  # RobOP-CAP on the layer Gram (label-free) under these sets; auto / trace=auto work here
    fisher_gradients=256,  # m: per-sample gradients (CAP's ViT recipes use 4096; at most --calibration-size)
    fisher_selection="global",  # one threshold over all layers (CAP's), or "uniform"
    auto_scorer="default",  # how auto / NAME=auto score candidates: "default" (CAP itself on 32 rows), "solver" (CAP, all rows) or "admm"
    baselines=["sparsegpt", "wanda", "magnitude"],  # the same engine, Baseline set, same calibration data
    calibration_size=256,  # images; 256 x 18 tokens = 4.6k rows per Gram, enough for 96..384 inputs
    # recovery fine-tuning with RobOPCallback (masks held) at the highest sparsity
    finetune_epochs=1,
    finetune_batches=100,  # 100 x 128 = 12.8k images: ~25 s on 2 cores
    finetune_lr=2e-4,
    finetune=["best-robop", "best-baseline"],  # or method names such as robop-cap/trace, sparsegpt; [] for none
    # robustness evaluation (paired: every model sees identical corrupted / attacked inputs)
    eval_size=1000,  # random test images for corruptions (11 x 5 = 55 variants each; ~8 s per model)
    adv_size=200,  # a random 200 of those for PGD / FGSM (the expensive part: ~11 passes per eps; ~10 s per model)
    corruptions=list(CORRUPTIONS),
    severities=[1, 2, 3, 4, 5],
    eps=[1.0, 2.0, 4.0, 8.0],  # in units of 1/255
    pgd_steps=10,
    pgd_restarts=1,
    eval_batch_size=250,
    bootstrap=2000,  # resamples of the paired 95 % intervals against robop-cap/baseline
    # bookkeeping
    seed=0,
    out="outputs/deit_cap",
    cache=None,  # None: $ROBOP_CACHE/recipes (default ~/.cache/robop_lightning/recipes)
    save_checkpoints="best",  # best: best RobOP per sparsity + fine-tuned; all; none
    threads=2,  # torch threads (this machine has 2 cores shared with others)
)

# --fast: the same code path, tiny everywhere (a 2-block DeiT, a few hundred training steps)
FAST = dict(
    model_kwargs=dict(patch_size=7, embed_dim=48, depth=2, num_heads=2),
    epochs=1,
    train_batches=300,
    lr=2e-3,
    sparsity=[0.5],
    calibration_size=64,
    finetune_batches=5,
    eval_size=64,
    adv_size=32,
    corruptions=["gaussian_noise", "contrast", "jpeg_compression"],
    severities=[1, 3, 5],
    eps=[2.0, 8.0],
    pgd_steps=3,
)
TINY_DEIT = dict(patch_size=7, embed_dim=96, depth=4, num_heads=3)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.config_parser(
        __doc__, config,
        types={"model_kwargs": json.loads, "img_size": int, "epochs": int, "train_batches": int},
        helps={"model_kwargs": "JSON, e.g. '{\"depth\": 6}'"},
        fast_help="tiny everything: a minute or two, for CI",
    )  # fmt: skip
    args = parser.parse_args(argv)
    common.check_set_specs(parser, "--robop-sets", args.robop_sets, allow_auto=False)
    common.check_set_specs(parser, "--gram-sets", args.gram_sets, allow_auto=True)
    common.apply_fast(args, FAST, argv)
    imagenet = args.data is not None
    if args.model_kwargs is None:
        args.model_kwargs = {} if imagenet else dict(TINY_DEIT)
    args.img_size = args.img_size or (224 if imagenet else 28)
    if args.epochs is None:
        args.epochs = 0 if args.pretrained else 3
    if args.epochs == 0 and not args.pretrained:
        parser.error("--epochs 0 needs --pretrained (there is nothing to prune in a random network).")
    if not args.sparsity or any(not 0 < s < 1 for s in args.sparsity):
        parser.error(f"--sparsity needs values in (0, 1), got {args.sparsity}.")
    if args.adv_size > args.eval_size:
        parser.error("--adv-size must not exceed --eval-size (the attacked images are a prefix of the evaluated ones).")
    common.check_save_checkpoints(parser, args.save_checkpoints)
    return args


# ----------------------------------------------------------------------------- the recipe
def main(argv=None) -> dict:
    args = parse_args(argv)
    out, progress = common.start_run(args, "deit_cap")
    datamodule, data_id, in_chans = setup_data(args, progress)
    dense, dense_ckpt = dense_model(args, datamodule, data_id, in_chans, progress)
    calibration = list(datamodule.calibration_dataloader())  # fixed subset of the training split
    models = prune_all(args, dense, calibration, progress)
    validate_all(args, models, datamodule, progress)  # picks the "best" models; the test set only reports
    finetune_best(args, models, dense, datamodule, len(calibration), progress)
    inputs = evaluation_inputs(args, datamodule)
    raw, correct = evaluate_all(args, models, inputs, progress)
    with progress.phase("paired comparisons with robop-cap/baseline (bootstrap)", timing="comparisons_s"):
        reference, vs_baseline = reports.compare_to_baseline(models, correct, args)
    rows = [reports.make_row(name, entry, raw, vs_baseline.get(name), args, inputs["eps"]) for name, entry in models.items()]
    kept = save_checkpoints(args, models, rows, datamodule, out, progress)
    progress.timings["total_s"] = progress.elapsed()
    protocol = reports.make_protocol(args, models, reference, inputs, data_id, dense_ckpt, len(calibration))
    return reports.write_reports(args, out, rows, protocol, reference, inputs["eps"], kept, progress)


# ----------------------------------------------------------------------------- phases
def setup_data(args, progress: common.Progress):
    """The datamodule (Fashion-MNIST, or an ImageNet-style folder), set up; with its id and input channels."""
    name = "Fashion-MNIST" if args.data is None else args.data
    with progress.phase(f"data: {name}, {args.img_size} px, {args.calibration_size} calibration images") as phase:
        if args.data is None:
            datamodule = FashionMNISTDataModule(
                img_size=args.img_size, batch_size=args.batch_size, calibration_size=args.calibration_size,
                seed=args.seed,
            )  # fmt: skip
            in_chans, data_id = 1, "fashion-mnist"
        else:
            if not Path(args.data).expanduser().is_dir():
                raise SystemExit(f"--data {args.data}: no such folder. Pass an ImageNet-style folder with train/ and val/.")
            datamodule = ImageFolderDataModule(
                args.data, img_size=args.img_size, batch_size=args.batch_size,
                calibration_size=args.calibration_size, seed=args.seed, model_name=args.model,
            )  # fmt: skip
            in_chans, data_id = 3, str(Path(args.data).expanduser().resolve())
        try:
            datamodule.setup()
        except FileNotFoundError as error:  # the message says how to get the data
            raise SystemExit(f"deit_cap: {error}") from None
        phase.note = f"{datamodule.num_classes} classes"
    return datamodule, data_id, in_chans


def dense_model(args, datamodule, data_id: str, in_chans: int, progress: common.Progress):
    """The dense model: timm's pretrained weights, or trained once and cached (keyed by everything that shapes it)."""
    hparams = dict(
        model_name=args.model, num_classes=datamodule.num_classes, img_size=args.img_size, in_chans=in_chans,
        pretrained=args.pretrained, model_kwargs=args.model_kwargs, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
    )  # fmt: skip
    training = dict(hparams, data=data_id, epochs=args.epochs, train_batches=args.train_batches,
                    batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    key = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(args.cache).expanduser() if args.cache else cache_dir() / "recipes"
    dense_ckpt = cache / f"deit_cap-{args.model}-{key}.ckpt"
    if args.epochs == 0:
        what = f"dense model: timm {args.model} pretrained weights, not trained here"
    elif dense_ckpt.is_file():
        what = f"dense model: loading the cached {dense_ckpt}"
    else:
        what = f"dense model: training {args.model} {args.model_kwargs} for {args.epochs} epoch(s)"
    with progress.phase(what, timing="dense_model_s") as phase:
        if args.epochs == 0:
            dense = DeiTClassifier(**hparams)
        elif dense_ckpt.is_file():
            dense = DeiTClassifier.load_from_checkpoint(dense_ckpt, map_location="cpu", pretrained=False)
        else:
            dense = DeiTClassifier(**hparams)
            trainer = quiet_trainer(args, max_epochs=args.epochs, limit_train_batches=args.train_batches)
            trainer.fit(dense, datamodule=datamodule)
            cache.mkdir(parents=True, exist_ok=True)
            save_checkpoint(args, dense, datamodule, dense_ckpt)
            progress.say(f"dense model: cached as {dense_ckpt}")
        dense = dense.cpu().eval()
        params = sum(p.numel() for p in dense.parameters())
        phase.note = f"{type(dense.model).__name__}, {params / 1e6:.3f} M parameters"
    return dense, dense_ckpt


def prune_all(args, dense, calibration: list, progress: common.Progress) -> dict[str, dict]:
    """One-shot ``prune_model`` of a copy of ``dense`` per (sparsity, method), all on the same calibration batches."""
    jobs = [(s, "cap", u) for s in args.sparsity for u in args.robop_sets]
    jobs += [(s, "cap-gram", u) for s in args.sparsity for u in args.gram_sets]
    jobs += [(s, b, "baseline") for s in args.sparsity for b in args.baselines]
    models: dict[str, dict] = {"dense": dict(method="dense", solver=None, uncertainty=None, sparsity=0.0,
                                             model=dense, prune_seconds=0.0, finetuned=False)}  # fmt: skip
    with progress.phase(f"pruning: {len(jobs)} models on {len(calibration)} calibration batches", timing="pruning_s"):
        for i, (sparsity, solver, uncertainty) in enumerate(jobs, 1):
            name = f"{reports.model_label(solver, uncertainty)}@{sparsity:g}"
            with progress.phase(f"pruning {reports.model_label(solver, uncertainty)} {100 * sparsity:g} % ({i}/{len(jobs)})") as step:
                models[name] = prune_one(args, dense, calibration, sparsity, solver, uncertainty)
                step.note = f"sparsity {models[name]['sparsity']:.3f}"
    return models


def prune_one(args, dense, calibration: list, sparsity: float, solver: str, uncertainty: str) -> dict:
    model = copy.deepcopy(dense)
    set_name, radius = parse_set_spec(uncertainty, allow_auto=True)
    fisher = fisher_options(args, solver)
    if fisher.get("curvature") == "fisher":
        fisher["loss_fn"] = per_sample_loss
    with PeakRSS() as peak:
        report = prune_model(model, calibration, sparsity=sparsity, solver="cap" if fisher else solver,
                             uncertainty=set_name, radius=radius, progress=False,
                             **auto_options(args, set_name, radius), **fisher)  # fmt: skip
    return dict(method=reports.model_label(solver, uncertainty), solver=solver, uncertainty=uncertainty,
                sparsity=report.totals["sparsity"], target_sparsity=sparsity, model=model.eval(),
                prune_seconds=report.seconds, prune_peak_mb=peak.extra_mb, masks=report.masks, finetuned=False,
                nominal_error=report.totals["nominal_error"], robust_error=report.totals["robust_error"])  # fmt: skip


def validate_all(args, models: dict[str, dict], datamodule, progress: common.Progress) -> None:
    """``val_acc`` of every model (the held-out training images: what "best" is chosen by)."""
    with progress.phase(f"validation accuracy of {len(models)} models"):
        for i, (name, entry) in enumerate(models.items(), 1):
            with progress.phase(f"validating {name} ({i}/{len(models)})") as step:
                entry["val_acc"] = val_accuracy(args, entry["model"], datamodule)
                step.note = f"val {100 * entry['val_acc']:.1f} %"


def finetune_targets(args, models: dict[str, dict], progress: common.Progress) -> list[str]:
    """The models ``--finetune`` names at the highest sparsity (``best-robop``, ``best-baseline`` by val accuracy)."""
    top = max(args.sparsity)
    pruned_top = {k: v for k, v in models.items() if v.get("target_sparsity") == top}

    def best(robop: bool) -> str | None:
        names = [k for k, v in pruned_top.items() if (v["solver"] in reports.ROBOP_SOLVERS) == robop]
        return max(names, key=lambda k: pruned_top[k]["val_acc"]) if names else None

    targets = []
    for choice in args.finetune if args.finetune_epochs > 0 else []:
        name = best(True) if choice == "best-robop" else best(False) if choice == "best-baseline" else f"{choice}@{top:g}"
        if name is None and choice in ("best-robop", "best-baseline"):
            progress.say(f"--finetune {choice}: no such model was pruned at sparsity {top:g}; skipped")
            continue
        if name is None or name not in models:
            raise SystemExit(f"--finetune {choice}: no such pruned model at sparsity {top:g} ({', '.join(pruned_top)}).")
        if name not in targets:
            targets.append(name)
    return targets


def finetune_best(args, models: dict[str, dict], dense, datamodule, calibration_batches: int,
                  progress: common.Progress) -> None:  # fmt: skip
    """Recovery fine-tuning with ``RobOPCallback``: it prunes at fit start (the same masks), then holds them."""
    targets = finetune_targets(args, models, progress)
    with progress.phase(f"fine-tuning {len(targets)} model(s): {', '.join(targets) or 'none'}", timing="finetune_s"):
        for name in targets:
            what = (f"fine-tuning {name}: {args.finetune_epochs} epoch(s) x {args.finetune_batches} batches, "
                    f"lr {args.finetune_lr:g}")  # fmt: skip
            with progress.phase(what) as step:
                models[f"{name}+ft"] = finetune_one(args, models[name], dense, datamodule, calibration_batches)
                step.note = f"val {100 * models[f'{name}+ft']['val_acc']:.1f} %"


def finetune_one(args, source: dict, dense, datamodule, calibration_batches: int) -> dict:
    model = copy.deepcopy(dense).train()  # dense was put in eval(); Lightning keeps module modes
    model.hparams.lr, model.hparams.warmup_epochs = args.finetune_lr, 0.0  # configure_optimizers reads these
    set_name, radius = parse_set_spec(source["uncertainty"], allow_auto=True)
    fisher = fisher_options(args, source["solver"])
    robop = RobOPCallback(sparsity=source["target_sparsity"], solver="cap" if fisher else source["solver"],
                          uncertainty=set_name, radius=radius, **auto_options(args, set_name, radius), **fisher,
                          calibration_dataloader="calibration", calibration_batches=calibration_batches, progress=False,
                          verbose=False)  # fmt: skip
    trainer = quiet_trainer(args, max_epochs=args.finetune_epochs, limit_train_batches=args.finetune_batches,
                            limit_val_batches=0, callbacks=[robop])  # fmt: skip
    t1 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    same = robop.masks is not None and all(torch.equal(robop.masks[k], m) for k, m in source["masks"].items())
    zeros = all(bool((model.get_submodule(k).weight[~m] == 0).all()) for k, m in source["masks"].items()) if same else None
    entry = dict(source, method=source["method"] + "+ft", model=model.cpu().eval(), finetuned=True,
                 finetune_seconds=time.perf_counter() - t1, masks_match_one_shot=same, masks_held=zeros)  # fmt: skip
    entry["val_acc"] = val_accuracy(args, model, datamodule)
    return entry


def evaluation_inputs(args, datamodule) -> dict:
    """The test images every model is scored on: all of them (clean), a random subset (corruptions), a prefix of it (attacks)."""
    test = datamodule.dataset("test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
    eval_positions = order[: args.eval_size].sort().values.tolist()
    adv_positions = order[: args.adv_size].sort().values.tolist()  # a subset of the evaluated images
    loaders = {
        "full": DataLoader(test, batch_size=max(args.eval_batch_size, 500)),
        "eval": DataLoader(Subset(test, eval_positions), batch_size=args.eval_batch_size),
        "adv": DataLoader(Subset(test, adv_positions), batch_size=args.eval_batch_size),
    }
    return dict(test=test, eval_positions=eval_positions, adv_positions=adv_positions, loaders=loaders,
                eps=[e / 255 for e in args.eps], device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # fmt: skip


def evaluate_all(args, models: dict[str, dict], inputs: dict, progress: common.Progress):
    """Clean / corrupted / adversarial accuracy of every model on identical inputs.

    Returns ``raw`` (each model's aggregate metrics) and ``correct`` (per-image correctness in loader
    order, the same images for every model: what the paired comparisons resample).
    """
    raw: dict[str, dict] = {}
    correct: dict[str, dict] = {}
    what = (f"evaluation of {len(models)} models: clean on {len(inputs['test'])} test images, "
            f"{len(args.corruptions)} corruptions x {len(args.severities)} severities on {len(inputs['eval_positions'])}, "
            f"PGD / FGSM on {len(inputs['adv_positions'])}")  # fmt: skip
    with progress.phase(what, timing="evaluation_s"):
        for i, name in enumerate(models, 1):
            with progress.phase(f"evaluating {name} ({i}/{len(models)})") as step:
                raw[name], correct[name] = evaluate_one(args, models[name], inputs)
                step.note = (f"clean {100 * raw[name]['clean']['test/clean_acc']:.1f} %, "
                             f"corrupt {100 * raw[name]['corrupted'].get('test/corrupt_acc', math.nan):.1f} %")  # fmt: skip
    return raw, correct


def evaluate_one(args, entry: dict, inputs: dict) -> tuple[dict, dict]:
    loaders, eps = inputs["loaders"], inputs["eps"]
    pgd_top = f"test/adv_acc@linf_{format_eps(max(eps))}" if eps else None  # compared at the largest eps
    model = entry["model"].to(inputs["device"])
    t1 = time.perf_counter()
    clean, clean_each = evaluate_robustness(model, loaders["full"], corruptions=(), eps=(), per_sample=True)
    corrupted, corrupted_each = evaluate_robustness(model, loaders["eval"], corruptions=args.corruptions,
                                                    severities=args.severities, eps=(), seed=args.seed,
                                                    per_sample=True)  # fmt: skip
    attacked, attacked_each = {}, {}
    if eps and args.adv_size:
        attacked, attacked_each = evaluate_robustness(model, loaders["adv"], corruptions=(), eps=eps,
                                                      steps=args.pgd_steps, restarts=args.pgd_restarts,
                                                      seed=args.seed, per_sample=True)  # fmt: skip
    entry["eval_seconds"] = time.perf_counter() - t1
    entry["model"] = model.cpu()
    correct = dict(clean=clean_each["test/clean_acc"], corrupt=corrupted_each.get("test/corrupt_acc"),
                   pgd=attacked_each.get(pgd_top),
                   **{f"corrupt/{c}": corrupted_each.get(f"test/corrupt_acc/{c}") for c in args.corruptions})  # fmt: skip
    return dict(clean=clean, corrupted=corrupted, attacked=attacked), correct


def save_checkpoints(args, models: dict[str, dict], rows: list[dict], datamodule, out: Path,
                     progress: common.Progress) -> set[str]:  # fmt: skip
    """The best RobOP model per sparsity and every fine-tuned model (or all / none) under ``out/checkpoints``."""
    keep = set()
    if args.save_checkpoints == "all":
        keep = {n for n in models if n != "dense"}
    elif args.save_checkpoints == "best":
        for s in args.sparsity:
            robop = [n for n, v in models.items()
                     if v.get("target_sparsity") == s and v["solver"] in reports.ROBOP_SOLVERS and not v["finetuned"]]
            if robop:
                keep.add(max(robop, key=lambda n: models[n]["val_acc"]))
        keep |= {n for n, v in models.items() if v["finetuned"]}
    if not keep:
        return keep
    with progress.phase(f"saving {len(keep)} checkpoint(s) under {out / 'checkpoints'}"):
        for row in rows:
            if row["name"] in keep:
                path = out / "checkpoints" / (row["name"].replace("/", "-").replace("@", "_s") + ".ckpt")
                save_checkpoint(args, models[row["name"]]["model"], datamodule, path)
                row["checkpoint"] = str(path)
    return keep


# ----------------------------------------------------------------------------- small helpers
def quiet_trainer(args, **kwargs):
    """A Trainer without loggers or automatic checkpoints; ``--devices`` > 1 fits with DDP (spawned)."""
    multi = args.devices > 1
    # spawn: only fit runs on N processes, not this script
    options = dict(devices=args.devices if multi else 1, strategy="ddp_spawn" if multi else "auto")
    return common.quiet_trainer(**(options | kwargs))


def save_checkpoint(args, model: DeiTClassifier, datamodule, path: Path) -> float:
    """Validate ``model`` (its val accuracy is returned) and save it atomically, weights + hyperparameters."""
    trainer = quiet_trainer(args, devices=1, strategy="auto", enable_progress_bar=False)
    acc = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/clean_acc"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    trainer.save_checkpoint(tmp, weights_only=True)
    os.replace(tmp, path)
    return float(acc)


def val_accuracy(args, model: DeiTClassifier, datamodule) -> float:
    trainer = quiet_trainer(args, devices=1, strategy="auto", enable_progress_bar=False)
    return float(trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/clean_acc"])


def auto_options(args, set_name: str, radius) -> dict:
    """``{"auto": {...}}`` for a set chosen per layer (``auto`` or ``NAME=auto``), else ``{}``."""
    if "auto" not in (set_name, radius):
        return {}
    if args.auto_scorer == "default":
        return {"auto": {}}
    if args.auto_scorer == "solver":
        return {"auto": {"scorer": "solver", "rows": None}}
    return {"auto": {"scorer": args.auto_scorer}}


def fisher_options(args, solver: str) -> dict:
    """``prune_model`` / ``RobOPCallback`` arguments of the curvature: CAP's Fisher for ``cap`` (RobOP-CAP as
    published), the label-free Gram path for ``cap-gram``, nothing for the baselines."""
    if solver == "cap-gram":
        return {"curvature": "gram"}
    if solver != "cap":
        return {}
    # the module's training loss (per_sample_loss), in prune_model and in the fine-tuning callback alike
    return {"curvature": "fisher", "fisher": {"gradients": args.fisher_gradients, "selection": args.fisher_selection,
                                              "loss": "training"}}


def per_sample_loss(model, batch):
    return model.per_sample_loss(batch)


if __name__ == "__main__":
    main()
