"""Intensity transforms MONAI's own do not cover: a faster z-score, M3's percentile clip and CLAHE.

* :class:`ZScoreIntensityd` - MONAI's ``NormalizeIntensityd`` with a faster non-zero path on CPU
  (numpy's gather, one ``torch.where`` write), bit-identical: the z-score of every method.
* :class:`ClipNonzeroPercentilesd` (M3) - clip each modality to its [0.5, 99.5] percentiles over
  *non-zero* voxels. MONAI's ``ClipIntensityPercentilesd`` takes percentiles over all voxels (on a
  skull-stripped volume the lower one is then the background's 0) and would clip the zero
  background up to the lower percentile.
* :class:`MedianDenoised` (M2) - the paper's noise reduction, read as a 3 x 3 median filter per axial
  slice and modality (``docs/methods.md``). MONAI's ``MedianSmoothd`` stacks one shifted copy of the
  volume per kernel voxel before taking the median (nine copies of a cropped BraTS case, about
  2 GB); scipy's filter works in place of that.
* :class:`CLAHEd` (M3, optional) - contrast-limited adaptive histogram equalisation per slice and
  modality with scikit-image's ``equalize_adapthist``; MONAI has no CLAHE. The clip limit is given
  in OpenCV's convention (M3's 2.0) and mapped onto scikit-image's (see the class).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
)
from monai.utils import convert_data_type, convert_to_dst_type


class ZScoreIntensity(NormalizeIntensity):
    """MONAI's ``NormalizeIntensity`` with a faster non-zero path on CPU tensors; the same voxels, bit for bit.

    With ``nonzero=True`` and the statistics computed from the image, MONAI gathers the non-zero
    voxels by boolean indexing of the torch tensor and writes the normalised values back by boolean
    index assignment; on a cropped BraTS case those two were a large part of inference's per-case
    overhead (docs/benchmarks/inference.md). Here the gather is numpy's boolean indexing (faster than
    torch's on CPU, same values in the same order, so MONAI's own ``_mean`` / ``_std`` give the same
    numbers) and the write is one ``torch.where`` over the channel: the same ``(x - mean) / std``
    for each non-zero voxel, the zeros kept (tests/test_loading.py compares with MONAI's bit for bit).
    Every other case (given ``subtrahend`` / ``divisor``, ``nonzero=False``, numpy or CUDA input) is
    MONAI's code.
    """

    def _normalize(self, img: Any, sub: Any = None, div: Any = None) -> Any:
        if not (
            self.nonzero and sub is None and div is None and isinstance(img, torch.Tensor) and img.device.type == "cpu"
        ):
            return super()._normalize(img, sub, div)
        img, *_ = convert_data_type(img, dtype=torch.float32)
        plain = img.as_tensor() if isinstance(img, MetaTensor) else img
        values = plain.numpy()
        nonzero = values != 0
        if not nonzero.any():
            return img
        masked = torch.from_numpy(values[nonzero])
        mean, std = self._mean(masked), self._std(masked)
        if std == 0.0:
            std = 1.0
        plain.copy_(torch.where(torch.from_numpy(nonzero), (plain - mean) / std, plain))
        return img


class ZScoreIntensityd(NormalizeIntensityd):
    """MONAI's ``NormalizeIntensityd`` computed by :class:`ZScoreIntensity` (same arguments, same voxels)."""

    def __init__(self, keys: KeysCollection, *args: Any, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        n = self.normalizer
        self.normalizer = ZScoreIntensity(n.subtrahend, n.divisor, n.nonzero, n.channel_wise, n.dtype)


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


def median_denoise(image: np.ndarray | torch.Tensor, size: int = 3, slice_dim: int = 2) -> Any:
    """A ``size`` x ``size`` median filter in the plane of each slice along spatial axis ``slice_dim``, per channel.

    ``image`` is channel-first ``(C, H, W, D)`` (``slice_dim`` 2: axial slices of a RAS volume) or a 2-D
    ``(C, H, W)`` slice; borders repeat the edge voxel (scipy's ``nearest``). Same type and metadata as given.
    The brain keeps its extent: voxels that are 0 stay 0, and a brain voxel whose median is 0 (at the
    skull-stripped edge) keeps its value, so the outside-brain step sees the raw image's brain.
    """
    from scipy.ndimage import median_filter

    if size < 1 or size % 2 == 0:
        raise ValueError(f"median filter size must be an odd positive number, got {size}")
    array = convert_data_type(image, np.ndarray, dtype=np.float32)[0]
    window = [1] + [size] * (array.ndim - 1)  # no filtering across channels
    if array.ndim == 4:
        window[1 + slice_dim] = 1  # nor across slices
    out = median_filter(array, size=window, mode="nearest")
    out = np.where(array == 0, 0, np.where(out == 0, array, out)).astype(np.float32)
    return convert_to_dst_type(out, image)[0]


class MedianDenoised(MapTransform):
    """M2's noise reduction: :func:`median_denoise` of every key (a 3 x 3 median per axial slice and modality).

    Deterministic, so in a 3-D preprocessing chain it is cached with the volume (before slicing).
    Why not MONAI's ``MedianSmoothd``: see the module docstring (memory).
    """

    def __init__(
        self, keys: KeysCollection, size: int = 3, slice_dim: int = 2, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"median filter size must be an odd positive number, got {size}")
        self.size, self.slice_dim = int(size), int(slice_dim)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Denoise every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = median_denoise(d[key], self.size, self.slice_dim)
        return d
