"""The network a plan records: building it from its spec, its down-sampling, windows and data format.

In a training config the network is a MONAI component in callable mode (``network_factory``,
``_mode_: callable``); :func:`build_network` builds it and keeps its spec on the instance, which the
plan records. Inference, the export and MONAI Label build the network from that spec
(:func:`network_from_spec`) and check every window against its down-sampling (:func:`check_window`).
"""

from __future__ import annotations

import inspect
import json
import logging
import pydoc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.utils import instantiate

from bundle.errors import OptionError
from bundle.networks.nets import size_multiple
from bundle.plan.specs import spec_of

logger = logging.getLogger(__name__)


def build_network(factory: Any) -> torch.nn.Module:
    """Build the network of ``network_factory`` (a callable-mode component) and keep its spec on it.

    The spec is kept on the instance (``bundle_network_spec``) so that the plan records it whichever
    config key refers to the network.
    """
    spec = spec_of(factory, "network_factory")
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise OptionError(
            "network_factory: not a network constructor; give it `_mode_: callable` (MONAI's callable mode)"
        )
    check_network_arguments(spec)
    network = factory()
    if not isinstance(network, torch.nn.Module):
        raise OptionError(f"network_factory: {spec['_target_']} does not build a torch.nn.Module")
    network.bundle_network_spec = spec
    return network


def check_network_arguments(spec: Mapping[str, Any]) -> None:
    """One sentence for a network argument its constructor does not take (before anything is built).

    An overlay that sets an argument of one network (``configs/demo.yaml``'s ``network_factory#filters``)
    placed after a variant that replaces the network would otherwise end in a constructor's traceback.
    """
    constructor = pydoc.locate(str(spec["_target_"]))
    try:
        parameters = inspect.signature(constructor).parameters if constructor is not None else {}
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [key for key in spec if key != "_target_" and key not in parameters]
    if unknown:
        name = str(spec["_target_"]).rsplit(".", 1)[-1]
        raise OptionError(
            f"network_factory#{unknown[0]}: {name} takes no argument {unknown[0]!r}; a config set it for another "
            "network: give overlays (configs/demo.yaml, configs/cpu.yaml) before the variant that sets the network"
        )


def network_from_spec(spec: Mapping[str, Any]) -> torch.nn.Module:
    """Build a network from a recorded spec (``{"_target_": ..., **arguments}``)."""
    arguments = {k: v for k, v in spec.items() if k != "_target_"}
    network = instantiate(spec["_target_"], "default", **arguments)
    network.bundle_network_spec = dict(spec)
    return network


def _argument(spec: Mapping[str, Any], name: str) -> Any:
    """A constructor argument of a recorded network: the spec's value, else the constructor's default."""
    if name in spec:
        return spec[name]
    constructor = pydoc.locate(str(spec["_target_"]))
    parameter = inspect.signature(constructor).parameters.get(name) if constructor is not None else None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise OptionError(f"{spec['_target_']}: the network's {name!r} is not recorded and has no default")
    return parameter.default


def is_gated(spec: Mapping[str, Any]) -> bool:
    """Whether a recorded network is M2's gate and segmenter in one (:class:`bundle.networks.GatedSegmenter`)."""
    return str(spec.get("_target_", "")).rsplit(".", 1)[-1] == "GatedSegmenter"


def segmenter_spec(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """The segmenter of a recorded network: the one behind M2's gate, else the network itself.

    Its dimensions and down-sampling are the whole model's: the gate takes whatever slices the
    segmenter takes (resized to its own size).
    """
    if is_gated(spec):
        return {k: v for k, v in spec["segmenter"].items() if k != "_mode_"}
    return spec


def input_divisors(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Per spatial axis, the network's total down-sampling: every input size must be a multiple of it.

    Read from the constructor's arguments: ``strides`` (DynUNet, UNet, AttentionUnet; one per level, an
    int or one per axis), ``channels`` levels of the bundle's U-Nets and ``blocks_down`` of SegResNet
    (2x per level), SwinUNETR's fixed 32.
    """
    spec = segmenter_spec(spec)
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


def check_window(window: Any, spec: Mapping[str, Any], key: str = "window", dims: int | None = None) -> list[int]:
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
            f"({str(segmenter_spec(spec)['_target_']).rsplit('.', 1)[-1]}); e.g. {fitting}"
        )
    return sides


def inference_window(plan: Mapping[str, Any], window: Sequence[int] | None = None) -> list[int]:
    """The window inference uses: ``window`` if given, else the plan's ``window``, else its training patch.

    3-D models: the sliding window; 2-D models: the slice size the slices are resized to. Checked
    against the network (:func:`check_window`) and logged with where it comes from.
    """
    dims = spatial_dims(plan)
    if window is not None:
        chosen, source = check_window(window, plan["network"], "window", dims), "window given"
    elif plan.get("window") is not None:
        chosen, source = check_window(plan["window"], plan["network"], "the plan's window", dims), "the plan's window"
    elif plan.get("patch_size") is not None:
        chosen, source = [int(s) for s in plan["patch_size"]], "the training patch"
    else:
        raise OptionError("window: the checkpoint records no training patch; give the window, e.g. --window")
    logger.info("%s %s: %s", "slice size" if dims == 2 else "sliding window", chosen, source)
    return chosen


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


def spatial_dims(record: Mapping[str, Any]) -> int:
    """2 for a model that runs on slices, 3 for one that runs on volumes: its network's ``spatial_dims``.

    Every network of this bundle and of MONAI's that a config builds states it; a record without it
    falls back to the length of the training patch, and then to 3.
    """
    dims = segmenter_spec(record["network"]).get("spatial_dims")
    if dims is None and record.get("patch_size"):
        dims = len(record["patch_size"])
    return int(dims or 3)
