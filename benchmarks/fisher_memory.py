"""Peak memory and time of RobOP-CAP with CAP's empirical Fisher (``curvature="fisher"``) on a DeiT.

    .venv/bin/python benchmarks/fisher_memory.py --threads 2                 # DeiT-Small (22 M parameters)
    .venv/bin/python benchmarks/fisher_memory.py --fast --out /tmp/fm        # a 2-block ViT, seconds

CAP keeps ``B`` numbers per weight: one ``B x B`` Fisher block per ``B`` weights. Held for every
layer at once that is ``8 B`` bytes per pruned weight in float64 (DeiT-Small, ``B = 192``: 32 GB).
``prune_model(curvature="fisher")`` builds and eliminates one layer at a time, keeps only the removal
orders and losses (16 bytes per weight), and rebuilds each layer's blocks from the same gradients for
the replay, so its peak is about one layer's blocks (``H_b`` and ``F_b^-1``) plus the gradients in
flight. The model is timm's DeiT-Small architecture with random weights at 64 px
(17 tokens: the block memory depends on the weights, not the image size), pruned at 50 % with
``m`` gradients of random images and labels. Measured: the peak RSS above the RSS before the call
(:class:`robop_lightning.utils.memory.PeakRSS`), the time, and the two reference sizes.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning import prune_model  # noqa: E402
from robop_lightning.utils.memory import PeakRSS  # noqa: E402


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--gradients", type=int, default=16)
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--out", default="benchmarks/results/fisher_memory")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    kwargs = dict(img_size=args.img_size, num_classes=10)
    if args.fast:
        kwargs.update(embed_dim=48, depth=2, num_heads=2)
        args.block_size = 48
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.gradients, 3, args.img_size, args.img_size, generator=g),
             torch.randint(0, 10, (args.gradients,), generator=g))]
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    weights = {n: model.get_submodule(n).weight.numel() for n in targets}
    largest = max(weights.values())
    all_at_once = 2 * 8 * args.block_size * sum(weights.values()) / 2**20  # H_b and F_b^-1, float64, every layer
    one_layer = 2 * 8 * args.block_size * largest / 2**20
    t = time.perf_counter()
    with PeakRSS() as peak:
        report = prune_model(model, data, sparsity=args.sparsity, solver="cap", uncertainty="baseline",
                             curvature="fisher", loss_fn=_loss,
                             fisher={"gradients": args.gradients, "block_size": args.block_size, "batch_size": 8})
    seconds = time.perf_counter() - t
    row = {"model": args.model if not args.fast else "tiny ViT (--fast)", "parameters": sum(p.numel() for p in model.parameters()),
           "pruned_weights": sum(weights.values()), "layers": len(targets), "block_size": args.block_size,
           "gradients": args.gradients, "sparsity": report.totals["sparsity"], "seconds": seconds,
           "peak_extra_mb": peak.extra_mb, "one_layer_blocks_mb": one_layer, "all_layers_blocks_mb": all_at_once}
    command = R.command_line("benchmarks/fisher_memory.py", argv)
    md = [f"Command: `{command}`", "", f"Machine: {R.machine_line(R.machine())}", "",
          "| model | pruned weights | B | m | sparsity | prune s | peak RSS above start (MiB) | "
          "one layer's blocks (MiB) | all layers' blocks at once (MiB) |", "|---|---|---|---|---|---|---|---|---|",
          f"| {row['model']} | {row['pruned_weights']:,} | {row['block_size']} | {row['gradients']} | "
          f"{row['sparsity']:.3f} | {seconds:.0f} | "
          f"{'-' if peak.extra_mb is None else f'{peak.extra_mb:.0f}'} | {one_layer:.0f} | {all_at_once:.0f} |", "",
          "One layer's blocks: `H_b` and `F_b^-1` of the largest layer in float64 (`2 x 8 B` bytes per weight); "
          "all layers: the same for every pruned weight, what holding CAP's blocks for the whole model would take."]
    payload = {"command": command, "machine": R.machine(), "row": row}
    R.publish(args.out, payload, "\n".join(md) + "\n")
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    main()
