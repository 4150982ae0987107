"""The GPU-pipeline issue: each block calibrated with its own arguments, Grams streamed in the hooks,
nothing on disk on the default path, the model's dtype kept, where the time goes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Gemma3TextConfig, Gemma3ForCausalLM

import robop_lightning.pipeline.prune as model_mod
from robop_lightning import LayerInputs, prune_layer
from robop_lightning.engine.gram import GramAccumulator, StatsUnavailable
from robop_lightning.pipeline.prune import prune_model
from tests.engine_helpers import clone_state, tiny_llama, token_batches


# --------------------------------------------------------------------------- the accumulator
def test_accumulator_equals_layer_inputs_grams_folds_and_heldout():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(b, t, 6, generator=g) for b, t in ((3, 5), (4, 5), (2, 3))]  # uneven lengths: zero-padded
    from robop_lightning.pipeline.calibration import _stack

    x = _stack(chunks)  # what the activation path would hold, (9, 5, 6)
    acc = GramAccumulator(6, torch.device("cpu"), folds=4, expected=9, heldout=2)
    for c in chunks:
        acc.add(c)
    stats = acc.finish()
    li, held = LayerInputs(x[:7]), LayerInputs(x[7:])
    torch.testing.assert_close(stats.gram(), li.gram(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.heldout.gram(), held.gram(), rtol=1e-12, atol=1e-12)
    assert (stats.num_samples, stats.num_tokens, stats.tokens_per_sample) == (7, 35, 5)
    for k in range(4):
        torch.testing.assert_close(stats.fold_gram(k, 4), li.fold_gram(k, 4), rtol=1e-12, atol=1e-12)
    with pytest.raises(StatsUnavailable):
        stats.gram(sample_weights=torch.ones(7))
    short = GramAccumulator(6, torch.device("cpu"), expected=10, heldout=2)
    short.add(x)
    with pytest.raises(StatsUnavailable):  # the split was predicted for another count
        short.finish()


def test_two_dimensional_inputs_count_every_row_as_a_sample():
    x = torch.randn(10, 4)
    acc = GramAccumulator(4, torch.device("cpu"), folds=3)
    acc.add(x[:6]); acc.add(x[6:])
    stats, li = acc.finish(), LayerInputs(x)
    assert stats.num_samples == 10 and stats.num_tokens == 10
    for k in range(3):
        torch.testing.assert_close(stats.fold_gram(k, 3), li.fold_gram(k, 3), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- streamed == stored
def _activation_path(monkeypatch):
    """Force the pipeline that stores activations (the one before streaming) for a reference run."""

    def refuse(self, distributed=False):
        raise StatsUnavailable("reference run")

    monkeypatch.setattr(GramAccumulator, "finish", refuse)


_CASES = [
    *[dict(solver=s, uncertainty="trace") for s in ("alps", "cap", "sparsegpt", "wanda", "magnitude")],
    *[dict(solver="sparsegpt", uncertainty=u) for u in ("baseline", "e", "cte")],
    dict(solver="alps", uncertainty="baseline", pattern="2:4", sparsity=None),
    dict(solver="sparsegpt", uncertainty="trace", pattern="row"),
    dict(solver="sparsegpt", uncertainty="auto", auto={"scorer": "sparsegpt", "rows": None}),
    dict(solver="alps", uncertainty="e", radius="auto"),
    dict(solver="sparsegpt", uncertainty="baseline", heldout_fraction=0.25),
]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(str(v) for v in c.values() if not isinstance(v, dict)))
def test_streamed_statistics_give_the_masks_and_weights_of_stored_activations(case, monkeypatch):
    model = tiny_llama(layers=2)
    dense = clone_state(model)
    batches = token_batches(batches=3)
    kwargs = {"sparsity": 0.5, "progress": False, **case}
    streamed = prune_model(model, batches, **kwargs)
    weights = clone_state(model)
    model.load_state_dict(dense)
    with monkeypatch.context() as m:
        _activation_path(m)
        stored = prune_model(model, batches, **kwargs)
    assert [r["name"] for r in streamed.layers] == [r["name"] for r in stored.layers] and streamed.layers
    for name in stored.masks:
        # Grams summed over other chunks: equal up to float64 rounding, so the masks agree
        assert torch.equal(streamed.masks[name], stored.masks[name]), name
        torch.testing.assert_close(weights[name + ".weight"], model.state_dict()[name + ".weight"], rtol=1e-4, atol=1e-5)
    for a, b in zip(streamed.layers, stored.layers):
        assert a["nominal_error"] == pytest.approx(b["nominal_error"], rel=1e-6, abs=1e-12)
        if b["heldout_error"] is not None:
            assert a["heldout_error"] == pytest.approx(b["heldout_error"], rel=1e-6)
        if "selection" in b:
            assert a["selection"]["chosen"] == b["selection"]["chosen"]


def test_the_min_max_extension_keeps_the_activations(monkeypatch):
    used = []
    real = GramAccumulator.add
    monkeypatch.setattr(GramAccumulator, "add", lambda self, x: (used.append(1), real(self, x)))
    prune_model(tiny_llama(), token_batches(), solver="sparsegpt", uncertainty="minmax-trace", progress=False)
    assert not used  # per-sample losses need X: nothing streamed
    prune_model(tiny_llama(), token_batches(), solver="sparsegpt", uncertainty="trace", progress=False)
    assert used


def test_nothing_is_written_to_disk_on_the_default_path(monkeypatch):
    saves = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (saves.append(a[1] if len(a) > 1 else None), real(*a, **k)))
    for solver, unc in (("sparsegpt", "trace"), ("alps", "auto"), ("sparsegpt", "minmax-trace")):
        prune_model(tiny_llama(layers=3), token_batches(), solver=solver, uncertainty=unc, progress=False)
    assert saves == []


def test_report_says_where_the_time_went():
    report = prune_model(tiny_llama(layers=3), token_batches(), solver="sparsegpt", uncertainty="trace",
                         progress=False)
    assert [b["name"] for b in report.blocks] == [f"model.layers.{i}" for i in range(3)]
    for row in report.blocks:
        assert row["capture"] > 0 and row["solve"] > 0 and row["io"] >= 0
        assert row["capture"] + row["solve"] + row["forward"] + row["io"] <= row["seconds"] * 1.01 + 1e-3
    assert report.blocks[-1]["forward"] == 0 and report.blocks[0]["forward"] > 0  # the last block feeds nothing
    assert report.peak_memory["device"] is None and report.peak_memory["host"] is not None
    assert "blocks" in report.to_dict() and "peak_memory" in report.to_dict()


def test_a_bf16_model_is_pruned_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    batches = token_batches()
    ref = tiny_llama()
    report = prune_model(model, batches, solver="sparsegpt", uncertainty="trace", progress=False)
    ref_report = prune_model(ref, batches, solver="sparsegpt", uncertainty="trace", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    w = model.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # bf16 forwards, float64 Grams: the errors are those of the float32 run within bf16's precision
    for a, b in zip(report.layers, ref_report.layers):
        assert a["nominal_error"] == pytest.approx(b["nominal_error"], rel=0.1)


# --------------------------------------------------------------------------- each block's own arguments
def _gemma(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_theta=1_000_000.0, max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return Gemma3ForCausalLM(config).eval()


def _plain_inputs(model: nn.Module, batches, names: list[str]) -> dict[str, torch.Tensor]:
    """The inputs of ``names`` in a plain forward of the model (the truth the walk must reproduce)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().clone())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_each_block_gets_its_own_rotary_encoding_and_mask():
    model = _gemma()
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    batches = token_batches(vocab=64, batches=2)  # 12 tokens, longer than the sliding window of 4
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    truth = _plain_inputs(model, batches, names)
    from robop_lightning.pipeline.walk import BlockWalk
    from robop_lightning.pipeline.calibration import default_forward

    walk = BlockWalk(model, batches, default_forward, torch.device("cpu"), progress=False)
    captured = {}

    class Capture:
        def prune_block(self, walk, name, block):
            target = {n: model.get_submodule(n) for n in names if n.startswith(name + ".")}
            captured.update(walk.capture(block, target))
            return list(target)

    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    with walk.transaction():
        walk.blocks(Capture(), layers, checkpoint=False)
    for n in names:  # o_proj's input is the attention output: it depends on the encoding and the mask
        torch.testing.assert_close(captured[n], truth[n], rtol=1e-5, atol=1e-6)


