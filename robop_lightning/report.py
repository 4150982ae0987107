"""Result types: ``LayerResult`` (one layer), ``StructuredResult`` (one structured selection) and
``PruneReport`` (a model, layer by layer); they import nothing of the pipeline."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robop_lightning.utils.files import atomic_write

__all__ = ["LayerResult", "PruneReport", "StructuredResult"]


@dataclass
class LayerResult:
    """What :func:`prune_layer` returns.

    Attributes:
        weight: pruned weight, same shape / dtype / device as the input, exact zeros where pruned.
        mask: bool keep-mask (True where a weight is kept).
        nominal_error: ``tr(E H E^T) / tr(W H W^T)`` on the calibration Gram.
        robust_error: the set's robust loss of the result, same normalisation (``>= nominal_error``).
        heldout_error: the nominal error under the held-out Gram (None without held-out inputs).
        srank: stable rank ``||E||_F^2 / ||E||_2^2`` of the error (coupled sets only).
        sparsity: achieved fraction of zeros in the mask.
        seconds: wall time of the call.
        solver, uncertainty, pattern: what was run (``uncertainty`` includes the radius used).
        damping: the absolute damping ``lambda0`` finally used.
        history: one entry per solve of the alternating scheme.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    nominal_error: float
    robust_error: float
    heldout_error: float | None = None
    srank: float | None = None
    sparsity: float = 0.0
    seconds: float = 0.0
    solver: str = ""
    uncertainty: str = ""
    pattern: str = ""
    damping: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields (no tensors), JSON-serialisable."""
        return {
            "solver": self.solver,
            "uncertainty": self.uncertainty,
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "nominal_error": self.nominal_error,
            "robust_error": self.robust_error,
            "heldout_error": self.heldout_error,
            "srank": self.srank,
            "seconds": self.seconds,
            "damping": self.damping,
            "solves": len(self.history),
            **({"selection": self.selection} if self.selection is not None else {}),
        }

    def to_row(self, name: str, weight_shape: Sequence[int]) -> dict[str, Any]:
        """The :attr:`PruneReport.layers` row of this result for the layer ``name`` of weight shape ``weight_shape``.

        Keys ``name``, ``shape``, ``parameters``, ``sparsity``, ``nominal_error``, ``robust_error``,
        ``heldout_error``, ``srank`` (``None`` when not finite), ``seconds``, and ``selection`` when
        the set was chosen from the data. Numbers are plain Python floats / ints (JSON-serialisable).

        Example:
            >>> r = LayerResult(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.1, 0.2, sparsity=0.5)
            >>> row = r.to_row("fc1", (2, 3))
            >>> row["shape"], row["parameters"], row["srank"], "selection" in row
            ([2, 3], 6, None, False)
        """
        srank = self.srank
        return {
            "name": name,
            "shape": list(weight_shape),
            "parameters": math.prod(weight_shape),
            "sparsity": float(self.sparsity),
            "nominal_error": float(self.nominal_error),
            "robust_error": float(self.robust_error),
            "heldout_error": None if self.heldout_error is None else float(self.heldout_error),
            "srank": None if srank is None or not math.isfinite(srank) else float(srank),
            "seconds": float(self.seconds),
            **({"selection": self.selection} if self.selection is not None else {}),
        }

    def __repr__(self) -> str:
        held = "" if self.heldout_error is None else f", heldout={self.heldout_error:.4g}"
        sr = "" if self.srank is None else f", srank={self.srank:.3g}"
        return (
            f"LayerResult({self.solver}/{self.uncertainty}, {self.pattern}, shape={tuple(self.weight.shape)}, "
            f"sparsity={self.sparsity:.4f}, nominal={self.nominal_error:.4g}, robust={self.robust_error:.4g}"
            f"{held}{sr}, {self.seconds:.2f}s)"
        )


@dataclass
class PruneReport:
    """What :func:`prune_model` did, layer by layer.

    Attributes:
        layers: one row per pruned linear: ``name``, ``shape``, ``parameters``, ``sparsity``
            (achieved), ``nominal_error``, ``robust_error``, ``heldout_error`` (None without a
            held-out split), ``srank`` (stable rank of the error, coupled sets only), ``seconds``.
        config: the arguments of the call.
        seconds: wall time of the whole call (capture and propagation included).
        masks: ``{name: bool keep-mask}`` on CPU (not part of :meth:`to_dict`).
        resumed: names of the layers loaded from ``resume_dir`` (finished by an earlier run)
            instead of being pruned again (not part of :meth:`to_dict`).
        blocks: where the time went, one row per block walked: ``name``, ``seconds``, ``capture``
            (the forwards that feed the Grams, with the Grams), ``solve``, ``forward`` (the forward
            that feeds the next block), ``io`` (undo copies and checkpoints).
        peak_memory: ``{"device": bytes, "host": bytes}``: the accelerator's peak allocation
            (``None`` on the CPU) and the peak resident memory above the start, over the walk.

    Example:
        >>> report = PruneReport(layers=[{"name": "fc1", "shape": [4, 8], "parameters": 32,
        ...     "sparsity": 0.5, "nominal_error": 0.1, "robust_error": 0.2, "heldout_error": None,
        ...     "srank": None, "seconds": 0.01}])
        >>> report.totals["sparsity"]
        0.5
    """

    layers: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    resumed: list[str] = field(default_factory=list, repr=False)
    blocks: list[dict[str, Any]] = field(default_factory=list, repr=False)
    peak_memory: dict[str, int | None] = field(default_factory=dict, repr=False)

    @property
    def totals(self) -> dict[str, Any]:
        """Totals over the pruned layers: parameters, zeros, overall sparsity, mean errors."""
        params = sum(r["parameters"] for r in self.layers)
        zeros = sum(round(r["sparsity"] * r["parameters"]) for r in self.layers)

        def mean(key: str) -> float | None:
            values = [r[key] for r in self.layers if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        return {
            "layers": len(self.layers),
            "parameters": params,
            "zeros": zeros,
            "sparsity": zeros / params if params else 0.0,
            "nominal_error": mean("nominal_error"),
            "robust_error": mean("robust_error"),
            "heldout_error": mean("heldout_error"),
            "srank": mean("srank"),
            "solve_seconds": sum(r["seconds"] for r in self.layers),
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        """``{"config", "layers", "totals"}``, JSON-serialisable (no tensors)."""
        return {"config": dict(self.config), "layers": [dict(r) for r in self.layers], "totals": self.totals,
                **({"blocks": [dict(b) for b in self.blocks]} if self.blocks else {}),
                **({"peak_memory": dict(self.peak_memory)} if self.peak_memory else {})}

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text, also written to ``path`` when given (atomically: a temporary
        file renamed over ``path``, so an existing file is never left half-written)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write(path, text + "\n")
        return text

    def __str__(self) -> str:
        def num(v: float | None, fmt: str = ".4f") -> str:
            return "-" if v is None else format(v, fmt)

        c = self.config
        head = (
            f"RobOP pruning: solver={c.get('solver')} uncertainty={c.get('uncertainty')} "
            f"pattern={c.get('pattern')} target sparsity={num(c.get('sparsity'), '.2f')}"
        )
        chosen = any("selection" in r for r in self.layers)
        cols = ("layer", "shape", *(("set",) if chosen else ()), "sparsity", "nominal", "robust", "heldout", "srank",
                "seconds")
        rows = [
            (
                r["name"],
                "x".join(str(d) for d in r["shape"]),
                *((r["selection"]["chosen"] if "selection" in r else "-",) if chosen else ()),
                num(r["sparsity"]),
                num(r["nominal_error"]),
                num(r["robust_error"]),
                num(r["heldout_error"]),
                num(r["srank"], ".2f"),
                num(r["seconds"], ".2f"),
            )
            for r in self.layers
        ]
        t = self.totals
        rows.append(
            (
                f"total ({t['layers']} layers)",
                f"{t['parameters']:,} weights",
                *(("",) if chosen else ()),
                num(t["sparsity"]),
                num(t["nominal_error"]),
                num(t["robust_error"]),
                num(t["heldout_error"]),
                num(t["srank"], ".2f"),
                num(t["seconds"], ".2f"),
            )
        )
        widths = [max(len(cols[i]), *(len(r[i]) for r in rows)) for i in range(len(cols))]
        left = 3 if chosen else 2
        fmt = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines = [head, fmt.format(*cols), rule, *(fmt.format(*r) for r in rows[:-1]), rule, fmt.format(*rows[-1])]
        return "\n".join(lines)


@dataclass
class StructuredResult:
    """What :func:`robop_lightning.engine.solvers.structured_obs.select_groups` returns.

    Attributes:
        removed: indices (into ``groups``) of the removed groups, in greedy order.
        kept: indices of the kept groups, ascending.
        kept_columns: the consumer columns that stay, ascending (the new column order).
        weight: ``(out_features, len(kept_columns))`` compensated weight (input dtype).
        bias: the corrected bias (``None`` when the layer has none).
        nominal_error: ``tr(E H E^T) / tr(W H W^T)`` on the calibration inputs (bias included).
        robust_error: the set's robust loss of the result, same normalisation.
        heldout_error: the nominal error on held-out inputs (``None`` without them).
        trajectory: relative nominal loss after each greedy step (cumulative; for global budgets).
        steps: number of groups removed at each greedy step.
        uncertainty: the set used, with its radius.
        history: one entry per solve of the alternating scheme.
        seconds: wall time.
    """

    removed: list[int]
    kept: list[int]
    kept_columns: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    nominal_error: float
    robust_error: float
    heldout_error: float | None = None
    trajectory: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    uncertainty: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_row(self, name: str, weight_shape: Sequence[int], unit: str, kind: str,
               params_per_group: int) -> dict[str, Any]:
        """The :attr:`PruneReport.layers` row of a structured selection of the consumer ``name``.

        ``unit`` and ``kind`` name the pruned unit (heads, MLP channels) and its kind;
        ``params_per_group`` is the parameters one removed group takes away. The group counts come
        from the result: ``groups = len(removed) + len(kept)``, ``sparsity = len(removed) / groups``.

        Example:
            >>> r = StructuredResult([1], [0, 2, 3], torch.tensor([0, 2, 3]), torch.zeros(2, 3), None, 0.1, 0.2)
            >>> row = r.to_row("mlp.down", (2, 4), "mlp", "channels", params_per_group=6)
            >>> row["groups"], row["kept"], row["removed"], row["parameters"], row["sparsity"]
            (4, 3, [1], 24, 0.25)
        """
        groups = len(self.removed) + len(self.kept)
        return {
            "name": name,
            "unit": unit,
            "kind": kind,
            "shape": list(weight_shape),
            "parameters": groups * params_per_group,
            "sparsity": len(self.removed) / groups,
            "groups": groups,
            "kept": groups - len(self.removed),
            "removed": sorted(self.removed),
            "nominal_error": float(self.nominal_error),
            "robust_error": float(self.robust_error),
            "heldout_error": self.heldout_error,
            "srank": None,
            "seconds": float(self.seconds),
        }
