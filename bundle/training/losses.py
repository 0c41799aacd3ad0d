"""Hybrid losses for the bundle's methods, and a deep-supervision wrapper.

All losses take raw logits ``(B, C, *spatial)`` plus MONAI-style flags, so any of them drops
into a config. Where MONAI already has the loss, the configs use MONAI's class directly; the
classes here exist only where MONAI's did not match the published formula (each docstring
says why).

Which loss each method uses (see ``docs/methods.md``):

- M1, ``0.6 * Dice + 0.4 * Focal`` with squared Dice denominator and focal gamma 2: MONAI's
  ``monai.losses.DiceFocalLoss(squared_pred=True, lambda_dice=0.6, lambda_focal=0.4, gamma=2.0,
  alpha=...)`` matches the formula exactly (checked against a hand computation in
  ``tests/test_losses.py``): with ``squared_pred=True`` its Dice is
  ``1 - (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s)``, and its focal term is the alpha-balanced
  ``-alpha_t (1 - p_t)^gamma log p_t`` averaged over voxels. No class here. Note that MONAI's
  focal term is always the per-channel sigmoid form (even when the Dice uses ``softmax=True``),
  so M1 is configured with sigmoid outputs.
- M2, Tversky: MONAI's ``monai.losses.TverskyLoss`` (``alpha`` weighs FP, ``beta`` FN). Focal
  Tversky ``(1 - TI)^gamma`` (Abraham & Khan 2019): ``FocalTverskyLoss`` below, because MONAI only
  has the binary ``AsymmetricFocalTverskyLoss`` of the Unified Focal loss, a different formula.
- M3, weighted cross-entropy ``[0.1, 1, 1, 1]`` + adaptive Tversky: ``AdaptiveTverskyLoss`` and
  ``WeightedCEAdaptiveTverskyLoss`` below (new in the paper, nothing in MONAI computes per-class
  alpha/beta from the current errors); deep supervision with weights ``[1.0, 0.4, 0.3, 0.2]`` is
  ``StackedDeepSupervisionLoss(loss, weights=[1.0, 0.4, 0.3, 0.2])`` (MONAI's ``weights=``
  argument, passed through unchanged).
- M4, sigmoid region Dice + BCE, batch Dice, 0.7 / 0.3: ``RegionDiceBCELoss`` below, inside
  ``StackedDeepSupervisionLoss`` (two heads at their own resolution, labels down-sampled to each).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.losses import DeepSupervisionLoss, DiceLoss, TverskyLoss
from monai.networks.utils import one_hot
from monai.utils import LossReduction
from torch import nn
from torch.nn.modules.loss import _Loss


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a MONAI ``LossReduction`` to a per-(batch, channel) loss tensor."""
    if reduction == LossReduction.MEAN.value:
        return loss.mean()
    if reduction == LossReduction.SUM.value:
        return loss.sum()
    if reduction == LossReduction.NONE.value:
        return loss
    raise ValueError(f'unsupported reduction {reduction!r}; expected "mean", "sum" or "none"')


