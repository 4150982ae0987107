"""Prune-then-finetune in one Trainer: RobOPCallback added to an ordinary training script.

    python recipes/prune_then_finetune.py            # ~5 minutes on 2 CPU cores
    python recipes/prune_then_finetune.py --fast     # well under a minute (CI)

The script is what a Lightning user already has (a LightningModule, a DataModule, a Trainer);
the only addition is the callback. One ``fit`` trains densely for ``prune_at + 1`` epochs, prunes
at the end of epoch ``prune_at`` with RobOP-CAP, and spends the remaining epochs on recovery
fine-tuning with the pruned weights held at exactly zero. ``test`` then evaluates the sparse
model. Validation accuracy per epoch shows the dip at pruning and the recovery.
Needs Fashion-MNIST: ``python -m robop_lightning.assets fetch fashion-mnist``.
"""

from __future__ import annotations

import csv
import pathlib
import sys

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from robop_lightning import RobOPCallback
from robop_lightning.data import FashionMNISTDataModule
from robop_lightning.models import DeiTClassifier

if str(pathlib.Path(__file__).resolve().parent) not in sys.path:  # the sibling helpers, however this file is loaded
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# ----------------------------------------------------------------------------- defaults
config = dict(
    epochs=4,  # dense epochs (prune_at + 1) plus recovery epochs
    prune_at=1,  # prune at the end of this epoch
    sparsity=0.6,
    solver="cap",
    uncertainty="trace",
    batch_size=128,
    limit_train_batches=1.0,  # fraction (float) or number (int) of batches per epoch
    limit_eval_batches=1.0,
    seed=0,
    out="outputs/prune_then_finetune",
)


def main(argv=None) -> dict:
    limits = {key: common.count_or_fraction for key in config if key.startswith("limit")}  # 30 batches or 0.25 of them
    parser = common.config_parser(__doc__, config, types=limits, fast_help="a few batches per epoch, for CI")
    args = parser.parse_args(argv)
    if args.fast:
        args.epochs, args.prune_at, args.limit_train_batches, args.limit_eval_batches = 2, 0, 30, 4
    seed_everything(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    # --- the user's existing script: a model and its data -----------------------------------
    model = DeiTClassifier(
        "deit_tiny_patch16_224",
        num_classes=10,
        img_size=28,
        in_chans=1,
        model_kwargs=dict(patch_size=7, embed_dim=96, depth=4, num_heads=3),  # a 0.46 M-parameter DeiT
        lr=1e-3,
        warmup_epochs=0.2,
    )
    data = FashionMNISTDataModule(batch_size=args.batch_size, calibration_size=256, seed=args.seed)

    # --- the one addition: prune at the end of epoch `prune_at`, then fine-tune ---------------
    robop = RobOPCallback(
        sparsity=args.sparsity,
        solver=args.solver,
        uncertainty=args.uncertainty,
        prune_at=args.prune_at,
        calibration_dataloader="calibration",  # the datamodule's fixed calibration subset
        calibration_batches=2,
        verbose=False,
    )
    out = pathlib.Path(args.out)
    trainer = Trainer(
        max_epochs=args.epochs,
        callbacks=[robop],
        logger=CSVLogger(out, name="", version=""),
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_eval_batches,
        limit_test_batches=args.limit_eval_batches,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    test = trainer.test(model, data, verbose=False)[0]

    per_epoch = {}
    with open(out / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/clean_acc"):
                per_epoch[int(row["epoch"])] = float(row["val/clean_acc"])
    pruned = {name: float((model.get_submodule(name).weight == 0).float().mean()) for name in robop.masks}
    summary = {
        "val_acc_per_epoch": per_epoch,
        "pruned_after_epoch": args.prune_at,
        "test_acc": test["test/clean_acc"],
        "sparsity": sum(pruned.values()) / len(pruned),
        "layers": len(pruned),
    }
    print("epoch  val acc")
    for epoch, acc in per_epoch.items():
        mark = "  <- pruned at the end of this epoch" if epoch == args.prune_at else ""
        print(f"{epoch:>5}  {acc:.4f}{mark}")
    print(f"test accuracy {summary['test_acc']:.4f} with {summary['sparsity']:.1%} of the weights of "
          f"{summary['layers']} layers at exactly zero")
    return summary


if __name__ == "__main__":
    main()
