"""robop_lightning.calibration: block capture on real Hugging Face decoders."""

from __future__ import annotations

import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning import prune_model


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


def test_tensor_batches_run_blocks_without_a_kv_cache():
    """A bare ``input_ids`` batch lets the model build a KV cache (``use_cache`` defaults to True).

    Every block runs twice (capture, then propagation); a cache kept in the recorded calls makes the
    second run attend to the first run's keys. Pruning must equal the dict batch with use_cache=False.
    """
    g = torch.Generator().manual_seed(1)
    toks = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(2)]
    a, b = _tiny_llama(), _tiny_llama()
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
    model = _tiny_llama()
    report = prune_model(model, toks, sparsity=0.5, pattern="structured", uncertainty="baseline")
    assert model.model.layers[0].self_attn.k_proj.out_features == 8  # one of two KV groups
    assert model(toks[0]).logits.shape == (4, 12, 64)
    assert len(report.layers) == 4
