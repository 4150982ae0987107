"""Clean, corrupted and adversarial accuracy in one pass, plus relative mCE (docs/evaluation.md).

:class:`RobustnessEvaluator` is an ``nn.Module`` holding one torchmetrics ``MetricCollection``
(micro ``MulticlassAccuracy``) per condition, cloned with a prefix / postfix so that the logged
names carry the threat model::

    test/clean_acc
    test/corrupt_acc                     mean over every corruption x severity
    test/corrupt_acc/gaussian_noise      one corruption, mean over its severities
    test/corrupt_acc/gaussian_noise@3    one corruption at one severity
    test/adv_acc@linf_4/255              PGD (``linf_<eps>`` or ``l2_<eps>``)
    test/fgsm_acc@4/255                  FGSM (L-inf)

Every condition sees the same samples, so the micro mean over all corrupted predictions equals
the mean of the per-condition accuracies. Corruption and attack noise are seeded per sample from
the dataset index (pass ``indices``), so a dense and a pruned model are scored on identical
inputs. Held-out corruptions (``speckle_noise``, ``gaussian_blur``, ``saturate``) get their
per-condition names but stay out of ``corrupt_acc``'s mean.

:func:`evaluate_robustness` is the one call for a plain model and a dataloader;
:func:`relative_mce` compares a pruned model's results with the dense model's. With
``per_sample=True`` both also keep each sample's correctness under every condition (same names),
for paired comparisons of two models on the same inputs (``robustness.stats``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    >>> data = [(torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,)))]
    >>> results = evaluate_robustness(model, data, corruptions=("contrast",), severities=(1, 5),
    ...                               eps=(2 / 255,), steps=2)
    >>> sorted(results)[:3]
    ['test/adv_acc@linf_2/255', 'test/clean_acc', 'test/corrupt_acc']
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from robop_lightning.robustness.attacks import fgsm, pgd
from robop_lightning.robustness.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, HELD_OUT_CORRUPTIONS, corrupt

__all__ = [
    "RobustnessEvaluator",
    "evaluate_robustness",
    "relative_mce",
    "mce",
    "corruption_errors",
    "format_eps",
    "SMALL_IMAGE_EPS",
    "IMAGENET_EPS",
]

SMALL_IMAGE_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
IMAGENET_EPS: tuple[float, ...] = (0.5 / 255, 1 / 255, 2 / 255, 4 / 255)
_NAME = re.compile(r"^(?:(?P<stage>.+)/)?corrupt_acc/(?P<corruption>[a-z_]+)@(?P<severity>\d+)$")


def format_eps(eps: float) -> str:
    """``k/255`` for multiples of 0.5/255 (``4/255``, ``0.5/255``), else ``%g``.

    Args:
        eps: an attack radius.

    Example:
        >>> format_eps(4 / 255), format_eps(0.5 / 255), format_eps(0.25)
        ('4/255', '0.5/255', '0.25')
    """
    halves = eps * 255 * 2
    if abs(halves - round(halves)) < 1e-6 and round(halves) != 0:
        return f"{round(halves) / 2:g}/255"
    return f"{eps:g}"


class RobustnessEvaluator(nn.Module):
    """Clean / corrupted / adversarial top-1 accuracy, one torchmetrics collection per condition.

    Lifecycle: build once (it is an ``nn.Module``: make it an attribute of the LightningModule so
    its states move with the device); call :meth:`update` on every batch; log :meth:`collections`
    (``self.log_dict(c)`` for each, the metric objects themselves) or read :meth:`compute`;
    :meth:`reset` between epochs when not logging through Lightning.

    Args:
        num_classes: number of classes.
        prefix: the stage, such as ``"test"`` or ``"val"`` (names start ``"<prefix>/"``).
        corruptions: names from :data:`~robop_lightning.robustness.corruptions.CORRUPTIONS` /
            ``HELD_OUT_CORRUPTIONS`` (empty: no corrupted conditions).
        severities: severities 1..5 to evaluate.
        eps: PGD radii (empty: no attack). Defaults per image size are :data:`SMALL_IMAGE_EPS`
            and :data:`IMAGENET_EPS`.
        norm: PGD norm, ``"linf"`` or ``"l2"``.
        steps: PGD steps (10 while developing, >= 50 with restarts for reported numbers).
        restarts: PGD random restarts.
        fgsm: also run FGSM (L-inf) at every eps.
        seed: seed of the corruption and attack noise.
        table: corruption parameter table, ``"imagenet"``, ``"small"`` or ``None`` (by image size).
        per_sample: also keep every sample's correctness (see :meth:`per_sample_correct`); kept on
            the CPU, in update order, per process (not synchronised across DDP ranks).

    Raises:
        ValueError: unknown corruption, severity outside 1..5, non-positive eps, bad norm, steps
            or restarts.

    Example:
        >>> evaluator = RobustnessEvaluator(10, corruptions=["gaussian_noise"], severities=[1], eps=[])
        >>> evaluator.names
        ['test/clean_acc', 'test/corrupt_acc', 'test/corrupt_acc/gaussian_noise', 'test/corrupt_acc/gaussian_noise@1']
    """

    def __init__(
        self,
        num_classes: int,
        prefix: str = "test",
        corruptions: Sequence[str] = CORRUPTIONS,
        severities: Sequence[int] = (1, 2, 3, 4, 5),
        eps: Sequence[float] = SMALL_IMAGE_EPS,
        norm: str = "linf",
        steps: int = 10,
        restarts: int = 1,
        fgsm: bool = True,
        seed: int = 0,
        table: str | None = None,
        per_sample: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(corruptions, str):
            raise ValueError(f"corruptions must be a list of names, got the string {corruptions!r}.")
        unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruptions {unknown}: use names from {', '.join(ALL_CORRUPTIONS)}.")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in severities):
            raise ValueError(f"severities must be integers in 1..5, got {list(severities)!r}.")
        if any(isinstance(e, bool) or not isinstance(e, (int, float)) or e <= 0 for e in eps):
            raise ValueError(f"eps must be positive radii such as 4 / 255, got {list(eps)!r}.")
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be a positive integer, got {restarts!r}.")
        if table not in (None, "imagenet", "small"):
            raise ValueError(f"table must be 'imagenet', 'small' or None, got {table!r}.")
        self.num_classes = int(num_classes)
        self.prefix = prefix.rstrip("/")
        self.corruptions = list(dict.fromkeys(corruptions))
        self.severities = sorted(set(severities)) if self.corruptions else []
        self.eps = [float(e) for e in eps]
        self.norm, self.steps, self.restarts, self.fgsm = norm, steps, restarts, bool(fgsm) and bool(eps)
        self.seed, self.table = int(seed), table
        self.per_sample = bool(per_sample)
        self._correct: dict[str, list[torch.Tensor]] = {}  # condition key -> per-batch bool (per_sample only)

        base = MetricCollection({"acc": MulticlassAccuracy(num_classes=self.num_classes, average="micro")})
        stage = self.prefix
        conditions: dict[str, MetricCollection] = {"clean": base.clone(prefix=f"{stage}/clean_")}
        if any(c in CORRUPTIONS for c in self.corruptions):
            conditions["corrupt"] = base.clone(prefix=f"{stage}/corrupt_")
        for name in self.corruptions:
            conditions[f"corrupt|{name}"] = base.clone(prefix=f"{stage}/corrupt_", postfix=f"/{name}")
            for severity in self.severities:
                conditions[f"corrupt|{name}|{severity}"] = base.clone(
                    prefix=f"{stage}/corrupt_", postfix=f"/{name}@{severity}"
                )
        for e in self.eps:
            conditions[f"adv|{e!r}"] = base.clone(prefix=f"{stage}/adv_", postfix=f"@{norm}_{format_eps(e)}")
            if self.fgsm:
                conditions[f"fgsm|{e!r}"] = base.clone(prefix=f"{stage}/fgsm_", postfix=f"@{format_eps(e)}")
        # nn.ModuleDict keys may not contain "."; the logged names live in the collections
        self._keys = list(conditions)
        self.metrics = nn.ModuleDict({_module_key(i): c for i, c in enumerate(conditions.values())})

    @property
    def needs_grad(self) -> bool:
        """Whether :meth:`update` runs attacks (``Trainer(inference_mode=False)`` needed)."""
        return bool(self.eps)

    @property
    def names(self) -> list[str]:
        """The logged metric names, in order."""
        return [name for collection in self.collections() for name in collection.keys(keep_base=False)]

    def collections(self) -> list[MetricCollection]:
        """One ``MetricCollection`` per condition (log each with ``self.log_dict``)."""
        return list(self.metrics.values())

    def _metric(self, key: str) -> MetricCollection:
        return self.metrics[_module_key(self._keys.index(key))]

    def update(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        """Score one batch under every condition.

        Args:
            model: maps [0, 1] images to logits (normalising inside); evaluated in ``eval()``
                mode for the attacks.
            images: ``(N, C, H, W)`` in [0, 1].
            labels: ``(N,)`` classes.
            indices: dataset indices of the batch (seeds the corruption / attack noise); ``None``
                uses ``0 .. N-1``, which pairs runs only if batches are identical.

        Raises:
            RuntimeError: attacks requested under ``torch.inference_mode``.
        """
        labels = labels.long()
        with torch.no_grad():
            logits = _logits(model, images)
            self._metric("clean").update(logits, labels)
            self._record("clean", logits.argmax(-1) == labels)
            for name in self.corruptions:
                for severity in self.severities:
                    corrupted = corrupt(images, name, severity, seed=self.seed, table=self.table, indices=indices)
                    preds = _logits(model, corrupted).argmax(-1)
                    self._metric(f"corrupt|{name}|{severity}").update(preds, labels)
                    self._record(f"corrupt|{name}|{severity}", preds == labels)
                    self._metric(f"corrupt|{name}").update(preds, labels)
                    if name not in HELD_OUT_CORRUPTIONS:
                        self._metric("corrupt").update(preds, labels)
        for e in self.eps:
            _, robust = pgd(
                model, images, labels, e, steps=self.steps, norm=self.norm, restarts=self.restarts,
                seed=self.seed, indices=indices, return_success=True,
            )
            self._metric(f"adv|{e!r}").update(_robust_preds(robust, labels, self.num_classes), labels)
            self._record(f"adv|{e!r}", robust)
            if self.fgsm:
                _, robust = fgsm(model, images, labels, e, return_success=True)
                self._metric(f"fgsm|{e!r}").update(_robust_preds(robust, labels, self.num_classes), labels)
                self._record(f"fgsm|{e!r}", robust)

    def _record(self, key: str, correct: torch.Tensor) -> None:
        if self.per_sample:
            self._correct.setdefault(key, []).append(correct.detach().to("cpu", torch.bool))

    def compute(self) -> dict[str, float]:
        """Every condition's accuracy as floats, keyed by the logged names."""
        out: dict[str, float] = {}
        for collection in self.collections():
            out.update({k: float(v) for k, v in collection.compute().items()})
        return out

    def per_sample_correct(self) -> dict[str, torch.Tensor]:
        """Each sample's correctness under every condition, keyed by the logged names (``per_sample=True``).

        A ``(N,)`` float tensor per name, samples in :meth:`update` order: 0 / 1 for one condition;
        for ``corrupt_acc/<name>`` and ``corrupt_acc`` the fraction of the sample's corrupted
        variants classified correctly (its severities; every main corruption x severity). Each
        tensor's mean is the accuracy :meth:`compute` reports under that name.

        Raises:
            RuntimeError: the evaluator was built without ``per_sample=True``.
        """
        if not self.per_sample:
            raise RuntimeError("per_sample_correct() needs RobustnessEvaluator(..., per_sample=True).")
        correct = {key: torch.cat(parts).double() for key, parts in self._correct.items()}
        out: dict[str, torch.Tensor] = {}
        for key in self._keys:
            name = next(iter(self._metric(key).keys(keep_base=False)))
            if key in correct:
                out[name] = correct[key]
            elif key.startswith("corrupt|"):  # a corruption's mean over its severities
                parts = [correct[f"{key}|{s}"] for s in self.severities if f"{key}|{s}" in correct]
                if parts:
                    out[name] = torch.stack(parts).mean(0)
            elif key == "corrupt":  # every main corruption x severity
                parts = [correct[f"corrupt|{c}|{s}"] for c in self.corruptions if c not in HELD_OUT_CORRUPTIONS
                         for s in self.severities if f"corrupt|{c}|{s}" in correct]  # fmt: skip
                if parts:
                    out[name] = torch.stack(parts).mean(0)
        return out

    def reset(self) -> None:
        """Clear every metric's state (and the per-sample record)."""
        for collection in self.collections():
            collection.reset()
        self._correct.clear()


