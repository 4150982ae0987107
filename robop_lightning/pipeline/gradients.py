"""Per-sample gradients of a loss with respect to chosen weights (CAP's empirical Fisher needs them).

``loss_fn(model, batch) -> (B,)`` returns one loss per sample of ``batch``. The gradients are
computed with ``torch.func`` (``vmap(grad(...))`` over the samples, the model's own parameters
swapped functionally), or, where the model does not allow ``vmap`` (in-place updates of buffers,
data-dependent control flow), one backward pass per sample. The two agree to float rounding.

Batches are tensors, tuples / lists or dicts of tensors whose first dimension is the sample (labels
included: CAP's gradients use the true labels).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from robop_lightning.utils.compat import tree_leaves, tree_map

__all__ = ["per_sample_gradients", "minibatch_gradient", "batch_size_of", "slice_batch"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(inner, batch)``: lets ``functional_call`` swap ``inner``'s weights
    for the duration of any method the loss calls (``inner.per_sample_loss``, ``inner.model(x)``...)."""

    def __init__(self, inner: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.inner = inner
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.inner, batch)


def batch_size_of(batch: Any) -> int:
    """The number of samples of ``batch`` (the first dimension of its first tensor)."""
    leaves = [x for x in tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not leaves:
        raise ValueError("a calibration batch must hold at least one tensor with a sample dimension.")
    return leaves[0].shape[0]


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor of ``batch`` (other leaves unchanged)."""
    return tree_map(lambda x: x[start:stop] if isinstance(x, torch.Tensor) and x.dim() > 0 else x, batch)


def _check_losses(losses: torch.Tensor, samples: int) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.shape != (samples,):
        raise ValueError(
            f"loss_fn(model, batch) must return one loss per sample, shape ({samples},); got "
            f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}. "
            "Use reduction='none' in the loss."
        )
    return losses


def _named_parameters(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """The model's parameters by name; a ``ValueError`` naming those it lacks."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"no parameter(s) {', '.join(missing)} in the model.")
    return params


@contextlib.contextmanager
def _differentiable(targets: list[torch.Tensor]) -> Iterator[None]:
    """Gradients on for ``targets`` inside (``requires_grad`` and grad mode), as they were after."""
    flags = [t.requires_grad for t in targets]
    try:
        for t in targets:
            t.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for t, flag in zip(targets, flags):
            t.requires_grad_(flag)


def per_sample_gradients(
    model: nn.Module,
    names: list[str],
    batch: Any,
    loss_fn: LossFn,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}``: the gradient of each sample's loss with respect to each named parameter.

    Args:
        model: the model (its mode is left as it is: call ``model.eval()`` first for dropout-free
            gradients).
        names: parameter names (``"blocks.0.attn.qkv.weight"``).
        batch: one batch of ``B`` samples.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses.
        method: ``"vmap"``, ``"loop"`` or ``"auto"`` (``vmap``, falling back to the loop with a
            warning when the model does not allow it).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> g = per_sample_gradients(net, ["weight"], (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])), loss)
        >>> tuple(g["weight"].shape)
        (5, 2, 3)
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}.")
    params = _named_parameters(model, names)
    samples = batch_size_of(batch)
    if method in ("auto", "vmap"):
        try:
            return _vmap_gradients(model, names, params, batch, loss_fn, samples)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - any functorch limitation: use the loop
            if method == "vmap":
                raise
            warnings.warn(f"per-sample gradients: torch.func.vmap failed ({type(err).__name__}: {err}); "
                          "falling back to one backward pass per sample (slower, same result).",
                          RuntimeWarning, stacklevel=2)
    return _loop_gradients(model, names, params, batch, loss_fn, samples)


def _vmap_gradients(model, names, params, batch, loss_fn, samples):
    from torch.func import functional_call, grad, vmap

    wrapper = _LossModule(model, loss_fn)
    detached = {n: params[n].detach() for n in names}

    def one(weights: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        single = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, sample)
        losses = functional_call(wrapper, {f"inner.{n}": w for n, w in weights.items()}, (single,))
        return losses.sum()

    in_dims = tree_map(lambda x: 0 if isinstance(x, torch.Tensor) and x.dim() > 0 else None, batch)
    # check the loss's shape once, outside vmap, for a clear message
    with torch.no_grad():
        _check_losses(loss_fn(model, slice_batch(batch, 0, min(2, samples))), min(2, samples))
    with warnings.catch_warnings():  # ops without a batching rule (CPU flash attention) run in a loop inside vmap
        warnings.filterwarnings("ignore", message=".*batching rule.*", category=UserWarning)
        grads = vmap(grad(one), in_dims=(None, in_dims))(detached, batch)
    return {n: grads[n].detach() for n in names}


def _loop_gradients(model, names, params, batch, loss_fn, samples):
    out = {n: torch.empty((samples, *params[n].shape), dtype=params[n].dtype, device=params[n].device) for n in names}
    targets = [params[n] for n in names]
    with _differentiable(targets):
        for i in range(samples):
            losses = _check_losses(loss_fn(model, slice_batch(batch, i, i + 1)), 1)
            for n, g in zip(names, torch.autograd.grad(losses.sum(), targets, allow_unused=True)):
                out[n][i] = 0 if g is None else g
    return out


def minibatch_gradient(model: nn.Module, names: list[str], batch: Any, loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """``{name: (1, *shape)}``: the gradient of the mean loss over ``batch`` (CAP's mini-batch gradient).

    One backward pass; equals the mean of the per-sample gradients (:func:`per_sample_gradients`)
    up to float rounding.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> g = minibatch_gradient(net, ["weight"], batch, loss)["weight"]
        >>> torch.allclose(g[0], per_sample_gradients(net, ["weight"], batch, loss)["weight"].mean(0), atol=1e-6)
        True
    """
    params = _named_parameters(model, names)
    targets = [params[n] for n in names]
    with _differentiable(targets):
        losses = _check_losses(loss_fn(model, batch), batch_size_of(batch))
        grads = torch.autograd.grad(losses.mean(), targets, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g).detach().unsqueeze(0)
            for n, p, g in zip(names, targets, grads)}
