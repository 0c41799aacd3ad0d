"""What M4's post-processing does to a correct segmentation, and what it costs, on real BraTS cases.

Each case's ground truth is turned into region probabilities (0.97 inside each of WT, TC, ET,
0.02 outside), so the region rule gives the truth back; M4's recipe (``configs/train.yaml``'s
``inference_recipe``) then runs its four steps on it, one after the other, on the full
240 x 240 x 155 volume. Reported per case, in the same run:

* the Dice of the result against the truth per region, for the closing with the recipe's element
  (the cross) and with the 3 x 3 x 3 cube (the baseline the element was chosen against), and without
  any closing (steps 1-3 only: a correct prediction should come through them unchanged);
* the seconds each step takes (median of ``--repeats``), against the region rule alone;
* the closing against the library's way to the same labels, scipy's grey-level closing of the nesting
  level (:func:`scipy.ndimage.grey_closing`, as ``tests/test_postprocessing.py`` checks it): wall and CPU
  seconds of this process (the CPU time is less disturbed by others on a shared machine), and whether
  the labels are equal.

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
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bundle.constants import BACKGROUND, ED, ET, NCR  # noqa: E402
from bundle.data.labels import bounding_box  # noqa: E402
from bundle.evaluation.files import load_label_map  # noqa: E402
from bundle.inference.postprocessing import (  # noqa: E402
    _REGION_BITS,
    binary_dilation,
    binary_erosion,
    close_tumour_regions,
    remove_small_tumour_components,
    small_et_components_to_ncr,
    small_et_volume_to_ncr,
)
from bundle.inference.to_labels import regions_to_labels  # noqa: E402
from bundle.plan.recipes import normalise_recipe  # noqa: E402


def _seconds(repeats: int, function: Any, *arguments: Any) -> tuple[float, Any]:
    """Median wall seconds of ``function(*arguments)`` over ``repeats`` calls, and its result."""
    wall, _, result = _wall_and_cpu_seconds(repeats, function, *arguments)
    return wall, result


def _wall_and_cpu_seconds(repeats: int, function: Any, *arguments: Any) -> tuple[float, float, Any]:
    """Median wall and CPU (this process) seconds of ``function(*arguments)`` over ``repeats`` calls, and its result."""
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function(*arguments)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


#: internal label -> how many of the nested regions hold it (ED: WT; NCR: WT, TC; ET: all three)
_NESTING = np.zeros(4, dtype=np.uint8)
_NESTING[ED], _NESTING[NCR], _NESTING[ET] = 1, 2, 3
_LEVEL_TO_LABEL = np.array([BACKGROUND, ED, NCR, ET], dtype=np.uint8)


def grey_closing_labels(labels: torch.Tensor, filter_size: int, element: str) -> torch.Tensor:
    """The closing of the nested regions as scipy's grey-level closing of the nesting level, on the same box."""
    lab = labels[0].numpy()
    box = bounding_box(lab != BACKGROUND, margin=filter_size - 1)
    if box is None or filter_size == 1:
        return labels
    cross = ndimage.iterate_structure(ndimage.generate_binary_structure(lab.ndim, 1), filter_size // 2)
    footprint = cross if element == "cross" else np.ones((filter_size,) * lab.ndim, dtype=bool)
    closed = ndimage.grey_closing(_NESTING[lab[box].astype(np.intp)], footprint=footprint, mode="nearest")
    out = labels.clone()
    out[(0, *box)] = torch.as_tensor(_LEVEL_TO_LABEL[closed], dtype=out.dtype)
    return out


def _dice(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    regions = {"WT": lambda x: x > 0, "TC": lambda x: np.isin(x, (NCR, ET)), "ET": lambda x: x == ET}
    out = {}
    for name, region in regions.items():
        a, b = region(labels), region(truth)
        out[name] = round(float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)), 4)
    return out


def _morphology_cpu_seconds(repeats: int, labels: torch.Tensor, size: int, element: str) -> tuple[float, float]:
    """CPU seconds of the dilation and erosion alone on the tumour's box: the bundle's bit planes, scipy's levels."""
    lab = labels[0]
    box = bounding_box(lab.numpy() != BACKGROUND, margin=size - 1)
    bits = _REGION_BITS[lab[box].long()]
    levels = _NESTING[lab[box].numpy().astype(np.intp)]
    cross = ndimage.iterate_structure(ndimage.generate_binary_structure(lab.ndim, 1), size // 2)
    footprint = cross if element == "cross" else np.ones((size,) * lab.ndim, dtype=bool)
    radius = size // 2
    ours = _wall_and_cpu_seconds(
        repeats, lambda: binary_erosion(binary_dilation(bits, radius, lab.ndim, element), radius, lab.ndim, element)
    )[1]
    theirs = _wall_and_cpu_seconds(repeats, ndimage.grey_closing, levels, None, footprint, None, None, "nearest")[1]
    return ours, theirs


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
    result["command"] = " ".join(["python", *sys.argv])
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
        closed, cpu_seconds, equal = {}, {}, {}
        for element in ("cross", "cube"):
            size = recipe["closing_size"]
            for name, closing in (("", close_tumour_regions), (", scipy grey_closing", grey_closing_labels)):
                key = f"4 closing ({element}{name})"
                seconds[key], cpu_seconds[key], out = _wall_and_cpu_seconds(n, closing, step3, size, element)
                closed.setdefault(element, out)
            equal[element] = bool(torch.equal(closed[element], out))
            cpu_seconds[f"morphology only ({element})"], cpu_seconds[f"morphology only ({element}, scipy)"] = (
                _morphology_cpu_seconds(n, step3, size, element)
            )
        result["cases"][truth_file.parent.name] = {
            "tumour_voxels": int((truth > 0).sum()),
            "dice_after_steps_1_3": _dice(step3[0].numpy(), truth),
            "dice_with_closing_cross": _dice(closed["cross"][0].numpy(), truth),
            "dice_with_closing_cube": _dice(closed["cube"][0].numpy(), truth),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "cpu_seconds_closing": {k: round(v, 4) for k, v in cpu_seconds.items()},
            "grey_closing_gives_the_same_labels": equal,
        }
        print(truth_file.parent.name, json.dumps(result["cases"][truth_file.parent.name]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
