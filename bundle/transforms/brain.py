"""The brain of a skull-stripped case: M4's salient channel, the foreground rule of the crop.

* :class:`SalientMaskd` - M4's salient (brain) mask of the raw image, which MONAI's ``ConcatItemsd``
  then appends as an input channel after normalisation (``salient_channel`` in ``configs/train.yaml``);
  :func:`input_channel_names` names the channels the network then gets.
* :func:`is_positive_numpy` - MONAI's default foreground rule of ``CropForegroundd`` (> 0), reduced by numpy.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from bundle.constants import MODALITIES, SALIENT_CHANNEL
from bundle.options import as_bool
from bundle.transforms.labels import one_name_per_key


def input_channel_names(salient_channel: Any = False) -> list[str]:
    """The network's input channels in order: the modalities, then M4's salient mask when it is added.

    ``salient_channel`` is read as a boolean option (``"false"`` from a command line is false).
    """
    return [*MODALITIES, SALIENT_CHANNEL] if as_bool(salient_channel, "salient_channel") else list(MODALITIES)


class SalientMaskd(MapTransform):
    """M4's salient voxels: ``1`` where any modality of the raw image is non-zero, else ``0``.

    The M4 paper's best setting adds an input channel that one-hot encodes the salient (brain,
    non-zero) voxels. BraTS images are skull-stripped with the background exactly 0, so "non-zero
    in any modality" is the brain. The mask is written to ``mask_key`` as a float ``(1, *spatial)``
    image with the source's metadata; ``configs/train.yaml`` computes it after the brain crop and
    before the intensity transform (the z-score can map a brain voxel to 0, and other intensity
    transforms move the background off 0), and appends it as the last channel after that transform
    (MONAI's ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` would turn the constant mask
    into zeros). MONAI's ``ForegroundMaskd`` thresholds intensities (Otsu by default) per channel
    for pathology images, which is not the non-zero rule.

    Args:
        keys: the image key (one channel-first image per key).
        mask_key: where the mask goes (one per key, or a single name for a single key).
        allow_missing_keys: skip missing keys.
    """

    def __init__(
        self, keys: KeysCollection, mask_key: str | Sequence[str] = "salient", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = one_name_per_key(self.keys, mask_key, "mask key")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the mask of every image key present."""
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            image = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(d[key])
            mask = (image != 0).any(dim=0, keepdim=True).to(torch.float32)
            if isinstance(image, MetaTensor):
                mask = MetaTensor(mask.as_tensor(), meta=image.meta, applied_operations=image.applied_operations)
            d[mask_key] = mask
        return d


def is_positive_numpy(image: Any) -> np.ndarray:
    """MONAI's default foreground rule for ``CropForegroundd`` (``image > 0``), as a numpy mask.

    MONAI's ``generate_spatial_bounding_box`` reduces the mask with the library of the mask it gets:
    given a torch tensor (its default ``is_positive``), the comparison and the four ``any`` over a
    BraTS case are several times slower than numpy's for the same box (tests/test_loading.py; the
    figures: docs/benchmarks/code_notes.md). The image is read on the CPU (preprocessing runs there).
    """
    return torch.as_tensor(image).numpy(force=True) > 0
