"""What M4's post-processing does to a correct segmentation, and what it costs, on real BraTS cases.

Each case's ground truth is turned into region probabilities (0.97 inside each of WT, TC, ET,
0.02 outside), so the region rule gives the truth back; M4's recipe (``configs/train.yaml``'s
``inference_recipe``) then runs its four steps on it, one after the other, on the full
240 x 240 x 155 volume. Reported per case, in the same run:

* the Dice of the result against the truth per region, for the closing with the recipe's element
  (the cross) and with the 3 x 3 x 3 cube (the baseline the element was chosen against), and without
  any closing (steps 1-3 only: a correct prediction should come through them unchanged);
* the seconds each step takes (median of ``--repeats``), against the region rule alone.

    python scripts/benchmark_postprocessing.py --dataset_dir ../shared/brats_samples [--json out.json]
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

import numpy as np
import torch
from monai.bundle import ConfigParser

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bundle.constants import ET, NCR  # noqa: E402
from bundle.evaluation.files import load_label_map  # noqa: E402
from bundle.inference.postprocessing import (  # noqa: E402
    close_tumour_regions,
    remove_small_tumour_components,
    small_et_components_to_ncr,
    small_et_volume_to_ncr,
)
from bundle.inference.to_labels import regions_to_labels  # noqa: E402
from bundle.plan.recipes import normalise_recipe  # noqa: E402


def _seconds(repeats: int, function: Any, *arguments: Any) -> tuple[float, Any]:
    """Median wall seconds of ``function(*arguments)`` over ``repeats`` calls, and its result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*arguments)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _dice(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    regions = {"WT": lambda x: x > 0, "TC": lambda x: np.isin(x, (NCR, ET)), "ET": lambda x: x == ET}
    out = {}
    for name, region in regions.items():
        a, b = region(labels), region(truth)
        out[name] = round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 4)
    return out


def main() -> None:
    """Run M4's steps on each case's truth; print (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = ConfigParser()
    config.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    recipe = normalise_recipe(config.get_parsed_content("inference_recipe"), "regions")
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine()}
    result["torch_threads"] = torch.get_num_threads()
    result["cases"] = {}
    for truth_file in sorted(Path(args.dataset_dir).glob("*/*_seg.nii.gz")):
        truth, _, _ = load_label_map(truth_file, "brats2021")
        masks = [truth > 0, np.isin(truth, (NCR, ET)), truth == ET]
        probs = torch.as_tensor(np.stack([np.where(m, 0.97, 0.02) for m in masks])).float()
        et_prob = probs[2]
        seconds: dict[str, float] = {}
        thresholds = (recipe["wt_threshold"], recipe["tc_threshold"], recipe["et_threshold"])
        n = args.repeats
        seconds["regions -> labels"], labels = _seconds(n, regions_to_labels, probs, *thresholds)
        seconds["1 et_components_to_ncr"], step1 = _seconds(
            n,
            small_et_components_to_ncr,
            labels,
            et_prob,
            recipe["et_component_min_size"],
            recipe["et_component_min_prob"],
        )
        seconds["2 et_volume_to_ncr"], step2 = _seconds(
            n, small_et_volume_to_ncr, step1, et_prob, recipe["et_min_volume"], recipe["et_volume_min_prob"]
        )
        seconds["3 remove_small_components"], step3 = _seconds(
            n, remove_small_tumour_components, step2, recipe["min_component_size"]
        )
        closed = {}
        for element in ("cross", "cube"):
            seconds[f"4 closing ({element})"], closed[element] = _seconds(
                n, close_tumour_regions, step3, recipe["closing_size"], element
            )
        result["cases"][truth_file.parent.name] = {
            "tumour_voxels": int((truth > 0).sum()),
            "dice_after_steps_1_3": _dice(step3[0].numpy(), truth),
            "dice_with_closing_cross": _dice(closed["cross"][0].numpy(), truth),
            "dice_with_closing_cube": _dice(closed["cube"][0].numpy(), truth),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        print(truth_file.parent.name, json.dumps(result["cases"][truth_file.parent.name]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
