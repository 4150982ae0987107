"""Image DataModules that yield [0, 1] pixels (the model normalises) with fixed, seeded splits.

Every split yields ``(images, labels, indices)`` by default: ``indices`` are the samples' indices
in their source (the idx file or the image folder), which seed the per-sample corruption and
attack noise, so a dense and a pruned model are scored on identical inputs whatever the
batching. ``calibration_dataloader()`` serves a fixed random subset of the training split for
``RobOPCallback(calibration="calibration")``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

__all__ = ["FashionMNISTDataModule", "ImageFolderDataModule", "find_fashion_mnist", "read_idx"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_HOW_TO_GET = (
    "Get Fashion-MNIST (MIT licence) with one of:\n"
    "  apt-get install -y dataset-fashion-mnist        (root; files in /usr/share/datasets/fashion-mnist)\n"
    "  python -m robop_lightning.assets fetch fashion-mnist   (no root; into $ROBOP_CACHE/fashion-mnist)\n"
    "  FashionMNISTDataModule(download=True)           (needs internet access to the torchvision mirrors)\n"
    "or pass root= a folder holding train-/t10k-{images-idx3,labels-idx1}-ubyte[.gz]."
)


def cache_dir() -> Path:
    """``$ROBOP_CACHE`` or ``~/.cache/robop_lightning``: where offline assets are kept."""
    return Path(os.environ.get("ROBOP_CACHE", Path.home() / ".cache" / "robop_lightning")).expanduser()


def _file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        # root itself, a `dpkg-deb -x` tree, or torchvision's layout
        dirs += [root, root / "usr/share/datasets/fashion-mnist", root / "FashionMNIST" / "raw"]
    cache = cache_dir() / "fashion-mnist"
    dirs += [_SYSTEM_DIR, cache, cache / "FashionMNIST" / "raw"]
    return dirs


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding all four Fashion-MNIST idx files, or ``None``.

    Searched in order: ``root`` (and ``root/usr/share/datasets/fashion-mnist``,
    ``root/FashionMNIST/raw``), ``/usr/share/datasets/fashion-mnist``,
    ``$ROBOP_CACHE/fashion-mnist`` (default ``~/.cache/robop_lightning/fashion-mnist``).

    Args:
        root: an extra folder searched first.

    Example:
        >>> folder = find_fashion_mnist()  # a Path, or None when no copy is installed
        >>> folder is None or any(folder.glob("t10k-labels-idx1-ubyte*"))
        True
    """
    for folder in _candidate_dirs(root):
        if all(_file(folder, stem) is not None for stem in _FILES.values()):
            return folder
    return None


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an idx file (``.gz`` or raw) of unsigned bytes into a uint8 tensor.

    Images (magic 2051) come back as ``(N, rows, cols)`` from byte offset 16, labels (magic
    2049) as ``(N,)`` from byte offset 8.

    Args:
        path: the file.

    Raises:
        ValueError: not an idx file of unsigned bytes, or truncated.

    Example:
        >>> import gzip, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
        >>> with gzip.open(path, "wb") as f:
        ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
        >>> read_idx(path).tolist()
        [7, 2, 9]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic not in (2049, 2051):
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {magic}, expected 2049 or 2051).")
    count = int.from_bytes(data[4:8], "big")
    if magic == 2049:
        shape, offset = (count,), 8
    else:
        shape, offset = (count, int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")), 16
    size = 1
    for s in shape:
        size *= s
    if len(data) < offset + size:
        raise ValueError(f"{path} is truncated: {len(data) - offset} bytes for {size} values.")
    return torch.frombuffer(bytearray(data[offset : offset + size]), dtype=torch.uint8).reshape(shape)


class _PixelDataset(Dataset):
    """uint8 images ``(N, H, W)`` -> float [0, 1] ``(C, S, S)``; returns (image, label[, source index])."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor,
        img_size: int,
        in_chans: int,
        return_indices: bool,
    ) -> None:
        self.images, self.labels, self.positions = images, labels, positions
        self.img_size, self.in_chans, self.return_indices = img_size, in_chans, return_indices

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        index = int(self.positions[i])
        image = self.images[index].float().div(255).unsqueeze(0)
        if image.shape[-1] != self.img_size or image.shape[-2] != self.img_size:
            image = F.interpolate(
                image.unsqueeze(0), size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                align_corners=False,
            )[0].clamp(0, 1)
        if self.in_chans == 3:
            image = image.expand(3, -1, -1).contiguous()
        label = torch.tensor(int(self.labels[index]))
        return (image, label, torch.tensor(index)) if self.return_indices else (image, label)


def _check_positive_int(what: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}.")


def _calibration_seed(seed: int, draw: int) -> int:
    """Seed of calibration draw ``draw``: ``seed + 1`` for draw 0 (the historical subset), then others."""
    if draw < 0:
        raise ValueError(f"calibration_draw must be >= 0 (0: the default subset), got {draw}.")
    return seed + 1 + 1_000_003 * draw


def _split(n: int, val_size: int, calibration_size: int, seed: int, draw: int = 0) -> tuple[torch.Tensor, ...]:
    """Fixed seeded split of ``range(n)``: (train, val, calibration subset of train); ``draw`` picks
    another calibration subset of the same training split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size].sort().values, order[val_size:].sort().values
    gen = torch.Generator().manual_seed(_calibration_seed(seed, draw))
    pick = torch.randperm(len(train), generator=gen)[:calibration_size]
    return train, val, train[pick.sort().values]


