"""M2's gate built into its segmenter: one network, one checkpoint, one plan (method M2, ``docs/methods.md``).

The gate (``configs/train_gate.yaml``) is trained first; the segmenter's training given its file
(``--gate_checkpoint``) builds :class:`bundle.networks.GatedSegmenter` around the segmenter
(:func:`with_gate`). The plan then records both networks by value (the gate's spec, slice size and
threshold inside the network's spec) and every checkpoint holds both weights, so inference, MONAI
Label and the zoo export run the paper's dual model from that one file, without being told.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bundle.errors import OptionError
from bundle.networks import GatedSegmenter
from bundle.options import as_bool
from bundle.plan.checkpoints import Checkpoint
from bundle.plan.network import is_gated, spatial_dims
from bundle.plan.plan import OUTPUT_CHANNELS

logger = logging.getLogger(__name__)


def with_gate(
    network: torch.nn.Module,
    checkpoint: str | None = None,
    threshold: Any = 0.5,
    output_type: str = "binary",
) -> torch.nn.Module:
    """``network`` (a 2-D segmenter, built by :func:`bundle.plan.build_network`) behind the gate ``checkpoint`` holds.

    ``checkpoint`` None returns ``network`` as it is. The gate's weights are loaded (frozen), its plan is
    kept on the result for :class:`bundle.plan.ModelPlan` to check that the gate was trained on the
    segmenter's preprocessing. A gate for a 3-D network or for another gate, a file that holds no gate,
    and a threshold outside [0, 1] are one sentence naming the option.
    """
    if not checkpoint:
        return network
    spec = dict(getattr(network, "bundle_network_spec", None) or {})
    if output_type == "gate":
        raise OptionError("gate_checkpoint: the gate itself is being trained (configs/train_gate.yaml); leave it unset")
    if spec and (is_gated(spec) or spatial_dims({"network": spec}) != 2):
        raise OptionError(f"gate_checkpoint: {checkpoint} gates the slices of a 2-D segmenter; this network is not one")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise OptionError(f"gate_threshold: {threshold!r} is not a probability (a number in [0, 1])")
    if not Path(checkpoint).is_file():
        raise OptionError(f"gate_checkpoint: {checkpoint} does not exist (train configs/train_gate.yaml first)")
    gate = Checkpoint(checkpoint)
    if gate.plan["output_type"] != "gate":
        raise OptionError(f"gate_checkpoint: {checkpoint} holds a {gate.plan['output_type']} model, not M2's gate")
    arguments = {
        "threshold": float(threshold),
        "gate_size": [int(s) for s in gate.plan["patch_size"]],
        "out_channels": len(OUTPUT_CHANNELS[output_type]),
        "background_channel": 0 if output_type == "classes" else None,
    }
    gated = GatedSegmenter(segmenter=network, gate=gate.network(), **arguments)
    gated.bundle_network_spec = {
        "_target_": "bundle.networks.GatedSegmenter",
        "segmenter": spec,
        "gate": dict(gate.plan["network"]),
        **arguments,
    }
    gated.bundle_gate_plan = gate.plan
    gated.bundle_gate_file = str(checkpoint)
    logger.info(
        "gate: %s built into the model (slices with P(tumour) >= %g are segmented, the others get an empty mask)",
        checkpoint,
        float(threshold),
    )
    return gated


def note_missing_gate(slice_gate: Any, gate_checkpoint: str | None) -> None:
    """One warning line when a method whose paper gates slices (``slice_gate``, M2) trains without its gate."""
    if as_bool(slice_gate, "slice_gate") and not gate_checkpoint:
        logger.warning(
            "no gate: this M2 segmenter is trained without its slice gate and will segment every slice; train "
            "configs/train_gate.yaml first and pass --gate_checkpoint for the paper's model "
            "(docs/reference/pipeline_2d.md)"
        )


def gate_expected(plan: Mapping[str, Any]) -> bool:
    """Whether a plan's model is a segmenter whose method gates slices (M2) but holds no gate.

    The plan's training recipe says so (``slice_gate``, M2's variant); M2 checkpoints saved before it
    (a binary 2-D model) are taken as M2's.
    """
    if is_gated(plan["network"]) or plan.get("output_type") == "gate":
        return False
    training = dict(plan.get("training") or {})
    if "slice_gate" in training:
        return as_bool(training["slice_gate"], "slice_gate")
    return plan.get("output_type") == "binary" and spatial_dims(plan) == 2
