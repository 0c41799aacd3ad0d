"""Label conventions: each dataset's layout onto the internal labels, labels to region channels and back.

* :class:`ToInternalConventiond` - per-sample layout handling (channel order of MSD's 4-D images, each
  dataset's label values) onto ``bundle.constants``; MONAI's ``MapLabelValued`` maps one fixed scheme,
  but one datalist may mix layouts, so the scheme is read per sample.
* :class:`LabelsToRegionsd` - internal labels to float WT/TC/ET channels. MONAI's
  ``ConvertToMultiChannelBasedOnBratsClassesd`` hard-codes ET = 4 (BraTS 2021 values) and yields boolean
  channels that break ``DiceLoss(squared_pred=True)`` on monai 1.6.1.
* :class:`RegionsToDisjointd` - nested region masks to the disjoint classes NCR and ED (M3 reports them).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from bundle.constants import LABEL_SCHEMES, MODALITIES, MSD_TO_CANONICAL, REGIONS
from bundle.data.labels import scheme_values, to_internal, unknown_label_values


def map_label_values(label: torch.Tensor | np.ndarray, scheme: str) -> torch.Tensor | np.ndarray:
    """Map a dataset's label values onto the internal convention (values outside the scheme raise).

    The mapping is :func:`bundle.data.labels.to_internal` (MONAI's ``MapLabelValue``).
    """
    unknown = unknown_label_values(label, scheme)
    if unknown:
        expected = sorted(scheme_values(scheme))
        raise ValueError(f"unknown label values {unknown} for scheme {scheme} (expected {expected})")
    return to_internal(label, scheme)


class ToInternalConventiond(MapTransform):
    """Bring one loaded sample onto the bundle's channel order and label convention.

    The dataset layout comes from the sample's ``layout_key`` (written by ``bundle.data`` into
    every datalist item) or ``default_layout``. For ``msd`` the 4-D image's channels
    (FLAIR, T1w, T1gd, T2w) are reordered to ``MODALITIES``; labels are mapped to internal
    values (0 bg, 1 NCR, 2 ED, 3 ET). The image must already be channel-first.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str | None = "label",
        layout_key: str = "layout",
        default_layout: str = "brats2021",
        allow_missing_keys: bool = True,
    ) -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.label_key, self.layout_key = image_key, label_key, layout_key
        self.default_layout = default_layout

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Reorder channels and map label values of one sample."""
        d = dict(data)
        layout = d.get(self.layout_key, self.default_layout)
        if layout not in LABEL_SCHEMES:
            raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LABEL_SCHEMES)}")
        image = d[self.image_key]
        if image.shape[0] != len(MODALITIES):
            source = _source_name(image)
            raise ValueError(
                f"{source}: expected {len(MODALITIES)} channels ({', '.join(MODALITIES)}), got {image.shape[0]}"
            )
        if layout == "msd":
            d[self.image_key] = image[list(MSD_TO_CANONICAL)]
        if self.label_key and self.label_key in d:
            try:
                d[self.label_key] = map_label_values(d[self.label_key], layout)
            except ValueError as err:
                raise ValueError(f"{_source_name(d[self.label_key])}: {err}") from err
        return d


def _source_name(array: Any) -> str:
    if isinstance(array, MetaTensor):
        name = array.meta.get("filename_or_obj", "")
        if isinstance(name, (list, tuple)):
            name = name[0] if name else ""
        return str(name) or "input"
    return "input"


class LabelsToRegions(Transform):
    """Internal label map ``(1, *spatial)`` -> float region channels ``(len(regions), *spatial)``.

    Regions default to ``bundle.constants.REGIONS`` (WT, TC, ET, overlapping).
    """

    def __init__(self, regions: Mapping[str, Sequence[int]] | None = None) -> None:
        self.regions = dict(REGIONS if regions is None else regions)

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        """Return the float region channels of one channel-first label map."""
        if label.shape[0] != 1:
            raise ValueError(f"expected a single-channel label map, got shape {tuple(label.shape)}")
        channels = [torch.isin(label[0], torch.as_tensor(v, device=label.device)) for v in self.regions.values()]
        out = torch.stack(channels).to(torch.float32)
        if isinstance(label, MetaTensor):
            out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
        return out


class LabelsToRegionsd(MapTransform):
    """Dictionary version of :class:`LabelsToRegions`."""

    def __init__(
        self,
        keys: KeysCollection,
        regions: Mapping[str, Sequence[int]] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = LabelsToRegions(regions)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert every key present."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(torch.as_tensor(d[key]) if not isinstance(d[key], torch.Tensor) else d[key])
        return d


def one_name_per_key(keys: Sequence[Hashable], names: str | Sequence[str], what: str) -> list[str]:
    """The names a dictionary transform writes, one per key (a single name for a single key)."""
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != len(keys):
        raise ValueError(f"one {what} per key: {list(keys)} -> {names}")
    return names


class RegionsToDisjointd(MapTransform):
    """Nested region masks ``(WT, TC, ET, *spatial)`` -> the disjoint classes ``(NCR, ED, *spatial)``.

    NCR = TC without ET and ED = WT without TC, the classes M3 reports (ET is the ET region itself).
    MONAI has no region -> class conversion; validation scores these with its Dice and HD95 metrics.
    Outputs go to ``output_keys`` (one per key); the affine and metadata are kept.
    """

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = one_name_per_key(self.keys, output_keys, "output key")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the disjoint-class channels of every key present."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            regions = torch.as_tensor(d[key]) > 0.5
            if regions.shape[0] != len(REGIONS):
                raise ValueError(
                    f"{key}: expected the {len(REGIONS)} region channels WT, TC, ET, got {regions.shape[0]}"
                )
            wt, tc, et = regions
            classes = torch.stack([tc & ~et, wt & ~tc]).to(torch.float32)
            if isinstance(d[key], MetaTensor):
                classes = MetaTensor(classes, meta=d[key].meta)
            d[out_key] = classes
        return d
