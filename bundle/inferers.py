"""Inference-time building blocks: flip-TTA inferer, regions/classes -> labels, post-processing.

All of this follows METHODS.md M4 (sliding window with the training patch, 50 % overlap, Gaussian
weighting, 8-flip test-time augmentation averaging probabilities; the region -> label rule; ET and
small-component clean-up; morphological smoothing) but is written for every model in the bundle:
region (sigmoid) models and class (softmax) models, 3-D models and 2-D models run slice by slice.

Conventions
-----------
* Inferer input/output is batched: ``(B, C, *spatial)``.
* The label functions and transforms work on one channel-first item, as MONAI post-transforms do
  after ``decollate_batch``: probabilities ``(C, *spatial)``, label maps ``(1, *spatial)``.
* Post-processing works on the *internal* labels of :mod:`bundle.constants` (0 bg, 1 NCR, 2 ED,
  3 ET); the conversion to a dataset's values (``brats2021`` 1/2/4, ``brats2023`` 1/2/3, ``msd``)
  is the last step (:func:`labels_to_scheme`, or the ``scheme`` argument of the label transforms).
* Every function takes numpy arrays or torch tensors (CPU or CUDA, MetaTensor included) and returns
  the same type on the same device with the label map's dtype.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.transforms import MapLabelValue, MapTransform
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage

from bundle.constants import BACKGROUND, ED, ET, LABEL_SCHEMES, NCR, REGION_NAMES

__all__ = [
    "ClassesToLabelsd",
    "CloseTumourRegionsd",
    "FlipTTAInferer",
    "LabelsToSchemed",
    "RegionsToLabelsd",
    "RemoveSmallTumourComponentsd",
    "SmallETComponentsToNCRd",
    "SmallETVolumeToNCRd",
    "binary_dilation",
    "binary_erosion",
    "classes_to_labels",
    "close_tumour_regions",
    "flip_combinations",
    "labels_to_scheme",
    "regions_to_labels",
    "remove_small_tumour_components",
    "small_et_components_to_ncr",
    "small_et_volume_to_ncr",
]

_ACTIVATIONS = ("sigmoid", "softmax", "none")


# --------------------------------------------------------------------------------------------------
# Flip test-time augmentation
# --------------------------------------------------------------------------------------------------


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All ``2 ** len(axes)`` subsets of ``axes`` (the identity ``()`` first), one per flip combination."""
    axes = tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class FlipTTAInferer(Inferer):
    """Sliding-window inference averaged over all flip combinations of the chosen spatial axes.

    For every subset of ``flip_axes`` (8 in 3-D, 4 in 2-D) the input is flipped, passed through
    ``base_inferer`` (by default MONAI's :class:`~monai.inferers.SlidingWindowInferer` with Gaussian
    weighting and 50 % overlap, METHODS.md M4), the output is flipped back, turned into probabilities
    (``activation``) and averaged. Averaging *probabilities* rather than logits is what the paper
    describes; with ``activation="none"`` raw outputs are averaged.

    Why not MONAI's :class:`monai.data.TestTimeAugmentation`: it is built for *random* invertible
    transforms on dictionaries; each of its passes re-runs the whole transform chain plus a full
    inverse on the CPU, one sample at a time, and it returns mode/mean/std over random draws.
    Here the augmentation set is the fixed, exhaustive set of flips, a flip is its own inverse on
    the tensor, and the flipped copies can share one sliding-window pass on the GPU.

    Flip batching: ``flip_batch_size`` flipped copies are concatenated along the batch dimension and
    run through one sliding-window pass whose ``sw_batch_size`` is multiplied by the same factor, so
    each network call sees the same window from several flips (fewer, larger calls). Peak memory
    grows with the group: each copy needs one input-sized and one output-sized buffer. By default
    (``None``) all flips share one pass when the windows run on CUDA, and the flips run one by one
    on the CPU, where larger batches do not run faster and the extra volume-sized copies cost
    memory bandwidth (measured: 8 flips of a 4 x 240 x 240 x 155 volume in one pass took 1.7x
    longer than one by one, see docs/inference.md).

    Memory: a running sum (or, with ``return_std``, Welford's running mean and sum of squared
    deviations) are the only volume-sized buffers kept across groups.

    2-D models: pass ``base_inferer=SliceInferer(roi_size=(H, W), spatial_dim=2)`` to run a 2-D model
    slice by slice over a 3-D volume; by default only the in-plane axes are flipped (4 flips), since
    flipping the slice axis only reorders slices for a 2-D model. A 2-D input ``(B, C, H, W)`` with a
    2-D ``roi_size`` also gets 4 flips.

    Args:
        roi_size: sliding-window size (the training patch). Ignored when ``base_inferer`` is given.
        sw_batch_size: windows per network call for one flip (multiplied by the flip group size).
        overlap: window overlap, 0.5 as in the paper.
        mode: window blending, ``"gaussian"`` (paper) or ``"constant"``.
        sigma_scale: Gaussian sigma relative to the window size (MONAI default 0.125).
        padding_mode: padding when the volume is smaller than the window.
        sw_device: device the windows (and the network) run on, e.g. ``"cuda"``.
        device: device of the stitched output and the TTA accumulators, e.g. ``"cpu"`` so a large
            volume never has to fit on the GPU. Defaults to the input's device.
        progress: show MONAI's sliding-window progress bar.
        base_inferer: any MONAI :class:`~monai.inferers.Inferer` to use instead of the default
            sliding window (``SliceInferer`` for 2-D models). ``SlidingWindowInferer`` subclasses get
            their ``sw_batch_size`` scaled for flip batching; other inferers simply see a bigger batch.
        activation: ``"sigmoid"`` (region models), ``"softmax"`` (class models, over channels) or
            ``"none"``.
        tta: ``False`` runs a single un-flipped pass through the same code path.
        flip_axes: spatial axes to flip (0-based, excluding batch and channel). ``None``: every
            spatial axis, except the slice axis of a ``SliceInferer``.
        flip_batch_size: how many flipped copies share one sliding-window pass (``None``: all on
            CUDA, 1 on CPU).
        amp: use ``torch.autocast``. On CUDA it defaults to float16. On CPU it is used only if
            ``amp_dtype`` is given (bfloat16), because CPU float16/bfloat16 convolutions are often
            slower than float32; either way the same code path runs.
        amp_dtype: autocast dtype (``torch.float16``, ``torch.bfloat16`` or their names).
        return_std: also return the per-voxel standard deviation across flips (population std over
            the ``2 ** k`` flips, which are all the flips, not a sample), as ``{"mean": mean,
            "std": std}``; after decollation MONAI's ``FlattenSubKeysd(keys="pred", prefix="pred")``
            lifts them to the top-level keys ``pred_mean`` and ``pred_std``.

    Returns:
        ``(B, C_out, *spatial)`` float32 averaged probabilities (a MetaTensor carrying the input's
        metadata when the input is one), or the dict above when ``return_std``.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.5,
        mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: str = "constant",
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        base_inferer: Inferer | None = None,
        activation: str | None = "sigmoid",
        tta: bool = True,
        flip_axes: Sequence[int] | None = None,
        flip_batch_size: int | None = None,
        amp: bool = True,
        amp_dtype: torch.dtype | str | None = None,
        return_std: bool = False,
    ) -> None:
        super().__init__()
        if base_inferer is None:
            if roi_size is None:
                raise ValueError("FlipTTAInferer needs either roi_size (sliding window) or base_inferer.")
            base_inferer = SlidingWindowInferer(
                roi_size=roi_size,
                sw_batch_size=sw_batch_size,
                overlap=overlap,
                mode=mode,
                sigma_scale=sigma_scale,
                padding_mode=padding_mode,
                sw_device=sw_device,
                device=device,
                progress=progress,
                # the Gaussian map is the same for every window, flip and case: compute it once
                # (only possible for a fixed window; -1 entries mean "whole axis" and vary per case)
                cache_roi_weight_map=isinstance(roi_size, Sequence) and min(roi_size) > 0,
            )
        activation = "none" if activation is None else str(activation).lower()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}.")
        if flip_batch_size is not None and flip_batch_size < 1:
            raise ValueError(f"flip_batch_size must be >= 1 or None, got {flip_batch_size}.")
        if isinstance(amp_dtype, str):
            amp_dtype = getattr(torch, amp_dtype)
        self.base_inferer = base_inferer
        self.sw_device = sw_device if sw_device is not None else getattr(base_inferer, "sw_device", None)
        self.device = device if device is not None else getattr(base_inferer, "device", None)
        self.activation = activation
        self.tta = tta
        self.flip_axes = None if flip_axes is None else tuple(int(a) for a in flip_axes)
        self.flip_batch_size = flip_batch_size
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.return_std = return_std
        self._scaled_inferers: dict[int, Inferer] = {}

    def spatial_flip_axes(self, num_spatial_dims: int) -> tuple[int, ...]:
        """The spatial axes that will be flipped for an input with ``num_spatial_dims`` spatial dims."""
        if self.flip_axes is not None:
            bad = [a for a in self.flip_axes if not 0 <= a < num_spatial_dims]
            if bad:
                raise ValueError(f"flip_axes {self.flip_axes} out of range for {num_spatial_dims} spatial dims.")
            return tuple(sorted(set(self.flip_axes)))
        axes = tuple(range(num_spatial_dims))
        if isinstance(self.base_inferer, SliceInferer) and num_spatial_dims == 3:
            # a 2-D model sees single slices: flipping the slice axis would only reorder them
            axes = tuple(a for a in axes if a != self.base_inferer.spatial_dim)
        return axes

    def flips(self, num_spatial_dims: int) -> list[tuple[int, ...]]:
        """The flip combinations (as spatial axes) run for an input with ``num_spatial_dims`` spatial dims."""
        if not self.tta:
            return [()]
        return flip_combinations(self.spatial_flip_axes(num_spatial_dims))

    def group_size(self, inputs: torch.Tensor) -> int:
        """Flips per sliding-window pass: ``flip_batch_size``, or by default all on CUDA and one on CPU."""
        if self.flip_batch_size is not None:
            return self.flip_batch_size
        device_type = torch.device(self.sw_device).type if self.sw_device is not None else inputs.device.type
        return 1 << 30 if device_type == "cuda" else 1

    def _inferer_for_group(self, group_size: int) -> Inferer:
        """The base inferer, with ``sw_batch_size`` scaled so one network call sees one window per flip."""
        if group_size == 1 or not isinstance(self.base_inferer, SlidingWindowInferer):
            return self.base_inferer
        if group_size not in self._scaled_inferers:
            # a shallow copy shares the cached Gaussian weight map; the original stays untouched
            scaled = copy.copy(self.base_inferer)
            scaled.sw_batch_size = self.base_inferer.sw_batch_size * group_size
            self._scaled_inferers[group_size] = scaled
        return self._scaled_inferers[group_size]

    def _autocast(self, inputs: torch.Tensor) -> torch.autocast:
        device_type = torch.device(self.sw_device).type if self.sw_device is not None else inputs.device.type
        if device_type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype or torch.float16, enabled=self.amp)
        # CPU (or other): only on explicit request, see the class docstring
        enabled = self.amp and self.amp_dtype is not None
        return torch.autocast(device_type, dtype=self.amp_dtype or torch.bfloat16, enabled=enabled)

    def _activate(self, logits: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Probabilities; ``inplace`` only for tensors this class owns (a flipped copy), never a view of the output."""
        if self.activation == "sigmoid":
            return logits.sigmoid_() if inplace else torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return logits if inplace else logits.clone()

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Run ``network`` on ``inputs`` (B, C, *spatial) under every flip; return the mean (and std)."""
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        batch = x.shape[0]
        flips = self.flips(x.ndim - 2)
        group_size = min(self.group_size(x), len(flips))

        acc: torch.Tensor | None = None  # running sum, or running mean with return_std (Welford)
        m2: torch.Tensor | None = None  # Welford: running sum of squared deviations from the mean
        n = 0
        # TTA is inference only: without no_grad every flip would keep its autograd graph alive
        with torch.no_grad():
            for start in range(0, len(flips), group_size):
                dims = [tuple(a + 2 for a in f) for f in flips[start : start + group_size]]
                stacked = torch.cat([_flip(x, d) for d in dims]) if len(dims) > 1 else _flip(x, dims[0])
                with self._autocast(x):
                    out = _main_output(self._inferer_for_group(len(dims))(stacked, network, *args, **kwargs))
                del stacked
                for i, d in enumerate(dims):
                    # un-flip, then activate: probabilities (not logits) are averaged
                    prob = self._activate(_flip(out[i * batch : (i + 1) * batch].float(), d), inplace=bool(d))
                    n += 1
                    if acc is None:
                        acc = prob
                        m2 = torch.zeros_like(prob) if self.return_std else None
                    elif m2 is None:
                        acc.add_(prob)
                    else:
                        delta = prob - acc
                        acc.add_(delta, alpha=1.0 / n)
                        m2.add_(delta.mul_(prob - acc))
                del out

        assert acc is not None  # at least the identity flip ran
        if m2 is None:
            return _like_input(acc.div_(n), inputs)
        return {"mean": _like_input(acc, inputs), "std": _like_input(m2.div_(n).sqrt_(), inputs)}


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def _main_output(out: Any) -> torch.Tensor:
    """The main head of a network output: tensor as is, first element of a tuple/list (deep supervision)."""
    if isinstance(out, torch.Tensor):
        return out.as_tensor() if isinstance(out, MetaTensor) else out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return _main_output(out[0])
    raise TypeError(f"FlipTTAInferer expects the network to return a tensor (B, C, *spatial), got {type(out)}.")


def _like_input(t: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Carry the input's metadata (affine, applied operations) over, as MONAI's sliding window does."""
    if isinstance(inputs, MetaTensor):
        meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False)
        return convert_to_dst_type(t, meta, device=t.device)[0]
    return t


