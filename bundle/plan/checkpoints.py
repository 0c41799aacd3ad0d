"""Checkpoints that know the network that built them.

Every model this bundle saves (``models/model.pt``, the resumable last checkpoint, M2's gate) holds,
next to the weights, a *model record*: the network's constructor and its arguments, the input
channels in order, the output type and channel names, the label convention, the patch the model
was trained on (and the sliding window inference should use, when its recipe names one), its
method's inference recipe and the training settings its preprocessing depends on, and the bundle
version. Inference, ``python -m bundle infer``, the model-zoo export and MONAI
Label build the network from the record and run its recipe (:mod:`bundle.plan.recipes`), so demo-width
weights work on any folder, an M3 model runs M3's inference, and nothing guesses.

In a training config the network is a MONAI component in callable mode (``network_factory``,
``_mode_: callable``): MONAI then hands over the constructor with its resolved arguments
(``functools.partial``), which :func:`build_network` calls and :class:`ModelRecord` records.
MONAI's own checkpoints hold weights only, hence this module.

Checkpoint layout (what MONAI's ``CheckpointSaver`` writes for ``save_dict={"model": network,
"model_record": record}``)::

    {"model": <state dict>, "model_record": {"network": {"_target_": ..., **arguments}, ...}}

The model zoo's tools load ``models/model.pt`` as a plain state dict (its CI calls ``ckpt_export``
without ``key_in_ckpt``), so the zoo export (``bundle.integrations.export``) writes the weights alone and the record
beside them, ``models/model_record.json`` (:func:`record_file`); :func:`load_checkpoint` reads both forms.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import pydoc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.utils import instantiate

from bundle.constants import CLASS_NAMES, LABEL_SCHEMES, MODALITIES, REGION_NAMES
from bundle.errors import DataError, OptionError
from bundle.networks.nets import size_multiple
from bundle.paths import BUNDLE_ROOT
from bundle.plan.recipes import recipe_for
from bundle.transforms import input_channel_names

MODEL_KEY = "model"
RECORD_KEY = "model_record"
#: Output channel names per output type (``output_type`` in the configs).
OUTPUT_CHANNELS: dict[str, tuple[str, ...]] = {
    "regions": REGION_NAMES,
    "classes": tuple(CLASS_NAMES[i] for i in sorted(CLASS_NAMES)),
    "binary": ("WT",),
    "gate": ("no_tumour", "tumour"),
}
METADATA = BUNDLE_ROOT / "configs" / "metadata.json"
logger = logging.getLogger(__name__)


class CheckpointError(DataError):
    """A checkpoint that is missing, unreadable, or does not say which network it holds."""


def bundle_version() -> str:
    """The bundle's version (``configs/metadata.json``), recorded in every checkpoint."""
    return str(json.loads(METADATA.read_text())["version"])


def network_spec(factory: Any) -> dict[str, Any]:
    """``{"_target_": "package.module.Class", **arguments}`` of a callable-mode MONAI component."""
    if isinstance(factory, functools.partial):
        func, arguments = factory.func, dict(factory.keywords)
        if factory.args:
            raise OptionError("network_factory: give the network's arguments by name, not by position")
    elif isinstance(factory, type) and issubclass(factory, torch.nn.Module):
        func, arguments = factory, {}
    else:
        raise OptionError(
            f"network_factory is a {type(factory).__name__}, not a network constructor: give it `_mode_: callable` "
            "(MONAI's callable mode), so that checkpoints can record the network"
        )
    return {"_target_": f"{func.__module__}.{func.__qualname__}", **arguments}


def build_network(factory: Any) -> torch.nn.Module:
    """Build the network of ``network_factory`` (a callable-mode component) and remember its spec.

    The spec is kept on the instance (``bundle_network_spec``) so that :class:`ModelRecord` can
    record it whichever config key refers to the network.
    """
    spec = network_spec(factory)
    network = factory()
    network.bundle_network_spec = spec
    return network


