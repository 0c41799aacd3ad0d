"""What validation compares, by the model's output type: the post-processing and the per-region metrics.

``configs/train.yaml``'s ``validate#postprocessing`` and ``validate#additional_metrics`` are built here
from the model's plan, so every method's validation (regions, classes, a binary mask; with or without
the inference recipe) is one tested function rather than a choice written in the configs:

* the network's output is kept first (``logits``, ``target``) for the validation loss;
* region and binary models: MONAI's sigmoid and 0.5 threshold; class models: softmax, argmax, and both
  prediction and label turned into WT / TC / ET masks;
* ``with_recipe`` (``configs/cpu.yaml``): the recipe's rule from probabilities to labels and its clean-up
  steps, without TTA, so validation scores what inference will write;
* ``disjoint`` (M3): the disjoint classes NCR and ED of the masks as well.

The metrics are MONAI's (``DiceMetric``, ``ConfusionMatrixMetric``, ``LossMetric`` through
``IgniteMetricHandler``) and the official BraTS HD95, one scalar per region (``val_dice_WT`` ...).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import ConfusionMatrixMetric, DiceMetric
from monai.transforms import Activationsd, AsDiscreted, Compose, CopyItemsd, MapTransform

from bundle.constants import REGION_NAMES
from bundle.evaluation.handlers import BratsHD95Metric, RegionMetric
from bundle.inference.postprocessing import recipe_steps
from bundle.inference.to_labels import ClassesToLabelsd, recipe_rule
from bundle.options import as_bool
from bundle.transforms import LabelsToRegionsd, RegionsToDisjointd

#: The disjoint classes validation adds with ``validate_disjoint`` (ET is a region already).
DISJOINT_NAMES = ("NCR", "ED")


def compared_regions(output_type: str) -> list[str]:
    """The regions validation scores: WT alone for a binary model, WT, TC, ET otherwise."""
    return ["WT"] if output_type == "binary" else list(REGION_NAMES)


class _LabelsAsPredictiond(MapTransform):
    """The recipe's regions become what the metrics compare: ``pred`` is replaced by ``source``."""

    def __init__(self, source: str = "pred_label", drop: tuple[str, ...] = ("pred_mean",)) -> None:
        super().__init__(keys=[source])
        self.source, self.drop = source, drop

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Move ``source`` to ``pred`` and drop the intermediate keys."""
        d = {k: v for k, v in data.items() if k not in self.drop}
        d["pred"] = d.pop(self.source)
        return d


def validation_postprocessing(plan: Any, with_recipe: Any = False, disjoint: Any = False) -> Compose:
    """The validation post-processing of a plan's model (see the module docstring).

    ``plan``: a :class:`bundle.plan.ModelPlan` or a plan; ``with_recipe``, ``disjoint``: boolean options.
    """
    plan = getattr(plan, "plan", plan)
    output_type = str(plan["output_type"])
    activation = {"softmax": True} if output_type == "classes" else {"sigmoid": True}
    steps: list[Any] = [
        CopyItemsd(keys=["pred", "label"], names=["logits", "target"]),
        Activationsd(keys="pred", **activation),
    ]
    if as_bool(with_recipe, "validate_with_recipe"):
        recipe = plan["inference_recipe"]
        regions = {"WT": [1, 2, 3]} if output_type == "binary" else None
        steps += [
            CopyItemsd(keys="pred", names="pred_mean"),
            recipe_rule(recipe, output_type, prob_key="pred_mean", label_key="pred_label"),
            *recipe_steps(recipe, output_type, label_key="pred_label", prob_key="pred_mean"),
            LabelsToRegionsd(keys="pred_label", regions=regions),
            _LabelsAsPredictiond(),
        ]
        if output_type == "classes":
            steps.append(LabelsToRegionsd(keys="label"))
    elif output_type == "classes":  # argmax, then both label maps as WT / TC / ET masks
        steps += [ClassesToLabelsd(keys="pred"), LabelsToRegionsd(keys=["pred", "label"])]
    else:
        steps.append(AsDiscreted(keys="pred", threshold=0.5))
    if as_bool(disjoint, "validate_disjoint"):
        steps.append(RegionsToDisjointd(keys=["pred", "label"], output_keys=["pred_classes", "label_classes"]))
    return Compose(steps)


def region_metrics(loss: Any, output_type: str = "regions", disjoint: Any = False) -> dict[str, Any]:
    """Validation's additional metrics: the loss on whole cases, and Dice, HD95, sensitivity, specificity per region.

    ``loss``: the training loss (MONAI's ``LossMetric`` on each validation case's logits); ``disjoint``
    also scores NCR and ED (``val_dice_NCR``, ``val_hd95_ED``...).
    """
    regions = compared_regions(output_type)
    masks = from_engine(["pred", "label"])
    metrics: dict[str, Any] = {
        "val_loss": IgniteMetricHandler(loss_fn=loss, output_transform=from_engine(["logits", "target"])),
        "val_dice": RegionMetric(
            DiceMetric(include_background=True, reduction="mean_batch"), regions, "val_dice_", masks
        ),
        "val_hd95": RegionMetric(BratsHD95Metric(reduction="mean_batch"), regions, "val_hd95_", masks),
    }
    for name in ("sensitivity", "specificity"):
        metric = ConfusionMatrixMetric(metric_name=name, reduction="mean_batch")
        metrics[f"val_{name}"] = RegionMetric(metric, regions, f"val_{name}_", masks)
    if as_bool(disjoint, "validate_disjoint"):
        classes = from_engine(["pred_classes", "label_classes"])
        dice = DiceMetric(include_background=True, reduction="mean_batch")
        metrics["val_dice_classes"] = RegionMetric(dice, DISJOINT_NAMES, "val_dice_", classes)
        hd95 = BratsHD95Metric(reduction="mean_batch")
        metrics["val_hd95_classes"] = RegionMetric(hd95, DISJOINT_NAMES, "val_hd95_", classes)
    return metrics
