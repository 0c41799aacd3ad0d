"""Blocks and networks: shapes (train vs eval, with and without deep supervision), gradients, TorchScript, AMP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from bundle.networks import (
    ContextExtraction,
    LargeKernelAttention,
    M4UNet,
    ModalityAwareStem,
    ResidualBlock,
    ResSEBlock,
    ResSELKAUNet,
    ResUNet,
    UpResidualBlock,
)
from bundle.training.losses import RegionDiceBCELoss, StackedDeepSupervisionLoss

LEAKY = ("leakyrelu", {"negative_slope": 0.01})


def _input(spatial_dims: int, channels: int = 4, size: int = 16) -> torch.Tensor:
    batch = 2 if spatial_dims == 2 else 1
    return torch.randn(batch, channels, *([size] * spatial_dims))


def _first_conv(module: nn.Module) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine, OpenMP threads waiting on each other slow tiny ops 100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


BLOCKS: dict[str, tuple[Callable[[int], nn.Module], int, int]] = {
    # name: (factory(spatial_dims), in_channels, expected out_channels)
    "residual_identity": (lambda d: ResidualBlock(d, 4, 4), 4, 4),
    "residual_projection_stride2": (lambda d: ResidualBlock(d, 4, 8, stride=2, norm="instance", act=LEAKY), 4, 8),
    "resse": (lambda d: ResSEBlock(d, 4, 8, se_reduction=4), 4, 8),
    "lka": (lambda d: LargeKernelAttention(d, 4), 4, 4),
    "context_extraction": (lambda d: ContextExtraction(d, 4, 6), 4, 6),
    "modality_stem": (lambda d: ModalityAwareStem(d, 4, 8, features_per_modality=2, fusion_blocks=2), 4, 8),
}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_shape_gradient_and_script(name: str, spatial_dims: int) -> None:
    factory, in_channels, out_channels = BLOCKS[name]
    block = factory(spatial_dims)
    x = _input(spatial_dims, in_channels, size=8)
    y = block(x)
    stride = 2 if "stride2" in name else 1
    assert y.shape == (x.shape[0], out_channels, *[s // stride for s in x.shape[2:]])
    y.square().mean().backward()
    assert _first_conv(block).weight.grad.abs().sum() > 0
    block.eval()
    torch.testing.assert_close(torch.jit.script(block)(x), block(x))


def test_residual_block_shortcut_kinds() -> None:
    assert isinstance(ResidualBlock(2, 4, 4).shortcut, nn.Identity)
    assert not isinstance(ResidualBlock(2, 4, 8).shortcut, nn.Identity)
    assert not isinstance(ResidualBlock(2, 4, 4, stride=2).shortcut, nn.Identity)


def test_residual_block_adds_identity() -> None:
    """With the residual branch zeroed (last norm's scale 0) and ReLU, the block returns relu(x)."""
    block = ResidualBlock(2, 4, 4).eval()
    nn.init.zeros_(block.norm2.weight)
    nn.init.zeros_(block.norm2.bias)
    x = _input(2)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_lka_only_rescales_input() -> None:
    lka = LargeKernelAttention(2, 4).eval()
    x = _input(2)
    y = lka(x)
    ratio = y / x
    assert torch.all((ratio > 0) & (ratio < 1))  # sigmoid attention in (0, 1)


def test_context_extraction_global_branch_sees_whole_image() -> None:
    """Changing a far-away pixel changes every output position through the global-pool branch."""
    ce = ContextExtraction(2, 4, 4, act=LEAKY).eval()  # LeakyReLU: no output is clipped to a constant
    x = _input(2)
    x2 = x.clone()
    x2[:, :, -1, -1] += 10.0
    changed = (ce(x2) - ce(x)).abs()[:, :, 0, 0]  # far from the perturbed corner (beyond the 3x3 reach)
    assert changed.min() > 0


def test_modality_stem_keeps_modalities_apart_before_fusion() -> None:
    stem = ModalityAwareStem(2, 4, 8, features_per_modality=3).eval()
    x = _input(2)
    x2 = x.clone()
    x2[:, 1] += 5.0  # perturb modality 1 only
    diff = (stem.per_modality(x2) - stem.per_modality(x)).abs().flatten(2).amax(dim=(0, 2))
    assert torch.all(diff[3:6] > 0)
    assert torch.all(diff[:3] == 0) and torch.all(diff[6:] == 0)
    assert (stem(x2) - stem(x)).abs().amax(dim=(0, 2, 3)).min() > 0  # fusion mixes it into every channel


def test_up_residual_block_shape() -> None:
    up = UpResidualBlock(3, 8, 4, 4, se_reduction=2)
    y = up(torch.randn(1, 8, 4, 4, 4), torch.randn(1, 4, 8, 8, 8))
    assert y.shape == (1, 4, 8, 8, 8)


NETWORKS: dict[str, tuple[Callable[[], nn.Module], int, int, int]] = {
    # name: (factory, spatial_dims, out_channels, number of deep-supervision heads)
    "resunet2d_m1_stem_ds": (
        lambda: ResUNet(2, 4, 3, (4, 8, 16), deep_supervision=True, deep_supr_num=1, modality_stem=True),
        2,
        3,
        1,
    ),
    "resunet2d_m2_pool": (lambda: ResUNet(2, 4, 1, (4, 8, 16), downsample="pool"), 2, 1, 0),
    "resunet3d_ds": (
        lambda: ResUNet(3, 4, 3, (4, 8, 8, 16), norm="instance", act=LEAKY, deep_supervision=True, deep_supr_num=2),
        3,
        3,
        2,
    ),
    "resselkaunet2d_m3": (lambda: ResSELKAUNet(2, 4, 4, (4, 8, 8, 16, 16), se_reduction=2), 2, 4, 3),
    "resselkaunet3d": (lambda: ResSELKAUNet(3, 4, 4, (4, 8, 16), deep_supr_num=1, decoder_se=True), 3, 4, 1),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_shapes_gradient_and_torchscript(name: str, tmp_path) -> None:
    factory, spatial_dims, out_channels, n_heads = NETWORKS[name]
    net = factory()
    x = _input(spatial_dims, size=32)
    spatial = tuple(x.shape[2:])

    net.train()
    train_out = net(x)
    if n_heads:
        assert train_out.shape == (x.shape[0], 1 + n_heads, out_channels, *spatial)
        # head 0 is exactly the main output
        net.deep_supervision = False
        torch.testing.assert_close(train_out[:, 0], net(x))
        net.deep_supervision = True
        target = (torch.rand(x.shape[0], out_channels, *spatial) > 0.5).float()
        loss = StackedDeepSupervisionLoss(RegionDiceBCELoss(), weights=[1.0, 0.4, 0.3, 0.2])(train_out, target)
    else:
        assert train_out.shape == (x.shape[0], out_channels, *spatial)
        loss = train_out.square().mean()
    loss.backward()
    first_grad = _first_conv(net).weight.grad
    assert first_grad is not None and first_grad.abs().sum() > 0
    if n_heads:
        assert all(head.conv.weight.grad.abs().sum() > 0 for head in net.ds_heads)

    net.eval()
    with torch.no_grad():
        eval_out = net(x)
    assert eval_out.shape == (x.shape[0], out_channels, *spatial)

    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = torch.jit.load(str(path))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), eval_out)


