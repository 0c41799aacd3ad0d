"""Axial slices from cached 3-D volumes: slice-sampling weights and a resizing slice-by-slice inferer.

The 2-D methods (M1, M2, M3 in METHODS.md) train on axial slices of the preprocessed 4-channel
volume. Nothing is written to disk twice: the deterministic part of ``configs/train.yaml``
(load, reorient, crop, normalise) is cached once per case by MONAI's ``CacheDataset``; every
iteration then draws whole axial slices from the cached volume with MONAI's
``RandWeightedCropd(spatial_size=[-1, -1, 1])`` + ``SqueezeDimd`` and resizes them with
``Resized`` (``configs/train_2d.yaml``). Two small pieces are missing from MONAI:

* :class:`SliceSamplingWeightsd` - the weight map that makes ``RandWeightedCropd`` draw tumour
  slices with a fixed probability, uniformly among slices (``RandCropByPosNegLabeld`` weights
  slices by their number of tumour/background *voxels*, so large-tumour slices dominate and a
  "negative" draw can still land on a tumour slice; the ratio would not be the configured one);
* :class:`ResizedSliceInferer` - MONAI's ``SliceInferer`` that resizes each slice to the size the
  network was trained on and the output back (``SliceInferer`` tiles slices at native size).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.inferers import SliceInferer
from monai.transforms import MapTransform
from torch.nn import functional as F

__all__ = ["ResizedSliceInferer", "SliceSamplingWeightsd", "slice_classes", "training_config"]


def slice_classes(
    label: torch.Tensor, image: torch.Tensor | None = None, slice_dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice along ``slice_dim`` (spatial axis, 2 = axial in RAS): (has tumour, has brain).

    ``label`` is channel-first (class indices or region channels: any non-zero value is tumour);
    ``image`` channel-first; brain = any non-zero voxel in any channel. Without an image every
    slice counts as brain.
    """
    axis = slice_dim + 1
    reduce_dims = [d for d in range(label.ndim) if d != axis]
    tumour = torch.as_tensor(label != 0).amax(dim=reduce_dims)
    if image is None:
        brain = torch.ones_like(tumour, dtype=torch.bool)
    else:
        brain = torch.as_tensor(image != 0).amax(dim=[d for d in range(image.ndim) if d != axis])
    return tumour.bool(), brain.bool()


class SliceSamplingWeightsd(MapTransform):
    """Write a per-voxel sampling weight map that is constant within each slice along ``slice_dim``.

    With ``RandWeightedCropd(w_key=weight_key, spatial_size=[-1, -1, 1])`` it draws whole axial
    slices such that a tumour slice is drawn with probability ``tumour_ratio`` (uniformly among
    tumour slices) and a tumour-free slice with ``1 - tumour_ratio``. ``tumour_ratio=None`` keeps
    the natural frequency (every kept slice equally likely). With ``skip_empty=True`` slices
    without brain (all channels zero) are never drawn; otherwise they count as tumour-free slices.
    A case without tumour slices (or without tumour-free ones) draws from the other group only.

    Why not MONAI's ``RandCropByPosNegLabeld`` (``pos``/``neg`` with a depth-1 patch): it picks
    *voxels*, so slices are weighted by their tumour (or background) area and "negative" draws can
    land on tumour slices; the configured ratio is then only a lower bound and small-tumour slices,
    the hard ones, are rarely seen.

    The map is deterministic, so it is cached with the volume; it is a broadcast view
    (``expand``) of one value per slice, costing ``D`` floats rather than a volume. Delete the key
    (``DeleteItemsd``) after the crop so it is not collated.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str | None = "image",
        weight_key: str = "slice_weight",
        tumour_ratio: float | None = 0.5,
        skip_empty: bool = True,
        slice_dim: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if tumour_ratio is not None and not 0.0 <= tumour_ratio <= 1.0:
            raise ValueError(f"tumour_ratio must be in [0, 1] or None, got {tumour_ratio}")
        self.image_key = image_key
        self.weight_key = weight_key
        self.tumour_ratio = tumour_ratio
        self.skip_empty = skip_empty
        self.slice_dim = slice_dim

    def slice_weights(self, label: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """One sampling probability per slice (sums to 1)."""
        tumour, brain = slice_classes(label, image, self.slice_dim)
        kept = brain if self.skip_empty else torch.ones_like(brain)
        if not kept.any():
            raise ValueError("no slice with brain to sample from (all channels are zero)")
        pos = tumour & kept
        neg = ~tumour & kept
        if self.tumour_ratio is None or not pos.any() or not neg.any():
            return kept.double() / kept.sum()
        return pos.double() * (self.tumour_ratio / pos.sum()) + neg.double() * ((1 - self.tumour_ratio) / neg.sum())

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add ``weight_key``: shape ``(1, *spatial)`` of the (first) label key."""
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            image = torch.as_tensor(d[self.image_key]) if self.image_key and self.image_key in d else None
            per_slice = self.slice_weights(label, image).float()
            spatial = label.shape[1:]
            shape = [1] * (len(spatial) + 1)
            shape[self.slice_dim + 1] = spatial[self.slice_dim]
            # weights per voxel: a slice's total weight is its probability (every slice has the same area)
            d[self.weight_key] = per_slice.reshape(shape).expand(1, *spatial)
            break  # one weight map, from the first label key present
        return d


