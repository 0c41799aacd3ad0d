"""Probabilities -> one label map, by the model's output type (:func:`recipe_rule`, the recipe's rule).

* region models (sigmoid WT, TC, ET; M4, M1): :func:`regions_to_labels`, the nested threshold rule;
* class models (softmax background, NCR, ED, ET; M3): :func:`classes_to_labels`, the argmax;
* binary models (one sigmoid WT channel; M2): MONAI's ``AsDiscreted(threshold=...)``.

Labels are the *internal* ones of :mod:`bundle.constants` (0 bg, 1 NCR, 2 ED, 3 ET) until the last
step, :class:`LabelsToSchemed`, writes a dataset's values (:func:`bundle.data.labels.from_internal`,
MONAI's ``MapLabelValue``). The functions take one channel-first item, as MONAI post-transforms do
after ``decollate_batch``: probabilities ``(C, *spatial)`` in, labels ``(1, *spatial)`` out, numpy
or torch (CPU or CUDA, MetaTensor included), the same type on the same device.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, Compose, CopyItemsd, MapTransform
from monai.utils import convert_data_type, convert_to_dst_type

from bundle.constants import ED, ET, NCR, REGION_NAMES
from bundle.data.labels import INTERNAL, from_internal, scheme_values


def labels_to_scheme(labels: NdarrayOrTensor, scheme: str = INTERNAL) -> NdarrayOrTensor:
    """Map an internal label map (0 bg, 1 NCR, 2 ED, 3 ET) onto a dataset's values (``LABEL_SCHEMES``)."""
    return labels if scheme == INTERNAL else from_internal(labels, scheme)


def regions_to_labels(
    probs: NdarrayOrTensor,
    wt_threshold: float = 0.45,
    tc_threshold: float = 0.40,
    et_threshold: float = 0.45,
    scheme: str = INTERNAL,
    dtype: torch.dtype | np.dtype | None = None,
) -> NdarrayOrTensor:
    """Turn region probabilities ``(3, *spatial)`` (WT, TC, ET order) into a label map ``(1, *spatial)``.

    The rule of docs/methods.md M4: background if p(WT) < ``wt_threshold``; else ED if p(TC) <
    ``tc_threshold``; else NCR if p(ET) < ``et_threshold``; else ET. The result is nested by
    construction (ET inside TC inside WT) even when the three sigmoid maps are not. ``dtype``
    defaults to the input's dtype (as MONAI's ``AsDiscrete``), so nearest-neighbour ``Invertd`` and
    ``SaveImaged(output_dtype=...)`` work.
    """
    if probs.shape[0] != len(REGION_NAMES):
        raise ValueError(f"expected {len(REGION_NAMES)} region channels {REGION_NAMES}, got shape {tuple(probs.shape)}")
    p, *_ = convert_data_type(probs, torch.Tensor)
    p = p.as_tensor() if isinstance(p, MetaTensor) else p
    is_wt = p[0:1] >= wt_threshold
    is_tc = is_wt & (p[1:2] >= tc_threshold)
    is_et = is_tc & (p[2:3] >= et_threshold)
    # nested torch.where: one pass per label, much faster than boolean-mask assignment on a full volume
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    labels = torch.where(is_wt, torch.where(is_tc, torch.where(is_et, ET, NCR), ED).to(p.dtype), zero)
    out, *_ = convert_to_dst_type(labels, probs, dtype=dtype or probs.dtype)
    return labels_to_scheme(out, scheme)


def classes_to_labels(
    probs: NdarrayOrTensor, scheme: str = INTERNAL, dtype: torch.dtype | np.dtype | None = None
) -> NdarrayOrTensor:
    """Argmax of class probabilities/logits ``(4, *spatial)`` (internal class order) -> label map ``(1, *spatial)``."""
    p, *_ = convert_data_type(probs, torch.Tensor)
    labels = torch.argmax(p, dim=0, keepdim=True)
    out, *_ = convert_to_dst_type(labels, probs, dtype=dtype or probs.dtype)
    return labels_to_scheme(out, scheme)


