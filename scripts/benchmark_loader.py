"""Training samples per second out of configs/train.yaml's train loader, on real cases.

Builds train.yaml's training dataset as training does (``monai.bundle`` ``ConfigWorkflow``: its
deterministic preprocessing cached, then its random transforms: a 128^3 patch per sample, flips,
intensity augmentation) on every labelled case of ``--dataset_dir``, and draws ``--samples``
samples through a ``DataLoader`` with the config's batch size and ``--num_workers`` worker
processes, cases drawn at random with replacement, so a run on a few cases measures the steady state
of a long epoch. The first draw of each case fills the cache (reported apart); the figure is
samples per second after it. No network runs.

    python scripts/benchmark_loader.py --dataset_dir ../shared/brats_samples --samples 60 --num_workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402


def main() -> None:
    """Fill the cache, then time ``--samples`` samples of the train loader."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train.yaml"),
        workflow_type="train",
        logging_file=False,
        dataset_dir=args.dataset_dir,
        output_dir=str(work),
        bundle_root=str(ROOT),
        num_workers=args.num_workers,
        # every labelled case of the folder (not one fold's training part): more cases, fewer repeats
        train_datalist="$bundle.data.select_cases(@dataset_dir, labelled=True)",
    )
    workflow.initialize()
    dataset = workflow.parser.get_parsed_content("train#dataset")
    batch_size = workflow.parser.get_parsed_content("batch_size")
    start = time.perf_counter()
    for index in range(len(dataset)):  # the first draw of each case fills the cache
        dataset[index]
    fill = time.perf_counter() - start
    sampler = RandomSampler(
        dataset, replacement=True, num_samples=args.samples, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=args.num_workers)
    start, seen, first = time.perf_counter(), 0, None
    for batch in loader:
        items = batch if isinstance(batch, list) else [batch]
        seen += sum(int(item["image"].shape[0]) for item in items)
        first = first if first is not None else time.perf_counter() - start
    total = time.perf_counter() - start
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": list(os.getloadavg()),
        "cases": len(dataset),
        "cache_fill_s_per_case": round(fill / max(1, len(dataset)), 3),
        "samples": seen,
        "patch": workflow.parser.get_parsed_content("patch_size"),
        "num_workers": args.num_workers,
        "seconds_to_first_batch": round(first or 0.0, 3),
        "samples_per_s": round(seen / total, 2),
        "samples_per_s_after_first_batch": round((seen - batch_size) / max(1e-9, total - (first or 0.0)), 2),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
