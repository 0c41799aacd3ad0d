"""The bundle's U-Nets (methods M1-M4 in ``docs/methods.md``).

Two deep-supervision contracts, both read by ``bundle.training.losses.StackedDeepSupervisionLoss`` (MONAI's
``DeepSupervisionLoss``):

* heads up-sampled (``ResUNet``, ``ResSELKAUNet``, MONAI's ``DynUNet``, and ``M4UNet`` with
  ``upsample_heads=True``): in training mode a network returns ONE tensor
  ``(B, 1 + deep_supr_num, C, *spatial)``: index 0 is the main output, then the auxiliary heads
  from the finest decoder level to the coarsest, each up-sampled to full resolution. One return
  type keeps these nets scriptable (``torch.jit.script``).
* heads at their own resolution (``M4UNet``, the default: M4 and nnU-Net): in training mode a
  list ``[main (B, C, *S), head_1 (B, C, *S / 2), head_2 (B, C, *S / 4), ...]``; the loss
  down-samples the labels to each head (nearest neighbour).

In eval mode, or without deep supervision, every net returns the main output ``(B, C, *spatial)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from monai.networks.nets import DynUNet
from torch import nn
from torch.nn import functional as F

from bundle.networks.blocks import (
    DEFAULT_ACT,
    DEFAULT_NORM,
    ActSpec,
    ContextExtraction,
    LargeKernelAttention,
    ModalityAwareStem,
    NormSpec,
    ResidualBlock,
    ResSEBlock,
    UpResidualBlock,
)

__all__ = ["M4UNet", "ResSELKAUNet", "ResUNet", "size_multiple"]

_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def size_multiple(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> list[int]:
    """Per axis, the product of a ``DynUNet``'s strides: every input size must be a multiple of it."""
    per_axis = [list(s) if isinstance(s, Sequence) else [s] * spatial_dims for s in strides]
    return [math.prod(int(level[axis]) for level in per_axis) for axis in range(spatial_dims)]


class _DeepSupervisedUNet(nn.Module):
    """Shared U-Net skeleton: encoder levels, bottleneck, decoder stages, main and auxiliary heads.

    Subclasses build the encoder levels (each returns the features kept as the skip of its level;
    the last level is the bottleneck level), the bottleneck module and ``UpResidualBlock`` stages.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        channels: Sequence[int],
        encoder: list[nn.Module],
        bottleneck: nn.Module,
        decoder: list[nn.Module],
        deep_supervision: bool,
        deep_supr_num: int,
    ) -> None:
        super().__init__()
        if spatial_dims not in _INTERPOLATION:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        n_stages = len(channels) - 1
        if deep_supervision and not 1 <= deep_supr_num <= n_stages - 1:
            raise ValueError(
                f"deep_supr_num must be between 1 and {n_stages - 1} for {len(channels)} levels, got {deep_supr_num}"
            )
        self.encoder = nn.ModuleList(encoder)
        self.bottleneck = bottleneck
        self.decoder = nn.ModuleList(decoder)
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, bias=True, conv_only=True)
        # auxiliary heads on decoder outputs, finest auxiliary level first (matching the loss weights' order)
        aux_channels = [channels[level] for level in range(1, deep_supr_num + 1)] if deep_supervision else []
        self.ds_heads = nn.ModuleList(
            [Convolution(spatial_dims, c, out_channels, kernel_size=1, bias=True, conv_only=True) for c in aux_channels]
        )
        self.deep_supervision = bool(deep_supervision)
        self.interp_mode = _INTERPOLATION[spatial_dims]
        self.size_divisor = 2**n_stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the main logits, or in training with deep supervision all heads stacked on dim 1."""
        for size in x.shape[2:]:
            # str() concatenation (not an f-string of a shape) keeps the message scriptable
            if size % self.size_divisor != 0:
                raise ValueError(
                    "every spatial size of the input must be divisible by "
                    + str(self.size_divisor)
                    + ", got "
                    + str(x.shape[2:])
                )
        skips: list[torch.Tensor] = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = self.bottleneck(x)
        n_skips = len(skips)
        decoded: list[torch.Tensor] = []
        for i, stage in enumerate(self.decoder):
            x = stage(x, skips[n_skips - 2 - i])
            decoded.append(x)
        main = self.head(x)
        if not (self.training and self.deep_supervision):
            return main
        outputs = [main]
        n_decoded = len(decoded)
        for j, head in enumerate(self.ds_heads):
            aux = head(decoded[n_decoded - 2 - j])
            outputs.append(F.interpolate(aux, size=main.shape[2:], mode=self.interp_mode, align_corners=False))
        return torch.stack(outputs, dim=1)