# --------------------------------------------------------------------------------------------------
# Probabilities -> labels
# --------------------------------------------------------------------------------------------------


def _scheme_pairs(scheme: str) -> tuple[list[int], list[int]]:
    """(internal labels, dataset labels) for ``scheme``; ``"internal"`` is the identity."""
    if scheme == "internal":
        return [], []
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}; expected 'internal' or one of {sorted(LABEL_SCHEMES)}")
    dataset_to_internal = LABEL_SCHEMES[scheme]
    internal = sorted(dataset_to_internal.values())
    inverse = {v: k for k, v in dataset_to_internal.items()}
    return internal, [inverse[i] for i in internal]


def labels_to_scheme(labels: NdarrayOrTensor, scheme: str = "internal") -> NdarrayOrTensor:
    """Map an internal label map (0 bg, 1 NCR, 2 ED, 3 ET) onto a dataset's values (``LABEL_SCHEMES``)."""
    orig, target = _scheme_pairs(scheme)
    if not orig:
        return labels
    dtype = labels.dtype
    # MONAI's MapLabelValue picks its torch backend (device-preserving) when given a torch dtype
    return MapLabelValue(orig, target, dtype=dtype)(labels)


def regions_to_labels(
    probs: NdarrayOrTensor,
    wt_threshold: float = 0.45,
    tc_threshold: float = 0.40,
    et_threshold: float = 0.45,
    scheme: str = "internal",
    dtype: torch.dtype | np.dtype | None = None,
) -> NdarrayOrTensor:
    """Turn region probabilities ``(3, *spatial)`` (WT, TC, ET order) into a label map ``(1, *spatial)``.

    Rule of METHODS.md M4: background if p(WT) < ``wt_threshold``; else ED if p(TC) < ``tc_threshold``;
    else NCR if p(ET) < ``et_threshold``; else ET. The result is nested by construction (ET inside TC
    inside WT) even when the three sigmoid maps are not. ``dtype`` defaults to the input's dtype (as
    MONAI's ``AsDiscrete``), so nearest-neighbour ``Invertd`` and ``SaveImaged(output_dtype=...)`` work.
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
    probs: NdarrayOrTensor, scheme: str = "internal", dtype: torch.dtype | np.dtype | None = None
) -> NdarrayOrTensor:
    """Argmax of class probabilities/logits ``(4, *spatial)`` (internal class order) -> label map ``(1, *spatial)``."""
    p, *_ = convert_data_type(probs, torch.Tensor)
    labels = torch.argmax(p, dim=0, keepdim=True)
    out, *_ = convert_to_dst_type(labels, probs, dtype=dtype or probs.dtype)
    return labels_to_scheme(out, scheme)


# --------------------------------------------------------------------------------------------------
# Post-processing on internal label maps
# --------------------------------------------------------------------------------------------------


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    """scipy structuring element; ``None`` = full connectivity (26 in 3-D), as MONAI's connected-component tools."""
    return ndimage.generate_binary_structure(ndim, ndim if connectivity is None else connectivity)


