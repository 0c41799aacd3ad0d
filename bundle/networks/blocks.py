"""Building blocks of the bundle's residual U-Nets (methods M1-M4 in ``docs/methods.md``).

Every block is one class for 2-D and 3-D (``spatial_dims``), built from MONAI's ``Convolution``
and the ``Norm`` / ``Act`` factories (``get_norm_layer`` / ``get_act_layer``), so a config can pass
any MONAI norm or activation spec, e.g. ``"batch"``, ``"instance"``, ``"relu"`` or
``("leakyrelu", {"negative_slope": 0.01})``. All blocks script with ``torch.jit.script``.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import ChannelSELayer, Convolution
from monai.networks.layers.factories import Act, Norm, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = [
    "ContextExtraction",
    "LargeKernelAttention",
    "ModalityAwareStem",
    "ResSEBlock",
    "ResidualBlock",
    "UpResidualBlock",
]

NormSpec = tuple | str
ActSpec = tuple | str

DEFAULT_NORM: NormSpec = Norm.BATCH
DEFAULT_ACT: ActSpec = (Act.RELU, {"inplace": False})


def _conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
) -> Convolution:
    """A bare same-padded convolution (norm and activation are added by the caller)."""
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=stride,
        kernel_size=kernel_size,
        groups=groups,
        bias=bias,
        conv_only=True,
    )


class ResidualBlock(nn.Module):
    """Residual convolution block: two conv-norm-act layers plus a shortcut (He et al. 2016).

    ``y = act(norm(conv(act(norm(conv_s(x))))) + shortcut(x))`` where ``conv_s`` has stride
    ``stride`` and the shortcut is the identity, or a 1x1 convolution + norm with the same stride
    when the channel count or the resolution changes (projection shortcut). This is the encoder /
    decoder block of M1 (batch norm, ReLU), M2 and M4 (instance norm, LeakyReLU 0.01; with
    ``stride=2`` it is M4's "3x3x3 stride-2 conv then 3x3x3 stride-1 conv" level). The layout
    matches MONAI's ``UnetResBlock``; this class adds grouped convolutions (for the modality stem)
    and the batch-norm / ReLU defaults of M1.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S / stride)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of both convolutions.
        stride: stride of the first convolution (2 down-samples, replacing pooling).
        norm: MONAI norm spec.
        act: MONAI activation spec.
        groups: convolution groups (both convolutions and the projection); 1 = ordinary.
        dropout: dropout probability after the first activation, or ``None``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
        groups: int = 1,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(spatial_dims, in_channels, out_channels, kernel_size, stride, groups)
        self.norm1 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act1 = get_act_layer(act)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, kernel_size, 1, groups)
        self.norm2 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act2 = get_act_layer(act)
        if in_channels != out_channels or stride != 1:
            self.shortcut: nn.Module = nn.Sequential(
                _conv(spatial_dims, in_channels, out_channels, 1, stride, groups),
                get_norm_layer(norm, spatial_dims, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        residual = self.dropout(self.act1(self.norm1(self.conv1(x))))
        residual = self.norm2(self.conv2(residual))
        return self.act2(residual + self.shortcut(x))


class ResSEBlock(nn.Module):
    """Residual block followed by squeeze-and-excitation (M3's "ResSE" block; Hu et al. 2018).

    The residual branch is two 3x3 conv + BN + ReLU (``ResidualBlock``), added to the input;
    then MONAI's ``ChannelSELayer`` does global average pool -> FC -> ReLU -> FC -> sigmoid ->
    channel-wise rescale.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S / stride)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution.
        se_reduction: SE reduction ratio r (hidden width ``out_channels // r``, at least 1;
            M3 does not state r, we use 8).
        norm: MONAI norm spec.
        act: MONAI activation spec.
        dropout: dropout probability inside the residual branch, or ``None``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        se_reduction: int = 8,
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.residual = ResidualBlock(
            spatial_dims, in_channels, out_channels, stride=stride, norm=norm, act=act, dropout=dropout
        )
        self.se = ChannelSELayer(spatial_dims, out_channels, r=max(1, min(se_reduction, out_channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block, then channel re-weighting."""
        return self.se(self.residual(x))


class LargeKernelAttention(nn.Module):
    """Large-kernel spatial attention of M3 (after Guo et al. 2023, "Visual Attention Network").

    ``A = sigmoid(BN(conv1x1(dwconv7(dwconv5(x)))))``; output ``x * A``. The depthwise kernels are
    5 and 7 (5x5 / 7x7 in 2-D, cubic in 3-D), not dilated as in VAN: M3 describes plain depthwise
    5x5 and 7x7 convolutions.

    Shapes: ``(B, C, *S) -> (B, C, *S)``.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of input and output.
        norm: MONAI norm spec for the attention map.
    """

    def __init__(self, spatial_dims: int, channels: int, norm: NormSpec = DEFAULT_NORM) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            _conv(spatial_dims, channels, channels, kernel_size=5, groups=channels, bias=True),
            _conv(spatial_dims, channels, channels, kernel_size=7, groups=channels, bias=True),
            _conv(spatial_dims, channels, channels, kernel_size=1, bias=False),
            get_norm_layer(norm, spatial_dims, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply the input by its spatial attention map."""
        return x * self.attention(x)


class ContextExtraction(nn.Module):
    """Context extraction (CE) at the U-Net bottleneck (M3).

    Three parallel branches - 1x1 conv, 3x3 conv, and global average pool followed by a 1x1
    conv broadcast back over the spatial grid - are summed, then norm + activation.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        norm: MONAI norm spec after the sum (batch norm in M3).
        act: MONAI activation spec after the norm (ReLU in M3).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        self.branch_1x1 = _conv(spatial_dims, in_channels, out_channels, kernel_size=1)
        self.branch_3x3 = _conv(spatial_dims, in_channels, out_channels, kernel_size=3)
        self.global_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        # bias is needed here: a global branch without norm would otherwise have no offset of its own
        self.branch_global = _conv(spatial_dims, in_channels, out_channels, kernel_size=1, bias=True)
        self.norm = get_norm_layer(norm, spatial_dims, out_channels)
        self.act = get_act_layer(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the local, regional and global context branches."""
        global_context = self.branch_global(self.global_pool(x))
        summed = self.branch_1x1(x) + self.branch_3x3(x) + global_context  # broadcast over space
        return self.act(self.norm(summed))


class ModalityAwareStem(nn.Module):
    """Modality-aware stem for M1's "progressive multimodal fusion".

    Our reading of the paper (it gives no layer list): modality-specific features are kept
    apart early and fused inside residual blocks. So the stem first runs a residual block of
    *grouped* convolutions with one group per modality (each modality gets
    ``features_per_modality`` channels that see only that modality), then ``fusion_blocks``
    ordinary residual blocks that mix the modalities into ``out_channels`` features.

    Shapes: ``(B, in_channels, *S) -> (B, out_channels, *S)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of input modalities (one group each; 4 for T1, T1ce, T2, FLAIR,
            5 with M4's extra salient channel).
        out_channels: fused output channels.
        features_per_modality: channels per modality in the separate (grouped) stage.
        fusion_blocks: number of residual blocks that fuse the modalities (at least 1).
        norm: MONAI norm spec.
        act: MONAI activation spec.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features_per_modality: int = 8,
        fusion_blocks: int = 1,
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        if fusion_blocks < 1:
            raise ValueError(f"fusion_blocks must be at least 1, got {fusion_blocks}")
        separate = in_channels * features_per_modality
        self.per_modality = ResidualBlock(spatial_dims, in_channels, separate, norm=norm, act=act, groups=in_channels)
        fusion: list[nn.Module] = [ResidualBlock(spatial_dims, separate, out_channels, norm=norm, act=act)]
        for _ in range(fusion_blocks - 1):
            fusion.append(ResidualBlock(spatial_dims, out_channels, out_channels, norm=norm, act=act))
        self.fusion = nn.Sequential(*fusion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Extract per-modality features, then fuse them."""
        return self.fusion(self.per_modality(x))


class UpResidualBlock(nn.Module):
    """Decoder stage: transposed-conv up-sampling, concatenation skip, residual block.

    Shapes: ``x (B, in_channels, *S)``, ``skip (B, skip_channels, *S * 2)`` ->
    ``(B, out_channels, *S * 2)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder skip.
        out_channels: output channels (also the up-sampled channels before concatenation).
        norm: MONAI norm spec.
        act: MONAI activation spec.
        dropout: dropout probability inside the residual block, or ``None``.
        se_reduction: if given, a ``ResSEBlock`` with this SE ratio replaces the residual block.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        norm: NormSpec = DEFAULT_NORM,
        act: ActSpec = DEFAULT_ACT,
        dropout: float | None = None,
        se_reduction: int | None = None,
    ) -> None:
        super().__init__()
        self.upsample = Convolution(
            spatial_dims,
            in_channels,
            out_channels,
            strides=2,
            kernel_size=2,
            bias=False,
            conv_only=True,
            is_transposed=True,
            padding=0,
            output_padding=0,
        )
        if se_reduction is None:
            self.block: nn.Module = ResidualBlock(
                spatial_dims, out_channels + skip_channels, out_channels, norm=norm, act=act, dropout=dropout
            )
        else:
            self.block = ResSEBlock(
                spatial_dims,
                out_channels + skip_channels,
                out_channels,
                se_reduction=se_reduction,
                norm=norm,
                act=act,
                dropout=dropout,
            )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up-sample ``x``, concatenate ``skip`` on channels, and decode."""
        return self.block(torch.cat([self.upsample(x), skip], dim=1))
