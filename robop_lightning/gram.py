"""Calibration statistics of one linear layer: the Gram ``H = X^T X`` and what the sets need.

Everything here is a pure function of tensors. ``LayerInputs`` keeps a reference to the
calibration activations of a layer (so that CTE can weight samples and the ellipsoid set can
bootstrap its radius) and reduces them to Grams in chunks: a ``(samples, tokens, n)`` tensor of
any size is never copied to float64 as a whole.

Samples are the unit of CTE and of the bootstrap: with a 3-D input ``(S, T, n)`` a sample is one
image or sequence (``T`` tokens); with a 2-D input ``(N, n)`` every row is its own sample.

Under ``torch.distributed`` (``distributed=True`` and an initialised process group) each rank holds
only its own samples: Grams are accumulated locally and summed across ranks (``all_reduce``),
per-sample losses are gathered (a few floats per sample), and sample indices are global (rank 0's
samples first). Every rank therefore sees bit-identical statistics and computes the same masks,
while no rank ever holds another rank's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robop_lightning.offload import DiskTensor  # activations kept on disk under a budget

__all__ = ["LayerInputs", "as_layer_inputs"]

# Elements of a chunk converted to float64 and multiplied at once: 2**22 doubles = 32 MB, as much
# as the Gram of a 2048-wide layer; larger chunks add memory, not speed (the product is already
# (chunk rows x n) @ (n x chunk rows)-sized, well into BLAS's efficient range).
_CHUNK_ELEMENTS = 1 << 22


def _process_group_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(
            f"{what} contains NaN or Inf values. Pruning needs finite calibration statistics: "
            "check the calibration data and the layers before this one (an overflow in half "
            "precision is the usual cause; calibrate in float32 or bfloat16)."
        )


@dataclass
class LayerInputs:
    """Calibration activations of one layer, viewed as ``samples`` of ``tokens`` rows each.

    Args:
        x: ``(S, T, n)`` or ``(N, n)`` activations (any float dtype, any device).
        name: used in error messages.
    """

    x: torch.Tensor
    name: str = "inputs"
    distributed: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.x, (torch.Tensor, DiskTensor)):
            raise ValueError(f"{self.name} must be a torch.Tensor, got {type(self.x).__name__}.")
        if self.x.dim() == 2:
            self.x = self.x.unsqueeze(1)  # every row is its own sample
        if self.x.dim() != 3:
            raise ValueError(
                f"{self.name} must have shape (samples, tokens, in_features) or (N, in_features), "
                f"got {tuple(self.x.shape)}."
            )
        if not self.x.is_floating_point():
            raise ValueError(f"{self.name} must be a float tensor, got {self.x.dtype}.")
        self._world = _process_group_size() if self.distributed else 1
        counts = [self.x.shape[0]]
        if self._world > 1:
            local = torch.tensor([self.x.shape[0]], dtype=torch.long, device=_comm_device())
            gathered = [torch.zeros_like(local) for _ in range(self._world)]
            torch.distributed.all_gather(gathered, local)
            counts = [int(c) for c in gathered]
        rank = torch.distributed.get_rank() if self._world > 1 else 0
        self._offset = sum(counts[:rank])
        self._counts = counts
        if sum(counts) == 0 or self.x.shape[1] == 0:
            raise ValueError(
                f"{self.name} is empty (shape {tuple(self.x.shape)}): pass at least one calibration sample."
            )
        self._gram: torch.Tensor | None = None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._world > 1:
            buf = t.to(_comm_device())
            torch.distributed.all_reduce(buf)
            t = buf.to(t.device)
        return t

    # ------------------------------------------------------------------ shape
    @property
    def num_samples(self) -> int:
        """Samples over all ranks."""
        return sum(self._counts)

    @property
    def num_tokens(self) -> int:
        """Calibration tokens over all ranks (``N`` of the authors' sets: rows of ``X``)."""
        return self.num_samples * self.tokens_per_sample

    @property
    def local_samples(self) -> int:
        return self.x.shape[0]

    @property
    def tokens_per_sample(self) -> int:
        return self.x.shape[1]

    @property
    def in_features(self) -> int:
        return self.x.shape[2]

    def _sample_chunks(self):
        """Yield (start, stop) ranges of samples whose token count stays within one chunk."""
        per_sample = self.tokens_per_sample * self.in_features
        # a DiskTensor (activations offloaded under a budget) asks for chunks sized to the budget
        step = max(1, getattr(self.x, "chunk_elements", _CHUNK_ELEMENTS) // max(per_sample, 1))
        for start in range(0, self.local_samples, step):
            yield start, min(start + step, self.local_samples)

    # ------------------------------------------------------------------ Grams
    def gram(self, sample_weights: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """``sum_s w_s X_s^T X_s`` in float64 (``w = 1`` gives ``H``); cached when unweighted.

        Accumulated in float64, chunk by chunk: pruning errors are small next to ``W`` and a
        float32 Gram of a rank-deficient layer loses them to cancellation.
        """
        if sample_weights is None and self._gram is not None:
            return self._gram if device is None else self._gram.to(device)
        device = self.x.device if device is None else torch.device(device)
        n = self.in_features
        acc = torch.zeros(n, n, dtype=torch.float64, device=device)
        if sample_weights is not None:  # global weights: this rank's slice
            sample_weights = sample_weights[self._offset : self._offset + self.local_samples]
        for a, b in self._sample_chunks():
            xc = self.x[a:b].to(device=device, dtype=torch.float64)
            if sample_weights is not None:
                w = sample_weights[a:b].to(device=device, dtype=torch.float64)
                keep = w != 0
                if not keep.any():
                    continue
                xc = xc[keep] * w[keep].clamp_min(0).sqrt().view(-1, 1, 1)
            xc = xc.reshape(-1, n)
            acc += xc.T @ xc
        acc = self._all_reduce(acc)
        _check_finite(acc, self.name)
        acc = 0.5 * (acc + acc.T)
        if sample_weights is None:
            self._gram = acc
        return acc

    def sample_losses(self, error: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``l_s = ||X_s E^T||_F^2`` (computed in float64, shape ``(S,)``)."""
        device = error.device
        e = error.to(dtype=torch.float64)
        out = torch.zeros(self.num_samples, dtype=torch.float64, device=device)
        for a, b in self._sample_chunks():
            xc = self.x[a:b].to(device=device, dtype=torch.float64)
            out[self._offset + a : self._offset + b] = (xc @ e.T).pow(2).sum(dim=(1, 2))
        return self._all_reduce(out)  # each rank filled its own slice: the sum is the gather

    def bootstrap_radius(self, resamples: int = 16, quantile: float = 0.9, seed: int = 0) -> float:
        """Data-driven radius of the ellipsoid set (SPEC §2, E).

        The ``quantile`` of ``||H~_b - H~||_F / ||H~||_F`` over bootstrap resamples of the
        calibration samples, with ``H~`` the Jacobi-normalised Gram (the same scaling for all).
        Returns 0 for a single sample (nothing to resample).
        """
        s = self.num_samples
        if s < 2:
            return 0.0
        h = self.gram()
        d = h.diagonal().clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
        ht = h * d[:, None] * d[None, :]
        norm = torch.linalg.matrix_norm(ht).item()
        if norm == 0:
            return 0.0
        gen = torch.Generator().manual_seed(seed)
        ratios = []
        for _ in range(resamples):
            idx = torch.randint(0, s, (s,), generator=gen)
            counts = torch.bincount(idx, minlength=s).to(torch.float64)
            hb = self.gram(sample_weights=counts.to(h.device), device=h.device)
            hbt = hb * d[:, None] * d[None, :]
            ratios.append(torch.linalg.matrix_norm(hbt - ht).item() / norm)
        return float(torch.tensor(ratios).quantile(quantile))


def as_layer_inputs(inputs, in_features: int, name: str = "inputs") -> LayerInputs:
    """Wrap a tensor (or pass through a ``LayerInputs``) and check its width."""
    li = inputs if isinstance(inputs, LayerInputs) else LayerInputs(inputs, name=name)
    if li.in_features != in_features:
        raise ValueError(
            f"{name} have {li.in_features} features but the weight has in_features={in_features}: "
            "pass the inputs of this layer (what its forward receives), shaped (..., in_features)."
        )
    return li
