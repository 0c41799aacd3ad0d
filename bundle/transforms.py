"""MONAI dictionary transforms for what MONAI's own do not cover.

* :class:`ToInternalConventiond` - per-sample layout handling (channel order of MSD's 4-D
  images, each dataset's label values) onto ``bundle.constants``; MONAI's ``MapLabelValued``
  maps one fixed scheme, but one datalist may mix layouts, so the scheme is read per sample.
* :class:`LabelsToRegionsd` - internal labels to float WT/TC/ET channels. MONAI's
  ``ConvertToMultiChannelBasedOnBratsClassesd`` hard-codes ET = 4 (BraTS 2021 values) and
  yields boolean channels that break ``DiceLoss(squared_pred=True)`` on monai 1.6.1.
* :class:`ThreadUnsafeLoadImaged` - MONAI's ``LoadImaged`` declared ``ThreadUnsafe``, so the
  threads of ``CacheDataset`` each get their own copy (see its docstring), and refusing images
  with NaN / Inf voxels.
* :class:`ConcurrentNibabelReader` - MONAI's ``NibabelReader`` decoding the files of one case at
  once, gzip by ISA-L: the largest part of inference's per-case overhead (docs/inference.md).
* :class:`SalientMaskd` - M4's salient (brain) mask of the raw image, which MONAI's
  ``ConcatItemsd`` then appends as an input channel after normalisation (``salient_channel`` in
  ``configs/train.yaml``); :func:`input_channel_names` names the channels the network then gets.
* :class:`FastNormalizeIntensityd` - MONAI's ``NormalizeIntensityd`` with a faster non-zero path on
  CPU (numpy's gather, one ``torch.where`` write), bit-identical: the z-score of every method.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImaged, MapTransform, NormalizeIntensity, NormalizeIntensityd, Transform
from monai.transforms.io.array import SUPPORTED_READERS
from monai.transforms.traits import ThreadUnsafe
from monai.utils import convert_data_type, ensure_tuple

from bundle.constants import LABEL_SCHEMES, MODALITIES, MSD_TO_CANONICAL, REGIONS, SALIENT_CHANNEL
from bundle.data import DataError, case_of_image, check_case, image_reader, load_nifti
from bundle.label_maps import scheme_values, to_internal, unknown_label_values

__all__ = [
    "ConcurrentNibabelReader",
    "FastNormalizeIntensity",
    "FastNormalizeIntensityd",
    "LabelsToRegions",
    "LabelsToRegionsd",
    "SalientMaskd",
    "ThreadUnsafeLoadImaged",
    "ToInternalConventiond",
    "input_channel_names",
    "is_positive_numpy",
    "map_label_values",
]


class ThreadUnsafeLoadImaged(LoadImaged, ThreadUnsafe):
    """MONAI's ``LoadImaged``, declared ``ThreadUnsafe``, choosing each file's reader, optionally loading a whole case.

    On monai 1.6.1 ``NibabelReader.read`` keeps the file names on the reader (``self.filenames``)
    and ``get_data`` zips the loaded images with them. ``CacheDataset(num_workers > 1)`` runs one
    ``LoadImaged`` in several threads, so a thread that loads the one-file label between another
    thread's ``read`` and ``get_data`` of the four modality files truncates that image to one
    channel. MONAI's ``Compose`` deep-copies ``ThreadUnsafe`` transforms when it runs threaded
    (``CacheDataset`` filling its cache), which gives every thread its own readers. MONAI Label
    still recognises it as a ``LoadImaged`` (and wraps it in its ``LoadImageTensord``).

    Readers: every key's files get the reader :func:`bundle.data.image_reader` names (NIfTI through
    nibabel, NRRD / MetaImage / DICOM series folders through ITK), the one the case checks use.
    ``LoadImaged`` takes one reader for all keys, and its automatic choice depends on the installed
    packages (pynrrd, pydicom), so the choice is made here per key, from MONAI's registered readers;
    a configured ``reader`` of that kind (or a subclass: ``configs/train.yaml`` gives NIfTI to
    :class:`ConcurrentNibabelReader`) is used before a default one.

    ``case_image_key``: the key whose single file stands for its whole case (MONAI Label's datastore
    lists one image per case, a link to its FLAIR): it is replaced by the case's four modality files
    (:func:`bundle.data.case_of_image`), checked (:func:`bundle.data.check_case`, one sentence naming a
    missing or unreadable file), and the case's layout goes to ``layout_key`` for
    :class:`ToInternalConventiond`. A 4-D file is left as it is (layout ``msd``).

    Non-finite voxels (NaN, +-Inf) in a loaded image raise :class:`bundle.data.DataError` naming the
    file and the count: a NaN would reach the loss and the weights, or the probabilities, silently.
    The case checks of ``bundle.data`` find them before a run starts; this covers every other way
    a case gets here (MONAI Label, a datalist whose files changed since it was checked).
    """

    def __init__(
        self, *args: Any, case_image_key: str | None = None, layout_key: str = "layout", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.case_image_key, self.layout_key = case_image_key, layout_key

    def _reader(self, files: Any) -> Any:
        """MONAI's registered reader instance that :func:`bundle.data.image_reader` names for ``files``."""
        paths = [str(f) for f in files] if isinstance(files, (list, tuple)) else [str(files)]
        name = image_reader(paths)
        reader_class = SUPPORTED_READERS[name.lower()]
        # the configured reader first (train.yaml's ConcurrentNibabelReader is a NibabelReader)
        for registered in reversed(self._loader.readers):
            if isinstance(registered, reader_class):
                return registered
        chosen = reader_class()  # a loader configured with other readers gets this one too
        self._loader.register(chosen)
        return chosen

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        """Load every key as ``LoadImaged`` does, each with its reader; refuse images with non-finite voxels."""
        d = dict(data)
        key = self.case_image_key
        if key is not None and isinstance(d.get(key), (str, PathLike)):
            case = case_of_image(d[key])
            check_case(case, check_labels=False)
            d[key], d[self.layout_key] = case.image, case.layout
        sources = dict(d)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            loaded = self._loader(d[key], reader or self._reader(d[key]))
            if self._loader.image_only:
                d[key] = loaded
            else:  # LoadImaged's own handling of image_only=False (MONAI Label sets it)
                d[key] = loaded[0]
                meta_key = meta_key or f"{key}_{meta_key_postfix}"
                if meta_key in d and not self.overwriting:
                    raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
                d[meta_key] = loaded[1]
            _refuse_non_finite(d[key], sources[key])
        return d