def _components(mask: np.ndarray, connectivity: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Label connected components of a spatial boolean mask; return (component map, voxel count per id)."""
    cc, n = ndimage.label(mask, structure=_structure(mask.ndim, connectivity))
    return cc, np.bincount(cc.ravel(), minlength=n + 1)


def _bbox(mask: np.ndarray | torch.Tensor, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of a spatial boolean mask grown by ``margin`` (clipped), or ``None`` if empty.

    Tumours fill a few percent of a 240 x 240 x 155 volume: labelling and morphology on the box
    instead of the whole volume is what keeps post-processing well under a second per case.
    """
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        if isinstance(mask, torch.Tensor) and mask.device.type != "cpu":
            idx = torch.nonzero(mask.amax(dim=other)).flatten().tolist()
        else:  # numpy's any() is ~4x faster than torch's amax on a CPU volume
            idx = np.flatnonzero(np.asarray(mask).any(axis=other))
        if len(idx) == 0:
            return None
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(box)


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


def small_et_components_to_ncr(
    labels: NdarrayOrTensor,
    et_prob: NdarrayOrTensor,
    min_size: int = 16,
    prob_threshold: float = 0.9,
    connectivity: int | None = None,
) -> NdarrayOrTensor:
    """ET components with fewer than ``min_size`` voxels *and* mean ET probability < ``prob_threshold`` become NCR.

    METHODS.md M4 (16 voxels in one place of the paper, 73 in another). ``et_prob`` is the ET
    probability map, ``(1, *spatial)`` or ``(*spatial)``. MONAI has no per-component statistic, hence
    ``scipy.ndimage.label`` plus a weighted ``bincount``.
    """
    lab = _label_numpy(labels)
    et = lab == ET
    box = _bbox(et)
    if box is None:
        return labels
    et = et[box]
    prob = convert_data_type(et_prob, np.ndarray)[0].reshape(lab.shape)[box]
    cc, sizes = _components(et, connectivity)
    mean_prob = np.bincount(cc.ravel(), weights=prob.ravel(), minlength=sizes.size) / np.maximum(sizes, 1)
    demote = (sizes < min_size) & (mean_prob < prob_threshold)
    demote[0] = False  # id 0 is "not ET"
    if not demote.any():
        return labels
    return _assign(labels, box, demote[cc], NCR)


def small_et_volume_to_ncr(labels: NdarrayOrTensor, min_volume: int = 200) -> NdarrayOrTensor:
    """If the whole case has fewer than ``min_volume`` ET voxels (but some), all of them become NCR.

    Rationale (METHODS.md M4): on a case without ET an empty ET prediction scores Dice 1 and a few
    false voxels score 0. The threshold is ours to choose; tune it on the validation folds.
    """
    lab = _label_numpy(labels)
    et = lab == ET
    count = int(et.sum())
    if count == 0 or count >= min_volume:
        return labels
    box = tuple(slice(None) for _ in et.shape)
    return _assign(labels, box, et, NCR)


def remove_small_tumour_components(
    labels: NdarrayOrTensor, min_size: int = 100, connectivity: int | None = None
) -> NdarrayOrTensor:
    """Remove whole-tumour components (all non-background labels together) with fewer than ``min_size`` voxels.

    Why not MONAI's ``RemoveSmallObjects(independent_channels=False)``, which does the same
    computation: it calls ``skimage.morphology.remove_small_objects(ar, min_size)``, whose
    ``min_size`` is deprecated since scikit-image 0.26 and, through the deprecation shim, now also
    removes objects of exactly ``min_size`` voxels (measured here), with a warning on every call.
    The threshold's meaning would depend on the installed scikit-image; ``scipy.ndimage.label``
    keeps it fixed: components strictly smaller than ``min_size`` go.
    """
    lab = _label_numpy(labels)
    tumour = lab != BACKGROUND
    box = _bbox(tumour)
    if box is None:
        return labels
    cc, sizes = _components(tumour[box], connectivity)
    small = sizes < min_size
    small[0] = False
    if not small.any():
        return labels
    return _assign(labels, box, small[cc], BACKGROUND)


def binary_dilation(mask: torch.Tensor, radius: int = 1, spatial_dims: int | None = None) -> torch.Tensor:
    """Dilation of a boolean tensor ``(..., *spatial)`` by a cube of side ``2 * radius + 1``; outside counts as 0.

    Same result as MONAI's ``monai.transforms.utils_morphological_ops.dilate`` (tested), which
    convolves float masks with a ones kernel: the cube is separable, so shifted logical ORs along
    each axis do it on the tensor's device with about 1/10 of the arithmetic.
    """
    return _separable_morphology(mask, radius, spatial_dims, torch.Tensor.logical_or_)


def binary_erosion(mask: torch.Tensor, radius: int = 1, spatial_dims: int | None = None) -> torch.Tensor:
    """Erosion of a boolean tensor by a cube of side ``2 * radius + 1``; outside counts as 1 (MONAI's ``erode``)."""
    return _separable_morphology(mask, radius, spatial_dims, torch.Tensor.logical_and_)


def _separable_morphology(mask: torch.Tensor, radius: int, spatial_dims: int | None, op: Callable) -> torch.Tensor:
    spatial_dims = mask.ndim if spatial_dims is None else spatial_dims
    out = mask.to(torch.bool, copy=True)  # never modify the caller's mask in place
    for dim in range(mask.ndim - spatial_dims, mask.ndim):
        n = out.shape[dim]
        if n < 2:
            continue
        for _ in range(radius):
            prev = out.clone()
            # each voxel combines with its two neighbours along ``dim``; the missing neighbour at the
            # border is the padding value, which leaves the voxel unchanged, so it is simply skipped
            op(out.narrow(dim, 1, n - 1), prev.narrow(dim, 0, n - 1))
            op(out.narrow(dim, 0, n - 1), prev.narrow(dim, 1, n - 1))
    return out


def close_tumour_regions(labels: NdarrayOrTensor, filter_size: int = 3) -> NdarrayOrTensor:
    """Morphological closing (dilation then erosion by a cube of side ``filter_size``) of each nested region.

    The WT, TC and ET masks are closed separately and recombined with the region rule, so the result
    stays nested (closing is monotone: ET inside TC inside WT) and never shrinks a region (closing
    is extensive). A background hole inside the tumour takes the innermost region that closes over
    it. Runs on the label map's device, on the tumour's bounding box grown by ``filter_size - 1``
    (twice the radius: enough that the box border sees the same neighbourhood as the full volume).
    """
    if filter_size < 1 or filter_size % 2 == 0:
        raise ValueError(f"filter_size must be a positive odd number, got {filter_size}.")
    lab_t, *_ = convert_data_type(labels, torch.Tensor)
    if lab_t.shape[0] != 1:
        raise ValueError(f"expected a label map with one channel (1, *spatial), got shape {tuple(lab_t.shape)}")
    lab_t = lab_t.as_tensor() if isinstance(lab_t, MetaTensor) else lab_t
    radius = filter_size // 2
    box = _bbox(lab_t[0] != BACKGROUND, margin=2 * radius)
    if box is None or radius == 0:
        return labels
    crop = lab_t[0][box]
    regions = torch.stack([crop != BACKGROUND, (crop == NCR) | (crop == ET), crop == ET])
    closed = binary_erosion(binary_dilation(regions, radius, crop.ndim), radius, crop.ndim)
    wt, tc, et = closed[0], closed[1], closed[2]
    new = torch.full_like(crop, BACKGROUND)
    new[wt] = ED
    new[wt & tc] = NCR
    new[wt & tc & et] = ET
    out = lab_t.clone()
    out[(0, *box)] = new
    return convert_to_dst_type(out, labels, dtype=labels.dtype)[0]


# --------------------------------------------------------------------------------------------------
# Dictionary transforms (what configs use)
# --------------------------------------------------------------------------------------------------


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
        scheme: str = "internal",
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _scheme_pairs(scheme)  # fail at construction on a typo, not on the first case
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
        scheme: str = "internal",
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _scheme_pairs(scheme)
        self.scheme = scheme
        self.output_keys = _output_keys(self.keys, output_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert each key's class probabilities into a label map."""
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = classes_to_labels(d[key], scheme=self.scheme)
        return d


class LabelsToSchemed(MapTransform):
    """Dictionary wrapper of :func:`labels_to_scheme`: internal labels -> a dataset's label values (last step)."""

    def __init__(self, keys: KeysCollection, scheme: str = "brats2021", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        _scheme_pairs(scheme)
        self.scheme = scheme

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Map each key's internal labels onto the scheme."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = labels_to_scheme(d[key], self.scheme)
        return d


class SmallETComponentsToNCRd(MapTransform):
    """Dictionary wrapper of :func:`small_et_components_to_ncr`.

    ``keys``: internal label maps; ``prob_key``: the probability maps the labels came from;
    ``et_channel``: the ET channel in them (2 for region models WT/TC/ET, 3 for class models).
    ``enabled=False`` makes it a no-op so configs can switch it with one key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str = "pred",
        et_channel: int = REGION_NAMES.index("ET"),
        min_size: int = 16,
        prob_threshold: float = 0.9,
        connectivity: int | None = None,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prob_key = prob_key
        self.et_channel = et_channel
        self.min_size = min_size
        self.prob_threshold = prob_threshold
        self.connectivity = connectivity
        self.enabled = enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Demote small, low-confidence ET components to NCR."""
        d = dict(data)
        if not self.enabled:
            return d
        et_prob = d[self.prob_key][self.et_channel]
        for key in self.key_iterator(d):
            d[key] = small_et_components_to_ncr(d[key], et_prob, self.min_size, self.prob_threshold, self.connectivity)
        return d


class SmallETVolumeToNCRd(MapTransform):
    """Dictionary wrapper of :func:`small_et_volume_to_ncr` (switchable with ``enabled``)."""

    def __init__(
        self, keys: KeysCollection, min_volume: int = 200, enabled: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_volume = min_volume
        self.enabled = enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Demote all ET to NCR when the case's total ET volume is below ``min_volume``."""
        d = dict(data)
        if self.enabled:
            for key in self.key_iterator(d):
                d[key] = small_et_volume_to_ncr(d[key], self.min_volume)
        return d


class RemoveSmallTumourComponentsd(MapTransform):
    """Dictionary wrapper of :func:`remove_small_tumour_components` (switchable with ``enabled``)."""

    def __init__(
        self,
        keys: KeysCollection,
        min_size: int = 100,
        connectivity: int | None = None,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = min_size
        self.connectivity = connectivity
        self.enabled = enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Remove whole-tumour components smaller than ``min_size`` voxels."""
        d = dict(data)
        if self.enabled:
            for key in self.key_iterator(d):
                d[key] = remove_small_tumour_components(d[key], self.min_size, self.connectivity)
        return d


class CloseTumourRegionsd(MapTransform):
    """Dictionary wrapper of :func:`close_tumour_regions` (switchable with ``enabled``, off by default in configs)."""

    def __init__(
        self, keys: KeysCollection, filter_size: int = 3, enabled: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.filter_size = filter_size
        self.enabled = enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Close each nested tumour region and relabel."""
        d = dict(data)
        if self.enabled:
            for key in self.key_iterator(d):
                d[key] = close_tumour_regions(d[key], self.filter_size)
        return d


def _output_keys(keys: tuple[Hashable, ...], output_keys: KeysCollection | None) -> tuple[Hashable, ...]:
    if output_keys is None:
        return keys
    out = (output_keys,) if isinstance(output_keys, (str, int)) else tuple(output_keys)
    if len(out) != len(keys):
        raise ValueError(f"output_keys {out} must match keys {keys} one to one.")
    return out
