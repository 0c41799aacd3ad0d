"""Training throughput: the bundle's trainer against a bare PyTorch loop, in one run.

The bundle side is the real ``configs/train.yaml`` workflow (CacheDataset, DataLoader with the
random crop/flip/intensity transforms, Ignite ``SupervisedTrainer`` with its handlers); the
bare side is the same network, loss, optimizer and batch size on batches pre-loaded into
memory, so the ratio shows what the data pipeline and Ignite cost. Rounds alternate
(bundle, bare, bundle, bare, ...) because this machine is shared and noisy.

    python scripts/benchmark_training.py                      # demo data, demo schedule
    python scripts/benchmark_training.py --dataset_dir DIR    # real data, full recipe
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _workflow(args: argparse.Namespace) -> ConfigWorkflow:
    overrides: dict[str, Any] = {
        "bundle_root": str(REPO_ROOT),
        "output_dir": str(Path(args.work_dir) / "train"),
        "ckpt_dir": str(Path(args.work_dir) / "models"),
        "val_interval": 10_000,  # no validation inside the timed epochs
        "num_workers": args.num_workers,
    }
    configs = ["train.yaml"] if args.dataset_dir else ["train.yaml", "demo.yaml"]  # no data: the demo overlay
    if args.dataset_dir:
        overrides["dataset_dir"] = args.dataset_dir
    return ConfigWorkflow(
        config_file=[str(REPO_ROOT / "configs" / c) for c in configs],
        workflow_type="train",
        run_id="training",
        **overrides,
    )


def _bare_round(network: torch.nn.Module, loss_fn: Any, optimizer: Any, batches: list[tuple], device: Any) -> float:
    """Seconds per step of a plain forward/backward/step loop over pre-loaded batches."""
    network.train()
    start = time.perf_counter()
    for image, label in batches:
        image, label = image.to(device), label.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(image), label)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    """Run the benchmark and print (and optionally save) a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=None)
    parser.add_argument("--work_dir", default="runs/benchmark_training")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bundle/bare rounds after epoch 1")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the JSON report here")
    args = parser.parse_args()

    set_determinism(0)
    workflow = _workflow(args)
    t0 = time.perf_counter()
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")  # builds and fills the cache
    cache_seconds = time.perf_counter() - t0
    network = workflow.parser.get_parsed_content("network")
    loss_fn = workflow.parser.get_parsed_content("loss")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    device = workflow.parser.get_parsed_content("device")
    loader = workflow.parser.get_parsed_content("train#dataloader")

    # The per-epoch "last" checkpoint is part of the bundle's real cost; attach it first so the
    # epoch timer below includes it.
    workflow.parser.get_parsed_content("last_checkpoint_saver").attach(trainer)

    epoch_seconds: list[float] = []
    step_seconds: list[float] = []
    marks: dict[str, float] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Any) -> None:
        marks["epoch"] = time.perf_counter()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _end(engine: Any) -> None:
        seconds = time.perf_counter() - marks["epoch"]
        epoch_seconds.append(seconds)
        step_seconds.append(seconds / engine.state.epoch_length)

    # Epoch 1 (warm-up: worker start, allocator, oneDNN kernel selection).
    trainer.state.max_epochs = 1
    trainer.run()
    batches = [(torch.Tensor(b["image"]).clone(), torch.Tensor(b["label"]).clone()) for b in loader]
    bare_steps: list[float] = []
    for r in range(args.rounds):
        trainer.state.max_epochs = 2 + r
        trainer.run()
        bare_steps.append(_bare_round(network, loss_fn, optimizer, batches, device))
        print(f"round {r + 1}: bundle {step_seconds[-1]:.3f} s/step, bare {bare_steps[-1]:.3f} s/step", flush=True)

    bundle_step = statistics.median(step_seconds[1:])
    bare_step = statistics.median(bare_steps)
    report = {
        "data": args.dataset_dir or "demo phantoms (16 cases, 96x96x64)",
        "roi_size": workflow.parser.get_parsed_content("patch_size"),
        "batch_size": workflow.parser.get_parsed_content("batch_size"),
        "filters": workflow.parser.get_parsed_content("network_factory#filters"),
        "num_workers": args.num_workers,
        "steps_per_epoch": len(batches),
        "cache_build_seconds": round(cache_seconds, 2),
        "first_epoch_seconds": round(epoch_seconds[0], 2),
        "later_epoch_seconds_median": round(statistics.median(epoch_seconds[1:]), 2),
        "bundle_steps_per_second": round(1 / bundle_step, 3),
        "bare_loop_steps_per_second": round(1 / bare_step, 3),
        "bundle_over_bare": round(bare_step / bundle_step, 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