class ResUNet(_DeepSupervisedUNet):
    """Residual U-Net for 2-D or 3-D (methods M1, M2 and M4).

    Encoder: level 0 is a ``ResidualBlock`` (or, with ``modality_stem=True``, M1's
    ``ModalityAwareStem``); every further level halves the resolution, either by a residual
    block whose first convolution has stride 2 (``downsample="conv"``: M1, M4) or by 2x max
    pooling before a residual block (``downsample="pool"``: M2). Decoder: per level a 2x
    transposed convolution, concatenation with the encoder skip and a residual block; a 1x1
    convolution gives the logits. Optional deep-supervision heads (1x1 convolutions on the
    ``deep_supr_num`` finest auxiliary decoder levels) follow the contract in the module
    docstring.

    M4 (3-D deep-supervised Res-UNet, nnU-Net-like) is a *configuration* of this class, not a
    separate one: ``spatial_dims=3, channels=(32, 64, 128, 256, 320, 320), norm="instance",
    act=("leakyrelu", {"negative_slope": 0.01}), downsample="conv", deep_supervision=True,
    deep_supr_num=2`` (each level: 3x3x3 stride-2 conv then 3x3x3 stride-1 conv, residual;
    2x2x2 transposed-conv decoder); the paper's best deeper/wider setting is
    ``channels=(64, 128, 256, 512, 512, 512, 512)`` (7 levels; or 96 -> 512) with
    ``in_channels=5`` for the extra salient channel. MONAI's ``DynUNet(res_block=True)`` has the
    same topology; we use this class so that M1, M2 and M4 share one implementation (and the
    modality stem), and keep ``DynUNet`` as the nnU-Net baseline.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` (eval) or
    ``(B, 1 + deep_supr_num, out_channels, *S)`` (training with deep supervision); every size in
    ``S`` must be divisible by ``2 ** (len(channels) - 1)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (4 modalities; 5 with M4's salient channel).
        out_channels: output channels (3 sigmoid regions, 4 softmax classes, or 1 binary mask).
        channels: feature channels per level, finest first; ``len(channels) - 1`` down-samplings.
        downsample: ``"conv"`` (strided convolution) or ``"pool"`` (max pooling).
        norm: MONAI norm spec (``"batch"`` for M1/M2, ``"instance"`` for M4).
        act: MONAI activation spec (ReLU for M1/M2, LeakyReLU 0.01 for M4).
        dropout: dropout probability inside the residual blocks, or ``None``.
        deep_supervision: add auxiliary heads (returned in training mode only).
        deep_supr_num: number of auxiliary heads (M4: 2).
        modality_stem: use ``ModalityAwareStem`` as level 0 (M1's progressive multimodal fusion).
        stem_features_per_modality: channels per modality in the stem's grouped stage.
        stem_fusion_blocks: residual blocks fusing the modalities in the stem.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256, 320),
        downsample: str = "conv",
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
        dropout: float | None = None,
        deep_supervision: bool = False,
        deep_supr_num: int = 2,
        modality_stem: bool = False,
        stem_features_per_modality: int = 8,
        stem_fusion_blocks: int = 1,
    ) -> None:
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        if downsample not in ("conv", "pool"):
            raise ValueError(f"downsample must be 'conv' or 'pool', got {downsample!r}")
        if modality_stem:
            first: nn.Module = ModalityAwareStem(
                spatial_dims,
                in_channels,
                channels[0],
                features_per_modality=stem_features_per_modality,
                fusion_blocks=stem_fusion_blocks,
                norm=norm,
                act=act,
            )
        else:
            first = ResidualBlock(spatial_dims, in_channels, channels[0], norm=norm, act=act, dropout=dropout)
        encoder: list[nn.Module] = [first]
        for c_in, c_out in itertools.pairwise(channels):
            if downsample == "conv":
                encoder.append(ResidualBlock(spatial_dims, c_in, c_out, stride=2, norm=norm, act=act, dropout=dropout))
            else:
                encoder.append(
                    nn.Sequential(
                        Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2),
                        ResidualBlock(spatial_dims, c_in, c_out, norm=norm, act=act, dropout=dropout),
                    )
                )
        decoder: list[nn.Module] = [
            UpResidualBlock(spatial_dims, channels[level + 1], channels[level], channels[level], norm, act, dropout)
            for level in reversed(range(len(channels) - 1))
        ]
        super().__init__(
            spatial_dims,
            out_channels,
            channels,
            encoder,
            nn.Identity(),
            decoder,
            deep_supervision,
            deep_supr_num,
        )


class ResSELKAUNet(_DeepSupervisedUNet):
    """ResSE-LKA-UNet with context extraction and deep supervision (method M3).

    Encoder: every level is a ``ResSEBlock`` followed by ``LargeKernelAttention``; levels after
    the first start with 2x max pooling (M3 does not say how it down-samples; pooling is the
    U-Net default it builds on). Bottleneck: ``ContextExtraction`` after the deepest level.
    Decoder: 2x transposed convolution, concatenation skip, residual block (``ResSEBlock`` with
    ``decoder_se=True``; M3 does not describe its decoder blocks). Three auxiliary heads by
    default, up-sampled to full resolution, ordered finest first so that M3's weights
    ``[1.0, 0.4, 0.3, 0.2]`` give the finer auxiliary outputs the larger weights.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)`` (eval) or
    ``(B, 1 + deep_supr_num, out_channels, *S)`` (training); sizes divisible by
    ``2 ** (len(channels) - 1)``. M3 uses ``spatial_dims=2`` at 4 x 128 x 128, 4 softmax classes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (4 modalities).
        out_channels: output classes (4: background, NCR, ED, ET).
        channels: feature channels per level, finest first.
        se_reduction: squeeze-and-excitation reduction ratio.
        norm: MONAI norm spec (batch norm in M3).
        act: MONAI activation spec (ReLU in M3).
        dropout: dropout probability inside the residual blocks, or ``None``.
        deep_supervision: add auxiliary heads (returned in training mode only).
        deep_supr_num: number of auxiliary heads (M3: 3).
        decoder_se: use ``ResSEBlock`` instead of ``ResidualBlock`` in the decoder.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 4,
        out_channels: int = 4,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        se_reduction: int = 8,
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
        dropout: float | None = None,
        deep_supervision: bool = True,
        deep_supr_num: int = 3,
        decoder_se: bool = False,
    ) -> None:
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        encoder: list[nn.Module] = []
        for level, c_out in enumerate(channels):
            c_in = in_channels if level == 0 else channels[level - 1]
            layers: list[nn.Module] = [] if level == 0 else [Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)]
            layers += [
                ResSEBlock(spatial_dims, c_in, c_out, se_reduction=se_reduction, norm=norm, act=act, dropout=dropout),
                LargeKernelAttention(spatial_dims, c_out, norm=norm),
            ]
            encoder.append(nn.Sequential(*layers))
        bottleneck = ContextExtraction(spatial_dims, channels[-1], channels[-1], norm=norm, act=act)
        decoder: list[nn.Module] = [
            UpResidualBlock(
                spatial_dims,
                channels[level + 1],
                channels[level],
                channels[level],
                norm,
                act,
                dropout,
                se_reduction=se_reduction if decoder_se else None,
            )
            for level in reversed(range(len(channels) - 1))
        ]
        super().__init__(
            spatial_dims,
            out_channels,
            channels,
            encoder,
            bottleneck,
            decoder,
            deep_supervision,
            deep_supr_num,
        )


