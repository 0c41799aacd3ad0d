"""Losses checked against plain numpy reference computations on small hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceFocalLoss, TverskyLoss

from bundle.training.losses import (
    AdaptiveTverskyLoss,
    FocalTverskyLoss,
    RegionDiceBCELoss,
    StackedDeepSupervisionLoss,
    WeightedCEAdaptiveTverskyLoss,
)

EPS = 1e-5


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_one_hot(indices: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, 1, *S) indices -> (B, C, *S) one-hot."""
    return np.concatenate([(indices == c).astype(np.float64) for c in range(n_classes)], axis=1)


def reference_adaptive_tversky(
    probs: np.ndarray, target: np.ndarray, batch: bool, lo: float = 0.2, hi: float = 0.8, smooth_nr: float = 0.0
) -> float:
    """1 - mean_c TP/(TP + a FP + b FN + 1e-5), a = clamp(FP/(FP+FN), lo, hi), written as loops."""
    b_count, c_count = probs.shape[:2]
    groups = [list(range(b_count))] if batch else [[b] for b in range(b_count)]
    indices = []
    for samples in groups:
        for c in range(c_count):
            p = np.concatenate([probs[b, c].ravel() for b in samples])
            g = np.concatenate([target[b, c].ravel() for b in samples])
            tp, fp, fn = np.sum(p * g), np.sum(p * (1 - g)), np.sum((1 - p) * g)
            a = min(max(fp / (fp + fn), lo), hi) if fp + fn > 0 else 0.5
            indices.append((tp + smooth_nr) / (tp + a * fp + (1 - a) * fn + EPS))
    return 1.0 - float(np.mean(indices))


def test_dice_focal_from_monai_matches_m1_formula() -> None:
    """M1 uses MONAI's DiceFocalLoss; check it is 0.6 squared-Dice + 0.4 alpha-balanced focal (gamma 2)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 4))
    target = (rng.random((2, 3, 4, 4)) > 0.6).astype(np.float64)
    alpha = 0.25
    p = sigmoid(logits)
    dice_terms = []
    for b in range(2):
        for c in range(3):
            num = 2 * np.sum(p[b, c] * target[b, c]) + EPS
            den = np.sum(p[b, c] ** 2) + np.sum(target[b, c] ** 2) + EPS
            dice_terms.append(1 - num / den)
    p_t = np.where(target == 1, p, 1 - p)
    alpha_t = np.where(target == 1, alpha, 1 - alpha)
    focal = np.mean(-alpha_t * (1 - p_t) ** 2 * np.log(p_t))
    expected = 0.6 * np.mean(dice_terms) + 0.4 * focal

    loss = DiceFocalLoss(sigmoid=True, squared_pred=True, lambda_dice=0.6, lambda_focal=0.4, gamma=2.0, alpha=alpha)
    got = loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # without squared_pred the denominator is linear and the value differs: the flag matters
    linear = DiceFocalLoss(sigmoid=True, lambda_dice=0.6, lambda_focal=0.4, gamma=2.0, alpha=alpha)
    assert linear(torch.tensor(logits).float(), torch.tensor(target).float()).item() != pytest.approx(
        expected, rel=1e-3
    )


def test_focal_tversky_matches_reference_and_reduces_to_tversky() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5, 5))
    labels = rng.integers(0, 3, size=(2, 1, 5, 5))
    p, g = softmax(logits), np_one_hot(labels, 3)
    alpha, beta, gamma = 0.3, 0.7, 0.75
    terms = []
    for b in range(2):
        for c in range(3):
            tp = np.sum(p[b, c] * g[b, c])
            fp = np.sum(p[b, c] * (1 - g[b, c]))
            fn = np.sum((1 - p[b, c]) * g[b, c])
            ti = (tp + EPS) / (tp + alpha * fp + beta * fn + EPS)
            terms.append((1 - ti) ** gamma)
    loss = FocalTverskyLoss(softmax=True, to_onehot_y=True, alpha=alpha, beta=beta, gamma=gamma)
    x, y = torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)
    assert loss(x, y).item() == pytest.approx(np.mean(terms), rel=1e-5)
    plain = TverskyLoss(softmax=True, to_onehot_y=True, alpha=alpha, beta=beta)
    assert FocalTverskyLoss(softmax=True, to_onehot_y=True, gamma=1.0)(x, y).item() == pytest.approx(
        plain(x, y).item(), rel=1e-6
    )
    assert loss(x, y).item() > plain(x, y).item()  # gamma < 1 raises every (1 - TI) < 1


def test_focal_tversky_perfect_empty_prediction_has_finite_gradient() -> None:
    logits = torch.full((1, 1, 4, 4), -30.0, requires_grad=True)
    loss = FocalTverskyLoss(sigmoid=True)(logits, torch.zeros(1, 1, 4, 4))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    assert torch.isfinite(logits.grad).all()


def _probs_for_alpha_cases() -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes (channels) of one sample whose FP/(FP+FN) is ~0.05, ~0.91 and 0.6."""
    target = torch.tensor([[1.0, 1, 1, 1, 0, 0, 0, 0]] * 3).view(1, 3, 2, 4)
    probs = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5, 0.1, 0.0, 0.0, 0.0],  # TP 2, FN 2, FP 0.1 -> ratio 0.048 -> clamp to 0.2
            [1.0, 1.0, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5],  # TP 3.8, FN 0.2, FP 2 -> ratio 0.91 -> clamp to 0.8
            [0.8, 0.8, 0.8, 0.8, 0.3, 0.3, 0.3, 0.3],  # TP 3.2, FN 0.8, FP 1.2 -> ratio 0.6
        ]
    ).view(1, 3, 2, 4)
    return probs, target


