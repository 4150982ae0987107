"""Each function of robop_lightning.utils.compat (the package's only uses of private names of
torch (FSDP, pytree) and accelerate) against the installed libraries: a test fails with a message
naming the private name that changed, so an upgrade that breaks one is found here, not in a fit."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robop_lightning.utils import compat


# --------------------------------------------------------------------------- torch FSDP1
def test_fsdp1_shard_ranges_reads_the_flat_parameters(tmp_path):
    """``FullyShardedDataParallel._flat_param`` (a FlatParameter) with ``_params`` and
    ``_shard_param_infos``: one process with gloo on CPU (FSDP1 switches to NO_SHARD, but the shard
    metadata is the same structure), so every entry of every parameter is this rank's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed for FSDP1")
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        originals = [p for p in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one rank: FSDP1 switches to NO_SHARD
            wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
            unflat = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 3)), use_orig_params=False,
                                              device_id=torch.device("cpu"))
        units = FullyShardedDataParallel.fsdp_modules(wrapped)
        flat = getattr(units[0], "_flat_param", None)
        assert flat is not None, "FSDP1 units no longer have _flat_param: update compat.fsdp1_shard_ranges."
        for name in ("_params", "_shard_param_infos"):
            assert getattr(flat, name, None) is not None, (
                f"FSDP1's FlatParameter no longer has {name}: update compat.fsdp1_shard_ranges."
            )
        info = flat._shard_param_infos[0]
        for field in ("in_shard", "intra_param_start_idx", "intra_param_end_idx"):
            assert hasattr(info, field), (
                f"FSDP1's _ShardParamInfo no longer has {field}: update compat.fsdp1_shard_ranges."
            )
        ranges = compat.fsdp1_shard_ranges(wrapped)
        assert ranges == {id(p): (0, p.numel()) for p in originals}
        with pytest.raises(ValueError, match="use_orig_params=True"):
            compat.fsdp1_shard_ranges(unflat)
    finally:
        dist.destroy_process_group()


def test_unwrapped_name_knows_every_wrapper_attribute():
    """The attribute each wrapper puts between a model's modules is one of WRAPPER_ATTRIBUTES."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    assert FSDP_WRAPPED_MODULE in compat.WRAPPER_ATTRIBUTES, (
        f"FSDP1 now wraps modules as {FSDP_WRAPPED_MODULE!r}: update compat.WRAPPER_ATTRIBUTES."
    )
    model = nn.Sequential(nn.Linear(2, 2))
    model[0] = checkpoint_wrapper(model[0])
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    names = [n for n, _ in compiled.named_modules()]
    assert names[-1] == "_orig_mod.0._checkpoint_wrapped_module" and compat.unwrapped_name(names[-1]) == "0", (
        f"torch.compile / checkpoint_wrapper now name their inner modules {names}: update compat.WRAPPER_ATTRIBUTES."
    )


# --------------------------------------------------------------------------- torch pytree
def test_tree_helpers_flatten_a_batch_as_vmap_does():
    """``torch.utils._pytree.tree_leaves`` / ``tree_map``: the structure ``vmap`` matches ``in_dims`` against."""
    try:
        from torch.utils import _pytree
    except ImportError as err:  # pragma: no cover - only on a torch without it
        pytest.fail(f"torch.utils._pytree is gone ({err}): update compat.tree_leaves / compat.tree_map "
                    "(to torch's public pytree module, if it has one now).")
    for name in ("tree_leaves", "tree_map"):
        assert callable(getattr(_pytree, name, None)), (
            f"torch.utils._pytree no longer has {name}: update compat.tree_leaves / compat.tree_map."
        )
    x, y = torch.randn(3, 2), torch.arange(3)
    batch = {"x": x, "y": (y, "tag")}
    leaves = compat.tree_leaves(batch)
    assert len(leaves) == 3 and leaves[0] is x and leaves[1] is y and leaves[2] == "tag"
    in_dims = compat.tree_map(lambda v: 0 if isinstance(v, torch.Tensor) else None, batch)
    assert in_dims == {"x": 0, "y": (0, None)}
    out = torch.func.vmap(lambda b: b["x"].sum() + b["y"][0], in_dims=(in_dims,))(batch)
    assert torch.equal(out, x.sum(1) + y)


# --------------------------------------------------------------------------- accelerate
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_offload_hook_accessors_read_accelerates_align_devices_hook(kind, tmp_path):
    """``module._hf_hook`` (an AlignDevicesHook) with ``execution_device`` and ``weights_map``."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import has_offloaded_params

    model = nn.Sequential(nn.Linear(4, 2))
    weight = model[0].weight.detach().clone()
    if kind == "cpu":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    layer = model[0]
    assert has_offloaded_params(layer) and layer.weight.device.type == "meta"
    assert isinstance(getattr(layer, "_hf_hook", None), AlignDevicesHook), (
        "accelerate no longer keeps an offloaded module's AlignDevicesHook as module._hf_hook: update "
        "compat.offload_execution_device / offload_weights_map."
    )
    assert compat.offload_execution_device(layer) == torch.device("cpu")
    weights = compat.offload_weights_map(layer)
    assert torch.equal(weights["weight"], weight), "accelerate's weights_map no longer maps 'weight' to the weight."
    with pytest.raises(ValueError, match="not offloaded"):
        compat.offload_weights_map(nn.Linear(2, 2))


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(compat, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
