"""Checkpoints written before plans were recorded by value (model record version 1) keep working.

``tests/data/v1_*.pt`` were written by commit edeeb16 (tests/data/README.md) with its configs; today's
``python -m bundle infer`` must segment the case those checkpoints were run on exactly as that commit did:
the same label maps, and the same probabilities (per-channel sums, sums of squares, extremes).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT

from bundle.inference.run import infer

DATA = REPO_ROOT / "tests" / "data"
EXPECTED = np.load(DATA / "v1_expected.npz")
FINGERPRINTS = json.loads((DATA / "v1_expected_probabilities.json").read_text())


# M4's best setting runs 8 flips of a 128^3 window: slow
RUNS = [pytest.param(run, marks=pytest.mark.slow) if "tta=True" in run else run for run in sorted(FINGERPRINTS)]


@pytest.mark.parametrize("run", RUNS)
def test_a_v1_checkpoint_segments_as_it_did(tmp_path: Path, run: str) -> None:
    checkpoint, tta = run.split("|tta=")
    (segmentation,) = infer(
        str(DATA / "v1_case" / "Case_v1"),
        output=str(tmp_path),
        checkpoint=str(DATA / checkpoint),
        tta=tta == "True",
        device="cpu",
        save_probabilities=True,
    )
    labels = np.asarray(nib.load(segmentation).dataobj)
    np.testing.assert_array_equal(labels, EXPECTED[run])
    prob = np.asarray(nib.load(segmentation.replace("_seg.nii.gz", "_prob.nii.gz")).dataobj, dtype=np.float64)
    channels = np.moveaxis(prob, -1, 0) if prob.ndim == 4 else prob[None]
    expected = FINGERPRINTS[run]
    assert list(prob.shape) == expected["shape"]
    for name, values in (
        ("sum", [c.sum() for c in channels]),
        ("sumsq", [(c * c).sum() for c in channels]),
        ("max", [c.max() for c in channels]),
        ("min", [c.min() for c in channels]),
    ):
        np.testing.assert_allclose(values, expected[name], rtol=1e-5, atol=1e-4, err_msg=f"{run}: {name}")