def test_pruning_only_the_full_attention_layer_uses_its_own_inputs():
    model = _gemma()
    batches = token_batches(vocab=64, batches=2)
    names = [f"model.layers.1.{p}" for p in ("self_attn.o_proj", "mlp.down_proj")]
    truth = _plain_inputs(model, batches, names)
    expected = {n: prune_layer(model.get_submodule(n).weight.detach(), truth[n], sparsity=0.5, solver="sparsegpt",
                               uncertainty="trace").mask for n in names}
    report = prune_model(model, batches, sparsity=0.5, solver="sparsegpt", uncertainty="trace",
                         targets="re:model\\.layers\\.1\\.(self_attn\\.o_proj|mlp\\.down_proj)", progress=False)
    for n in names:
        assert torch.equal(report.masks[n], expected[n]), n


def test_replaying_the_first_blocks_arguments_would_differ():
    """The regression this guards: layer 1 (full attention) calibrated with layer 0's sliding mask."""
    model = _gemma()
    batches = token_batches(vocab=64, batches=2)
    truth = _plain_inputs(model, batches, ["model.layers.1.self_attn.o_proj"])["model.layers.1.self_attn.o_proj"]
    from robop_lightning.pipeline.calibration import BlockCall, capture_block_inputs, run_block

    calls = capture_block_inputs(model, model.model.layers[0], batches, lambda m, b: m(**b, use_cache=False),
                                 torch.device("cpu"), torch.device("cpu"))
    with torch.no_grad():
        run_block(model.model.layers[0], calls, torch.device("cpu"), torch.device("cpu"))
        x = run_block(model.model.layers[1], calls, torch.device("cpu"), torch.device("cpu"),
                      {"o": model.model.layers[1].self_attn.o_proj}, propagate=False)["o"]
    assert not torch.allclose(x, truth, atol=1e-3)
    assert isinstance(calls[0], BlockCall)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_inputs_and_streamed_grams_on_the_device():
    w = torch.randn(64, 128, device="cuda")
    x = torch.randn(16, 8, 128, device="cuda")
    r = prune_layer(w, x, sparsity=0.5, solver="alps", uncertainty="auto")
    assert r.mask.device.type == "cuda" and r.selection is not None
    model = tiny_llama().cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in token_batches()]
    report = prune_model(model, batches, solver="alps", uncertainty="auto", progress=False)
    assert report.peak_memory["device"] > 0 and len(report.blocks) == 2
    cpu = tiny_llama()
    ref = prune_model(cpu, token_batches(), solver="alps", uncertainty="auto", progress=False)
    agree = sum(int((report.masks[n] == ref.masks[n]).sum()) for n in ref.masks) / sum(m.numel() for m in ref.masks.values())
    assert agree > 0.99


