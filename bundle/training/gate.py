"""M2's tumour-presence gate, training side: the slice labels derived from the masks.

The classifier (:class:`bundle.networks.SliceGateClassifier`) is trained by ``configs/train_gate.yaml``
on :func:`tumour_class` of each slice's label; inference runs it in :mod:`bundle.inference.gate`.
"""

from __future__ import annotations

import torch


def tumour_present(label: torch.Tensor) -> torch.Tensor:
    """Slice label for the gate: ``1.0`` if any voxel of the channel-first mask is tumour (non-zero), shape ``(1,)``."""
    return torch.as_tensor(label).ne(0).any().float().reshape(1)


def tumour_class(label: torch.Tensor) -> torch.Tensor:
    """The gate's two-class target ``(no tumour, tumour)``, one-hot ``(2,)``, for its softmax and cross-entropy."""
    present = tumour_present(label)
    return torch.cat([1.0 - present, present])