class RegionsToLabelsd(MapTransform):
    """Dictionary wrapper of :func:`regions_to_labels`: region probabilities -> one label map.

    ``output_keys`` (one per key) writes the labels to new keys and keeps the probabilities, which the
    ET post-processing and optional probability outputs need; by default the key is overwritten.
    ``scheme="internal"`` when post-processing follows, then :class:`LabelsToSchemed`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        wt_threshold: float = 0.45,
        tc_threshold: float = 0.40,
        et_threshold: float = 0.45,
        scheme: str = INTERNAL,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        scheme_values(scheme)  # fail at construction on a typo, not on the first case
        self.thresholds = (wt_threshold, tc_threshold, et_threshold)
        self.scheme = scheme
        self.output_keys = _output_keys(self.keys, output_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert each key's region probabilities into a label map."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = regions_to_labels(d[key], *self.thresholds, scheme=self.scheme)
        return d


class ClassesToLabelsd(MapTransform):
    """Dictionary wrapper of :func:`classes_to_labels` (softmax class models): argmax, then label scheme."""

    def __init__(
        self,
        keys: KeysCollection,
        scheme: str = INTERNAL,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        scheme_values(scheme)
        self.scheme = scheme
        self.output_keys = _output_keys(self.keys, output_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert each key's class probabilities into a label map."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = classes_to_labels(d[key], scheme=self.scheme)
        return d


class LabelsToSchemed(MapTransform):
    """Dictionary wrapper of :func:`labels_to_scheme`: internal labels -> a dataset's label values (last step).

    Why not MONAI's ``MapLabelValued`` directly: the values come from one named scheme of
    ``bundle.constants.LABEL_SCHEMES`` (so a config says ``scheme: msd``, not two lists), and
    ``"internal"`` is the identity; the mapping itself is MONAI's ``MapLabelValue``.
    """

    def __init__(self, keys: KeysCollection, scheme: str = "brats2021", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        scheme_values(scheme)
        self.scheme = scheme

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map each key's internal labels onto the scheme."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = labels_to_scheme(d[key], self.scheme)
        return d


def _output_keys(keys: tuple[Hashable, ...], output_keys: KeysCollection | None) -> tuple[Hashable, ...]:
    if output_keys is None:
        return keys
    out = (output_keys,) if isinstance(output_keys, (str, int)) else tuple(output_keys)
    if len(out) != len(keys):
        raise ValueError(f"output_keys {out} must match keys {keys} one to one.")
    return out


def recipe_rule(
    recipe: Mapping[str, Any], output_type: str, prob_key: str = "pred_mean", label_key: str = "pred_label"
) -> MapTransform | Compose:
    """The recipe's rule from ``prob_key``'s probabilities to internal labels in ``label_key``, by output type."""
    if output_type == "regions":
        thresholds = [recipe[f"{region.lower()}_threshold"] for region in REGION_NAMES]
        return RegionsToLabelsd(prob_key, *thresholds, output_keys=label_key)
    if output_type == "classes":
        return ClassesToLabelsd(prob_key, output_keys=label_key)
    if output_type == "binary":  # one sigmoid channel (M2): a 0/1 mask
        return Compose(
            [
                CopyItemsd(keys=prob_key, names=label_key),
                AsDiscreted(keys=label_key, threshold=recipe["binary_threshold"], dtype=torch.uint8),
            ]
        )
    raise ValueError(f"output_type {output_type!r} has no rule from probabilities to labels")


class MeanProbabilityd(MapTransform):
    """The inferer's output as ``<key>_mean`` (and ``<key>_std`` when the flips' spread was asked for).

    :class:`bundle.inference.inferers.FlipTTAInferer` returns the probabilities, or ``{"mean", "std"}``
    with ``return_std``; after decollation both forms become the same keys. MONAI's
    ``FlattenSubKeysd`` does the second form only.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Flatten each key's probabilities into ``<key>_mean`` (and ``<key>_std``)."""
        d = dict(data)
        for key in self.key_iterator(d):
            value = d.pop(key)
            parts = value if isinstance(value, Mapping) else {"mean": value}
            for name, part in parts.items():
                d[f"{key}_{name}"] = part
        return d