def test_adaptive_tversky_alpha_clamps_at_both_ends() -> None:
    probs, target = _probs_for_alpha_cases()
    loss = AdaptiveTverskyLoss(softmax=False, reduction="none")
    got = loss(probs, target).flatten()
    expected = [
        1 - 2.0 / (2.0 + 0.2 * 0.1 + 0.8 * 2.0 + EPS),
        1 - 3.8 / (3.8 + 0.8 * 2.0 + 0.2 * 0.2 + EPS),
        1 - 3.2 / (3.2 + 0.6 * 1.2 + 0.4 * 0.8 + EPS),
    ]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # the unclamped ratios would give different values, so the clamp is what is being tested
    unclamped_low = 1 - 2.0 / (2.0 + (0.1 / 2.1) * 0.1 + (2.0 / 2.1) * 2.0 + EPS)
    unclamped_high = 1 - 3.8 / (3.8 + (2 / 2.2) * 2.0 + (0.2 / 2.2) * 0.2 + EPS)
    assert abs(got[0].item() - unclamped_low) > 1e-3 and abs(got[1].item() - unclamped_high) > 1e-3
    alpha = loss.per_class_alpha(torch.tensor([0.1, 2.0, 0.8, 0.0]), torch.tensor([2.0, 0.2, 0.8, 0.0]))
    np.testing.assert_allclose(alpha.numpy(), [0.2, 0.8, 0.5, 0.5])
    assert loss(probs, target).mean().item() == pytest.approx(AdaptiveTverskyLoss(softmax=False)(probs, target).item())


def test_adaptive_tversky_alpha_is_detached_by_default() -> None:
    """With detach_alpha the gradient is that of a Tversky loss with a fixed alpha = 0.6 (unclamped case)."""
    probs, target = _probs_for_alpha_cases()
    middle_p, middle_g = probs[:, 2:3].clone(), target[:, 2:3]

    def grad_of(loss_fn) -> torch.Tensor:
        p = middle_p.clone().requires_grad_(True)
        loss_fn(p).backward()
        return p.grad

    detached = grad_of(lambda p: AdaptiveTverskyLoss(softmax=False)(p, middle_g))
    attached = grad_of(lambda p: AdaptiveTverskyLoss(softmax=False, detach_alpha=False)(p, middle_g))

    def fixed_alpha(p: torch.Tensor) -> torch.Tensor:
        tp = (p * middle_g).sum()
        fp = (p * (1 - middle_g)).sum()
        fn = ((1 - p) * middle_g).sum()
        return 1 - tp / (tp + 0.6 * fp + 0.4 * fn + EPS)

    torch.testing.assert_close(detached, grad_of(fixed_alpha))
    assert not torch.allclose(detached, attached)


@pytest.mark.parametrize("batch", [False, True])
def test_adaptive_tversky_softmax_matches_reference(batch: bool) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 6, 6)) * 2
    labels = rng.integers(0, 4, size=(2, 1, 6, 6))
    expected = reference_adaptive_tversky(softmax(logits), np_one_hot(labels, 4), batch=batch)
    loss = AdaptiveTverskyLoss(softmax=True, to_onehot_y=True, batch=batch)
    assert loss(torch.tensor(logits).float(), torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-5)


def test_adaptive_tversky_all_empty_target() -> None:
    probs = torch.full((2, 2, 4, 4), 0.1)
    empty = torch.zeros(2, 2, 4, 4)
    # paper's form (no numerator smoothing): TP = 0, so every empty class costs 1
    assert AdaptiveTverskyLoss(softmax=False)(probs, empty).item() == pytest.approx(1.0)
    # with numerator smoothing and an empty prediction the loss vanishes
    zero = torch.zeros(2, 2, 4, 4)
    smoothed = AdaptiveTverskyLoss(softmax=False, smooth_nr=EPS)(zero, empty)
    assert smoothed.item() == pytest.approx(0.0, abs=1e-6)
    assert reference_adaptive_tversky(probs.numpy(), empty.numpy(), batch=True) == pytest.approx(1.0)


