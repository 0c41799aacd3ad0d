"""Post-processing of internal label maps: M4's clean-up steps (docs/methods.md M4, docs/reference/inference.md).

In the paper's order, each a dictionary transform that :func:`recipe_steps` builds when the model's
inference recipe (or a flag) switches it on:

1. :class:`SmallETComponentsToNCRd` - ET components smaller than 16 voxels with mean ET probability
   below 0.9 become NCR;
2. :class:`SmallETVolumeToNCRd` - if the whole case has fewer than 73 ET voxels and their mean ET
   probability is below 0.9, all its ET becomes NCR (an empty ET prediction on a case without ET
   scores Dice 1, a few false voxels score 0);
3. :class:`RemoveSmallTumourComponentsd` - isolated whole-tumour components below a size go;
4. :class:`CloseTumourRegionsd` - dilation then erosion (closing) of the nested WT, TC and ET masks
   by a small structuring element (a cross by default).

Before them, every method's recipe runs :class:`OutsideBrainToBackgroundd`: no tumour where all input
channels are 0, outside the skull-stripped brain (the papers are silent; docs/methods.md). A recipe
may then switch on :class:`RemoveUnconfidentComponentsd` (ours): whole-tumour components that the
model never predicts with high confidence go, the most confident one always stays.

Label maps are ``(1, *spatial)`` with internal labels (0 bg, 1 NCR, 2 ED, 3 ET), numpy or torch
(CPU or CUDA, MetaTensor included); every function returns the same type on the same device with
the same dtype. Connected components are labelled on the tumour's bounding box
(:mod:`bundle.data.labels`), which keeps each step well under a second on a BraTS volume.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, MaskIntensity
from monai.utils import convert_data_type, convert_to_dst_type

from bundle.constants import BACKGROUND, ED, ET, NCR, REGION_NAMES, STRUCTURING_ELEMENTS
from bundle.data.labels import bounding_box, connected_components
from bundle.transforms import SalientMaskd


def _assign(labels: NdarrayOrTensor, box: tuple[slice, ...], where: np.ndarray, value: int) -> NdarrayOrTensor:
    """A copy of ``labels`` with ``where`` (a numpy mask of the box) set to ``value``; type, device, dtype kept."""
    out = labels.clone() if isinstance(labels, torch.Tensor) else labels.copy()
    crop = out[(slice(None), *box)]  # a view: writing into it writes into ``out``
    where_t, *_ = convert_to_dst_type(where[None], crop, dtype=torch.bool if isinstance(crop, torch.Tensor) else bool)
    crop[where_t] = value
    return out


def _label_numpy(labels: NdarrayOrTensor) -> np.ndarray:
    if labels.shape[0] != 1:
        raise ValueError(f"expected a label map with one channel (1, *spatial), got shape {tuple(labels.shape)}")
    # connected components run on the CPU (scipy); a CUDA label map makes one round trip
    return convert_data_type(labels, np.ndarray)[0][0]


def _probability_numpy(et_prob: NdarrayOrTensor, shape: tuple[int, ...]) -> np.ndarray:
    """The ET probability map ``(1, *spatial)`` or ``(*spatial)`` as a numpy array of the label map's spatial shape."""
    return convert_data_type(et_prob, np.ndarray)[0].reshape(shape)


def small_et_components_to_ncr(
    labels: NdarrayOrTensor,
    et_prob: NdarrayOrTensor,
    min_size: int = 16,
    prob_threshold: float = 0.9,
    connectivity: int | None = None,
) -> NdarrayOrTensor:
    """ET components with fewer than ``min_size`` voxels *and* mean ET probability < ``prob_threshold`` become NCR.

    docs/methods.md M4, the first step. ``et_prob`` is the ET probability map, ``(1, *spatial)`` or
    ``(*spatial)``. MONAI has no per-component statistic, hence connected components
    (:func:`bundle.data.labels.connected_components`) plus a weighted ``bincount``.
    """
    lab = _label_numpy(labels)
    et = lab == ET
    box = bounding_box(et)
    if box is None:
        return labels
    prob = _probability_numpy(et_prob, lab.shape)[box]
    cc, sizes = connected_components(et[box], connectivity)
    mean_prob = np.bincount(cc.ravel(), weights=prob.ravel(), minlength=sizes.size) / np.maximum(sizes, 1)
    demote = (sizes < min_size) & (mean_prob < prob_threshold)
    demote[0] = False  # id 0 is "not ET"
    if not demote.any():
        return labels
    return _assign(labels, box, demote[cc], NCR)


