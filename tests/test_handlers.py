"""Ignite handlers: per-region scalar metrics, the official HD95 metric, the per-epoch CSV log."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import StatsHandler, from_engine
from monai.metrics import ConfusionMatrixMetric, DiceMetric

from bundle.evaluation.handlers import BratsHD95Metric, RegionMetric, RegionMetricsCSVHandler
from bundle.evaluation.metrics import MAX_DISTANCE_MM, hd95


def _batch():
    """Two items, three region channels on an 8x8x8 grid, with hand-countable overlaps."""
    label = torch.zeros(2, 3, 8, 8, 8)
    pred = torch.zeros_like(label)
    label[:, 0, 2:6, 2:6, 2:6] = 1  # 64 voxels
    pred[:, 0, 2:6, 2:6, 3:7] = 1  # shifted by one: overlap 48 -> Dice 0.75
    label[:, 1, 3:5, 3:5, 3:5] = 1  # 8 voxels
    pred[0, 1, 3:5, 3:5, 3:5] = 1  # item 0 exact, item 1 missed
    pred[0, 2, 1, 1, 1] = 1  # channel 2: truth empty; item 0 one spurious voxel, item 1 both empty
    return pred, label


def _evaluator(batches, metrics):
    def step(engine, batch):
        pred, label = batch
        return [{"pred": p, "label": y} for p, y in zip(pred, label)]  # decollated, as MONAI's evaluators

    engine = Engine(step)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    engine.run(batches, max_epochs=1)
    return engine


def test_brats_hd95_metric_matches_function_and_conventions():
    pred, label = _batch()
    metric = BratsHD95Metric(reduction="none")
    values = metric(pred, label)
    assert values.shape == (2, 3)
    assert values[0, 0].item() == pytest.approx(hd95(pred[0, 0].numpy() > 0, label[0, 0].numpy() > 0))
    assert values[0, 1].item() == 0.0  # exact
    assert values[1, 1].item() == MAX_DISTANCE_MM  # missed
    assert values[0, 2].item() == MAX_DISTANCE_MM and values[1, 2].item() == 0.0  # spurious / both empty
    metric = BratsHD95Metric(spacing=(1.0, 1.0, 2.0), reduction="mean_batch")
    metric(pred, label)
    agg = metric.aggregate()
    assert agg.shape == (3,)
    assert agg[1].item() == pytest.approx(MAX_DISTANCE_MM / 2)
    # shift along the 2 mm axis: distances double compared with 1 mm
    assert agg[0].item() == pytest.approx(2 * values[:, 0].mean().item())


def test_region_metric_exposes_one_scalar_per_region():
    pred, label = _batch()
    transform = from_engine(["pred", "label"])
    engine = _evaluator(
        [(pred, label)],
        {
            "val_dice": RegionMetric(
                DiceMetric(reduction="mean_batch"), prefix="val_dice_", output_transform=transform
            ),
            "val_hd95": RegionMetric(
                BratsHD95Metric(reduction="mean_batch"), prefix="val_hd95_", output_transform=transform
            ),
            "val_sens": RegionMetric(
                ConfusionMatrixMetric(metric_name="sensitivity", reduction="mean_batch"),
                prefix="val_sensitivity_",
                output_transform=transform,
            ),
        },
    )
    m = engine.state.metrics
    assert m["val_dice_WT"] == pytest.approx(0.75)
    assert m["val_dice_TC"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert m["val_sensitivity_WT"] == pytest.approx(48 / 64)
    assert m["val_hd95_TC"] == pytest.approx(MAX_DISTANCE_MM / 2)
    assert m["val_hd95_ET"] == pytest.approx(MAX_DISTANCE_MM / 2)
    assert all(isinstance(v, float) for v in m.values())
    assert "val_dice" not in m  # flattened: only the per-region scalars
    assert engine.state.metric_details["val_dice"].shape == (2, 3)


def test_region_metric_rejects_a_non_batch_reduction():
    pred, label = _batch()
    with pytest.raises(ValueError, match="mean_batch"):
        _evaluator(
            [(pred, label)],
            {"d": RegionMetric(DiceMetric(reduction="mean"), output_transform=from_engine(["pred", "label"]))},
        )


def test_csv_handler_logs_loss_and_validation_metrics(tmp_path):
    pred, label = _batch()
    evaluator = Engine(lambda e, b: [{"pred": p, "label": y} for p, y in zip(*b)])
    RegionMetric(
        DiceMetric(reduction="mean_batch"), prefix="val_dice_", output_transform=from_engine(["pred", "label"])
    ).attach(evaluator, "val_dice")
    losses = iter([1.0, 0.5, 0.8, 0.4, 0.6, 0.2])
    trainer = Engine(lambda e, b: {"loss": torch.tensor(next(losses))})

    # validate every second epoch, as ValidationHandler(interval=2) would; registered before the CSV handler
    @trainer.on(Events.EPOCH_COMPLETED(every=2))
    def _validate(engine):
        evaluator.run([(pred, label)])

    path = tmp_path / "log" / "metrics.csv"
    RegionMetricsCSVHandler(path, evaluator=evaluator).attach(trainer)
    StatsHandler(iteration_log=False, name="test").attach(evaluator)  # a dict-free metrics table prints fine
    trainer.run([0, 1], max_epochs=3)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["loss"]) for r in rows] == pytest.approx([0.75, 0.6, 0.4])
    assert rows[0]["val_dice_WT"] == "" and rows[2]["val_dice_WT"] == ""
    assert float(rows[1]["val_dice_WT"]) == pytest.approx(0.75)
    assert np.isclose(float(rows[1]["val_dice_TC"]), 0.5)


def test_region_metrics_in_a_monai_supervised_evaluator(tmp_path):
    """The handlers inside MONAI's own engines: key metric, additional per-region metrics, CSV log."""
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import MeanDice, ValidationHandler

    pred, label = _batch()
    data = [{"image": p, "label": y} for p, y in zip(pred, label)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    identity = torch.nn.Identity()  # the "network" returns the prediction it is given
    transform = from_engine(["pred", "label"])
    evaluator = SupervisedEvaluator(
        torch.device("cpu"),
        val_data_loader=loader,
        network=identity,
        key_val_metric={"val_mean_dice": MeanDice(include_background=True, output_transform=transform)},
        additional_metrics={
            "val_hd95": RegionMetric(
                BratsHD95Metric(reduction="mean_batch"), prefix="val_hd95_", output_transform=transform
            ),
        },
    )
    net = torch.nn.Conv3d(3, 3, 1)
    trainer = SupervisedTrainer(
        torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), 0.0),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )
    RegionMetricsCSVHandler(tmp_path / "log.csv", evaluator=evaluator).attach(trainer)
    trainer.run()
    m = evaluator.state.metrics
    assert m["val_hd95_TC"] == pytest.approx(MAX_DISTANCE_MM / 2)
    assert evaluator.state.best_metric == pytest.approx(m["val_mean_dice"])
    with (tmp_path / "log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and float(rows[1]["val_hd95_TC"]) == pytest.approx(MAX_DISTANCE_MM / 2)
    assert float(rows[0]["loss"]) > 0


def test_regions_to_disjoint_classes_and_the_m3_validation_reports_them() -> None:
    from monai.bundle import ConfigParser

    from bundle.transforms import RegionsToDisjointd

    labels = torch.tensor([0, 1, 2, 3, 1, 2]).reshape(1, 6, 1, 1)  # bg, NCR, ED, ET, NCR, ED
    regions = torch.cat([torch.isin(labels, torch.tensor(v)) for v in ((1, 2, 3), (1, 3), (3,))]).float()
    out = RegionsToDisjointd(keys="pred", output_keys="pred_classes")({"pred": regions})["pred_classes"]
    assert out[0].flatten().tolist() == [0, 1, 0, 0, 1, 0]  # NCR
    assert out[1].flatten().tolist() == [0, 0, 1, 0, 0, 1]  # ED
    with pytest.raises(ValueError, match="expected the 3 region channels"):
        RegionsToDisjointd(keys="pred", output_keys="x")({"pred": regions[:1]})
    root = Path(__file__).resolve().parents[1] / "configs"
    parser = ConfigParser()
    parser.read_config([str(root / f) for f in ("train.yaml", "train_2d.yaml", "variants/m3_resse_lka_unet.yaml")])
    assert parser.get_parsed_content("validate_disjoint") is True
    metrics = parser.get_parsed_content("validate#additional_metrics")
    assert {"val_dice_classes", "val_hd95_classes"} <= set(metrics)
    plain = ConfigParser()
    plain.read_config(str(root / "train.yaml"))
    assert not {"val_dice_classes", "val_hd95_classes"} & set(plain.get_parsed_content("validate#additional_metrics"))


def test_the_console_shows_one_line_per_epoch_and_every_iteration_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """EpochSummary after validation: loss mean, key metric by region, best, time, ETA; StatsHandler at DEBUG."""
    import logging

    from ignite.engine import Engine, Events
    from monai.handlers import StatsHandler

    from bundle.errors import OptionError
    from bundle.training.handlers import EpochSummary, set_console_level

    losses = iter([1.0, 3.0, 0.5, 0.5])
    trainer = Engine(lambda engine, batch: [{"loss": next(losses)}])
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.key_metric_name = "val_mean_dice"

    @evaluator.on(Events.COMPLETED)
    def scores(engine: Engine) -> None:
        engine.state.metrics = {"val_mean_dice": 0.5, "val_dice_WT": 0.8, "val_dice_TC": 0.4, "val_dice_ET": 0.3}
        engine.state.metrics["val_loss"] = 0.25
        engine.state.best_metric, engine.state.best_metric_epoch = 0.5, 1

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda _: evaluator.run([0], max_epochs=1))
    StatsHandler(name="monai.handlers.StatsHandler", output_transform=lambda out: out[0]["loss"]).attach(trainer)
    EpochSummary(evaluator).attach(trainer)
    stats_logger = logging.getLogger("monai.handlers.StatsHandler")  # MONAI's own handler: no propagation
    stats_logger.addHandler(caplog.handler)
    try:
        assert set_console_level("info") == "INFO"
        with caplog.at_level(logging.INFO):
            trainer.run([0, 1], max_epochs=2)
        lines = [r.getMessage() for r in caplog.records if r.name == "bundle.training"]
        assert len(lines) == 2, lines
        assert lines[0].startswith(
            "epoch 1/2: loss 2.0000 | val_mean_dice 0.5000 (WT 0.80, TC 0.40, ET 0.30), val_loss 0.2500, "
            "best val_mean_dice 0.5000 at epoch 1 | "
        )
        assert " s/epoch, at most " in lines[0] and lines[1].startswith("epoch 2/2: loss 0.5000 | ")
        assert not [r for r in caplog.records if r.name == "monai.handlers.StatsHandler"]  # no line per iteration
        set_console_level("DEBUG")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            losses = iter([1.0, 1.0])
            trainer.state.max_epochs = None  # a new run
            trainer.run([0, 1], max_epochs=1)
        assert any("Iter: 1/2" in r.getMessage() for r in caplog.records if r.name == "monai.handlers.StatsHandler")
        with pytest.raises(OptionError, match=r"^log_level: 'loud' is not one of DEBUG, INFO, WARNING$"):
            set_console_level("loud")
    finally:
        stats_logger.removeHandler(caplog.handler)
        set_console_level("INFO")
        for name in ("monai.handlers.StatsHandler", "ignite.engine"):
            logging.getLogger(name).setLevel(logging.NOTSET)
