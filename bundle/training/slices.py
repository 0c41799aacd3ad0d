"""Axial slices from cached 3-D volumes: the 2-D training epoch.

The 2-D methods (M1, M2, M3 in docs/methods.md) train on axial slices of the preprocessed 4-channel
volume. Nothing is preprocessed twice and no slice is written to disk: the deterministic preprocessing
(load, reorient, crop, normalise, labels) runs once per case and is cached by MONAI's ``CacheDataset``
(``cache: memory``) or ``PersistentDataset`` (``cache: disk``), followed by
``train#volume_transforms`` of ``configs/train_2d.yaml``: MONAI's ``Transposed`` to a slice-first
``(C, D, H, W)`` layout (an axial slice is then one contiguous block per channel), the label as
``uint8``, and :class:`SliceClassesd` (which slices hold brain, which tumour).

:class:`SliceDataset` is a map-style dataset of slices: by default an epoch holds every kept slice
of every volume exactly once (the papers' epoch), shuffled by the DataLoader's sampler; with
``slices_per_volume`` it draws that many slices per volume (short runs), a tumour slice with
probability ``tumour_slice_ratio``. MONAI's ``PatchDataset`` / ``GridPatchDataset`` yield a whole
volume's patches in sequence from a volume they load whole (no global shuffle, and a disk cache
would be read in full for every volume); ``RandWeightedCropd`` weights voxels, which for one
slice index costs a pass over a volume-sized weight map per draw. Here a slice costs one slice:
in memory a view of the cached volume, on disk a memory-mapped read of the cached file
(:class:`CachedVolumes`), so neither every volume in RAM nor a whole-volume read per slice is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset, get_track_meta, set_track_meta
from monai.transforms import Compose, MapTransform, Randomizable, RandomizableTrait, Transform, apply_transform
from tqdm import tqdm

from bundle.errors import DataError, OptionError

#: Where :class:`SliceClassesd` keeps the per-slice classes of a cached volume.
SLICE_CLASSES_KEY = "slice_classes"
#: train.yaml's cache modes that keep a preprocessed volume for its slices ("none" would redo a volume per slice).
SLICE_CACHE_MODES = ("memory", "disk")


def check_slice_options(
    slices_per_volume: Any, tumour_slice_ratio: Any, num_samples: Any = 1, cache: str = "memory"
) -> None:
    """Refuse 2-D slice options that cannot be read or would be ignored, naming the config key.

    ``slices_per_volume``: ``None`` (every kept slice once per epoch) or a positive integer;
    ``tumour_slice_ratio``: ``None`` or in [0, 1], and only with ``slices_per_volume`` (an epoch of
    every kept slice has its natural tumour fraction); ``num_samples`` is train.yaml's count of 3-D
    patches per case, which 2-D training does not use; ``cache`` must keep the preprocessed volumes.
    """
    if slices_per_volume is not None and (
        isinstance(slices_per_volume, bool) or not isinstance(slices_per_volume, int) or slices_per_volume < 1
    ):
        raise OptionError(
            f"slices_per_volume: {slices_per_volume!r} is not a positive integer; "
            "None (null) takes every kept slice once per epoch"
        )
    if tumour_slice_ratio is not None:
        if isinstance(tumour_slice_ratio, bool) or not isinstance(tumour_slice_ratio, (int, float)):
            raise OptionError(f"tumour_slice_ratio: {tumour_slice_ratio!r} is not a number in [0, 1] or None (null)")
        if not 0.0 <= float(tumour_slice_ratio) <= 1.0:
            raise OptionError(f"tumour_slice_ratio: {tumour_slice_ratio!r} is not in [0, 1]")
        if slices_per_volume is None:
            raise OptionError(
                f"tumour_slice_ratio: {tumour_slice_ratio!r} applies to slices drawn with slices_per_volume; "
                "an epoch of every kept slice (slices_per_volume null) has the data's own tumour fraction"
            )
    if num_samples != 1:
        raise OptionError(
            f"num_samples: {num_samples!r} counts train.yaml's 3-D patches per case; 2-D training takes "
            "batch_size (slices per iteration) and slices_per_volume (slices drawn per volume and epoch)"
        )
    if cache not in SLICE_CACHE_MODES:
        raise OptionError(
            f"cache: {cache!r} would preprocess a whole volume again for every 2-D slice; use memory or disk"
        )


def slice_classes(
    label: torch.Tensor, image: torch.Tensor | None = None, slice_dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice along spatial axis ``slice_dim``: (has tumour, has brain), two boolean vectors.

    ``label`` is channel-first (class indices or region channels: any non-zero value is tumour);
    ``image`` channel-first; brain = any non-zero voxel in any channel. Without an image every
    slice counts as brain.
    """
    axis = slice_dim + 1
    tumour = torch.as_tensor(label != 0).amax(dim=[d for d in range(label.ndim) if d != axis])
    if image is None:
        brain = torch.ones_like(tumour, dtype=torch.bool)
    else:
        brain = torch.as_tensor(image != 0).amax(dim=[d for d in range(image.ndim) if d != axis])
    return tumour.bool(), brain.bool()


