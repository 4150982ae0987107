"""LayerInputs under a real 2-process gloo group: partial Grams summed, losses gathered, same masks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robop_lightning import LayerInputs, prune_layer, prune_model, prune_model_structured
from robop_lightning.engine.gram import GramAccumulator
from tests.engine_helpers import correlated_inputs, random_weight, tiny_llama, token_batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = correlated_inputs(10, 3, 16, 0)
        w = random_weight(8, 16, 0)
        shard = x[:4] if rank == 0 else x[4:]  # uneven shards: 4 and 6 samples
        li = LayerInputs(shard, distributed=True)
        e = w * 0.1
        result = prune_layer(w, li, sparsity=0.5, solver="alps", uncertainty="cvar", radius=0.3)
        auto = prune_layer(w, li, sparsity=0.5, solver="sparsegpt", uncertainty="auto", auto={"folds": 3})
        acc = GramAccumulator(16, torch.device("cpu"), folds=3)  # streamed: batches of 3 and the rest
        acc.add(shard[:3])
        acc.add(shard[3:])
        streamed = acc.finish(distributed=True)
        torch.save(
            {
                "gram": li.gram(),
                "losses": li.sample_losses(e.double()),
                "radius": li.bootstrap_radius(),
                "num_samples": li.num_samples,
                "mask": result.mask,
                "weight": result.weight,
                "trace_n": prune_layer(w, li, sparsity=0.5, solver="sparsegpt", uncertainty="trace").damping,
                "auto_selection": auto.selection,
                "auto_weight": auto.weight,
                "streamed_gram": streamed.gram(),
                "streamed_folds": torch.stack([streamed.fold_gram(k, 3) for k in range(3)]),
                "streamed_samples": streamed.num_samples,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    x = correlated_inputs(10, 3, 16, 0)
    w = random_weight(8, 16, 0)
    full = LayerInputs(x)
    assert r0["num_samples"] == r1["num_samples"] == 10
    for key in ("gram", "losses", "mask", "weight", "auto_weight"):
        assert torch.equal(r0[key], r1[key]), key  # bit-identical across ranks
    assert r0["radius"] == r1["radius"] == pytest.approx(full.bootstrap_radius(), rel=1e-9)
    assert torch.allclose(r0["gram"], full.gram(), rtol=1e-12)
    assert torch.allclose(r0["losses"], full.sample_losses((w * 0.1).double()), rtol=1e-12)
    single = prune_layer(w, x, sparsity=0.5, solver="alps", uncertainty="cvar", radius=0.3)
    assert torch.equal(r0["mask"], single.mask)
    # the authors' N is the global token count; auto's folds are global samples: same choice as one process
    assert r0["trace_n"] == pytest.approx(prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="trace").damping)
    alone = prune_layer(w, x, sparsity=0.5, solver="sparsegpt", uncertainty="auto", auto={"folds": 3})
    assert r0["auto_selection"] == r1["auto_selection"]
    assert r0["auto_selection"]["chosen"] == alone.selection["chosen"]
    # the Grams agree to float64 rounding (summed in another order), the solves to float32 rounding
    for label, errs in alone.selection["fold_errors"].items():
        assert r0["auto_selection"]["fold_errors"][label] == pytest.approx(errs, rel=1e-5)
    # streamed statistics: every rank holds the global Gram and the global folds (rank 1's samples
    # start at index 4, so its residue r is global fold (4 + r) mod 3)
    assert r0["streamed_samples"] == r1["streamed_samples"] == 10
    assert torch.equal(r0["streamed_folds"], r1["streamed_folds"])
    torch.testing.assert_close(r0["streamed_gram"], full.gram(), rtol=1e-12, atol=1e-12)
    for k in range(3):
        torch.testing.assert_close(r0["streamed_folds"][k], full.fold_gram(k, 3), rtol=1e-12, atol=1e-12)


def _structured_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_llama(layers=2, vocab=64)
        batches = token_batches()
        report = prune_model_structured(model, batches[rank : rank + 1], sparsity=0.5, uncertainty="trace")
        torch.save({"state": model.state_dict(), "removed": [r["removed"] for r in report.layers]},
                   os.path.join(out, f"structured{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_structured_pruning_on_two_ranks_equals_one_process(tmp_path):
    """Each rank calibrates on its own batch; the summed Grams give every rank the one-process result."""
    mp.spawn(_structured_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"structured{r}.pt") for r in range(2))
    model = tiny_llama(layers=2, vocab=64)
    report = prune_model_structured(model, token_batches(), sparsity=0.5, uncertainty="trace")
    assert r0["removed"] == r1["removed"] == [r["removed"] for r in report.layers]
    for k, v in model.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _fisher_net_and_data(rank: int | None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    if rank is not None:  # uneven shards: 10 and 14 samples
        x, y = (x[:10], y[:10]) if rank == 0 else (x[10:], y[10:])
    return net, [(x, y)]


def _fisher_loss(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def _fisher_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net, data = _fisher_net_and_data(rank)
        report = prune_model(net, data, sparsity=0.5, solver="cap", uncertainty="trace", loss_fn=_fisher_loss,
                             targets=["0", "2"], fisher={"block_size": 8})
        torch.save({"config": report.config, "state": net.state_dict(), "masks": report.masks},
                   os.path.join(out, f"fisher{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fishers_blocks_are_summed_across_ranks(tmp_path):
    """Under DDP each rank takes the gradients of its own samples and the block Fishers (and m) are
    summed across ranks: every rank prunes as one process on all the samples would."""
    mp.spawn(_fisher_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"fisher{r}.pt", weights_only=False) for r in range(2))
    net, data = _fisher_net_and_data(None)
    report = prune_model(net, data, sparsity=0.5, solver="cap", uncertainty="trace", loss_fn=_fisher_loss,
                         targets=["0", "2"], fisher={"block_size": 8})
    assert r0["config"]["curvature"] == "fisher" and r0["config"]["gradients_used"] == 24
    for name in report.masks:
        assert torch.equal(r0["masks"][name], r1["masks"][name]) and torch.equal(r0["masks"][name], report.masks[name])
    for k, v in net.state_dict().items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
