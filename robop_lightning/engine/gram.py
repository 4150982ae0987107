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
from typing import Any, Callable

import torch

from robop_lightning.utils.offload import DiskTensor  # activations kept on disk under a budget

__all__ = ["add_gram", "GramAccumulator", "GramInputs", "LayerInputs", "StatsUnavailable", "as_layer_inputs", "sum_over_ranks"]

# Elements of a chunk converted to float64 and multiplied at once: 2**22 doubles = 32 MB, as much
# as the Gram of a 2048-wide layer; larger chunks add memory, not speed (the product is already
# (chunk rows x n) @ (n x chunk rows)-sized, well into BLAS's efficient range). An accelerator
# gets 16x larger chunks (512 MB): its float64 products need tall operands to reach full speed.
_CHUNK_ELEMENTS = 1 << 22
_DEVICE_CHUNK_ELEMENTS = 1 << 26


def _chunk_elements(device: torch.device) -> int:
    return _CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS


GRAM_LEAF = 384  # below this width a Gram is one product
_OFF_COLUMNS = 1024  # columns of an off-diagonal block computed at once (half x 1024 float64 at most)


def add_gram(target: torch.Tensor, x: torch.Tensor, leaf: int = GRAM_LEAF) -> None:
    """``target += X^T X`` for a 2-D ``x`` ``(N, n)``, every off-diagonal block computed once.

    ``X^T X`` is symmetric: split the columns in halves ``[A B]``, add ``A^T A`` and ``B^T B``
    (recursively) and ``A^T B`` to its block and, transposed, to the mirror block. Two levels do
    5/8 of a full product's multiplications; the entries are the same dot products as
    ``X^T X``'s, summed in the same precision, and the off-diagonal blocks come out exactly symmetric.

    Example:
        >>> x = torch.randn(50, 900, dtype=torch.float64)
        >>> acc = torch.zeros(900, 900, dtype=torch.float64)
        >>> add_gram(acc, x)
        >>> bool(torch.allclose(acc, x.T @ x)), bool(torch.equal(acc[:450, 450:], acc[450:, :450].T))
        (True, True)
    """
    n = x.shape[1]
    if n < 2 * leaf:
        target.addmm_(x.T, x)
        return
    half = n // 2
    a, b = x[:, :half], x[:, half:]
    add_gram(target[:half, :half], a, leaf)
    add_gram(target[half:, half:], b, leaf)
    for c in range(half, n, _OFF_COLUMNS):  # A^T B in column chunks: a bounded temporary
        off = a.T @ x[:, c : c + _OFF_COLUMNS]
        target[:half, c : c + _OFF_COLUMNS] += off
        target[c : c + _OFF_COLUMNS, :half] += off.T


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
    # the extremes are finite exactly when every entry is (a NaN propagates through both): two
    # reductions instead of a boolean copy of a Gram (0.6 ms against 15 ms at 2048 x 2048)
    if not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        raise ValueError(
            f"{what} contains NaN or Inf values. Pruning needs finite calibration statistics: "
            "check the calibration data and the layers before this one (an overflow in half "
            "precision is the usual cause; calibrate in float32 or bfloat16)."
        )


