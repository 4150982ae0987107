"""Small problem generators shared by the engine tests."""

from __future__ import annotations

import torch


def correlated_inputs(samples: int, tokens: int, n: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """Correlated features with uneven scales (log-uniform over ``10**[-spread, spread]``)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + 0.5 * torch.eye(n)
    latent = torch.randn(samples, tokens, n, generator=g)
    scales = torch.logspace(-spread, spread, n)[torch.randperm(n, generator=g)]
    return (latent @ mix) * scales


def random_weight(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, n, generator=g)


def quad(h: torch.Tensor, e: torch.Tensor) -> float:
    """tr(E H E^T) in float64."""
    e = e.double()
    return float(torch.einsum("ij,jk,ik->", e, h.double(), e))