class RegionDiceBCELoss(nn.Module):
    """Dice + binary cross-entropy over overlapping sigmoid region channels (method M4).

    ``loss = lambda_dice * Dice(sigmoid(x), y) + lambda_bce * BCEWithLogits(x, y)``, with the
    Dice in its batch form by default (numerator and denominator summed over the whole batch,
    not averaged per sample), weighted 0.7 : 0.3 as in the paper's sweep.

    Why not MONAI's ``DiceCELoss``: with more than one channel it applies *softmax*
    cross-entropy, which is wrong for overlapping regions (WT contains TC contains ET); each
    region needs its own independent binary cross-entropy.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_bce: weight of the binary cross-entropy term.
        batch: sum the Dice over the batch before dividing (the paper's form).
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
        pos_weight: optional per-channel positive weight for the BCE, shape ``(C,)``.
    """

    def __init__(
        self,
        lambda_dice: float = 0.7,
        lambda_bce: float = 0.3,
        batch: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        pos_weight: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_bce < 0:
            raise ValueError("lambda_dice and lambda_bce must be non-negative")
        self.lambda_dice = float(lambda_dice)
        self.lambda_bce = float(lambda_bce)
        self.dice = DiceLoss(sigmoid=True, batch=batch, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits ``input`` and a same-shaped binary ``target``."""
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape")
        target = target.float()
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = self.pos_weight.to(input.device).view(-1, *([1] * (input.dim() - 2)))
        bce = nn.functional.binary_cross_entropy_with_logits(input.float(), target, pos_weight=pos_weight)
        return self.lambda_dice * self.dice(input.float(), target) + self.lambda_bce * bce


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's ``DeepSupervisionLoss`` that also accepts heads stacked on dim 1.

    Two forms of deep-supervision output reach it (``bundle/networks/nets.py``):

    * a list ``[main, head_1, ...]`` of heads at their own resolution (``M4UNet``, M4's and
      nnU-Net's form): MONAI's class as is, which down-samples the target to each head with
      nearest-neighbour interpolation (``interp_mode`` ``"nearest-exact"``);
    * one tensor ``(B, heads, C, *spatial)`` of heads up-sampled to full size (MONAI's ``DynUNet``
      and this bundle's ``ResUNet`` / ``ResSELKAUNet``, which return one tensor because TorchScript
      needs a single return type): unbound into a list, then MONAI's class.

    A plain ``(B, C, *spatial)`` tensor (eval mode, e.g. the validation loss) is passed through.

    ``loss`` is the loss module, or what makes it: the configs declare the loss in MONAI's callable mode
    so that a model's plan records it by value (:mod:`bundle.plan.specs`), and a callable-mode
    component is a constructor, called here. Other arguments are MONAI's ``DeepSupervisionLoss``'s.
    """

    def __init__(self, loss: nn.Module | Callable[[], nn.Module], *args: Any, **kwargs: Any) -> None:
        super().__init__(loss if isinstance(loss, nn.Module) else loss(), *args, **kwargs)

    def forward(self, input: torch.Tensor | list[torch.Tensor] | None, target: torch.Tensor) -> torch.Tensor:
        """Apply the wrapped loss to every head and return the weighted sum."""
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)


class FocalTverskyLoss(_Loss):
    """Focal Tversky loss ``(1 - TI_c)^gamma``, averaged over channels (and samples) (M2).

    ``TI_c = (TP_c + s_nr) / (TP_c + alpha FP_c + beta FN_c + s_dr)`` is MONAI's ``TverskyLoss``
    (soft TP/FP/FN from probabilities; ``alpha`` weighs false positives, ``beta`` false
    negatives), computed with ``reduction="none"`` and then raised to ``gamma``. Defaults follow
    Abraham & Khan 2019 (ISBI, arXiv:1810.07842): gamma 0.75 (their exponent 1/(4/3)) and false
    negatives weighted 0.7, i.e. MONAI ``alpha=0.3, beta=0.7``. ``gamma=1`` gives MONAI's Tversky.

    Why not MONAI: MONAI has ``TverskyLoss`` and the binary ``AsymmetricFocalTverskyLoss`` of the
    Unified Focal loss (foreground-only exponent ``1 - gamma``, fixed two classes), not this one.

    Args:
        include_background: if False, channel 0 is excluded.
        to_onehot_y: convert a ``(B, 1, *S)`` class-index target to one-hot.
        sigmoid: apply a sigmoid to the logits.
        softmax: apply a softmax to the logits.
        alpha: weight of false positives.
        beta: weight of false negatives.
        gamma: focal exponent (< 1 emphasises hard, low-TI classes).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B, C, 1, ...)``).
        smooth_nr: numerator smoothing.
        smooth_dr: denominator smoothing.
        batch: sum TP/FP/FN over the batch before dividing.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 0.75,
        reduction: LossReduction | str = LossReduction.MEAN,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = float(gamma)
        self.tversky = TverskyLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            alpha=alpha,
            beta=beta,
            reduction=LossReduction.NONE,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the focal Tversky loss of logits ``input`` against ``target``."""
        one_minus_ti = self.tversky(input.float(), target.float())
        # gamma < 1 has an infinite slope at 0: a perfect class would give NaN gradients without the floor
        return _reduce(one_minus_ti.clamp_min(1e-7).pow(self.gamma), self.reduction)


class AdaptiveTverskyLoss(_Loss):
    """Adaptive Tversky loss of M3: per-class alpha/beta set from the current FP/FN balance.

    With soft counts from probabilities ``p`` and one-hot target ``g`` (summed over space, and
    over the batch if ``batch=True``): ``TP_c = sum p g``, ``FP_c = sum p (1 - g)``,
    ``FN_c = sum (1 - p) g``; ``a_c = clamp(FP_c / (FP_c + FN_c), alpha_min, alpha_max)``,
    ``b_c = 1 - a_c``, and ``loss = 1 - mean_c (TP_c + smooth_nr) / (TP_c + a_c FP_c + b_c FN_c
    + smooth_dr)``. The paper's form has no numerator smoothing and ``1e-5`` in the denominator,
    the defaults here. A class absent from the target (per sample, or in the batch with
    ``batch=True``) therefore has ``TP = 0`` and contributes 1 to the mean, with no gradient.

    Decision (the paper is vague): ``a_c`` is computed with gradients detached
    (``detach_alpha=True``). It is a weighting chosen from the current error balance, like a
    class weight; letting gradients flow through it would let the network lower the loss by
    moving the FP/FN ratio inside the clamp rather than by reducing errors, and inside the clamp
    that path only adds noise to the gradient (outside it is zero anyway). ``detach_alpha=False``
    keeps the full gradient for comparison.

    Why not MONAI: ``TverskyLoss`` has fixed scalar ``alpha``/``beta``; nothing in MONAI adapts
    them per class from the current FP/FN.

    Args:
        include_background: if False, channel 0 is excluded from the mean.
        to_onehot_y: convert a ``(B, 1, *S)`` class-index target to one-hot.
        sigmoid: apply a sigmoid to the logits.
        softmax: apply a softmax to the logits (M3).
        alpha_min: lower clamp of ``a_c``.
        alpha_max: upper clamp of ``a_c``.
        smooth_nr: numerator smoothing (0 in the paper).
        smooth_dr: denominator smoothing (1e-5 in the paper).
        batch: sum the counts over the batch before dividing.
        detach_alpha: compute ``a_c`` without gradient (see above).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(B, C)``, or ``(1, C)`` with ``batch``).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = True,
        alpha_min: float = 0.2,
        alpha_max: float = 0.8,
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        detach_alpha: bool = True,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if sigmoid and softmax:
            raise ValueError("sigmoid and softmax are mutually exclusive")
        if not 0.0 <= alpha_min <= alpha_max <= 1.0:
            raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1, got {alpha_min}, {alpha_max}")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.batch = batch
        self.detach_alpha = detach_alpha

    def per_class_alpha(self, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        """Return ``a_c = clamp(FP / (FP + FN), alpha_min, alpha_max)`` (0/0 counts as 0.5)."""
        total = fp + fn
        ratio = torch.where(total > 0, fp / total.clamp_min(torch.finfo(total.dtype).tiny), torch.full_like(fp, 0.5))
        return ratio.clamp(self.alpha_min, self.alpha_max)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the adaptive Tversky loss of logits ``input`` against ``target``."""
        probs = input.float()
        if self.sigmoid:
            probs = torch.sigmoid(probs)
        if self.softmax:
            probs = torch.softmax(probs, dim=1)
        n_classes = probs.shape[1]
        target = one_hot(target, num_classes=n_classes) if self.to_onehot_y else target
        target = target.float()
        if target.shape != probs.shape:
            raise ValueError(f"target {tuple(target.shape)} does not match input {tuple(probs.shape)}")
        if not self.include_background:
            probs, target = probs[:, 1:], target[:, 1:]
        reduce_dims = list(range(2, probs.dim()))
        if self.batch:
            reduce_dims = [0, *reduce_dims]
        tp = (probs * target).sum(dim=reduce_dims)
        fp = (probs * (1 - target)).sum(dim=reduce_dims)
        fn = ((1 - probs) * target).sum(dim=reduce_dims)
        alpha = self.per_class_alpha(fp.detach(), fn.detach()) if self.detach_alpha else self.per_class_alpha(fp, fn)
        tversky_index = (tp + self.smooth_nr) / (tp + alpha * fp + (1 - alpha) * fn + self.smooth_dr)
        loss = 1 - tversky_index
        if self.batch:
            loss = loss.unsqueeze(0)
        return _reduce(loss, self.reduction)


class WeightedCEAdaptiveTverskyLoss(_Loss):
    """Class-weighted softmax cross-entropy plus adaptive Tversky loss, per output (M3).

    ``loss = lambda_ce * CE_w(x, y) + lambda_tversky * AdaptiveTversky(softmax(x), y)`` with class
    weights ``[0.1, 1, 1, 1]`` (background down-weighted). The cross-entropy is
    ``torch.nn.functional.cross_entropy`` on class indices, i.e. the weighted mean
    ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (PyTorch's definition, which the paper's code
    presumably used). Wrap it in ``StackedDeepSupervisionLoss(loss, weights=[1.0, 0.4, 0.3, 0.2])``
    for M3's deep supervision.

    Why not MONAI's ``DiceCELoss``: its second term is Dice, not the adaptive Tversky.

    Args:
        ce_weight: per-class cross-entropy weights (length = output channels).
        lambda_ce: weight of the cross-entropy term.
        lambda_tversky: weight of the adaptive Tversky term.
        to_onehot_y: the target is ``(B, 1, *S)`` class indices (else one-hot ``(B, C, *S)``).
        include_background: include channel 0 in the Tversky mean (the cross-entropy always
            uses every class).
        batch: Tversky counts summed over the batch.
        alpha_min: lower clamp of the adaptive alpha.
        alpha_max: upper clamp of the adaptive alpha.
        detach_alpha: compute the adaptive alpha without gradient.
        smooth_nr: Tversky numerator smoothing.
        smooth_dr: Tversky denominator smoothing.
    """

    def __init__(
        self,
        ce_weight: Sequence[float] | None = (0.1, 1.0, 1.0, 1.0),
        lambda_ce: float = 1.0,
        lambda_tversky: float = 1.0,
        to_onehot_y: bool = True,
        include_background: bool = True,
        batch: bool = False,
        alpha_min: float = 0.2,
        alpha_max: float = 0.8,
        detach_alpha: bool = True,
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        if lambda_ce < 0 or lambda_tversky < 0:
            raise ValueError("lambda_ce and lambda_tversky must be non-negative")
        self.lambda_ce = float(lambda_ce)
        self.lambda_tversky = float(lambda_tversky)
        self.to_onehot_y = to_onehot_y
        weight = None if ce_weight is None else torch.as_tensor(ce_weight, dtype=torch.float32)
        self.register_buffer("ce_weight", weight, persistent=False)
        self.tversky = AdaptiveTverskyLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            softmax=True,
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            detach_alpha=detach_alpha,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the loss of logits ``input (B, C, *S)`` against indices or a one-hot target."""
        logits = input.float()
        if self.ce_weight is not None and self.ce_weight.numel() != logits.shape[1]:
            raise ValueError(f"ce_weight has {self.ce_weight.numel()} entries for {logits.shape[1]} output channels")
        if self.to_onehot_y:
            if target.shape[1] != 1:
                raise ValueError(f"to_onehot_y expects a (B, 1, *S) class-index target, got {tuple(target.shape)}")
            indices = target[:, 0].long()
        else:
            indices = target.argmax(dim=1)
        weight = None if self.ce_weight is None else self.ce_weight.to(logits.device)
        ce = nn.functional.cross_entropy(logits, indices, weight=weight)
        return self.lambda_ce * ce + self.lambda_tversky * self.tversky(logits, target)
