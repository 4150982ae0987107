"""Corruptions, PGD / FGSM and the robustness metrics on real tiny models (CPU)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from robop_lightning.models import DeiTClassifier
from robop_lightning.robustness import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    HELD_OUT_CORRUPTIONS,
    RobustnessEvaluator,
    corrupt,
    evaluate_robustness,
    fgsm,
    mce,
    pgd,
    relative_mce,
    uniform_noise,
)
from robop_lightning.robustness.corruptions import corruption_parameter

RANDOM_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "elastic_transform")
# Hendrycks' own tables are not monotone in pixel change for these two: elastic severity 1 has the
# largest random affine, saturate severity 1 removes 70 % of the saturation (severity 5 multiplies it)
NON_MONOTONE = ("elastic_transform", "saturate")


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """Natural-image-like inputs: low-resolution noise upsampled (edges, smooth regions)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, max(2, side // 4), max(2, side // 4), generator=g)
    return torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- corruptions
@pytest.mark.parametrize(("channels", "side", "table"), [(1, 28, None), (3, 32, None), (3, 64, "imagenet")])
def test_every_corruption_is_valid(channels, side, table):
    images = smooth_images(3, channels, side)
    before = images.clone()
    for name in ALL_CORRUPTIONS:
        for severity in (1, 5):
            out = corrupt(images, name, severity, table=table)
            assert out.shape == images.shape and out.dtype == images.dtype, name
            assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all(), name
            assert not torch.equal(out, images) or (name == "saturate" and channels == 1), f"{name}@{severity} is a no-op"
    assert torch.equal(images, before)  # the input is never modified


def test_corruption_lists():
    assert set(CORRUPTIONS).isdisjoint(HELD_OUT_CORRUPTIONS)
    assert len(CORRUPTIONS) == 11 and set(HELD_OUT_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "saturate"}


def test_table_chosen_by_image_size():
    assert corruption_parameter("gaussian_noise", 1, "small") == 0.04
    small = torch.full((1, 3, 32, 32), 0.5)
    large = torch.full((1, 3, 64, 64), 0.5)
    assert (corrupt(small, "gaussian_noise", 1) - small).std() == pytest.approx(0.04, rel=0.1)  # CIFAR-10-C
    assert (corrupt(large, "gaussian_noise", 1) - large).std() == pytest.approx(0.08, rel=0.1)  # ImageNet-C
    assert (corrupt(small, "gaussian_noise", 1, table="imagenet") - small).std() == pytest.approx(0.08, rel=0.1)


def test_closed_form_corruptions():
    images = smooth_images(2, 3, 32, seed=1)
    means = images.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(images, "contrast", 2), ((images - means) * 0.5 + means).clamp(0, 1))
    grey = smooth_images(2, 1, 28, seed=2)
    torch.testing.assert_close(corrupt(grey, "brightness", 5), (grey + 0.3).clamp(0, 1))
    # RGB brightness raises V = max_c by c and keeps hue and saturation: x * min(V + c, 1) / V
    value = images.amax(1, keepdim=True)
    torch.testing.assert_close(corrupt(images, "brightness", 1), images * (value + 0.05).clamp(max=1) / value)
    mid = torch.full((4, 3, 32, 32), 0.5)
    hit = (corrupt(mid, "impulse_noise", 5) != 0.5).float().mean()
    assert hit == pytest.approx(0.07, abs=0.015)  # each element replaced with probability a
    assert set(corrupt(mid, "impulse_noise", 5).unique().tolist()) == {0.0, 0.5, 1.0}
    shot = corrupt(mid, "shot_noise", 1)  # Poisson(500 x) / 500: multiples of 1/500
    assert torch.allclose(shot * 500, (shot * 500).round(), atol=1e-3)


def test_corruptions_are_seeded_per_sample():
    images = smooth_images(6, 3, 32, seed=3)
    indices = torch.tensor([10, 11, 12, 13, 14, 15])
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    for name in ALL_CORRUPTIONS:
        first = corrupt(images, name, 3, seed=7, indices=indices)
        assert torch.equal(first, corrupt(images, name, 3, seed=7, indices=indices)), name
        # batch composition does not matter: shuffled, or one sample alone
        shuffled = corrupt(images[perm], name, 3, seed=7, indices=indices[perm])
        torch.testing.assert_close(shuffled, first[perm], atol=1e-6, rtol=0, msg=name)
        alone = corrupt(images[2:3], name, 3, seed=7, indices=indices[2:3])
        torch.testing.assert_close(alone, first[2:3], atol=1e-6, rtol=0, msg=name)
        if name in RANDOM_CORRUPTIONS:
            assert not torch.equal(first, corrupt(images, name, 3, seed=8, indices=indices)), name
            assert not torch.equal(first, corrupt(images, name, 3, seed=7, indices=indices + 1)), name


