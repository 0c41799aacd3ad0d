"""Preprocessing and augmentation for the 2-D methods that MONAI's own transforms do not cover.

Everything else in the 2-D pipelines is MONAI (``ScaleIntensityd`` for M2's [0, 1] scaling,
``NormalizeIntensityd``, ``RandGaussianNoised``, ``RandAffined``, ``RandFlipd``,
``Rand2DElasticd``, ``SpatialPadd(mode="reflect")``, ``RandSpatialCropd``; see
``configs/train_2d.yaml`` and ``configs/variants/``). What is here, and why:

* :class:`ClipNonzeroPercentilesd` (M3) - clip each modality to its [0.5, 99.5] percentiles over
  *non-zero* voxels. MONAI's ``ClipIntensityPercentilesd`` takes percentiles over all voxels (on a
  skull-stripped volume the lower one is then the background's 0) and would clip the zero
  background up to the lower percentile.
* :class:`CLAHEd` (M3, optional) - contrast-limited adaptive histogram equalisation per slice and
  modality with scikit-image's ``equalize_adapthist``; MONAI has no CLAHE. The clip limit is given
  in OpenCV's convention (M3's 2.0) and mapped onto scikit-image's (see the class).
* :class:`RandGaussianShiftIntensityd` (M3) - additive brightness drawn from N(0, sigma) per
  channel. MONAI's ``RandShiftIntensityd(channel_wise=True)`` draws uniformly from +-offsets, not
  from a Gaussian with M3's sigma 0.3.
* :class:`RandChannelGammad` (M3) - gamma drawn per channel in [0.7, 1.5], each channel keeping its
  mean and standard deviation. MONAI's ``RandAdjustContrastd(retain_stats=True)`` draws one gamma
  for the whole image and keeps the statistics of all channels together; this applies MONAI's
  ``AdjustContrast`` channel by channel.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import AdjustContrast, MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = [
    "CLAHEd",
    "ClipNonzeroPercentilesd",
    "RandChannelGammad",
    "RandGaussianShiftIntensityd",
    "clahe_slices",
    "clip_nonzero_percentiles",
    "opencv_to_skimage_clip_limit",
]


def clip_nonzero_percentiles(image: np.ndarray | torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> Any:
    """Clip every channel's non-zero voxels to that channel's [lower, upper] percentiles of non-zero voxels.

    Zero voxels (background of a skull-stripped volume) stay zero. Percentiles are numpy's default
    (linear interpolation). Returns the input's type, device and dtype.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    out = arr.copy()
    for c in range(arr.shape[0]):
        channel = out[c]
        nonzero = channel != 0
        if not nonzero.any():
            continue
        lo, hi = np.percentile(channel[nonzero], [lower, upper])
        channel[nonzero] = np.clip(channel[nonzero], lo, hi)
    return convert_to_dst_type(out, image)[0]