def small_et_volume_to_ncr(
    labels: NdarrayOrTensor, et_prob: NdarrayOrTensor, min_volume: int = 73, prob_threshold: float = 0.9
) -> NdarrayOrTensor:
    """All ET becomes NCR if the case has 0 < n < ``min_volume`` ET voxels of mean probability < ``prob_threshold``.

    docs/methods.md M4, the second step. Rationale (the paper's): on a case without ET an empty ET
    prediction scores Dice 1 and a few false voxels score 0; a small, unconfident ET prediction is
    more likely to be such a case than a small true ET. ``et_prob`` as in :func:`small_et_components_to_ncr`.
    """
    lab = _label_numpy(labels)
    et = lab == ET
    count = int(et.sum())
    if count == 0 or count >= min_volume:
        return labels
    if float(_probability_numpy(et_prob, lab.shape)[et].mean()) >= prob_threshold:
        return labels
    return _assign(labels, tuple(slice(None) for _ in et.shape), et, NCR)


def _tumour_components(
    labels: NdarrayOrTensor, connectivity: int | None
) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """The whole-tumour components on the tumour's box: (label map, box, component ids, sizes); None if no tumour."""
    lab = _label_numpy(labels)
    tumour = lab != BACKGROUND
    box = bounding_box(tumour)
    if box is None:
        return None
    cc, sizes = connected_components(tumour[box], connectivity)
    return lab, box, cc, sizes


def remove_small_tumour_components(
    labels: NdarrayOrTensor, min_size: int = 50, connectivity: int | None = None
) -> NdarrayOrTensor:
    """Remove whole-tumour components (all non-background labels together) with fewer than ``min_size`` voxels.

    docs/methods.md M4, the third step ("connected-component clean-up of small isolated false
    positives"). Why not MONAI's ``RemoveSmallObjects(independent_channels=False)``, which does the
    same computation: it calls ``skimage.morphology.remove_small_objects(ar, min_size)``, whose
    ``min_size`` is deprecated since scikit-image 0.26 and, through the deprecation shim, now also
    removes objects of exactly ``min_size`` voxels (measured here), with a warning on every call.
    The threshold's meaning would depend on the installed scikit-image; here components strictly
    smaller than ``min_size`` go.
    """
    components = _tumour_components(labels, connectivity)
    if components is None:
        return labels
    _, box, cc, sizes = components
    small = sizes < min_size
    small[0] = False
    if not small.any():
        return labels
    return _assign(labels, box, small[cc], BACKGROUND)


def remove_unconfident_components(
    labels: NdarrayOrTensor, wt_prob: NdarrayOrTensor, min_prob: float = 0.9, connectivity: int | None = None
) -> NdarrayOrTensor:
    """Remove whole-tumour components whose highest p(WT) is below ``min_prob``; the most confident one stays.

    A false region of a model trained on few cases tends to sit just above the threshold everywhere,
    while a tumour has a confident core; the component's peak probability tells them apart where its
    size does not (a large false region survives :func:`remove_small_tumour_components`). A case is
    never emptied: BraTS cases hold a tumour, so the component with the highest peak is kept whatever
    its value. ``wt_prob``: p(WT), ``(1, *spatial)`` or ``(*spatial)``. MONAI has no per-component
    statistic, hence connected components plus ``scipy.ndimage.maximum``.
    """
    from scipy import ndimage

    components = _tumour_components(labels, connectivity)
    if components is None:
        return labels
    lab, box, cc, sizes = components
    if sizes.size <= 2:  # background and one component: nothing to choose between
        return labels
    ids = np.arange(1, sizes.size)
    peaks = np.asarray(ndimage.maximum(_probability_numpy(wt_prob, lab.shape)[box], cc, ids))
    drop = np.zeros(sizes.size, bool)
    drop[ids] = peaks < min_prob
    drop[ids[np.argmax(peaks)]] = False
    if not drop.any():
        return labels
    return _assign(labels, box, drop[cc], BACKGROUND)