def network_from_spec(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Build a network from a recorded spec (``{"_target_": ..., **arguments}``)."""
    arguments = {k: v for k, v in spec.items() if k != "_target_"}
    network = instantiate(spec["_target_"], "default", **arguments)
    network.bundle_network_spec = dict(spec)
    return network


class ModelRecord:
    """What built a model, saved next to its weights (see the module docstring).

    Args:
        network: the network (built by :func:`build_network`) or the callable-mode component.
        output_type: ``regions`` (sigmoid WT/TC/ET), ``classes`` (softmax background/NCR/ED/ET),
            ``binary`` (one sigmoid WT channel) or ``gate`` (softmax over no tumour / tumour per slice).
        patch_size: the training patch (3-D) or slice size (2-D), the default inference window.
        inference_roi_size: the sliding window inference uses instead of the patch (``None``: the patch),
            e.g. ``configs/cpu.yaml``'s one window over a whole cropped brain; each side a multiple of
            the network's down-sampling (:func:`input_divisors`), checked here so a bad value stops
            training before it starts.
        input_channels: the input channels in order (``input_channels`` of the training config: the
            modalities, plus ``salient`` with M4's salient channel); a network argument
            ``in_channels`` must count them.
        inference_recipe: the method's inference recipe (a training config's ``inference_recipe``
            block, :mod:`bundle.plan.recipes`), checked against ``output_type`` and its ``train_config``
            files checked to exist, so a bad block stops training before it starts. Not recorded for
            a ``gate`` model, which inference never runs as a segmenter.
        train_settings: the training run's values of the top-level keys its deterministic
            preprocessing reads besides the files (``spacing``; M3: ``clahe``), plain values.
    """

    def __init__(
        self,
        network: Any,
        output_type: str = "regions",
        patch_size: Sequence[int] | None = None,
        input_channels: Sequence[str] = MODALITIES,
        inference_recipe: Mapping[str, Any] | None = None,
        train_settings: Mapping[str, Any] | None = None,
        inference_roi_size: Sequence[int] | None = None,
    ) -> None:
        if output_type not in OUTPUT_CHANNELS:
            raise OptionError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_CHANNELS)}")
        spec = getattr(network, "bundle_network_spec", None)
        recipe = recipe_for(inference_recipe, output_type)
        spec = spec if spec is not None else network_spec(network)
        if "in_channels" in spec and spec["in_channels"] != len(input_channels):
            raise OptionError(
                f"network_factory#in_channels is {spec['in_channels']}, but the preprocessing gives the network "
                f"{len(input_channels)} channels ({', '.join(input_channels)}): set in_channels to "
                f"{len(input_channels)}, or change salient_channel"
            )
        dims = spatial_dims({"network": spec, "patch_size": patch_size})
        self.record: dict[str, Any] = {
            "network": spec,
            "input_channels": list(input_channels),
            "output_type": output_type,
            "output_channels": list(OUTPUT_CHANNELS[output_type]),
            # internal label values (what output channels and class indices refer to) and each dataset's
            "label_convention": {"internal": {str(k): v for k, v in CLASS_NAMES.items()}, "schemes": LABEL_SCHEMES},
            "patch_size": [int(s) for s in patch_size] if patch_size is not None else None,
            # absent (not null) without one: records saved before the key existed look the same
            **(
                {"inference_roi_size": check_window(inference_roi_size, spec, "inference_roi_size", dims)}
                if inference_roi_size is not None
                else {}
            ),
            "inference_recipe": recipe,
            "train_settings": dict(train_settings or {}),
            "bundle_version": bundle_version(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The record (what ``CheckpointSaver`` stores under ``model_record``)."""
        return json.loads(json.dumps(self.record))  # plain values: torch.load(weights_only=True) reads them

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """On resume: refuse a checkpoint whose network is not this run's."""
        if state.get("network") != self.state_dict()["network"]:
            raise CheckpointError(
                f"the checkpoint was saved by another network ({state.get('network', {}).get('_target_')} with other "
                "arguments) than this config builds; resume with the config it was trained with"
            )


def salient_channel(record: Mapping[str, Any]) -> bool:
    """Whether the recorded model takes M4's salient channel; inference adds it because the record says so.

    A record without ``input_channels`` (none is older) or with channels this bundle's preprocessing
    cannot make is a :class:`CheckpointError`.
    """
    channels = list(record.get("input_channels") or [])
    for salient in (False, True):
        if channels == input_channel_names(salient):
            return salient
    raise CheckpointError(
        f"the checkpoint's model takes the input channels {channels}; this bundle makes "
        f"{input_channel_names(False)} or {input_channel_names(True)}"
    )


def _argument(spec: Mapping[str, Any], name: str) -> Any:
    """A constructor argument of a recorded network: the spec's value, else the constructor's default."""
    if name in spec:
        return spec[name]
    constructor = pydoc.locate(str(spec["_target_"]))
    parameter = inspect.signature(constructor).parameters.get(name) if constructor is not None else None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise OptionError(f"{spec['_target_']}: the network's {name!r} is not recorded and has no default")
    return parameter.default


def input_divisors(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Per spatial axis, the network's total down-sampling: every input size must be a multiple of it.

    Read from the constructor's arguments: ``strides`` (DynUNet, UNet, AttentionUnet; one per level, an
    int or one per axis), ``channels`` levels of the bundle's U-Nets and ``blocks_down`` of SegResNet
    (2x per level), SwinUNETR's fixed 32.
    """
    name = str(spec["_target_"]).rsplit(".", 1)[-1]
    dims = 3 if name == "SwinUNETR" else int(_argument(spec, "spatial_dims"))
    if name == "SwinUNETR":
        return (32,) * dims  # patch size 2, four 2x patch mergings
    if "strides" in spec:
        return tuple(size_multiple(spec["strides"], dims))
    if name in ("ResUNet", "ResSELKAUNet"):
        return (2 ** (len(_argument(spec, "channels")) - 1),) * dims
    if name == "SegResNet":
        return (2 ** (len(_argument(spec, "blocks_down")) - 1),) * dims
    raise OptionError(
        f"{spec['_target_']}: bundle.plan.checkpoints.input_divisors does not know this network's down-sampling"
    )


def check_window(window: Any, spec: Mapping[str, Any], key: str = "roi_size", dims: int | None = None) -> list[int]:
    """``window`` (a sliding window or slice size) as a list of ints, each a multiple of the network's down-sampling.

    One sentence naming ``key`` otherwise. A network :func:`input_divisors` does not know is checked for
    the number of sides only (MONAI's inferer then reports what the network refuses). ``dims``: the
    model's spatial dimensions when the spec does not state them (:func:`spatial_dims` of its record).
    """
    dims = spatial_dims({"network": spec}) if dims is None else dims
    sizes = [window] if isinstance(window, (int, float, str)) else window
    try:
        sides = [int(v) for v in sizes]
        whole = all(float(v) == int(v) and int(v) > 0 for v in sizes) and len(sides) == dims
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise OptionError(f"{key}: {window!r} is not {dims} positive whole numbers (one side per spatial axis)")
    try:
        divisors = input_divisors(spec)
    except OptionError:
        return sides
    if any(side % d for side, d in zip(sides, divisors)):
        fitting = [-(-side // d) * d for side, d in zip(sides, divisors)]  # the next multiple up
        raise OptionError(
            f"{key}: {sides} is not a multiple of {list(divisors)} per side, the down-sampling of the network "
            f"({str(spec['_target_']).rsplit('.', 1)[-1]}); e.g. {fitting}"
        )
    return sides


def inference_window(record: Mapping[str, Any], roi_size: Sequence[int] | None = None) -> list[int]:
    """The window inference uses: the user's ``roi_size``, else the recorded ``inference_roi_size``, else the patch.

    3-D models: the sliding window; 2-D models: the slice size the slices are resized to. Checked
    against the network (:func:`check_window`); a record of any age without ``inference_roi_size``
    uses its training patch, as inference always did.
    """
    dims = spatial_dims(record)
    if roi_size is not None:
        window, source = check_window(roi_size, record["network"], "roi_size", dims), "roi_size given"
    elif record.get("inference_roi_size") is not None:
        key = "model_record#inference_roi_size"
        window, source = check_window(record["inference_roi_size"], record["network"], key, dims), "the recorded window"
    elif record.get("patch_size") is not None:
        window, source = [int(s) for s in record["patch_size"]], "the training patch"
    else:
        raise OptionError("roi_size: the checkpoint records no training patch; give the window, e.g. --roi_size")
    logger.info("%s %s: %s", "slice size" if dims == 2 else "sliding window", window, source)
    return window


def spatial_shape_pattern(spec: Mapping[str, Any]) -> list[str]:
    """``metadata.json``'s ``spatial_shape``: multiples of the down-sampling from twice it (``"16*(n+1)"``).

    MONAI's ``verify_net_in_out`` evaluates it with ``n = 1`` by default (as the model zoo's CI calls it),
    which gives the smallest input whose bottleneck is 2 voxels per side.
    """
    return [f"{d}*(n+1)" for d in input_divisors(spec)]


def network_data_format(record: Mapping[str, Any], data_format: Mapping[str, Any]) -> dict[str, Any]:
    """``metadata.json``'s ``network_data_format`` for the recorded model (zoo export, MONAI Label).

    ``data_format`` is the repository's (it describes the default network); the input and output
    channels come from the record (M4's best setting: five inputs), the spatial shapes from the
    network's down-sampling (:func:`spatial_shape_pattern`). Display names of known channels
    (``T1``, ``WT``, ...) are kept.
    """
    described = json.loads(json.dumps(data_format))
    shape = spatial_shape_pattern(record["network"])
    for entry, channels in (
        (described["inputs"]["image"], record["input_channels"]),
        (described["outputs"]["pred"], record["output_channels"]),
    ):
        names = {name.lower(): name for name in entry.get("channel_def", {}).values()}
        entry["num_channels"] = len(channels)
        entry["channel_def"] = {str(i): names.get(c.lower(), c) for i, c in enumerate(channels)}
        entry["spatial_shape"] = shape
    return described


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".splitlines()[0]


def record_file(path: str | Path) -> Path:
    """Where a plain state dict's model record is kept: ``<stem>_record.json`` beside it (``model_record.json``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_record.json")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by this bundle; one sentence naming the file if that is not what it is.

    Either ``{"model": weights, "model_record": record}`` or, as the zoo export writes it, a plain state
    dict with its record in :func:`record_file`; both are returned in the first form.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist (train first, or pass --checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_root_cause(err)})") from err
    if _is_state_dict(obj) and MODEL_KEY not in obj:
        sidecar = record_file(path)
        if not sidecar.is_file():
            raise CheckpointError(
                f"{path}: the checkpoint does not record the network that built it (a plain state dict, and no "
                f"{sidecar.name} beside it); save it with bundle.plan.checkpoints.save_model, or train it with this "
                "bundle"
            )
        try:
            obj = {MODEL_KEY: obj, RECORD_KEY: json.loads(sidecar.read_text())}
        except ValueError as err:
            raise CheckpointError(f"{sidecar}: not a readable model record ({err})") from err
    state = obj.get(MODEL_KEY) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no model state dict under {MODEL_KEY!r}")
    if not isinstance(obj.get(RECORD_KEY), Mapping) or "network" not in obj[RECORD_KEY]:
        raise CheckpointError(
            f"{path}: the checkpoint does not record the network that built it (saved by another tool or before "
            f"bundle 0.2.0); save it with bundle.plan.checkpoints.save_model, or train it with this bundle"
        )
    return obj


def read_record(path: str | Path) -> dict[str, Any]:
    """The model record of a checkpoint (:class:`ModelRecord`)."""
    return dict(load_checkpoint(path)[RECORD_KEY])


def model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint (the ``model`` entry)."""
    return dict(load_checkpoint(path)[MODEL_KEY])


def network_from_checkpoint(path: str | Path) -> torch.nn.Module:
    """The network a checkpoint records, with freshly initialised weights (loaded by ``CheckpointLoader``)."""
    return network_from_spec(read_record(path)["network"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network a checkpoint records, with its weights, in eval mode on ``device``."""
    checkpoint = load_checkpoint(path)  # read once: record and weights come from the same file
    network = network_from_spec(dict(checkpoint[RECORD_KEY])["network"])
    network.load_state_dict(checkpoint[MODEL_KEY])
    return network.to(device).eval()


def save_model(
    path: str | Path,
    network: torch.nn.Module,
    output_type: str = "regions",
    patch_size: Sequence[int] | None = None,
    inference_recipe: Mapping[str, Any] | None = None,
    train_settings: Mapping[str, Any] | None = None,
    input_channels: Sequence[str] = MODALITIES,
    inference_roi_size: Sequence[int] | None = None,
) -> Path:
    """Write ``{"model": weights, "model_record": record}`` as training does (for tools and tests)."""
    path = Path(path)
    record = ModelRecord(
        network,
        output_type=output_type,
        patch_size=patch_size,
        input_channels=input_channels,
        inference_recipe=inference_recipe,
        train_settings=train_settings,
        inference_roi_size=inference_roi_size,
    )
    torch.save({MODEL_KEY: network.state_dict(), RECORD_KEY: record.state_dict()}, path)
    return path


def spatial_dims(record: Mapping[str, Any]) -> int:
    """2 for a model that runs on slices, 3 for one that runs on volumes: its network's ``spatial_dims``.

    Every network of this bundle and of MONAI's that a config builds states it; a record without it
    falls back to the length of the training patch, and then to 3.
    """
    dims = record["network"].get("spatial_dims")
    if dims is None and record.get("patch_size"):
        dims = len(record["patch_size"])
    return int(dims or 3)
