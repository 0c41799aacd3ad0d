"""A model's plan: everything needed to use a model and to continue training it, recorded by value.

nnU-Net keeps a trained model's decisions in a ``plans.json`` beside its weights. This bundle keeps them
in every checkpoint it writes, under MONAI's ``save_dict`` key ``model_record`` (the model-zoo export
writes the same dictionary to ``models/model_record.json``). Version 2 of the plan::

    plan_version, bundle_version
    network            the network as a component spec: {"_target_": class, **its arguments}
    input_channels     the channels the network takes, in order (the modalities, M4's salient channel)
    output_type        regions | classes | binary | gate; output_channels, label_convention
    preprocessing      spacing, salient_channel, intensity (transform specs), target (label transform spec)
    patch_size         the training patch (2-D: the slice size)
    window             the sliding window of validation and inference (None: the patch)
    inference_recipe   TTA, the probabilities -> labels rule, the post-processing steps (bundle.plan.recipes)
    training           the training recipe: config key -> value (loss, optimizer and schedule specs, batch
                       size, learning rate, patch sampling ...), what fine-tuning starts from

Every part is plain JSON (``torch.load(weights_only=True)`` reads it, a text editor shows it). A
component is a *spec*, ``{"_target_": "dotted.path", **arguments}``, the form MONAI's configs use:
training configs declare the components a plan records in MONAI's callable mode (``_mode_: callable``),
which hands over the constructor with its resolved arguments (``functools.partial``), and
:func:`spec_of` turns that into the spec. Inference, the export, cross-validation and MONAI Label build
from the plan alone (:func:`build`, :mod:`bundle.plan.preprocessing`), so editing a config file after
training never changes how an existing model runs. A checkpoint written before plans (version 1, which
named its training config files) is migrated once when it is read (:func:`migrate`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from bundle.constants import CLASS_NAMES, LABEL_SCHEMES, REGIONS
from bundle.errors import DataError, OptionError
from bundle.options import as_bool
from bundle.paths import BUNDLE_ROOT
from bundle.plan.network import check_window, segmenter_spec, spatial_dims
from bundle.plan.recipes import LEGACY_RECIPE, OPTIONAL_STEPS, STEPS, recipe_for
from bundle.plan.specs import callable_mode, same_component, spec_of
from bundle.transforms import input_channel_names

logger = logging.getLogger(__name__)

PLAN_VERSION = 2
#: Output channel names per output type (``output_type`` in the configs).
OUTPUT_CHANNELS: dict[str, tuple[str, ...]] = {
    "regions": tuple(REGIONS),
    "classes": tuple(CLASS_NAMES[i] for i in sorted(CLASS_NAMES)),
    "binary": ("WT",),
    "gate": ("no_tumour", "tumour"),
}
#: M4's deterministic preprocessing (configs/train.yaml's intensity_transform and label_transform): what
#: ``bundle.plan.save_model`` records when given none, and what version-1 records of M4, M1 and the 3-D
#: baselines ran (tests/test_migration.py checks it against train.yaml).
M4_PREPROCESSING: dict[str, Any] = {
    "spacing": None,
    "salient_channel": False,
    "intensity": [{"_target_": "bundle.transforms.ZScoreIntensityd", "nonzero": True, "channel_wise": True}],
    "target": {"_target_": "bundle.transforms.LabelsToRegionsd"},
}
#: The parts of a plan a resumed training may not change: they define the model and its data.
FIXED_ON_RESUME = ("network", "input_channels", "output_type", "preprocessing", "patch_size")
#: Training components a resumed training may not change, but for the arguments it applies itself: the
#: checkpoint holds their state (an optimizer's restored param groups would undo any other argument).
FIXED_TRAINING_COMPONENTS = {"optimizer_factory": ("lr", "weight_decay"), "lr_scheduler_factory": ()}


class PlanError(DataError):
    """A plan that cannot be read or used (a checkpoint's record, a config's planned components)."""


# ------------------------------------------------------------------------------------------ the plan


def bundle_version() -> str:
    """The bundle's version (``configs/metadata.json``), recorded in every plan."""
    return str(json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"])


def _sizes(value: Any, key: str) -> list[int] | None:
    if value is None:
        return None
    sides = [value] if isinstance(value, (int, float, str)) else list(value)
    try:
        out = [int(v) for v in sides]
    except (TypeError, ValueError):
        raise OptionError(f"{key}: {value!r} is not a list of whole numbers") from None
    if any(v < 1 or float(s) != v for v, s in zip(out, sides)):
        raise OptionError(f"{key}: {value!r} is not a list of positive whole numbers")
    return out


def planned_preprocessing(
    spacing: Sequence[float] | None = None,
    salient_channel: Any = False,
    intensity: Sequence[Any] | Any = (),
    target: Any = None,
) -> dict[str, Any]:
    """The preprocessing part of a plan from a training config's keys (components as specs).

    ``intensity``: the method's intensity steps on the image (callable-mode transforms, in order, by
    name in a mapping or in a list; disabled ones, None, are left out); ``target``: the label transform
    to the network's target (None: class indices as they are).
    """
    if isinstance(intensity, Mapping) and "_target_" not in intensity:
        steps = list(intensity.values())  # named steps, in order (configs name them; the plan keeps the order)
    else:
        steps = intensity if isinstance(intensity, (list, tuple)) else [intensity]
    return {
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "salient_channel": as_bool(salient_channel, "salient_channel"),
        "intensity": [spec_of(step, "intensity_transform") for step in steps if step is not None],
        "target": spec_of(target, "label_transform"),
    }


def check_gate_preprocessing(gate_plan: Mapping[str, Any], preprocessing: Mapping[str, Any], where: str) -> None:
    """One sentence unless M2's gate (its plan) was trained on the inputs the segmenter gets (``preprocessing``).

    The gate runs on the segmenter's slices inside one network, so its spacing, input channels and
    intensity steps must be the segmenter's (``configs/train_gate.yaml`` shares M2's by default).
    """
    theirs = dict(gate_plan.get("preprocessing") or {})
    differing = [
        key
        for key in ("spacing", "salient_channel", "intensity")
        if not same_component(theirs.get(key), preprocessing.get(key))
    ]
    if differing:
        raise OptionError(
            f"gate_checkpoint: {where} was trained with another {', '.join(differing)} than this segmenter "
            f"({theirs.get(differing[0])!r} vs {preprocessing.get(differing[0])!r}); train the gate with the "
            "segmenter's preprocessing (configs/train_gate.yaml after the same overlays)"
        )


class ModelPlan:
    """The plan of the model a training run makes, saved with every checkpoint (see the module docstring).

    A MONAI component of the training configs (``model_plan``) given their keys; checked when it is
    built, so a bad value stops training before any case is read.

    Args:
        network: the network in callable mode (``network_factory``), or a network built from it.
        output_type: ``regions`` (sigmoid WT/TC/ET), ``classes`` (softmax background/NCR/ED/ET), ``binary``
            (one sigmoid WT channel) or ``gate`` (M2's slice classifier).
        patch_size: the training patch (3-D) or slice size (2-D).
        window: the sliding window validation and inference use (None: the patch); each side a multiple
            of the network's down-sampling.
        preprocessing: ``spacing``, ``salient_channel``, ``intensity``, ``target`` (:func:`planned_preprocessing`).
        inference_recipe: the method's inference recipe (:mod:`bundle.plan.recipes`); not recorded for a gate.
        training: config key -> value of the training recipe (callable-mode components become specs).
    """

    def __init__(
        self,
        network: Any,
        output_type: str = "regions",
        patch_size: Sequence[int] | None = None,
        window: Sequence[int] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        inference_recipe: Mapping[str, Any] | None = None,
        training: Mapping[str, Any] | None = None,
    ) -> None:
        if output_type not in OUTPUT_CHANNELS:
            raise OptionError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_CHANNELS)}")
        spec = getattr(network, "bundle_network_spec", None) or spec_of(network, "network_factory")
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise OptionError("network_factory: not a network constructor; give it `_mode_: callable`")
        pre = planned_preprocessing(**dict(preprocessing or {}))
        channels = input_channel_names(pre["salient_channel"])
        segmenter = segmenter_spec(spec)
        if "in_channels" in segmenter and segmenter["in_channels"] != len(channels):
            raise OptionError(
                f"network_factory#in_channels is {segmenter['in_channels']}, but the preprocessing gives the network "
                f"{len(channels)} channels ({', '.join(channels)}): set in_channels to {len(channels)}, or change "
                "salient_channel"
            )
        gate_plan = getattr(network, "bundle_gate_plan", None)
        if gate_plan is not None:
            check_gate_preprocessing(gate_plan, pre, getattr(network, "bundle_gate_file", "gate_checkpoint"))
        if inference_recipe is None and output_type != "gate":
            raise OptionError(f"inference_recipe: missing; a {output_type} model records how it segments a case")
        patch = _sizes(patch_size, "patch_size")
        dims = spatial_dims({"network": spec, "patch_size": patch})
        if patch is not None and output_type != "gate":  # a segmenter's patch passes its down-sampling
            patch = check_window(patch, spec, "patch_size", dims)
        self.plan: dict[str, Any] = {
            "plan_version": PLAN_VERSION,
            "network": dict(spec),
            "input_channels": channels,
            "output_type": output_type,
            "output_channels": list(OUTPUT_CHANNELS[output_type]),
            # internal label values (what output channels and class indices refer to) and each dataset's
            "label_convention": {"internal": {str(k): v for k, v in CLASS_NAMES.items()}, "schemes": LABEL_SCHEMES},
            "preprocessing": pre,
            "patch_size": patch,
            "window": None if window is None else check_window(window, spec, "window", dims),
            "inference_recipe": recipe_for(inference_recipe, output_type),
            "training": {key: spec_of(value, key) for key, value in dict(training or {}).items()},
            "bundle_version": bundle_version(),
        }
        self.changes_on_resume: dict[str, tuple[Any, Any]] = {}
        json.dumps(self.plan)  # plain values only, or torch.load(weights_only=True) could not read it

    def state_dict(self) -> dict[str, Any]:
        """The plan (what ``CheckpointSaver`` stores under ``model_record``)."""
        return json.loads(json.dumps(self.plan))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """On resume: refuse a checkpoint whose model differs from this run's; keep what else differs.

        The network, its inputs, output type, preprocessing and patch, and the optimizer and schedule
        (whose state the checkpoint holds; the optimizer's learning rate and weight decay aside) must be
        those the checkpoint was trained with: one sentence naming the keys otherwise. Other training keys
        (learning rate, weight decay, loss, batch size, sampling, the window, the inference recipe) may
        change; they are kept in ``changes_on_resume`` for :func:`bundle.training.workflow.resume_training`
        to apply and log.
        """
        saved = migrate(state, "the checkpoint")
        differing = [key for key in FIXED_ON_RESUME if not same_component(saved.get(key), self.plan.get(key))]
        old_training, new_training = dict(saved.get("training") or {}), self.plan["training"]
        for key, applied in FIXED_TRAINING_COMPONENTS.items():
            old, new = old_training.get(key), new_training.get(key)
            if isinstance(old, Mapping) and isinstance(new, Mapping):
                old, new = ({k: v for k, v in c.items() if k not in applied} for c in (old, new))
            if key in old_training and key in new_training and not same_component(old, new):
                differing.append(f"training#{key}")
        if differing:
            raise PlanError(
                f"resume: the checkpoint was trained with another {', '.join(differing)} than this config gives; "
                "resume with the settings it was trained with, or train into a new output_dir"
            )
        self.changes_on_resume = {
            f"training#{key}": (old_training[key], value)
            for key, value in new_training.items()
            if key in old_training
            and key not in FIXED_TRAINING_COMPONENTS
            and not same_component(old_training[key], value)
        }
        for key in ("window", "inference_recipe"):
            if not same_component(saved.get(key), self.plan.get(key)):
                self.changes_on_resume[key] = (saved.get(key), self.plan.get(key))