class _Checky(nn.Module):
    """Blocks whose forward the model checks (it refuses a block that changes nothing): the
    pass-through recording cannot run, so the first block's arguments are replayed, with a warning."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            y = block(x)
            if torch.equal(y, x):
                raise RuntimeError("a block changed nothing")
            x = y
        return x


def test_a_model_that_refuses_pass_through_blocks_falls_back_with_a_warning():
    torch.manual_seed(0)
    model, ref = _Checky(), None
    ref = copy.deepcopy(model)
    batches = [torch.randn(4, 5, 8) for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="could not record every block's own arguments"):
        report = prune_model(model, batches, solver="sparsegpt", uncertainty="baseline", progress=False)
    # blocks take no other arguments here, so the replay is exact: the result of pruning block by block
    x = torch.cat(batches)
    for i, block in enumerate(ref.blocks):
        expected = prune_layer(block[0].weight.detach(), x, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
        assert torch.equal(report.masks[f"blocks.{i}.0"], expected.mask)
        with torch.no_grad():
            block[0].weight.copy_(expected.weight)
            x = block(x)


# --------------------------------------------------------------------------- shared factorisations
@pytest.mark.parametrize("solver,uncertainty", [("sparsegpt", "baseline"), ("alps", "trace")])
def test_layers_sharing_inputs_factor_their_gram_once(monkeypatch, solver, uncertainty):
    """q / k / v (and gate / up) see the same inputs: their damped Gram is factored once per block
    (4 factorisations for the 7 linears of a Llama block, not 7), with the same results as 7."""
    import importlib

    from robop_lightning.engine import solvers

    calls = []

    def counting(original):
        def counted(*args, **kwargs):
            calls.append(args[0].shape[0])
            return original(*args, **kwargs)
        return counted

    if solver == "sparsegpt":  # the engine's factorisation, which is also its definiteness test
        monkeypatch.setitem(solvers.PREPARE, "sparsegpt", counting(solvers.PREPARE["sparsegpt"]))
    else:
        module = importlib.import_module("robop_lightning.engine.solvers.alps")
        monkeypatch.setattr(module, "_normalised_eigh", counting(module._normalised_eigh))
    batches = token_batches(vocab=128, batches=2)
    kwargs = dict(sparsity=0.5, solver=solver, uncertainty=uncertainty, progress=False,
                  solver_options={"max_iter": 30} if solver == "alps" else None)
    shared = tiny_llama(layers=2)
    prune_model(shared, batches, **kwargs)
    assert len(calls) == 2 * 4, calls
    calls.clear()
    from robop_lightning.engine.gram import GramInputs

    monkeypatch.setattr(GramInputs, "derived", lambda self, key, make: make())  # nothing shared
    alone = tiny_llama(layers=2)
    prune_model(alone, batches, **kwargs)
    assert len(calls) == 2 * 7
    for (name, a), b in zip(shared.state_dict().items(), alone.state_dict().values()):
        assert torch.equal(a, b), name


def test_derived_is_kept_for_the_other_consumers_and_dropped_with_the_last():
    x = torch.randn(4, 3, 5)
    acc = GramAccumulator(5, torch.device("cpu"))
    acc.add(x)
    stats = acc.finish()
    made = []

    def make():
        made.append(1)
        return torch.ones(1)

    assert stats.derived(("u",), make) is not None and len(made) == 1  # one consumer: nothing kept
    assert stats.derived(("u",), make) is not None and len(made) == 2
    stats.consumers = 3
    first = stats.derived(("u",), make)
    assert stats.derived(("u",), make) is first and len(made) == 3
    stats.release()
    stats.release()
    assert stats.derived(("u",), make) is first  # the last consumer still finds it
    stats.release()
    assert stats.derived(("u",), make) is not first and len(made) == 4  # gone with the last one