class ResizedSliceInferer(SliceInferer):
    """MONAI's ``SliceInferer`` that resizes every slice to ``model_size`` and the output back.

    2-D methods train on slices resized to a fixed size (M1 240 x 240, M3 128 x 128); at
    validation and inference the cropped volume keeps its own in-plane size, so each slice must be
    resized to the model's size before the network and the logits resized back (bilinear, like
    MONAI's ``Resized`` in training, ``align_corners=False``). MONAI's ``SliceInferer`` only tiles
    slices at their native size with a sliding window, which would show the network a different
    scale than in training. The default ``roi_size=(-1, -1)`` passes whole slices (``sw_batch_size``
    slices per network call); ``model_size=None`` disables resizing.

    Args:
        model_size: in-plane size the network expects, or ``None``.
        spatial_dim: slice axis (2 = axial for RAS volumes ``(H, W, D)``).
        roi_size: window over the slice before resizing; ``(-1, -1)`` = the whole slice.
        sw_batch_size: slices per network call.
        args, kwargs: the rest of ``SliceInferer`` / ``SlidingWindowInferer``'s arguments.
    """

    def __init__(
        self,
        model_size: Sequence[int] | None = None,
        spatial_dim: int = 2,
        roi_size: Sequence[int] = (-1, -1),
        sw_batch_size: int = 16,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_dim, roi_size, sw_batch_size, *args, **kwargs)
        self.model_size = None if model_size is None else tuple(int(s) for s in model_size)

    def resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of ``(N, C, H, W)`` to ``size`` (a no-op when already that size)."""
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

    def run_network(self, network: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run ``network`` on slices ``(N, C, H, W)`` at ``model_size``; return outputs at ``(H, W)``."""
        if self.model_size is None:
            return network(x, *args, **kwargs)
        size = x.shape[2:]
        out = network(self.resize(x, self.model_size), *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.resize(out, size)
        if isinstance(out, Mapping):
            return {k: self.resize(v, size) for k, v in out.items()}
        return tuple(self.resize(o, size) for o in out)

    def network_wrapper(
        self,
        network: Callable[..., Any],
        x: torch.Tensor,
        condition: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Squeeze the slice axis, resize, run, resize back, unsqueeze (see ``SliceInferer``)."""
        if condition is not None:
            raise NotImplementedError("ResizedSliceInferer does not support a condition input")
        resized = lambda s, *a, **k: self.run_network(network, s, *a, **k)  # noqa: E731
        return super().network_wrapper(resized, x, None, *args, **kwargs)


def training_config(files: Sequence[str] | str, **overrides: Any) -> ConfigParser:
    """The parsed training config stack of a model (e.g. train.yaml + train_2d.yaml + a variant), with overrides.

    ``configs/inference_2d.yaml`` reads the model's deterministic preprocessing from the very files
    it was trained with (so a variant's changes, such as M3's percentile clip or M2's [0, 1] scaling,
    also apply at inference; the network, slice size and output type come from the checkpoint's
    record); ``overrides`` set keys such as ``label_layout`` before anything is parsed.
    """
    parser = ConfigParser()
    parser.read_config(list(files) if not isinstance(files, str) else files)
    for key, value in overrides.items():
        parser[key] = value
    return parser