class SliceClassesd(MapTransform):
    """Add ``classes_key``: a ``(2, D)`` ``uint8`` tensor, row 0 "slice has brain", row 1 "slice has tumour".

    Slices are along the first spatial axis (the slice-first layout of ``configs/train_2d.yaml``'s
    ``train#volume_transforms``). Deterministic, so it is cached with the volume: :class:`SliceDataset`
    then knows which slices an epoch holds without reading a volume (on disk, D bytes per case).
    ``keys``: the label key (the first one present is used); ``image_key``: where brain is read.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str | None = "image",
        classes_key: str = SLICE_CLASSES_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.classes_key = classes_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the per-slice classes of the first label key present."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key] if self.image_key and self.image_key in d else None
            tumour, brain = slice_classes(torch.as_tensor(d[key]), None if image is None else torch.as_tensor(image))
            d[self.classes_key] = torch.stack([brain, tumour]).to(torch.uint8)
            break
        return d


def persistent_cache_file(dataset: PersistentDataset, item: Any) -> Path:
    """The file in which MONAI's ``PersistentDataset`` caches ``item`` (its ``_cachecheck`` naming, MONAI 1.6)."""
    return Path(dataset.cache_dir) / f"{dataset.hash_func(item).decode('utf-8')}{dataset.transform_hash}.pt"


class CachedVolumes(Sequence):
    """The cached items of a MONAI ``CacheDataset`` or ``PersistentDataset``, read without a copy or a full load.

    For one slice, ``PersistentDataset.__getitem__`` would load the whole cached file (about 60 MB
    for a BraTS case); here a file is opened with ``torch.load(mmap=True)``, so only the pages that are
    read (one slice of a slice-first volume: a few hundred kB) come from disk, and nothing stays in
    memory after the item is dropped. A ``CacheDataset`` item is the cached dictionary itself (MONAI
    copies a cached item only before random transforms, and the dataset's transforms must be
    deterministic): read-only, take copies of what is changed. Cache files that do not exist yet are
    written first, by ``num_workers`` threads, as ``CacheDataset`` fills its cache.

    Args:
        dataset: a ``CacheDataset`` or ``PersistentDataset`` (``bundle.training.workflow.make_dataset``'s
            ``memory`` and ``disk`` modes) whose transforms are all deterministic.
        num_workers: threads that write missing cache files.
        progress: show a progress bar while writing them.
    """

    def __init__(self, dataset: Dataset, num_workers: int = 1, progress: bool = True) -> None:
        if not isinstance(dataset, (CacheDataset, PersistentDataset)):
            raise TypeError(f"need a CacheDataset or PersistentDataset of volumes, got {type(dataset).__name__}")
        transform = dataset.transform
        if (
            not isinstance(transform, Compose)
            or transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
            is not None
        ):
            raise ValueError("the volumes' transforms must be a Compose of deterministic MONAI transforms only")
        self.dataset = dataset
        self.files: list[Path] | None = None
        if isinstance(dataset, PersistentDataset):
            if dataset.cache_dir is None:
                raise ValueError("a PersistentDataset without cache_dir caches nothing to read slices from")
            self.files = [persistent_cache_file(dataset, item) for item in dataset.data]
            missing = [i for i, path in enumerate(self.files) if not path.is_file()]
            with ThreadPool(max(1, int(num_workers))) as pool:
                done = pool.imap_unordered(self._write, missing)
                for _ in tqdm(done, total=len(missing), desc="Caching volumes", disable=not progress or not missing):
                    pass

    def _write(self, index: int) -> None:
        """Let the ``PersistentDataset`` write item ``index``'s cache file (the loaded volume is dropped)."""
        self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        """The cached dictionary of case ``index`` (memory-mapped tensors for a ``PersistentDataset``)."""
        if self.files is None:
            return self.dataset[index]
        return torch.load(self.files[index], mmap=True, weights_only=self.dataset.weights_only)


