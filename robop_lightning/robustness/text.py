"""Corrupted and adversarial language-model evaluation (``docs/evaluation.md``, Language).

Each window of ``T`` tokens is split into a **context** (the first ``T - K`` tokens) and a scored
**suffix** (the last ``K``, always clean targets). Only the context is perturbed:

* :func:`substitute_tokens`: every context token replaced by a different uniformly drawn token
  with probability ``p`` (severities ``p in {.01, .02, .05, .1, .2}``);
* :func:`typo_text`: character typos on the decoded context text, each word hit with probability
  ``p`` by one of swap / delete / insert / keyboard neighbour; the typo'd text is re-tokenized;
* :func:`embedding_pgd`: the **embedding-space sensitivity probe** -- L2 PGD on the context's
  ``inputs_embeds`` with a per-token radius ``eps * mean embedding-row norm``, maximising the
  suffix cross-entropy (it is not realizable text).

Dense and pruned models see identical inputs: every random draw is seeded per sample from
``(seed, sample index, corruption, severity)`` (:func:`sample_generator`). Functions take a Hugging
Face causal LM and tensors; nothing here imports Lightning.
"""

from __future__ import annotations

import hashlib
import math
import string
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PROBE_LABEL",
    "SEVERITIES",
    "PGD_EPS",
    "embedding_pgd",
    "embedding_radius",
    "evaluate_corruptions",
    "evaluate_pgd",
    "random_embedding_noise",
    "sample_generator",
    "substitute_tokens",
    "suffix_scores",
    "typo_text",
]

SEVERITIES = (0.01, 0.02, 0.05, 0.1, 0.2)
PGD_EPS = (0.05, 0.1, 0.25)
PROBE_LABEL = "embedding-space sensitivity probe"

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_KEYBOARD: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        _near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        _near += [_ROWS[r][j] for r in (_r - 1, _r + 1) if 0 <= r < 3 for j in (_c - 1, _c, _c + 1)
                  if 0 <= j < len(_ROWS[r])]
        _KEYBOARD[_ch] = "".join(_near)


def sample_generator(seed: int, index: int, corruption: str, severity: float) -> torch.Generator:
    """A CPU generator seeded from ``(seed, index, corruption, severity)`` (stable across runs).

    Example:
        >>> a = torch.rand(2, generator=sample_generator(0, 3, "tokens", 0.1))
        >>> torch.equal(a, torch.rand(2, generator=sample_generator(0, 3, "tokens", 0.1)))
        True
    """
    key = f"{seed}:{index}:{corruption}:{severity!r}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def _indices(n: int, indices: Sequence[int] | None) -> list[int]:
    out = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(out) != n:
        raise ValueError(f"{n} samples but {len(out)} indices")
    return out


