"""The single source of truth for modality order, label schemes and tumour regions.

Everything else (transforms, metrics, configs via ``$bundle.constants...``, metadata and docs)
reads these names; nothing else hard-codes them.

Internal label convention (used after loading, whatever the dataset layout):
``0`` background, ``1`` necrotic / non-enhancing core (NCR), ``2`` peritumoural edema (ED),
``3`` enhancing tumour (ET). It is contiguous so softmax models can use it as class indices.
"""

from __future__ import annotations

#: Canonical channel order of the 4-channel input image.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Name of M4's optional fifth input channel: 1 on the salient (brain: non-zero) voxels, 0 elsewhere.
SALIENT_CHANNEL: str = "salient"

#: Internal class indices (see module docstring).
BACKGROUND, NCR, ED, ET = 0, 1, 2, 3
CLASS_NAMES: dict[int, str] = {BACKGROUND: "background", NCR: "NCR", ED: "ED", ET: "ET"}

#: RGB colour (0-1) of each tumour class, as BraTS figures draw them (overlays, 3D Slicer segments).
LABEL_COLOURS: dict[int, tuple[float, float, float]] = {NCR: (1.0, 0.0, 0.0), ED: (0.0, 1.0, 0.0), ET: (1.0, 1.0, 0.0)}

#: Overlapping evaluation regions, in output-channel order, as sets of internal labels.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (NCR, ED, ET), "TC": (NCR, ET), "ET": (ET,)}
REGION_NAMES: tuple[str, ...] = tuple(REGIONS)

#: Disjoint classes some papers report, as sets of internal labels.
DISJOINT_CLASSES: dict[str, tuple[int, ...]] = {"NCR": (NCR,), "ED": (ED,), "ET": (ET,)}

#: Each dataset's label values mapped onto the internal convention.
LABEL_SCHEMES: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 1 NCR, 2 ED, 4 ET
    "brats2021": {0: BACKGROUND, 1: NCR, 2: ED, 4: ET},
    # BraTS 2023+: same meaning, ET is 3
    "brats2023": {0: BACKGROUND, 1: NCR, 2: ED, 3: ET},
    # Medical Segmentation Decathlon Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour
    "msd": {0: BACKGROUND, 1: ED, 2: NCR, 3: ET},
}

#: Per layout, the file suffix of each canonical modality and of the segmentation.
BRATS2021_SUFFIXES: dict[str, str] = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
BRATS2023_SUFFIXES: dict[str, str] = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}

#: Structuring elements of the morphological post-processing (bundle.inference.postprocessing): the cross of face
#: neighbours (6-connected in 3-D) and the full cube (26-connected).
STRUCTURING_ELEMENTS: tuple[str, ...] = ("cross", "cube")

#: Channel order of MSD Task01's 4-D images, and the permutation onto ``MODALITIES``.
MSD_CHANNEL_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
MSD_TO_CANONICAL: tuple[int, ...] = tuple(MSD_CHANNEL_ORDER.index(m) for m in MODALITIES)


def scheme_for_layout(layout: str) -> str:
    """Return the label-scheme name used by a dataset layout (``brats2021``, ``brats2023``, ``msd``)."""
    if layout not in LABEL_SCHEMES:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LABEL_SCHEMES)}")
    return layout