def _refuse_non_finite(image: Any, source: Any) -> None:
    """Raise ``DataError`` naming the file (of the channel) that holds NaN / Inf voxels."""
    array = torch.as_tensor(image)
    if not array.is_floating_point():
        return
    finite = torch.isfinite(array)
    if bool(finite.all()):
        return
    files = list(source) if isinstance(source, (list, tuple)) else [source]
    channels = array.shape[0] if array.ndim > 3 else 1
    if len(files) == channels > 1:
        bad = [int((~finite[c]).sum()) for c in range(channels)]
        index = next(i for i, n in enumerate(bad) if n)
        raise DataError(f"{files[index]}: {bad[index]} of {finite[index].numel()} voxels are not finite (NaN or Inf)")
    count = int((~finite).sum())
    raise DataError(f"{', '.join(map(str, files))}: {count} of {finite.numel()} voxels are not finite (NaN or Inf)")


#: NibabelReader's own arguments; any other keyword would go to nibabel.load, which is not called for .nii.gz
_NIBABEL_READER_ARGS = ("channel_dim", "as_closest_canonical", "squeeze_non_spatial_dims", "to_gpu")


class ConcurrentNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` decoding the files of one call at once, gzip by ISA-L (python-isal).

    A BraTS case is four gzip-compressed NIfTI files; decoding them one after the other with zlib
    was the largest part of inference's per-case overhead (docs/inference.md). Here every file of
    a call is read in its own thread: a ``.nii.gz`` is decompressed by ``isal.igzip`` (the ISA-L
    library, 1.5-2x faster than zlib on these files, and it releases the GIL) and its image made
    from the bytes (``Nifti1Image`` / ``Nifti2Image.from_bytes``); other files are opened by
    ``nibabel.load``. Headers, affines, stacking and metadata stay MONAI's ``NibabelReader.get_data``,
    so voxels and metadata are exactly what MONAI's reader gives (tests/test_loading.py).

    Args:
        max_workers: threads per call (``None``: one per file, at most 8).
        kwargs: ``NibabelReader``'s own arguments. ``nibabel.load`` options (``mmap``, ...) do not
            apply to decompressed bytes and raise ``ValueError``, as does ``to_gpu``.
    """

    def __init__(self, max_workers: int | None = None, **kwargs: Any) -> None:
        unusable = sorted(k for k in kwargs if k not in _NIBABEL_READER_ARGS or (k == "to_gpu" and kwargs[k]))
        if unusable:
            raise ValueError(f"ConcurrentNibabelReader decodes in memory on the CPU; {unusable} cannot apply")
        super().__init__(**kwargs)
        self.max_workers = max_workers
        self._voxels: dict[int, np.ndarray] = {}  # id(image) -> its C-ordered voxels, from read to get_data

    def read(self, data: Sequence[PathLike | str] | PathLike | str, **kwargs: Any) -> Any:
        """The nibabel image of ``data`` (one file), or the list of images of a list of files."""
        if kwargs:
            raise ValueError(f"ConcurrentNibabelReader.read takes no nibabel.load options, got {sorted(kwargs)}")
        filenames = ensure_tuple(data)
        self.filenames = filenames
        workers = min(self.max_workers or 8, len(filenames))
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                decoded = list(pool.map(_read_nifti_voxels, filenames))
        else:
            decoded = [_read_nifti_voxels(f) for f in filenames]
        self._voxels = {id(image): voxels for image, voxels in decoded}
        images = [image for image, _ in decoded]
        return images if len(filenames) > 1 else images[0]

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        """The voxels :meth:`read` already put in C order in its threads (MONAI's own read otherwise)."""
        voxels = self._voxels.pop(id(img), None)
        return voxels if voxels is not None else super()._get_array_data(img, filename)


def _read_nifti(path: PathLike | str) -> Any:
    """One NIfTI image in memory (:func:`bundle.data.load_nifti`), its header corrected as MONAI's reader does."""
    return correct_nifti_header_if_necessary(load_nifti(path))


def _read_nifti_voxels(path: PathLike | str) -> tuple[Any, np.ndarray]:
    """:func:`_read_nifti` and its voxels in C order.

    A NIfTI file stores its voxels in Fortran order; MONAI's ``LoadImage`` makes the stacked case
    C-contiguous (``convert_to_dst_type``), one transposing copy of all four volumes in one thread
    (0.11-0.14 s of a BraTS case). Each file's copy is made here, in its reading thread, instead: the
    stacked case is then C-contiguous already and that copy costs nothing.
    """
    image = _read_nifti(path)
    return image, np.ascontiguousarray(np.asanyarray(image.dataobj))


def map_label_values(label: torch.Tensor | np.ndarray, scheme: str) -> torch.Tensor | np.ndarray:
    """Map a dataset's label values onto the internal convention (values outside the scheme raise).

    The mapping is :func:`bundle.label_maps.to_internal` (MONAI's ``MapLabelValue``).
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


def _one_per_key(keys: Sequence[Hashable], names: str | Sequence[str], what: str) -> list[str]:
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
        self.output_keys = _one_per_key(self.keys, output_keys, "output key")

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


def input_channel_names(salient_channel: bool = False) -> list[str]:
    """The network's input channels in order: the modalities, then M4's salient mask when it is added."""
    return [*MODALITIES, SALIENT_CHANNEL] if salient_channel else list(MODALITIES)


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
        self.mask_keys = _one_per_key(self.keys, mask_key, "mask key")

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


class FastNormalizeIntensity(NormalizeIntensity):
    """MONAI's ``NormalizeIntensity`` with a faster non-zero path on CPU tensors; the same voxels, bit for bit.

    With ``nonzero=True`` and the statistics computed from the image, MONAI gathers the non-zero
    voxels by boolean indexing of the torch tensor and writes the normalised values back by boolean
    index assignment; on a cropped BraTS case those two took about 0.2 s of inference's per-case
    overhead (docs/inference.md). Here the gather is numpy's boolean indexing (about 4x faster than
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


class FastNormalizeIntensityd(NormalizeIntensityd):
    """MONAI's ``NormalizeIntensityd`` computed by :class:`FastNormalizeIntensity` (same arguments, same voxels)."""

    def __init__(self, keys: KeysCollection, *args: Any, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        n = self.normalizer
        self.normalizer = FastNormalizeIntensity(n.subtrahend, n.divisor, n.nonzero, n.channel_wise, n.dtype)


def is_positive_numpy(image: Any) -> np.ndarray:
    """MONAI's default foreground rule for ``CropForegroundd`` (``image > 0``), as a numpy mask.

    MONAI's ``generate_spatial_bounding_box`` reduces the mask with the library of the mask it gets:
    given a torch tensor (its default ``is_positive``), the comparison and the four ``any`` over a
    4 x 240 x 240 x 155 BraTS case took 0.09-0.15 s on one core, numpy's take about 0.03 s for the
    same box (tests/test_loading.py). The image is read on the CPU (preprocessing runs there).
    """
    return torch.as_tensor(image).numpy(force=True) > 0