class ClipNonzeroPercentilesd(MapTransform):
    """Dictionary transform of :func:`clip_nonzero_percentiles` (M3: 0.5 and 99.5, before the z-score)."""

    def __init__(
        self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Clip every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = clip_nonzero_percentiles(d[key], self.lower, self.upper)
        return d


def opencv_to_skimage_clip_limit(clip_limit: float, nbins: int = 256) -> float:
    """scikit-image's normalised ``clip_limit`` equivalent to OpenCV's ``clipLimit``.

    OpenCV clips each tile's histogram at ``clipLimit * tile_pixels / 256`` counts; scikit-image at
    ``clip_limit * tile_pixels`` (``skimage/exposure/_adapthist.py``, ``nbins`` bins). Equal counts
    (with ``nbins=256``, OpenCV's bin count) give ``clip_limit = clipLimit / 256``: M3's 2.0 is 0.0078.
    """
    return float(clip_limit) / float(nbins)


def clahe_slices(
    image: np.ndarray | torch.Tensor,
    clip_limit: float = 2.0,
    tiles: Sequence[int] = (8, 8),
    nbins: int = 256,
    slice_dim: int = 2,
    nonzero: bool = True,
) -> Any:
    """CLAHE on every 2-D slice (along spatial axis ``slice_dim``) of every channel.

    Each slice is mapped to [0, 1] by its min/max (over non-zero voxels with ``nonzero``), equalised
    with ``skimage.exposure.equalize_adapthist`` (``tiles`` tiles per axis, ``clip_limit`` in
    OpenCV's convention, see :func:`opencv_to_skimage_clip_limit`), and mapped back to the same
    min/max so later normalisation sees the usual range; background voxels stay zero.
    ``image``: ``(C, *spatial)`` with 3 spatial dims, or ``(C, H, W)`` (one slice per channel).
    """
    from skimage.exposure import equalize_adapthist

    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    out = arr.astype(np.float32, copy=True)
    volume = out if out.ndim == 4 else out[..., None]
    axis = slice_dim + 1 if out.ndim == 4 else 3
    sk_limit = opencv_to_skimage_clip_limit(clip_limit, nbins)
    for c in range(volume.shape[0]):
        for z in range(volume.shape[axis]):
            index = [c, slice(None), slice(None), slice(None)]
            index[axis] = z
            sl = volume[tuple(index)]  # a view: writing into it writes into ``out``
            mask = sl != 0 if nonzero else np.ones(sl.shape, dtype=bool)
            if mask.sum() < 2:
                continue
            lo, hi = float(sl[mask].min()), float(sl[mask].max())
            if hi <= lo:
                continue
            unit = np.clip((sl - lo) / (hi - lo), 0.0, 1.0)
            kernel = [max(int(s) // int(t), 1) for s, t in zip(sl.shape, tiles)]
            eq = equalize_adapthist(unit, kernel_size=kernel, clip_limit=sk_limit, nbins=nbins)
            sl[...] = np.where(mask, eq * (hi - lo) + lo, 0.0)
    return convert_to_dst_type(out, image, dtype=torch.float32 if isinstance(image, torch.Tensor) else np.float32)[0]


class CLAHEd(MapTransform):
    """Dictionary transform of :func:`clahe_slices`: M3's optional CLAHE (clip limit 2.0, 8 x 8 tiles) per axial slice.

    Deterministic, so in a 3-D preprocessing chain it is cached with the volume (before slicing).
    """

    def __init__(
        self,
        keys: KeysCollection,
        clip_limit: float = 2.0,
        tiles: Sequence[int] = (8, 8),
        nbins: int = 256,
        slice_dim: int = 2,
        nonzero: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if clip_limit <= 0:
            raise ValueError(f"clip_limit must be positive, got {clip_limit}")
        self.clip_limit, self.tiles, self.nbins = clip_limit, tuple(tiles), nbins
        self.slice_dim, self.nonzero = slice_dim, nonzero

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Equalise every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = clahe_slices(d[key], self.clip_limit, self.tiles, self.nbins, self.slice_dim, self.nonzero)
        return d


class RandGaussianShiftIntensityd(RandomizableTransform, MapTransform):
    """With probability ``prob``, add ``N(0, std)`` to each channel (one offset per channel) - M3's brightness.

    Args:
        keys: image keys.
        std: standard deviation of the additive offset (M3: 0.3, on z-scored intensities).
        prob: probability of applying.
        channel_wise: one offset per channel (M3) or one for the whole image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        std: float = 0.3,
        prob: float = 0.5,
        channel_wise: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.std, self.channel_wise = float(std), channel_wise
        self.offsets: np.ndarray | None = None

    def randomize(self, num_channels: int) -> None:
        """Draw whether to apply and the offsets."""
        super().randomize(None)
        self.offsets = self.R.normal(0.0, self.std, size=num_channels if self.channel_wise else 1)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Shift every key with the same offsets."""
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        self.randomize(d[first_key].shape[0])
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            shape = (-1,) + (1,) * (img.ndim - 1)
            offsets = np.broadcast_to(self.offsets, (img.shape[0],)).reshape(shape).copy()
            d[key] = img + convert_to_dst_type(offsets, img, dtype=img.dtype)[0]
        return d


class RandChannelGammad(RandomizableTransform, MapTransform):
    """With probability ``prob``, a gamma in ``gamma`` per channel, keeping each channel's mean and std (M3).

    Each channel goes through MONAI's ``AdjustContrast(gamma, retain_stats=True)``: intensities
    are mapped to [0, 1] by the channel's min/max, raised to gamma, mapped back, then shifted and
    scaled to the channel's original mean and standard deviation.

    Args:
        keys: image keys.
        gamma: range of gamma (M3: 0.7 to 1.5), drawn uniformly per channel.
        prob: probability of applying.
        retain_stats: keep each channel's mean and standard deviation.
    """

    def __init__(
        self,
        keys: KeysCollection,
        gamma: Sequence[float] = (0.7, 1.5),
        prob: float = 0.5,
        retain_stats: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {gamma}")
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.retain_stats = retain_stats
        self.gammas: np.ndarray | None = None

    def randomize(self, num_channels: int) -> None:
        """Draw whether to apply and one gamma per channel."""
        super().randomize(None)
        self.gammas = self.R.uniform(self.gamma[0], self.gamma[1], size=num_channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Apply per-channel gamma to every key (same gammas for every key)."""
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        self.randomize(d[first_key].shape[0])
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            channels = [
                AdjustContrast(float(g), retain_stats=self.retain_stats)(t[c : c + 1])
                for c, g in enumerate(self.gammas)
            ]
            d[key] = convert_to_dst_type(torch.cat(channels), img, dtype=img.dtype)[0]
        return d
