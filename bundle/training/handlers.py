"""Ignite handlers for training that MONAI lacks: a guard against non-finite losses, patience and scores.

* :class:`StopOnNonFiniteLoss` - ends training with one sentence when the loss or the weights become
  NaN / Inf, before anything of that epoch is saved.
* :func:`patience_in_validations` - early stopping's patience given in epochs, counted in validations.
* :func:`improvement_score` - the score MONAI's ``EarlyStopHandler`` maximises for a monitored metric
  (a loss is minimised).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from bundle.errors import NonFiniteError, OptionError


class StopOnNonFiniteLoss:
    """Stop training with one sentence (:class:`bundle.errors.NonFiniteError`) at a NaN / Inf loss or weight.

    Ignite's ``TerminateOnNan`` ends the run quietly with exit code 0, and a NaN model can then be
    saved as the "best" one. This handler raises instead, at the iteration that produced the loss,
    so the epoch never completes and no checkpoint of it is written; at ``EPOCH_COMPLETED`` (list it
    first in ``train#handlers``, before the ``ValidationHandler`` and the savers) it also checks the
    weights themselves. Reading the loss costs one scalar a step, as ``StatsHandler`` already does.

    Listed first, it also registers the first ``EXCEPTION_RAISED`` handler, which re-raises at once:
    MONAI's ``StatsHandler`` would log every exception with its traceback before re-raising it, so a
    user's error (this one, or a ``DataError`` from the loader) would end in a traceback. Every
    exception still ends the run as itself: a :class:`~bundle.errors.UserError` with its one sentence
    (:func:`bundle.errors.report_user_errors`), any other with its traceback, once.

    Args:
        network: the trained network, whose parameters are checked once an epoch (None: loss only).
        output_transform: engine output -> loss tensor (default: MONAI's trainer output ``"loss"``).
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        output_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.network = network
        self.output_transform = output_transform or from_engine(["loss"], first=True)

    def attach(self, engine: Engine) -> None:
        """Check the loss after every iteration and the weights after every epoch."""
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.reraise)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.check_loss)
        if self.network is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.check_weights)

    @staticmethod
    def reraise(engine: Engine, error: BaseException) -> None:
        """End the run with ``error`` itself (before any handler logs it with a traceback)."""
        raise error

    def check_loss(self, engine: Engine) -> None:
        """Raise if this iteration's loss is NaN or infinite."""
        loss = torch.as_tensor(self.output_transform(engine.state.output)).detach()
        bad = (~torch.isfinite(loss)).any().to(torch.int32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop together, else the others wait forever in the next all-reduce
            torch.distributed.all_reduce(bad)
        if bool(bad.item()):
            raise NonFiniteError(
                f"training stopped at epoch {engine.state.epoch}, iteration {engine.state.iteration}: the loss is "
                f"{loss.flatten()[0].item()}, so nothing of this epoch was saved; "
                "lower learning_rate or check the inputs"
            )

    def check_weights(self, engine: Engine) -> None:
        """Raise if any parameter of the network is NaN or infinite (before validation saves it)."""
        assert self.network is not None
        bad = [name for name, p in self.network.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # DDP keeps the weights equal on every rank, so every rank finds the same
            raise NonFiniteError(
                f"training stopped at the end of epoch {engine.state.epoch}: {len(bad)} weight tensors hold NaN or "
                f"Inf (e.g. {bad[0]}), so nothing of this epoch was saved; lower learning_rate or check the inputs"
            )


def patience_in_validations(epochs: int, val_interval: int) -> int:
    """MONAI's ``EarlyStopHandler`` counts validations; papers give patience in epochs.

    ``ceil(epochs / val_interval)`` validations, so training stops after at least ``epochs`` epochs
    without improvement (exactly when ``val_interval`` divides ``epochs``; docs/methods.md).
    """
    if int(epochs) < 1 or int(val_interval) < 1:
        raise OptionError(f"early_stop_patience {epochs} and val_interval {val_interval} must be at least 1")
    return max(1, -(-int(epochs) // int(val_interval)))


def improvement_score(metric: str) -> Callable[[Engine], float]:
    """The score ``EarlyStopHandler`` maximises for ``metric``: a loss (``*loss``) negated, any other as it is."""
    sign = -1.0 if metric.endswith("loss") else 1.0

    def score(engine: Engine) -> float:
        if metric not in engine.state.metrics:
            raise OptionError(
                f"monitor: the validation computes no {metric!r} (it has {', '.join(sorted(engine.state.metrics))})"
            )
        return sign * float(engine.state.metrics[metric])

    return score