# ------------------------------------------------------------------------------------------ migration


def _v1_preprocessing(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a version-1 record's training config files made of a case (fixed: those files as they were).

    Version 1 named its training config files (``inference_recipe#train_config``) and the settings
    they read (``train_settings``). Their preprocessing is known by method: M2's [0, 1] scaling and
    whole-tumour target, M3's non-zero percentile clip, optional CLAHE (before the z-score, as M3 then
    ran it) and class indices, M4's (and M1's, the baselines') non-zero z-score and WT/TC/ET regions.
    """
    files = " ".join((record.get("inference_recipe") or {}).get("train_config") or [])
    settings = dict(record.get("train_settings") or {})
    zscore, regions = M4_PREPROCESSING["intensity"][0], M4_PREPROCESSING["target"]
    if "m3_resse_lka_unet" in files:
        intensity = [{"_target_": "bundle.transforms.ClipNonzeroPercentilesd", "lower": 0.5, "upper": 99.5}]
        if settings.get("clahe"):
            intensity.append({"_target_": "bundle.transforms.CLAHEd", "clip_limit": 2.0, "tiles": [8, 8]})
        intensity.append(zscore)
        target = None
    elif "m2_resunet_tversky" in files or record.get("output_type") in ("binary", "gate"):
        scale = {"_target_": "monai.transforms.ScaleIntensityd", "minv": 0.0, "maxv": 1.0, "channel_wise": True}
        intensity, target = [scale], {**regions, "regions": {"WT": list(REGIONS["WT"])}}
    else:
        intensity, target = [zscore], regions
    channels = list(record.get("input_channels") or [])
    return {
        "spacing": settings.get("spacing"),
        "salient_channel": channels == input_channel_names(True),
        "intensity": intensity,
        "target": target,
    }


def _v1_recipe(record: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """A version-1 recipe without its ``train_config``; the numbers of steps it leaves out, as inference ran them."""
    output_type = str(record.get("output_type"))
    if output_type == "gate":
        return None
    recipe = dict(record.get("inference_recipe") or {})
    if not recipe:
        logger.warning(
            "%s records no inference recipe (saved before recipes were recorded): running M4's recipe as inference "
            "ran such checkpoints%s",
            where,
            " without its ET steps and with a 0.5 mask threshold" if output_type == "binary" else "",
        )
        recipe = dict(LEGACY_RECIPE)
        if output_type == "binary":
            recipe.update({"binary_threshold": 0.5, "et_components_to_ncr": False, "et_volume_to_ncr": False})
        if output_type != "regions":
            for key in ("wt_threshold", "tc_threshold", "et_threshold"):
                recipe.pop(key)
    elif "mask_outside_brain" not in recipe:
        logger.info(
            "%s records its recipe without mask_outside_brain (saved before the step existed): running without it, "
            "as then; --mask_outside_brain true switches it on",
            where,
        )
        recipe["mask_outside_brain"] = False
    recipe.pop("train_config", None)
    # a step switched on later takes the numbers inference then took from configs/train.yaml (M4's)
    for step, numbers in STEPS.items():
        for key in numbers if step not in OPTIONAL_STEPS else ():  # a later step: version 1 never ran it
            recipe.setdefault(key, LEGACY_RECIPE[key])
    return recipe


def migrate(record: Mapping[str, Any], where: str = "the checkpoint") -> dict[str, Any]:
    """A plan of the current version from a checkpoint's record of any version (version 2 as it is)."""
    if not isinstance(record, Mapping) or "network" not in record:
        raise PlanError(f"{where}: the checkpoint does not record the network that built it")
    version = int(record.get("plan_version", 1))
    if version == PLAN_VERSION:
        return _with_old_gate_head(dict(record))
    if version > PLAN_VERSION:
        raise PlanError(f"{where}: plan version {version} is newer than this bundle reads ({PLAN_VERSION}); update it")
    output_type = str(record.get("output_type", "regions"))
    recipe = _v1_recipe(record, where)
    return _with_old_gate_head(
        {
            "plan_version": PLAN_VERSION,
            "network": dict(record["network"]),
            "input_channels": list(record.get("input_channels") or []),
            "output_type": output_type,
            "output_channels": list(record.get("output_channels") or OUTPUT_CHANNELS[output_type]),
            "label_convention": record.get("label_convention")
            or {"internal": {str(k): v for k, v in CLASS_NAMES.items()}, "schemes": LABEL_SCHEMES},
            "preprocessing": _v1_preprocessing(record),
            "patch_size": record.get("patch_size"),
            "window": record.get("inference_roi_size"),
            "inference_recipe": recipe_for(recipe, output_type) if recipe is not None else None,
            "training": {},
            "bundle_version": record.get("bundle_version"),
            "migrated_from": version,
        }
    )


def _with_old_gate_head(plan: dict[str, Any]) -> dict[str, Any]:
    """A gate saved before the paper's head (two dense layers) records no ``dense_layers``: it had one."""
    spec = plan["network"]
    if str(spec.get("_target_", "")).endswith("SliceGateClassifier") and "dense_layers" not in spec:
        plan["network"] = {**spec, "dense_layers": 1}
    return plan


# ------------------------------------------------------------------------------------------ use


def training_config_files(plan: Mapping[str, Any]) -> list[str]:
    """The training workflow a plan's model continues in: ``train.yaml``, with ``train_2d.yaml`` for a 2-D model.

    The files give the workflow (datasets, trainer, handlers); every value of the model comes from
    the plan (:func:`fine_tune_overrides`).
    """
    files = ["configs/train.yaml"]
    if spatial_dims(plan) == 2:
        files.append("configs/train_2d.yaml")
    if plan.get("output_type") == "gate":
        files.append("configs/train_gate.yaml")
    return files


def fine_tune_overrides(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Training config keys -> values that continue training the planned model as it was trained.

    The network, its preprocessing, patch, window, output type and inference recipe, and the training
    recipe the plan holds (components back in MONAI's callable mode). A plan migrated from version 1
    holds no training recipe: the configs' then apply (logged).
    """
    pre = plan["preprocessing"]
    overrides: dict[str, Any] = {
        "network_factory": callable_mode(plan["network"]),
        "output_type": plan["output_type"],
        "patch_size": plan["patch_size"],
        "window": plan.get("window"),
        "spacing": pre["spacing"],
        "salient_channel": pre["salient_channel"],
        "intensity_transform": callable_mode(pre["intensity"]),
        "label_transform": callable_mode(pre["target"]),
    }
    if plan.get("inference_recipe") is not None:
        overrides["inference_recipe"] = dict(plan["inference_recipe"])
    training = dict(plan.get("training") or {})
    if not training:
        logger.info("the plan records no training recipe (migrated from version 1): the configs' applies")
    optimizer = dict(training.get("optimizer_factory") or {})
    # the optimizer follows the learning rate and weight decay keys, which the user may change
    for argument, key in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
        if argument in optimizer and key in training and optimizer[argument] == training[key]:
            optimizer[argument] = f"@{key}"
    if optimizer:
        training["optimizer_factory"] = optimizer
    overrides.update({key: callable_mode(value) for key, value in training.items()})
    return overrides
