"""Small helpers the configs call: datasets by cache mode, checkpoints, and bit-exact resume.

They exist because a YAML config cannot express them in one readable line, or because MONAI
1.6.1 lacks them; each wraps MONAI machinery rather than replacing it:

* :class:`ResumableState` - what decides later results but no MONAI object saves (random number
  generators, the random transforms' states, the best metric, early stopping, best-model tracking).
* :class:`ResumableCheckpointSaver` - MONAI's ``CheckpointSaver`` writing atomically, removing a
  replaced file only once the new one is complete, and removing "last" checkpoints of an earlier
  process (before a resume).
* :class:`NewPassEachEpoch` - every training epoch starts a new pass over the data, so that epochs of a
  fixed length that the batches do not divide resume exactly too.
* :func:`resume_training` - load the newest checkpoint before ``trainer.run()``, applying (and
  logging) the training settings a resumed run changes (:class:`bundle.plan.ModelPlan`).
* :func:`to_device`, :func:`negative_centres`, :func:`attach_validation` - one-line decisions of
  ``configs/train.yaml`` that would otherwise be Python in a string.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing, set_rnd
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler
from monai.transforms import Compose

from bundle.atomic import process_is_running, write_error
from bundle.errors import OptionError
from bundle.options import as_bool
from bundle.plan import ModelPlan
from bundle.plan.network import segmenter_spec

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
    the number of threads that fill the in-memory cache. A nested ``Compose`` (a variant's
    ``intensity_transform``, e.g. M3's clip + z-score) is flattened first: MONAI counts any
    ``Compose`` as random, so its caching would stop before it, redo it at every epoch and store the
    cropped volume as a view of the whole uncropped one.
    """
    if isinstance(transform, Compose):
        transform = transform.flatten()
    if cache == "memory":
        # Several caching threads need the loader declared ThreadUnsafe (train.yaml's
        # bundle.transforms.LoadCaseImaged): a shared LoadImaged truncates images.
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


def check_resume(plan: ModelPlan, directory: str | Path, resume: Any = False) -> ModelPlan:
    """With ``resume``: refuse, in ``initialize``, a run that cannot resume from ``directory``; return ``plan``.

    A folder without a checkpoint, or one whose checkpoint records another model than this run's plan
    (:meth:`ModelPlan.load_state_dict`), is one sentence before any case is read and before the trainer
    and its handlers exist: refused at :func:`resume_training`, the TensorBoard handler had already
    written a new, empty events file into the user's run folder. Only the checkpoint's plan is read.
    """
    if not as_bool(resume, "resume"):
        return plan
    try:
        path = latest_checkpoint(directory)
    except FileNotFoundError as err:
        raise OptionError(f"resume: {err}; train without --resume, or give the output_dir of the run") from None
    record = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("model_record")
    if record is not None:  # an older checkpoint without a plan is compared at resume_training
        plan.load_state_dict(record)
    return plan


def resume_training(engine: Any, directory: str | Path, load_dict: dict[str, Any], resume: Any = True) -> Path | None:
    """With ``resume``: load model, optimizer, scheduler, trainer and state from the newest checkpoint.

    Uses MONAI's ``CheckpointLoader`` directly (not as an event handler) so the trainer's epoch
    count is restored before ``trainer.run()`` starts, and training continues from there. Call it
    last before ``trainer.run()``: the random number generators it restores must not be drawn
    from in between. A checkpoint written before :class:`ResumableState` existed still resumes,
    with a warning that the continuation is not the uninterrupted run's. The plan (``model_record``)
    is compared with this run's: a different model is refused, other changed settings are applied
    (:func:`apply_resumed_changes`) and logged.
    """
    if not as_bool(resume, "resume"):
        return None
    path = latest_checkpoint(directory)
    logger.info("resuming from %s", path)
    # mmap: only the key names are read here, the tensors once by CheckpointLoader
    saved = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    missing = [k for k, obj in load_dict.items() if k not in saved and isinstance(obj, ResumableState)]
    if missing:
        logger.warning(
            "%s has no %s (written by an older version): training resumes, but not as the uninterrupted "
            "run would have continued (random states, best metric and early stopping start afresh)",
            path,
            ", ".join(missing),
        )
        load_dict = {k: v for k, v in load_dict.items() if k not in missing}
    # the plan first: a different model is refused before any weight or state is touched
    ordered = {k: v for k, v in load_dict.items() if isinstance(v, ModelPlan)}
    ordered.update({k: v for k, v in load_dict.items() if k not in ordered})
    CheckpointLoader(load_path=str(path), load_dict=ordered, map_location="cpu")(engine)
    apply_resumed_changes(load_dict)
    return path