def test_auxiliary_heads_are_ordered_finest_first() -> None:
    """Output index 1 comes from the finest auxiliary decoder level (the one M3 weights 0.4)."""
    net = ResUNet(2, 4, 3, (4, 8, 16, 32), deep_supervision=True, deep_supr_num=2).train()
    assert [head.conv.in_channels for head in net.ds_heads] == [8, 16]
    nn.init.zeros_(net.ds_heads[0].conv.weight)
    nn.init.zeros_(net.ds_heads[0].conv.bias)
    out = net(_input(2))
    assert torch.all(out[:, 1] == 0) and out[:, 2].abs().sum() > 0


@pytest.mark.parametrize("name", ["resunet2d_m1_stem_ds", "resselkaunet2d_m3", "resunet3d_ds"])
def test_network_runs_under_bfloat16_autocast(name: str) -> None:
    factory, spatial_dims, out_channels, n_heads = NETWORKS[name]
    net = factory().train()
    x = _input(spatial_dims, size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    assert out.shape == (x.shape[0], 1 + n_heads, out_channels, *x.shape[2:])
    out.float().square().mean().backward()
    grad = _first_conv(net).weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def _m4(filters: tuple[int, ...] = (4, 8, 8, 16, 16, 16), in_channels: int = 4, **kwargs: object) -> M4UNet:
    """M4's network as configs/train.yaml builds it (the depth follows ``filters``), at tiny widths."""
    levels = len(filters)
    return M4UNet(
        3,
        in_channels,
        3,
        kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1),
        filters=filters,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("LEAKYRELU", {"negative_slope": 0.01}),
        deep_supervision=True,
        deep_supr_num=2,
        res_block=True,
        **kwargs,
    )


