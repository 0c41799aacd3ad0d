"""Registered blocks and networks of the bundle; configs use ``_target_: bundle.networks.<Name>``."""

from bundle.networks.blocks import (
    ContextExtraction,
    LargeKernelAttention,
    ModalityAwareStem,
    ResidualBlock,
    ResSEBlock,
    UpResidualBlock,
)
from bundle.networks.classifier import SliceGateClassifier, adapt_first_conv, load_pretrained_backbone
from bundle.networks.gated import GatedSegmenter
from bundle.networks.nets import M4UNet, ResSELKAUNet, ResUNet

__all__ = [
    "ContextExtraction",
    "GatedSegmenter",
    "LargeKernelAttention",
    "M4UNet",
    "ModalityAwareStem",
    "ResSEBlock",
    "ResSELKAUNet",
    "ResUNet",
    "ResidualBlock",
    "SliceGateClassifier",
    "UpResidualBlock",
    "adapt_first_conv",
    "load_pretrained_backbone",
]
