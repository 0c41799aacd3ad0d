"""Tests for bundle/inference/inferers.py: flip test-time augmentation around a MONAI inferer."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SliceInferer, SlidingWindowInferer
from monai.transforms import FlattenSubKeysd

from bundle.inference.inferers import FlipTTAInferer, flip_combinations


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation (about 20 ms per conv on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# toy networks
# ------------------------------------------------------------------------------------------------


def window(roi_size, sw_batch_size: int = 1, **kwargs) -> SlidingWindowInferer:
    """MONAI's sliding window as configs/inference.yaml defines it for 3-D models (50 % overlap, Gaussian)."""
    kwargs.setdefault("overlap", 0.5)
    return SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, mode="gaussian", **kwargs)


def asymmetric_conv(spatial_dims: int, channels_in: int = 2, channels_out: int = 3) -> torch.nn.Module:
    """A conv with a random (hence asymmetric) kernel: its output is not flip-equivariant."""
    torch.manual_seed(0)
    conv_cls = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
    net = conv_cls(channels_in, channels_out, kernel_size=3, padding=1)
    with torch.no_grad():
        net.weight.mul_(3.0)  # large enough that flips matter visibly after the sigmoid
    return net.eval()


def cumsum_net(x: torch.Tensor) -> torch.Tensor:
    """Strongly direction-dependent: running sum along the first spatial axis."""
    return torch.cumsum(x, dim=2) / x.shape[2]


