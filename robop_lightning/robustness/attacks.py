"""Untargeted PGD and FGSM on [0, 1] images (docs/evaluation.md, "Vision"), plain PyTorch.

The rules: the model normalises inside its ``forward`` (inputs are [0, 1] pixels); it runs in
``eval()`` mode (its mode is restored afterwards); the loss is cross-entropy on float32 logits;
PGD starts from a uniform random point of the eps-ball (seeded per sample, so a dense and a
pruned model get the same starts), takes steps of ``eps / 4``, projects back onto the ball and
clamps to [0, 1] after every step. A sample counts as **broken** if any point the attack
evaluated fooled the model: the clean image (``delta = 0`` is in the ball, so adversarial
accuracy never exceeds clean accuracy), the random start, any iterate, of any restart.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, under
``torch.enable_grad()``: the attack works inside Lightning's ``no_grad`` validation / test loops
and leaves every parameter's ``.grad`` untouched. It cannot run under ``torch.inference_mode``
(use ``Trainer(inference_mode=False)``). Pruning masks stay applied: the attack only reads the
model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    >>> images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6,))
    >>> adversarial, robust = pgd(model, images, labels, eps=4 / 255, steps=5, return_success=True)
    >>> bool(((adversarial - images).abs() <= 4 / 255 + 1e-6).all()), robust.dtype
    (True, torch.bool)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pgd", "fgsm", "uniform_noise"]

Norm = Literal["linf", "l2"]


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 10,
    norm: Norm = "linf",
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    seed: int = 0,
    return_success: bool = False,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Untargeted projected gradient descent in an L-inf or L2 ball around [0, 1] images.

    Args:
        model: maps ``(N, C, H, W)`` images in [0, 1] to ``(N, classes)`` logits (normalising
            inside). Put in ``eval()`` for the attack; its mode is restored afterwards.
        images: clean images in [0, 1].
        labels: true classes, ``(N,)``.
        eps: radius of the ball (L-inf: per pixel, e.g. ``4 / 255``; L2: Euclidean per image).
        steps: gradient steps per restart (10 while developing, >= 50 for reported numbers).
        norm: ``"linf"`` (sign steps, box projection) or ``"l2"`` (normalised-gradient steps,
            ball projection).
        step_size: step length; ``None``: ``eps / 4``.
        restarts: independent random starts; a sample is broken if any restart breaks it.
        random_start: start from a uniform random point of the ball (else from the image).
        seed: the random starts are seeded per sample from ``(seed, index, restart, norm)``.
        return_success: also return the per-sample ``robust`` flags.
        indices: dataset index of every sample (``None``: ``0 .. N-1``), for the per-sample seeds.

    Returns:
        The adversarial images (in the ball and in [0, 1]): for a broken sample the first point
        that fooled the model, otherwise the highest-loss point found. With
        ``return_success=True``, a tuple ``(adversarial, robust)`` where ``robust`` is a bool
        ``(N,)`` tensor, True where no evaluated point fooled the model.

    Raises:
        ValueError: an argument is out of range.
        RuntimeError: called under ``torch.inference_mode``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> pgd(model, x, y, eps=8 / 255, steps=3).shape
        torch.Size([4, 3, 2, 2])
    """
    _check_arguments(images, labels, eps, norm)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}.")
    step = float(eps) / 4 if step_size is None else float(step_size)
    if step <= 0 and eps > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}.")
    index_list = _index_list(indices, images.shape[0])

    with _attack_mode(model):
        clean = images.detach().float()
        with torch.no_grad():
            best_loss, broken, _ = _loss_and_grad(model, clean, labels, need_grad=False)
        best = clean.clone()
        for restart in range(restarts):
            delta = _random_start(clean, eps, norm, seed, restart, index_list) if random_start else None
            current = clean if delta is None else (clean + delta).clamp(0, 1)
            for k in range(steps + 1):
                need_grad = k < steps
                loss, fooled, grad = _loss_and_grad(model, current, labels, need_grad)
                best, best_loss, broken = _keep(best, best_loss, broken, current, loss, fooled)
                if not need_grad:
                    break
                current = _project(current + step * _direction(grad, norm), clean, eps, norm)
    best = best.to(images.dtype)
    return (best, ~broken) if return_success else best


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    norm: Norm = "linf",
    return_success: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fast gradient sign method: one step of length ``eps`` from the clean image.

    Same rules as :func:`pgd` (eval mode, float32 loss, clamp to [0, 1]); a sample is broken if
    the clean image or the single step fools the model. ``norm="l2"`` takes the normalised
    gradient step (fast gradient method).

    Args:
        model: maps [0, 1] images to logits.
        images: clean images in [0, 1].
        labels: true classes.
        eps: step length and radius.
        norm: ``"linf"`` or ``"l2"``.
        return_success: also return the per-sample ``robust`` flags.

    Returns:
        The adversarial images, or ``(adversarial, robust)`` with ``return_success=True``.

    Raises:
        ValueError: an argument is out of range.
        RuntimeError: called under ``torch.inference_mode``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> adversarial, robust = fgsm(model, x, y, eps=8 / 255, return_success=True)
        >>> float((adversarial - x).abs().max()) <= 8 / 255 + 1e-6
        True
    """
    _check_arguments(images, labels, eps, norm)
    with _attack_mode(model):
        clean = images.detach().float()
        loss, fooled_clean, grad = _loss_and_grad(model, clean, labels, need_grad=True)
        adversarial = _project(clean + float(eps) * _direction(grad, norm), clean, eps, norm)
        with torch.no_grad():
            _, fooled, _ = _loss_and_grad(model, adversarial, labels, need_grad=False)
        adversarial = torch.where(_expand(fooled_clean, clean), clean, adversarial).to(images.dtype)
        broken = fooled_clean | fooled
    return (adversarial, ~broken) if return_success else adversarial


def uniform_noise(
    images: torch.Tensor,
    eps: float,
    norm: Norm = "linf",
    seed: int = 0,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Random noise of the same budget as an attack (the sanity baseline: much weaker than PGD).

    L-inf: each pixel moved by ``+-eps`` with a random sign (the corners of the ball, the
    strongest random noise of that radius); L2: a random direction of length ``eps``. Seeded
    per sample like :func:`pgd`'s starts.

    Args:
        images: clean images in [0, 1].
        eps: radius.
        norm: ``"linf"`` or ``"l2"``.
        seed: global seed.
        indices: dataset indices (``None``: ``0 .. N-1``).

    Returns:
        Noisy images clamped to [0, 1].

    Raises:
        ValueError: an argument is out of range.

    Example:
        >>> x = torch.rand(2, 3, 4, 4)
        >>> float((uniform_noise(x, 2 / 255) - x).abs().max()) <= 2 / 255 + 1e-6
        True
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    clean = images.detach().float()
    draws = []
    for index in _index_list(indices, clean.shape[0]):
        g = _sample_generator(seed, index, -1, f"noise-{norm}")
        draws.append(torch.randn(clean.shape[1:], generator=g))
    noise = torch.stack(draws).to(clean.device)
    if norm == "linf":
        noise = eps * noise.sign()
    else:
        noise = eps * noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (clean.dim() - 1))
    return (clean + noise).clamp(0, 1)


# --------------------------------------------------------------------------- helpers
def _check_arguments(images: torch.Tensor, labels: torch.Tensor, eps: float, norm: str) -> None:
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a number >= 0 (e.g. 4 / 255), got {eps!r}.")
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise ValueError("images must be a batched tensor (N, ...).")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}.")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "adversarial attacks need gradients, which torch.inference_mode forbids: under Lightning "
            "use Trainer(inference_mode=False) for validate / test."
        )


class _attack_mode:
    """Context: ``model.eval()`` and grad enabled; restores the model's mode on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []
        self.grad = torch.enable_grad()

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        for module, training in self.modes:
            module.training = training