class _SplitDataModule(LightningDataModule):
    """The loaders shared by the vision DataModules: ``self._datasets`` maps split names to datasets."""

    batch_size: int
    num_workers: int
    _datasets: dict[str, Dataset]

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``"train"``, ``"val"``, ``"calibration"`` or ``"test"`` (after ``setup``)."""
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def calibration_dataloader(self) -> DataLoader:
        """The fixed calibration subset of the training split (``RobOPCallback(calibration="calibration")``)."""
        return self._loader("calibration")


class FashionMNISTDataModule(_SplitDataModule):
    """Fashion-MNIST (60k train, 10k test, 28 x 28 grey, 10 classes) from the idx files, offline.

    Lifecycle:

    * ``prepare_data``: with ``download=True`` and no local copy, torchvision downloads the
      files into ``$ROBOP_CACHE/fashion-mnist``; otherwise nothing.
    * ``setup``: find the files (see :func:`find_fashion_mnist`), read them (images at byte
      offset 16, labels at 8) and split: ``val_size`` random training images (seeded) are the
      validation split, the rest train; the calibration split is a fixed random subset of
      ``calibration_size`` training images; test is t10k.
    * ``train_dataloader`` (shuffled), ``val_dataloader``, ``test_dataloader``,
      ``calibration_dataloader`` (not shuffled).

    Args:
        root: a folder with the four idx files (``.gz`` or raw), searched before the defaults.
        img_size: output side (bilinear resize with antialiasing when not 28).
        in_chans: 1, or 3 to repeat the grey channel.
        batch_size: batch size of every loader.
        num_workers: dataloader workers.
        calibration_size: images in the calibration subset.
        val_size: training images held out for validation (0: no validation split).
        seed: seed of the splits.
        calibration_draw: which calibration subset: ``0`` the default one, ``d > 0`` another random
            subset of the same training split (train / val / test do not change).
        download: allow torchvision to download when no local copy exists (needs internet).
        return_indices: yield ``(images, labels, indices)`` (else ``(images, labels)``).

    Raises:
        ValueError: invalid arguments.
        FileNotFoundError: (in ``setup``) no local copy and ``download=False``; the message
            says how to get the files.

    Example:
        >>> dm = FashionMNISTDataModule(batch_size=64, calibration_size=256)
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> images, labels, indices = next(iter(dm.calibration_dataloader()))  # doctest: +SKIP
        >>> images.shape, float(images.max()) <= 1.0  # doctest: +SKIP
        (torch.Size([64, 1, 28, 28]), True)
    """

    num_classes = 10
    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | None = None,
        img_size: int = 28,
        in_chans: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        calibration_size: int = 1024,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = False,
        return_indices: bool = True,
        calibration_draw: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_int("img_size", img_size)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_workers", num_workers, 0)
        _check_positive_int("calibration_size", calibration_size)
        _check_positive_int("val_size", val_size, 0)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}.")
        if val_size >= 60000:
            raise ValueError(f"val_size must leave training images (< 60000), got {val_size}.")
        _calibration_seed(seed, calibration_draw)
        self.save_hyperparameters()
        self.root = root
        self.img_size, self.in_chans = img_size, in_chans
        self.batch_size, self.num_workers = batch_size, num_workers
        self.calibration_size, self.val_size, self.seed = calibration_size, val_size, seed
        self.download, self.return_indices = download, return_indices
        self.calibration_draw = calibration_draw
        self.folder: Path | None = None
        self._datasets: dict[str, _PixelDataset] = {}

    @override
    def prepare_data(self) -> None:
        if find_fashion_mnist(self.root) is None and self.download:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(cache_dir() / "fashion-mnist"), train=True, download=True)
            FashionMNIST(str(cache_dir() / "fashion-mnist"), train=False, download=True)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        folder = find_fashion_mnist(self.root)
        if folder is None and self.download:
            self.prepare_data()
            folder = find_fashion_mnist(self.root)
        if folder is None:
            searched = "\n".join(f"  {d}" for d in _candidate_dirs(self.root))
            raise FileNotFoundError(f"Fashion-MNIST not found; searched:\n{searched}\n{_HOW_TO_GET}")
        self.folder = folder
        data = {key: read_idx(_file(folder, stem)) for key, stem in _FILES.items()}
        for split in ("train", "test"):
            if len(data[f"{split}_images"]) != len(data[f"{split}_labels"]):
                raise ValueError(f"{folder}: {split} images and labels differ in count.")
        if self.calibration_size > len(data["train_images"]) - self.val_size:
            raise ValueError(f"calibration_size {self.calibration_size} exceeds the training split.")
        train, val, calibration = _split(len(data["train_images"]), self.val_size, self.calibration_size, self.seed,
                                         self.calibration_draw)

        def dataset(images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> _PixelDataset:
            return _PixelDataset(images, labels, positions, self.img_size, self.in_chans, self.return_indices)

        self._datasets = {
            "train": dataset(data["train_images"], data["train_labels"], train),
            "val": dataset(data["train_images"], data["train_labels"], val),
            "calibration": dataset(data["train_images"], data["train_labels"], calibration),
            "test": dataset(data["test_images"], data["test_labels"], torch.arange(len(data["test_images"]))),
        }


class _IndexedDataset(Dataset):
    """Wrap a dataset (optionally a subset of it) to also return each sample's source index."""

    def __init__(self, dataset: Dataset, positions: Sequence[int] | None, return_indices: bool) -> None:
        self.dataset = dataset
        self.positions = list(range(len(dataset))) if positions is None else [int(p) for p in positions]
        self.return_indices = return_indices

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        index = self.positions[i]
        image, label = self.dataset[index]
        return (image, label, index) if self.return_indices else (image, label)


