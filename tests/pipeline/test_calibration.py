"""robop_lightning.pipeline.calibration: block capture on real Hugging Face decoders, zero padding, batches moved to the model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from robop_lightning import prune_model
from robop_lightning.engine.layer import prune_layer
from tests.engine_helpers import _batches, _net, tiny_llama


def test_tensor_batches_run_blocks_without_a_kv_cache():
    """A bare ``input_ids`` batch lets the model build a KV cache (``use_cache`` defaults to True).

    Every block runs twice (capture, then propagation); a cache kept in the recorded calls makes the
    second run attend to the first run's keys. Pruning must equal the dict batch with use_cache=False.
    """
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(2)]
    a, b = tiny_llama(vocab=64), tiny_llama(vocab=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_model(a, toks, sparsity=0.5, solver="sparsegpt", uncertainty="baseline")
        prune_model(b, [{"input_ids": t, "use_cache": False} for t in toks], sparsity=0.5, solver="sparsegpt",
                    uncertainty="baseline")
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_structured_pruning_of_a_decoder_from_tensor_batches():
    """Structured pruning runs a block once per unit; with a cache the shrunk attention met stale keys."""
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(2)]
    model = tiny_llama(vocab=64)
    report = prune_model(model, toks, sparsity=0.5, pattern="structured", uncertainty="baseline")
    assert model.model.layers[0].self_attn.k_proj.out_features == 8  # one of two KV groups
    assert model(toks[0]).logits.shape == (4, 12, 64)
    assert len(report.layers) == 4


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


@pytest.mark.usefixtures("one_thread")  # as in test_bad_input.py, where it applied to the whole module
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batches_for_a_gpu_model_are_moved():
    model = _net().cuda()
    ref = copy.deepcopy(model).cpu()
    report = prune_model(model, _batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    ref_report = prune_model(ref, _batches(), solver="sparsegpt", uncertainty="cvar", progress=False)
    assert model.fc1.weight.is_cuda and report.masks["fc1"].device.type == "cpu"
    for name, mask in report.masks.items():
        assert (mask != ref_report.masks[name]).float().mean() < 0.05