def _monai_dynunet(net: M4UNet) -> nn.Module:
    """MONAI's DynUNet with the same arguments and weights as ``net``."""
    from monai.networks.nets import DynUNet

    twin = DynUNet(
        net.spatial_dims,
        net.in_channels,
        net.out_channels,
        net.kernel_size,
        net.strides,
        net.upsample_kernel_size,
        filters=net.filters,
        norm_name=net.norm_name,
        act_name=net.act_name,
        deep_supervision=True,
        deep_supr_num=net.deep_supr_num,
        res_block=True,
    )
    twin.load_state_dict(net.state_dict())  # same keys: an M4UNet checkpoint is a DynUNet one
    return twin


def test_m4_heads_keep_their_own_resolution_and_eval_returns_the_main_output() -> None:
    """M4 (nnU-Net): training returns [main, head 1/2, head 1/4]; MONAI's DynUNet would up-sample the heads."""
    net = _m4().train()
    x = torch.randn(2, 4, 64, 64, 64)
    main, half, quarter = net(x)
    assert main.shape == (2, 3, 64, 64, 64)
    assert half.shape == (2, 3, 32, 32, 32) and quarter.shape == (2, 3, 16, 16, 16)
    twin = _monai_dynunet(net).train()
    stacked = twin(x)
    assert stacked.shape == (2, 3, 3, 64, 64, 64)
    torch.testing.assert_close(stacked[:, 0], main)
    # MONAI's heads are ours up-sampled: the head itself is the same prediction at its own size
    torch.testing.assert_close(stacked[:, 2, :, ::4, ::4, ::4], quarter)
    net.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), twin(x))
        assert net(x).shape == (2, 3, 64, 64, 64)


def test_m4_upsample_heads_is_monai_dynunet_exactly() -> None:
    net = _m4(upsample_heads=True).train()
    x = torch.randn(1, 4, 64, 32, 32)  # the smallest input of 6 levels: a 2 x 1 x 1 bottleneck
    torch.testing.assert_close(net(x), _monai_dynunet(net).train()(x))


def test_m4_deep_supervision_loss_compares_each_head_with_nearest_downsampled_labels() -> None:
    net = _m4().train()
    x = torch.randn(2, 4, 64, 64, 64)
    labels = torch.zeros(2, 3, 64, 64, 64)
    labels[:, :, 16:48, 20:44, 24:40] = 1
    heads = net(x)
    base = RegionDiceBCELoss()
    got = StackedDeepSupervisionLoss(base)(heads, labels)
    # the paper's: each head against the labels down-sampled to its size by nearest neighbour, weights 1, .5, .25
    expected = sum(
        w * base(h, nn.functional.interpolate(labels, size=h.shape[2:], mode="nearest-exact"))
        for w, h in zip((1.0, 0.5, 0.25), heads)
    )
    torch.testing.assert_close(got, expected)
    got.backward()
    for head in net.deep_supervision_heads:  # every head learns
        assert head.conv.conv.weight.grad.abs().sum() > 0


def test_both_deep_supervision_forms_give_the_same_loss_on_labels_constant_over_each_heads_voxel() -> None:
    """Where every 4 x 4 x 4 block of the labels is constant, comparing a head with the labels down-sampled
    to it (M4) equals comparing it up-sampled with the full labels (DynUNet): the forms differ only at
    boundaries finer than a head's voxel, which is where the paper's form is the coarser one."""
    torch.manual_seed(0)
    own_size = _m4().train()
    upsampled = _m4(upsample_heads=True).train()
    upsampled.load_state_dict(own_size.state_dict())
    x = torch.randn(1, 4, 64, 64, 64)
    loss = StackedDeepSupervisionLoss(RegionDiceBCELoss())
    aligned = torch.zeros(1, 3, 64, 64, 64)
    aligned[:, :, 16:48, 20:44, 24:40] = 1  # box edges on multiples of 4
    torch.testing.assert_close(loss(own_size(x), aligned), loss(upsampled(x), aligned))
    shifted = torch.zeros(1, 3, 64, 64, 64)
    shifted[:, :, 17:47, 21:43, 25:39] = 1
    assert not torch.isclose(loss(own_size(x), shifted), loss(upsampled(x), shifted))


