"""Two-process DDP training (gloo on CPU) through torchrun and configs/multi_gpu_train.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow
from test_training import TINY

from bundle.data import generate_demo_dataset
from bundle.plan import Checkpoint

CONFIGS = [str(REPO_ROOT / "configs" / "train.yaml"), str(REPO_ROOT / "configs" / "multi_gpu_train.yaml")]


def _scalar(log_dir: Path, tag: str) -> list[float]:
    """Values of one TensorBoard scalar (full float32 precision, unlike the console log)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


# Handlers every rank must run, so that all ranks take the same decisions (and start each epoch's pass
# together); all others write.
RANK_INDEPENDENT = {
    "ValidationHandler",
    "EarlyStopHandler",
    "LrScheduleHandler",
    "StopOnNonFiniteLoss",
    "NewPassEachEpoch",
}


def test_only_decision_handlers_run_on_every_rank() -> None:
    """Every writing handler of train.yaml is disabled on ranks > 0 (fails when one is added there)."""
    merged = ConfigParser.load_config_files(CONFIGS)
    for section in ("train", "validate"):
        for name, handler in merged[section]["named_handlers"].items():
            target = handler["_target_"].split(".")[-1]
            disabled = handler.get("_disabled_")
            if target in RANK_INDEPENDENT:
                # on every rank, unless switched off for every rank (train.yaml's per-epoch LR slot)
                assert disabled in (None, True), f"{section}#handlers#{name} ({target}) must run on every rank"
            else:
                assert disabled == "$@rank > 0", f"{section}#handlers#{name} ({target}) must be rank 0 only"


@pytest.mark.slow
def test_two_process_cpu_training_matches_single_process_evaluation(tmp_path: Path) -> None:
    data = generate_demo_dataset(tmp_path / "demo", num_cases=4, num_test_cases=0, shape=(32, 32, 24))
    out, models = tmp_path / "out", tmp_path / "models"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free loopback port
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS),
        "--dataset_dir",
        str(data),
        "--output_dir",
        str(out),
        "--ckpt_dir",
        str(models),
        "--bundle_root",
        str(REPO_ROOT),
    ]
    for key, value in TINY.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    # exactly one set of checkpoints and logs: rank 0's
    assert sorted(p.name for p in models.iterdir()) == ["model.pt"]
    assert len(list(out.glob("checkpoint_*.pt"))) == 1
    assert len(list(out.glob("checkpoint_*epoch=1.pt"))) == 1
    # train.yaml has two TensorBoard writers (training loss, validation metrics): both in one process
    writers = {path.name.split(".")[-2] for path in out.glob("events.out.tfevents.*")}
    assert len(writers) == 1, f"TensorBoard files written by processes {writers}"
    assert result.stdout.count("val_mean_dice") + result.stderr.count("val_mean_dice") >= 1
    rows = (out / "metrics_per_epoch.csv").read_text().strip().splitlines()
    assert len(rows) == 2, f"one header and one epoch row expected, got {rows}"
    ddp_dice = _scalar(out, "val_mean_dice")
    assert len(ddp_dice) == 1, "one validation after one epoch"

    # The same checkpoint evaluated by one process on the same validation split.
    torch.set_num_threads(1)
    single = ConfigWorkflow(
        config_file=CONFIGS[0],
        workflow_type="train",
        **{
            **TINY,
            "bundle_root": str(REPO_ROOT),
            "datalist": str(out / "datalist.json"),
            "output_dir": str(tmp_path / "single"),
            "ckpt_dir": str(tmp_path / "single_models"),
            "validate#handlers": [],
        },
    )
    single.initialize()
    network = single.parser.get_parsed_content("network")
    network.load_state_dict(Checkpoint(models / "model.pt").weights)
    evaluator = single.parser.get_parsed_content("validate#evaluator")
    assert len(evaluator.data_loader.dataset) == 2, "both validation cases, split between the two ranks above"
    evaluator.run()
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(ddp_dice[0], abs=1e-5)
