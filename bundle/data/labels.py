"""One helper for each small job on label maps and masks, shared by every layer above it.

* label values: a dataset's scheme (BraTS 2021 1/2/4, BraTS 2023 1/2/3, MSD) to the internal labels
  and back (:func:`to_internal`, :func:`from_internal`, :func:`unknown_label_values`), always with
  MONAI's :class:`~monai.transforms.MapLabelValue`;
* :func:`bounding_box` of a mask, from MONAI's
  :func:`~monai.transforms.utils.generate_spatial_bounding_box`;
* :func:`connected_components` of a mask with its voxel counts (``scipy.ndimage.label``; MONAI has
  no labelling function that returns the components themselves, only transforms that keep or drop
  some of them).

Transforms, post-processing, metrics and plots import these, never each other, for these jobs.
Everything takes numpy arrays or torch tensors and returns the same type (label mapping: also the
same device and dtype).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.transforms import MapLabelValue
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_data_type
from scipy import ndimage

from bundle.constants import LABEL_SCHEMES

#: Name of the identity scheme: the internal labels themselves (0 bg, 1 NCR, 2 ED, 3 ET).
INTERNAL = "internal"


def scheme_values(scheme: str) -> dict[int, int]:
    """A scheme's label value -> internal label (``"internal"``: the identity); an unknown name raises."""
    if scheme == INTERNAL:
        return {v: v for v in sorted(set(LABEL_SCHEMES["brats2021"].values()))}
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; expected {INTERNAL!r} or one of {sorted(LABEL_SCHEMES)}")
    return dict(LABEL_SCHEMES[scheme])


def unknown_label_values(labels: NdarrayOrTensor, scheme: str) -> list[float]:
    """The values in ``labels`` that ``scheme`` does not have (non-integers included), sorted."""
    known = scheme_values(scheme)
    values = torch.unique(labels).tolist() if isinstance(labels, torch.Tensor) else np.unique(labels).tolist()
    return [v for v in values if int(v) != v or int(v) not in known]


def _mapped(labels: NdarrayOrTensor, orig: list[int], target: list[int]) -> NdarrayOrTensor:
    # MONAI's MapLabelValue takes its torch backend (device kept) when given a torch dtype
    return MapLabelValue(orig, target, dtype=labels.dtype)(labels)


def to_internal(labels: NdarrayOrTensor, scheme: str) -> NdarrayOrTensor:
    """Map a dataset's label values onto the internal labels (values outside the scheme are left as they are)."""
    mapping = scheme_values(scheme)
    return _mapped(labels, list(mapping), list(mapping.values()))


def from_internal(labels: NdarrayOrTensor, scheme: str) -> NdarrayOrTensor:
    """Map internal labels (0 bg, 1 NCR, 2 ED, 3 ET) onto a dataset's label values."""
    mapping = scheme_values(scheme)
    return _mapped(labels, list(mapping.values()), list(mapping))


def bounding_box(mask: NdarrayOrTensor, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of a spatial boolean mask ``(*spatial)``, grown by ``margin`` and clipped; ``None`` if empty.

    MONAI's ``generate_spatial_bounding_box`` (channel-first input, ``allow_smaller`` keeps the box
    inside the array). A CPU tensor is read as numpy, whose ``any`` is several times faster than
    torch's on a volume; a CUDA tensor stays on its device.
    """
    if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
        mask = mask.numpy(force=True)
    if not mask.any():
        return None
    start, end = generate_spatial_bounding_box(mask[None], select_fn=_nonzero, margin=margin, allow_smaller=True)
    return tuple(slice(int(s), int(e)) for s, e in zip(start, end, strict=True))


def _nonzero(x: NdarrayOrTensor) -> NdarrayOrTensor:
    return x != 0


def connected_components(mask: NdarrayOrTensor, connectivity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a spatial boolean mask: ``(component map, voxel count per id)``.

    Id 0 is the background (its count is the background's). ``connectivity`` is scipy's rank
    (1: faces only, 6 neighbours in 3-D); ``None`` is full connectivity (26 in 3-D, 8 in 2-D), as
    MONAI's connected-component transforms and the BraTS lesion-wise evaluation use.
    """
    array = convert_data_type(mask, np.ndarray)[0].astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(array.ndim, array.ndim if connectivity is None else connectivity)
    components, count = ndimage.label(array, structure=structure)
    return components, np.bincount(components.ravel(), minlength=count + 1)