def binary_dilation(
    mask: torch.Tensor, radius: int = 1, spatial_dims: int | None = None, element: str = "cube"
) -> torch.Tensor:
    """Dilation of a boolean tensor ``(..., *spatial)`` by ``element`` of ``radius``; outside counts as 0.

    A ``uint8`` tensor is dilated as eight independent bit planes (bitwise OR), which is how
    :func:`close_tumour_regions` closes the three nested regions in one pass.

    ``element``: ``"cube"`` of side ``2 * radius + 1``, or ``"cross"`` (face neighbours) repeated
    ``radius`` times, the L1 ball of that radius.

    The cube gives the same result as MONAI's ``monai.transforms.utils_morphological_ops.dilate``
    (tested), which convolves float masks with a ones kernel: the cube is separable, so shifted
    logical ORs along each axis do it on the tensor's device with about 1/10 of the arithmetic
    (docs/benchmarks/inference.md). MONAI has no cross; scipy's
    ``binary_dilation(structure=generate_binary_structure(ndim, 1), iterations=radius)`` is the
    reference (tested), which runs on the CPU only.
    """
    return _shifted_morphology(mask, radius, spatial_dims, element, torch.Tensor.bitwise_or_)


def binary_erosion(
    mask: torch.Tensor, radius: int = 1, spatial_dims: int | None = None, element: str = "cube"
) -> torch.Tensor:
    """Erosion of a boolean tensor by ``element`` of ``radius``; outside counts as 1 (MONAI's ``erode``).

    A ``uint8`` tensor is eroded as eight independent bit planes (bitwise AND).
    """
    return _shifted_morphology(mask, radius, spatial_dims, element, torch.Tensor.bitwise_and_)


def _shifted_morphology(
    mask: torch.Tensor, radius: int, spatial_dims: int | None, element: str, op: Callable
) -> torch.Tensor:
    if element not in STRUCTURING_ELEMENTS:
        raise ValueError(f"element must be one of {STRUCTURING_ELEMENTS}, got {element!r}.")
    spatial_dims = mask.ndim if spatial_dims is None else spatial_dims
    dims = [d for d in range(mask.ndim - spatial_dims, mask.ndim) if mask.shape[d] > 1]
    # never modify the caller's mask in place; bytes stay bytes (bit planes), anything else is a mask
    out = mask.clone() if mask.dtype == torch.uint8 else mask.to(torch.bool, copy=True)
    # cube: one axis after the other (separable); cross: every axis from the same previous step
    passes = [[d] for d in dims for _ in range(radius)] if element == "cube" else [dims] * radius
    for axes in passes:
        prev = out.clone()
        for dim in axes:
            n = out.shape[dim]
            # each voxel combines with its two neighbours along ``dim``; the missing neighbour at the
            # border is the padding value, which leaves the voxel unchanged, so it is simply skipped
            op(out.narrow(dim, 1, n - 1), prev.narrow(dim, 0, n - 1))
            op(out.narrow(dim, 0, n - 1), prev.narrow(dim, 1, n - 1))
    return out


#: internal label -> its regions as bits (WT 1, TC 2, ET 4): BG none, NCR WT+TC, ED WT, ET all three
_REGION_BITS = torch.zeros(4, dtype=torch.uint8)
_REGION_BITS[NCR], _REGION_BITS[ED], _REGION_BITS[ET] = 1 | 2, 1, 1 | 2 | 4
#: region bits -> internal label by the nested rule: no WT is background, WT without TC is ED, TC without ET is NCR
_BITS_TO_LABEL = torch.tensor(
    [BACKGROUND if not b & 1 else ED if not b & 2 else NCR if not b & 4 else ET for b in range(8)], dtype=torch.uint8
)