@pytest.mark.parametrize(("channels", "side"), [(1, 28), (3, 32), (3, 64)])
def test_severity_five_is_stronger_than_one(channels, side):
    images = smooth_images(4, channels, side, seed=4)
    for name in ALL_CORRUPTIONS:
        if name in NON_MONOTONE or (name == "saturate" and channels == 1):
            continue
        change = [(corrupt(images, name, s) - images).abs().mean().item() for s in (1, 5)]
        assert change[1] > change[0], f"{name}: mean |x' - x| {change}"


def test_corruption_argument_errors():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(torch.rand(2, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match="one dataset index per image"):
        corrupt(images, "contrast", 1, indices=[0])
    with pytest.raises(ValueError, match="table"):
        corrupt(images, "contrast", 1, table="cifar")


# --------------------------------------------------------------------------- a trained model
def synthetic_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a smooth grey template (+-0.2) on mid-grey, plus pixel noise."""
    templates = torch.nn.functional.interpolate(
        torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(123)), size=(16, 16), mode="bilinear"
    )
    templates = templates / templates.abs().amax(dim=(1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = 0.5 + 0.2 * templates[labels] + 0.05 * torch.randn(n, 1, 16, 16, generator=g)
    return images.clamp(0, 1), labels


def tiny_deit(**kwargs) -> DeiTClassifier:
    torch.manual_seed(0)
    return DeiTClassifier(
        "deit_tiny_patch16_224", num_classes=4, img_size=16, in_chans=1,
        model_kwargs=dict(patch_size=4, embed_dim=32, depth=1, num_heads=2), **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    model = tiny_deit()
    images, labels = synthetic_task(512, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            batch = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().zero_grad(set_to_none=True)
    test_images, test_labels = synthetic_task(128, seed=1)
    with torch.no_grad():
        clean = (model(test_images).argmax(-1) == test_labels).float().mean().item()
    assert clean > 0.9, f"the tiny model did not learn the task ({clean:.2f})"
    return model, test_images, test_labels, clean


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return (model(images).argmax(-1) == labels).float().mean().item()


def test_severe_corruptions_lower_accuracy(trained):
    model, images, labels, clean = trained
    for name in ("gaussian_noise", "impulse_noise", "contrast"):
        mild = accuracy(model, corrupt(images, name, 1, table="imagenet"), labels)
        severe = accuracy(model, corrupt(images, name, 5, table="imagenet"), labels)
        assert severe < mild and severe < clean, (name, clean, mild, severe)


# --------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_the_box(trained, norm):
    model, images, labels, _ = trained
    for eps in ((2 / 255, 8 / 255) if norm == "linf" else (0.25, 1.0)):
        adversarial, robust = pgd(model, images, labels, eps, steps=5, norm=norm, restarts=2, return_success=True)
        delta = (adversarial - images).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= eps + 1e-6).all()) and adversarial.min() >= 0 and adversarial.max() <= 1
        # broken samples come back with the point that fooled the model
        with torch.no_grad():
            fooled = model(adversarial).argmax(-1) != labels
        assert torch.equal(fooled, ~robust)


def test_pgd_hurts_monotone_in_eps_and_beats_random_noise(trained):
    model, images, labels, clean = trained
    accuracies = []
    for eps in (1 / 255, 2 / 255, 4 / 255, 8 / 255):
        _, robust = pgd(model, images, labels, eps, steps=10, return_success=True)
        accuracies.append(robust.float().mean().item())
        noise = accuracy(model, uniform_noise(images, eps), labels)
        assert noise >= clean - 0.1 and noise >= accuracies[-1], (eps, noise, accuracies[-1])
    assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[0] <= clean and accuracies[-1] < 0.1 < clean - 0.5, accuracies
    assert accuracy(model, uniform_noise(images, 8 / 255), labels) > accuracies[-1] + 0.5


def test_more_steps_never_raise_accuracy(trained):
    model, images, labels, _ = trained
    previous = None
    for steps in (2, 5, 10):
        _, robust = pgd(model, images, labels, 4 / 255, steps=steps, seed=3, return_success=True)
        if previous is not None:  # the shorter run's iterates are a prefix of the longer run's
            assert not bool((robust & ~previous).any())
        previous = robust
    # restarts never help the model either
    _, two = pgd(model, images, labels, 4 / 255, steps=10, seed=3, restarts=2, return_success=True)
    assert not bool((two & ~previous).any())


def test_attacks_are_seeded_and_leave_the_model_alone(trained):
    model, images, labels, _ = trained
    a = pgd(model, images, labels, 4 / 255, steps=3, seed=1)
    assert torch.equal(a, pgd(model, images, labels, 4 / 255, steps=3, seed=1))
    assert not torch.equal(a, pgd(model, images, labels, 4 / 255, steps=3, seed=2))
    # per-sample seeds: a sample's attack does not depend on its batch
    single = pgd(model, images[5:6], labels[5:6], 4 / 255, steps=3, seed=1, indices=[5])
    torch.testing.assert_close(single, a[5:6], atol=1e-6, rtol=0)
    model.train()
    with torch.no_grad():  # Lightning's eval loops: the attack enables gradients itself
        pgd(model, images[:8], labels[:8], 4 / 255, steps=2)
        fgsm(model, images[:8], labels[:8], 4 / 255)
    assert model.training  # mode restored
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
        pgd(model, images[:4], labels[:4], 4 / 255)


def test_fgsm(trained):
    model, images, labels, clean = trained
    adversarial, robust = fgsm(model, images, labels, 8 / 255, return_success=True)
    assert bool(((adversarial - images).abs() <= 8 / 255 + 1e-6).all())
    with torch.no_grad():
        correct = model(images).argmax(-1) == labels
    assert not bool((robust & ~correct).any())  # never more accurate than clean
    assert robust.float().mean().item() < clean - 0.3
    _, pgd_robust = pgd(model, images, labels, 8 / 255, steps=10, return_success=True)
    assert pgd_robust.float().mean() <= robust.float().mean()


# --------------------------------------------------------------------------- metrics
def test_relative_mce_matches_a_hand_computation():
    dense = {"test/clean_acc": 0.90}
    pruned = {"test/clean_acc": 0.86}
    dense_acc = {"gaussian_noise": (0.80, 0.70, 0.50), "contrast": (0.85, 0.75, 0.60)}
    pruned_acc = {"gaussian_noise": (0.70, 0.60, 0.40), "contrast": (0.84, 0.72, 0.55)}
    for name in dense_acc:
        for s in range(3):
            dense[f"test/corrupt_acc/{name}@{s + 1}"] = dense_acc[name][s]
            pruned[f"test/corrupt_acc/{name}@{s + 1}"] = torch.tensor(pruned_acc[name][s])  # tensors accepted
    pruned["test/corrupt_acc/saturate@1"] = 0.1  # held out: not in the mean
    dense["test/corrupt_acc/saturate@1"] = 0.8
    # gaussian: pruned errors .30 .40 .60 minus .14 -> .16 .26 .46 = .88; dense .20 .30 .50 minus .10 = .70
    # contrast: pruned .16 .28 .45 minus .14 -> .02 .14 .31 = .47; dense .15 .25 .40 minus .10 = .50
    expected = (0.88 / 0.70 + 0.47 / 0.50) / 2
    assert relative_mce(pruned, dense) == pytest.approx(expected)
    assert relative_mce(dense, dense) == pytest.approx(1.0)
    expected_mce = ((0.30 + 0.40 + 0.60) / (0.20 + 0.30 + 0.50) + (0.16 + 0.28 + 0.45) / (0.15 + 0.25 + 0.40)) / 2
    assert mce(pruned, dense) == pytest.approx(expected_mce)
    assert relative_mce(pruned, dense, corruptions=["contrast"]) == pytest.approx(0.47 / 0.50)
    # a corruption the dense model is immune to is skipped; none left -> nan
    flat = {"test/clean_acc": 0.9, "test/corrupt_acc/contrast@1": 0.9}
    assert math.isnan(relative_mce(flat, flat))
    with pytest.raises(ValueError, match="clean_acc"):
        relative_mce({"test/corrupt_acc/contrast@1": 0.5}, dense)


def test_evaluate_robustness_is_consistent_and_batch_independent(trained):
    model, images, labels, clean = trained
    images, labels = images[:48], labels[:48]
    indices = torch.arange(100, 148)
    kwargs = dict(corruptions=("gaussian_noise", "contrast", "saturate"), severities=(1, 5), eps=(2 / 255, 8 / 255), steps=3)
    by_16 = evaluate_robustness(model, DataLoader(TensorDataset(images, labels, indices), batch_size=16), **kwargs)
    by_48 = evaluate_robustness(model, [(images, labels, indices)], **kwargs)
    assert by_16.keys() == by_48.keys()
    for key in by_16:
        assert by_16[key] == pytest.approx(by_48[key], abs=1e-6), key
    assert by_16["test/clean_acc"] == pytest.approx(accuracy(model, images, labels))
    main = [by_16[f"test/corrupt_acc/{c}@{s}"] for c in ("gaussian_noise", "contrast") for s in (1, 5)]
    assert by_16["test/corrupt_acc"] == pytest.approx(sum(main) / len(main))  # held-out saturate excluded
    assert by_16["test/corrupt_acc/contrast"] == pytest.approx(
        (by_16["test/corrupt_acc/contrast@1"] + by_16["test/corrupt_acc/contrast@5"]) / 2
    )
    assert by_16["test/adv_acc@linf_8/255"] <= by_16["test/adv_acc@linf_2/255"] <= by_16["test/clean_acc"]
    assert by_16["test/fgsm_acc@8/255"] <= by_16["test/clean_acc"]
    assert not model.training


def test_per_sample_correctness_averages_to_the_reported_accuracy(trained):
    model, images, labels, _ = trained
    images, labels = images[:32], labels[:32]
    kwargs = dict(corruptions=("gaussian_noise", "saturate"), severities=(1, 5), eps=(8 / 255,), steps=2)
    loader = DataLoader(TensorDataset(images, labels, torch.arange(32)), batch_size=16)
    plain = evaluate_robustness(model, loader, **kwargs)
    accs, per = evaluate_robustness(model, loader, per_sample=True, **kwargs)
    assert accs == plain  # opting in changes no reported number
    assert set(per) <= set(accs) and {"test/clean_acc", "test/corrupt_acc", "test/adv_acc@linf_8/255"} <= set(per)
    for key, values in per.items():
        assert values.shape == (32,) and float(values.mean()) == pytest.approx(accs[key], abs=1e-6), key
    clean = (model(images).argmax(-1) == labels).double()
    assert torch.equal(per["test/clean_acc"], clean)  # image by image, in loader order


def test_evaluator_argument_errors():
    with pytest.raises(ValueError, match="unknown corruptions"):
        RobustnessEvaluator(10, corruptions=["fog"])
    with pytest.raises(ValueError, match="list of names"):
        RobustnessEvaluator(10, corruptions="contrast")
    with pytest.raises(ValueError, match="eps"):
        RobustnessEvaluator(10, eps=[-1.0])
    with pytest.raises(ValueError, match="severities"):
        RobustnessEvaluator(10, severities=[0])


def test_trainer_test_logs_clean_corrupted_and_adversarial(trained):
    model, images, labels, _ = trained
    robust_model = tiny_deit(
        robustness=dict(corruptions=["gaussian_noise", "contrast"], severities=[1, 3], eps=[2 / 255, 8 / 255], steps=3)
    )
    robust_model.load_state_dict(model.state_dict())
    images, labels = images[:32], labels[:32]
    loader = DataLoader(TensorDataset(images, labels, torch.arange(32)), batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu", inference_mode=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    (results,) = trainer.test(robust_model, loader, verbose=False)
    expected = {
        "test/clean_acc", "test/corrupt_acc", "test/corrupt_acc/gaussian_noise", "test/corrupt_acc/contrast",
        "test/corrupt_acc/gaussian_noise@1", "test/corrupt_acc/gaussian_noise@3", "test/corrupt_acc/contrast@1",
        "test/corrupt_acc/contrast@3", "test/adv_acc@linf_2/255", "test/adv_acc@linf_8/255",
        "test/fgsm_acc@2/255", "test/fgsm_acc@8/255",
    }  # fmt: skip
    assert set(results) == expected
    # the same numbers as the plain-PyTorch call on the same (index-seeded) samples
    plain = evaluate_robustness(
        model, loader, corruptions=["gaussian_noise", "contrast"], severities=[1, 3], eps=[2 / 255, 8 / 255], steps=3
    )
    for key in expected:
        assert results[key] == pytest.approx(plain[key], abs=1e-6), key
    assert results["test/adv_acc@linf_8/255"] < results["test/clean_acc"]
    assert all(p.grad is None for p in robust_model.parameters())

    with pytest.raises(MisconfigurationException, match="inference_mode=False"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
            robust_model, loader, verbose=False
        )
