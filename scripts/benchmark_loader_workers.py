"""What non-persistent DataLoader workers cost per epoch: persistent vs not, on the real train loader.

``configs/train.yaml`` starts new loader workers every epoch so that a resumed run augments exactly
as the uninterrupted one (docs/reference/training.md, "Resuming"). Training overlaps the workers' transforms
with the network's compute except at an epoch's start, so the cost is the wait for each epoch's first
batch; this measures that wait and the data-only epoch time, alternating the two settings.

    python scripts/benchmark_loader_workers.py --rounds 2 --epochs 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from monai.bundle import ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def measure(persistent: bool, epochs: int, work_dir: Path) -> tuple[list[float], list[float]]:
    """Seconds to the first batch and for the whole epoch (no training), per epoch."""
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "train.yaml"),
        workflow_type="train",
        run_id="training",
        bundle_root=str(REPO_ROOT),
        output_dir=str(work_dir / "out"),
        ckpt_dir=str(work_dir / "models"),
        **{"train#dataloader#persistent_workers": persistent},
    )
    workflow.initialize()
    loader = workflow.parser.get_parsed_content("train#dataloader")
    first, whole = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        batches = iter(loader)
        next(batches)
        first.append(time.perf_counter() - start)
        for _ in batches:
            pass
        whole.append(time.perf_counter() - start)
    return first, whole


def main() -> None:
    """Print, per round and setting, the per-epoch first-batch waits and the medians after epoch 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--work_dir", default="runs/benchmark_loader_workers")
    args = parser.parse_args()
    for round_index in range(args.rounds):
        for persistent in (True, False):
            first, whole = measure(persistent, args.epochs, Path(args.work_dir))
            print(
                f"round {round_index} persistent={persistent}: first batch "
                + " ".join(f"{s:.3f}" for s in first)
                + f" s | medians after epoch 1: first batch {statistics.median(first[1:]):.3f} s, "
                f"data-only epoch {statistics.median(whole[1:]):.3f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