class M4UNet(DynUNet):
    """MONAI's ``DynUNet`` whose deep-supervision heads keep their own resolution (method M4).

    M4's network (``docs/methods.md``) is nnU-Net's residual U-Net, which MONAI's ``DynUNet`` builds
    with ``res_block=True``: per level a 3x3x3 convolution with the level's stride and a 3x3x3
    stride-1 convolution, instance norm, LeakyReLU 0.01 and a residual (1x1 projection) shortcut;
    decoder stages of a 2x2x2 transposed convolution, concatenation with the skip and conv-norm-act
    blocks; ``deep_supr_num`` auxiliary 1x1 heads on the decoder levels below the output.

    What MONAI's class lacks is M4's (and nnU-Net's) deep supervision: ``DynUNet`` up-samples
    every auxiliary head to full size and compares it with the full-size label, whereas the paper
    compares each head, at its own resolution, with the label down-sampled to it (nearest
    neighbour), which MONAI's ``DeepSupervisionLoss`` does when it is given a list. This class
    therefore returns, in training mode with ``deep_supervision=True``, the list ``[main, head_1,
    head_2, ...]`` (finest head first, head ``k`` at ``1 / 2**k`` of the input size for stride-2
    levels), and with ``upsample_heads=True`` exactly what ``DynUNet`` returns (one stacked tensor of
    up-sampled heads). Eval mode returns the main output only, in both modes, so inference,
    validation and the TorchScript trace of the model zoo export see a plain ``DynUNet``. Weights
    are ``DynUNet``'s (same state-dict keys), whichever mode trained them.

    The list return makes the training-mode graph unscriptable; export traces the eval-mode graph.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``; every size in ``S`` must be divisible
    by the product of the strides of its axis (32 for nnU-Net's six levels), and instance norm needs
    a bottleneck of at least 2 voxels, e.g. ``S = 64 x 32 x 32`` for six stride-2 levels.

    Args:
        *args: ``DynUNet``'s arguments (``spatial_dims, in_channels, out_channels, kernel_size,
            strides, upsample_kernel_size``, ...).
        upsample_heads: ``True``: heads up-sampled to full size and stacked (MONAI ``DynUNet``'s
            behaviour); ``False``: heads at their own resolution (M4, nnU-Net).
        **kwargs: ``DynUNet``'s keyword arguments (``filters``, ``norm_name``, ``act_name``,
            ``deep_supervision``, ``deep_supr_num``, ``res_block``, ...).
    """

    def __init__(self, *args: Any, upsample_heads: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upsample_heads = bool(upsample_heads)
        self.size_divisor = size_multiple(self.strides, self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Main logits; in training with deep supervision, all heads (see the class docstring)."""
        sizes = list(x.shape[2:])
        # a trace records the graph for one size: the check belongs to eager calls
        if not torch.jit.is_tracing() and any(size % divisor for size, divisor in zip(sizes, self.size_divisor)):
            raise ValueError(f"input sizes {sizes} must be divisible by {self.size_divisor} (the strides' product)")
        if self.upsample_heads or not (self.training and self.deep_supervision):
            return super().forward(x)
        out = self.output_block(self.skip_layers(x))
        # self.heads is DynUNet's list, refilled in place by the skip layers on every forward pass
        return [out, *self.heads]