def test_m4_best_setting_seven_levels_and_the_salient_channel() -> None:
    """M4's best: 7 levels, 5 input channels; sizes are multiples of 64 (128 x 64 x 64: a 2-voxel bottleneck)."""
    net = _m4((2, 4, 4, 4, 4, 4, 4), in_channels=5)
    assert net.size_divisor == [64, 64, 64]
    main, half, quarter = net.train()(torch.randn(1, 5, 128, 64, 64))
    assert main.shape == (1, 3, 128, 64, 64) and half.shape == (1, 3, 64, 32, 32)
    assert quarter.shape == (1, 3, 32, 16, 16)
    with pytest.raises(ValueError, match=r"input sizes \[96, 64, 64\] must be divisible by \[64, 64, 64\]"):
        net(torch.randn(1, 5, 96, 64, 64))


def test_m4_runs_under_bfloat16_autocast_and_traces_for_export() -> None:
    """CPU autocast (the AMP path) with the list of heads; the eval graph traces (the zoo export's TorchScript)."""
    net = _m4().train()
    x = torch.randn(1, 4, 64, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heads = net(x)
    assert all(h.dtype == torch.bfloat16 for h in heads)
    StackedDeepSupervisionLoss(RegionDiceBCELoss())(heads, torch.ones(1, 3, 64, 64, 64)).backward()
    assert torch.isfinite(_first_conv(net).weight.grad).all()
    net.eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        y = torch.randn(1, 4, 64, 96, 32)
        torch.testing.assert_close(traced(y), net(y))


def test_invalid_configurations_raise() -> None:
    with pytest.raises(ValueError, match="deep_supr_num"):
        ResUNet(2, 4, 3, (4, 8, 16), deep_supervision=True, deep_supr_num=2)
    with pytest.raises(ValueError, match="downsample"):
        ResUNet(2, 4, 3, (4, 8), downsample="stride")
    with pytest.raises(ValueError, match="divisible by 4"):
        ResUNet(2, 4, 3, (4, 8, 16)).eval()(torch.randn(1, 4, 18, 18))


VARIANTS = {
    # variant file: (network class name, spatial dims of the training input)
    "m1_la_resunet": ("ResUNet", 2),
    "m2_resunet_tversky": ("ResUNet", 2),
    "m3_resse_lka_unet": ("ResSELKAUNet", 2),
    "m4_resunet_ds": ("M4UNet", 3),
    "unet": ("UNet", 3),
    "attention_unet": ("AttentionUnet", 3),
    "segresnet": ("SegResNet", 3),
    "dynunet": ("DynUNet", 3),
    "swinunetr": ("SwinUNETR", 3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_config_builds_its_network_and_loss(variant: str) -> None:
    from monai.bundle import ConfigParser

    network_class, spatial_dims = VARIANTS[variant]
    files = ["configs/train.yaml", f"configs/variants/{variant}.yaml"]
    if spatial_dims == 2:  # 2-D variants are merged over the 2-D training defaults
        if not Path("configs/train_2d.yaml").exists():
            pytest.skip("configs/train_2d.yaml (2-D training defaults) is not in this checkout")
        files.insert(1, "configs/train_2d.yaml")
    parser = ConfigParser()
    parser.read_config(files)
    # meta device: build without allocating or initialising weights (SwinUNETR's init needs real values)
    with torch.device("cpu" if variant == "swinunetr" else "meta"):
        network = parser.get_parsed_content("network_def")
    assert type(network).__name__ == network_class
    assert callable(parser.get_parsed_content("loss"))
    assert len(parser.get_parsed_content("patch_size")) == spatial_dims
    if variant == "dynunet":
        assert parser["network_factory"]["res_block"] is False