def substitute_tokens(
    input_ids: torch.Tensor,
    p: float,
    suffix_len: int,
    vocab_size: int,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    protected: Sequence[int] = (),
) -> torch.Tensor:
    """Replace each context token, with probability ``p``, by a different uniformly drawn token.

    Args:
        input_ids: ``(N, T)`` windows.
        p: substitution probability per context token.
        suffix_len: ``K``, the scored suffix that is never touched.
        vocab_size: replacements are drawn from ``[0, vocab_size)``, never equal to the original.
        seed: global seed.
        indices: dataset index of every row (seeds the row's draw), default ``0..N-1``.
        protected: token ids never replaced (a BOS, for instance).

    Raises:
        ValueError: ``p`` outside [0, 1] or ``suffix_len`` not in ``[1, T)``.

    Example:
        >>> ids = torch.arange(20).reshape(2, 10)
        >>> out = substitute_tokens(ids, 0.5, suffix_len=4, vocab_size=100)
        >>> torch.equal(out[:, -4:], ids[:, -4:])
        True
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    n, t = input_ids.shape
    if not 1 <= suffix_len < t:
        raise ValueError(f"suffix_len must be in [1, {t}), got {suffix_len}")
    ctx = t - suffix_len
    out = input_ids.clone()
    keep = torch.tensor(list(protected), dtype=input_ids.dtype)
    for row, index in enumerate(_indices(n, indices)):
        g = sample_generator(seed, index, "tokens", p)
        hit = torch.rand(ctx, generator=g) < p
        offset = torch.randint(1, vocab_size, (ctx,), generator=g)
        original = input_ids[row, :ctx].cpu()
        if keep.numel():
            hit &= ~torch.isin(original, keep)
        replaced = torch.where(hit, (original + offset) % vocab_size, original)
        out[row, :ctx] = replaced.to(out.device)
    return out


def typo_text(text: str, p: float, generator: torch.Generator) -> str:
    """Character typos: each word (a run of letters) is hit with probability ``p`` by one edit.

    The edit is drawn uniformly among swap two adjacent letters (words of length >= 2), delete
    a letter (length >= 2), insert a random letter, and replace a letter by a keyboard neighbour.
    Whitespace and punctuation are left alone.

    Args:
        text: the context text.
        p: probability that a word gets a typo.
        generator: source of randomness (see :func:`sample_generator`).

    Example:
        >>> typo_text("the quick brown fox", 0.0, torch.Generator())
        'the quick brown fox'
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    out: list[str] = []
    i = 0
    while i < len(text):
        j = i
        while j < len(text) and text[j].isalpha():
            j += 1
        if j == i:
            out.append(text[i])
            i += 1
            continue
        word = text[i:j]
        i = j
        if float(torch.rand((), generator=generator)) >= p:
            out.append(word)
            continue
        kinds = ["insert", "neighbour"] + (["swap", "delete"] if len(word) >= 2 else [])
        kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
        k = int(torch.randint(len(word) - (kind == "swap"), (), generator=generator))
        if kind == "swap":
            word = word[:k] + word[k + 1] + word[k] + word[k + 2:]
        elif kind == "delete":
            word = word[:k] + word[k + 1:]
        elif kind == "insert":
            letter = string.ascii_lowercase[int(torch.randint(26, (), generator=generator))]
            word = word[:k] + letter + word[k:]
        else:
            near = _KEYBOARD.get(word[k].lower(), string.ascii_lowercase)
            letter = near[int(torch.randint(len(near), (), generator=generator))]
            word = word[:k] + (letter.upper() if word[k].isupper() else letter) + word[k + 1:]
        out.append(word)
    return "".join(out)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def suffix_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    suffix_len: int,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample suffix NLL sum and correct-prediction count (float32 cross-entropy).

    The last ``K = suffix_len`` tokens of each row are the targets, predicted from positions
    ``T-K-1 .. T-2``. With ``inputs_embeds`` the model runs on those embeddings and ``input_ids``
    only supplies the targets.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``(N, T)`` token ids (targets, and inputs without ``inputs_embeds``).
        suffix_len: ``K``.
        inputs_embeds: optional ``(N, T, d)`` input embeddings.

    Returns:
        ``(nll_sum, correct)``: two ``(N,)`` tensors (float32 and long).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=40))
        >>> nll, correct = suffix_scores(m, torch.randint(0, 40, (3, 12)), suffix_len=4)
        >>> nll.shape, correct.shape
        (torch.Size([3]), torch.Size([3]))
    """
    t = input_ids.shape[1]
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    try:  # only the last K + 1 positions through the LM head (most of a small model's cost)
        logits = model(**inputs, logits_to_keep=suffix_len + 1).logits
    except TypeError:  # a model without ``logits_to_keep``
        logits = model(**inputs).logits
    pred_logits = logits[:, logits.shape[1] - suffix_len - 1 : logits.shape[1] - 1].float()
    targets = input_ids[:, t - suffix_len :].to(logits.device)
    nll = F.cross_entropy(pred_logits.transpose(1, 2), targets, reduction="none").sum(1)
    correct = (pred_logits.argmax(-1) == targets).sum(1)
    return nll, correct


def _summary(nll: float, correct: int, tokens: int) -> dict[str, float]:
    return {"ppl": math.exp(nll / tokens), "acc": correct / tokens, "tokens": tokens}


@torch.no_grad()
def evaluate_corruptions(
    model: nn.Module,
    windows: torch.Tensor,
    suffix_len: int,
    kind: str = "tokens",
    severities: Sequence[float] = SEVERITIES,
    tokenizer: Any = None,
    seed: int = 0,
    batch_size: int = 8,
    protected: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Suffix perplexity / accuracy of ``model`` on clean and corrupted contexts, with PDR.

    ``PDR = 1 - acc_corrupted / acc_clean``. Row ``i`` of ``windows`` is sample ``i`` for seeding.
    For ``kind="typos"`` each context is decoded with ``tokenizer``, typo'd and re-encoded (its
    length may change; the suffix ids stay as they are), and samples run one at a time; the first
    token is kept verbatim when it is in ``protected`` (BOS).

    Args:
        model: a Hugging Face causal LM (put in eval mode by the caller).
        windows: ``(N, T)`` token windows.
        suffix_len: ``K`` scored tokens at the end of each window.
        kind: ``"tokens"`` (random substitution) or ``"typos"`` (character typos).
        severities: the probabilities ``p``.
        tokenizer: a Hugging Face tokenizer (``"typos"`` only).
        seed: global seed.
        batch_size: rows per forward pass (``"tokens"``).
        protected: token ids never corrupted.

    Returns:
        One row per severity, the clean one first (``severity = 0``): ``kind``, ``severity``,
        ``ppl``, ``acc``, ``tokens``, ``pdr``.

    Raises:
        ValueError: unknown ``kind``, or ``"typos"`` without a tokenizer.

    Example:
        >>> rows = evaluate_corruptions(model, windows, suffix_len=32)  # doctest: +SKIP
        >>> [(r["severity"], r["pdr"]) for r in rows]  # doctest: +SKIP
    """
    if kind not in ("tokens", "typos"):
        raise ValueError(f"kind must be 'tokens' or 'typos', got {kind!r}")
    if kind == "typos" and tokenizer is None:
        raise ValueError("kind='typos' needs the tokenizer to decode and re-encode the context")
    device = _model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ctx = windows.shape[1] - suffix_len
    rows: list[dict[str, Any]] = []
    for severity in (0.0, *severities):
        nll_total, correct_total = 0.0, 0
        if kind == "tokens" or severity == 0.0:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size]
                if severity:
                    batch = substitute_tokens(batch, severity, suffix_len, vocab, seed,
                                              range(start, start + batch.shape[0]), protected)
                nll, correct = suffix_scores(model, batch.to(device), suffix_len)
                nll_total += float(nll.sum())
                correct_total += int(correct.sum())
        else:
            for index, window in enumerate(windows):
                head = window[:ctx].tolist()
                keep = [head.pop(0)] if head and head[0] in protected else []
                text = tokenizer.decode(head)
                noisy = typo_text(text, severity, sample_generator(seed, index, "typos", severity))
                new_ctx = keep + tokenizer(noisy, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([new_ctx + window[ctx:].tolist()], device=device)
                nll, correct = suffix_scores(model, ids, suffix_len)
                nll_total += float(nll.sum())
                correct_total += int(correct.sum())
        row = {"kind": kind, "severity": severity,
               **_summary(nll_total, correct_total, windows.shape[0] * suffix_len)}
        rows.append(row)
    clean_acc = rows[0]["acc"]
    for row in rows:
        row["pdr"] = 1 - row["acc"] / clean_acc if clean_acc > 0 else float("nan")
    return rows


@torch.no_grad()
def embedding_radius(model: nn.Module, chunk: int = 16384) -> float:
    """Mean L2 norm of the input-embedding outputs over the whole vocabulary.

    The embedding module is called on every token id (in chunks), so a scale applied inside it
    (Gemma multiplies by ``sqrt(d)``) is included: the radius lives in ``inputs_embeds`` space.

    Example:
        >>> emb = nn.Embedding(10, 4)
        >>> _ = emb.weight.data.fill_(1.0)
        >>> class M(nn.Module):
        ...     def get_input_embeddings(self): return emb
        ...     def parameters(self): return emb.parameters()
        >>> embedding_radius(M())
        2.0
    """
    emb = model.get_input_embeddings()
    vocab = emb.weight.shape[0]
    device = emb.weight.device
    total = 0.0
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(vocab, start + chunk), device=device)
        total += float(emb(ids).float().norm(dim=-1).double().sum())
    return total / vocab


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norms = delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return delta * torch.clamp(radius / norms, max=1.0)


