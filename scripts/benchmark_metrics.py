"""Seconds of the per-case scores on real BraTS cases: the surface distances, HD95 and a whole evaluate_case.

Each case's ground truth is perturbed as ``tests/test_metrics.py`` does (eroded, shifted, one lesion
removed) and scored against the truth on the tumour's box, the way ``bundle evaluate`` scores a case.
Reported per case and perturbation (median of ``--repeats``): :func:`surface_distances` and :func:`hd95`
summed over WT, TC and ET, and :func:`evaluate_case` with the lesion-wise scores.

``--code DIR`` imports ``bundle`` from another checkout, so two versions of the code are measured by the
same script on the same machine (``docs/benchmarks/metrics_surface_distances.md``):

    python scripts/benchmark_metrics.py --dataset_dir ../shared/brats_samples --code ../main --json old.json
    python scripts/benchmark_metrics.py --dataset_dir ../shared/brats_samples --json new.json
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
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]


def _seconds(repeats: int, function: Any, *arguments: Any) -> float:
    """Median wall seconds of ``function(*arguments)`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*arguments)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _each(function: Any, pairs: list[tuple[np.ndarray, np.ndarray]], spacing: Any) -> list[Any]:
    """``function(pred, truth, spacing)`` of every (prediction, truth) mask pair."""
    return [function(p, t, spacing) for p, t in pairs]


def _perturbations(truth: np.ndarray) -> dict[str, np.ndarray]:
    """Eroded, shifted and one-lesion-removed versions of a real ground truth (as tests/test_metrics.py)."""
    eroded = truth.copy()
    eroded[~ndimage.binary_erosion(truth > 0, iterations=2)] = 0
    shifted = np.roll(truth, (2, -1, 1), axis=(0, 1, 2))
    removed = truth.copy()
    et_cc, n = ndimage.label(truth == 3, structure=np.ones((3, 3, 3)))
    if n > 1:
        sizes = np.bincount(et_cc.ravel())[1:]
        removed[et_cc == int(np.argsort(sizes)[-2]) + 1] = 0
    else:
        removed[truth == 3] = 0
    return {"eroded": eroded, "shifted": shifted, "lesion_removed": removed}


def main() -> None:
    """Score each case's perturbations; print (and optionally write) the seconds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--code", default=str(REPO_ROOT), help="the checkout whose bundle package is measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()))
    from bundle.evaluation.files import load_label_map
    from bundle.evaluation.metrics import evaluate_case, hd95, region_masks, surface_distances

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "code": str(Path(args.code).resolve()),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "cases": {},
    }
    totals = {"surface_distances": 0.0, "hd95": 0.0, "evaluate_case": 0.0}
    for truth_file in sorted(Path(args.dataset_dir).glob("*/*_seg.nii.gz")):
        labels, spacing, _ = load_label_map(truth_file, "brats2021")
        box = tuple(slice(max(int(i.min()) - 10, 0), int(i.max()) + 11) for i in np.nonzero(labels))
        truth = labels[box]
        truths = region_masks(truth)
        for name, pred in _perturbations(truth).items():
            preds = region_masks(pred)
            pairs = [(preds[r], truths[r]) for r in truths if preds[r].any() and truths[r].any()]
            row = {
                "surface_distances": _seconds(args.repeats, _each, surface_distances, pairs, spacing),
                "hd95": _seconds(args.repeats, _each, hd95, pairs, spacing),
                "evaluate_case": _seconds(args.repeats, evaluate_case, pred, truth, spacing),
            }
            for key, value in row.items():
                totals[key] += value
            key = f"{truth_file.parent.name} {name}"
            result["cases"][key] = {k: round(v, 4) for k, v in row.items()}
            print(key, json.dumps(result["cases"][key]))
    result["total_seconds"] = {k: round(v, 3) for k, v in totals.items()}
    print("total", json.dumps(result["total_seconds"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