def close_tumour_regions(labels: NdarrayOrTensor, filter_size: int = 3, element: str = "cross") -> NdarrayOrTensor:
    """Morphological closing (dilation, then erosion) of each nested region by ``element`` of side ``filter_size``.

    docs/methods.md M4, the fourth step ("dilation/erosion to smooth borders"); the element is ours:
    the cross (face neighbours; radius ``(filter_size - 1) / 2``) by default, the smallest 3-D
    element, because the 3 x 3 x 3 cube already lowers the ET Dice of BraTS ground truths by up to
    4.4 points (it closes the necrotic gaps of the thin enhancing rim; docs/benchmarks/inference.md). The WT,
    TC and ET masks are closed separately and recombined with the region rule, so the result stays
    nested (closing is monotone: ET inside TC inside WT) and never shrinks a region (closing is
    extensive). A background hole inside the tumour takes the innermost region that closes over it.
    Runs on the label map's device, on the tumour's bounding box grown by ``filter_size - 1`` (twice
    the radius: enough that the box border sees the same neighbourhood as the full volume).

    Why not scipy's :func:`~scipy.ndimage.grey_closing` of the nesting level (0 background, 1 ED,
    2 NCR, 3 ET; with a flat element it closes WT, TC and ET at once): it gives the same labels
    (tests/test_postprocessing.py, synthetic and real label maps) but is slower than these bitwise
    shifts, and CPU only (docs/benchmarks/postprocessing_closing.md).
    """
    if filter_size < 1 or filter_size % 2 == 0:
        raise ValueError(f"filter_size must be a positive odd number, got {filter_size}.")
    lab_t, *_ = convert_data_type(labels, torch.Tensor)
    if lab_t.shape[0] != 1:
        raise ValueError(f"expected a label map with one channel (1, *spatial), got shape {tuple(lab_t.shape)}")
    lab_t = lab_t.as_tensor() if isinstance(lab_t, MetaTensor) else lab_t
    radius = filter_size // 2
    box = bounding_box(lab_t[0] != BACKGROUND, margin=2 * radius)
    if box is None or radius == 0:
        return labels
    crop = lab_t[0][box]
    # the three regions as bit planes of one byte per voxel (WT 1, TC 2, ET 4): bitwise OR / AND close
    # all three at once, a third of the work of three boolean masks
    bits = _REGION_BITS.to(crop.device)[crop.long()]
    closed = binary_erosion(binary_dilation(bits, radius, crop.ndim, element), radius, crop.ndim, element)
    new = _BITS_TO_LABEL.to(crop.device, crop.dtype)[closed.long()]
    out = lab_t.clone()
    out[(0, *box)] = new
    return convert_to_dst_type(out, labels, dtype=labels.dtype)[0]


# --------------------------------------------------------------------------------------------------
# Dictionary transforms (what configs use)
# --------------------------------------------------------------------------------------------------


