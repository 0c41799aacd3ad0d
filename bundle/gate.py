"""M2's tumour-presence gate: a 2-D slice classifier decides which slices the segmenter sees.

The classifier is :class:`bundle.networks.SliceGateClassifier` (ResNet-50, the paper's two-layer
head, softmax over no tumour / tumour), trained by ``configs/train_gate.yaml`` on slice labels
derived from the masks (:func:`tumour_class`), from scratch or from ResNet-50 weights the user
gives. At inference :class:`GatedSliceInferer` runs it on every slice and the segmenter only on the
slices it calls positive; the others get an empty mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bundle.checkpoints import load_model
from bundle.slices import ResizedSliceInferer

__all__ = ["GatedSliceInferer", "load_gate", "tumour_class", "tumour_present", "tumour_probability"]


def tumour_present(label: torch.Tensor) -> torch.Tensor:
    """Slice label for the gate: ``1.0`` if any voxel of the channel-first mask is tumour (non-zero), shape ``(1,)``."""
    return torch.as_tensor(label).ne(0).any().float().reshape(1)


def tumour_class(label: torch.Tensor) -> torch.Tensor:
    """The gate's two-class target ``(no tumour, tumour)``, one-hot ``(2,)``, for its softmax and cross-entropy."""
    present = tumour_present(label)
    return torch.cat([1.0 - present, present])


def tumour_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(tumour) ``(N,)`` from the gate's logits: softmax over two classes, or the sigmoid of one logit."""
    logits = logits.float().reshape(logits.shape[0], -1)
    return torch.softmax(logits, dim=1)[:, 1] if logits.shape[1] == 2 else torch.sigmoid(logits[:, 0])


def load_gate(checkpoint: str, device: torch.device | str = "cpu") -> nn.Module:
    """The gate classifier ``checkpoint`` records (``gate.pt`` of configs/train_gate.yaml), in eval mode."""
    return load_model(checkpoint, device)


class GatedSliceInferer(ResizedSliceInferer):
    """Slice-by-slice inference that runs the segmenter only on slices the gate calls tumour-bearing.

    For every batch of slices (``sw_batch_size`` at a time) ``gate`` gives one logit per slice;
    slices with ``sigmoid(logit) < threshold`` get an "empty" output without running the
    segmenter: every channel set to ``empty_logit`` (a very negative logit: probability ~0 after a
    sigmoid), and for softmax models channel ``background_channel`` set to ``-empty_logit`` so the
    softmax is background. Positive slices are resized, segmented and resized back as in
    :class:`~bundle.slices.ResizedSliceInferer`. The gate sees the slice at ``gate_size``
    (default: ``model_size``).

    Why a subclass: MONAI's ``SliceInferer`` has no notion of skipping slices; the gate must decide
    before the network runs, inside the per-slice wrapper.

    Counters ``slices_total`` / ``slices_segmented`` (since the last :meth:`reset_counters`) tell how
    much segmenter work the gate saved.

    Args:
        gate: classifier ``(N, C, H, W) -> (N, 1)`` logits.
        threshold: probability at or above which a slice is segmented.
        model_size: in-plane size of the segmenter (``None``: native size).
        gate_size: in-plane size of the classifier (``None``: ``model_size``).
        out_channels: segmenter output channels (needed to build empty outputs when no slice of a
            batch is positive).
        empty_logit: logit written for gated-out slices.
        background_channel: for softmax outputs, the channel set to ``-empty_logit``; ``None`` for sigmoid.
        args, kwargs: ``ResizedSliceInferer`` / ``SliceInferer`` arguments (``spatial_dim``,
            ``sw_batch_size``, ...).
    """

    def __init__(
        self,
        gate: nn.Module,
        threshold: float = 0.5,
        model_size: Sequence[int] | None = None,
        gate_size: Sequence[int] | None = None,
        out_channels: int = 1,
        empty_logit: float = -20.0,
        background_channel: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_size, *args, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.gate = gate
        self.threshold = float(threshold)
        self.gate_size = tuple(int(s) for s in gate_size) if gate_size is not None else self.model_size
        self.out_channels = int(out_channels)
        self.empty_logit = float(empty_logit)
        self.background_channel = background_channel
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero ``slices_total`` and ``slices_segmented``."""
        self.slices_total = 0
        self.slices_segmented = 0

    @property
    def fraction_segmented(self) -> float:
        """Fraction of slices the segmenter ran on since the last reset (1.0 before any slice)."""
        return self.slices_segmented / self.slices_total if self.slices_total else 1.0

    def gate_positive(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``(N,)``: which slices of ``(N, C, H, W)`` the gate calls tumour-bearing."""
        was_training = self.gate.training
        self.gate.eval()
        try:
            with torch.no_grad():
                size = self.gate_size if self.gate_size is not None else x.shape[2:]
                logits = self.gate(self.resize(x, size))
        finally:
            self.gate.train(was_training)
        return tumour_probability(logits) >= self.threshold

    def empty_output(self, n: int, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Logits of ``n`` tumour-free slices ``(n, out_channels, *size)``."""
        out = torch.full((n, self.out_channels, *size), self.empty_logit, dtype=like.dtype, device=like.device)
        if self.background_channel is not None:
            out[:, self.background_channel] = -self.empty_logit
        return out

    def run_network(self, network: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Gate the slices ``(N, C, H, W)``, segment only the positive ones, fill the rest with empty logits."""
        positive = self.gate_positive(x)
        n_pos = int(positive.sum())
        self.slices_total += x.shape[0]
        self.slices_segmented += n_pos
        if n_pos == x.shape[0]:
            return super().run_network(network, x, *args, **kwargs)
        out = self.empty_output(x.shape[0], x.shape[2:], x)
        if n_pos:
            seg = super().run_network(network, x[positive], *args, **kwargs)
            if not isinstance(seg, torch.Tensor):
                raise TypeError("GatedSliceInferer supports networks returning one tensor (eval mode)")
            if seg.shape[1] != self.out_channels:
                raise ValueError(f"out_channels={self.out_channels} but the segmenter returned {seg.shape[1]} channels")
            out = out.to(seg.dtype)
            out[positive] = seg
        return out