def apply_resumed_changes(load_dict: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Apply and log the settings a resumed run changes against the checkpoint's plan; return them.

    The learning rate (and weight decay) is set on the optimizer restored from the checkpoint, which
    would otherwise keep the old one silently; epochs, sampling, the window and the recipe take effect
    through the config itself. Each change is one log line.
    """
    plans = [v for v in load_dict.values() if isinstance(v, ModelPlan)]
    changes = plans[0].changes_on_resume if plans else {}
    optimizer = load_dict.get("optimizer")
    for key, (old, new) in changes.items():
        group_key = {"training#learning_rate": "lr", "training#weight_decay": "weight_decay"}.get(key)
        if group_key and optimizer is not None:
            for group in optimizer.param_groups:
                group[group_key] = new
                if group_key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = new
            scheduler = load_dict.get("lr_scheduler")
            if group_key == "lr" and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [new for _ in scheduler.base_lrs]
            logger.info("resume: %s %s -> %s (applied to the restored optimizer)", key.split("#")[-1], old, new)
        else:
            logger.info("resume: %s %s -> %s (this run's value)", key, old, new)
    return dict(changes)


def to_device(network: torch.nn.Module, device: Any, channels_last: Any = True) -> torch.nn.Module:
    """The network on ``device``; a 3-D network in channels-last memory with ``channels_last``.

    Channels-last memory makes 3-D convolution backward faster on CPU (oneDNN; docs/benchmarks/code_notes.md)
    and is what cuDNN prefers under AMP; weights and checkpoints are unaffected. 2-D networks keep the default layout.
    """
    spec = segmenter_spec(getattr(network, "bundle_network_spec", {}) or {})  # M2: the gated segmenter's
    if as_bool(channels_last, "channels_last") and int(spec.get("spatial_dims", 3)) == 3:
        return network.to(device, memory_format=torch.channels_last_3d)
    return network.to(device)


def negative_centres(in_brain: Any, image_key: str = "image") -> str | None:
    """``RandCropByPosNegLabeld``'s ``image_key``: brain voxels centre the other patches, or (None) the whole box."""
    return image_key if as_bool(in_brain, "crop_neg_in_brain") else None


def attach_validation(trainer: Any, handlers: Iterable[Any]) -> None:
    """Give validation's handlers that follow the trainer (early stopping, ...) the trainer."""
    for handler in handlers:
        if hasattr(handler, "set_trainer"):
            handler.set_trainer(trainer=trainer)


# ----------------------------------------------------------------------------- bit-exact resume


def _numpy_state_to_torch(state: tuple) -> dict[str, Any]:
    """``np.random.RandomState.get_state()`` as plain types and a tensor.

    MONAI's ``CheckpointLoader`` reads with ``torch.load(weights_only=True)``, which refuses numpy arrays.
    """
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_torch(state: Mapping[str, Any]) -> tuple:
    """Inverse of :func:`_numpy_state_to_torch`."""
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def random_states(obj: Any) -> list[np.random.RandomState]:
    """Every ``np.random.RandomState`` held as ``.R`` by ``obj`` or the objects it refers to, in a fixed order.

    This is where MONAI's random transforms keep their state (``Randomizable.R``), also nested ones
    (``RandCropByPosNegLabeld.cropper``, ``RandFlipd.flipper``). The walk follows
    ``monai.data.utils.set_rnd`` (lists, tuples and object attributes, not dicts, so cached data items
    are not visited), but does not stop at the first randomizable object, so each state is found once.
    """
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def walk(item: Any) -> None:
        if id(item) in seen or isinstance(item, (str, bytes, int, float, torch.Tensor, np.ndarray, ModuleType)):
            return  # (a module's namespace is not a transform's state)
        seen.add(id(item))
        if isinstance(item, (list, tuple)):
            for child in item:
                walk(child)
            return
        attributes = getattr(item, "__dict__", None)
        if not isinstance(attributes, dict):
            return
        state = attributes.get("R")
        if isinstance(state, np.random.RandomState) and id(state) not in seen:
            seen.add(id(state))
            found.append(state)
        for key, value in attributes.items():
            if not key.startswith("__"):
                walk(value)

    walk(obj)
    return found


class ResumableState:
    """What decides the rest of a training run but is in no state dict MONAI saves; list it in ``checkpoint_objects``.

    MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` carry any object with ``state_dict()`` and
    ``load_state_dict()``, but MONAI 1.6.1 has no such object for these, so a resumed run diverges from
    the uninterrupted one from the first epoch after the checkpoint:

    * the random number generators: torch CPU (and CUDA when present), numpy, Python ``random``. The
      DataLoader draws the sampler's shuffling seed and the workers' base seed from torch's generator
      (or the loader's own ``generator``, also saved) each time an epoch's iterator is created; MONAI's
      ``worker_init_fn`` seeds every worker's transforms from that base seed. With non-persistent
      workers (``train.yaml``) restoring the generator therefore restores the workers' augmentation;
      persistent workers keep their transforms' state in processes no checkpoint can reach.
    * the random transforms' own ``R`` states (:func:`random_states`) of each loader's dataset, which
      are what draws the augmentation when ``num_workers == 0`` (MONAI's ``DataLoader`` seeds them once,
      at construction, in the main process).
    * the evaluator's ``best_metric`` / ``best_metric_epoch``.
    * from ``handlers``: each ``EarlyStopHandler``'s counter and best score, and each key-metric
      ``CheckpointSaver``'s list of kept scores (without it the first validation after a resume always
      overwrites the best model, ``models/model.pt``, whatever its score). MONAI loads the latter with
      ``CheckpointSaver.load_state_dict`` but offers to save it only inside the best-model file itself
      (``key_metric_save_state``), which would stop ``model.pt`` being a plain state dict.
    * the trainer's AMP ``GradScaler`` (MONAI's trainer creates it in ``run()``, so it is loaded at
      ``STARTED``).

    ``state_dict()`` is called by the "last" ``CheckpointSaver`` at the end of an epoch, after
    validation, so the generators are captured exactly where the next epoch starts drawing.

    Args:
        trainer: the training engine (for its ``GradScaler``).
        evaluator: the validation engine.
        loaders: DataLoaders whose dataset transforms and generators to save.
        handlers: validation and training handlers; ``EarlyStopHandler`` and key-metric
            ``CheckpointSaver`` entries are saved, others ignored.
    """

    def __init__(
        self,
        trainer: Engine | None = None,
        evaluator: Engine | None = None,
        loaders: Sequence[Any] = (),
        handlers: Iterable[Any] = (),
    ) -> None:
        self.trainer = trainer
        self.evaluator = evaluator
        self.loaders = list(loaders)
        self.handlers = list(handlers)

    # -- what is saved
    def _stateful_handlers(self) -> list[tuple[str, Any]]:
        """``(key, handler)`` of the handlers with state; the key is the type and its occurrence, e.g.
        ``EarlyStopHandler#0``, so handlers disabled on some ranks (multi_gpu_train.yaml) do not shift it."""
        picked, seen = [], {}
        for handler in self.handlers:
            if isinstance(handler, EarlyStopHandler) or (
                isinstance(handler, CheckpointSaver) and handler._key_metric_checkpoint is not None
            ):
                kind = "EarlyStopHandler" if isinstance(handler, EarlyStopHandler) else "KeyMetricCheckpointSaver"
                picked.append((f"{kind}#{seen.get(kind, 0)}", handler))
                seen[kind] = seen.get(kind, 0) + 1
        return picked

    def state_dict(self) -> dict[str, Any]:
        """The current states, as tensors and plain Python values (``torch.load(weights_only=True)`` reads them)."""
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [
                [_numpy_state_to_torch(r.get_state()) for r in random_states(getattr(loader, "dataset", loader))]
                for loader in self.loaders
            ],
            "generators": [_generator_states(loader) for loader in self.loaders],
        }
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        handlers: dict[str, Any] = {}
        for key, handler in self._stateful_handlers():
            if isinstance(handler, EarlyStopHandler):
                if handler._handler is not None:  # MONAI creates the ignite EarlyStopping in set_trainer()
                    handlers[key] = dict(handler._handler.state_dict())
            else:
                handlers[key] = dict(handler._key_metric_checkpoint.state_dict())
        state["handlers"] = handlers
        scaler = getattr(self.trainer, "scaler", None)
        state["scaler"] = scaler.state_dict() if scaler is not None else None
        return state

    # -- restoring it
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the generators last, so nothing draws from them after."""
        transforms = state.get("transforms", [])
        for index, loader in enumerate(self.loaders):
            current = random_states(getattr(loader, "dataset", loader))
            saved = transforms[index] if index < len(transforms) else []
            if len(saved) != len(current):
                # a changed configuration: resuming still works, but cannot continue the old streams
                logger.warning(
                    "checkpoint has %d random transform state(s) for loader %d, whose transforms hold %d: "
                    "they start afresh (resume with the configuration that wrote it to continue exactly)",
                    len(saved),
                    index,
                    len(current),
                )
                continue
            for r, s in zip(current, saved):
                r.set_state(_numpy_state_from_torch(s))
        for loader, saved in zip(self.loaders, state.get("generators", [])):
            _set_generator_states(loader, saved)
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        saved_handlers = state.get("handlers", {})
        for key, handler in self._stateful_handlers():
            if key not in saved_handlers:
                logger.warning("checkpoint has no state for handler %s; it starts afresh", key)
                continue
            if isinstance(handler, EarlyStopHandler):
                if handler._handler is None:
                    raise RuntimeError("EarlyStopHandler.set_trainer() must run before the checkpoint is loaded")
                handler._handler.load_state_dict(saved_handlers[key])
            else:
                handler.load_state_dict(saved_handlers[key])
        if state.get("scaler") is not None and self.trainer is not None:
            # MONAI's Trainer.run() creates a new GradScaler before STARTED; load into that one.
            self.trainer.add_event_handler(Events.STARTED, _OneShotScalerLoad(state["scaler"]))
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_state_from_torch(state["numpy"]))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if idist.get_rank() > 0:
            # Only rank 0 writes the checkpoint; other ranks must not all continue with its streams
            # (identical augmentation on every GPU). Derive a per-rank seed: deterministic, distinct,
            # but not the uninterrupted run's streams (docs/reference/training.md, "Resuming").
            seed = (int(torch.empty((), dtype=torch.int64).random_()) + idist.get_rank()) % 2**32
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            for loader in self.loaders:
                set_rnd(getattr(loader, "dataset", loader), seed)


class NewPassEachEpoch:
    """Start every training epoch on a new pass over the loader, so that a resumed run is the uninterrupted one.

    With a fixed ``epoch_length`` (``configs/cpu.yaml``'s ``steps_per_epoch``) that the loader's batches do
    not divide, Ignite ends an epoch inside a pass and carries the half-used loader iterator into the next
    epoch; a resumed run cannot continue that iterator (its shuffled order, prefetching workers and their
    random states are in no checkpoint), so it starts a new pass there and diverges. This handler calls
    Ignite's ``engine.set_data`` at ``EPOCH_STARTED`` from the second epoch of a run on, so every epoch
    starts a new iterator, as the first epoch of a resumed run does: an epoch's batches then depend only on
    the random states at its start, which :class:`ResumableState` saves. The last, partial pass of an epoch
    is a random part of the cases (shuffled anew each epoch), as nnU-Net's fixed-length epochs draw theirs.

    When the batches divide the epoch, the old iterator is used up and Ignite would start a new one in the
    epoch's first step; started here it draws the same random numbers in the same order, so nothing changes.
    MONAI's trainer calls ``DistributedSampler.set_epoch`` in an ``EPOCH_STARTED`` handler of its own,
    registered before this one, so a new pass is drawn for the new epoch. MONAI and Ignite have no handler
    that restarts the data at every epoch.
    """

    def __init__(self) -> None:
        self._first_epoch_of_run = True

    def attach(self, engine: Engine) -> None:
        """Restart ``engine``'s data at every epoch but the first of each ``run()``."""
        engine.add_event_handler(Events.STARTED, self._run_started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _run_started(self, engine: Engine) -> None:
        self._first_epoch_of_run = True

    def _epoch_started(self, engine: Engine) -> None:
        if self._first_epoch_of_run:
            # Ignite creates a run's first iterator itself, after EPOCH_STARTED (and keeps the step count of
            # a run resumed inside an epoch); a second one would draw the random numbers twice
            self._first_epoch_of_run = False
            return
        engine.set_data(engine.state.dataloader)


def _generator_states(loader: Any) -> dict[str, torch.Tensor]:
    """States of the loader's and its sampler's own ``torch.Generator`` (when they have one)."""
    states = {}
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            states[name] = generator.get_state()
    return states


def _set_generator_states(loader: Any, states: Mapping[str, torch.Tensor]) -> None:
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        generator = getattr(owner, "generator", None)
        if name in states and isinstance(generator, torch.Generator):
            generator.set_state(states[name])


class _OneShotScalerLoad:
    """Load a ``GradScaler`` state into the trainer's scaler at its first ``STARTED`` only.

    It stays registered (removing a handler while ignite fires the event would skip the next one).
    """

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state: Mapping[str, Any] | None = state

    def __call__(self, engine: Engine) -> None:
        if self.state is not None and getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(self.state)
        self.state = None


# ----------------------------------------------------------------------------- atomic checkpoints


class AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` that never leaves a damaged checkpoint or none at all when the process dies.

    MONAI 1.6.1's ``CheckpointSaver`` builds its ``DiskSaver`` with ``atomic=False`` (for the file
    permissions, which ignite >= 0.5 now sets itself), so a kill during ``torch.save`` leaves a
    truncated ``checkpoint_epoch=N.pt`` that ``--resume`` then picks. And ignite's ``Checkpoint``
    calls ``remove(old)`` *before* saving the new file, so even an atomic write leaves no
    checkpoint when the kill falls in between. Here the file is written to a hidden temporary file
    beside it, flushed to disk, and renamed (``os.replace`` is atomic on POSIX); removals asked for
    before a save are done once that save is complete, and so is the removal of a temporary file that
    a killed write of the same name left.

    Args:
        dirname: the folder.
        filename: a fixed file name replacing ignite's (MONAI's ``key_metric_filename`` / ``final_filename``).
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Write ``checkpoint`` atomically, then delete the files whose removal ignite asked for before."""
        name = self.filename or filename
        if idist.get_rank() == self.save_on_rank:
            self.write(checkpoint, self.dirname / name)
            for old in self._pending_removal:
                if old != name:
                    (self.dirname / old).unlink(missing_ok=True)
            for leftover in self.dirname.glob(f".{glob.escape(name)}.*.tmp"):  # of a write that was killed
                pid = leftover.name[len(name) + 2 : -len(".tmp")]
                if pid.isdigit() and not process_is_running(int(pid)):  # never another run's write in progress
                    leftover.unlink(missing_ok=True)
        self._pending_removal.clear()

    def remove(self, filename: str) -> None:
        """Defer the removal until the next save is complete."""
        self._pending_removal.append(self.filename or filename)

    def write(self, checkpoint: Mapping, path: Path) -> None:
        """``torch.save`` to ``.<name>.<pid>.tmp``, fsync, rename over ``path``, fsync the folder."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle, **self.kwargs)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            error = write_error(path, err)  # a full disk: one sentence, not PyTorch's "unexpected pos"
            if error is None:
                raise
            raise error from err
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a power cut
        finally:
            os.close(folder)


class ResumableCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver``, with every file written by :class:`AtomicDiskSaver`.

    Also, after each interval ("last") checkpoint is complete, it removes the interval checkpoints
    in ``save_dir`` that this process did not write: those of the process before a resume (or of an
    earlier run in the same folder), which MONAI's saver, keeping ``n_saved`` of its own files, does
    not know. Same arguments as MONAI's ``CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attribute, filename in fixed.items():
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)
        prefix = kwargs.get("file_prefix", "")
        name = "checkpoint" if len(save_dict) > 1 else next(iter(save_dict))
        score = "epoch" if self.epoch_level else "iteration"
        # ignite's default name: {prefix}_{name}_{score_name}={score}.pt
        self._interval_pattern = re.compile(rf"{re.escape(prefix + '_' if prefix else '')}{name}_{score}=\d+\.pt")

    def interval_completed(self, engine: Engine) -> None:
        """Save the interval checkpoint (MONAI), then remove interval checkpoints of earlier processes."""
        super().interval_completed(engine)
        if self._interval_checkpoint is None or idist.get_rank() != 0:
            return
        kept = {item.filename for item in self._interval_checkpoint._saved}
        for path in Path(self.save_dir).iterdir():
            if self._interval_pattern.fullmatch(path.name) and path.name not in kept:
                path.unlink(missing_ok=True)
                self.logger.info(f"Removed {path.name}, superseded by the checkpoint of epoch {engine.state.epoch}")


def distributed_device() -> torch.device:
    """This process's device under torchrun: ``cuda:LOCAL_RANK`` with CUDA (made current), else the CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def distributed_rank() -> int:
    """This process's rank, joining torchrun's process group first (NCCL with CUDA, gloo without)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank()