def hand_tta(x: torch.Tensor, net, axes, activation=torch.sigmoid) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over all flips, computed independently of the inferer (whole-volume passes)."""
    probs = []
    for r in range(len(axes) + 1):
        for combo in itertools.combinations(axes, r):
            dims = [a + 2 for a in combo]
            xf = x.flip(dims) if dims else x
            with torch.no_grad():
                y = net(xf)
            y = y.flip(dims) if dims else y
            probs.append(activation(y))
    stack = torch.stack(probs)
    return stack.mean(0), stack.std(0, unbiased=False)


class CountingNet(torch.nn.Module):
    """Records every sample it sees; each sample is identified as one flip of a known input."""

    def __init__(self, reference: torch.Tensor, axes, slice_dim: int | None = None) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.seen: list[tuple[int, ...] | None] = []
        # all flips of the reference (one sample), to recognise each sample the network gets
        self.candidates = {}
        for r in range(len(axes) + 1):
            for combo in itertools.combinations(axes, r):
                dims = [a + 1 for a in combo]  # sample without batch dim: channel is dim 0
                self.candidates[combo] = reference[0].flip(dims) if dims else reference[0]
        self.slice_dim = slice_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        for sample in x:
            match = None
            for combo, cand in self.candidates.items():
                if self.slice_dim is None:
                    if sample.shape == cand.shape and torch.equal(sample, cand):
                        match = combo
                # a 2-D slice: compare against every slice of each candidate along the slice axis
                elif any(torch.equal(sample, s) for s in cand.unbind(self.slice_dim + 1)):
                    match = combo
            self.seen.append(match)
        return x[:, :1] * 0.0 + 1.0


# ------------------------------------------------------------------------------------------------
# flip TTA
# ------------------------------------------------------------------------------------------------


def test_flip_combinations():
    assert flip_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert len(flip_combinations((0, 1))) == 4


@pytest.mark.parametrize("flip_batch_size", [1, 3, 8, None])
def test_identity_network_reproduces_sigmoid_of_input(flip_batch_size):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 13, 11, 9)
    # windows smaller than the volume, so stitching of overlapping Gaussian-weighted windows is exercised
    inferer = FlipTTAInferer(window((8, 8, 8), sw_batch_size=2), flip_batch_size=flip_batch_size)
    out = inferer(x, lambda t: t)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.sigmoid(x), atol=1e-5, rtol=1e-5)


def test_asymmetric_network_each_flip_is_undone_3d():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 10, 9, 8)
    net = asymmetric_conv(3)
    expected, _ = hand_tta(x, net, (0, 1, 2))
    out = FlipTTAInferer(window((-1, -1, -1)))(x, net)  # one window = whole volume, as the hand computation
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the check can fail: skipping the un-flip or not flipping at all gives a clearly different map
    with torch.no_grad():
        no_tta = torch.sigmoid(net(x))
        not_unflipped = torch.stack(
            [torch.sigmoid(net(x.flip([a + 2 for a in c]) if c else x)) for c in flip_combinations((0, 1, 2))]
        ).mean(0)
    assert (expected - no_tta).abs().max() > 0.05
    assert (expected - not_unflipped).abs().max() > 0.05


def test_asymmetric_network_each_flip_is_undone_2d_cumsum():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 12, 10)
    expected, _ = hand_tta(x, cumsum_net, (0, 1))
    out = FlipTTAInferer(window((-1, -1)), flip_batch_size=2)(x, cumsum_net)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (expected - torch.sigmoid(cumsum_net(x))).abs().max() > 0.05


def test_flip_batching_matches_flip_by_flip_with_sliding_windows():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 10, 8, 8)
    net = asymmetric_conv(3)
    calls: dict[int | None, list[int]] = {}

    def counted(fbs):
        calls[fbs] = []
        return lambda t: (calls[fbs].append(t.shape[0]), net(t))[1]

    outs = [
        FlipTTAInferer(window((6, 6, 6), sw_batch_size=2), flip_batch_size=fbs, return_std=True)(x, counted(fbs))
        for fbs in (1, 3, 8, None)
    ]
    # 3 x 2 x 2 = 12 windows per flip; sw_batch_size is scaled with the flip group (2 per flip per call)
    assert calls[1] == [2] * 48 and calls[8] == [16] * 6
    assert calls[None] == calls[1]  # default on CPU: one flip per pass
    assert sum(calls[3]) == 96 and max(calls[3]) == 6
    for o in outs[1:]:
        torch.testing.assert_close(o["mean"], outs[0]["mean"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o["std"], outs[0]["std"], atol=1e-5, rtol=1e-5)
    # and it equals the average of MONAI's own sliding window over each flip, done by hand
    sw = SlidingWindowInferer(roi_size=(6, 6, 6), overlap=0.5, mode="gaussian")
    with torch.no_grad():
        per_flip = [
            torch.sigmoid(sw(x.flip([a + 2 for a in c]), net).flip([a + 2 for a in c]) if c else sw(x, net))
            for c in flip_combinations((0, 1, 2))
        ]
    torch.testing.assert_close(outs[0]["mean"], torch.stack(per_flip).mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flip_batch_size, calls", [(1, [1] * 8), (4, [4, 4]), (8, [8]), (None, [1] * 8)])
def test_exactly_eight_flips_in_3d(flip_batch_size, calls):
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(1, 2, 4, 5, 6)  # no symmetry: every flip differs
    net = CountingNet(x, (0, 1, 2))
    FlipTTAInferer(window((-1, -1, -1)), flip_batch_size=flip_batch_size)(x, net)
    assert net.calls == calls
    assert sorted(net.seen) == sorted(flip_combinations((0, 1, 2)))  # each of the 8 flips exactly once


@pytest.mark.parametrize("flip_batch_size, calls", [(1, [1] * 4), (4, [4]), (None, [1] * 4)])
def test_exactly_four_flips_in_2d(flip_batch_size, calls):
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    net = CountingNet(x, (0, 1))
    FlipTTAInferer(window((-1, -1)), flip_batch_size=flip_batch_size)(x, net)
    assert net.calls == calls
    assert sorted(net.seen) == sorted(flip_combinations((0, 1)))


def test_tta_off_is_one_unflipped_pass():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(1, 2, 4, 5, 6)
    net = CountingNet(x, (0, 1, 2))
    FlipTTAInferer(window((-1, -1, -1)), tta=False)(x, net)
    assert net.calls == [1] and net.seen == [()]


def test_chosen_axes_only():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(1, 2, 4, 5, 6)
    net = CountingNet(x, (0, 1, 2))
    FlipTTAInferer(window((-1, -1, -1)), flip_axes=(2,))(x, net)
    assert sorted(net.seen) == [(), (2,)]
    with pytest.raises(ValueError, match="out of range"):
        FlipTTAInferer(window((-1, -1)), flip_axes=(2,))(torch.zeros(1, 1, 4, 4), lambda t: t)


def test_2d_model_slice_by_slice_over_a_volume_uses_four_in_plane_flips():
    torch.manual_seed(5)
    x = torch.randn(1, 2, 6, 7, 5)  # slices along the last axis (spatial_dim=2)
    net2d = asymmetric_conv(2)
    inferer = FlipTTAInferer(base_inferer=SliceInferer(roi_size=(6, 7), spatial_dim=2, sw_batch_size=5))
    assert inferer.spatial_flip_axes(3) == (0, 1)
    out = inferer(x, net2d)
    # hand computation: the 2-D TTA of each slice on its own
    expected = torch.stack([hand_tta(x[..., k], net2d, (0, 1))[0] for k in range(x.shape[-1])], dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the network saw each in-plane flip of each slice exactly once
    counter = CountingNet(x, (0, 1), slice_dim=2)
    FlipTTAInferer(base_inferer=SliceInferer(roi_size=(6, 7), spatial_dim=2, sw_batch_size=5), flip_batch_size=1)(
        x, counter
    )
    assert sum(counter.calls) == 4 * x.shape[-1]
    assert sorted(set(counter.seen)) == sorted(flip_combinations((0, 1)))


def test_std_zero_for_flip_invariant_net_and_positive_for_asymmetric():
    torch.manual_seed(6)
    x = torch.randn(1, 2, 10, 9, 8)
    # a pointwise net commutes with flips: every flip gives the same probabilities
    inv = FlipTTAInferer(window((5, 5, 5)), return_std=True)(x, lambda t: 2.0 * t)
    assert set(inv) == {"mean", "std"}
    assert inv["std"].shape == x.shape and float(inv["std"].abs().max()) < 1e-6
    net = asymmetric_conv(3)
    asym = FlipTTAInferer(window((-1, -1, -1)), return_std=True)(x, net)
    mean, std = hand_tta(x, net, (0, 1, 2))
    assert float(asym["std"].max()) > 0.05
    torch.testing.assert_close(asym["std"], std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(asym["mean"], mean, atol=1e-5, rtol=1e-5)


def test_softmax_activation_and_deep_supervision_tuple():
    torch.manual_seed(7)
    x = torch.randn(1, 2, 8, 8, 6)
    net = asymmetric_conv(3, channels_out=4)
    expected, _ = hand_tta(x, net, (0, 1, 2), activation=lambda t: torch.softmax(t, 1))
    out = FlipTTAInferer(window((-1, -1, -1)), activation="softmax")(x, lambda t: (net(t), net(t) * 0))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 8, 8, 6))
    raw = FlipTTAInferer(window((-1, -1, -1)), activation=None, tta=False)(x, net)
    with torch.no_grad():
        torch.testing.assert_close(raw, net(x), atol=1e-5, rtol=1e-5)


def test_amp_path_runs_on_cpu():
    torch.manual_seed(8)
    x = torch.randn(1, 2, 8, 7, 6)
    conv = asymmetric_conv(3)
    dtypes = []

    def net(t):
        y = conv(t)
        dtypes.append(y.dtype)
        return y

    ref = FlipTTAInferer(window((6, 6, 6)))(x, net)
    assert set(dtypes) == {torch.float32}  # CPU default: autocast disabled
    dtypes.clear()
    out = FlipTTAInferer(window((6, 6, 6)), amp_dtype="bfloat16")(x, net)
    assert set(dtypes) == {torch.bfloat16}  # autocast really engaged
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.03, rtol=0.0)
    dtypes.clear()
    FlipTTAInferer(window((6, 6, 6)), amp=False, amp_dtype="bfloat16")(x, net)
    assert set(dtypes) == {torch.float32}


def test_metatensor_metadata_kept_and_flattened_for_post_transforms():
    affine = torch.diag(torch.tensor([-1.0, -1.0, 2.0, 1.0]))
    x = MetaTensor(torch.randn(1, 2, 6, 6, 6), affine=affine)
    out = FlipTTAInferer(window((4, 4, 4)), return_std=True)(x, asymmetric_conv(3))
    assert isinstance(out["mean"], MetaTensor) and isinstance(out["std"], MetaTensor)
    torch.testing.assert_close(out["mean"].affine.float(), affine)
    # after decollation, MONAI's FlattenSubKeysd lifts mean/std to top-level keys
    item = FlattenSubKeysd(keys="pred", prefix="pred")({"pred": {"mean": out["mean"][0], "std": out["std"][0]}})
    assert set(item) == {"pred_mean", "pred_std"}


def test_input_is_never_modified():
    x = torch.randn(1, 2, 6, 5, 4)
    before = x.clone()
    # SimpleInferer + identity: the network output aliases the input, in-place activation must not touch it
    for tta in (False, True):
        out = FlipTTAInferer(base_inferer=SimpleInferer(), tta=tta)(x, lambda t: t)
        torch.testing.assert_close(out, torch.sigmoid(before))
        assert torch.equal(x, before)


def test_the_window_is_configured_once_in_the_base_inferer():
    """Window, overlap and devices are the base inferer's; flip batching scales a copy, never the original."""
    base = window((4, 4, 4), sw_batch_size=3, sw_device="cpu", device="cpu", overlap=0.25)
    inferer = FlipTTAInferer(base, flip_batch_size=8)
    assert inferer.base_inferer is base
    calls: list[int] = []
    out = inferer(torch.randn(1, 1, 6, 5, 4), lambda t: (calls.append(t.shape[0]), t)[1])
    assert out.device.type == "cpu"
    assert max(calls) == 3 * 8 and base.sw_batch_size == 3  # one network call sees one window of each flip
    # where the windows run decides the default flip grouping: all flips at once on CUDA, one by one on CPU
    x = torch.zeros(1, 1, 4, 4, 4)
    assert FlipTTAInferer(window(4, sw_device="cuda")).group_size(x) > 8
    assert FlipTTAInferer(window(4, sw_device="cuda")).network_device_type(x) == "cuda"
    assert FlipTTAInferer(window(4)).group_size(x) == 1


def test_bad_arguments():
    with pytest.raises(TypeError, match="MONAI Inferer"):
        FlipTTAInferer((8, 8, 8))  # a window size instead of an inferer: one way to configure the window
    with pytest.raises(ValueError, match="activation"):
        FlipTTAInferer(window(4), activation="relu")
    with pytest.raises(ValueError, match="flip_batch_size"):
        FlipTTAInferer(window(4), flip_batch_size=0)
    with pytest.raises(TypeError, match="tensor"):
        FlipTTAInferer(window((-1, -1)))(torch.zeros(1, 1, 4, 4), lambda t: {"a": t})
