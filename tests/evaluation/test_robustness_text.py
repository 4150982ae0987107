"""Corrupted-context evaluation and the embedding-space sensitivity probe on a tiny real Llama."""

from __future__ import annotations

import difflib

import pytest
import torch

from robop_lightning.robustness.text import (
    PROBE_LABEL,
    embedding_pgd,
    embedding_radius,
    evaluate_corruptions,
    evaluate_pgd,
    random_embedding_noise,
    sample_generator,
    substitute_tokens,
    suffix_scores,
    typo_text,
)
from tests.evaluation.test_data_text import char_tokenizer  # noqa: F401 (fixture)
from tests.evaluation.test_models_causal_lm import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The quick brown fox jumps over the lazy dog while several curious onlookers watch "
        "from the riverbank and discuss whether foxes usually behave this way in autumn. ") * 3


def test_substitution_touches_only_the_context_and_is_seeded_per_sample():
    ids = torch.randint(0, 500, (6, 400), generator=torch.Generator().manual_seed(0))
    out = substitute_tokens(ids, 0.1, suffix_len=50, vocab_size=500, seed=3)
    assert torch.equal(out[:, -50:], ids[:, -50:])
    changed = out[:, :-50] != ids[:, :-50]
    assert 0.07 < changed.float().mean() < 0.13
    assert torch.equal(out, substitute_tokens(ids, 0.1, 50, 500, seed=3))
    assert not torch.equal(out, substitute_tokens(ids, 0.1, 50, 500, seed=4))
    # row i depends only on (seed, index i, severity): the same sample gets the same noise in any batch
    assert torch.equal(substitute_tokens(ids[4:5], 0.1, 50, 500, seed=3, indices=[4]), out[4:5])
    bos = int(ids[0, 0])
    protected = substitute_tokens(ids, 1.0, 50, 500, protected=[bos])
    is_bos = ids[:, :-50] == bos
    assert torch.all(protected[:, :-50][is_bos] == bos) and torch.all(protected[:, :-50][~is_bos] != ids[:, :-50][~is_bos])
    with pytest.raises(ValueError):
        substitute_tokens(ids, 0.1, suffix_len=400, vocab_size=500)


def test_typos_are_stronger_at_higher_p_and_deterministic():
    def damage(p: float) -> float:
        ratios = [difflib.SequenceMatcher(None, TEXT, typo_text(TEXT, p, sample_generator(0, i, "typos", p))).ratio()
                  for i in range(8)]
        return 1 - sum(ratios) / len(ratios)

    assert typo_text(TEXT, 0.0, sample_generator(0, 0, "typos", 0.0)) == TEXT
    levels = [damage(p) for p in (0.01, 0.05, 0.2, 0.5)]
    assert all(a < b for a, b in zip(levels, levels[1:])), levels
    once = typo_text(TEXT, 0.2, sample_generator(1, 2, "typos", 0.2))
    assert once == typo_text(TEXT, 0.2, sample_generator(1, 2, "typos", 0.2))
    assert [c for c in once if not c.isalpha()] == [c for c in TEXT if not c.isalpha()]  # only letters change


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny Llama trained for a few steps on TEXT, so that clean suffix accuracy is well above 0."""
    model = tiny_llama(vocab=len(tok), seed=1).train()
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, ids.numel() - 61, (8,), generator=gen)
        batch = torch.stack([ids[s : s + 61] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval().requires_grad_(False)


def test_corruption_tables_keep_the_suffix_clean_and_report_pdr(model, tok):
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])[: 4 * 60].reshape(4, 60)
    rows = evaluate_corruptions(model, ids, suffix_len=16, kind="tokens", severities=(0.05, 0.2))
    assert [r["severity"] for r in rows] == [0.0, 0.05, 0.2]
    nll, correct = suffix_scores(model, ids, 16)
    assert rows[0]["acc"] == pytest.approx(int(correct.sum()) / 64)
    assert rows[0]["pdr"] == 0 and all(r["tokens"] == 64 for r in rows)
    for r in rows:
        assert r["pdr"] == pytest.approx(1 - r["acc"] / rows[0]["acc"])
    typos = evaluate_corruptions(model, ids, suffix_len=16, kind="typos", severities=(0.2,), tokenizer=tok)
    assert typos[0]["ppl"] == pytest.approx(rows[0]["ppl"])
    assert typos == evaluate_corruptions(model, ids, suffix_len=16, kind="typos", severities=(0.2,), tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_corruptions(model, ids, suffix_len=16, kind="typos")


def test_embedding_pgd_stays_in_its_radius_and_beats_clean_and_random_noise(model):
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(5))
    k, eps = 8, 0.25
    radius = embedding_radius(model)
    rows = model.get_input_embeddings().weight.detach().norm(dim=1).mean()
    assert radius == pytest.approx(float(rows), rel=1e-5)
    clean = model.get_input_embeddings()(ids).detach()
    adv = embedding_pgd(model, ids, k, eps, steps=10, seed=0)
    delta = adv - clean
    assert torch.all(delta[:, :-k].norm(dim=-1) <= eps * radius * (1 + 1e-4))
    assert torch.equal(adv[:, -k:], clean[:, -k:])
    noisy = random_embedding_noise(model, ids, k, eps, seed=0)
    assert torch.allclose((noisy - clean)[:, :-k].norm(dim=-1), torch.tensor(eps * radius), rtol=1e-4)
    with torch.no_grad():
        clean_nll, _ = suffix_scores(model, ids, k)
        adv_nll, _ = suffix_scores(model, ids, k, inputs_embeds=adv)
        noise_nll, _ = suffix_scores(model, ids, k, inputs_embeds=noisy)
    assert torch.all(adv_nll > clean_nll) and torch.all(adv_nll > noise_nll)
    assert adv_nll.sum() - clean_nll.sum() > 5 * (noise_nll.sum() - clean_nll.sum()).abs()
    assert torch.equal(adv, embedding_pgd(model, ids, k, eps, steps=10, seed=0))


def test_evaluate_pgd_rows_are_labelled_and_monotone(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(6))
    rows = evaluate_pgd(model, ids, suffix_len=6, eps_values=(0.05, 0.25), steps=5)
    assert all(r["probe"] == PROBE_LABEL == "embedding-space sensitivity probe" for r in rows)
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.25]
    assert rows[0]["ppl"] < rows[1]["ppl"] < rows[2]["ppl"]
    assert rows[2]["ppl"] > rows[2]["noise_ppl"]