def _index_list(indices: torch.Tensor | Sequence[int] | None, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    out = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if len(out) != n:
        raise ValueError(f"indices must give one dataset index per image: {len(out)} for {n} images.")
    return out


def _sample_generator(seed: int, index: int, restart: int, what: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{int(seed)}|{int(index)}|{int(restart)}|{what}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _expand(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, *[1] * (like.dim() - 1))


def _random_start(
    clean: torch.Tensor, eps: float, norm: str, seed: int, restart: int, indices: list[int]
) -> torch.Tensor:
    """A uniform random point of the eps-ball per sample (seeded per sample and restart)."""
    shape, dim = clean.shape[1:], clean[0].numel()
    draws = []
    for index in indices:
        g = _sample_generator(seed, index, restart, f"pgd-{norm}")
        if norm == "linf":
            draws.append(torch.empty(shape).uniform_(-1, 1, generator=g))
        else:  # uniform in the L2 ball: a random direction times radius u^(1/d)
            direction = torch.randn(shape, generator=g)
            radius = torch.rand((), generator=g) ** (1.0 / dim)
            draws.append(direction / direction.norm().clamp_min(1e-12) * radius)
    return float(eps) * torch.stack(draws).to(clean.device)


def _loss_and_grad(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample float32 cross-entropy, fooled flags and (optionally) the input gradient."""
    x = images.detach().requires_grad_(need_grad)
    logits = model(x)
    if isinstance(logits, (tuple, list)):  # a distillation model left in training mode
        logits = sum(logits) / len(logits)
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    grad = torch.autograd.grad(loss.sum(), x)[0] if need_grad else None
    return loss.detach(), (logits.argmax(-1) != labels).detach(), grad


def _keep(
    best: torch.Tensor,
    best_loss: torch.Tensor,
    broken: torch.Tensor,
    current: torch.Tensor,
    loss: torch.Tensor,
    fooled: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first fooling point of a broken sample, else the highest-loss point."""
    newly = fooled & ~broken
    better = ~broken & ~fooled & (loss > best_loss)
    take = newly | better
    best = torch.where(_expand(take, best), current.detach(), best)
    best_loss = torch.where(take, loss, best_loss)
    return best, best_loss, broken | fooled


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / _expand(norms, grad)


def _project(candidate: torch.Tensor, clean: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back onto the eps-ball around ``clean`` and into [0, 1] (the box keeps the ball)."""
    delta = candidate.detach() - clean
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1)
        factor = torch.where(norms > eps, eps / norms.clamp_min(1e-12), torch.ones_like(norms))
        delta = delta * _expand(factor, delta)
    return (clean + delta).clamp(0, 1)
