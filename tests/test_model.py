"""prune_model on tiny real models: an MLP, a timm ViT and a Hugging Face Llama (CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning.targets import find_blocks, resolve_targets
from robop_lightning.layer import prune_layer
from robop_lightning.model import PruneReport, prune_model


# --------------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    """No repeated blocks: pruned linear by linear, the ``head`` stays dense."""

    def __init__(self, n_in: int = 16, hidden: int = 32, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def images(batches: int = 4, size: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g) for _ in range(batches)]


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- structure
def test_block_discovery_and_default_targets():
    vit, llama, mlp = tiny_vit(), tiny_llama(), MLP()
    name, blocks = find_blocks(vit)
    assert name == "blocks" and [b for b, _ in blocks] == ["blocks.0", "blocks.1"]
    name, blocks = find_blocks(llama)
    assert name == "model.layers" and len(blocks) == 2
    assert find_blocks(mlp) is None

    vit_targets = resolve_targets(vit, None, None, ["blocks.0", "blocks.1"])
    assert vit_targets == [n for n in linear_names(vit) if n.startswith("blocks.")]
    assert len(vit_targets) == 8 and "head" not in vit_targets
    assert resolve_targets(mlp, None, None, None) == ["fc1", "fc2"]  # head left dense
    assert resolve_targets(vit, ["re:mlp"], ["blocks.1"], None) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        resolve_targets(vit, ["blocks.7"], None, None)
    with pytest.raises(ValueError, match="ignore entry"):
        resolve_targets(vit, None, ["re:nothing_like_this"], ["blocks.0"])
    with pytest.raises(ValueError, match="not a submodule"):
        find_blocks(vit, "encoder.layers")


# --------------------------------------------------------------------------- correctness
def test_vit_blocks_match_manual_block_by_block_pruning():
    """Each block is pruned from the outputs of the already-pruned blocks before it."""
    vit, batches = tiny_vit(), images()
    before = clone_state(vit)
    report = prune_model(vit, batches, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")

    # the same, by hand: capture the inputs of each block's linears with full forwards
    ref = tiny_vit()
    for b in range(2):
        names = [n for n in linear_names(ref) if n.startswith(f"blocks.{b}.")]
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = [
            ref.get_submodule(n).register_forward_pre_hook(
                lambda m, a, n=n, seen=seen: seen[n].append(a[0].detach().clone())
            )
            for n in names
        ]
        with torch.no_grad():
            for x in batches:
                ref(x)
        for h in handles:
            h.remove()
        for n in names:
            layer = ref.get_submodule(n)
            result = prune_layer(layer.weight.detach(), torch.cat(seen[n]), sparsity=0.5, solver="sparsegpt")
            layer.weight.data.copy_(result.weight)

    for n in report.masks:
        torch.testing.assert_close(vit.get_submodule(n).weight, ref.get_submodule(n).weight, rtol=1e-4, atol=1e-5)
    # exact budget, zeros where the mask says, everything else untouched
    assert [r["name"] for r in report.layers] == [n for n in linear_names(vit) if n.startswith("blocks.")]
    for row in report.layers:
        mask = report.masks[row["name"]]
        weight = vit.get_submodule(row["name"]).weight
        assert row["sparsity"] == 0.5 and int(mask.sum()) == mask.numel() // 2
        assert bool((weight[~mask] == 0).all()) and bool((weight[mask] != 0).all())
        assert 0.0 <= row["nominal_error"] <= row["robust_error"]
    after = vit.state_dict()
    for key, value in before.items():
        if not any(key == f"{n}.weight" for n in report.masks):
            assert torch.equal(value, after[key]), key  # head, embeddings, norms, biases
    assert no_hooks_left(vit)


def test_mlp_without_blocks_prunes_linear_by_linear_in_forward_order():
    torch.manual_seed(0)
    mlp, xs = MLP(), [torch.randn(8, 16) for _ in range(3)]
    ref = copy.deepcopy(mlp)
    report = prune_model(mlp, xs, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
    assert list(report.masks) == ["fc1", "fc2"]
    assert torch.equal(mlp.head.weight, ref.head.weight)  # output head stays dense

    x = torch.cat(xs)
    r1 = prune_layer(ref.fc1.weight.detach(), x, sparsity=0.5, solver="sparsegpt")
    ref.fc1.weight.data.copy_(r1.weight)
    with torch.no_grad():
        h = torch.relu(ref.fc1(x))  # fc2 sees the output of the *pruned* fc1
    r2 = prune_layer(ref.fc2.weight.detach(), h, sparsity=0.5, solver="sparsegpt")
    torch.testing.assert_close(mlp.fc1.weight, r1.weight)
    torch.testing.assert_close(mlp.fc2.weight, r2.weight, rtol=1e-4, atol=1e-5)


def test_llama_kwargs_padding_and_lm_head_dense():
    llama = tiny_llama()
    dense = copy.deepcopy(llama)
    g = torch.Generator().manual_seed(0)
    # two sequence lengths: samples are zero-padded to the longest, which changes no Gram
    batches = [{"input_ids": torch.randint(0, 128, (2, t), generator=g)} for t in (8, 12, 12, 8)]
    batches[2]["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
    batches[2]["attention_mask"][1, 9:] = 0  # right padding: a per-batch mask the blocks must be replayed with
    report = prune_model(llama, batches, sparsity=0.5, solver="wanda", uncertainty="baseline", heldout_fraction=0.25)
    assert len(report.layers) == 14 and report.config["blocks"] == "model.layers"
    assert torch.equal(llama.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(llama.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert all(r["heldout_error"] is not None and r["sparsity"] == 0.5 for r in report.layers)

    # pruning with data beats pruning without it on the calibration sequences
    magnitude = copy.deepcopy(dense)
    prune_model(magnitude, batches, sparsity=0.5, solver="magnitude", uncertainty="baseline")
    with torch.no_grad():
        ids = batches[1]["input_ids"]
        ref = dense(input_ids=ids).logits
        err = (llama(input_ids=ids).logits - ref).pow(2).mean()
        err_mag = (magnitude(input_ids=ids).logits - ref).pow(2).mean()
    assert torch.isfinite(err) and err < err_mag


def test_sequences_of_different_lengths_are_zero_padded_exactly():
    """Padding short sequences with zero rows gives the result of the unpadded token rows."""
    llama, ref = tiny_llama(), tiny_llama()
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(0, 128, (2, 6), generator=g), torch.randint(0, 128, (2, 10), generator=g)
    prune_model(llama, [{"input_ids": short}, {"input_ids": long}], solver="sparsegpt", uncertainty="baseline")
    with torch.no_grad():  # q_proj of block 0 sees input_layernorm(embeddings): all token rows, unpadded
        rows = torch.cat(
            [ref.model.layers[0].input_layernorm(ref.model.embed_tokens(ids)).reshape(-1, 32) for ids in (short, long)]
        )
    q = ref.model.layers[0].self_attn.q_proj
    expected = prune_layer(q.weight.detach(), rows, sparsity=0.5, solver="sparsegpt")
    torch.testing.assert_close(llama.model.layers[0].self_attn.q_proj.weight, expected.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("solver", ["cap", "alps"])
def test_robust_solvers_on_mlp(solver):
    torch.manual_seed(0)
    mlp = MLP(16, 16, 4)
    xs = [torch.randn(4, 16) for _ in range(4)]
    report = prune_model(mlp, xs, sparsity=0.5, solver=solver, uncertainty="cvar", heldout_fraction=0.25)
    assert [r["name"] for r in report.layers] == ["fc1", "fc2"]
    for row in report.layers:
        assert row["sparsity"] == 0.5 and row["heldout_error"] is not None and row["srank"] is not None
        assert row["nominal_error"] <= row["robust_error"] + 1e-9


def test_pattern_targets_outside_blocks_and_engine_kwargs():
    vit, batches = tiny_vit(), images(2)
    report = prune_model(
        vit,
        batches,
        sparsity=None,
        pattern="2:4",
        solver="sparsegpt",
        uncertainty="baseline",
        targets=["re:attn", "head"],
        ignore=["blocks.1.attn.proj"],
        damping=0.05,
    )
    names = [r["name"] for r in report.layers]
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "head"]
    for n in names:
        groups = (vit.get_submodule(n).weight != 0).view(-1, 4).sum(1)
        assert bool((groups <= 2).all()) and report.masks[n].view(-1, 4).sum(1).eq(2).all()
    assert report.config["damping"] == 0.05


# --------------------------------------------------------------------------- report
def test_report_table_dict_and_json(tmp_path):
    torch.manual_seed(0)
    report = prune_model(MLP(), [torch.randn(8, 16)], sparsity=0.25, solver="wanda", uncertainty="baseline")
    assert isinstance(report, PruneReport)
    text = str(report)
    assert "fc1" in text and "fc2" in text and "total (2 layers" in text and "wanda" in text
    d = report.to_dict()
    assert d["totals"]["parameters"] == 16 * 32 + 32 * 32
    assert d["totals"]["zeros"] == round(0.25 * d["totals"]["parameters"])
    assert d["totals"]["sparsity"] == pytest.approx(0.25)
    path = tmp_path / "report.json"
    report.to_json(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(d))


# --------------------------------------------------------------------------- failures
def test_nan_activations_leave_every_weight_bit_identical():
    vit, batches = tiny_vit(), images(2)
    before = clone_state(vit)
    vit.blocks[1].mlp.act.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2") as info:
        prune_model(vit, batches, solver="sparsegpt", uncertainty="baseline")
    assert "NaN" in str(info.value)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    vit.blocks[1].mlp.act._forward_hooks.clear()
    assert no_hooks_left(vit)


def test_keyboard_interrupt_restores_weights():
    vit, batches = tiny_vit(), images(2)
    before = clone_state(vit)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = vit.blocks[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_model(vit, batches, solver="wanda", uncertainty="baseline")
    handle.remove()
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks_left(vit)


def test_input_validation():
    vit = tiny_vit()
    before = clone_state(vit)
    with pytest.raises(ValueError, match="calibration is empty"):
        prune_model(vit, [], solver="wanda")
    with pytest.raises(ValueError, match="unknown solver"):
        prune_model(vit, images(1), solver="obs")
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(vit, images(1), sparsity=1.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        prune_model(vit, images(1), solver="wanda", blocksize=3)
    with pytest.raises(ValueError, match="heldout_fraction"):
        prune_model(vit, images(1), solver="wanda", uncertainty="baseline", heldout_fraction=0.9)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_mode_restored():
    vit = tiny_vit().train()
    prune_model(vit, images(1), solver="magnitude", uncertainty="baseline")
    assert all(m.training for m in vit.modules())


# --------------------------------------------------------------------------- masks
def test_masks_hold_zeros_through_momentum_and_unmasked_gradients():
    from robop_lightning.masks import SparsityMasks

    torch.manual_seed(0)
    mlp = MLP()
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):  # dense steps: every weight has momentum now
        mlp(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    mask = torch.rand(mlp.fc1.weight.shape) > 0.5
    masks = SparsityMasks({"fc1": mask})
    masks.attach(mlp, [opt])
    assert bool((opt.state[mlp.fc1.weight]["momentum_buffer"][~mask] == 0).all())
    for _ in range(3):
        mlp(torch.randn(8, 16)).pow(2).mean().backward()
        assert bool((mlp.fc1.weight.grad[~mask] == 0).all())  # masked after accumulation
        mlp.fc1.weight.grad += 1.0  # something else writes the pruned gradients: the step post-hook still wins
        opt.step()
        opt.zero_grad()
        assert bool((mlp.fc1.weight[~mask] == 0).all()) and bool((mlp.fc1.weight[mask] != 0).all())
    assert masks.holds(mlp) and masks.sparsity() == pytest.approx(1 - float(mask.float().mean()))
    masks.detach()
    assert not opt._optimizer_step_post_hooks and not mlp.fc1.weight._post_accumulate_grad_hooks
    mlp(torch.randn(8, 16)).pow(2).mean().backward()
    opt.step()
    assert not masks.holds(mlp)  # detached: nothing holds the zeros any more
    with pytest.raises(ValueError, match="different model"):
        SparsityMasks({"fc2": mask}).attach(mlp)


def test_masks_state_dict_is_bit_packed_and_round_trips():
    from robop_lightning.masks import SparsityMasks

    g = torch.Generator().manual_seed(0)
    masks = SparsityMasks({"a": torch.rand(3, 5, generator=g) > 0.5, "b": torch.rand(32, 16, generator=g) > 0.3})
    state = masks.state_dict()
    assert state["a"]["bits"].dtype == torch.uint8 and state["a"]["bits"].numel() == 2  # 15 bits -> 2 bytes
    assert state["b"]["bits"].numel() == 64
    again = SparsityMasks.from_state_dict(state)
    assert all(torch.equal(again[n], masks[n]) for n in ("a", "b"))
    assert again.digest() == masks.digest()  # what DDP ranks compare
    flipped = again.to_dict()
    flipped["b"][0, 0] = ~flipped["b"][0, 0]
    assert SparsityMasks(flipped).digest() != masks.digest()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_keeps_activations_on_cpu_and_matches_cpu_masks():
    cpu, gpu, batches = tiny_vit(), tiny_vit().cuda(), images()  # CPU batches are moved to the model
    masks_cpu = prune_model(cpu, batches, solver="sparsegpt", uncertainty="baseline").masks
    masks_gpu = prune_model(gpu, batches, solver="sparsegpt", uncertainty="baseline").masks
    for name, mask in masks_cpu.items():
        assert gpu.get_submodule(name).weight.is_cuda
        assert float((mask == masks_gpu[name]).float().mean()) > 0.97, name  # TF32 / kernel rounding only
