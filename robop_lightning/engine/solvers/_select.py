"""The exact k-th smallest value of a tensor, fast on every device: the solvers' mask selections.

SparseGPT (the mask of each block of 128 columns) and ALPS (the support of every ADMM iterate)
select a fixed count of weights out of the whole matrix, i.e. one k-th value of one large slice.
On a CPU NumPy's introselect finds it in ``O(n)``. On CUDA ``torch.kthvalue`` runs one thread block
per slice, so one slice of tens of millions of entries is 20x slower than sorting it
(pytorch/pytorch#75599: 0.68 s for 10^8 entries against 0.03 s for ``sort``), which made the
selection the largest per-iteration cost of ALPS on a wide layer. :func:`kth_smallest` uses a radix
select written with device-wide tensor operations instead: the float bits, mapped to integers in
the same order, are histogrammed one digit at a time (``torch.bincount``), and each pass keeps only
the entries of the bucket that holds the k-th value. Three passes for float32, all integer
arithmetic: the value returned is the exact k-th smallest, the one ``kthvalue`` returns.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

__all__ = ["kth_smallest", "radix_kth_smallest", "extreme_mask"]

# float dtype -> (integer view, bits, digit widths from the most significant digit)
_LAYOUT = {
    torch.float32: (torch.int32, 32, (11, 11, 10)),
    torch.float64: (torch.int64, 64, (11, 11, 11, 11, 11, 9)),
}


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest (1-based) of all entries of ``values``, as a 0-d tensor of its dtype.

    NumPy's introselect on a CPU, :func:`radix_kth_smallest` elsewhere; both exact.

    Example:
        >>> kth_smallest(torch.tensor([[3.0, -1.0], [2.0, 2.0]]), 3)
        tensor(2.)
    """
    flat = values.reshape(-1)
    if not 1 <= k <= flat.numel():
        raise ValueError(f"k = {k} is outside [1, {flat.numel()}] (the number of entries)")
    if flat.device.type == "cpu" and flat.dtype in _LAYOUT:
        arr = flat.detach().numpy()
        return torch.as_tensor(np.partition(arr, k - 1)[k - 1], dtype=flat.dtype)
    return radix_kth_smallest(flat, k)


def extreme_mask(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Bool mask (``values``' shape) of its ``k`` largest (``largest=False``: smallest) entries, exactly
    ``k``: the entries beyond the k-th value, then as many entries equal to it as the count needs,
    the first in memory order.

    Example:
        >>> extreme_mask(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2).tolist()
        [False, True, True, False]
        >>> extreme_mask(torch.tensor([3.0, 1.0, 2.0, 1.0]), 1, largest=False).tolist()
        [False, True, False, False]
    """
    flat = values.reshape(-1)
    total = flat.numel()
    if k <= 0 or k >= total:
        return torch.full_like(values, k > 0, dtype=torch.bool)
    thr = kth_smallest(flat, total - k + 1 if largest else k)
    keep = flat >= thr if largest else flat <= thr
    extra = int(torch.count_nonzero(keep)) - k
    if extra > 0:  # ties at the threshold: keep the first ones only
        ties = torch.nonzero(flat == thr).flatten()
        keep[ties[ties.numel() - extra :]] = False
    return keep.view_as(values)


def radix_kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest (1-based) entry of ``values`` by a radix select on its float bits.

    A float's bits, read as a signed integer and with the bits below the sign flipped where the
    sign is set, order exactly as the floats do (``-0.0`` just below ``+0.0``, NaN above ``inf``,
    NumPy's order too). Each pass histograms one digit of those keys over the entries still in the
    running and keeps the bucket that holds the k-th; after the last digit every entry left has the
    same key. Half-precision inputs are selected in float32 (exact: the conversion keeps order and
    value).

    Example:
        >>> x = torch.tensor([0.5, -2.0, 7.0, 0.5, -0.0, 3.0])
        >>> [float(radix_kth_smallest(x, k)) for k in range(1, 7)] == sorted(x.tolist())
        True
    """
    flat = values.reshape(-1)
    work = flat if flat.dtype in _LAYOUT else flat.float()
    itype, bits, widths = _LAYOUT[work.dtype]
    flip = (1 << (bits - 1)) - 1
    keys = work.view(itype)
    keys = torch.where(keys < 0, keys ^ flip, keys)
    shift = bits
    for i, width in enumerate(widths):
        shift -= width
        digit = keys >> shift
        # the first digit holds the sign: shifted arithmetically it lies in [-2^(w-1), 2^(w-1))
        digit = digit + (1 << (width - 1)) if i == 0 else digit & ((1 << width) - 1)
        below = torch.bincount(digit.reshape(-1), minlength=1 << width).cumsum(0).tolist()  # one read-back
        bucket = bisect.bisect_left(below, k)  # the first bucket whose running count reaches k
        k -= below[bucket - 1] if bucket else 0
        keys = keys[digit == bucket]
    key = keys[:1]
    key = torch.where(key < 0, key ^ flip, key)
    return key.view(work.dtype)[0].to(flat.dtype)
