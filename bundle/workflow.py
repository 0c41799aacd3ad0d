"""Small helpers the configs call: datasets by cache mode, checkpoint discovery and resume.

They exist because a YAML config cannot express them in one readable line; each wraps MONAI
machinery rather than replacing it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from monai.handlers import CheckpointLoader
from monai.transforms import Compose

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")


def make_dataset(
    data: Sequence[dict[str, Any]],
    transform: Compose,
    cache: str = "memory",
    cache_dir: str | None = None,
    num_workers: int = 1,
    progress: bool = True,
) -> Dataset:
    """Return MONAI's ``CacheDataset`` (``memory``), ``PersistentDataset`` (``disk``) or ``Dataset``.

    Both caches store the result of every deterministic transform before the first random one,
    so loading, reorientation, cropping and normalisation run once per case. ``num_workers`` is
    the number of threads that fill the in-memory cache.
    """
    if cache == "memory":
        # Several caching threads need the loader declared ThreadUnsafe (train.yaml's
        # bundle.transforms.ThreadUnsafeLoadImaged): a shared LoadImaged truncates images.
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=max(1, num_workers), progress=progress)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs a cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        # track_meta keeps affines on the cached tensors (without it, from the second epoch on,
        # HD95 and volumes would be in voxels and Invertd would have nothing to invert);
        # hash_transform keys the cache by the transforms too, so runs with other preprocessing
        # (variants, 2-D configs) sharing a cache_dir never read each other's items. The files are
        # this workflow's own, hence weights_only=False to load MetaTensors.
        return PersistentDataset(
            data, transform, cache_dir=cache_dir, hash_transform=json_hashing, track_meta=True, weights_only=False
        )
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"unknown cache mode {cache!r}; expected one of {CACHE_MODES}")


def latest_checkpoint(directory: str | Path, prefix: str = "checkpoint") -> Path:
    """Return the newest ``<prefix>_*epoch=N.pt`` written by ``CheckpointSaver`` in ``directory``."""
    pattern = re.compile(r"epoch=(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{prefix}*.pt") if (m := pattern.search(p.name))]
    if not found:
        raise FileNotFoundError(f"{directory}: no {prefix}_*epoch=N.pt checkpoint to resume from")
    return max(found)[1]


def resume_training(engine: Any, directory: str | Path, load_dict: dict[str, Any]) -> Path:
    """Load model, optimizer, scheduler and trainer state from the newest checkpoint.

    Uses MONAI's ``CheckpointLoader`` directly (not as an event handler) so the trainer's epoch
    count is restored before ``trainer.run()`` starts, and training continues from there.
    """
    path = latest_checkpoint(directory)
    logger.info("resuming from %s", path)
    CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location="cpu")(engine)
    return path
