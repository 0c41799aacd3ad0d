"""M2 as one network: the slice gate, then the segmenter on the slices it passes (method M2, ``docs/methods.md``).

The paper's dual model is a ResNet-50 classifier that decides whether a slice holds tumour and a
ResUNet that segments only the slices it calls positive; the others get an empty mask. Here both
are one ``torch.nn.Module``, so one ``network_def`` and one ``model.pt`` hold the whole model, as a
MONAI user expects of a bundle: ``configs/inference.yaml``, MONAI Label and the model zoo's
``ckpt_export`` load and run it as any other network, and the slice inferer, test-time flips and
post-processing see ordinary segmenter logits.

Why not MONAI's: MONAI has no network that runs a classifier first and another network on the
samples it selects (``SliceInferer`` runs one network on every slice).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import instantiate
from torch import nn


def _module(part: nn.Module | Mapping[str, Any] | Callable[[], nn.Module], what: str) -> nn.Module:
    """A sub-network given as a module, a recorded spec (``{"_target_": ...}``) or a callable-mode constructor."""
    if isinstance(part, nn.Module):
        return part
    if isinstance(part, Mapping):
        arguments = {k: v for k, v in part.items() if k not in ("_target_", "_mode_")}
        built = instantiate(str(part["_target_"]), "default", **arguments)
    elif callable(part):
        built = part()
    else:
        raise TypeError(f"GatedSegmenter: {what} is not a network, a network spec or a network constructor")
    if not isinstance(built, nn.Module):
        raise TypeError(f"GatedSegmenter: {what} does not build a torch.nn.Module")
    return built


class GatedSegmenter(nn.Module):
    """A 2-D segmenter behind a slice gate: ``(N, C, H, W)`` slices -> ``(N, out_channels, H, W)`` logits.

    In eval mode (inference, validation) the gate classifies every slice; the segmenter runs on the
    slices whose ``P(tumour) >= threshold`` only, and every other slice gets "empty" logits: each channel
    ``empty_logit`` (probability ~0 after a sigmoid) and, for softmax models, ``background_channel`` set
    to ``-empty_logit`` (the argmax is background). In training mode the segmenter alone runs (the paper
    trains the two models apart; the gate is trained by ``configs/train_gate.yaml``). The gate is frozen:
    its weights take no gradient and it always runs in eval mode (dropout off, batch-norm statistics
    fixed), so training or fine-tuning this module trains the segmenter only.

    Counters ``slices_total`` / ``slices_segmented`` (since :meth:`reset_counters`) say what share of
    the segmenter's work the gate took over (:class:`bundle.inference.gate.GateSliceLog` logs them).

    Args:
        segmenter: the 2-D segmenter, as a module, a spec or a callable-mode constructor.
        gate: the slice classifier (``bundle.networks.SliceGateClassifier``), likewise; its logits
            ``(N, 2)`` (softmax: no tumour, tumour) or ``(N, 1)`` (sigmoid).
        threshold: the probability of tumour from which a slice is segmented (0.5: the softmax's argmax).
        gate_size: the in-plane size the gate takes; slices of another size are resized bilinearly
            (``None``: as they come).
        out_channels: the segmenter's output channels (the empty logits of a batch the gate rejects whole).
        empty_logit: the logit written for a rejected slice.
        background_channel: for softmax segmenters, the background channel; ``None`` for sigmoid ones.
    """

    def __init__(
        self,
        segmenter: nn.Module | Mapping[str, Any] | Callable[[], nn.Module],
        gate: nn.Module | Mapping[str, Any] | Callable[[], nn.Module],
        threshold: float = 0.5,
        gate_size: Sequence[int] | None = None,
        out_channels: int = 1,
        empty_logit: float = -20.0,
        background_channel: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"GatedSegmenter: threshold {threshold!r} is not a probability (a number in [0, 1])")
        self.segmenter = _module(segmenter, "segmenter")
        self.gate = _module(gate, "gate")
        for parameter in self.gate.parameters():
            parameter.requires_grad_(False)
        self.gate.eval()
        self.threshold = float(threshold)
        self.gate_size: list[int] = [int(s) for s in gate_size] if gate_size is not None else []
        self.out_channels = int(out_channels)
        self.empty_logit = float(empty_logit)
        self.background_channel = -1 if background_channel is None else int(background_channel)
        self.slices_total = 0
        self.slices_segmented = 0

    def train(self, mode: bool = True) -> GatedSegmenter:
        """Set the segmenter's mode; the gate stays in eval mode (it is frozen)."""
        super().train(mode)
        self.gate.eval()
        return self

    def reset_counters(self) -> None:
        """Zero ``slices_total`` and ``slices_segmented``."""
        self.slices_total = 0
        self.slices_segmented = 0

    def tumour_probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(tumour) ``(N,)`` of slices ``(N, C, H, W)`` by the gate, at its size."""
        if len(self.gate_size) == 2 and (x.shape[2] != self.gate_size[0] or x.shape[3] != self.gate_size[1]):
            x = F.interpolate(x, size=(self.gate_size[0], self.gate_size[1]), mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = self.gate(x).float()
        logits = logits.reshape(logits.shape[0], -1)
        if logits.shape[1] == 2:
            return torch.softmax(logits, dim=1)[:, 1]
        return torch.sigmoid(logits[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmenter logits of the slices the gate passes, empty logits elsewhere (eval); the segmenter's (training)."""
        if self.training:
            return self.segmenter(x)
        positive = self.tumour_probability(x) >= self.threshold
        n_positive = int(positive.sum())
        self.slices_total += int(x.shape[0])
        self.slices_segmented += n_positive
        if n_positive == x.shape[0]:
            return self.segmenter(x)
        out = torch.full(
            (x.shape[0], self.out_channels, x.shape[2], x.shape[3]), self.empty_logit, dtype=x.dtype, device=x.device
        )
        if self.background_channel >= 0:
            out[:, self.background_channel] = -self.empty_logit
        if n_positive > 0:
            segmented = self.segmenter(x[positive])
            out = out.to(segmented.dtype)
            out[positive] = segmented
        return out
