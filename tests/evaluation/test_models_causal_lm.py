"""CausalLMModule: perplexity / accuracy against a by-hand computation, names, training, loading."""

from __future__ import annotations

import math
import time

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning.assets import AssetMissingError, is_available
from robop_lightning.data.text import TextDataModule
from robop_lightning.models.causal_lm import CausalLMModule, _warmup_cosine, token_nll
from tests.evaluation.test_data_text import char_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab)
    return LlamaForCausalLM(config).eval()


def _trainer(**kwargs) -> Trainer:
    return Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   accelerator="cpu", **kwargs)


@torch.no_grad()
def _by_hand(model, data: torch.Tensor) -> tuple[float, float]:
    """exp(mean NLL) and accuracy over every next-token of every window, one window at a time, float64."""
    nll, correct, count = 0.0, 0, 0
    for window in data:
        logits = model(input_ids=window[None]).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = window[1:]
        nll -= float(logp.gather(1, targets[:, None]).sum())
        correct += int((logits[:-1].argmax(-1) == targets).sum())
        count += targets.numel()
    return math.exp(nll / count), correct / count


def test_perplexity_is_exp_mean_nll_over_all_tokens_with_uneven_batches():
    model = tiny_llama(vocab=48)
    gen = torch.Generator().manual_seed(0)
    in_domain = torch.randint(0, 48, (7, 20), generator=gen)
    ood = torch.randint(0, 24, (5, 20), generator=gen)  # a different distribution
    module = CausalLMModule(model)
    loaders = [DataLoader(in_domain, batch_size=3), DataLoader(ood, batch_size=2)]  # batches 3,3,1 and 2,2,1
    out = _trainer().test(module, loaders, verbose=False)
    assert set(out[0]) == {"test/ppl", "test/next_token_acc"}
    assert set(out[1]) == {"test/ood/ppl", "test/ood/next_token_acc"}
    for data, result, prefix in ((in_domain, out[0], "test/"), (ood, out[1], "test/ood/")):
        ppl, acc = _by_hand(model, data)
        assert result[prefix + "ppl"] == pytest.approx(ppl, rel=1e-5)
        assert result[prefix + "next_token_acc"] == pytest.approx(acc, abs=1e-6)
    # not the mean of per-batch perplexities
    batch_ppl = [_by_hand(model, b)[0] for b in DataLoader(in_domain, batch_size=3)]
    assert abs(sum(batch_ppl) / len(batch_ppl) - out[0]["test/ppl"]) > 1e-4


def test_dict_batches_do_not_score_padding():
    model = tiny_llama(vocab=40)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    module = CausalLMModule(model, dataloader_names=["padded"])
    out = _trainer().test(module, DataLoader([{"input_ids": ids, "attention_mask": mask}], batch_size=None),
                          verbose=False)[0]
    with torch.no_grad():
        nll0, _, _ = token_nll(model(input_ids=ids[:1]).logits, ids[:1])
        nll1, _, _ = token_nll(model(input_ids=ids[1:, :8]).logits, ids[1:, :8])
    expected = math.exp(float(torch.cat([nll0, nll1]).double().mean()))
    assert out["test/padded/ppl"] == pytest.approx(expected, rel=1e-5)


def test_fit_lowers_validation_perplexity_and_hparams_skip_the_model_object():
    seed_everything(0)
    tok = char_tokenizer()
    dm = TextDataModule("pydoc_topics", ood_corpus=None, tokenizer=tok, seqlen=64, calibration_windows=4,
                        max_eval_windows=8, batch_size=8)
    module = CausalLMModule(tiny_llama(vocab=len(tok)), lr=3e-3, warmup_steps=5, max_steps=40)
    assert "model" not in module.hparams and module.hparams.warmup_steps == 5
    before = _trainer().validate(module, dm, verbose=False)[0]["val/ppl"]
    _trainer(max_steps=40, limit_val_batches=0).fit(module, dm)
    after = _trainer().validate(module, dm, verbose=False)[0]["val/ppl"]
    assert after < 0.6 * before, (before, after)


def test_warmup_cosine_schedule():
    assert _warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert _warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert _warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert _warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert _warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.55)


def test_invalid_arguments_and_missing_embedded_model(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="lr"):
        CausalLMModule(tiny_llama(16), lr=0)
    with pytest.raises(ValueError, match="dataloader_names"):
        CausalLMModule(tiny_llama(16), dataloader_names=["a", "a"])
    with pytest.raises(TypeError):
        CausalLMModule(3)  # type: ignore[arg-type]
    module = CausalLMModule(tiny_llama(16), dataloader_names=[""])
    loaders = [DataLoader(torch.randint(0, 16, (2, 8)), batch_size=2)] * 2
    with pytest.raises(ValueError, match="dataloader_names"):
        _trainer().test(module, loaders, verbose=False)
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError, match="python -m robop_lightning.assets fetch gemma3-270m"):
        CausalLMModule("embedded")


_GEMMA = pytest.mark.skipif(not is_available("gemma3-270m"),
                            reason="gemma3-270m not cached: python -m robop_lightning.assets fetch gemma3-270m")


@_GEMMA
def test_embedded_gemma_loads_from_the_cache():
    start = time.perf_counter()
    module = CausalLMModule("embedded")
    assert time.perf_counter() - start < 60
    assert module.hparams.model == "embedded"
    config = module.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "gemma3_text", 18, 640, 262144)
    assert sum(p.numel() for p in module.model.parameters()) == pytest.approx(268e6, rel=0.01)
    assert not hasattr(config, "quantization_config")


@_GEMMA
@pytest.mark.slow
@pytest.mark.skipif(not (is_available("shakespeare") and is_available("brown")), reason="shakespeare / brown not cached")
def test_embedded_gemma_on_held_out_shakespeare_and_brown():
    dm = TextDataModule("shakespeare", ood_corpus="brown", tokenizer="embedded", seqlen=128, calibration_windows=8,
                        max_eval_windows=4, batch_size=4)
    module = CausalLMModule("embedded")
    out = _trainer().test(module, dm, verbose=False)
    in_domain, ood = out[0]["test/ppl"], out[1]["test/ood/ppl"]
    assert 5 < in_domain < 300 and 5 < ood < 300, (in_domain, ood)
    assert 0.1 < out[0]["test/next_token_acc"] < 0.8
