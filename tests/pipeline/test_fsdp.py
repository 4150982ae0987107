"""Sharded recovery fine-tuning (issue 17): RobOPCallback under ModelParallelStrategy with FSDP2
and under Lightning's FSDPStrategy (FSDP1; its own tests at the end of this file).

The FSDP2 child runs a real 2-process gloo fit on CPU: the callback prunes whole weights in ``setup``,
``configure_model`` shards every decoder layer with ``fully_shard``, the masks attach as DTensors
sharded like their parameters, and AdamW fine-tunes with gradient accumulation (and once more in
bf16-mixed precision). The parent checks
that the zeros hold, that both ranks agree, that the full checkpoint loads strictly into the stock
module, and that the result equals the same fine-tune in one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning import RobOPCallback
from tests.engine_helpers import run_child

STEPS, ACCUMULATE, BATCH = 3, 2, 4


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)


class TinyLM(pl.LightningModule):
    """A tiny Llama; ``configure_model`` applies FSDP2 when the strategy gives a device mesh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(_config())

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])
        self._sharded = True

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2 * BATCH * STEPS * ACCUMULATE, 12), generator=g)


def _callback() -> RobOPCallback:
    return RobOPCallback(sparsity=0.5, solver="sparsegpt", uncertainty="trace", calibration_batches=2, verbose=False,
                         progress=False)


def _trainer(strategy, devices: int, out: str, max_steps: int = STEPS, accelerator: str = "cpu",
             **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, max_steps=max_steps,
                      accumulate_grad_batches=ACCUMULATE, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=out, use_distributed_sampler=False, **kwargs)