class _LabelMapStepd(MapTransform):
    """One post-processing step on the label maps under ``keys``: :meth:`step` of each, given the whole item."""

    def step(self, labels: NdarrayOrTensor, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """The processed label map."""
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Apply :meth:`step` to every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.step(d[key], d)
        return d


class _ETProbabilityStepd(_LabelMapStepd):
    """A step that also reads the ET probability: channel ``et_channel`` of the item's ``prob_key``.

    ``et_channel``: 2 for region models (WT, TC, ET), 3 for class models (background, NCR, ED, ET).
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "pred",
        et_channel: int = REGION_NAMES.index("ET"),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prob_key = prob_key
        self.et_channel = et_channel

    def et_probability(self, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """The item's ET probability map ``(*spatial)``."""
        return data[self.prob_key][self.et_channel]


class SmallETComponentsToNCRd(_ETProbabilityStepd):
    """Dictionary version of :func:`small_et_components_to_ncr` (``keys``: label maps, ``prob_key``: probabilities)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "pred",
        et_channel: int = REGION_NAMES.index("ET"),
        min_size: int = 16,
        prob_threshold: float = 0.9,
        connectivity: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob_key, et_channel, allow_missing_keys)
        self.min_size = min_size
        self.prob_threshold = prob_threshold
        self.connectivity = connectivity

    def step(self, labels: NdarrayOrTensor, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """Demote small, low-confidence ET components to NCR."""
        et_prob = self.et_probability(data)
        return small_et_components_to_ncr(labels, et_prob, self.min_size, self.prob_threshold, self.connectivity)


class SmallETVolumeToNCRd(_ETProbabilityStepd):
    """Dictionary version of :func:`small_et_volume_to_ncr` (``keys``: label maps, ``prob_key``: probabilities)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "pred",
        et_channel: int = REGION_NAMES.index("ET"),
        min_volume: int = 73,
        prob_threshold: float = 0.9,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob_key, et_channel, allow_missing_keys)
        self.min_volume = min_volume
        self.prob_threshold = prob_threshold

    def step(self, labels: NdarrayOrTensor, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """Demote all ET to NCR when the case's ET is small and unconfident."""
        return small_et_volume_to_ncr(labels, self.et_probability(data), self.min_volume, self.prob_threshold)


class RemoveUnconfidentComponentsd(_LabelMapStepd):
    """Dictionary version of :func:`remove_unconfident_components`: p(WT) from the item's ``prob_key``.

    ``wt_channels``: the channels whose sum is p(WT): ``(0,)`` for region and binary models,
    ``(1, 2, 3)`` (every tumour class) for class models.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "pred",
        wt_channels: tuple[int, ...] = (0,),
        min_prob: float = 0.9,
        connectivity: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prob_key = prob_key
        self.wt_channels = list(wt_channels)
        self.min_prob = min_prob
        self.connectivity = connectivity

    def step(self, labels: NdarrayOrTensor, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """Remove the whole-tumour components the model is never confident about."""
        wt_prob = data[self.prob_key][self.wt_channels].sum(0)
        return remove_unconfident_components(labels, wt_prob, self.min_prob, self.connectivity)


class RemoveSmallTumourComponentsd(_LabelMapStepd):
    """Dictionary version of :func:`remove_small_tumour_components`."""

    def __init__(
        self,
        keys: KeysCollection,
        min_size: int = 50,
        connectivity: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = min_size
        self.connectivity = connectivity

    def step(self, labels: NdarrayOrTensor, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """Remove whole-tumour components smaller than ``min_size`` voxels."""
        return remove_small_tumour_components(labels, self.min_size, self.connectivity)


class CloseTumourRegionsd(_LabelMapStepd):
    """Dictionary version of :func:`close_tumour_regions`."""

    def __init__(
        self, keys: KeysCollection, filter_size: int = 3, element: str = "cross", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if filter_size < 1 or filter_size % 2 == 0:
            raise ValueError(f"filter_size must be a positive odd number, got {filter_size}.")
        if element not in STRUCTURING_ELEMENTS:
            raise ValueError(f"element must be one of {STRUCTURING_ELEMENTS}, got {element!r}.")
        self.filter_size = filter_size
        self.element = element

    def step(self, labels: NdarrayOrTensor, data: Mapping[Hashable, Any]) -> NdarrayOrTensor:
        """Close each nested tumour region and relabel."""
        return close_tumour_regions(labels, self.filter_size, self.element)


class OutsideBrainToBackgroundd(MapTransform):
    """Every voxel outside the brain becomes background: where all input channels of ``image_key`` are 0.

    BraTS volumes are skull-stripped with the background exactly 0 in every modality, so a voxel where
    all channels are 0 holds no brain and no tumour (none of the 385,810 tumour voxels of the three
    BraTS 2021 sample cases lies there; ``docs/reference/inference.md``). A network trained on patches around the
    tumour and the brain never sees that background and can call it tumour; this step removes such
    predictions. Runs first among the clean-up steps, on the network's grid: ``image_key`` is the
    preprocessed image of the same item (cropped to the brain, as the labels), read before ``Invertd``.

    The brain is :class:`bundle.transforms.SalientMaskd`'s rule (non-zero in any channel), here on the
    preprocessed image: every intensity transform of the bundle keeps the zero background at 0 and
    leaves a brain voxel non-zero in at least one channel (the z-score over non-zero voxels, M2's
    [0, 1] scaling, M3's percentile clip of non-zero voxels; tested), and M4's salient channel, when
    the model takes it, is that mask itself. An intensity transform that moves the background off 0
    makes the mask the whole volume, so the step does nothing rather than remove tumour. Masking is
    MONAI's ``MaskIntensity`` (it keeps each label map's type, device and dtype).

    Args:
        keys: label maps ``(1, *spatial)`` (background 0).
        image_key: the item's image ``(C, *spatial)`` on the same grid as the label maps.
        allow_missing_keys: skip missing label keys.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.brain_mask = SalientMaskd(keys=image_key, mask_key="brain")
        self.mask = MaskIntensity()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Set the label maps to background outside the brain of ``image_key``."""
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"{type(self).__name__}: the item has no {self.image_key!r} to find the brain in")
        brain = self.brain_mask({self.image_key: d[self.image_key]})["brain"]
        for key in self.key_iterator(d):
            if tuple(brain.shape[1:]) != tuple(d[key].shape[1:]):
                raise ValueError(
                    f"{type(self).__name__}: {key} has the spatial shape {tuple(d[key].shape[1:])}, the image "
                    f"{self.image_key} {tuple(brain.shape[1:])}; both must be on the network's grid"
                )
            masked = self.mask(d[key], mask_data=brain)
            d[key] = convert_to_dst_type(masked, d[key], dtype=d[key].dtype)[0]
        return d


def recipe_steps(
    recipe: Mapping[str, Any],
    output_type: str,
    label_key: str = "pred_label",
    prob_key: str = "pred_mean",
    image_key: str = "image",
) -> list[MapTransform]:
    """The clean-up steps the recipe switches on, in their order, with the recipe's numbers.

    ``label_key``: the internal label map; ``prob_key``: the probabilities (the ET rules read p(ET):
    channel 2 of WT/TC/ET, channel 3 of the classes); ``image_key``: the preprocessed image on the same
    grid (the outside-brain step reads the brain from it).
    """
    et_channel = 3 if output_type == "classes" else REGION_NAMES.index("ET")
    steps: list[MapTransform] = []
    if recipe["mask_outside_brain"]:
        steps.append(OutsideBrainToBackgroundd(label_key, image_key=image_key))
    if recipe.get("remove_unconfident_components", False):
        wt_channels = (1, 2, 3) if output_type == "classes" else (0,)
        steps.append(
            RemoveUnconfidentComponentsd(label_key, prob_key, wt_channels, min_prob=recipe["component_min_prob"])
        )
    if recipe["et_components_to_ncr"]:
        steps.append(
            SmallETComponentsToNCRd(
                label_key,
                prob_key,
                et_channel,
                min_size=recipe["et_component_min_size"],
                prob_threshold=recipe["et_component_min_prob"],
            )
        )
    if recipe["et_volume_to_ncr"]:
        steps.append(
            SmallETVolumeToNCRd(
                label_key,
                prob_key,
                et_channel,
                min_volume=recipe["et_min_volume"],
                prob_threshold=recipe["et_volume_min_prob"],
            )
        )
    if recipe["remove_small_components"]:
        steps.append(RemoveSmallTumourComponentsd(label_key, min_size=recipe["min_component_size"]))
    if recipe["closing"]:
        steps.append(
            CloseTumourRegionsd(label_key, filter_size=recipe["closing_size"], element=recipe["closing_element"])
        )
    return steps
