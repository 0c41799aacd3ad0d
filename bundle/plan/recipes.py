"""Each method's inference recipe: how its models turn a case into labels (docs/reference/inference.md).

A recipe is one block of plain values in the training configs (``inference_recipe``: M4's in
``configs/train.yaml``; M1-M3's variant files change single keys of it, ``inference_recipe#tta: false``),
validated and recorded in every model's plan (:mod:`bundle.plan.plan`). ``configs/inference.yaml``,
``python -m bundle infer`` and the MONAI Label app read it from the checkpoint, so a model runs its own
method's recipe without the user naming a file; a variant's recipe (``--config_file <variant>``) or
single keys (``--tta false``, ``--closing true``...) override it. Keys:

* ``tta``: flip test-time augmentation (8 flips in 3-D, the 4 in-plane flips for 2-D models);
* the rule from probabilities to labels, by the model's output type (:data:`RULE_KEYS`):
  ``wt_threshold``, ``tc_threshold``, ``et_threshold`` (regions), ``binary_threshold`` (binary),
  nothing for the argmax of class models;
* the post-processing steps, in order, each a boolean with its numbers (:data:`STEPS`): first
  ``mask_outside_brain`` (no tumour where every input channel is 0; every method's recipe runs it),
  ``remove_unconfident_components`` (ours, off unless a recipe switches it on: whole-tumour
  components whose peak p(WT) stays below ``component_min_prob`` go), then M4's four clean-up steps.

A user option the recipe cannot honour (a region threshold for a class model, an ET rule for a
binary model, a step's number while the step is off, a step switched on whose numbers the recipe
lacks) is an :class:`~bundle.errors.OptionError` naming the key, never ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from bundle.constants import STRUCTURING_ELEMENTS
from bundle.errors import OptionError
from bundle.options import as_bool

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
    "remove_unconfident_components": ("component_min_prob",),
    "et_components_to_ncr": ("et_component_min_size", "et_component_min_prob"),
    "et_volume_to_ncr": ("et_min_volume", "et_volume_min_prob"),
    "remove_small_components": ("min_component_size",),
    "closing": ("closing_size", "closing_element"),
}
#: Steps added after recipes were first recorded: a recipe without one did not run it (off).
OPTIONAL_STEPS: tuple[str, ...] = ("remove_unconfident_components",)
#: Steps that act on ET, which a binary (whole-tumour) model does not have.
ET_STEPS = ("et_components_to_ncr", "et_volume_to_ncr")
#: Every key a recipe may hold.
RECIPE_KEYS: tuple[str, ...] = (
    "tta",
    *(k for keys in RULE_KEYS.values() for k in keys),
    *(k for step, numbers in STEPS.items() for k in (step, *numbers)),
)
#: What inference ran for checkpoints of plan version 1: M4's recipe as configs/train.yaml gave it then
#: (commit edeeb16), for a record without a recipe and for the numbers of steps a recorded recipe left out.
#: History, not a setting: M4's current numbers live in configs/train.yaml's inference_recipe.
LEGACY_RECIPE: dict[str, Any] = {
    "tta": True,
    "wt_threshold": 0.45,
    "tc_threshold": 0.40,
    "et_threshold": 0.45,
    "mask_outside_brain": True,
    "remove_unconfident_components": False,
    "et_components_to_ncr": True,
    "et_component_min_size": 16,
    "et_component_min_prob": 0.9,
    "et_volume_to_ncr": True,
    "et_min_volume": 73,
    "et_volume_min_prob": 0.9,
    "remove_small_components": True,
    "min_component_size": 50,
    "closing": True,
    "closing_size": 3,
    "closing_element": "cross",
}

_PROBABILITIES = ("wt_threshold", "tc_threshold", "et_threshold", "binary_threshold")
_PROBABILITIES += ("et_component_min_prob", "et_volume_min_prob", "component_min_prob")
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
    # null is "not set": a variant over train.yaml's recipe nulls the rule keys its output type lacks
    out = {key: _value(key, value, where) for key, value in recipe.items() if value is not None}
    for step in OPTIONAL_STEPS:
        out.setdefault(step, False)
    required = ["tta", *RULE_KEYS[output_type], *STEPS]
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


def recipe_for(recipe: Mapping[str, Any] | None, output_type: str) -> dict[str, Any] | None:
    """The recipe a model of ``output_type`` records: ``recipe`` normalised; ``None`` for M2's gate.

    M2's gate (``output_type: gate``) classifies slices and is never run as a segmenter, so the
    recipe it inherits from ``configs/train.yaml`` does not apply to it. Building the plan calls this,
    so a bad block stops training before any case is read.
    """
    if recipe is None or output_type not in RULE_KEYS:
        return None
    return normalise_recipe(recipe, output_type)


def resolve_recipe(
    plan: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    where: str = "the checkpoint",
) -> dict[str, Any]:
    """The recipe inference runs: the plan's (or a ``given`` one) with the user's ``options`` over it.

    Args:
        plan: the checkpoint's plan (:class:`bundle.plan.Checkpoint`).
        given: another method's whole recipe for this run (``--config_file <variant>`` or
            ``--inference_recipe``), instead of the plan's.
        options: recipe keys the user set (``None``: not set); each overrides the recipe's value.
        where: the checkpoint, for messages.

    Raises:
        OptionError: an unknown option, a value of the wrong kind, or an option this model's recipe
            cannot honour (see the module docstring), naming the option.
    """
    output_type = str(plan["output_type"])
    if output_type not in RULE_KEYS:
        raise OptionError(f"{where}: a {output_type!r} model (M2's gate) does not segment; give the segmenter")
    if given is not None:
        recipe = normalise_recipe(given, output_type, "inference_recipe#")
    elif plan.get("inference_recipe") is None:
        raise OptionError(
            f"{where}: the plan records no inference recipe; give one (--inference_recipe, or python -m bundle "
            "infer --config_file configs/variants/<method>.yaml)"
        )
    else:
        recipe = normalise_recipe(plan["inference_recipe"], output_type, f"{where}: inference_recipe#")
    chosen = {key: value for key, value in dict(options or {}).items() if value is not None}
    unknown = sorted(set(chosen) - set(RECIPE_KEYS))
    if unknown:
        raise OptionError(f"{unknown[0]}: not a recipe option; expected one of {', '.join(RECIPE_KEYS)}")
    chosen = {key: _value(key, value, "") for key, value in chosen.items()}
    for key in chosen:
        rule_of = next((t for t, keys in RULE_KEYS.items() if key in keys), None)
        if rule_of is not None and rule_of != output_type:
            raise OptionError(f"{key}: {_WHAT_IT_IS[output_type]} has no such rule; this checkpoint cannot use it")
        if output_type == "binary" and key in ET_STEPS and chosen[key]:
            raise OptionError(f"{key}: {_WHAT_IT_IS['binary']} has no ET; this checkpoint cannot use it")
    recipe.update(chosen)
    for step, numbers in STEPS.items():
        if recipe[step]:
            absent = [key for key in numbers if key not in recipe]
            if absent:
                raise OptionError(f"{absent[0]}: missing; the {step} step is on and needs it (give --{absent[0]})")
        else:
            ignored = [key for key in numbers if key in chosen]
            if ignored:
                raise OptionError(f"{ignored[0]}: the {step} step is off in this model's recipe; set {step} true too")
    return {key: recipe[key] for key in RECIPE_KEYS if key in recipe}
