"""Ignite/MONAI metric pieces for validation that MONAI lacks: per-region metric scalars, the official HD95, a CSV log.

* :class:`BratsHD95Metric` - a MONAI ``CumulativeIterationMetric`` computing the official BraTS HD95
  (pooled surface distances, :func:`bundle.evaluation.metrics.hd95`) per item and channel, with the
  BraTS empty-mask conventions.
* :class:`RegionMetric` - wraps *any* MONAI metric run with ``reduction="mean_batch"`` and exposes its
  per-channel vector as separate scalar metrics (``val_hd95_WT``, ``val_hd95_TC``, ...), which Ignite, the
  StatsHandler, TensorBoard, early stopping and checkpoint selection can all use.
* :class:`RegionMetricsCSVHandler` - one CSV row per epoch: epoch, mean training loss and the validation
  metrics, the input of :func:`bundle.evaluation.plots.plot_training_curves`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data.utils import affine_to_spacing
from monai.handlers import IgniteMetricHandler, MetricLogger, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from bundle.constants import REGION_NAMES
from bundle.evaluation.files import write_metrics_table
from bundle.evaluation.metrics import hd95


def _loss_value(loss: Any) -> float:
    if isinstance(loss, (tuple, list)):  # MONAI's from_engine returns a tuple even for one key
        loss = loss[0]
    return float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)


class BratsHD95Metric(CumulativeIterationMetric):
    """Official BraTS HD95 (mm) of multi-channel binary predictions, one value per item and channel.

    MONAI's ``HausdorffDistanceMetric(percentile=95)`` takes the larger of the two directed 95th percentiles;
    the BraTS evaluation pools both directed distance sets first (:func:`bundle.evaluation.metrics.hd95`), so this
    metric is computed with that function. Both empty -> 0, one empty -> 374 mm (no NaN), so a missed or
    hallucinated region is penalised instead of being dropped from the mean as MONAI does.

    Args:
        include_background: whether to score channel 0 (keep ``True`` for region channels WT, TC, ET).
        spacing: voxel size in mm (``None``: read from ``y``'s affine when it is a MetaTensor, else 1 mm,
            the BraTS resolution).
        reduction: a MONAI ``MetricReduction`` (``"mean_batch"`` gives one value per channel).
        get_not_nans: also return the count of values in the reduction, as MONAI metrics do.

    Inputs ``y_pred`` and ``y`` are ``[B, C, *spatial]`` tensors (values > 0.5 count as foreground).
    """

    def __init__(
        self,
        include_background: bool = True,
        spacing: Sequence[float] | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y_pred.shape != y.shape:
            raise ValueError(f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} must have the same shape")
        if y_pred.ndim < 3:
            raise ValueError(f"expected [B, C, *spatial] inputs, got shape {tuple(y_pred.shape)}")
        pred = (y_pred.detach() > 0.5).cpu().numpy()
        truth = (y.detach() > 0.5).cpu().numpy()
        start = 0 if self.include_background else 1
        spacing = self.spacing or spacing_of(y, y.ndim - 2)
        out = [[hd95(p[c], t[c], spacing) for c in range(start, p.shape[0])] for p, t in zip(pred, truth)]
        return torch.tensor(out, dtype=torch.float32, device=y_pred.device)

    def aggregate(  # type: ignore[override]
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered ``[N, C]`` values (default: the constructor's ``reduction``)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class RegionMetric(IgniteMetricHandler):
    """Expose a per-channel (``reduction="mean_batch"``) MONAI metric as one Ignite scalar per region.

    Ignite key metrics, ``StatsHandler``, ``TensorBoardStatsHandler``, ``EarlyStopHandler`` and
    ``CheckpointSaver`` all need scalars, while ``HausdorffDistanceMetric``, ``ConfusionMatrixMetric`` or
    :class:`BratsHD95Metric` with ``mean_batch`` give a vector. MONAI only offers a per-label dict for Dice
    (``MeanDice(return_with_label=...)``); this handler does the same for any metric, in one pass over the
    regions (instead of one metric object per channel). ``compute`` returns ``{prefix + name: value}``;
    Ignite stores each entry as its own metric (``metrics_result_mode="flatten"``), so the name given to
    ``attach`` is not itself a metric - use this among ``additional_metrics``.

    Args:
        metric_fn: a MONAI ``CumulativeIterationMetric`` constructed with ``reduction="mean_batch"``.
        names: channel names in channel order (default ``constants.REGION_NAMES``: WT, TC, ET).
        prefix: prepended to every name, e.g. ``"val_hd95_"``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``, e.g. ``from_engine(['pred', 'label'])``.
        save_details: keep the per-item values in ``engine.state.metric_details`` (as MONAI's handlers do).
    """

    def __init__(
        self,
        metric_fn: CumulativeIterationMetric,
        names: Sequence[str] = REGION_NAMES,
        prefix: str = "",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
        self.names = tuple(names)
        self.prefix = prefix
        self._metrics_result_mode = "flatten"  # one scalar per region in engine.state.metrics, no dict entry

    def compute(self) -> dict[str, float]:
        """Per-region values ``{prefix + name: float}`` of the accumulated epoch."""
        result = super().compute()
        values = torch.as_tensor(result, dtype=torch.float64).reshape(-1)
        if values.numel() != len(self.names):
            raise ValueError(
                f"{type(self.metric_fn).__name__} gave {values.numel()} value(s) for {len(self.names)} names "
                f"{self.names}; construct it with reduction='mean_batch' and check include_background"
            )
        return {f"{self.prefix}{name}": float(v) for name, v in zip(self.names, values.tolist(), strict=True)}


class RegionMetricsCSVHandler:
    """Write one CSV row per training epoch: ``epoch``, ``loss`` (mean over the epoch), validation metrics.

    Attach it to the *trainer*. MONAI's ``MetricLogger`` collects the values: one on the trainer logs
    ``loss_transform(engine.state.output)`` every iteration, one on the evaluator logs its metrics
    when it completes. At the end of each epoch the row gets the mean loss of the epoch's iterations
    and the scalar metrics (all of them, or ``metric_names``) if the evaluator ran in this epoch
    (``ValidationHandler`` runs it every ``val_interval`` epochs; other rows leave the metric cells
    empty); register it after the ``ValidationHandler`` so the metrics are fresh. Both logs are
    emptied at every epoch start: the CSV itself is the record, rewritten atomically each epoch, and
    rows of an existing file from epochs before the run's start epoch are kept, so a resumed run
    continues the log without restoring the loggers' state.

    Args:
        filename: CSV path, e.g. ``$@output_dir + '/metrics_per_epoch.csv'``.
        evaluator: the validation engine (``None``: loss only).
        metric_names: metrics to record (default: every scalar metric of the evaluator).
        loss_transform: maps the trainer's ``state.output`` to the loss (default MONAI's
            ``from_engine(['loss'], first=True)``).
    """

    def __init__(
        self,
        filename: str | Path,
        evaluator: Engine | None = None,
        metric_names: Sequence[str] | None = None,
        loss_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.filename = Path(filename)
        self.evaluator = evaluator
        self.metric_names = None if metric_names is None else tuple(metric_names)
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.rows: list[dict[str, Any]] = []
        self.loss_log = MetricLogger(loss_transform=lambda output: _loss_value(self.loss_transform(output)))
        self.metric_log = MetricLogger(metric_transform=_scalar)

    def attach(self, engine: Engine) -> None:
        """Log on the trainer (and the evaluator's COMPLETED); a row at each of the trainer's EPOCH_COMPLETED."""
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        self.loss_log.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.evaluator is not None:
            self.metric_log.attach_evaluator(self.evaluator)

    def _started(self, engine: Engine) -> None:
        self.rows = []
        if self.filename.is_file():
            with self.filename.open(newline="") as handle:
                kept = [r for r in csv.DictReader(handle) if r.get("epoch") and int(r["epoch"]) <= engine.state.epoch]
            self.rows = [{k: int(v) if k == "epoch" else _parse(v) for k, v in r.items()} for r in kept]

    def _epoch_started(self, engine: Engine) -> None:
        self.loss_log.loss.clear()
        self.loss_log.metrics.clear()  # the trainer's own metrics, logged every iteration and never written
        self.metric_log.metrics.clear()

    def _epoch_completed(self, engine: Engine) -> None:
        row: dict[str, Any] = {"epoch": engine.state.epoch}
        losses = [value for _, value in self.loss_log.loss]
        row["loss"] = sum(losses, 0.0) / len(losses) if losses else math.nan
        logged = self.metric_log.metrics
        for name in self.metric_names or sorted(logged):
            if logged.get(name) and isinstance(value := logged[name][-1][1], float):
                row[name] = value
        self.rows.append(row)
        write_metrics_table(self.rows, self.filename)


def _scalar(value: Any) -> Any:
    """A one-element tensor or a number as a float; anything else (a per-region dict, a vector) as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float, np.floating, np.integer)):
        return float(value)
    return value


def spacing_of(array: Any, spatial_dims: int) -> tuple[float, ...] | None:
    """Voxel size in mm from a MetaTensor's affine (MONAI's ``affine_to_spacing``); ``None`` without one.

    A batched affine (MONAI's per-item unsqueeze) gives the first item's spacing.
    """
    affine = getattr(array, "affine", None)
    if affine is None:
        return None
    affine = torch.as_tensor(affine, dtype=torch.float64)
    affine = affine.reshape(-1, *affine.shape[-2:])[0]
    spacing = affine_to_spacing(affine, r=spatial_dims, dtype=torch.float64)
    return tuple(float(v) for v in spacing)


def _parse(value: str) -> float | str:
    try:
        return float(value) if value != "" else ""
    except ValueError:
        return value