class _SampleCounts:
    """Sample and token counts over all ranks (``_counts``: each rank's samples)."""

    _counts: list[int]
    tokens_per_sample: int

    @property
    def num_samples(self) -> int:
        """Samples over all ranks."""
        return sum(self._counts)

    @property
    def num_tokens(self) -> int:
        """Calibration tokens over all ranks (``N`` of the authors' sets: rows of ``X``; samples x the
        longest sample, shorter ones counted zero-padded)."""
        return self.num_samples * self.tokens_per_sample

    consumers: int = 1  # layers still to be solved on these statistics (the pipeline sets it for shared inputs)

    def derived(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, kept while other layers will be solved on these same statistics.

        q / k / v (and gate / up) share their inputs, hence their Gram: a solver's factorisation of
        the same damped matrix (SparseGPT's ``U``, ALPS's ``eigh``) is then computed once per block.
        ``key`` names what is made and from what (set, damping, scale); nothing is kept for a layer
        whose statistics nobody else uses.
        """
        memo = self.__dict__.setdefault("_derived", {})
        if key in memo:
            return memo[key]
        value = make()
        if self.consumers > 1:
            memo[key] = value
        return value

    def release(self) -> None:
        """One layer is done with these statistics; what :meth:`derived` kept goes with the last one."""
        self.consumers -= 1
        if self.consumers <= 0:
            self.__dict__.pop("_derived", None)


@dataclass
class LayerInputs(_SampleCounts):
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
        return _reduced(t, self._world)

    # ------------------------------------------------------------------ shape
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
            add_gram(acc, xc.reshape(-1, n))
        acc = self._all_reduce(acc)
        _check_finite(acc, self.name)
        acc = _symmetrized(acc)
        if sample_weights is None:
            self._gram = acc
        return acc

    def fold_gram(self, k: int, folds: int, device=None) -> torch.Tensor:
        """The Gram of fold ``k`` of ``folds``: the samples whose global index is ``k`` modulo ``folds``."""
        indicator = (torch.arange(self.num_samples) % folds == k).to(torch.float64)
        return self.gram(sample_weights=indicator, device=device)

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
        """Data-driven radius of minmax-e, the extension's ellipsoid set (its default ``rho``).

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


class StatsUnavailable(Exception):
    """The streamed statistics cannot stand in for the activations here (the caller keeps them instead)."""


def _gather_counts(local: int, distributed: bool) -> tuple[list[int], int]:
    """Sample counts of every rank and this rank's global offset."""
    world = _process_group_size() if distributed else 1
    if world <= 1:
        return [local], 0
    t = torch.tensor([local], dtype=torch.long, device=_comm_device())
    gathered = [torch.zeros_like(t) for _ in range(world)]
    torch.distributed.all_gather(gathered, t)
    counts = [int(c) for c in gathered]
    return counts, sum(counts[: torch.distributed.get_rank()])


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default process group (``t`` itself without one; it may be
    reduced in place); every rank gets the same result."""
    return _reduced(t, _process_group_size())


_SYM_TILE = 256


def _symmetrized(h: torch.Tensor) -> torch.Tensor:
    """``(H + H^T) / 2`` of one Gram or a stack of them (the last two dimensions); on a CPU ``h`` itself,
    symmetrised in place tile by tile.

    The entries are the same either way (``(a + b) * 0.5`` at ``(i, j)`` and at ``(j, i)``). On a CPU a
    whole transposed sum into a fresh tensor is slow (page faults and strided reads: 26 ms at
    2048 x 2048, 226 ms at 4096), tiles of 256 that stay in cache take 8 and 32 ms; an accelerator
    does the whole sum at once.

    Example:
        >>> h = torch.randn(600, 600, dtype=torch.float64)
        >>> torch.equal(_symmetrized(h.clone()), 0.5 * (h + h.T))
        True
    """
    if h.device.type != "cpu":
        return torch.add(h, h.transpose(-1, -2)).mul_(0.5)
    n = h.shape[-1]
    for i in range(0, n, _SYM_TILE):
        diag = h[..., i : i + _SYM_TILE, i : i + _SYM_TILE]
        diag.copy_(torch.add(diag, diag.transpose(-1, -2)).mul_(0.5))
        for j in range(i + _SYM_TILE, n, _SYM_TILE):
            up, low = h[..., i : i + _SYM_TILE, j : j + _SYM_TILE], h[..., j : j + _SYM_TILE, i : i + _SYM_TILE]
            up.add_(low.transpose(-1, -2)).mul_(0.5)
            low.copy_(up.transpose(-1, -2))
    return h


def _reduced(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        buf = t.to(_comm_device())
        torch.distributed.all_reduce(buf)
        t = buf.to(t.device)
    return t


class GramAccumulator:
    """What a layer's solve needs, accumulated batch by batch where the batches are.

    The calibration pipeline adds each batch of a linear's inputs in its forward hook, on the
    compute device, and never stores the activations: the Gram ``H`` (float64), the Gram of every
    fold of ``uncertainty="auto"``'s cross-validation (samples ``k`` modulo ``folds``; ``H`` is then
    their sum), the held-out Gram (the last ``heldout`` samples), the number of samples and tokens.
    :meth:`finish` gives a :class:`GramInputs` that stands in for :class:`LayerInputs` wherever only
    these statistics are used (the authors' closed-form sets, ``auto``, held-out errors).

    Args:
        in_features: ``n``.
        device: where the Grams live (the compute device).
        folds: ``K`` of ``auto``'s folds, or ``None``.
        expected: local calibration samples expected in all (needed to split off the held-out ones).
        heldout: how many of the last ``expected`` samples are held out (0: none).
        name: the layer, for messages.

    Example:
        >>> x = torch.randn(6, 3, 4)
        >>> acc = GramAccumulator(4, torch.device("cpu"), folds=2)
        >>> acc.add(x[:4]); acc.add(x[4:])
        >>> g = acc.finish()
        >>> bool(torch.allclose(g.gram(), LayerInputs(x).gram())), g.num_tokens
        (True, 18)
    """

    def __init__(self, in_features: int, device: torch.device, folds: int | None = None,
                 expected: int | None = None, heldout: int = 0, name: str = "inputs") -> None:
        self.n, self.device, self.folds, self.name = in_features, torch.device(device), folds, name
        self.expected, self.heldout = expected, heldout
        if heldout and expected is None:
            raise ValueError("a held-out split needs the expected number of samples.")
        self.cut = None if not heldout else expected - heldout  # first held-out sample
        shape = (folds, in_features, in_features) if folds else (in_features, in_features)
        self.acc = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.held = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device) if heldout else None
        self.samples = 0  # local samples seen (calibration and held out)
        self.tokens = 0  # the longest sample (shorter ones count as zero-padded, as in LayerInputs)

    def _add(self, target: torch.Tensor, x: torch.Tensor) -> None:
        step = max(1, _chunk_elements(self.device) // max(x.shape[1] * self.n, 1))
        for a in range(0, x.shape[0], step):
            add_gram(target, x[a : a + step].to(device=self.device, dtype=torch.float64).reshape(-1, self.n))

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``(samples, tokens, n)`` (any float dtype, any device)."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.shape[-1] != self.n:
            raise ValueError(f"{self.name}: inputs have {x.shape[-1]} features, expected {self.n}.")
        b = x.shape[0]
        start, self.samples = self.samples, self.samples + b
        self.tokens = max(self.tokens, x.shape[1])
        if self.cut is not None and self.samples > self.cut:  # the tail is held out
            split = max(self.cut - start, 0)
            if split < b:
                self._add(self.held, x[split:])
            x = x[:split]
            if not x.shape[0]:
                return
        if not self.folds:
            self._add(self.acc, x)
            return
        index = torch.arange(start, start + x.shape[0]) % self.folds
        for r in range(self.folds):
            picked = (index == r).nonzero().flatten()
            if picked.numel():
                self._add(self.acc[r], x[picked.to(x.device)])

    def finish(self, distributed: bool = False) -> GramInputs:
        """The statistics as :class:`GramInputs` (summed over ranks under ``torch.distributed``). Call it
        once, after the last batch: the Grams it returns may be this accumulator's own (symmetrised in place).

        Raises:
            StatsUnavailable: fewer or more samples arrived than ``expected`` (the split was wrong).
        """
        if self.expected is not None and self.samples != self.expected:
            raise StatsUnavailable(f"{self.name}: {self.samples} samples arrived, {self.expected} expected")
        local = self.samples - self.heldout
        if self.heldout and local < 1:
            raise ValueError(f"{self.name}: the held-out split of {self.samples} calibration sample(s) leaves none "
                             "to prune with; pass more calibration batches or a smaller heldout_fraction.")
        return GramInputs._build(self, local, distributed)


class GramInputs(_SampleCounts):
    """A layer's calibration statistics without its activations (from :class:`GramAccumulator`).

    Offers what the closed-form sets, ``auto`` and the held-out error use of :class:`LayerInputs`:
    :meth:`gram`, :meth:`fold_gram` and the sample / token counts. What needs the activations
    themselves (per-sample losses, reweighted Grams: the min-max extension) raises.
    """

    def __init__(self, gram: torch.Tensor, counts: list[int], tokens: int, folds: torch.Tensor | None = None,
                 name: str = "inputs", distributed: bool = False) -> None:
        self._gram, self._folds, self._counts = gram, folds, counts
        self.tokens_per_sample, self.in_features = tokens, gram.shape[0]
        self.name, self.distributed = name, distributed
        if sum(counts) == 0 or tokens == 0:
            raise ValueError(f"{name} is empty: pass at least one calibration sample.")

    @classmethod
    def _build(cls, acc: GramAccumulator, local: int, distributed: bool) -> GramInputs:
        world = _process_group_size() if distributed else 1
        counts, offset = _gather_counts(local, distributed)
        tokens = acc.tokens
        if world > 1:  # padded length: the longest sample of any rank
            t = torch.tensor([tokens], dtype=torch.long, device=_comm_device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            tokens = int(t)
        folds = None
        if acc.folds:  # local residue r holds global fold (offset + r) mod K
            order = [(r - offset) % acc.folds for r in range(acc.folds)]
            folds = _reduced(acc.acc[order], world)
            folds = _symmetrized(folds)
            h = folds.sum(0)
        else:
            h = _symmetrized(_reduced(acc.acc, world))
        _check_finite(h, acc.name)
        out = cls(h, counts, tokens, folds, acc.name, distributed)
        out.heldout = None
        if acc.held is not None:
            held = _reduced(acc.held, world)
            _check_finite(held, acc.name + " (held out)")
            out.heldout = cls(_symmetrized(held), _gather_counts(acc.heldout, distributed)[0], acc.tokens,
                              name=acc.name + " (held out)", distributed=distributed)
        return out

    @property
    def local_samples(self) -> int:
        return self._counts[torch.distributed.get_rank()] if len(self._counts) > 1 else self._counts[0]

    def gram(self, sample_weights: torch.Tensor | None = None, device=None) -> torch.Tensor:
        """``H`` (float64); reweighting samples needs the activations and raises."""
        if sample_weights is not None:
            raise StatsUnavailable(f"{self.name}: reweighting samples needs the activations, not only their Gram")
        return self._gram if device is None else self._gram.to(device)

    def fold_gram(self, k: int, folds: int, device=None) -> torch.Tensor:
        """The Gram of fold ``k`` (samples ``k`` modulo ``folds``), accumulated as the batches passed."""
        if self._folds is None or (folds != self._folds.shape[0] and folds != self.num_samples):
            raise StatsUnavailable(f"{self.name}: the Grams of {folds} folds were not accumulated")
        g = self._folds[k]
        return g if device is None else g.to(device)

    def sample_losses(self, error: torch.Tensor) -> torch.Tensor:
        raise StatsUnavailable(f"{self.name}: per-sample losses need the activations")

    def bootstrap_radius(self, *args, **kwargs) -> float:
        raise StatsUnavailable(f"{self.name}: a bootstrap radius needs the activations")


def as_layer_inputs(inputs, in_features: int, name: str = "inputs") -> LayerInputs:
    """Wrap a tensor (or pass through a ``LayerInputs``) and check its width."""
    li = inputs if isinstance(inputs, (LayerInputs, GramInputs)) else LayerInputs(inputs, name=name)
    if li.in_features != in_features:
        raise ValueError(
            f"{name} have {li.in_features} features but the weight has in_features={in_features}: "
            "pass the inputs of this layer (what its forward receives), shaped (..., in_features)."
        )
    return li
