"""Each method's inference recipe: how its models turn a case into labels (docs/inference.md, docs/methods.md).

A recipe is one named block of plain values in a training config (``inference_recipe``: M4's in
``configs/train.yaml``, M1-M3's in their variant files), validated and saved in every checkpoint's
model record (:class:`bundle.plan.checkpoints.ModelRecord`). ``configs/inference.yaml``, ``python -m
bundle infer`` and the MONAI Label app read it from the checkpoint, so a model runs its own method's
recipe without the user naming a file; a variant's block (``--config_file <variant>``) or single
keys (``--tta false``, ``--closing true``...) override it. Keys:

* ``train_config``: the training config files whose deterministic preprocessing inference repeats
  (bundle-relative paths, e.g. ``[configs/train.yaml, configs/train_2d.yaml, configs/variants/m3_...]``);
* ``tta``: flip test-time augmentation (8 flips in 3-D, the 4 in-plane flips for 2-D models);
* the rule from probabilities to labels, by the model's output type (:data:`RULE_KEYS`):
  ``wt_threshold``, ``tc_threshold``, ``et_threshold`` (regions), ``binary_threshold`` (binary),
  nothing for the argmax of class models;
* the post-processing steps, in order, each a boolean with its numbers (:data:`STEPS`): first
  ``mask_outside_brain`` (no tumour where every input channel is 0; every method's recipe runs it),
  then M4's four clean-up steps.

A user option the recipe cannot honour (a region threshold for a class model, an ET rule for a
binary model, a step's number while the step is off) is an :class:`~bundle.errors.OptionError`
naming the key, never ignored. A checkpoint saved before recipes were recorded runs M4's recipe
(``configs/train.yaml``), adapted to its output type, with a log line saying so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from bundle.constants import STRUCTURING_ELEMENTS
from bundle.errors import OptionError
from bundle.options import as_bool
from bundle.paths import BUNDLE_ROOT

logger = logging.getLogger(__name__)

#: The probabilities -> labels rule's numbers for each output type (class models: argmax, none).
RULE_KEYS: dict[str, tuple[str, ...]] = {
    "regions": ("wt_threshold", "tc_threshold", "et_threshold"),
    "classes": (),
    "binary": ("binary_threshold",),
}
#: The post-processing steps in the order they run, each with the keys of its numbers.
STEPS: dict[str, tuple[str, ...]] = {
    "mask_outside_brain": (),
    "et_components_to_ncr": ("et_component_min_size", "et_component_min_prob"),
    "et_volume_to_ncr": ("et_min_volume", "et_volume_min_prob"),
    "remove_small_components": ("min_component_size",),
    "closing": ("closing_size", "closing_element"),
}
#: Steps added after checkpoints recorded recipes: a recorded recipe without one ran without it, and still does.
LATER_STEPS = ("mask_outside_brain",)
#: Steps that act on ET, which a binary (whole-tumour) model does not have.
ET_STEPS = ("et_components_to_ncr", "et_volume_to_ncr")
#: Every key a recipe may hold.
RECIPE_KEYS: tuple[str, ...] = (
    "train_config",
    "tta",
    *(k for keys in RULE_KEYS.values() for k in keys),
    *(k for step, numbers in STEPS.items() for k in (step, *numbers)),
)
#: The threshold of a binary model's mask before recipes were recorded (configs/inference.yaml then).
LEGACY_BINARY_THRESHOLD = 0.5

_PROBABILITIES = ("wt_threshold", "tc_threshold", "et_threshold", "binary_threshold")
_PROBABILITIES += ("et_component_min_prob", "et_volume_min_prob")
_WHAT_IT_IS = {
    "regions": "a region model (sigmoid WT, TC, ET)",
    "classes": "a class model (softmax, argmax)",
    "binary": "a binary model (one sigmoid WT channel)",
}


def _value(key: str, value: Any, where: str) -> Any:
    """``value`` of recipe key ``key`` read and checked; ``where`` prefixes the error (e.g. the file)."""
    name = f"{where}{key}"
    if key in STEPS or key == "tta":
        return as_bool(value, name)
    if key == "train_config":
        files = [value] if isinstance(value, str) else value
        if not isinstance(files, Sequence) or not files or not all(isinstance(f, str) and f for f in files):
            raise OptionError(f"{name}: {value!r} is not a list of config files")
        return [str(f) for f in files]
    if key == "closing_element":
        if value not in STRUCTURING_ELEMENTS:
            raise OptionError(f"{name}: {value!r} is not one of {', '.join(STRUCTURING_ELEMENTS)}")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(f"{name}: {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"{name}: {value!r} is not a number") from None
    if key in _PROBABILITIES:
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise OptionError(f"{name}: {value!r} is not a probability in [0, 1]")
        return number
    if not number.is_integer() or number < 1:
        raise OptionError(f"{name}: {value!r} is not a whole number of voxels >= 1")
    if key == "closing_size" and number % 2 == 0:
        raise OptionError(f"{name}: {value!r} is not odd (the side of a structuring element centred on each voxel)")
    return int(number)


def normalise_recipe(recipe: Mapping[str, Any], output_type: str, where: str = "inference_recipe#") -> dict[str, Any]:
    """A method's recipe checked against its model's output type, as it is recorded and run.

    Every key known (:data:`RECIPE_KEYS`), every value of its kind, the rule's numbers present for
    ``output_type`` and no other rule's, ET steps off for binary models, the numbers of every step
    that is on present. Numbers of steps that are off are kept (they say what switching the step on
    would do). Errors are one sentence naming ``where`` + the key.
    """
    if output_type not in RULE_KEYS:
        raise OptionError(f"output_type {output_type!r} has no inference recipe; expected {', '.join(RULE_KEYS)}")
    if not isinstance(recipe, Mapping):
        raise OptionError(f"{where.rstrip('#')}: {recipe!r} is not a block of recipe keys")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise OptionError(f"{where}{unknown[0]}: not a recipe key; expected one of {', '.join(RECIPE_KEYS)}")
    out = {key: _value(key, value, where) for key, value in recipe.items()}
    required = ["train_config", "tta", *RULE_KEYS[output_type], *STEPS]
    missing = [k for k in required if k not in out]
    if missing:
        raise OptionError(f"{where}{missing[0]}: missing; {_WHAT_IT_IS[output_type]} needs {', '.join(required)}")
    foreign = [k for t, keys in RULE_KEYS.items() if t != output_type for k in keys if k in out]
    if foreign:
        raise OptionError(f"{where}{foreign[0]}: {_WHAT_IT_IS[output_type]} has no such rule")
    if output_type == "binary":
        on = [s for s in ET_STEPS if out[s]]
        if on:
            raise OptionError(f"{where}{on[0]}: {_WHAT_IT_IS['binary']} has no ET; set it to false")
    for step, numbers in STEPS.items():
        absent = [k for k in numbers if k not in out]
        if out[step] and absent:
            raise OptionError(f"{where}{absent[0]}: missing; the {step} step is on and needs it")
    return {key: out[key] for key in RECIPE_KEYS if key in out}


def recipe_for(
    recipe: Mapping[str, Any] | None, output_type: str, bundle_root: str | Path | None = None
) -> dict[str, Any] | None:
    """The recipe a model of ``output_type`` records: ``recipe`` normalised, its files checked; ``None`` for a gate.

    M2's gate (``output_type: gate``) classifies slices and is never run as a segmenter, so the
    recipe it inherits from ``configs/train.yaml`` does not apply to it. Training's ``initialize``
    calls this, so a bad block stops the run before any case is read.
    """
    if recipe is None or output_type not in RULE_KEYS:
        return None
    checked = normalise_recipe(recipe, output_type)
    training_config(checked["train_config"], BUNDLE_ROOT if bundle_root is None else bundle_root)
    return checked


def _legacy_recipe(default_recipe: Mapping[str, Any], output_type: str, checkpoint: str) -> dict[str, Any]:
    """M4's recipe (``default_recipe``) for a checkpoint without one, as inference ran such checkpoints before."""
    recipe = {k: v for k, v in default_recipe.items() if k in RECIPE_KEYS}
    for other, keys in RULE_KEYS.items():
        if other != output_type:
            for key in keys:
                recipe.pop(key, None)
    if output_type == "binary":
        recipe["binary_threshold"] = LEGACY_BINARY_THRESHOLD
        recipe.update(dict.fromkeys(ET_STEPS, False))
    logger.warning(
        "%s records no inference recipe (saved before recipes were recorded): running M4's recipe of "
        "configs/train.yaml%s; train again, or pass --config_file <variant> or single options, to run another",
        checkpoint,
        " without its ET steps and with a 0.5 mask threshold" if output_type == "binary" else "",
    )
    return recipe


