"""Synthetic layer problems shaped like transformer activations, for demos and benchmarks.

Real layers come from :func:`robop_lightning.prune_model` captures; these stand-ins exist so the
engine can be exercised and timed at any size without a model. They mimic what matters for
pruning: strongly correlated features with a power-law spectrum, uneven feature scales, a few
massive-activation channels, and samples that differ from each other (a per-sample offset, so
CTE has tails to find). ``shift`` draws held-out data from a perturbed distribution (outlier
channels rescaled, larger sample offsets): the gap between calibration and held-out error is the
robustness signal.
"""

from __future__ import annotations

import torch

__all__ = ["synthetic_layer"]


def synthetic_layer(
    rows: int,
    cols: int,
    samples: int = 64,
    tokens: int = 32,
    heldout_samples: int = 32,
    seed: int = 0,
    outlier_fraction: float = 0.01,
    shift: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight ``(rows, cols)``, calibration inputs ``(samples, tokens, cols)`` and held-out inputs.

    Example:
        >>> w, x, x_held = synthetic_layer(8, 16, samples=4, tokens=2, heldout_samples=2)
        >>> w.shape, x.shape, x_held.shape
        (torch.Size([8, 16]), torch.Size([4, 2, 16]), torch.Size([2, 2, 16]))
    """
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, cols + 1, dtype=torch.float32).pow(-0.7)
    basis = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
    mix = basis * spectrum.sqrt()[None, :] @ basis.T * cols**0.5
    scales = torch.exp(0.5 * torch.randn(cols, generator=g))
    n_out = max(1, int(round(outlier_fraction * cols)))
    outliers = torch.randperm(cols, generator=g)[:n_out]
    scales[outliers] *= 20.0

    def draw(n_samples: int, offset: float, outlier_gain: torch.Tensor) -> torch.Tensor:
        z = torch.randn(n_samples, tokens, cols, generator=g)
        z = z + offset * torch.randn(n_samples, 1, cols, generator=g)
        x = (z @ mix) * scales
        x[..., outliers] *= outlier_gain
        return x

    x = draw(samples, 0.5, torch.ones(n_out))
    gain = 1.0 + shift * torch.randn(n_out, generator=g).abs()
    x_held = draw(heldout_samples, 0.5 * (1.0 + shift), gain)
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    return w, x, x_held
