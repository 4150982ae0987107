"""Vision DataModules: the idx reader on hand-made and real Fashion-MNIST files, image folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from robop_lightning.callback import RobOPCallback
from robop_lightning.data import FashionMNISTDataModule, ImageFolderDataModule
from robop_lightning.data import vision
from robop_lightning.data.vision import find_fashion_mnist, read_idx
from robop_lightning.models import DeiTClassifier


pytestmark = pytest.mark.usefixtures("one_thread")


def write_idx(path: Path, values: torch.Tensor, compress: bool = True) -> None:
    """An idx file of unsigned bytes: magic 2049 (labels) / 2051 (images), big-endian sizes."""
    header = (2051 if values.dim() == 3 else 2049).to_bytes(4, "big")
    header += b"".join(int(s).to_bytes(4, "big") for s in values.shape)
    payload = header + values.to(torch.uint8).numpy().tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fake_fashion_mnist(folder: Path, train: int = 300, test: int = 50, compress: bool = True) -> None:
    """The four files with known content: image i has every pixel = i % 256, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n in (("train", train), ("t10k", test)):
        images = (torch.arange(n) % 256).view(n, 1, 1).expand(n, 28, 28)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", torch.arange(n) % 10, compress)


def test_read_idx_offsets_and_errors(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4))
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels", torch.tensor([9, 0, 3]), compress=False)
    assert torch.equal(read_idx(tmp_path / "images.gz"), images.to(torch.uint8))  # from byte 16
    assert read_idx(tmp_path / "labels").tolist() == [9, 0, 3]  # from byte 8
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x02" + bytes(12))
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "labels").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_splits_from_local_files(tmp_path, compress):
    fake_fashion_mnist(tmp_path, compress=compress)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=32, val_size=60, calibration_size=40, seed=3)
    dm.setup("fit")
    assert dm.folder == tmp_path
    train, val, calibration, test = (dm.dataset(s) for s in ("train", "val", "calibration", "test"))
    assert (len(train), len(val), len(calibration), len(test)) == (240, 60, 40, 50)
    train_ids = set(train.positions.tolist())
    assert train_ids.isdisjoint(val.positions.tolist()) and set(calibration.positions.tolist()) <= train_ids
    image, label, index = test[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 7 / 255)) and int(label) == 7 and int(index) == 7
    for images, labels, indices in dm.calibration_dataloader():  # values identify the source sample
        assert torch.equal(images[:, 0, 0, 0], (indices % 256).float() / 255) and torch.equal(labels, indices % 10)
    # the same seed gives the same split, another seed another one
    again = FashionMNISTDataModule(root=str(tmp_path), val_size=60, calibration_size=40, seed=3)
    other = FashionMNISTDataModule(root=str(tmp_path), val_size=60, calibration_size=40, seed=4)
    assert torch.equal(again.dataset("calibration").positions, calibration.positions)
    assert not torch.equal(other.dataset("calibration").positions, calibration.positions)


def test_fashion_mnist_calibration_draws_change_only_the_calibration_subset(tmp_path):
    fake_fashion_mnist(tmp_path)
    make = lambda draw: FashionMNISTDataModule(root=str(tmp_path), val_size=60, calibration_size=40, seed=3,  # noqa: E731
                                               calibration_draw=draw)
    draws = [make(d) for d in (0, 1, 2, 1)]
    positions = lambda dm, split: dm.dataset(split).positions  # noqa: E731
    assert torch.equal(positions(draws[0], "calibration"),
                       FashionMNISTDataModule(root=str(tmp_path), val_size=60, calibration_size=40, seed=3)
                       .dataset("calibration").positions)  # draw 0 is the default subset
    assert torch.equal(positions(draws[1], "calibration"), positions(draws[3], "calibration"))
    assert len({tuple(positions(dm, "calibration").tolist()) for dm in draws[:3]}) == 3
    for dm in draws[1:3]:
        assert set(positions(dm, "calibration").tolist()) <= set(positions(dm, "train").tolist())
        for split in ("train", "val", "test"):
            assert torch.equal(positions(dm, split), positions(draws[0], split))
    with pytest.raises(ValueError, match="calibration_draw"):
        make(-1)