def resolve_recipe(
    record: Mapping[str, Any],
    default_recipe: Mapping[str, Any],
    given_recipe: Mapping[str, Any] | None = None,
    checkpoint: str | Path = "the checkpoint",
    **options: Any,
) -> dict[str, Any]:
    """The recipe inference runs: the model's, or a given one, with the user's options over it.

    Args:
        record: the checkpoint's model record (:func:`bundle.plan.checkpoints.read_record`).
        default_recipe: M4's recipe (``configs/train.yaml``'s ``inference_recipe``): for a checkpoint
            that records none, and the numbers of a step the user switches on that the recipe lacks.
        given_recipe: a variant's ``inference_recipe`` given for this run (``--config_file <variant>``
            or ``--inference_recipe``), instead of the record's.
        checkpoint: the checkpoint's path, for messages.
        options: recipe keys the user set (``None``: not set); each overrides the recipe's value.

    Raises:
        OptionError: an unknown option, a value of the wrong kind, or an option this model's recipe
            cannot honour (see the module docstring), naming the option.
    """
    checkpoint, output_type = str(checkpoint), str(record["output_type"])
    if output_type not in RULE_KEYS:
        raise OptionError(f"{checkpoint}: a {output_type!r} model (M2's gate) does not segment; give the segmenter")
    if given_recipe is not None:
        recipe = normalise_recipe(given_recipe, output_type, "inference_recipe#")
    elif record.get("inference_recipe") is not None:
        recorded = dict(record["inference_recipe"])
        absent = [step for step in LATER_STEPS if step not in recorded]
        if absent:
            logger.info(
                "%s records its recipe without %s (saved before the step existed): running without it, as then; "
                "--%s true switches it on",
                checkpoint,
                ", ".join(absent),
                absent[0],
            )
        recorded.update(dict.fromkeys(absent, False))
        recipe = normalise_recipe(recorded, output_type, f"{checkpoint}: inference_recipe#")
    else:
        recipe = normalise_recipe(_legacy_recipe(default_recipe, output_type, checkpoint), output_type)
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(RECIPE_KEYS))
    if unknown:
        raise OptionError(f"{unknown[0]}: not a recipe option; expected one of {', '.join(RECIPE_KEYS)}")
    given = {key: _value(key, value, "") for key, value in given.items()}
    for key in given:
        rule_of = next((t for t, keys in RULE_KEYS.items() if key in keys), None)
        if rule_of is not None and rule_of != output_type:
            raise OptionError(f"{key}: {_WHAT_IT_IS[output_type]} has no such rule; this checkpoint cannot use it")
        if output_type == "binary" and key in ET_STEPS and given[key]:
            raise OptionError(f"{key}: {_WHAT_IT_IS['binary']} has no ET; this checkpoint cannot use it")
    recipe.update(given)
    for step, numbers in STEPS.items():
        if recipe[step]:
            # a step the user switched on takes the numbers the recipe lacks from M4's (the steps are M4's)
            for key in numbers:
                if key not in recipe:
                    recipe[key] = _value(key, default_recipe[key], "configs/train.yaml: inference_recipe#")
        else:
            ignored = [key for key in numbers if key in given]
            if ignored:
                raise OptionError(f"{ignored[0]}: the {step} step is off in this model's recipe; set {step} true too")
    return {key: recipe[key] for key in RECIPE_KEYS if key in recipe}


def training_config(
    files: Sequence[str] | str, bundle_root: str | Path = ".", settings: Mapping[str, Any] | None = None
) -> ConfigParser:
    """The parsed training config stack of a model (a recipe's ``train_config``), with ``settings`` set.

    Inference takes the model's deterministic preprocessing (``intensity_transform``,
    ``label_transform``) from the very files it was trained with, so a method's changes, such as
    M3's percentile clip or M2's [0, 1] scaling, apply at inference too. Relative paths are under
    ``bundle_root`` (the bundle's rule, docs/architecture.md); ``settings`` are top-level keys the
    training run had (the record's ``train_settings``: ``spacing``, M3's ``clahe``...), set before
    anything is parsed. A missing file is one sentence naming it.
    """
    paths = [Path(f) if Path(f).is_absolute() else Path(bundle_root) / f for f in _value("train_config", files, "")]
    for path in paths:
        if not path.is_file():
            raise OptionError(f"train_config: {path} does not exist (a training config file of the model)")
    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    for key, value in (settings or {}).items():
        parser[key] = value
    return parser
