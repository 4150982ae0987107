"""Any Hugging Face causal LM: GPT-2's Conv1D layers pruned like nn.Linear, fused mixture-of-experts
tensors reported (not silently skipped), and a default solver that fits the model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from robop_lightning import prune_layer
from robop_lightning.pipeline.masks import SparsityMasks
from robop_lightning.pipeline.prune import prune_model
from robop_lightning.pipeline.targets import default_solver, is_transposed
from tests.engine_helpers import tiny_llama, tiny_vit, token_batches


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_are_pruned_as_their_transposed_weights():
    model = _gpt2()
    batches = token_batches(vocab=64)
    conv = model.transformer.h[1].mlp.c_proj
    assert is_transposed(conv) and conv.weight.shape == (128, 32)  # (in, out)
    seen = []
    conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    # what the layer receives once the first block is pruned: from a reference run on a copy
    ref_model = copy.deepcopy(model)
    report = prune_model(model, batches, sparsity=0.5, solver="sparsegpt", uncertainty="trace", progress=False)
    names = [r["name"] for r in report.layers]
    assert names == [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                           "mlp.c_proj")]
    assert report.layers[-1]["shape"] == [32, 128]  # (out, in), as for nn.Linear
    for name in names:
        w = model.get_submodule(name).weight
        mask = report.masks[name]
        assert mask.shape == w.shape  # the parameter's own (in, out) layout: masks attach to it
        assert bool((w[~mask] == 0).all()) and float((~mask).float().mean()) == pytest.approx(0.5, abs=1e-3)
        # 50 % of every output's inputs kept overall, counted on the (out, in) orientation
    # the last layer's mask is what prune_layer gives on its inputs (after the pruned block 0) in (out, in)
    x = torch.cat(seen[-len(batches):])
    expected = prune_layer(ref_model.get_submodule(names[-1]).weight.detach().T, x, sparsity=0.5,
                           solver="sparsegpt", uncertainty="trace")
    assert torch.equal(report.masks[names[-1]], expected.mask.T)
    masks = SparsityMasks(report.masks)
    masks.attach(model)
    assert masks.holds(model)
    masks.detach()


def test_gpt2_two_four_prunes_groups_of_inputs():
    model = _gpt2()
    report = prune_model(model, token_batches(vocab=64), pattern="2:4", sparsity=None, solver="alps",
                         uncertainty="baseline", progress=False)
    w = model.transformer.h[0].mlp.c_fc.weight.T  # (out, in)
    groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert bool((groups <= 2).all()) and report.totals["sparsity"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="Conv1D"):
        prune_model(_gpt2(), token_batches(vocab=64), pattern="structured", progress=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_experts_are_reported_when_left_dense(family):
    torch.manual_seed(0)
    if family == "mixtral":
        cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg).eval()
    else:
        cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                             shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
        model = Qwen2MoeForCausalLM(cfg).eval()
    with pytest.warns(RuntimeWarning, match="not pruned") as caught:
        report = prune_model(model, token_batches(vocab=64), sparsity=0.5, solver="sparsegpt", uncertainty="baseline",
                             progress=False)
    message = str(caught[0].message)
    assert "experts" in message and "mixture-of-experts" in message
    coverage = report.config["coverage"]
    fused = sum(p.numel() for n, p in model.named_parameters() if "experts" in n and p.dim() == 3)
    assert fused > 0 and coverage["fraction_left_dense"] > 0.4  # most weights of an MoE block are its experts
    assert all("experts." not in name or "shared" in name for name in report.masks)


def test_no_warning_when_every_matrix_of_the_blocks_is_a_target():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = prune_model(tiny_llama(), token_batches(), solver="sparsegpt", uncertainty="baseline", progress=False)
    assert "coverage" not in report.config


def test_the_default_solver_fits_the_model():
    assert default_solver(tiny_llama())[0] == "alps"
    assert default_solver(_gpt2())[0] == "alps"
    assert default_solver(tiny_vit())[0] == "cap"
    report = prune_model(tiny_llama(), token_batches(), sparsity=0.5, uncertainty="baseline", progress=False)
    assert report.config["solver"] == "alps" and "causal language models" in report.config["solver_default"]
    explicit = prune_model(tiny_llama(), token_batches(), sparsity=0.5, solver="sparsegpt", progress=False)
    assert "solver_default" not in explicit.config
    with pytest.raises(ValueError, match="pass solver="):
        prune_model(tiny_llama(), token_batches(), solver_options={"max_iter": 5}, progress=False)
