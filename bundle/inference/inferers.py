"""Inferers the bundle adds around MONAI's: flip test-time augmentation, and a resizing slice-by-slice inferer.

:class:`FlipTTAInferer` runs a ``base_inferer`` (MONAI's ``SlidingWindowInferer`` for 3-D models,
the slice-by-slice :class:`ResizedSliceInferer` for 2-D ones; ``configs/inference.yaml`` defines which)
on every flip combination of the chosen spatial axes, un-flips each output, turns it into probabilities
and averages them (docs/methods.md M4, docs/reference/inference.md). Probabilities to labels:
:mod:`bundle.inference.to_labels`; post-processing of the labels: :mod:`bundle.inference.postprocessing`.

Input and output are batched: ``(B, C, *spatial)``; the output is float32 on the base inferer's
output device, a MetaTensor carrying the input's metadata when the input is one.

:class:`ResizedSliceInferer` is MONAI's ``SliceInferer`` that resizes each slice to the size the network
was trained on and the output back (``SliceInferer`` tiles slices at native size).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type
from torch.nn import functional as F

from bundle.plan.checkpoints import ModelEnsemble


class ResizedSliceInferer(SliceInferer):
    """MONAI's ``SliceInferer`` that resizes every slice to ``model_size`` and the output back.

    2-D methods train on slices resized to a fixed size (M1 240 x 240, M3 128 x 128); at
    validation and inference the cropped volume keeps its own in-plane size, so each slice must be
    resized to the model's size before the network and the logits resized back (bilinear, like
    MONAI's ``Resized`` in training, ``align_corners=False``). MONAI's ``SliceInferer`` only tiles
    slices at their native size with a sliding window, which would show the network a different
    scale than in training. The default ``roi_size=(-1, -1)`` passes whole slices (``sw_batch_size``
    slices per network call); ``model_size=None`` disables resizing.

    Args:
        model_size: in-plane size the network expects, or ``None``.
        spatial_dim: slice axis (2 = axial for RAS volumes ``(H, W, D)``).
        roi_size: window over the slice before resizing; ``(-1, -1)`` = the whole slice.
        sw_batch_size: slices per network call.
        args, kwargs: the rest of ``SliceInferer`` / ``SlidingWindowInferer``'s arguments.
    """

    def __init__(
        self,
        model_size: Sequence[int] | None = None,
        spatial_dim: int = 2,
        roi_size: Sequence[int] = (-1, -1),
        sw_batch_size: int = 16,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_dim, roi_size, sw_batch_size, *args, **kwargs)
        self.model_size = None if model_size is None else tuple(int(s) for s in model_size)

    def resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of ``(N, C, H, W)`` to ``size`` (a no-op when already that size)."""
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

    def run_network(self, network: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run ``network`` on slices ``(N, C, H, W)`` at ``model_size``; return outputs at ``(H, W)``."""
        if self.model_size is None:
            return network(x, *args, **kwargs)
        size = x.shape[2:]
        out = network(self.resize(x, self.model_size), *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.resize(out, size)
        if isinstance(out, Mapping):
            return {k: self.resize(v, size) for k, v in out.items()}
        return tuple(self.resize(o, size) for o in out)

    def network_wrapper(
        self,
        network: Callable[..., Any],
        x: torch.Tensor,
        condition: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Squeeze the slice axis, resize, run, resize back, unsqueeze (see ``SliceInferer``)."""
        if condition is not None:
            raise NotImplementedError("ResizedSliceInferer does not support a condition input")
        resized = lambda s, *a, **k: self.run_network(network, s, *a, **k)  # noqa: E731
        return super().network_wrapper(resized, x, None, *args, **kwargs)


#: What the averaged outputs are: sigmoid (region and binary models), softmax (class models) or raw.
ACTIVATIONS = ("sigmoid", "softmax", "none")


def flip_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All ``2 ** len(axes)`` subsets of ``axes`` (the identity ``()`` first), one per flip combination."""
    axes = tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class FlipTTAInferer(Inferer):
    """``base_inferer`` averaged over all flip combinations of the chosen spatial axes.

    For every subset of ``flip_axes`` (8 in 3-D, 4 in 2-D) the input is flipped, passed through
    ``base_inferer`` (``configs/inference.yaml``: MONAI's :class:`~monai.inferers.SlidingWindowInferer`
    with the training patch, Gaussian weighting and 50 % overlap for 3-D models, docs/methods.md M4),
    the output is flipped back, turned into probabilities (``activation``) and averaged. Averaging
    *probabilities* rather than logits is what the paper describes; with ``activation="none"`` raw
    outputs are averaged. ``tta=False`` is one un-flipped pass through the same code.

    The window (size, overlap, blending, devices, batch) is the base inferer's alone: this class
    adds flips, activation, averaging and autocast, nothing that configures the windows twice.

    Why not MONAI's :class:`monai.data.TestTimeAugmentation`: it is built for *random* invertible
    transforms on dictionaries; each of its passes re-runs the whole transform chain plus a full
    inverse on the CPU, one sample at a time, and it returns mode/mean/std over random draws.
    Here the augmentation set is the fixed, exhaustive set of flips, a flip is its own inverse on
    the tensor, and the flipped copies can share one sliding-window pass on the GPU.

    Flip batching: ``flip_batch_size`` flipped copies are concatenated along the batch dimension and
    run through one pass of the base inferer; a ``SlidingWindowInferer`` (``SliceInferer`` included)
    gets its ``sw_batch_size`` multiplied by the same factor, so each network call sees the same
    window from several flips (fewer, larger calls). Peak memory grows with the group: each copy
    needs one input-sized and one output-sized buffer. By default (``None``) all flips share one
    pass when the windows run on CUDA, and the flips run one by one on the CPU, where larger batches
    do not run faster and the extra volume-sized copies cost memory bandwidth (measured: docs/benchmarks/inference.md).

    Memory: a running sum (or, with ``return_std``, Welford's running mean and sum of squared
    deviations) are the only volume-sized buffers kept across groups; each flip's input copy,
    stitched output and probabilities are released before the next pass starts. The peak is the
    network's activations for ``sw_batch_size`` windows plus a few volume-sized buffers, so 8 flips
    need about as much memory as one pass (measured with ``scripts/benchmark_inference.py``,
    docs/benchmarks/inference.md).

    2-D models run slice by slice over a 3-D volume inside a ``SliceInferer``; by default only its
    in-plane axes are flipped (4 flips), since flipping the slice axis only reorders slices for a
    2-D model. A 2-D input ``(B, C, H, W)`` also gets 4 flips.

    Args:
        base_inferer: the MONAI :class:`~monai.inferers.Inferer` each flip runs through.
        activation: ``"sigmoid"`` (region and binary models), ``"softmax"`` (class models, over
            channels) or ``"none"``.
        tta: ``False`` runs a single un-flipped pass.
        flip_axes: spatial axes to flip (0-based, excluding batch and channel). ``None``: every
            spatial axis, except the slice axis of a ``SliceInferer``.
        flip_batch_size: how many flipped copies share one pass (``None``: all on CUDA, 1 on CPU).
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
        base_inferer: Inferer,
        activation: str | None = "sigmoid",
        tta: bool = True,
        flip_axes: Sequence[int] | None = None,
        flip_batch_size: int | None = None,
        amp: bool = True,
        amp_dtype: torch.dtype | str | None = None,
        return_std: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_inferer, Inferer):
            raise TypeError(f"base_inferer must be a MONAI Inferer, got {type(base_inferer).__name__}.")
        activation = "none" if activation is None else str(activation).lower()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
        if flip_batch_size is not None and flip_batch_size < 1:
            raise ValueError(f"flip_batch_size must be >= 1 or None, got {flip_batch_size}.")
        if isinstance(amp_dtype, str):
            amp_dtype = getattr(torch, amp_dtype)
        self.base_inferer = base_inferer
        self.activation = activation
        self.tta = tta
        self.flip_axes = None if flip_axes is None else tuple(int(a) for a in flip_axes)
        self.flip_batch_size = flip_batch_size
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.return_std = return_std
        self._scaled_inferers: dict[int, Inferer] = {}

    def network_device_type(self, inputs: torch.Tensor) -> str:
        """Where the network runs: the base inferer's ``sw_device``, else the input's device (``"cpu"``, ``"cuda"``)."""
        sw_device = getattr(self.base_inferer, "sw_device", None)
        return torch.device(sw_device).type if sw_device is not None else inputs.device.type

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
        return 1 << 30 if self.network_device_type(inputs) == "cuda" else 1

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
        device_type = self.network_device_type(inputs)
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
                        del delta
                    # released before the next pass, so that pass's network activations do not
                    # stack on this flip's volume-sized buffers (docs/benchmarks/inference.md, peak memory)
                    del prob
                del out

        assert acc is not None  # at least the identity flip ran
        if m2 is None:
            return _like_input(acc.div_(n), inputs)
        return {"mean": _like_input(acc, inputs), "std": _like_input(m2.div_(n).sqrt_(), inputs)}


