"""A model's deterministic preprocessing, built from its plan: the same steps in training, validation and inference.

The steps every method shares are fixed here, in the order MONAI bundles use; the plan contributes the
method's parts (:mod:`bundle.plan.plan`: ``spacing``, ``salient_channel``, the ``intensity`` steps and
the ``target`` label transform)::

    load the case (each file's own reader; NIfTI decoded at once, ISA-L gzip) -> the internal convention
    (channel order, label values) -> RAS -> [resample to spacing] -> crop to the brain's box -> float32,
    contiguous -> [salient mask] -> intensity steps -> [salient channel appended] -> [label -> target]

Training builds its cached steps from the plan it records, and inference from the plan it reads, so the
two cannot drift apart, and nothing re-reads a training config to preprocess a case.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.transforms import (
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Lambdad,
    MapTransform,
    Orientationd,
    Spacingd,
)

from bundle.plan.specs import build
from bundle.transforms import (
    ConcurrentNibabelReader,
    LoadCaseImaged,
    SalientMaskd,
    ToInternalConventiond,
    is_positive_numpy,
)

#: Where M4's salient mask waits between the raw image and the normalised one.
SALIENT_MASK_KEY = "salient_mask"


def _contiguous(x: Any) -> Any:
    """A contiguous copy of the crop's view (module-level so that caches can hash and pickle it)."""
    return x.contiguous()


def _with_keys(spec: Mapping[str, Any], **keys: Any) -> dict[str, Any]:
    """A transform spec with the key arguments the pipeline gives it (the plan records none)."""
    return {**spec, **{name: value for name, value in keys.items() if name not in spec}}


def preprocessing_transforms(
    plan: Any,
    image_key: str = "image",
    label_key: str = "label",
    label_layout: str = "brats2021",
    with_label: bool = True,
    case_image_key: str | None = None,
) -> list[MapTransform]:
    """The deterministic preprocessing of a plan's ``preprocessing`` part, as a list of MONAI transforms.

    Args:
        plan: a model's plan (or the :class:`bundle.plan.ModelPlan` a training config builds); its
            ``preprocessing`` part (``spacing``, ``salient_channel``, ``intensity``, ``target``) is used.
        image_key, label_key: the data keys.
        label_layout: the layout of datalist items that do not name one (channel order, label values).
        with_label: load the label and turn it into the network's target (training, validation);
            ``False`` for inference, where there is none.
        case_image_key: MONAI Label's datastore lists one file per case: the key whose file stands for
            its whole case (:class:`bundle.transforms.LoadCaseImaged`).
    """
    preprocessing: Mapping[str, Any] = getattr(plan, "plan", plan)["preprocessing"]
    keys = [image_key, label_key] if with_label else [image_key]
    spacing = preprocessing.get("spacing")
    salient = bool(preprocessing.get("salient_channel"))
    steps: list[MapTransform] = [
        # each file's own type (int16 for BraTS) until the brain is cropped out, then float32 once, on the crop
        LoadCaseImaged(
            keys=keys,
            reader=ConcurrentNibabelReader(),
            ensure_channel_first=True,
            image_only=True,
            dtype=None,
            allow_missing_keys=True,
            case_image_key=case_image_key,
        ),
        ToInternalConventiond(
            image_key=image_key, label_key=label_key if with_label else None, default_layout=label_layout
        ),
        # MONAI 1.6's default labels, stated: its default becomes the image's own space
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
    ]
    if spacing:
        steps += [  # resampling interpolates: in float32
            EnsureTyped(keys=keys, dtype=torch.float32, allow_missing_keys=True),
            Spacingd(keys=keys, pixdim=spacing, mode=("bilinear", "nearest")[: len(keys)], allow_missing_keys=True),
        ]
    steps += [
        CropForegroundd(
            keys=keys, source_key=image_key, select_fn=is_positive_numpy, allow_smaller=True, allow_missing_keys=True
        ),
        EnsureTyped(keys=keys, dtype=torch.float32, allow_missing_keys=True),
        # the crop is a view of the whole volume: the caches hold the brain, not the storage behind it, and
        # the intensity steps (which write in place) work on the copy
        Lambdad(keys=keys, func=_contiguous, allow_missing_keys=True),
    ]
    if salient:  # the brain mask of the raw intensities, appended after the intensity steps
        steps.append(SalientMaskd(keys=image_key, mask_key=SALIENT_MASK_KEY))
    steps += [build(_with_keys(step, keys=image_key)) for step in preprocessing.get("intensity") or []]
    if salient:
        steps += [ConcatItemsd(keys=[image_key, SALIENT_MASK_KEY], name=image_key), DeleteItemsd(keys=SALIENT_MASK_KEY)]
    target = preprocessing.get("target")
    if with_label and target:
        steps.append(build(_with_keys(target, keys=label_key, allow_missing_keys=True)))
    return steps
