"""Ignite handlers for training that MONAI lacks: a guard against non-finite losses, patience and scores.

* :class:`StopOnNonFiniteLoss` - ends training with one sentence when the loss or the weights become
  NaN / Inf, before anything of that epoch is saved.
* :func:`patience_in_validations` - early stopping's patience given in epochs, counted in validations.
* :func:`improvement_score` - the score MONAI's ``EarlyStopHandler`` maximises for a monitored metric
  (a loss is minimised).
* :class:`EpochSummary` - one console line per epoch: loss, validation, best so far, time, ETA.
* :func:`set_console_level` - what the console shows: the summary, or also every iteration (DEBUG).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
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


# -------------------------------------------------------------------------------------------- console

#: loggers whose lines the epoch summary replaces at INFO: MONAI's StatsHandler (a line per iteration
#: and every validation metric), ignite's engines ("Epoch[3] Complete", "Got new best metric", ...)
DETAIL_LOGGERS = ("monai.handlers.StatsHandler", "ignite.engine")


def set_console_level(level: str = "INFO") -> str:
    """Set what the console shows: ``INFO`` one summary line per epoch, ``DEBUG`` also every iteration.

    A run of thousands of iterations otherwise interleaves the progress bar with a log line per
    iteration. TensorBoard and ``metrics_per_epoch.csv`` keep every value at any level.
    """
    name = str(level).upper()
    if name not in ("DEBUG", "INFO", "WARNING"):
        raise OptionError(f"log_level: {level!r} is not one of DEBUG, INFO, WARNING")
    logging.getLogger().setLevel(logging.INFO if name == "DEBUG" else getattr(logging, name))
    for logger in DETAIL_LOGGERS:
        logging.getLogger(logger).setLevel(logging.INFO if name == "DEBUG" else logging.WARNING)
    return name


class EpochSummary:
    """One log line per training epoch: mean loss, validation (if it ran), best so far, time per epoch, ETA.

    ``epoch 4/40: loss 0.8421 | val_mean_dice 0.6120 (WT 0.81, TC 0.55, ET 0.48), val_loss 0.3100, best
    val_mean_dice 0.6120 at epoch 4 | 41 s/epoch, at most 25 min left``. MONAI's ``StatsHandler`` logs
    per iteration or lists every metric; this is the line a user reads (:func:`set_console_level`).
    Attach after the validation handler, so the epoch's validation has run. ETA: this run's mean epoch
    time times the epochs left ("at most": early stopping may end sooner).
    """

    def __init__(self, evaluator: Engine | None = None, regions: Sequence[str] = ("WT", "TC", "ET")) -> None:
        self.evaluator, self.regions = evaluator, tuple(regions)
        self.logger = logging.getLogger("bundle.training")
        self._losses: list[float] = []
        self._epoch_start = 0.0
        self._durations: list[float] = []
        self._validated_at = -1

    def attach(self, engine: Engine) -> None:
        """Collect each iteration's loss and write the line at the end of each epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarise)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _start(self, engine: Engine) -> None:
        self._losses, self._epoch_start = [], time.perf_counter()

    def _collect(self, engine: Engine) -> None:
        loss = from_engine(["loss"], first=True)(engine.state.output)
        if loss is not None:
            self._losses.append(float(loss))

    def _validated(self, evaluator: Engine) -> None:
        self._validated_at = int(evaluator.state.epoch)

    def _summarise(self, engine: Engine) -> None:
        self._durations.append(time.perf_counter() - self._epoch_start)
        epoch, epochs = int(engine.state.epoch), int(engine.state.max_epochs or 0)
        parts = [f"epoch {epoch}/{epochs}: loss {sum(self._losses) / max(len(self._losses), 1):.4f}"]
        if self.evaluator is not None and self._validated_at == epoch:
            parts.append(self._validation())
        per_epoch = sum(self._durations) / len(self._durations)
        left = per_epoch * (epochs - epoch)
        timing = f"{per_epoch:.0f} s/epoch"
        if epoch < epochs:
            timing += f", at most {_duration(left)} left"
        parts.append(timing)
        self.logger.info(" | ".join(parts))

    def _validation(self) -> str:
        state = self.evaluator.state
        metrics = state.metrics
        key = getattr(state, "key_metric_name", None) or "val_mean_dice"
        text = []
        if key in metrics:
            by_region = [
                f"{r} {float(metrics[f'val_dice_{r}']):.2f}" for r in self.regions if f"val_dice_{r}" in metrics
            ]
            text.append(f"{key} {float(metrics[key]):.4f}" + (f" ({', '.join(by_region)})" if by_region else ""))
        if "val_loss" in metrics and key != "val_loss":
            text.append(f"val_loss {float(metrics['val_loss']):.4f}")
        best = getattr(state, "best_metric", None)
        if key in metrics and int(getattr(state, "best_metric_epoch", -1)) >= 1 and math.isfinite(float(best)):
            text.append(f"best {key} {float(best):.4f} at epoch {int(state.best_metric_epoch)}")
        return ", ".join(text)


class LossProgressBar(ProgressBar):
    """ignite's ``ProgressBar`` over an epoch's iterations, this iteration's loss in its postfix.

    ignite takes the postfix's ``output_transform`` in ``attach``, which MONAI's workflows call with
    the engine alone; this binds it at construction.
    """

    def attach(self, engine: Engine, metric_names: Any = None, output_transform: Any = None, **kwargs: Any) -> None:
        """Attach with the loss as the postfix unless another output transform is given."""
        super().attach(engine, metric_names, output_transform or _loss_postfix, **kwargs)


def _loss_postfix(output: Any) -> dict[str, float]:
    return {"loss": float(from_engine(["loss"], first=True)(output))}


def _duration(seconds: float) -> str:
    """``42 s``, ``25 min``, ``3 h 10 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"
