"""What the full case check costs on real BraTS cases, against what training spends on a case.

The check (``bundle.data.check_case``) reads every header, then decodes every voxel of every
file once (truncated data, NaN / Inf). It is compared in the same run with

* the check it replaced (headers and the label map's values; the same function minus the image decoding),
* train.yaml's deterministic preprocessing of the same case (what the first epoch pays anyway to
  fill the cache: load, reorient, crop, normalise, regions),
* one training step of train.yaml's default network on a ``patch_size`` patch (batch 2), i.e. the
  per-case cost of one epoch on this machine.

    python scripts/benchmark_checks.py --dataset_dir ../shared/brats_samples [--steps 2] [--json out.json]
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
from unittest import mock

import torch
from monai.bundle import ConfigParser

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bundle import data as bundle_data  # noqa: E402


def _seconds(function: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Time the checks, the preprocessing and a training step; print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="training steps to time (0: skip)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cases = bundle_data.discover_cases(args.dataset_dir)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine()}
    result["cores"] = torch.get_num_threads()
    result["cases"] = len(cases)

    read_voxels = bundle_data.read_voxels  # the earlier check decoded the label map only
    with mock.patch.object(
        bundle_data, "read_voxels", lambda p, what="image": read_voxels(p, what) if what == "label" else None
    ):
        header = _seconds(lambda: [bundle_data.check_case(c) for c in cases], args.repeats) / len(cases)
    full = _seconds(lambda: [bundle_data.check_case(c) for c in cases], args.repeats) / len(cases)
    threaded = _seconds(lambda: bundle_data.check_cases(cases, progress=False), args.repeats) / len(cases)
    result["check_headers_and_labels_s_per_case"] = round(header, 3)
    result["check_full_s_per_case_1_thread"] = round(full, 3)
    result["check_full_s_per_case_threads"] = round(threaded, 3)

    config = ConfigParser.load_config_file(str(REPO_ROOT / "configs" / "train.yaml"))
    config.update({"bundle_root": str(REPO_ROOT), "dataset_dir": args.dataset_dir})
    train = ConfigParser(config)
    preprocessing = train.get_parsed_content("validate#preprocessing")
    items = [c.to_item() for c in cases]
    result["preprocess_s_per_case"] = round(
        _seconds(lambda: [preprocessing(i) for i in items], args.repeats) / len(items), 3
    )

    if args.steps:
        network = train.get_parsed_content("network")
        loss_fn = train.get_parsed_content("loss")
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
        roi = train.get_parsed_content("patch_size")
        batch = torch.randn(2, 4, *roi).to(memory_format=torch.channels_last_3d)
        label = (torch.rand(2, 3, *roi) > 0.9).float()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(network(batch), label).backward()
            optimizer.step()

        step()  # warm-up: oneDNN picks its kernels
        seconds = _seconds(step, args.steps)
        result["train_step_s_batch2"] = round(seconds, 2)
        result["train_s_per_case_per_epoch"] = round(seconds / 2, 2)
        result["roi_size"] = list(roi)
    result["full_check_over_preprocess"] = round(threaded / result["preprocess_s_per_case"], 3)
    if args.steps:
        result["full_check_over_epoch_per_case"] = round(threaded / result["train_s_per_case_per_epoch"], 4)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