def _child(out: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    robop = _callback()
    module = TinyLM()
    trainer = _trainer(strategy, 2, out, callbacks=[robop], enable_checkpointing=False)
    tokens = _tokens()

    class Shard(pl.LightningDataModule):
        def train_dataloader(self):  # rank r: every other batch-sized slice, so ranks see disjoint samples
            r = trainer.global_rank
            shard = torch.cat([tokens[i : i + BATCH] for i in range(r * BATCH, len(tokens), 2 * BATCH)])
            return DataLoader(TensorDataset(shard), batch_size=BATCH, shuffle=False)

    trainer.fit(module, datamodule=Shard())
    from torch.distributed.tensor import DTensor

    weight = module.model.model.layers[0].mlp.down_proj.weight
    sharded = isinstance(weight, DTensor)
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.model.state_dict().items()}
    trainer.save_checkpoint(os.path.join(out, "full.ckpt"))  # save_distributed_checkpoint=False: one file
    robop.masks.attach(module)  # (teardown detached them) the masks as they are held during training
    placements = str(robop.masks._pruned["model.model.layers.0.mlp.down_proj"].placements)
    robop.masks.detach()
    torch.save({"masks": robop.masks.to_dict(), "state": full, "sharded": sharded, "mask_placements": placements},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))
    # resume from the full checkpoint and from a distributed one: the masks come back, nothing is pruned twice
    for kind, path in (("full", os.path.join(out, "full.ckpt")), ("distributed", os.path.join(out, "dist.ckpt"))):
        if kind == "distributed":
            dist_strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                  save_distributed_checkpoint=True)
            saver = _trainer(dist_strategy, 2, out, callbacks=[_callback()], enable_checkpointing=False)
            saver.fit(TinyLM(), datamodule=Shard())
            saver.save_checkpoint(path)  # a directory of shards
        again = _callback()
        resumed = TinyLM()
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=kind == "distributed")
        trainer = _trainer(strategy, 2, out, max_steps=STEPS + 2, callbacks=[again], enable_checkpointing=False)
        calls = []
        prune = again._prune
        again._prune = lambda *args: calls.append(args[-1]) or prune(*args)  # records every pruning
        if kind == "full":  # the path known before the fit (public trainer.ckpt_path): nothing pruned
            trainer.ckpt_path = path
            trainer.fit(resumed, datamodule=Shard())
        else:  # fit(ckpt_path=...): pruned in setup, then the restored state replaces it (with a warning)
            trainer.fit(resumed, datamodule=Shard(), ckpt_path=path)
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                 for k, v in resumed.model.state_dict().items()}
        torch.save({"done": list(again._done), "reports": len(again.reports), "masks": again.masks.to_dict(),
                    "state": state, "steps": trainer.global_step, "pruned": calls},
                   os.path.join(out, f"resumed-{kind}{trainer.global_rank}.pt"))
    # trainer.validate prunes in setup too (before the sharding), then evaluates the sharded model
    class Validated(TinyLM):
        def validation_step(self, batch, batch_idx):
            (ids,) = batch
            self.log("val_loss", self.model(input_ids=ids, labels=ids, use_cache=False).loss, sync_dist=True)

    class WithVal(Shard):
        def val_dataloader(self):
            return self.train_dataloader()

    val_cb, validated = _callback(), Validated()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    metrics = _trainer(strategy, 2, out, callbacks=[val_cb], enable_checkpointing=False).validate(validated,
                                                                                                  datamodule=WithVal())
    torch.save({"masks": val_cb.masks.to_dict(), "val_loss": metrics[0]["val_loss"],
                "sharded": isinstance(validated.model.model.layers[0].mlp.down_proj.weight, DTensor)},
               os.path.join(out, f"validate{trainer.global_rank}.pt"))

    # a calibration loader that gives both ranks the same batches: each rank keeps its share
    class SameOnEveryRank(WithVal):
        def calib_dataloader(self):
            return DataLoader(TensorDataset(tokens), batch_size=BATCH, shuffle=False)

    same_cb = RobOPCallback(sparsity=0.5, solver="sparsegpt", uncertainty="trace", calibration_batches=2,
                            calibration_dataloader="calib", verbose=False, progress=False)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    _trainer(strategy, 2, out, callbacks=[same_cb], enable_checkpointing=False).validate(Validated(),
                                                                                         datamodule=SameOnEveryRank())
    torch.save(same_cb.masks.to_dict(), os.path.join(out, f"same{trainer.global_rank}.pt"))

    # mixed precision (autocast bf16 over the float32 sharded parameters): the zeros hold too
    mixed_cb, mixed = _callback(), TinyLM()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    trainer = _trainer(strategy, 2, out, callbacks=[mixed_cb], enable_checkpointing=False, precision="bf16-mixed")
    trainer.fit(mixed, datamodule=Shard())
    held = all(bool(((w.full_tensor() if isinstance(w, DTensor) else w)[~m] == 0).all())
               for n, m in mixed_cb.masks.items() for w in [mixed.get_submodule(n).weight])
    torch.save({"held": held, "changed": not torch.equal(
        mixed.model.lm_head.weight.full_tensor(), TinyLM().model.lm_head.weight)},
        os.path.join(out, f"mixed{trainer.global_rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_sharded_fine_tuning_holds_zeros_and_equals_one_process(tmp_path):
    proc = run_child(__file__, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["sharded"] and "Shard(dim=0)" in r0["mask_placements"]  # the masks follow the DTensor placements
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        weight = r0["state"][name.removeprefix("model.") + ".weight"]
        assert bool((weight[~r0["masks"][name]] == 0).all()), name  # zeros held through sharded AdamW steps
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k

    for kind in ("full", "distributed"):
        resumed = torch.load(tmp_path / f"resumed-{kind}0.pt", weights_only=False)
        assert resumed["done"] == ["start"] and resumed["reports"] == 1, kind  # restored, not pruned again
        assert resumed["steps"] == STEPS + 2, kind
        assert resumed["pruned"] == ([] if kind == "full" else ["start"]), kind  # the restored state won either way
        for name, mask in resumed["masks"].items():
            assert torch.equal(mask, r0["masks"][name]), (kind, name)
            weight = resumed["state"][name.removeprefix("model.") + ".weight"]
            assert bool((weight[~mask] == 0).all()), (kind, name)

    validated = torch.load(tmp_path / "validate0.pt", weights_only=False)
    assert validated["sharded"] and validated["val_loss"] > 0
    for name, mask in validated["masks"].items():  # the same calibration: the fit's masks
        assert torch.equal(mask, r0["masks"][name]), name

    # the same batches on every rank were split, not counted twice: one process's masks on those batches
    from robop_lightning.pipeline.prune import prune_model

    same = torch.load(tmp_path / "same0.pt", weights_only=False)
    tokens = _tokens()
    alone = prune_model(TinyLM(), [(tokens[:BATCH],), (tokens[BATCH : 2 * BATCH],)], sparsity=0.5, solver="sparsegpt",
                        uncertainty="trace", progress=False)
    assert same.keys() == alone.masks.keys()
    for name, mask in alone.masks.items():
        assert torch.equal(same[name], mask), name

    mixed = torch.load(tmp_path / "mixed0.pt", weights_only=False)
    assert mixed["held"] and mixed["changed"]  # bf16-mixed trained the model and kept its zeros

    # the full checkpoint loads strictly into the stock module
    stock = TinyLM()
    stock.load_state_dict(torch.load(tmp_path / "full.ckpt", weights_only=False)["state_dict"], strict=True)

    # one process, same samples (both ranks' slices in one batch of 2 x BATCH), same steps
    torch.set_num_threads(1)
    tokens = _tokens()
    single = TinyLM()
    robop = _callback()
    loader = DataLoader(TensorDataset(tokens), batch_size=2 * BATCH, shuffle=False)
    _trainer("auto", 1, str(tmp_path / "single"), callbacks=[robop], enable_checkpointing=False).fit(single, loader)
    for name in robop.masks:
        assert torch.equal(robop.masks[name], r0["masks"][name]), name
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------------- FSDP1
def _lift_gpu_check() -> None:
    """Lightning's FSDPStrategy has no CPU path, though torch's FSDP1 runs on CPU with gloo: its
    accelerator connector refuses a CPU accelerator, and it passes ``device_id=root_device.index``
    (``None`` on CPU, which FSDP1 refuses). The CPU test lifts exactly these two: the check is skipped
    for an FSDPStrategy and FSDP1 gets ``device_id=cpu``; the strategy's own wrapping, sharded steps
    and checkpointing run unchanged."""
    import torch.distributed.fsdp as fsdp
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    check = _AcceleratorConnector._check_strategy_and_fallback

    def lifted(self) -> None:
        if not isinstance(self._strategy_flag, FSDPStrategy):
            check(self)

    class OnCPU(fsdp.FullyShardedDataParallel):
        def __init__(self, module, *args, device_id=None, **kwargs) -> None:
            super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id,
                             **kwargs)

    _AcceleratorConnector._check_strategy_and_fallback = lifted
    fsdp.FullyShardedDataParallel = OnCPU  # FSDPStrategy imports it from here when it wraps


def _fsdp1(state_dict_type: str = "full"):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type=state_dict_type)


def _full_state(module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        return {k: v.detach().to('cpu', copy=True) for k, v in module.model.state_dict().items()}


def _child_fsdp1(out: str, accelerator: str = "cpu", devices: str = "2") -> None:
    torch.set_num_threads(1)
    world = int(devices)
    if accelerator == "cpu":
        _lift_gpu_check()
    tokens = _tokens()

    def shard(trainer):
        class Shard(pl.LightningDataModule):
            def train_dataloader(self):  # of each 2 x BATCH samples, rank r takes the r-th of W slices
                size = 2 * BATCH // world
                start = trainer.global_rank * size
                part = torch.cat([tokens[i : i + size] for i in range(start, len(tokens), 2 * BATCH)])
                return DataLoader(TensorDataset(part), batch_size=size, shuffle=False)

        return Shard()

    robop, module = _callback(), TinyLM()
    trainer = _trainer(_fsdp1(), world, out, callbacks=[robop], enable_checkpointing=False, accelerator=accelerator)
    trainer.fit(module, datamodule=shard(trainer))
    weight = module.model.model.layers[0].mlp.down_proj.weight
    flat = tuple(weight.shape) != (32, 64)  # between steps FSDP1 leaves each rank a 1-D slice
    held = robop.masks.holds(trainer.strategy.model)
    # AdamW's moments of the pruned entries stay 0 only if their gradients were masked on this
    # rank's slice before every step (the weights alone are re-zeroed after the step anyway)
    robop.masks.attach(trainer.strategy.model)
    opt_state = trainer.optimizers[0].state
    moments = [(opt_state[robop.masks._params[n]]["exp_avg"], robop.masks._pruned[n]) for n in robop.masks
               if robop.masks._params[n].numel()]  # a rank may hold none of a weight (no state then)
    robop.masks.detach()
    moments_zero = all(bool((m[p] == 0).all()) for m, p in moments)
    pruned_here = sum(int(p.sum()) for _, p in moments)
    state = _full_state(module, trainer)
    trainer.save_checkpoint(os.path.join(out, "fsdp1-full.ckpt"))
    torch.save({"masks": robop.masks.to_dict(), "state": state, "flat": flat, "held": held,
                "moments_zero": moments_zero, "pruned_here": pruned_here},
               os.path.join(out, f"fsdp1-rank{trainer.global_rank}.pt"))
    for kind in ("full", "sharded"):
        path = os.path.join(out, "fsdp1-full.ckpt")
        if kind == "sharded":
            saver = _trainer(_fsdp1("sharded"), world, out, callbacks=[_callback()], enable_checkpointing=False,
                             accelerator=accelerator)
            saver.fit(TinyLM(), datamodule=shard(saver))
            path = os.path.join(out, "fsdp1-sharded.ckpt")
            saver.save_checkpoint(path)
        again, resumed = _callback(), TinyLM()
        trainer = _trainer(_fsdp1(kind), world, out, max_steps=STEPS + 2, callbacks=[again], enable_checkpointing=False,
                           accelerator=accelerator)
        calls = []
        prune = again._prune
        again._prune = lambda *args: calls.append(args[-1]) or prune(*args)
        if kind == "full":  # the path known before the fit (public trainer.ckpt_path): nothing pruned
            trainer.ckpt_path = path
            trainer.fit(resumed, datamodule=shard(trainer))
        else:  # fit(ckpt_path=...): pruned in setup, then the restored state replaces it (with a warning)
            trainer.fit(resumed, datamodule=shard(trainer), ckpt_path=path)
        torch.save({"done": list(again._done), "masks": again.masks.to_dict(), "state": _full_state(resumed, trainer),
                    "steps": trainer.global_step, "pruned": calls},
                   os.path.join(out, f"fsdp1-resumed-{kind}{trainer.global_rank}.pt"))
    # FSDP1's mixed precision (bf16 compute copies of the float32 shards): the zeros hold too
    mixed_cb, mixed = _callback(), TinyLM()
    trainer = _trainer(_fsdp1(), world, out, callbacks=[mixed_cb], enable_checkpointing=False, accelerator=accelerator,
                       precision="bf16-mixed")
    trainer.fit(mixed, datamodule=shard(trainer))
    state = _full_state(mixed, trainer)
    torch.save({"held": all(bool((state[n.removeprefix("model.") + ".weight"][~m] == 0).all())
                            for n, m in mixed_cb.masks.items()),
                "changed": not torch.equal(state["lm_head.weight"], TinyLM().model.lm_head.weight)},
               os.path.join(out, f"fsdp1-mixed{trainer.global_rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _check_fsdp1(tmp_path: Path, world: int = 2) -> int:
    """Assert the FSDP1 child's results (see its comments); returns the number of masks checked."""
    r0, r1 = (torch.load(tmp_path / f"fsdp1-rank{r % world}.pt", weights_only=False) for r in range(2))
    assert (r0["flat"] or world == 1) and r0["held"] and r1["held"]  # one rank: FSDP1 switches to NO_SHARD
    assert r0["moments_zero"] and r1["moments_zero"] and r0["pruned_here"] > 0 and r1["pruned_here"] > 0
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        weight = r0["state"][name.removeprefix("model.") + ".weight"]
        assert bool((weight[~r0["masks"][name]] == 0).all()), name  # zeros held through FSDP1's sharded AdamW
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for kind in ("full", "sharded"):
        resumed = torch.load(tmp_path / f"fsdp1-resumed-{kind}0.pt", weights_only=False)
        assert resumed["done"] == ["start"] and resumed["steps"] == STEPS + 2, kind
        assert resumed["pruned"] == ([] if kind == "full" else ["start"]), kind  # the restored state won either way
        for name, mask in resumed["masks"].items():
            assert torch.equal(mask, r0["masks"][name]), (kind, name)
            assert bool((resumed["state"][name.removeprefix("model.") + ".weight"][~mask] == 0).all()), (kind, name)
    mixed = torch.load(tmp_path / "fsdp1-mixed0.pt", weights_only=False)
    assert mixed["held"] and mixed["changed"]
    stock = TinyLM()  # the full checkpoint (gathered from the shards) loads strictly into the stock module
    stock.load_state_dict(torch.load(tmp_path / "fsdp1-full.ckpt", weights_only=False)["state_dict"], strict=True)
    # one process, same samples, same steps: the same masks and, to tolerance, the same weights
    torch.set_num_threads(1)
    single, robop = TinyLM(), _callback()
    loader = DataLoader(TensorDataset(_tokens()), batch_size=2 * BATCH, shuffle=False)
    _trainer("auto", 1, str(tmp_path / "single"), callbacks=[robop], enable_checkpointing=False).fit(single, loader)
    for name in robop.masks:
        assert torch.equal(robop.masks[name], r0["masks"][name]), name
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    return len(r0["masks"])


def test_fsdp1_strategy_on_cpu_holds_zeros_and_equals_one_process(tmp_path):
    """Lightning's FSDPStrategy (FSDP1, use_orig_params): masks are each rank's slice of the flattened
    weight; 2 gloo processes on CPU with only Lightning's GPU-only check lifted."""
    proc = run_child(__file__, tmp_path, "fsdp1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _check_fsdp1(tmp_path) > 0  # masks checked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy on GPUs needs a CUDA device")
def test_fsdp1_strategy_on_gpus(tmp_path):
    """The same run on up to 2 GPUs, unpatched (nccl): runs where a device is lent."""
    world = min(2, torch.cuda.device_count())
    proc = run_child(__file__, tmp_path, "fsdp1", "cuda", str(world))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _check_fsdp1(tmp_path, world) > 0  # masks checked


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "fsdp1":
        _child_fsdp1(sys.argv[1], *sys.argv[3:])
    else:
        _child(sys.argv[1])
