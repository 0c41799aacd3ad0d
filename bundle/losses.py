"""Hybrid losses for the bundle's methods, and a deep-supervision wrapper.

All losses take raw logits ``(B, C, *spatial)`` plus MONAI-style flags, so any of them drops
into a config. Where MONAI already has the loss, the configs use MONAI's class directly; the
classes here exist only where MONAI's did not match the published formula (each docstring
says why).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceLoss
from torch import nn

__all__ = ["RegionDiceBCELoss", "StackedDeepSupervisionLoss"]


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

    MONAI networks with deep supervision (``DynUNet`` and this bundle's nets) return, in
    training mode, one tensor ``(B, heads, C, *spatial)`` because TorchScript needs a single
    return type; MONAI's ``DeepSupervisionLoss`` expects a list. This unbinds the stacked
    tensor and otherwise behaves exactly like MONAI's class (weights, nearest-neighbour target
    down-sampling for smaller heads). A plain ``(B, C, *spatial)`` tensor is passed through.
    """

    def forward(
        self, input: None | torch.Tensor | list[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:  # noqa: A002
        """Apply the wrapped loss to every head and return the weighted sum."""
        if isinstance(input, torch.Tensor) and input.dim() == target.dim() + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)
