"""RobOP-CAP with CAP's empirical block Fisher: the maths against independent computations, then end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from robop_lightning import prune_model
from robop_lightning.pipeline.fisher_step import FisherOptions, prune_model_fisher
from robop_lightning.pipeline.gradients import per_sample_gradients
from robop_lightning.engine.patterns import parse_pattern
from robop_lightning.engine.solvers.fisher_obs import (
    block_grams,
    default_block_size,
    eliminate_blocks,
    replay_blocks,
    select_counts,
    set_block_inverse,
    woodbury_block_inverse,
)
from robop_lightning.engine.sets import closed_form_damping

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, dtype=torch.float64, generator=g) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)


@pytest.mark.parametrize("m", [3, 40])
def test_woodbury_inverse_equals_the_direct_inverse(m):
    """CAP's m rank-one updates give (lam I + (1/m) sum g g^T)^-1, block by block (m < B too)."""
    grads, cols, size, lam = _grads(m, 24), 12, 6, 1e-2
    finv = woodbury_block_inverse(grads, cols, size, lam)
    assert finv.shape == (4, 6, 6)
    for b in range(4):
        g = grads[:, b * size : (b + 1) * size]
        direct = torch.linalg.inv(lam * torch.eye(size, dtype=torch.float64) + g.T @ g / m)
        torch.testing.assert_close(finv[b], direct, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name, gamma", [("baseline", None), ("trace", 0.05), ("e", 0.5), ("cte", 2.0)])
def test_the_sets_on_the_fisher_blocks(name, gamma):
    """F_b = (H_b + D_b) / m with D_b the authors' closed form of the block's summed Fisher (N = m);
    Baseline is CAP's damping, bit for bit the Woodbury construction up to rounding."""
    m, lam = 30, 1e-3
    grads = _grads(m, 16, 1)
    h = block_grams(grads, 8, 4)
    finv = set_block_inverse(h, m, lam, name, gamma)
    for b in range(h.shape[0]):
        if name == "baseline":
            eff = h[b] + m * lam * torch.eye(4, dtype=torch.float64)
        elif name == "cte":  # absolute on the averaged Fisher: gamma there is m gamma on the summed one
            eff = h[b] + m * gamma * torch.eye(4, dtype=torch.float64)
        else:
            ridge, matrix = closed_form_damping(name, h[b], m, gamma)
            eff = h[b] + ridge * torch.eye(4, dtype=torch.float64) + (0 if matrix is None else matrix)
        torch.testing.assert_close(finv[b], m * torch.linalg.inv(eff), rtol=1e-7, atol=1e-9)
    if name == "baseline":
        torch.testing.assert_close(finv, woodbury_block_inverse(grads, 8, 4, lam), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gamma", [1e-4, 0.3])
def test_cte_on_the_fisher_is_an_absolute_ridge_on_caps_averaged_fisher(gamma):
    """CTE is the authors' absolute ridge on the curvature the solver uses, here CAP's averaged Fisher:
    F = H/m + gamma I built by hand from the gradients (gamma below CAP's lam: lam, the Baseline)."""
    m, lam = 25, 1e-3
    grads = _grads(m, 16, 2)
    finv = set_block_inverse(block_grams(grads, 8, 4), m, lam, "cte", gamma)
    eye = torch.eye(4, dtype=torch.float64)
    for b in range(4):
        g = grads[:, b * 4 : (b + 1) * 4]
        fisher = g.T @ g / m  # CAP's averaged empirical Fisher of the block
        direct = torch.linalg.inv(fisher + max(gamma, lam) * eye)
        torch.testing.assert_close(finv[b], direct, rtol=1e-9, atol=1e-12)
    if gamma < lam:
        torch.testing.assert_close(finv, woodbury_block_inverse(grads, 8, 4, lam), rtol=1e-7, atol=1e-9)
    # gamma keeps its meaning whatever m: every gradient twice (m doubles, the same averaged Fisher)
    twice = torch.cat([grads, grads])
    torch.testing.assert_close(set_block_inverse(block_grams(twice, 8, 4), 2 * m, lam, "cte", gamma), finv,
                               rtol=1e-9, atol=1e-12)


def _refit_loss(w, f, removed):
    """min over v with v[removed] = 0 of (v - w)^T F (v - w): the exact OBS loss of a removed set."""
    if not removed:
        return 0.0, w.clone()
    r = list(removed)
    # the optimal update: v = w - F^-1[:, R] (F^-1[R, R])^-1 w_R
    finv = torch.linalg.inv(f)
    delta = finv[:, r] @ torch.linalg.solve(finv[r][:, r], w[r])
    v = w - delta
    v[r] = 0
    return float(w[r] @ torch.linalg.solve(finv[r][:, r], w[r])), v


@pytest.mark.parametrize("seed", range(3))
def test_block_elimination_equals_brute_force_greedy_obs(seed):
    """Each step removes the weight whose exact (refit) loss increase is smallest, and the weights
    after t steps are the exact least-squares refit of the survivors (brute force over candidates)."""
    g = torch.Generator().manual_seed(seed)
    size = 6
    x = torch.randn(20, size, dtype=torch.float64, generator=g)
    f = x.T @ x / 20 + 0.1 * torch.eye(size, dtype=torch.float64)
    w = torch.randn(size, dtype=torch.float64, generator=g)
    finv = torch.linalg.inv(f)[None]
    order, cum = eliminate_blocks(w[None], finv)
    removed: list[int] = []
    for t in range(size - 1):
        losses = {q: _refit_loss(w, f, removed + [q])[0] for q in range(size) if q not in removed}
        best = min(losses, key=losses.get)
        assert int(order[0, t]) == best
        removed.append(best)
        out, kept = replay_blocks(w[None], finv, order, torch.tensor([t + 1]))
        torch.testing.assert_close(out[0], _refit_loss(w, f, removed)[1], rtol=1e-8, atol=1e-10)
        assert set(torch.nonzero(~kept[0]).flatten().tolist()) == set(removed)
        # CAP's score of the step: the block's cumulative loss, the exact OBS loss of the prefix
        assert float(cum[0, t]) == pytest.approx(_refit_loss(w, f, removed)[0], rel=1e-9)
    assert bool((cum[0, 1:] >= cum[0, :-1]).all())


def _greedy_block_losses(w, f):
    """Direct computation of CAP's per-block record: greedy OBS order and, after each removal, the
    cumulative loss (sum of the step losses w_q^2 / [F^-1]_qq with F^-1 down-dated by hand)."""
    w, finv = w.clone(), torch.linalg.inv(f)
    alive, total, cum = list(range(len(w))), 0.0, []
    while alive:
        q = min(alive, key=lambda j: float(w[j] ** 2 / finv[j, j]))
        total += float(w[q] ** 2 / finv[q, q])
        cum.append(total)
        w = w - finv[:, q] * (w[q] / finv[q, q])
        finv = finv - torch.outer(finv[:, q], finv[q, :]) / finv[q, q]
        alive.remove(q)
    return cum


def test_global_selection_thresholds_cumulative_block_losses_across_layers():
    """CAP's rule: one threshold over every block's cumulative loss, across layers; a block loses as
    many weights as it has cumulative losses at or below it (CAPHandle.get_pruning_database)."""
    g = torch.Generator().manual_seed(3)
    size, layers = 6, []
    for nb in (3, 4):
        x = torch.randn(nb, 30, size, dtype=torch.float64, generator=g) * torch.rand(nb, 1, size, generator=g,
                                                                                      dtype=torch.float64)
        f = x.transpose(1, 2) @ x / 30 + 0.05 * torch.eye(size, dtype=torch.float64)
        w = torch.randn(nb, size, dtype=torch.float64, generator=g) * torch.rand(nb, 1, generator=g, dtype=torch.float64)
        layers.append((w, f))
    direct = [torch.tensor([_greedy_block_losses(w[b], f[b]) for b in range(len(w))], dtype=torch.float64)
              for w, f in layers]
    cums = [eliminate_blocks(w, torch.linalg.inv(f))[1] for w, f in layers]
    for c, d in zip(cums, direct):
        torch.testing.assert_close(c, d, rtol=1e-9, atol=1e-12)
    everything = torch.cat([d.reshape(-1) for d in direct]).sort().values
    differs = False
    for total in (5, 17, 30):
        counts = select_counts(cums, total, "global")
        threshold = everything[total - 1]
        assert [k.tolist() for k in counts] == [(d <= threshold).sum(1).tolist() for d in direct]
        maxed = select_counts([torch.cummax(_steps(d), 1).values for d in direct], total, "global")
        differs |= any(not torch.equal(a, b) for a, b in zip(counts, maxed))
    assert differs  # the running maximum of the step losses (the former rule) chooses otherwise here


def _steps(cum):
    return torch.diff(cum, dim=1, prepend=torch.zeros(cum.shape[0], 1, dtype=cum.dtype))


def test_cumulative_losses_start_after_forced_removals():
    w = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    finv = torch.linalg.inv(x.T @ x / 40 + 0.1 * torch.eye(6, dtype=torch.float64)).expand(2, 6, 6).contiguous()
    prior = torch.zeros(2, 6, dtype=torch.bool)
    prior[0, [1, 4]] = True
    order, cum = eliminate_blocks(w, finv, prior=prior)
    assert set(order[0, :2].tolist()) == {1, 4} and bool(torch.isneginf(cum[0, :2]).all())
    assert bool(torch.isfinite(cum[0, 2:]).all()) and bool((cum[0, 3:] >= cum[0, 2:-1]).all())
    # after the forced removals the sum restarts: the first free step's score is its own loss
    _, alone = eliminate_blocks(w[1:], finv[1:])
    assert float(cum[1, 0]) == float(alone[0, 0])


def test_nm_elimination_removes_exactly_m_minus_n_per_group():
    w = torch.randn(5, 8, dtype=torch.float64)
    x = torch.randn(40, 8, dtype=torch.float64)
    finv = torch.linalg.inv(x.T @ x / 40 + 0.01 * torch.eye(8, dtype=torch.float64)).expand(5, 8, 8).contiguous()
    pat = parse_pattern("2:4", None)
    order, cum = eliminate_blocks(w, finv, pat)
    assert order.shape == (5, 4)
    out, kept = replay_blocks(w, finv, order, torch.full((5,), 4))
    assert (kept.view(5, 2, 4).sum(-1) == 2).all()
    assert bool((out[~kept] == 0).all())


def test_global_threshold_removes_exactly_the_requested_total():
    g = torch.Generator().manual_seed(0)
    cums = [torch.cummax(torch.rand(n, 8, generator=g, dtype=torch.float64), 1).values for n in (3, 5, 2)]
    for total in (0, 1, 37, 80):
        counts = select_counts(cums, total, "global")
        assert sum(int(c.sum()) for c in counts) == total
        # what is removed is the `total` smallest recorded losses (prefixes, since each row is sorted)
        chosen = sorted(float(c[b, s]) for c, k in zip(cums, counts) for b in range(len(k)) for s in range(int(k[b])))
        everything = sorted(torch.cat([c.reshape(-1) for c in cums]).tolist())
        assert chosen == everything[:total]
    uniform = select_counts(cums, [10, 20, 4], "uniform")
    assert [int(c.sum()) for c in uniform] == [10, 20, 4]
    with pytest.raises(ValueError, match="cannot remove 81 weights"):
        select_counts(cums, 81)
    with pytest.raises(ValueError, match="selection must be one of"):
        select_counts(cums, 3, "per-row")


def test_default_block_size_divides_the_row():
    assert default_block_size(96) == 96 and default_block_size(384) == 128 and default_block_size(768, 192) == 192
    assert all(cols % default_block_size(cols) == 0 for cols in (17, 100, 250, 1000))


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, mlp_ratio=2.0).eval()


def _vit_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_vmap_gradients_equal_a_loop_on_a_timm_vit():
    vit = _vit()
    names = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"]
    batch = _images(5)
    fast = per_sample_gradients(vit, names, batch, _vit_loss, method="vmap")
    slow = per_sample_gradients(vit, names, batch, _vit_loss, method="loop")
    for n in names:
        assert fast[n].shape == (5, *vit.get_submodule(n[: -len(".weight")]).weight.shape)
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-6)
    # and each equals the gradient of that one sample's loss
    vit.zero_grad()
    _vit_loss(vit, (batch[0][2:3], batch[1][2:3])).sum().backward()
    torch.testing.assert_close(fast[names[0]][2], vit.blocks[0].attn.qkv.weight.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one loss per sample"):
        per_sample_gradients(vit, names, batch, lambda m, b: _vit_loss(m, b).mean(), method="vmap")


@pytest.mark.parametrize("selection", ["global", "uniform"])
def test_prune_model_fisher_on_a_vit(selection):
    vit = _vit()
    data = [_images(16, s) for s in range(2)]
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    report = prune_model(vit, data, sparsity=0.6, solver="cap", uncertainty="baseline", curvature="fisher",
                         loss_fn=_vit_loss, fisher={"gradients": 24, "batch_size": 8, "selection": selection})
    assert report.config["curvature"] == "fisher" and report.config["gradients_used"] == 24
    total = sum(r["parameters"] for r in report.layers)
    zeros = sum(int((~report.masks[r["name"]]).sum()) for r in report.layers)
    assert zeros == round(0.6 * total) if selection == "global" else abs(zeros - 0.6 * total) <= len(report.layers)
    layer_sparsity = [r["sparsity"] for r in report.layers]
    if selection == "uniform":
        assert all(abs(s - 0.6) < 0.01 for s in layer_sparsity)
    else:  # one threshold: layers end at different sparsities
        assert max(layer_sparsity) - min(layer_sparsity) > 0.02
    for r in report.layers:
        w = vit.get_submodule(r["name"]).weight
        assert bool((w[~report.masks[r["name"]]] == 0).all())
        assert 0 < r["nominal_error"] < 1
    # only the targets changed
    for n, p in vit.named_parameters():
        if not any(n == f"{r['name']}.weight" for r in report.layers):
            assert torch.equal(p, before[n])


def test_a_robust_set_on_the_fisher_changes_the_result_and_huge_trace_is_magnitude_like():
    data = [_images(16)]
    opts = {"gradients": 16, "selection": "uniform"}
    base, robust = _vit(), _vit()
    prune_model_fisher(base, data, _vit_loss, sparsity=0.5, uncertainty="baseline", fisher=opts)
    prune_model_fisher(robust, data, _vit_loss, sparsity=0.5, uncertainty="trace", radius=1e8, fisher=opts)
    w0 = _vit().blocks[0].mlp.fc1.weight
    kept = robust.blocks[0].mlp.fc1.weight != 0
    # a huge ridge makes F_b ~ c I: OBS removes by magnitude and barely updates the survivors
    assert not torch.equal(base.blocks[0].mlp.fc1.weight, robust.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(robust.blocks[0].mlp.fc1.weight[kept], w0[kept], rtol=1e-4, atol=1e-5)


def test_fisher_arguments_are_checked():
    vit, data = _vit(), [_images(8)]
    with pytest.raises(ValueError, match="use solver='cap'"):
        prune_model(vit, data, solver="alps", curvature="fisher", loss_fn=_vit_loss)
    with pytest.raises(ValueError, match="heldout_fraction"):
        prune_model(vit, data, solver="cap", curvature="fisher", loss_fn=_vit_loss, heldout_fraction=0.2)
    with pytest.raises(ValueError, match="needs loss_fn"):
        prune_model(vit, data, solver="cap", curvature="fisher")
    with pytest.raises(ValueError, match="curvature must be"):
        prune_model(vit, data, curvature="hessian")
    with pytest.raises(ValueError, match="apply to curvature='fisher' only"):
        prune_model(vit, data, loss_fn=_vit_loss, curvature="gram")
    with pytest.raises(ValueError, match="valid keys are gradients"):
        FisherOptions.coerce({"m": 4})
    with pytest.raises(ValueError, match="authors' sets"):
        prune_model_fisher(vit, data, _vit_loss, uncertainty="cvar")
    with pytest.raises(ValueError, match="must divide"):
        prune_model_fisher(vit, data, _vit_loss, fisher={"block_size": 7})


def test_callback_prunes_with_the_modules_own_loss_and_holds_the_zeros(tmp_path):
    timm = pytest.importorskip("timm")
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from robop_lightning import RobOPCallback
    from robop_lightning.models import DeiTClassifier

    model = DeiTClassifier("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=16,
                           model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
    assert timm is not None
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.rand(48, 3, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g)),
                      batch_size=16)
    robop = RobOPCallback(sparsity=0.5, solver="cap", uncertainty="trace",  # curvature=None: Fisher, the loss is known
                          fisher={"gradients": 32, "batch_size": 16}, verbose=False, progress=False)
    trainer = Trainer(max_epochs=1, callbacks=[robop], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    report = robop.reports[-1]
    assert report.config["curvature"] == "fisher" and report.config["uncertainty"] == "trace"
    assert "known loss" in report.config["curvature_default"]
    assert report.totals["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for name, mask in robop.masks.to_dict().items():  # zeros held through fine-tuning
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())
    with pytest.raises(ValueError, match="does not take: schedule"):
        RobOPCallback(solver="cap", curvature="fisher", schedule={0: 0.3, 1: 0.5})

    class NoLoss(DeiTClassifier):
        task_loss = per_sample_loss = None

    bare = NoLoss("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=16,
                  model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
    trainer = Trainer(max_epochs=1, callbacks=[RobOPCallback(solver="cap", curvature="fisher", verbose=False,
                                                             progress=False)],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    with pytest.raises(Exception, match="per_sample_loss"):
        trainer.fit(bare, data)


def test_brute_force_helper_is_exact_on_a_diagonal_fisher():
    """Sanity of the test's own reference: with a diagonal F the loss of removing q is F_qq w_q^2."""
    f = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    w = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    for q in range(3):
        assert _refit_loss(w, f, [q])[0] == pytest.approx(float(f[q, q] * w[q] ** 2))


def test_prune_model_fisher_equals_the_steps_done_by_hand():
    """Gradients -> block Grams -> set inverse -> elimination -> global threshold -> replay, composed
    here from the pure functions, give exactly the weights prune_model_fisher writes."""
    vit, data = _vit(), [_images(12, 3)]
    reference = _vit()
    names = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    pieces = {}
    for n in names:
        w = reference.get_submodule(n).weight.detach()
        g = per_sample_gradients(reference, [f"{n}.weight"], data[0], _vit_loss)[f"{n}.weight"]
        h = block_grams(g.reshape(12, -1), w.shape[1], 32)
        finv = set_block_inverse(h, 12, 1e-8, "trace", 0.02)
        wb = w.double().reshape(-1, 32)
        order, cum = eliminate_blocks(wb, finv)
        pieces[n] = (wb, finv, order, cum)
    total = sum(p[0].numel() for p in pieces.values())
    counts = select_counts([p[3] for p in pieces.values()], total - round(0.4 * total))
    prune_model_fisher(vit, data, _vit_loss, sparsity=0.6, uncertainty="trace", radius=0.02,
                       fisher={"gradients": 12, "block_size": 32})
    for (n, (wb, finv, order, _)), count in zip(pieces.items(), counts):
        out, _ = replay_blocks(wb, finv, order, count)
        assert torch.equal(vit.get_submodule(n).weight, out.reshape(vit.get_submodule(n).weight.shape).float()), n


def test_fisher_path_resumes_bit_identically_after_an_interruption(tmp_path):
    """On the shared BlockWalk the Fisher path checkpoints each layer of both passes; a run stopped
    in the replay pass continues from resume_dir and ends exactly where an uninterrupted run does."""
    data = [_images(16, s) for s in range(2)]
    opts = {"gradients": 24, "batch_size": 8}
    reference = _vit()
    ref = prune_model(reference, data, sparsity=0.6, solver="cap", uncertainty="trace", curvature="fisher",
                      loss_fn=_vit_loss, fisher=opts)
    calls = {"n": 0}
    total_layers = len(ref.layers)
    counted = {"n": 0}

    def counting_loss(model, batch):
        counted["n"] += 1
        return _vit_loss(model, batch)

    prune_model(_vit(), data, sparsity=0.6, solver="cap", uncertainty="trace", curvature="fisher",
                loss_fn=counting_loss, fisher=opts)
    per_pass = counted["n"] // 2

    def flaky_loss(model, batch):  # stop at the second replayed layer (pass 1 makes as many calls as pass 2)
        calls["n"] += 1
        if calls["n"] == per_pass + per_pass // total_layers + 1:
            raise KeyboardInterrupt
        return _vit_loss(model, batch)

    vit = _vit()
    before = {n: p.detach().clone() for n, p in vit.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        prune_model(vit, data, sparsity=0.6, solver="cap", uncertainty="trace", curvature="fisher",
                    loss_fn=flaky_loss, fisher=opts, resume_dir=tmp_path / "resume")
    assert all(torch.equal(p, before[n]) for n, p in vit.state_dict().items())  # the undo ran
    report = prune_model(vit, data, sparsity=0.6, solver="cap", uncertainty="trace", curvature="fisher",
                         loss_fn=_vit_loss, fisher=opts, resume_dir=tmp_path / "resume")
    assert len(report.resumed) == 1  # the first replayed layer came from disk
    for (n, p), q in zip(vit.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), n
    assert [r["nominal_error"] for r in report.layers] == [r["nominal_error"] for r in ref.layers]


def test_fisher_path_refuses_a_weight_shared_between_targets():
    vit = _vit()
    vit.blocks[1].mlp.fc1.weight = vit.blocks[0].mlp.fc1.weight
    with pytest.raises(ValueError, match="same tensor"):
        prune_model_fisher(vit, [_images(8)], _vit_loss, sparsity=0.5, fisher={"gradients": 8})


def test_curvature_none_is_fishers_where_the_loss_is_known_and_the_gram_path_otherwise():
    data = [_images(16)]
    opts = {"gradients": 16}
    report = prune_model(_vit(), data, sparsity=0.5, solver="cap", loss_fn=_vit_loss, fisher=opts)
    assert report.config["curvature"] == "fisher" and "known loss" in report.config["curvature_default"]
    explicit = _vit()
    prune_model(explicit, data, sparsity=0.5, solver="cap", loss_fn=_vit_loss, fisher=opts, curvature="fisher")
    chosen = _vit()
    prune_model(chosen, data, sparsity=0.5, solver="cap", loss_fn=_vit_loss, fisher=opts)
    assert all(torch.equal(a, b) for a, b in zip(explicit.state_dict().values(), chosen.state_dict().values()))
    label_free = prune_model(_vit(), data, sparsity=0.5, solver="cap")
    assert label_free.config["curvature"] == "gram" and "label-free" in label_free.config["curvature_default"]
    held = prune_model(_vit(), data, sparsity=0.5, solver="cap", loss_fn=_vit_loss, heldout_fraction=0.25)
    assert held.config["curvature"] == "gram" and "heldout_fraction" in held.config["curvature_default"]
    other = prune_model(_vit(), data, sparsity=0.5, solver="sparsegpt", loss_fn=_vit_loss)
    assert other.config["curvature"] == "gram"
    with pytest.raises(ValueError, match="apply to curvature='fisher' only"):
        prune_model(_vit(), data, sparsity=0.5, solver="cap", loss_fn=_vit_loss, curvature="gram")


def test_mini_batch_gradients_build_caps_fisher_from_one_backward_each():
    """grad_batch=k: each gradient is that of the mean loss over k samples (mini-batches cut across
    batch boundaries); the weights equal the steps done by hand from plain autograd gradients."""
    vit, reference = _vit(), _vit()
    images, labels = _images(13, 4)
    data = [(images[:5], labels[:5]), (images[5:], labels[5:])]  # 13 samples: 3 mini-batches of 4, 1 left out
    names = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    pieces = {}
    for n in names:
        w = reference.get_submodule(n).weight
        grads = []
        for k in range(3):
            reference.zero_grad()
            _vit_loss(reference, (images[4 * k: 4 * k + 4], labels[4 * k: 4 * k + 4])).mean().backward()
            grads.append(w.grad.detach().reshape(-1).clone())
        g = torch.stack(grads)
        h = block_grams(g, w.shape[1], 32)
        finv = set_block_inverse(h, 3, 1e-8, "baseline", None)
        wb = w.detach().double().reshape(-1, 32)
        order, cum = eliminate_blocks(wb, finv)
        pieces[n] = (wb, finv, order, cum)
    total = sum(p[0].numel() for p in pieces.values())
    counts = select_counts([p[3] for p in pieces.values()], total - round(0.5 * total))
    report = prune_model_fisher(vit, data, _vit_loss, sparsity=0.5, uncertainty="baseline",
                                fisher={"grad_batch": 4, "block_size": 32})
    assert report.config["gradients_used"] == 3 and report.config["samples_used"] == 12
    for (n, (wb, finv, order, _)), count in zip(pieces.items(), counts):
        out, _ = replay_blocks(wb, finv, order, count)
        torch.testing.assert_close(vit.get_submodule(n).weight, out.reshape(vit.get_submodule(n).weight.shape).float(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fewer than grad_batch=32"):
        prune_model_fisher(_vit(), data, _vit_loss, fisher={"grad_batch": 32})


def test_cte_warns_when_its_absolute_ridge_outweighs_the_fisher():
    """CTE adds gamma I to CAP's averaged Fisher: a gamma far above the Fisher's scale is warned about
    (with the ratio in the report); one on its scale is not."""
    data = [_images(16)]
    reference = _vit()
    g = per_sample_gradients(reference, ["blocks.0.attn.qkv.weight"], data[0], _vit_loss)["blocks.0.attn.qkv.weight"]
    scale = float(g.double().pow(2).mean(0).mean())  # the averaged Fisher's mean diagonal of one layer
    with pytest.warns(RuntimeWarning, match="outweighs the curvature"):
        report = prune_model_fisher(_vit(), data, _vit_loss, sparsity=0.5, uncertainty="cte", radius=1e6 * scale,
                                    fisher={"gradients": 16})
    assert report.config["cte_ridge_over_fisher"] > 10
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quiet = prune_model_fisher(_vit(), data, _vit_loss, sparsity=0.5, uncertainty="cte", radius=1e-3 * scale,
                                   fisher={"gradients": 16})
    assert "cte_ridge_over_fisher" not in quiet.config