def _ball_start(shape: tuple[int, ...], radius: float, generators: list[torch.Generator], surface: bool) -> torch.Tensor:
    parts = []
    for g in generators:
        direction = torch.randn(shape[1:], generator=g)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        if surface:
            scale = torch.ones(shape[1], 1)
        else:
            scale = torch.rand(shape[1], 1, generator=g) ** (1.0 / shape[2])
        parts.append(direction * scale * radius)
    return torch.stack(parts)


def random_embedding_noise(
    model: nn.Module,
    input_ids: torch.Tensor,
    suffix_len: int,
    eps: float,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    radius: float | None = None,
) -> torch.Tensor:
    """Context embeddings plus random noise of L2 norm exactly ``eps * radius`` per token.

    The baseline for :func:`embedding_pgd`: same radius, no optimisation. Returns ``inputs_embeds``
    ``(N, T, d)`` (suffix embeddings unchanged).

    Example:
        >>> embeds = random_embedding_noise(model, ids, suffix_len=16, eps=0.1)  # doctest: +SKIP
    """
    radius = embedding_radius(model) if radius is None else radius
    with torch.no_grad():
        clean = model.get_input_embeddings()(input_ids)
    n, t, d = clean.shape
    ctx = t - suffix_len
    gens = [sample_generator(seed, i, "embed_noise", eps) for i in _indices(n, indices)]
    noise = _ball_start((n, ctx, d), eps * radius, gens, surface=True).to(clean)
    out = clean.clone()
    out[:, :ctx] += noise
    return out