class _UnitFloat:
    """uint8 ``(C, H, W)`` -> float in [0, 1]; float tensors pass through (timm's unnormalised transforms
    end in ``PILToTensor``, which keeps uint8)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return image.float().div_(255)
        return image.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ImageFolderDataModule(_SplitDataModule):
    """ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) as [0, 1] tensors.

    Evaluation splits (val, test, calibration) use timm's eval transform (resize, centre crop,
    ``crop_pct`` and interpolation from ``model_name``'s pretrained config via
    ``resolve_data_config``) **without** normalisation; the training split uses timm's training
    transform (random resized crop, flip, colour jitter), also unnormalised, unless
    ``augment=False``.

    Lifecycle: ``setup`` scans the folders (torchvision ``ImageFolder``) and fixes a seeded random
    calibration subset of the training split; the loaders are as in
    :class:`FashionMNISTDataModule`. The test split is ``root/test`` when it exists, else the
    validation folder.

    Args:
        root: folder containing ``train`` and ``val`` (or ``validation``) class folders.
        img_size: output side.
        batch_size: batch size of every loader.
        num_workers: dataloader workers.
        calibration_size: images in the calibration subset.
        seed: seed of the calibration subset.
        calibration_draw: which calibration subset: ``0`` the one of ``seed``, ``d > 0`` another one.
        model_name: timm model whose pretrained config gives ``crop_pct`` / interpolation
            (``None``: timm's defaults).
        crop_pct: override the centre-crop fraction.
        augment: random training augmentation (else the eval transform for training too).
        return_indices: yield ``(images, labels, indices)``.

    Raises:
        ValueError: invalid arguments.
        FileNotFoundError: (in ``setup``) ``root/train`` or the validation folder is missing.

    Example:
        >>> dm = ImageFolderDataModule("/data/imagenet", img_size=224, batch_size=64)  # doctest: +SKIP
        >>> dm.setup("test")  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        calibration_size: int = 1024,
        seed: int = 0,
        model_name: str | None = "deit_tiny_patch16_224",
        crop_pct: float | None = None,
        augment: bool = True,
        return_indices: bool = True,
        calibration_draw: int = 0,
    ) -> None:
        super().__init__()
        if not root:
            raise ValueError("root must be a folder with train/ and val/ class folders.")
        _check_positive_int("img_size", img_size)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("num_workers", num_workers, 0)
        _check_positive_int("calibration_size", calibration_size)
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}.")
        _calibration_seed(seed, calibration_draw)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.calibration_size, self.seed = calibration_size, seed
        self.model_name, self.crop_pct, self.augment = model_name, crop_pct, augment
        self.return_indices = return_indices
        self.calibration_draw = calibration_draw
        self._datasets: dict[str, Dataset] = {}
        self.num_classes: int | None = None
        self.classes: list[str] = []

    def transforms(self) -> tuple[Any, Any]:
        """``(train_transform, eval_transform)``: timm transforms to [0, 1] tensors, unnormalised."""
        from timm.data import create_transform, resolve_data_config

        pretrained_cfg: dict[str, Any] = {}
        if self.model_name is not None:
            import timm

            cfg = timm.models.get_pretrained_cfg(self.model_name)
            pretrained_cfg = cfg.to_dict() if cfg is not None else {}
        args: dict[str, Any] = {"input_size": (3, self.img_size, self.img_size)}
        if self.crop_pct is not None:
            args["crop_pct"] = self.crop_pct
        config = resolve_data_config(args, pretrained_cfg=pretrained_cfg)
        common = {"input_size": config["input_size"], "interpolation": config["interpolation"], "normalize": False}
        from torchvision.transforms import Compose

        eval_transform = Compose([create_transform(is_training=False, crop_pct=config["crop_pct"], **common), _UnitFloat()])
        if not self.augment:
            return eval_transform, eval_transform
        return Compose([create_transform(is_training=True, **common), _UnitFloat()]), eval_transform

    @override
    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        from torchvision.datasets import ImageFolder

        train_dir = self.root / "train"
        val_dir = next((self.root / n for n in ("val", "validation") if (self.root / n).is_dir()), None)
        if not train_dir.is_dir() or val_dir is None:
            raise FileNotFoundError(
                f"{self.root} needs train/ and val/ (or validation/) folders with one sub-folder per class."
            )
        test_dir = self.root / "test" if (self.root / "test").is_dir() else val_dir
        train_transform, eval_transform = self.transforms()
        train = ImageFolder(str(train_dir), transform=train_transform)
        train_eval = ImageFolder(str(train_dir), transform=eval_transform)
        val = ImageFolder(str(val_dir), transform=eval_transform)
        test = val if test_dir == val_dir else ImageFolder(str(test_dir), transform=eval_transform)
        for other in (val, test):
            if other.classes != train.classes:
                raise ValueError(f"{self.root}: the class folders of train/ and {Path(other.root).name}/ differ.")
        self.classes, self.num_classes = list(train.classes), len(train.classes)
        n = min(self.calibration_size, len(train))
        seed = self.seed if not self.calibration_draw else _calibration_seed(self.seed, self.calibration_draw)
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        self._datasets = {
            "train": _IndexedDataset(train, None, self.return_indices),
            "val": _IndexedDataset(val, None, self.return_indices),
            "test": _IndexedDataset(test, None, self.return_indices),
            "calibration": _IndexedDataset(train_eval, pick.tolist(), self.return_indices),
        }