class EnsembleInferer(Inferer):
    """``inferer`` (the recipe's :class:`FlipTTAInferer`) run by each network of a :class:`ModelEnsemble` in
    turn, the probabilities averaged (nnU-Net's fold ensemble): before thresholds and post-processing.

    Memory: one case's probabilities per model at a time. The first member's output becomes a running
    sum that every further member's output is added to and then released, so the peak is two
    volume-sized outputs whatever the number of models. MONAI's ``EnsembleEvaluator`` + ``MeanEnsembled``
    keep every model's prediction of the case under its own key until they are averaged (N outputs).
    A plain network (one checkpoint) goes through ``inferer`` unchanged, so an ensemble of one gives
    that checkpoint's own result.

    With ``inferer`` returning ``{"mean", "std"}`` (``save_uncertainty``), the std is over every flip of
    every model: from the running sums of the members' means and of their second moments
    (``std ** 2 + mean ** 2``), each member weighing as much as its flips.
    """

    def __init__(self, inferer: Inferer) -> None:
        super().__init__()
        self.inferer = inferer

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The mean (and std) of the members' outputs on ``inputs``; ``network`` itself if it is no ensemble."""
        if not isinstance(network, ModelEnsemble):
            return self.inferer(inputs, network, *args, **kwargs)
        members = list(network.members)
        if len(members) == 1:
            return self.inferer(inputs, members[0], *args, **kwargs)
        total: torch.Tensor | None = None
        second: torch.Tensor | None = None  # running sum of the members' second moments (with std)
        for member in members:
            out = self.inferer(inputs, member, *args, **kwargs)
            mean = out["mean"] if isinstance(out, Mapping) else out
            if isinstance(out, Mapping):
                moment = out["std"].square_().add_(mean.square())
                second = moment if second is None else second.add_(moment)
                del moment
            # the first output is the running sum (its own tensor); later ones are added and released
            total = mean if total is None else total.add_(mean)
            del out, mean
        assert total is not None
        total.div_(len(members))
        if second is None:
            return total
        std = second.div_(len(members)).sub_(total.square()).clamp_(min=0.0).sqrt_()
        return {"mean": total, "std": std}


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
