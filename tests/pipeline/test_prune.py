"""robop_lightning.pipeline.prune: prune_model end to end on tiny real models (an MLP, a timm ViT, a Hugging Face
Llama, CPU): correctness against block-by-block pruning by hand, bad input, shared / tied / frozen weights,
determinism."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning.engine.layer import prune_layer
from robop_lightning.pipeline.prune import prune_model
from tests.engine_helpers import (
    MLP, _batches, _net, _state, _unchanged, clone_state, images, linear_names, no_hooks_left, state,
    tiny_llama, tiny_vit,
)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_keeps_activations_on_cpu_and_matches_cpu_masks():
    cpu, gpu, batches = tiny_vit(), tiny_vit().cuda(), images()  # CPU batches are moved to the model
    masks_cpu = prune_model(cpu, batches, solver="sparsegpt", uncertainty="baseline").masks
    masks_gpu = prune_model(gpu, batches, solver="sparsegpt", uncertainty="baseline").masks
    for name, mask in masks_cpu.items():
        assert gpu.get_submodule(name).weight.is_cuda
        assert float((mask == masks_gpu[name]).float().mean()) > 0.97, name  # TF32 / kernel rounding only


# --------------------------------------------------------------------------- bad input (issue 8)
def _tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def _token_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(2)]


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.parametrize(
    "case,calibration",
    [
        ("constant", [torch.ones(8, 16)] * 2),
        ("all-zero", [torch.zeros(8, 16)] * 2),
        ("single sample", [torch.randn(1, 16, generator=torch.Generator().manual_seed(0))]),
        ("single unbatched sample", [torch.randn(16, generator=torch.Generator().manual_seed(0))]),
        ("batches of different sizes", [torch.randn(1, 16), torch.randn(7, 16)]),
    ],
)
@pytest.mark.parametrize("solver,uncertainty", [("cap", "cvar"), ("alps", "minmax-e"), ("sparsegpt", "minmax-trace"), ("alps", "e"), ("cap", "trace")])
def test_prune_model_on_degenerate_calibration_works(case, calibration, solver, uncertainty):
    model = _net()
    data = [b.clone() for b in calibration]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = prune_model(model, data, sparsity=0.5, solver=solver, uncertainty=uncertainty, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(data, calibration))  # batches untouched
    assert [r["name"] for r in report.layers] == ["fc1", "fc2"]
    for name, mask in report.masks.items():
        weight = model.get_submodule(name).weight
        assert int(mask.sum()) == weight.numel() // 2 and torch.isfinite(weight).all()
        assert bool((weight[~mask] == 0).all())


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.parametrize("sparsity", [0.0, 0.99])
def test_prune_model_sparsity_zero_and_099(sparsity):
    model = _net()
    before = _state(model)
    report = prune_model(model, _batches(), sparsity=sparsity, solver="cap", uncertainty="cvar", progress=False)
    if sparsity == 0.0:
        assert _unchanged(model, before) and all(bool(m.all()) for m in report.masks.values())
    else:
        for name, mask in report.masks.items():
            weight = model.get_submodule(name).weight
            assert int(mask.sum()) == round(0.01 * weight.numel()) == int((weight != 0).sum())  # 5 of 512


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
def test_layer_narrower_than_nm_group_fails_before_any_work():
    """A 2-wide layer under 2:4: refused up front with the layer's name and the fix, no forward run."""

    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(16, 2), nn.Linear(2, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.fc2(self.fc1(x)))

    model = Narrow()
    before = _state(model)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"but fc2 has in_features=2\. Use pattern='unstructured' or 'row'"):
        prune_model(model, _batches(), pattern="2:4", sparsity=None, solver="alps", uncertainty="cvar")
    assert calls == [] and _unchanged(model, before)
    report = prune_model(model, _batches(), pattern="2:4", sparsity=None, solver="alps", ignore=["fc2"])
    assert list(report.masks) == ["fc1"] and bool((report.masks["fc1"].view(2, 4, 4).sum(-1) == 2).all())


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
def test_tied_embedding_and_lm_head():
    """lm_head tied to the embedding: targeting it is refused (it would prune the embedding too);
    the default targets (the blocks) prune fine and leave the tied pair untouched."""
    model = _tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"^lm_head: its weight is tied to model\.embed_tokens\.weight .*Leave lm_head out of the targets, or "
        r"untie the weights first .*tie_word_embeddings=False",
    ):
        prune_model(model, _token_batches(), targets=["lm_head"], solver="sparsegpt", uncertainty="cvar")
    assert _unchanged(model, before)
    report = prune_model(model, _token_batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    assert len(report.masks) == 14 and report.totals["sparsity"] == pytest.approx(0.5)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # untied (the stock fix): lm_head prunes, the embedding keeps every entry
    untied = _tiny_llama(tie=False)
    report = prune_model(untied, _token_batches(), targets=["lm_head"], solver="sparsegpt", uncertainty="cvar")
    assert int(report.masks["lm_head"].sum()) == 64 * 32 // 2
    assert not bool((untied.model.embed_tokens.weight == 0).any())


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
def test_weights_shared_between_layers():
    model = _net(hidden=16)
    model.fc2.weight = model.fc1.weight  # both 16 x 16, one tensor
    before = _state(model)
    with pytest.raises(
        ValueError,
        match=r"^fc1: its weight is the same tensor as fc2\.weight \(weights shared between layers\).*Untie them "
        r"first .*ignore=\['fc1', 'fc2'\]",
    ):
        prune_model(model, _batches(), solver="cap", uncertainty="cvar")
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match=r"^fc1: its weight is tied to fc2\.weight"):  # one of the two: still shared
        prune_model(model, _batches(), solver="cap", uncertainty="cvar", ignore=["fc2"])
    report = prune_model(model, _batches(), solver="cap", uncertainty="cvar", ignore=["fc1", "fc2"], targets=["head"])
    assert list(report.masks) == ["head"] and torch.equal(model.fc1.weight, before["fc1.weight"])
    model.fc2.weight = nn.Parameter(model.fc1.weight.detach().clone())  # untied: both prune
    report = prune_model(model, _batches(), solver="cap", uncertainty="cvar")
    assert list(report.masks) == ["fc1", "fc2"] and not torch.equal(report.masks["fc1"], report.masks["fc2"])


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.parametrize("solver,uncertainty", [("alps", "cvar"), ("wanda", "baseline")])
def test_modules_without_bias(solver, uncertainty):
    model = _net(bias=False)
    report = prune_model(model, _batches(), solver=solver, uncertainty=uncertainty, progress=False)
    assert model.fc1.bias is None and report.totals["sparsity"] == pytest.approx(0.5)
    assert all(torch.isfinite(model.get_submodule(n).weight).all() for n in report.masks)


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
def test_frozen_parameters_are_pruned_and_stay_frozen():
    from robop_lightning.pipeline.masks import SparsityMasks

    model = _net()
    model.fc1.requires_grad_(False)
    report = prune_model(model, _batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    assert not model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert int(report.masks["fc1"].sum()) == 256 and bool((model.fc1.weight[~report.masks["fc1"]] == 0).all())
    # fine-tuning the rest: the frozen layer has no gradient hook, its zeros stay and so do fc2's
    masks = SparsityMasks(report.masks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    masks.attach(model, [opt])
    for x in _batches():
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert masks.holds(model)
    masks.detach()


# --------------------------------------------------------------------------- determinism
@pytest.mark.usefixtures("one_thread")  # as in test_reliability.py, where it applied to the whole module
@pytest.mark.parametrize("solver", ["alps", "cap", "sparsegpt", "wanda", "magnitude"])
def test_same_data_and_seed_give_bit_identical_weights_and_masks(solver):
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=4, mlp_ratio=2
    ).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    for uncertainty in ("baseline", "trace", "e", "cte", "minmax-trace", "minmax-e", "cvar"):
        runs = []
        for _ in range(2):
            model = copy.deepcopy(vit)
            report = prune_model(model, batches, solver=solver, uncertainty=uncertainty, progress=False)
            runs.append((state(model), report.masks))
        (s1, m1), (s2, m2) = runs
        assert len(m1) == 8
        assert all(torch.equal(s1[k], s2[k]) for k in s1), (solver, uncertainty)
        assert all(torch.equal(m1[n], m2[n]) for n in m1), (solver, uncertainty)
        assert not all(torch.equal(s1[k], v) for k, v in vit.state_dict().items())  # it did prune
