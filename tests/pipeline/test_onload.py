"""Onloaded pruning (issue 17): the model stays at home, each block visits the execution device.

On CPU the execution device ``cpu:0`` differs from the model's ``cpu`` as a ``torch.device``, so the
whole onloading path runs (every block moved there and back, batches and activations routed); a
GPU test checks the real host -> CUDA case where one is present.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from robop_lightning import prune_model
from robop_lightning.pipeline.shrink_step import prune_model_structured
from tests.engine_helpers import tiny_llama, token_batches


def _moves(model: nn.Module, blocks: list[nn.Module]) -> list[tuple[int, str]]:
    """Record (block index, device) of every ``block.to(...)`` call."""
    seen = []
    for i, block in enumerate(blocks):
        original = block.to

        def to(*args, _i=i, _orig=original, **kwargs):
            seen.append((_i, str(args[0] if args else kwargs.get("device"))))
            return _orig(*args, **kwargs)

        block.to = to
    return seen


@pytest.mark.parametrize("solver", ["sparsegpt", "alps"])
def test_onloaded_pruning_equals_pruning_in_place(solver):
    reference, model = tiny_llama(layers=3, vocab=64), tiny_llama(layers=3, vocab=64)
    ref = prune_model(reference, token_batches(), sparsity=0.5, solver=solver, uncertainty="trace")
    seen = _moves(model, list(model.model.layers))
    report = prune_model(model, token_batches(), sparsity=0.5, solver=solver, uncertainty="trace", device="cpu:0")
    # every block went to the execution device and back, one at a time, in order
    assert seen == [(i, d) for i in range(3) for d in ("cpu:0", "cpu")]
    for (k, v), w in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert all(torch.equal(report.masks[n], ref.masks[n]) for n in ref.masks)


def test_onloading_without_blocks_moves_one_linear_at_a_time():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    twin = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    twin.load_state_dict(mlp.state_dict())
    xs = [torch.randn(8, 16) for _ in range(3)]
    prune_model(mlp, xs, sparsity=0.5, solver="sparsegpt", uncertainty="baseline", targets=["0", "2"])
    seen = _moves(twin, [twin[0], twin[2]])
    prune_model(twin, xs, sparsity=0.5, solver="sparsegpt", uncertainty="baseline", targets=["0", "2"], device="cpu:0")
    assert seen == [(0, "cpu:0"), (0, "cpu"), (1, "cpu:0"), (1, "cpu")]
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), twin.state_dict().values()))


def test_onloaded_structured_pruning_and_resume(tmp_path):
    reference, model = tiny_llama(layers=3, vocab=64), tiny_llama(layers=3, vocab=64)
    prune_model_structured(reference, token_batches(), sparsity=0.5, uncertainty="trace")
    prune_model_structured(model, token_batches(), sparsity=0.5, uncertainty="trace", device="cpu:0",
                           resume_dir=tmp_path / "r")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    again = tiny_llama(layers=3, vocab=64)
    report = prune_model_structured(again, token_batches(), sparsity=0.5, uncertainty="trace", device="cpu:0",
                                    resume_dir=tmp_path / "r")
    assert len(report.resumed) == 6
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), again.state_dict().values()))


def test_a_failure_while_onloaded_restores_the_model_at_home():
    model = tiny_llama(layers=3, vocab=64)
    dense = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(module, args):
        raise RuntimeError("disk full")

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prune_model(model, token_batches(), sparsity=0.5, solver="sparsegpt", pattern="structured", device="cpu:0")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in dense.items())


def test_a_bad_device_is_refused():
    with pytest.raises(ValueError, match="device must name a torch device"):
        prune_model(tiny_llama(layers=3, vocab=64), token_batches(), device="gpu-please")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_model_onloaded_to_cuda_equals_the_model_on_cuda():
    vit_kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=3)
    torch.manual_seed(0)
    host = timm.create_model("deit_tiny_patch16_224", **vit_kwargs).eval()
    on_gpu = timm.create_model("deit_tiny_patch16_224", **vit_kwargs).eval()
    on_gpu.load_state_dict(host.state_dict())
    on_gpu.cuda()
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_model(on_gpu, [x.cuda() for x in images], sparsity=0.5, solver="sparsegpt", uncertainty="trace")
        torch.cuda.reset_peak_memory_stats()
        prune_model(host, images, sparsity=0.5, solver="sparsegpt", uncertainty="trace", device="cuda")
    assert next(host.parameters()).device.type == "cpu"  # the weights stayed on the host
    for (k, v), w in zip(host.state_dict().items(), on_gpu.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w.cpu(), rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- accelerate device_map offload
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_accelerate_offloaded_model_prunes_like_the_model_in_memory(kind, tmp_path):
    """Weights kept off the device by accelerate (meta parameters, loaded per forward from host memory
    or disk): pruning reads them through the hooks and writes the result into accelerate's weights map."""
    from accelerate import cpu_offload, disk_offload

    from robop_lightning.pipeline.dispatch import read_weight

    reference, model = tiny_llama(layers=3, vocab=64), tiny_llama(layers=3, vocab=64)
    ref = prune_model(reference, token_batches(), sparsity=0.5, solver="alps", uncertainty="trace")
    if kind == "cpu":
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    report = prune_model(model, token_batches(), sparsity=0.5, solver="alps", uncertainty="trace")
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"  # still offloaded
    for name, mask in ref.masks.items():
        assert torch.equal(report.masks[name], mask), name
        assert torch.equal(read_weight(model.get_submodule(name)), reference.get_submodule(name).weight), name
    with torch.no_grad():  # the forwards load the pruned weights
        assert torch.equal(model(**token_batches()[0], use_cache=False).logits,
                           reference(**token_batches()[0], use_cache=False).logits)


def test_a_failure_restores_accelerate_offloaded_weights():
    from accelerate import cpu_offload

    from robop_lightning.pipeline.dispatch import read_weight

    model = tiny_llama(layers=3, vocab=64)
    cpu_offload(model, execution_device=torch.device("cpu"))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    dense = {n: read_weight(model.get_submodule(n)).clone() for n in names}

    def boom(module, args):
        raise RuntimeError("disk full")

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prune_model(model, token_batches(), sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
    assert all(torch.equal(read_weight(model.get_submodule(n)), w) for n, w in dense.items())
    with pytest.raises(ValueError, match="resume_dir is not supported for accelerate-offloaded"):
        prune_model(model, token_batches(), resume_dir="unused")
    with pytest.raises(ValueError, match="accelerate's offload hooks"):
        prune_model(model, token_batches(), pattern="structured")