class SliceDraw(Randomizable):
    """Draw one slice index of a volume: a tumour slice with probability ``tumour_slice_ratio``.

    Uniformly among the tumour slices, or among the tumour-free ones with ``1 - tumour_slice_ratio``;
    ``None`` (or a volume without one of the two kinds) draws uniformly among all kept slices. A
    MONAI ``Randomizable``, so ``DataLoader`` workers seed it, and the checkpoint's
    ``bundle.training.workflow.ResumableState`` saves its state with the transforms'.
    """

    def __init__(self, tumour_slice_ratio: float | None = None) -> None:
        self.tumour_slice_ratio = tumour_slice_ratio
        self.slice_index = -1

    def randomize(self, data: tuple[np.ndarray, np.ndarray]) -> None:
        """Draw from ``data = (tumour slice indices, tumour-free slice indices)``."""
        tumour, other = data
        if self.tumour_slice_ratio is None or not len(tumour) or not len(other):
            pool = np.concatenate([tumour, other])
        else:
            pool = tumour if self.R.random_sample() < self.tumour_slice_ratio else other
        self.slice_index = int(pool[self.R.randint(len(pool))])

    def __call__(self, tumour: np.ndarray, other: np.ndarray) -> int:
        """A slice index from ``tumour`` or ``other`` (see the class)."""
        self.randomize((tumour, other))
        return self.slice_index


