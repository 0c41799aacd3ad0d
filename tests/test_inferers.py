"""Tests for bundle/inferers.py: flip TTA, regions/classes -> labels, post-processing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SliceInferer, SlidingWindowInferer
from monai.transforms import Compose, FlattenSubKeysd

from bundle.constants import BACKGROUND, ED, ET, NCR
from bundle.inferers import (
    ClassesToLabelsd,
    CloseTumourRegionsd,
    FlipTTAInferer,
    LabelsToSchemed,
    RegionsToLabelsd,
    RemoveSmallTumourComponentsd,
    SmallETComponentsToNCRd,
    SmallETVolumeToNCRd,
    binary_dilation,
    binary_erosion,
    classes_to_labels,
    close_tumour_regions,
    flip_combinations,
    labels_to_scheme,
    regions_to_labels,
    remove_small_tumour_components,
    small_et_components_to_ncr,
    small_et_volume_to_ncr,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
    inferer = FlipTTAInferer(roi_size=(8, 8, 8), sw_batch_size=2, flip_batch_size=flip_batch_size)
    out = inferer(x, lambda t: t)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.sigmoid(x), atol=1e-5, rtol=1e-5)


def test_asymmetric_network_each_flip_is_undone_3d():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 10, 9, 8)
    net = asymmetric_conv(3)
    expected, _ = hand_tta(x, net, (0, 1, 2))
    out = FlipTTAInferer(roi_size=(-1, -1, -1))(x, net)  # one window = whole volume, as the hand computation
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
    out = FlipTTAInferer(roi_size=(-1, -1), flip_batch_size=2)(x, cumsum_net)
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
        FlipTTAInferer(roi_size=(6, 6, 6), sw_batch_size=2, flip_batch_size=fbs, return_std=True)(x, counted(fbs))
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
    FlipTTAInferer(roi_size=(-1, -1, -1), flip_batch_size=flip_batch_size)(x, net)
    assert net.calls == calls
    assert sorted(net.seen) == sorted(flip_combinations((0, 1, 2)))  # each of the 8 flips exactly once


@pytest.mark.parametrize("flip_batch_size, calls", [(1, [1] * 4), (4, [4]), (None, [1] * 4)])
def test_exactly_four_flips_in_2d(flip_batch_size, calls):
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    net = CountingNet(x, (0, 1))
    FlipTTAInferer(roi_size=(-1, -1), flip_batch_size=flip_batch_size)(x, net)
    assert net.calls == calls
    assert sorted(net.seen) == sorted(flip_combinations((0, 1)))


def test_tta_off_is_one_unflipped_pass():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(1, 2, 4, 5, 6)
    net = CountingNet(x, (0, 1, 2))
    FlipTTAInferer(roi_size=(-1, -1, -1), tta=False)(x, net)
    assert net.calls == [1] and net.seen == [()]


def test_chosen_axes_only():
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(1, 2, 4, 5, 6)
    net = CountingNet(x, (0, 1, 2))
    FlipTTAInferer(roi_size=(-1, -1, -1), flip_axes=(2,))(x, net)
    assert sorted(net.seen) == [(), (2,)]
    with pytest.raises(ValueError, match="out of range"):
        FlipTTAInferer(roi_size=(-1, -1), flip_axes=(2,))(torch.zeros(1, 1, 4, 4), lambda t: t)


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
    inv = FlipTTAInferer(roi_size=(5, 5, 5), return_std=True)(x, lambda t: 2.0 * t)
    assert set(inv) == {"mean", "std"}
    assert inv["std"].shape == x.shape and float(inv["std"].abs().max()) < 1e-6
    net = asymmetric_conv(3)
    asym = FlipTTAInferer(roi_size=(-1, -1, -1), return_std=True)(x, net)
    mean, std = hand_tta(x, net, (0, 1, 2))
    assert float(asym["std"].max()) > 0.05
    torch.testing.assert_close(asym["std"], std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(asym["mean"], mean, atol=1e-5, rtol=1e-5)


def test_softmax_activation_and_deep_supervision_tuple():
    torch.manual_seed(7)
    x = torch.randn(1, 2, 8, 8, 6)
    net = asymmetric_conv(3, channels_out=4)
    expected, _ = hand_tta(x, net, (0, 1, 2), activation=lambda t: torch.softmax(t, 1))
    out = FlipTTAInferer(roi_size=(-1, -1, -1), activation="softmax")(x, lambda t: (net(t), net(t) * 0))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 8, 8, 6))
    raw = FlipTTAInferer(roi_size=(-1, -1, -1), activation=None, tta=False)(x, net)
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

    ref = FlipTTAInferer(roi_size=(6, 6, 6))(x, net)
    assert set(dtypes) == {torch.float32}  # CPU default: autocast disabled
    dtypes.clear()
    out = FlipTTAInferer(roi_size=(6, 6, 6), amp_dtype="bfloat16")(x, net)
    assert set(dtypes) == {torch.bfloat16}  # autocast really engaged
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.03, rtol=0.0)
    dtypes.clear()
    FlipTTAInferer(roi_size=(6, 6, 6), amp=False, amp_dtype="bfloat16")(x, net)
    assert set(dtypes) == {torch.float32}


def test_metatensor_metadata_kept_and_flattened_for_post_transforms():
    affine = torch.diag(torch.tensor([-1.0, -1.0, 2.0, 1.0]))
    x = MetaTensor(torch.randn(1, 2, 6, 6, 6), affine=affine)
    out = FlipTTAInferer(roi_size=(4, 4, 4), return_std=True)(x, asymmetric_conv(3))
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


def test_devices_pass_through_to_the_sliding_window():
    inferer = FlipTTAInferer(roi_size=(4, 4, 4), sw_batch_size=3, sw_device="cpu", device="cpu", overlap=0.25)
    base = inferer.base_inferer
    assert isinstance(base, SlidingWindowInferer)
    assert (base.sw_device, base.device, base.sw_batch_size, base.overlap, base.mode) == (
        "cpu",
        "cpu",
        3,
        0.25,
        "gaussian",
    )
    out = inferer(torch.randn(1, 1, 6, 5, 4), lambda t: t)
    assert out.device.type == "cpu"


def test_bad_arguments():
    with pytest.raises(ValueError, match="roi_size"):
        FlipTTAInferer()
    with pytest.raises(ValueError, match="activation"):
        FlipTTAInferer(roi_size=4, activation="relu")
    with pytest.raises(ValueError, match="flip_batch_size"):
        FlipTTAInferer(roi_size=4, flip_batch_size=0)
    with pytest.raises(TypeError, match="tensor"):
        FlipTTAInferer(roi_size=(-1, -1))(torch.zeros(1, 1, 4, 4), lambda t: {"a": t})


# ------------------------------------------------------------------------------------------------
# regions / classes -> labels
# ------------------------------------------------------------------------------------------------

# (p(WT), p(TC), p(ET)) -> internal label; each threshold just below / just above
RULE_CASES = [
    ((0.449, 0.99, 0.99), BACKGROUND),  # WT just below: background whatever TC/ET say
    ((0.451, 0.399, 0.99), ED),  # WT just above, TC just below: edema even with high ET
    ((0.451, 0.401, 0.449), NCR),  # TC just above, ET just below
    ((0.451, 0.401, 0.451), ET),  # ET just above
    ((0.10, 0.10, 0.10), BACKGROUND),
    ((0.99, 0.99, 0.99), ET),
]


def _prob_map(cases) -> torch.Tensor:
    """One voxel per case along the first spatial axis: shape (3, n, 1, 1)."""
    return torch.tensor([c for c, _ in cases], dtype=torch.float32).T[:, :, None, None]


def test_region_rule_every_branch():
    probs = _prob_map(RULE_CASES)
    labels = regions_to_labels(probs)
    assert labels.shape == (1, len(RULE_CASES), 1, 1) and labels.dtype == torch.float32
    assert labels.flatten().tolist() == [lab for _, lab in RULE_CASES]


def test_region_thresholds_are_arguments():
    probs = _prob_map([((0.3, 0.3, 0.3), None)])
    assert regions_to_labels(probs).flatten().tolist() == [BACKGROUND]
    assert regions_to_labels(probs, 0.25).flatten().tolist() == [ED]
    assert regions_to_labels(probs, 0.25, 0.25).flatten().tolist() == [NCR]
    assert regions_to_labels(probs, 0.25, 0.25, 0.25).flatten().tolist() == [ET]


@pytest.mark.parametrize(
    "scheme, values",
    [
        ("internal", [0, 2, 1, 3]),
        ("brats2021", [0, 2, 1, 4]),
        ("brats2023", [0, 2, 1, 3]),
        ("msd", [0, 1, 2, 3]),  # MSD: 1 edema, 2 non-enhancing, 3 enhancing
    ],
)
def test_label_schemes(scheme, values):
    probs = _prob_map(RULE_CASES[:4])
    assert regions_to_labels(probs, scheme=scheme).flatten().tolist() == values
    internal = regions_to_labels(probs)
    assert labels_to_scheme(internal, scheme).flatten().tolist() == values
    out = LabelsToSchemed("label", scheme=scheme)({"label": internal})["label"]
    assert out.flatten().tolist() == values
    # classes: argmax over (bg, NCR, ED, ET) probabilities, same scheme mapping
    onehot = torch.eye(4)[[BACKGROUND, ED, NCR, ET]].T[:, :, None, None] * 0.7 + 0.1
    assert classes_to_labels(onehot, scheme=scheme).flatten().tolist() == values


def test_label_dict_transforms_and_numpy():
    probs = _prob_map(RULE_CASES)
    d = RegionsToLabelsd("pred", output_keys="label", scheme="brats2021")({"pred": probs})
    assert torch.equal(d["pred"], probs)  # probabilities kept for post-processing
    assert d["label"].flatten().tolist() == [0, 2, 1, 4, 0, 4]
    lab_np = regions_to_labels(probs.numpy(), scheme="brats2021")
    assert isinstance(lab_np, np.ndarray) and lab_np.ravel().tolist() == [0, 2, 1, 4, 0, 4]
    cls = ClassesToLabelsd("pred")({"pred": torch.eye(4)[:, :, None]})["pred"]
    assert cls.flatten().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="scheme"):
        RegionsToLabelsd("pred", scheme="brats2019")
    with pytest.raises(ValueError, match="region channels"):
        regions_to_labels(torch.zeros(4, 2, 2))


# ------------------------------------------------------------------------------------------------
# post-processing
# ------------------------------------------------------------------------------------------------


def _blank(shape=(20, 20, 20), dtype=torch.int64, device="cpu"):
    return torch.zeros((1, *shape), dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_small_low_confidence_et_becomes_ncr(device, dtype):
    lab = _blank(dtype=dtype, device=device)
    prob = torch.zeros((1, 20, 20, 20), device=device)
    lab[0, 1:3, 1:3, 1:3] = ET  # 8 voxels, low confidence -> NCR
    prob[0, 1:3, 1:3, 1:3] = 0.6
    lab[0, 10:12, 1:3, 1:3] = ET  # 8 voxels, confident -> stays
    prob[0, 10:12, 1:3, 1:3] = 0.95
    lab[0, 10:14, 10:14, 10:14] = ET  # 64 voxels, low confidence but large -> stays
    prob[0, 10:14, 10:14, 10:14] = 0.6
    lab[0, 1:4, 10:15, 1:2] = ET  # 15 voxels (just below 16), low confidence -> NCR
    prob[0, 1:4, 10:15, 1:2] = 0.6
    lab[0, 1:5, 1:5, 15:16] = ET  # 16 voxels (= threshold, not smaller) -> stays
    prob[0, 1:5, 1:5, 15:16] = 0.6
    lab[0, 18, 18, 18] = ED  # other labels untouched
    out = small_et_components_to_ncr(lab, prob, min_size=16, prob_threshold=0.9)
    assert out.dtype == dtype and out.device == lab.device and out.shape == lab.shape
    o = out[0].cpu()
    assert (o[1:3, 1:3, 1:3] == NCR).all()
    assert (o[1:4, 10:15, 1:2] == NCR).all()
    assert (o[10:12, 1:3, 1:3] == ET).all()
    assert (o[10:14, 10:14, 10:14] == ET).all()
    assert (o[1:5, 1:5, 15:16] == ET).all()
    assert o[18, 18, 18] == ED
    assert int((o != lab[0].cpu()).sum()) == 8 + 15
    # the paper's other threshold: 73 voxels also demotes the 64-voxel blob
    out73 = small_et_components_to_ncr(lab, prob, min_size=73)
    assert (out73[0, 10:14, 10:14, 10:14] == NCR).all()


def test_small_et_components_dict_uses_et_channel_of_probabilities():
    lab = _blank()
    lab[0, 1:3, 1:3, 1:3] = ET
    probs = torch.zeros(3, 20, 20, 20)
    probs[2, 1:3, 1:3, 1:3] = 0.95  # ET channel (region order WT, TC, ET) is confident
    probs[0, 1:3, 1:3, 1:3] = 0.1
    d = {"label": lab, "pred": probs}
    assert torch.equal(SmallETComponentsToNCRd("label", prob_key="pred")(d)["label"], lab)
    # read from the wrong channel the same blob looks unconfident and is demoted
    demoted = SmallETComponentsToNCRd("label", prob_key="pred", et_channel=0)(d)["label"]
    assert (demoted[0, 1:3, 1:3, 1:3] == NCR).all()
    assert torch.equal(SmallETComponentsToNCRd("label", et_channel=0, enabled=False)(d)["label"], lab)


def test_total_et_below_threshold_becomes_ncr():
    lab = _blank()
    lab[0, 5:15, 5:15, 5:15] = ED
    lab[0, 8:10, 8:10, 8:10] = ET  # 8 ET voxels in the whole case
    lab[0, 12, 12, 12] = ET  # 9 in total, in two components
    out = small_et_volume_to_ncr(lab, min_volume=10)
    assert int((out == ET).sum()) == 0 and int((out == NCR).sum()) == 9
    assert torch.equal(out == ED, lab == ED)
    assert torch.equal(small_et_volume_to_ncr(lab, min_volume=9), lab)  # 9 is not below 9
    empty = _blank()
    assert torch.equal(SmallETVolumeToNCRd("label", min_volume=10)({"label": empty})["label"], empty)
    assert torch.equal(SmallETVolumeToNCRd("label", min_volume=10, enabled=False)({"label": lab})["label"], lab)


@pytest.mark.parametrize("device", DEVICES)
def test_small_isolated_tumour_component_removed_big_one_stays(device):
    lab = _blank(dtype=torch.float32, device=device)
    lab[0, 2:8, 2:8, 2:8] = ED  # 216 voxels, mixed labels: one whole-tumour component
    lab[0, 4:6, 4:6, 4:6] = ET
    lab[0, 3, 3, 3] = NCR
    lab[0, 15:17, 15:17, 15] = ET  # 4 isolated voxels
    lab[0, 15, 2, 2] = NCR  # 1 isolated voxel
    out = remove_small_tumour_components(lab, min_size=10)
    assert out.device == lab.device and out.dtype == lab.dtype
    assert torch.equal(out[0, 2:8, 2:8, 2:8], lab[0, 2:8, 2:8, 2:8])
    assert int((out[0, 12:, :, :] != 0).sum()) == 0
    # a 4-voxel component is kept by min_size=4 (only strictly smaller components go)
    assert int((remove_small_tumour_components(lab, min_size=4)[0, 15:17, 15:17, 15] == ET).sum()) == 4


def test_component_connectivity():
    lab = _blank()
    lab[0, 2:8, 2:8, 2:8] = ED
    lab[0, 8, 8, 8] = ET  # touches the cube only at a corner
    full = RemoveSmallTumourComponentsd("label", min_size=10)({"label": lab})["label"]
    assert full[0, 8, 8, 8] == ET  # 26-connectivity: part of the big component
    faces = RemoveSmallTumourComponentsd("label", min_size=10, connectivity=1)({"label": lab})["label"]
    assert faces[0, 8, 8, 8] == BACKGROUND  # 6-connectivity: isolated single voxel
    off = RemoveSmallTumourComponentsd("label", min_size=10, connectivity=1, enabled=False)({"label": lab})
    assert torch.equal(off["label"], lab)


@pytest.mark.parametrize("device", DEVICES)
def test_closing_fills_one_voxel_hole(device):
    lab = _blank(dtype=torch.uint8, device=device)
    lab[0, 2:9, 2:9, 2:9] = ED
    lab[0, 5, 5, 5] = BACKGROUND  # hole inside edema -> ED
    lab[0, 11:18, 11:18, 11:18] = ET
    lab[0, 14, 14, 14] = BACKGROUND  # hole inside ET -> ET
    out = close_tumour_regions(lab)
    assert out.dtype == torch.uint8 and out.device == lab.device
    expected = lab.clone()
    expected[0, 5, 5, 5] = ED
    expected[0, 14, 14, 14] = ET
    assert torch.equal(out, expected)
    assert torch.equal(CloseTumourRegionsd("label", enabled=False)({"label": lab})["label"], lab)
    assert torch.equal(CloseTumourRegionsd("label")({"label": lab})["label"], expected)


@pytest.mark.parametrize("shape, filter_size", [((9, 8, 7), 3), ((9, 8, 7), 5), ((11, 10), 3), ((11, 10), 5)])
def test_boolean_morphology_equals_monai(shape, filter_size):
    from monai.transforms.utils_morphological_ops import dilate, erode

    torch.manual_seed(9)
    radius = filter_size // 2
    # sparse masks for dilation, dense ones for erosion: otherwise both saturate and the check is void
    for density in (0.05, 0.9):
        mask = torch.rand(2, 1, *shape) < density
        before = mask.clone()
        ours_d = binary_dilation(mask, radius, len(shape))
        ours_e = binary_erosion(mask, radius, len(shape))
        assert torch.equal(mask, before)  # inputs are not modified in place
        # MONAI's versions, one channel per item (they sum over channels)
        assert torch.equal(ours_d, dilate(mask.float(), filter_size) > 0.5)
        assert torch.equal(ours_e, erode(mask.float(), filter_size) > 0.5)
        changed = ours_d if density < 0.5 else ~ours_e
        assert 0 < changed.float().mean() < 1 and not torch.equal(changed, mask if density < 0.5 else ~mask)


def test_closing_on_the_bounding_box_equals_closing_on_the_whole_volume():
    torch.manual_seed(10)
    lab = torch.zeros(1, 30, 30, 30, dtype=torch.int64)
    blob = torch.randint(0, 4, (12, 12, 12)) * (torch.rand(12, 12, 12) > 0.3)
    lab[0, 0:12, 10:22, 17:29] = blob  # touching one border of the volume, close to another
    out = close_tumour_regions(lab, filter_size=5)
    # reference: the same rule on the whole volume with MONAI's morphology (no cropping)
    from monai.transforms.utils_morphological_ops import dilate, erode

    regions = torch.stack([lab[0] != BACKGROUND, (lab[0] == NCR) | (lab[0] == ET), lab[0] == ET])[:, None].float()
    closed = erode(dilate(regions, 5), 5)[:, 0] > 0.5
    ref = torch.where(closed[0], ED, BACKGROUND)
    ref = torch.where(closed[0] & closed[1], NCR, ref)
    ref = torch.where(closed[0] & closed[1] & closed[2], ET, ref)
    assert torch.equal(out[0], ref)
    assert not torch.equal(out, lab)
    assert ((out != BACKGROUND) | (lab == BACKGROUND)).all()  # closing never removes tumour
    with pytest.raises(ValueError, match="odd"):
        close_tumour_regions(lab, filter_size=4)


def test_post_processing_keeps_numpy_and_metatensor():
    lab = np.zeros((1, 10, 10, 10), dtype=np.int16)
    lab[0, 1, 1, 1] = ET
    lab[0, 5:9, 5:9, 5:9] = ED
    out = remove_small_tumour_components(lab, min_size=5)
    assert isinstance(out, np.ndarray) and out.dtype == np.int16 and out[0, 1, 1, 1] == 0
    affine = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    meta = MetaTensor(torch.as_tensor(lab).float(), affine=affine)
    for fn in (
        lambda m: remove_small_tumour_components(m, 5),
        lambda m: small_et_volume_to_ncr(m, 5),
        lambda m: small_et_components_to_ncr(m, torch.zeros(10, 10, 10)),
        close_tumour_regions,
    ):
        res = fn(meta)
        assert isinstance(res, MetaTensor), fn
        torch.testing.assert_close(res.affine.float(), affine)


def test_full_post_processing_chain():
    """Regions -> internal labels -> M4 clean-up -> BraTS 2021 values, as the inference config composes it."""
    probs = torch.zeros(3, 16, 16, 16)
    probs[:, 2:10, 2:10, 2:10] = torch.tensor([0.9, 0.8, 0.1])[:, None, None, None]  # NCR block
    probs[:, 4:8, 4:8, 4:8] = torch.tensor([0.9, 0.8, 0.95])[:, None, None, None]  # confident ET inside
    probs[:, 13, 13, 13] = torch.tensor([0.9, 0.9, 0.6])  # isolated unconfident ET voxel
    chain = Compose(
        [
            RegionsToLabelsd("pred", output_keys="label"),
            SmallETComponentsToNCRd("label", prob_key="pred"),
            SmallETVolumeToNCRd("label", min_volume=10),
            RemoveSmallTumourComponentsd("label", min_size=5),
            CloseTumourRegionsd("label"),
            LabelsToSchemed("label", scheme="brats2021"),
        ]
    )
    lab = chain({"pred": probs})["label"]
    assert set(torch.unique(lab).tolist()) == {0, 1, 4}
    assert int((lab == 4).sum()) == 64 and int((lab == 1).sum()) == 8**3 - 64
    assert lab[0, 13, 13, 13] == 0