def evaluate_robustness(
    model: nn.Module,
    dataloader: Iterable[Any],
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    eps: Sequence[float] = SMALL_IMAGE_EPS,
    steps: int = 10,
    max_batches: int | None = None,
    seed: int = 0,
    norm: str = "linf",
    restarts: int = 1,
    fgsm: bool = True,
    table: str | None = None,
    num_classes: int | None = None,
    prefix: str = "test",
    device: torch.device | str | None = None,
    per_sample: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Clean, corrupted and adversarial accuracy of a model over a dataloader, in one call.

    Batches are ``(images, labels)`` or ``(images, labels, dataset_indices)``; without indices
    the samples are numbered in loader order (pairs dense and pruned runs only with an
    unshuffled loader). The model is put in ``eval()`` and restored afterwards.

    Args:
        model: maps [0, 1] images to logits (a :class:`~robop_lightning.models.DeiTClassifier`
            or any module normalising inside).
        dataloader: yields the batches.
        corruptions: corruption names (empty for none).
        severities: severities to evaluate.
        eps: PGD / FGSM radii (empty for none).
        steps: PGD steps.
        max_batches: stop after this many batches (``None``: all).
        seed: corruption and attack seed.
        norm: PGD norm.
        restarts: PGD restarts.
        fgsm: also run FGSM.
        table: corruption table (``None``: by image size).
        num_classes: classes (``None``: read from the first batch's logits).
        prefix: name prefix (``"test"``).
        device: where to run (``None``: the model's device).
        per_sample: also return each sample's correctness, in loader order
            (:meth:`RobustnessEvaluator.per_sample_correct`); two models evaluated on the same
            unshuffled loader are then paired sample by sample.

    Returns:
        ``{name: accuracy}`` with the names of :class:`RobustnessEvaluator`; with
        ``per_sample=True`` the tuple ``(accuracies, {name: (N,) per-sample correctness})``.

    Raises:
        ValueError: empty dataloader or invalid arguments.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> data = [(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))]
        >>> evaluate_robustness(model, data, corruptions=(), eps=())
        {'test/clean_acc': ...}
    """
    if device is None:
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    evaluator: RobustnessEvaluator | None = None
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    offset = 0
    try:
        for batch in islice(dataloader, max_batches):
            images, labels, indices = _unpack(batch)
            images, labels = images.to(device), labels.to(device)
            if indices is None:
                indices = torch.arange(offset, offset + images.shape[0])
            offset += images.shape[0]
            if evaluator is None:
                if num_classes is None:
                    with torch.no_grad():
                        num_classes = int(_logits(model, images[:1]).shape[-1])
                evaluator = RobustnessEvaluator(
                    num_classes, prefix, corruptions, severities, eps, norm, steps, restarts, fgsm, seed, table,
                    per_sample=per_sample,
                ).to(device)
            evaluator.update(model, images, labels, indices)
    finally:
        for module, mode in training:
            module.training = mode
    if evaluator is None:
        raise ValueError("the dataloader yielded no batches.")
    if per_sample:
        return evaluator.compute(), evaluator.per_sample_correct()
    return evaluator.compute()


# --------------------------------------------------------------------------- mCE
def corruption_errors(results: Mapping[str, Any]) -> tuple[float, dict[str, dict[int, float]]]:
    """Clean error and ``{corruption: {severity: error}}`` from a results dict.

    Args:
        results: names such as ``test/clean_acc`` and ``test/corrupt_acc/<name>@<severity>`` to
            accuracies (floats or 0-d tensors), as returned by :func:`evaluate_robustness` or
            found in ``trainer.callback_metrics``.

    Returns:
        ``(clean_error, errors)`` with errors = 1 - accuracy.

    Raises:
        ValueError: no clean accuracy or no per-severity corruption accuracy in ``results``.

    Example:
        >>> corruption_errors({"test/clean_acc": 0.9, "test/corrupt_acc/contrast@1": 0.75})
        (0.09999999999999998, {'contrast': {1: 0.25}})
    """
    clean = [float(v) for k, v in results.items() if k == "clean_acc" or k.endswith("/clean_acc")]
    if len(clean) != 1:
        raise ValueError(f"results need exactly one '<stage>/clean_acc', found {len(clean)}.")
    errors: dict[str, dict[int, float]] = {}
    for key, value in results.items():
        match = _NAME.match(key)
        if match:
            errors.setdefault(match["corruption"], {})[int(match["severity"])] = 1.0 - float(value)
    if not errors:
        raise ValueError("results hold no '<stage>/corrupt_acc/<corruption>@<severity>' entries.")
    return 1.0 - clean[0], errors


def relative_mce(
    pruned: Mapping[str, Any], dense: Mapping[str, Any], corruptions: Sequence[str] | None = None
) -> float:
    r"""Relative mean corruption error of a pruned model against its dense model (Hendrycks).

    For every corruption c present in both (main corruptions only by default),

    .. math:: \mathrm{RelCE}_c = \frac{\sum_s (E^{pruned}_{s,c} - E^{pruned}_{clean})}
                                      {\sum_s (E^{dense}_{s,c} - E^{dense}_{clean})}

    summed over the severities both have, and the relative mCE is the mean over c: how much
    more the pruned model degrades under corruption than the dense one, its clean error
    removed (1 = the same degradation). Corruptions on which the dense model does not degrade
    (denominator <= 0) are skipped; ``nan`` if none is left.

    Args:
        pruned: the pruned model's results (see :func:`corruption_errors`).
        dense: the dense (reference) model's results.
        corruptions: which corruptions to average (``None``: every main corruption present in
            both, held-out ones excluded).

    Raises:
        ValueError: the results lack clean or per-severity corrupted accuracies.

    Example:
        >>> dense = {"test/clean_acc": 0.9, "test/corrupt_acc/contrast@1": 0.8, "test/corrupt_acc/contrast@2": 0.6}
        >>> pruned = {"test/clean_acc": 0.85, "test/corrupt_acc/contrast@1": 0.7, "test/corrupt_acc/contrast@2": 0.5}
        >>> round(relative_mce(pruned, dense), 6)  # (0.15 + 0.35) / (0.1 + 0.3)
        1.25
    """
    return _mean_ratio(pruned, dense, corruptions, relative=True)


def mce(pruned: Mapping[str, Any], dense: Mapping[str, Any], corruptions: Sequence[str] | None = None) -> float:
    r"""Mean corruption error against the dense model: mean over c of
    :math:`\sum_s E^{pruned}_{s,c} / \sum_s E^{dense}_{s,c}` (Hendrycks' mCE with the dense model
    in AlexNet's place).

    Args:
        pruned: the pruned model's results.
        dense: the dense model's results.
        corruptions: which corruptions (``None``: main corruptions present in both).

    Raises:
        ValueError: the results lack clean or per-severity corrupted accuracies.

    Example:
        >>> dense = {"test/clean_acc": 0.9, "test/corrupt_acc/contrast@1": 0.8}
        >>> round(mce({"test/clean_acc": 0.9, "test/corrupt_acc/contrast@1": 0.7}, dense), 6)
        1.5
    """
    return _mean_ratio(pruned, dense, corruptions, relative=False)


def _mean_ratio(
    pruned: Mapping[str, Any], dense: Mapping[str, Any], corruptions: Sequence[str] | None, relative: bool
) -> float:
    pruned_clean, pruned_errors = corruption_errors(pruned)
    dense_clean, dense_errors = corruption_errors(dense)
    names = corruptions if corruptions is not None else [c for c in pruned_errors if c not in HELD_OUT_CORRUPTIONS]
    ratios = []
    for name in names:
        if name not in pruned_errors or name not in dense_errors:
            continue
        severities = sorted(set(pruned_errors[name]) & set(dense_errors[name]))
        shift_p = pruned_clean if relative else 0.0
        shift_d = dense_clean if relative else 0.0
        numerator = sum(pruned_errors[name][s] - shift_p for s in severities)
        denominator = sum(dense_errors[name][s] - shift_d for s in severities)
        if severities and denominator > 0:
            ratios.append(numerator / denominator)
    return sum(ratios) / len(ratios) if ratios else math.nan


# --------------------------------------------------------------------------- helpers
def _module_key(i: int) -> str:
    return f"condition_{i}"


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if isinstance(out, (tuple, list)):
        out = sum(out) / len(out)
    return out.float()


def _robust_preds(robust: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class predictions whose accuracy is the robust accuracy: the label where robust, else a wrong class."""
    return torch.where(robust, labels, (labels + 1) % num_classes)


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["images"], batch["labels"], batch.get("indices")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise ValueError("batches must be (images, labels) or (images, labels, dataset_indices).")