def embedding_pgd(
    model: nn.Module,
    input_ids: torch.Tensor,
    suffix_len: int,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    radius: float | None = None,
) -> torch.Tensor:
    """Embedding-space sensitivity probe: L2 PGD on the context's ``inputs_embeds``.

    Maximises the suffix cross-entropy over per-token perturbations ``||delta_t||_2 <= eps * r``
    (``r`` = :func:`embedding_radius`) on the context positions only, from a uniform random start
    in the ball (seeded per sample), with normalised-gradient steps of ``step_size`` (default
    ``2.5 eps r / steps``) and projection after each step. The iterate with the highest loss is
    kept per sample. The model's parameters receive no gradient; call ``model.eval()`` first.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``(N, T)`` windows.
        suffix_len: ``K`` scored tokens.
        eps: relative radius (typically 0.05, 0.1 or 0.25).
        steps: PGD steps (10-20).
        step_size: absolute L2 step per token, default ``2.5 * eps * r / steps``.
        seed: global seed.
        indices: dataset index per row (seeds the random start).
        radius: ``r`` if already computed.

    Returns:
        Adversarial ``inputs_embeds`` ``(N, T, d)``; the suffix embeddings are the clean ones.

    Raises:
        ValueError: ``eps < 0`` or ``steps < 1``.

    Example:
        >>> embeds = embedding_pgd(model, ids, suffix_len=16, eps=0.1)  # doctest: +SKIP
        >>> nll, correct = suffix_scores(model, ids, 16, inputs_embeds=embeds)  # doctest: +SKIP
    """
    if eps < 0 or steps < 1:
        raise ValueError(f"need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
    radius = embedding_radius(model) if radius is None else radius
    bound = eps * radius
    alpha = 2.5 * bound / steps if step_size is None else step_size
    with torch.no_grad():
        clean = model.get_input_embeddings()(input_ids).detach()
    n, t, d = clean.shape
    ctx = t - suffix_len
    gens = [sample_generator(seed, i, "embed_pgd", eps) for i in _indices(n, indices)]
    delta = _ball_start((n, ctx, d), bound, gens, surface=False).to(clean)
    best = delta.clone()
    best_loss = torch.full((n,), -math.inf, device=clean.device)
    with torch.enable_grad():
        for step in range(steps + 1):
            delta.requires_grad_(True)
            embeds = torch.cat([clean[:, :ctx] + delta, clean[:, ctx:]], dim=1)
            nll, _ = suffix_scores(model, input_ids, suffix_len, inputs_embeds=embeds)
            with torch.no_grad():
                better = nll > best_loss
                best[better] = delta.detach()[better]
                best_loss = torch.where(better, nll.detach(), best_loss)
            if step == steps:
                break
            (grad,) = torch.autograd.grad(nll.sum(), delta)
            with torch.no_grad():
                unit = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                delta = _project(delta.detach() + alpha * unit, bound)
    return torch.cat([clean[:, :ctx] + best, clean[:, ctx:]], dim=1).detach()


def evaluate_pgd(
    model: nn.Module,
    windows: torch.Tensor,
    suffix_len: int,
    eps_values: Sequence[float] = PGD_EPS,
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Suffix ppl / accuracy under the embedding-space probe and under random noise of the same radius.

    Returns:
        One row per ``eps`` (plus ``eps = 0``, clean): ``probe`` (:data:`PROBE_LABEL`), ``eps``,
        ``ppl``, ``acc``, ``noise_ppl``, ``noise_acc``, ``pdr`` (vs clean accuracy), ``steps``.

    Example:
        >>> rows = evaluate_pgd(model, windows, suffix_len=32, steps=10)  # doctest: +SKIP
    """
    device = _model_device(model)
    radius = embedding_radius(model)
    tokens = windows.shape[0] * suffix_len
    rows = []
    for eps in (0.0, *eps_values):
        totals = {"adv": [0.0, 0], "noise": [0.0, 0]}
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            idx = range(start, start + ids.shape[0])
            if eps == 0.0:
                with torch.no_grad():
                    nll, correct = suffix_scores(model, ids, suffix_len)
                results = {"adv": (nll, correct), "noise": (nll, correct)}
            else:
                adv = embedding_pgd(model, ids, suffix_len, eps, steps, seed=seed, indices=idx, radius=radius)
                noisy = random_embedding_noise(model, ids, suffix_len, eps, seed, idx, radius)
                with torch.no_grad():
                    results = {"adv": suffix_scores(model, ids, suffix_len, inputs_embeds=adv),
                               "noise": suffix_scores(model, ids, suffix_len, inputs_embeds=noisy)}
            for key, (nll, correct) in results.items():
                totals[key][0] += float(nll.sum())
                totals[key][1] += int(correct.sum())
        adv = _summary(*totals["adv"], tokens)
        noise = _summary(*totals["noise"], tokens)
        rows.append({"probe": PROBE_LABEL, "eps": eps, "steps": steps, "ppl": adv["ppl"], "acc": adv["acc"],
                     "noise_ppl": noise["ppl"], "noise_acc": noise["acc"], "tokens": tokens})
    clean_acc = rows[0]["acc"]
    for row in rows:
        row["pdr"] = 1 - row["acc"] / clean_acc if clean_acc > 0 else float("nan")
    return rows
