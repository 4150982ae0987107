"""Structured RobOP (issue 7): maths against brute force, physical surgery, save / load, callback."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import timm
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning import RobOPCallback, prune_layer, prune_model
from robop_lightning.models import DeiTClassifier
from robop_lightning.solvers.structured_obs import compensate, select_groups
from robop_lightning.structured import prune_model_structured
from robop_lightning.surgery import load_structured, save_structured, shrink_vit_block

pytestmark = pytest.mark.usefixtures("one_thread")


def _subset_loss(w, h, cols):
    """Exact loss of removing ``cols`` with the best update of the rest: tr(W_S [(H^-1)_SS]^-1 W_S^T)."""
    hinv = torch.linalg.inv(h)
    ws = w[:, cols]
    return float(torch.trace(ws @ torch.linalg.inv(hinv[cols][:, cols]) @ ws.T))


def _correlated(n_rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, dtype=torch.float64, generator=g) * 0.4 + torch.eye(n, dtype=torch.float64)
    return torch.randn(n_rows, n, dtype=torch.float64, generator=g) @ mix, g


# ----------------------------------------------------------------------------- maths
def test_greedy_is_optimal_for_uncorrelated_inputs():
    # orthogonal input columns: saliencies do not interact, so greedy OBS is the brute-force optimum
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 10, dtype=torch.float64, generator=g))
    x = q * torch.linspace(0.5, 3.0, 10, dtype=torch.float64)
    w = torch.randn(5, 10, dtype=torch.float64, generator=g)
    h = x.T @ x
    r = select_groups(w, x, [[j] for j in range(10)], 4, damping=0.0)
    best = min(itertools.combinations(range(10), 4), key=lambda s: _subset_loss(w, h, list(s)))
    assert sorted(r.removed) == sorted(best)


@pytest.mark.parametrize("seed", range(4))
def test_heads_match_brute_force_and_loss_is_exact(seed):
    x, g = _correlated(300, 12, seed)
    w = torch.randn(6, 12, dtype=torch.float64, generator=g)
    h = x.T @ x
    total = float(torch.trace(w @ h @ w.T))
    heads = [[2 * i, 2 * i + 1] for i in range(6)]  # six "heads" of two columns

    def loss_of(removed):
        return _subset_loss(w, h, [c for i in removed for c in heads[i]])

    optimum = min(loss_of(s) for s in itertools.combinations(range(6), 3))
    greedy = select_groups(w, x, heads, 3, damping=0.0, swap_limit=0)
    assert greedy.nominal_error == pytest.approx(loss_of(greedy.removed) / total, rel=1e-8)  # exact, not estimated
    assert greedy.trajectory[-1] == pytest.approx(loss_of(greedy.removed) / total, rel=1e-8)
    assert optimum - 1e-9 <= loss_of(greedy.removed) <= 1.8 * optimum  # greedy structured OBS: near
    refined = select_groups(w, x, heads, 3, damping=0.0)  # + exact 1-swap local search (few groups)
    assert loss_of(refined.removed) == pytest.approx(optimum, rel=1e-9)
    assert refined.nominal_error == pytest.approx(optimum / total, rel=1e-8)


@pytest.mark.parametrize("with_bias", [False, True])
def test_compensation_equals_lstsq_on_kept_columns(with_bias):
    x, g = _correlated(400, 9, 7)
    x = x + 0.7  # a non-zero input mean: the bias correction has something to do
    w = torch.randn(4, 9, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g) if with_bias else None
    r = select_groups(w, x.view(40, 10, 9), [[j] for j in range(9)], 4, damping=0.0, bias=b)
    keep = r.kept_columns
    xa = torch.cat([x, torch.ones(400, 1, dtype=x.dtype)], 1) if with_bias else x
    wa = torch.cat([w, b[:, None]], 1) if with_bias else w
    cols = torch.cat([keep, torch.tensor([9])]) if with_bias else keep
    ref = torch.linalg.lstsq(xa[:, cols], xa @ wa.T).solution.T
    torch.testing.assert_close(r.weight, ref[:, : keep.numel()], rtol=1e-7, atol=1e-9)
    if with_bias:
        torch.testing.assert_close(r.bias, ref[:, -1], rtol=1e-7, atol=1e-9)
        no_bias = select_groups(w, x.view(40, 10, 9), [[j] for j in range(9)], 4, damping=0.0)
        assert r.nominal_error < no_bias.nominal_error or not torch.equal(r.kept_columns, no_bias.kept_columns)
    # and the public helper agrees
    new, _ = compensate(w, x.T @ x, keep)
    torch.testing.assert_close(new, torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T, rtol=1e-7, atol=1e-9)


def test_uncertainty_sets_and_cvar_alpha_one_is_baseline():
    x, g = _correlated(240, 16, 3)
    w = torch.randn(8, 16, dtype=torch.float64, generator=g)
    inputs = x.view(24, 10, 16)
    groups = [[j] for j in range(16)]
    base = select_groups(w, inputs, groups, 6)
    same = select_groups(w, inputs, groups, 6, uncertainty="cvar", radius=1.0)
    assert sorted(base.removed) == sorted(same.removed)
    torch.testing.assert_close(base.weight, same.weight)
    for name in ("minmax-trace", "minmax-e", "cvar"):
        r = select_groups(w, inputs, groups, 6, uncertainty=name)
        assert r.robust_error >= r.nominal_error > 0
        assert len(r.history) == 4  # nominal solve + 3 alternating rounds
        assert r.weight.shape == (8, 10)
    for name in ("trace", "e", "cte"):  # the authors' sets: one solve on H + D, no alternation
        r = select_groups(w, inputs, groups, 6, uncertainty=name, radius=0.05)
        assert r.robust_error > r.nominal_error > 0
        assert r.history == [] and r.weight.shape == (8, 10)


def test_prune_layer_structured_zeroes_whole_columns():
    x, g = _correlated(128, 16, 5)
    w = torch.randn(8, 16, generator=g)
    r = prune_layer(w, x.float(), sparsity=0.25, pattern="structured", uncertainty="trace")
    assert int((r.mask.sum(0) == 0).sum()) == 4 and bool((r.mask == r.mask[:1]).all())
    assert bool((r.weight[~r.mask] == 0).all()) and r.pattern == "structured"


def test_bad_arguments_name_the_layer_and_fix():
    w, x = torch.randn(4, 6), torch.randn(20, 6)
    with pytest.raises(ValueError, match=r"fc9: remove must be an integer in \[0, 5\]"):
        select_groups(w, x, [[j] for j in range(6)], 6, name="fc9")
    with pytest.raises(ValueError, match="same positive number of columns"):
        select_groups(w, x, [[0], [1, 2]], 1)
    vit = _tiny_vit()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_model_structured(vit, [torch.randn(2, 3, 32, 32)], sparsity=1.2)
    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
    with pytest.raises(ValueError, match=r"0 \(Sequential\) is not a supported block for pattern='structured'"):
        prune_model(mlp, [torch.randn(4, 8)], sparsity=0.5, pattern="structured")
    with pytest.raises(ValueError, match="keep at least one head"):
        shrink_vit_block(vit.blocks[0], keep_heads=[])


# ----------------------------------------------------------------------------- timm surgery
def _tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5
    ).eval()


def test_vit_shrunk_equals_masked_dense_and_counts_parameters():
    dense = _tiny_vit()
    shrunk = copy.deepcopy(dense)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    report = prune_model(shrunk, batches, sparsity=0.5, pattern="structured", uncertainty="cvar")
    rows = {r["name"]: r for r in report.layers}
    masked = copy.deepcopy(dense)
    removed_params = 0
    for i in range(2):
        db, sb, mb = dense.blocks[i], shrunk.blocks[i], masked.blocks[i]
        heads = rows[f"blocks.{i}.attn.proj"]["removed"]
        chans = rows[f"blocks.{i}.mlp.fc2"]["removed"]
        assert len(heads) == 2 and len(chans) == 96 and sb.attn.num_heads == 2
        kept_heads = [h for h in range(4) if h not in heads]
        kept_cols = torch.tensor([h * 12 + d for h in kept_heads for d in range(12)])
        with torch.no_grad():
            mb.attn.proj.weight.zero_()
            mb.attn.proj.weight[:, kept_cols] = sb.attn.proj.weight
            mb.attn.proj.bias.copy_(sb.attn.proj.bias)
            kept_ch = torch.tensor([c for c in range(192) if c not in chans])
            mb.mlp.fc2.weight.zero_()
            mb.mlp.fc2.weight[:, kept_ch] = sb.mlp.fc2.weight
            mb.mlp.fc2.bias.copy_(sb.mlp.fc2.bias)
            # the producers of the shrunk block are exactly the dense rows of the kept heads / channels
            qkv_rows = torch.cat([kept_cols + t * 48 for t in range(3)])
            torch.testing.assert_close(sb.attn.qkv.weight, db.attn.qkv.weight[qkv_rows], rtol=0, atol=0)
            torch.testing.assert_close(sb.mlp.fc1.weight, db.mlp.fc1.weight[kept_ch], rtol=0, atol=0)
        removed_params += 2 * (3 * 12 * 49 + 12 * 48) + 96 * (49 + 48)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(shrunk(x), dense(x), atol=1e-3)  # something was really removed
    n_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in shrunk.parameters()) == n_dense - removed_params
    assert report.totals["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert report.config["params_removed"] == pytest.approx(0.5, abs=1e-9)


def test_global_budget_by_params_and_flops():
    batches = [torch.randn(8, 3, 32, 32)]
    for cost in ("params", "flops"):
        vit = _tiny_vit(1)
        report = prune_model_structured(vit, batches, sparsity=0.4, uncertainty="baseline", budget="global", cost=cost)
        achieved = report.config[f"{cost}_removed"]
        assert 0.4 <= achieved < 0.4 + 0.05  # one group past the target at most
        kept = {r["name"]: r["kept"] for r in report.layers}
        assert all(k >= 1 for k in kept.values())
        vit(torch.randn(1, 3, 32, 32))  # still runs
    assert len({r["sparsity"] for r in report.layers}) > 1  # the global ranking does not split evenly


@pytest.mark.parametrize("heads, sparsity", [(3, 0.5), (3, 0.3), (4, 0.3), (6, 0.7), (4, 0.5)])
def test_layer_budget_hits_each_blocks_share(heads, sparsity):
    """Rounding heads alone over-removes on few-head models (3 heads at 50 %: 2 of 3); the MLP makes up the rest."""
    vit = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16 * heads, depth=2,
                            num_heads=heads, num_classes=3).eval()  # fmt: skip

    def block_params(block):
        return sum(p.numel() for n, p in block.named_parameters() if n.startswith(("attn.qkv", "mlp.fc1")) or
                   n in ("attn.proj.weight", "mlp.fc2.weight"))  # fmt: skip

    before = [block_params(b) for b in vit.blocks]
    report = prune_model_structured(vit, [torch.randn(8, 3, 32, 32)], sparsity=sparsity, uncertainty="baseline")
    channel = 2 * 16 * heads + 1  # one MLP channel: a fc1 row with its bias and a fc2 column
    for b, n0 in zip(vit.blocks, before, strict=True):
        assert abs(n0 - block_params(b) - sparsity * n0) <= channel
        # heads rounded down or up, never further; the fewer removed when both fit
        assert heads - b.attn.num_heads in (math.floor(sparsity * heads), math.ceil(sparsity * heads))
    assert abs(report.config["params_removed"] - sparsity) < 0.01
    if (heads, sparsity) == (3, 0.5):
        assert all(b.attn.num_heads == 2 for b in vit.blocks)


def test_failure_restores_the_model_exactly():
    vit = _tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}

    class Boom(RuntimeError):
        pass

    def explode(module, args):
        if explode.armed:
            raise Boom("calibration broke")

    explode.armed = False
    vit.blocks[1].attn.proj.register_forward_pre_hook(explode)
    calls = []
    vit.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    explode.armed = True
    with pytest.raises(Boom):
        prune_model_structured(vit, [torch.randn(4, 3, 32, 32)], sparsity=0.5, uncertainty="baseline")
    assert vit.blocks[0].attn.num_heads == 4 and vit.blocks[0].mlp.fc1.out_features == 192
    after = vit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(vit.blocks[0], "_robop_structured")


def test_save_load_round_trip_timm(tmp_path):
    vit = _tiny_vit()
    prune_model_structured(vit, [torch.randn(8, 3, 32, 32)], sparsity=0.6, uncertainty="e")
    save_structured(vit, tmp_path)
    again = load_structured(tmp_path, _tiny_vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), vit(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- Llama (GQA)
def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_llama_removes_whole_kv_groups_and_matches_masked_dense(tmp_path):
    dense = _tiny_llama()
    lm = copy.deepcopy(dense)
    batches = [{"input_ids": torch.randint(0, 64, (4, 12))} for _ in range(2)]
    report = prune_model(lm, batches, sparsity=0.5, pattern="structured", uncertainty="trace")
    rows = {r["name"]: r for r in report.layers}
    masked = copy.deepcopy(dense)
    for i in range(2):
        attn, mattn = lm.model.layers[i].self_attn, masked.model.layers[i].self_attn
        (gone,) = rows[f"model.layers.{i}.self_attn.o_proj"]["removed"]
        keep = 1 - gone
        assert attn.num_key_value_heads == 1 and attn.num_heads == 2
        assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
        # the kept KV head and exactly its two query heads (GQA: q heads 2g, 2g+1 read kv head g)
        dattn = dense.model.layers[i].self_attn
        assert torch.equal(attn.k_proj.weight, dattn.k_proj.weight[keep * 8 : keep * 8 + 8])
        assert torch.equal(attn.q_proj.weight, dattn.q_proj.weight[keep * 16 : keep * 16 + 16])
        mlp, mmlp = lm.model.layers[i].mlp, masked.model.layers[i].mlp
        chans = rows[f"model.layers.{i}.mlp.down_proj"]["removed"]
        kept_ch = torch.tensor([c for c in range(64) if c not in chans])
        assert mlp.intermediate_size == 32 == kept_ch.numel()
        with torch.no_grad():
            mattn.o_proj.weight.zero_()
            mattn.o_proj.weight[:, keep * 16 : keep * 16 + 16] = attn.o_proj.weight
            mmlp.down_proj.weight.zero_()
            mmlp.down_proj.weight[:, kept_ch] = mlp.down_proj.weight
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
        out = lm.generate(ids[:, :4], max_new_tokens=5, do_sample=False)  # KV cache with the smaller heads
    assert out.shape == (2, 9)
    save_structured(lm, tmp_path)
    again = load_structured(tmp_path).eval()  # rebuilt from config.json alone
    assert again.model.layers[0].self_attn.k_proj.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Lightning
def _tiny_classifier():
    torch.manual_seed(0)
    return DeiTClassifier(
        "deit_tiny_patch16_224", num_classes=4, img_size=28, in_chans=1, lr=1e-3,
        model_kwargs=dict(patch_size=7, embed_dim=32, depth=2, num_heads=4),
    )


def _trainer(callback, **kw):
    return Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kw,
    )


def test_callback_shrinks_then_fine_tunes_and_checkpoint_loads(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16)
    model = _tiny_classifier()
    dense_params = sum(p.numel() for p in model.parameters())
    robop = RobOPCallback(
        sparsity=0.5, pattern="structured", uncertainty="cvar", calibration_batches=2, verbose=False, progress=False,
        structured_options={"budget": "layer"},
    )
    trainer = _trainer(robop)
    trainer.fit(model, data)
    blk = model.model.blocks[0]
    assert blk.attn.num_heads == 2 and blk.mlp.fc1.out_features == 64
    assert sum(p.numel() for p in model.parameters()) < dense_params
    # the optimizer was rebuilt around the new parameters and really trained them
    opt_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in model.parameters()} <= opt_params
    assert trainer.global_step == 4 and robop.pruned
    assert trainer.optimizers[0].state[blk.attn.proj.weight]["step"] == 4
    path = tmp_path / "shrunk.ckpt"
    trainer.save_checkpoint(path)
    again = DeiTClassifier.load_from_checkpoint(path, map_location="cpu", pretrained=False).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x), rtol=0, atol=0)


def test_callback_validate_shrinks_and_refuses_mid_fit():
    data = DataLoader(TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 4, (32,))), batch_size=16)
    model = _tiny_classifier()
    robop = RobOPCallback(sparsity=0.5, pattern="structured", uncertainty="baseline", calibration_dataloader="val",
                          calibration_batches=1, verbose=False, progress=False)
    _trainer(robop).validate(model, data)
    assert model.model.blocks[1].attn.num_heads == 2
    with pytest.raises(ValueError, match="prune_at='start'"):
        RobOPCallback(pattern="structured", prune_at=1)
    with pytest.raises(ValueError, match="unknown structured_options"):
        RobOPCallback(pattern="structured", structured_options={"budjet": "global"})


# --------------------------------------------------------------------------- the shared block walk (issue 15)
def _tiny_decoder(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def _decoder_batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(2)]


def _snapshot_model(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_structured_pruning_resumes_bit_identically_after_ctrl_c(tmp_path):
    job = dict(sparsity=0.5, uncertainty="trace", budget="layer")
    reference = _tiny_decoder()
    ref_report = prune_model_structured(reference, _decoder_batches(), **job)

    model, resume = _tiny_decoder(), tmp_path / "resume"
    dense = _snapshot_model(model)

    def ctrl_c(module, args):  # Ctrl-C while block 1's MLP is calibrated (its attention already shrunk)
        raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        prune_model_structured(model, _decoder_batches(), resume_dir=resume, **job)
    handle.remove()
    assert _same_state(_snapshot_model(model), dense)  # every shape and weight as it was
    assert model.model.layers[1].self_attn.k_proj.out_features == 16

    report = prune_model_structured(model, _decoder_batches(), resume_dir=resume, **job)
    assert report.resumed == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    assert _same_state(_snapshot_model(model), _snapshot_model(reference))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(report.layers) == strip(ref_report.layers)
    assert report.config["params_removed"] == ref_report.config["params_removed"]
    again = _tiny_decoder()  # a finished directory: everything loaded, nothing recomputed
    calls = []
    again.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    third = prune_model_structured(again, _decoder_batches(), resume_dir=resume, **job)
    assert calls == [] and len(third.resumed) == 6
    assert _same_state(_snapshot_model(again), _snapshot_model(reference))


def test_structured_heldout_errors_are_the_error_on_the_held_out_samples():
    model = _tiny_decoder(layers=2)
    report = prune_model(model, _decoder_batches(), sparsity=0.5, pattern="structured", uncertainty="baseline",
                         heldout_fraction=0.25, targets=["re:down_proj"])
    rows = report.layers
    assert all(r["heldout_error"] is not None and r["heldout_error"] >= 0 for r in rows)
    # recompute layer 0's: the MLP's held-out inputs are the last quarter of the samples (2 of 8)
    dense = _tiny_decoder(layers=2)
    captured = []
    dense.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for b in _decoder_batches():
            dense(**b, use_cache=False)
    x = torch.cat(captured)  # (8, 12, 64)
    held = x[6:].reshape(-1, 64).double()
    mlp = model.model.layers[0].mlp
    kept = sorted(set(range(64)) - set(rows[0]["removed"]))
    w_dense = dense.model.layers[0].mlp.down_proj.weight.detach().double()
    err = held @ w_dense.T - held[:, kept] @ mlp.down_proj.weight.detach().double().T
    expected = float(err.pow(2).sum() / (held @ w_dense.T).pow(2).sum())
    assert rows[0]["heldout_error"] == pytest.approx(expected, rel=1e-4)


def test_structured_activation_budget_keeps_the_result():
    a, b = _tiny_decoder(), _tiny_decoder()
    ra = prune_model_structured(a, _decoder_batches(), sparsity=0.5, uncertainty="trace")
    rb = prune_model_structured(b, _decoder_batches(), sparsity=0.5, uncertainty="trace", activation_budget="4KB")
    assert [r["removed"] for r in ra.layers] == [r["removed"] for r in rb.layers]
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
