"""Make the v1 test checkpoints, the test case and their expected outputs (tests/data/README.md).

Runs only in a checkout of commit edeeb16 (the last layout before plans): ``python make_v1_checkpoints.py DATA``
from that checkout's root, DATA being this folder. Kept as the record of how the files were made.
"""

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

sys.path.insert(0, os.getcwd())
from bundle.infer import infer

from bundle.data import make_phantom

DATA = Path(sys.argv[1]).resolve()
CASES = {
    "v1_m4_cpu.pt": (["configs/train.yaml", "configs/cpu.yaml"], {"network_factory#filters": [4, 8, 8, 8, 8, 8]}),
    "v1_m4_best.pt": (
        ["configs/train.yaml", "configs/variants/m4_resunet_ds.yaml"],
        {"network_factory#filters": [4, 8, 8, 8, 8, 8, 8]},
    ),
    "v1_m1.pt": (
        ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m1_la_resunet.yaml"],
        {"network_factory#channels": [4, 8, 8, 8, 8], "network_factory#stem_features_per_modality": 2},
    ),
    "v1_m2.pt": (
        ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m2_resunet_tversky.yaml"],
        {"network_factory#channels": [4, 8, 8, 8, 8]},
    ),
    "v1_m3_clahe.pt": (
        ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m3_resse_lka_unet.yaml"],
        {"network_factory#channels": [4, 8, 8, 8, 8], "clahe": True},
    ),
}
RUNS = [
    ("v1_m4_cpu.pt", False),
    ("v1_m4_best.pt", True),
    ("v1_m1.pt", False),
    ("v1_m2.pt", False),
    ("v1_m3_clahe.pt", False),
]

for name, (files, overrides) in CASES.items():
    parser = ConfigParser()
    parser.read_config(files)
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    record = parser.get_parsed_content("model_record").state_dict()
    torch.save({"model": network.state_dict(), "model_record": record}, DATA / name)

case = DATA / "v1_case" / "Case_v1"
case.mkdir(parents=True, exist_ok=True)
image, labels = make_phantom(7, (48, 48, 32))
affine = np.diag([-1.5, -1.5, 1.5, 1.0])
affine[:3, 3] = [36.0, 36.0, -24.0]
for channel, modality in enumerate(("t1", "t1ce", "t2", "flair")):
    nib.save(nib.Nifti1Image(image[channel], affine), case / f"Case_v1_{modality}.nii.gz")
nib.save(nib.Nifti1Image(labels, affine), case.parent / "Case_v1_truth.nii.gz")

expected, fingerprints = {}, {}
for name, tta in RUNS:
    (seg,) = infer(
        str(case),
        output=f"/tmp/v1_out/{name}",
        checkpoint=str(DATA / name),
        tta=tta,
        overwrite=True,
        device="cpu",
        save_probabilities=True,
    )
    key = f"{name}|tta={tta}"
    expected[key] = np.asarray(nib.load(seg).dataobj)
    prob = np.asarray(nib.load(seg.replace("_seg.nii.gz", "_prob.nii.gz")).dataobj, dtype=np.float64)
    channels = np.moveaxis(prob, -1, 0) if prob.ndim == 4 else prob[None]
    fingerprints[key] = {
        "shape": list(prob.shape),
        "sum": [float(c.sum()) for c in channels],
        "sumsq": [float((c * c).sum()) for c in channels],
        "max": [float(c.max()) for c in channels],
        "min": [float(c.min()) for c in channels],
    }
np.savez_compressed(DATA / "v1_expected.npz", **expected)
(DATA / "v1_expected_probabilities.json").write_text(json.dumps(fingerprints, indent=1) + "\n")