def test_weighted_ce_adaptive_tversky_matches_reference() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 4, 4)) * 2
    labels = rng.integers(0, 4, size=(2, 1, 4, 4))
    weights = np.array([0.1, 1.0, 1.0, 1.0])
    log_p = np.log(softmax(logits))
    flat_labels = labels[:, 0]
    picked = np.take_along_axis(log_p, flat_labels[:, None], axis=1)[:, 0]
    w = weights[flat_labels]
    ce = np.sum(-w * picked) / np.sum(w)
    expected = ce + reference_adaptive_tversky(softmax(logits), np_one_hot(labels, 4), batch=False)

    x = torch.tensor(logits, dtype=torch.float32)
    loss = WeightedCEAdaptiveTverskyLoss()
    assert loss(x, torch.tensor(labels)).item() == pytest.approx(expected, rel=1e-5)
    one_hot_target = torch.tensor(np_one_hot(labels, 4), dtype=torch.float32)
    assert WeightedCEAdaptiveTverskyLoss(to_onehot_y=False)(x, one_hot_target).item() == pytest.approx(
        expected, rel=1e-5
    )
    unweighted = WeightedCEAdaptiveTverskyLoss(ce_weight=None)(x, torch.tensor(labels)).item()
    assert unweighted != pytest.approx(expected, rel=1e-3)


def _reference_region_dice_bce(logits: np.ndarray, target: np.ndarray, batch: bool) -> float:
    p = sigmoid(logits)
    axes = (0, 2, 3) if batch else (2, 3)
    inter = np.sum(p * target, axis=axes)
    dice = 1 - (2 * inter + EPS) / (np.sum(p, axis=axes) + np.sum(target, axis=axes) + EPS)
    bce = np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p)))
    return 0.7 * float(np.mean(dice)) + 0.3 * float(bce)


def test_region_dice_bce_matches_hand_computation() -> None:
    logits = np.array(
        [
            [[[2.0, -1.0], [0.5, -3.0]], [[1.0, 1.0], [-2.0, -2.0]], [[-1.0, 0.0], [0.0, -4.0]]],
            [[[-2.0, -2.0], [-2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[-3.0, -3.0], [-3.0, -3.0]]],
        ]
    )  # (2, 3, 2, 2): WT, TC, ET channels
    target = np.array(
        [
            [[[1, 0], [1, 0]], [[1, 0], [0, 0]], [[0, 0], [0, 0]]],
            [[[0, 0], [0, 1]], [[0, 0], [0, 1]], [[0, 0], [0, 0]]],
        ],
        dtype=np.float64,
    )
    x, y = torch.tensor(logits, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    batch_value = RegionDiceBCELoss()(x, y).item()
    sample_value = RegionDiceBCELoss(batch=False)(x, y).item()
    assert batch_value == pytest.approx(_reference_region_dice_bce(logits, target, batch=True), rel=1e-5)
    assert sample_value == pytest.approx(_reference_region_dice_bce(logits, target, batch=False), rel=1e-5)
    # ET is empty in both samples: per-sample Dice scores it twice at ~1, batch Dice once; they must differ
    assert abs(batch_value - sample_value) > 1e-3


def test_region_dice_bce_all_empty_target() -> None:
    logits = torch.full((2, 3, 4, 4), -2.0)
    p = 1 / (1 + np.exp(2.0))
    n = 2 * 16
    dice = 1 - EPS / (n * p + EPS)
    bce = -np.log(1 - p)
    expected = 0.7 * dice + 0.3 * bce
    assert RegionDiceBCELoss()(logits, torch.zeros(2, 3, 4, 4)).item() == pytest.approx(expected, rel=1e-5)


def test_stacked_deep_supervision_uses_m3_weights() -> None:
    rng = np.random.default_rng(4)
    heads = torch.tensor(rng.normal(size=(2, 4, 4, 8, 8)), dtype=torch.float32)  # (B, 1 + 3 heads, C, H, W)
    labels = torch.tensor(rng.integers(0, 4, size=(2, 1, 8, 8)))
    base = WeightedCEAdaptiveTverskyLoss()
    weights = [1.0, 0.4, 0.3, 0.2]
    expected = sum(w * base(heads[:, k], labels).item() for k, w in enumerate(weights))
    got = StackedDeepSupervisionLoss(base, weights=weights)(heads, labels).item()
    assert got == pytest.approx(expected, rel=1e-5)
    default_weights = StackedDeepSupervisionLoss(base)(heads, labels).item()  # MONAI's "exp": 1, .5, .25, .125
    assert default_weights != pytest.approx(expected, rel=1e-3)
    # a plain (B, C, *S) tensor is just the wrapped loss
    assert StackedDeepSupervisionLoss(base, weights=weights)(heads[:, 0], labels).item() == pytest.approx(
        base(heads[:, 0], labels).item(), rel=1e-6
    )