def test_fashion_mnist_channels_size_and_plain_pairs(tmp_path):
    fake_fashion_mnist(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), img_size=32, in_chans=3, val_size=10, calibration_size=8,
                                return_indices=False)  # fmt: skip
    batch = next(iter(dm.test_dataloader()))
    assert len(batch) == 2 and batch[0].shape == (50, 3, 32, 32)
    assert batch[0].min() >= 0 and batch[0].max() <= 1 and torch.equal(batch[0][:, 0], batch[0][:, 2])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "_SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path / "cache"))
    assert find_fashion_mnist(tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError) as error:
        FashionMNISTDataModule(root=str(tmp_path / "nothing")).setup("fit")
    message = str(error.value)
    for hint in ("apt-get install -y dataset-fashion-mnist", "python -m robop_lightning.assets fetch fashion-mnist",
                 "download=True", str(tmp_path / "cache" / "fashion-mnist")):  # fmt: skip
        assert hint in message
    # the cache folder is searched: files placed there are found without root
    fake_fashion_mnist(tmp_path / "cache" / "fashion-mnist")
    assert find_fashion_mnist() == tmp_path / "cache" / "fashion-mnist"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="in_chans"):
        FashionMNISTDataModule(in_chans=2)
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="crop_pct"):
        ImageFolderDataModule("/data", crop_pct=1.5)


REAL = find_fashion_mnist()


@pytest.mark.skipif(
    REAL is None,
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist, or "
    "python -m robop_lightning.assets fetch fashion-mnist (into $ROBOP_CACHE/fashion-mnist)",
)
def test_real_fashion_mnist_and_robop_calibration(tmp_path):
    dm = FashionMNISTDataModule(batch_size=64, calibration_size=128, val_size=5000)
    dm.setup("test")
    train, test = dm.dataset("train"), dm.dataset("test")
    assert len(train) == 55000 and len(dm.dataset("val")) == 5000 and len(test) == 10000
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10  # all 60k
    assert int(test.labels[0]) == 9  # the first test image is an ankle boot
    mean = train.images.float().mean().item() / 255
    assert mean == pytest.approx(0.286, abs=0.002)  # Fashion-MNIST's published pixel mean
    images, labels, indices = next(iter(dm.calibration_dataloader()))
    assert images.shape == (64, 1, 28, 28) and images.min() >= 0 and images.max() <= 1

    # RobOPCallback finds the datamodule's calibration_dataloader() by name and prunes before testing
    torch.manual_seed(0)
    model = DeiTClassifier(num_classes=10, img_size=28, in_chans=1,
                           model_kwargs=dict(patch_size=7, embed_dim=32, depth=2, num_heads=2))  # fmt: skip
    robop = RobOPCallback(sparsity=0.5, solver="wanda", uncertainty="baseline", calibration_dataloader="calibration",
                          calibration_batches=2, progress=False, verbose=False)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", callbacks=[robop], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_test_batches=2)  # fmt: skip
    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    assert "test/clean_acc" in results and robop.pruned
    fc1 = model.model.blocks[0].mlp.fc1.weight
    assert (fc1 == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_image_folder_datamodule(tmp_path):
    colours = {"black": (0, 0, 0), "white": (255, 255, 255)}
    for split in ("train", "val"):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(tmp_path / split / name / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), img_size=32, batch_size=4, calibration_size=4, model_name=None)
    dm.setup("fit")
    assert dm.classes == ["black", "white"] and dm.num_classes == 2
    images, labels, indices = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    # not normalised: black is 0 and white is 1 exactly (the model normalises)
    for image, label in zip(images, labels):
        assert torch.allclose(image, torch.full_like(image, float(label)), atol=1e-6)
    assert len(dm.dataset("calibration")) == 4 and set(dm.dataset("calibration").positions) <= set(range(6))
    train_images, _, _ = next(iter(dm.train_dataloader()))
    assert train_images.shape == (4, 3, 32, 32) and train_images.min() >= 0 and train_images.max() <= 1
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup("fit")
