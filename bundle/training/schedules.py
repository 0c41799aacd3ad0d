"""Learning-rate schedules the methods name that MONAI and PyTorch give only as a composition.

M3's schedule, a linear warm-up then an exponential decay per epoch, is PyTorch's ``SequentialLR`` of
``LinearLR`` and ``ExponentialLR``. Written in a config it is one long expression; as a function in
MONAI's callable mode (``lr_scheduler_factory``) a model's plan records it by value with its numbers.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ExponentialLR, LinearLR, SequentialLR


def warmup_then_exponential(
    optimizer: Optimizer, warmup_epochs: int = 5, warmup_start: float = 0.2, decay: float = 0.95
) -> SequentialLR:
    """Linear warm-up from ``warmup_start`` x lr to lr over ``warmup_epochs`` steps, then x ``decay`` per step."""
    warmup = LinearLR(optimizer, warmup_start, 1.0, warmup_epochs)
    return SequentialLR(optimizer, [warmup, ExponentialLR(optimizer, decay)], [warmup_epochs])
