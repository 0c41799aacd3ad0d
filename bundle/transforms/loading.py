"""Loading a case: MONAI's ``LoadImaged`` per caching thread, and a reader decoding a case's NIfTI files at once.

* :class:`LoadCaseImaged` - MONAI's ``LoadImaged`` declared ``ThreadUnsafe``, so the threads of
  ``CacheDataset`` each get their own copy (see its docstring), and refusing images with NaN / Inf voxels.
* :class:`ConcurrentNibabelReader` - MONAI's ``NibabelReader`` decoding the files of one case at once,
  gzip by ISA-L: the largest part of inference's per-case overhead (docs/benchmarks/inference.md).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImaged
from monai.transforms.io.array import SUPPORTED_READERS
from monai.transforms.traits import ThreadUnsafe
from monai.utils import ensure_tuple

from bundle.constants import MODALITIES, MSD_CHANNEL_ORDER
from bundle.data import case_of_image, check_case, image_reader, load_nifti, refuse_non_finite
from bundle.errors import DataError

logger = logging.getLogger(__name__)


class LoadCaseImaged(LoadImaged, ThreadUnsafe):
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

    Non-finite voxels (NaN, +-Inf) in a loaded image raise :class:`bundle.errors.DataError` naming the
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
            check_case(case, check_labels=False, decode=False)  # the voxels are checked as they load, below
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
            _check_brain(d[key], sources[key], d.get("case_id"))
        return d


def _refuse_non_finite(image: Any, source: Any) -> None:
    """Raise ``DataError`` naming the file (of the channel) that holds NaN / Inf voxels.

    :func:`bundle.data.refuse_non_finite` on each modality's channel when the files are stacked one per
    channel, on the whole image otherwise: every voxel is scanned once.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)  # CPU: no copy
    files = [str(f) for f in source] if isinstance(source, (list, tuple)) else [str(source)]
    if array.ndim > 3 and len(files) == array.shape[0] > 1:
        for channel, path in zip(array, files, strict=True):
            refuse_non_finite(channel, path)
    else:
        refuse_non_finite(array, ", ".join(files))


def _check_brain(image: Any, source: Any, case_id: Any = None) -> None:
    """A case's image: warn of a modality of zeros (naming its file), refuse a case without any voxel above 0.

    The case checks say the same of the files (:func:`bundle.data.check_case`); inference, which decodes
    each file once, says it here. A one-channel image (a label map) is not checked.
    """
    array = torch.as_tensor(image)
    if array.ndim < 4 or array.shape[0] < 2:
        return
    files = [str(f) for f in source] if isinstance(source, (list, tuple)) else [str(source)]
    modalities = MODALITIES if len(files) == len(MODALITIES) == array.shape[0] else MSD_CHANNEL_ORDER
    case = case_id or Path(files[0]).parent.name
    for channel, modality in enumerate(modalities[: array.shape[0]]):
        if not bool(array[channel].any()):
            path = files[channel] if len(files) == array.shape[0] else files[0]
            logger.warning(
                "%s: every voxel of this %s volume is 0 (an empty or failed export?); case %s goes on with a blank %s",
                path,
                modality,
                case,
                modality,
            )
    if not bool((array > 0).any()):
        where = files[0] if len(files) == 1 else str(Path(files[0]).parent)
        raise DataError(
            f"{where}: no voxel of any modality of case {case} is above 0, so its brain mask (the voxels "
            "above 0) is empty and there is nothing to segment"
        )


#: NibabelReader's own arguments; any other keyword would go to nibabel.load, which is not called for .nii.gz
_NIBABEL_READER_ARGS = ("channel_dim", "as_closest_canonical", "squeeze_non_spatial_dims", "to_gpu")


class ConcurrentNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` decoding the files of one call at once, gzip by ISA-L (python-isal).

    A BraTS case is four gzip-compressed NIfTI files; decoding them one after the other with zlib
    was the largest part of inference's per-case overhead (docs/benchmarks/inference.md). Here every file of
    a call is read in its own thread: a ``.nii.gz`` is decompressed by ``isal.igzip`` (the ISA-L
    library, faster than zlib on these files, and it releases the GIL) and its image made
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
    (docs/benchmarks/code_notes.md). Each file's copy is made here, in its reading thread, instead: the
    stacked case is then C-contiguous already and that copy costs nothing.
    """
    image = _read_nifti(path)
    return image, np.ascontiguousarray(np.asanyarray(image.dataobj))