class SliceDataset(Dataset):
    """2-D slices of cached slice-first volumes: every kept slice once per epoch, or a few drawn per volume.

    ``volume_dataset(data)`` must give a MONAI ``CacheDataset`` or ``PersistentDataset`` whose items
    hold the image and label slice-first, ``(C, D, H, W)``, and the per-slice classes of
    :class:`SliceClassesd` (``configs/train_2d.yaml``: train.yaml's ``deterministic_transforms`` +
    ``train#volume_transforms``, through ``bundle.training.workflow.make_dataset``). The kept slices of a volume
    are those with brain (``skip_empty_slices``) or all of them.

    * ``slices_per_volume=None`` - the papers' epoch: item ``i`` is the ``i``-th kept slice of all
      volumes (volume by volume), so with the ``DataLoader``'s ``shuffle=True`` an epoch visits every
      kept slice exactly once in a random order drawn from torch's generator (reproducible from the
      seed, and restored on resume with the generator).
    * ``slices_per_volume=N`` - short runs: ``N`` items per volume, each a slice drawn by
      :class:`SliceDraw` with ``tumour_slice_ratio``.

    Each item is ``{image_key: (C, H, W), label_key: (L, H, W)}`` (copies of the slice; the label as
    cached, e.g. ``uint8``) passed through ``transform`` (resizing, augmentation, typing). ``transform``
    runs without MONAI metadata (``set_track_meta(False)`` around it): a 2-D slice needs none, and M3's
    slice transforms ran faster without (docs/benchmarks/code_notes.md). MONAI's switch is
    process-wide, so read the dataset from one thread per process, as MONAI's ``DataLoader`` does.

    Args:
        data: the datalist of the volumes (``len(data)`` volumes).
        volume_dataset: callable making the cached volume dataset from ``data``.
        transform: per-slice transforms.
        slices_per_volume: ``None`` or slices drawn per volume and epoch.
        tumour_slice_ratio: with ``slices_per_volume``, probability of drawing a tumour slice (``None``: as they come).
        skip_empty_slices: keep only slices with brain (any channel non-zero).
        image_key, label_key, classes_key: keys of the cached items.
        num_workers: threads that write missing disk-cache files (:class:`CachedVolumes`).
        progress: progress bar while caching.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        volume_dataset: Callable[[Sequence[Any]], Dataset],
        transform: Callable[..., Any] | None = None,
        slices_per_volume: int | None = None,
        tumour_slice_ratio: float | None = None,
        skip_empty_slices: bool = True,
        image_key: str = "image",
        label_key: str = "label",
        classes_key: str = SLICE_CLASSES_KEY,
        num_workers: int = 1,
        progress: bool = True,
    ) -> None:
        check_slice_options(slices_per_volume, tumour_slice_ratio)
        super().__init__(data, transform)
        self.slices_per_volume = slices_per_volume
        self.skip_empty_slices = skip_empty_slices
        self.image_key, self.label_key = image_key, label_key
        self.draw = SliceDraw(tumour_slice_ratio)
        self.volumes = CachedVolumes(volume_dataset(data), num_workers, progress)
        self.tumour_slices: list[np.ndarray] = []  # kept slices with tumour, per volume
        self.other_slices: list[np.ndarray] = []  # kept slices without
        for case in range(len(self.volumes)):
            volume = self.volumes[case]
            classes = _plain(volume[classes_key]).numpy().astype(bool)
            if classes.shape != (2, volume[image_key].shape[1]):
                raise ValueError(
                    f"{classes_key} of shape {tuple(classes.shape)} does not match the slice-first volume "
                    f"{tuple(volume[image_key].shape)}: see configs/train_2d.yaml's train#volume_transforms"
                )
            brain, tumour = classes
            kept = brain if skip_empty_slices else np.ones_like(brain)
            if not kept.any():
                raise DataError(f"{_describe(data[case])}: no slice with brain to train on (every voxel is zero)")
            self.tumour_slices.append(np.flatnonzero(kept & tumour))
            self.other_slices.append(np.flatnonzero(kept & ~tumour))
        kept_per_volume = [np.union1d(t, o) for t, o in zip(self.tumour_slices, self.other_slices)]
        #: (volume, slice) of every kept slice, volume by volume: the papers' epoch
        self.index = np.concatenate(
            [np.stack([np.full(len(k), case), k], axis=1) for case, k in enumerate(kept_per_volume)]
        )

    @property
    def kept_slices(self) -> int:
        """Number of kept slices over all volumes (an epoch without ``slices_per_volume``)."""
        return len(self.index)

    def __len__(self) -> int:
        if self.slices_per_volume is None:
            return len(self.index)
        return len(self.volumes) * self.slices_per_volume

    def slice_of(self, index: int) -> tuple[int, int]:
        """(volume, slice) of item ``index``; with ``slices_per_volume`` the slice is drawn now."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        index %= len(self)
        if self.slices_per_volume is None:
            case, z = self.index[index]
            return int(case), int(z)
        case = index // self.slices_per_volume
        return case, self.draw(self.tumour_slices[case], self.other_slices[case])

    def _transform(self, index: int) -> Any:
        """Copy slice ``z`` of the image and label of volume ``case``, then apply ``transform``."""
        case, z = self.slice_of(index)
        volume = self.volumes[case]
        item = {key: _plain(volume[key])[:, z].clone() for key in (self.image_key, self.label_key)}
        if self.transform is None:
            return item
        with _without_metadata():
            return apply_transform(self.transform, item)


@contextmanager
def _without_metadata() -> Iterator[None]:
    """MONAI transforms make plain tensors inside (``set_track_meta(False)``), as before outside."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def _plain(tensor: Any) -> torch.Tensor:
    """A ``torch.Tensor`` without MONAI metadata (a view, no copy)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


def _describe(item: Mapping[str, Any]) -> str:
    """The file(s) a datalist item names, for an error message."""
    image = item.get("image", item)
    return str(image[0] if isinstance(image, (list, tuple)) else image)
