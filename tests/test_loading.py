"""The fast load path: ISA-L gzip decoding of a case's files at once, int16 until after the brain crop.

Both must leave train.yaml's preprocessing output exactly as MONAI's plain path gives it (MONAI's
``NibabelReader`` one file after the other, float32 from the start): same voxels to the last bit,
same metadata, on phantoms in every NIfTI variant and on a real BraTS case when ../shared is there.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import shared_samples_dir
from monai.bundle import ConfigParser
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    Lambdad,
    LoadImage,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
)
from monai.utils import ensure_tuple

from bundle.constants import MODALITIES
from bundle.data import demo_affine, make_phantom
from bundle.transforms import (
    ConcurrentNibabelReader,
    LabelsToRegionsd,
    ToInternalConventiond,
    ZScoreIntensityd,
    is_positive_numpy,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BRATS_SAMPLES = shared_samples_dir()
META_KEYS = ("affine", "original_affine", "spatial_shape", "pixdim", "original_channel_dim", "filename_or_obj")


def write_case(folder: Path, shape=(40, 44, 36), seed: int = 0) -> dict[str, object]:
    """A phantom case as BraTS 2021 writes it: four int16 .nii.gz files and a uint8 label, LPS affine."""
    folder.mkdir(parents=True, exist_ok=True)
    image, label = make_phantom(seed, shape)
    affine = demo_affine(shape, (1.0, 1.0, 1.0))
    files = []
    for channel, modality in enumerate(MODALITIES):
        path = folder / f"case_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(image[channel].astype(np.int16), affine), path)
        files.append(str(path))
    label_path = folder / "case_seg.nii.gz"
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), label_path)
    return {"image": files, "label": str(label_path)}


def same_image(a, b) -> None:
    """Equal voxels (bit for bit), dtype, shape and metadata."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    for key in META_KEYS:
        if key in a.meta or key in b.meta:
            np.testing.assert_array_equal(np.asarray(a.meta[key]), np.asarray(b.meta[key]), err_msg=key)


def variants(tmp_path: Path) -> dict[str, object]:
    """One file or a list of files in each NIfTI variant a dataset may hold."""
    case = write_case(tmp_path / "case")
    rng = np.random.default_rng(1)
    affine = np.diag([-1.2, -1.0, 2.0, 1.0])
    data = rng.integers(-50, 900, size=(9, 8, 7)).astype(np.int16)
    out: dict[str, object] = {"four .nii.gz (a BraTS case)": case["image"], "label": case["label"]}
    plain = tmp_path / "float.nii"
    nib.save(nib.Nifti1Image(rng.normal(size=(9, 8, 7)).astype(np.float32), affine), plain)
    out["uncompressed float32 .nii"] = str(plain)
    scaled = nib.Nifti1Image(data, affine)
    scaled.header.set_slope_inter(0.5, 3.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    out["scaled int16 .nii.gz"] = str(tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti2Image(data, affine), tmp_path / "nifti2.nii.gz")
    out["NIfTI-2 .nii.gz"] = str(tmp_path / "nifti2.nii.gz")
    big_endian = nib.Nifti1Image(data.astype(">i2"), affine)
    nib.save(big_endian, tmp_path / "big_endian.nii.gz")
    out["big-endian .nii.gz"] = str(tmp_path / "big_endian.nii.gz")
    four_d = rng.integers(0, 500, size=(9, 8, 7, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(four_d, affine), tmp_path / "four_d.nii.gz")
    out["one 4-D .nii.gz (MSD)"] = str(tmp_path / "four_d.nii.gz")
    return out


@pytest.mark.parametrize("dtype", [None, np.float32])
def test_concurrent_reader_gives_monai_nibabel_reader_output(tmp_path, dtype):
    """Every variant: the same array, dtype and metadata as MONAI's reader (one file at a time, zlib)."""
    for files in variants(tmp_path).values():
        ours = LoadImage(reader=ConcurrentNibabelReader(), dtype=dtype, image_only=True)(files)
        monai = LoadImage(reader=NibabelReader(), dtype=dtype, image_only=True)(files)
        same_image(ours, monai)


def test_concurrent_reader_refuses_options_it_cannot_honour():
    """nibabel.load options (mmap) do not apply to decompressed bytes: an error, not ignored."""
    with pytest.raises(ValueError, match="mmap"):
        ConcurrentNibabelReader(mmap=False)


def plain_preprocessing() -> Compose:
    """train.yaml's preprocessing as it was before the fast path: MONAI's reader, float32 from the load."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys, reader=NibabelReader(), ensure_channel_first=True, image_only=True),
            ToInternalConventiond(image_key="image", label_key="label"),
            EnsureTyped("image", dtype=torch.float32),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            CropForegroundd(keys, source_key="image", allow_smaller=True),
            Lambdad(keys, func=lambda x: x.contiguous()),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
            LabelsToRegionsd("label"),
        ]
    )


def train_yaml_preprocessing() -> Compose:
    """configs/train.yaml's deterministic_transforms, as training and inference parse them."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    return Compose(parser.get_parsed_content("deterministic_transforms"))


def assert_same_preprocessing(item: dict[str, object]) -> None:
    ours = train_yaml_preprocessing()(dict(item))
    plain = plain_preprocessing()(dict(item))
    for key in ("image", "label"):
        same_image(ours[key], plain[key])
        assert ours[key].is_contiguous()
        # what Invertd undoes at inference: the same operations with the same sizes
        assert [(op["class"], op["orig_size"]) for op in ours[key].applied_operations] == [
            (op["class"], op["orig_size"]) for op in plain[key].applied_operations
        ]
    assert ours["image"].dtype == torch.float32


def test_train_yaml_preprocessing_equals_the_plain_float32_path_on_a_phantom(tmp_path):
    assert_same_preprocessing(write_case(tmp_path / "case"))


@pytest.mark.slow  # two full BraTS loads: 10-20 s on a busy 2-core machine
@pytest.mark.skipif(BRATS_SAMPLES is None, reason="needs ../shared/brats_samples")
def test_train_yaml_preprocessing_equals_the_plain_float32_path_on_a_real_case():
    case = sorted(p for p in BRATS_SAMPLES.iterdir() if p.is_dir())[0]
    files = {p.name.rsplit("_", 1)[1].split(".")[0]: str(p) for p in case.glob("*.nii.gz")}
    assert_same_preprocessing({"image": [files[m] for m in MODALITIES], "label": files["seg"]})


def test_train_yaml_reads_nifti_with_the_concurrent_reader(tmp_path, monkeypatch):
    """The fast reader is the one train.yaml's loader (training, inference, MONAI Label) uses for NIfTI."""
    calls = []
    original = ConcurrentNibabelReader.read

    def spy(self, data, **kwargs):
        calls.append(data)
        return original(self, data, **kwargs)

    monkeypatch.setattr(ConcurrentNibabelReader, "read", spy)
    item = write_case(tmp_path / "case")
    train_yaml_preprocessing()(dict(item))
    assert [list(ensure_tuple(c)) for c in calls] == [item["image"], [item["label"]]]


def bits(x) -> torch.Tensor:
    """The float32 voxels as their bit patterns: -0.0 and 0.0 differ, NaN equals its own pattern."""
    return torch.as_tensor(x).contiguous().view(torch.int32)


@pytest.mark.parametrize("channel_wise", [True, False])
@pytest.mark.parametrize("source", ["int16", "float32", "numpy", "given_statistics", "all_zero", "constant"])
def test_fast_normalize_is_monai_bit_for_bit(source: str, channel_wise: bool) -> None:
    """ZScoreIntensityd gives MONAI's NormalizeIntensityd output to the last bit, metadata and dtype included."""
    rng = np.random.default_rng(3)
    volume = rng.normal(300.0, 120.0, size=(4, 23, 19, 17)).astype(np.float32)
    volume[:, :5] = 0.0  # background
    volume[volume < 150] = 0.0  # zeros inside the brain too
    volume[1, :, :, 3] = -0.0  # negative zeros stay as they are
    kwargs: dict = {"nonzero": True, "channel_wise": channel_wise}
    if source == "int16":
        data = MetaTensor(torch.from_numpy(volume.astype(np.int16)), affine=demo_affine(volume.shape[1:]))
    elif source == "numpy":
        data = volume
    elif source == "all_zero":
        volume[2] = 0.0
        data = MetaTensor(torch.from_numpy(volume), affine=demo_affine(volume.shape[1:]))
    elif source == "constant":
        volume[3][volume[3] != 0] = 42.0  # std 0: divided by 1, as MONAI does
        data = MetaTensor(torch.from_numpy(volume), affine=demo_affine(volume.shape[1:]))
    else:
        data = MetaTensor(torch.from_numpy(volume), affine=demo_affine(volume.shape[1:]))
        if source == "given_statistics":
            kwargs.update(
                subtrahend=[1.0, 2.0, 3.0, 4.0] if channel_wise else 2.5, divisor=[2.0] * 4 if channel_wise else 2.0
            )
    copy = data.clone() if isinstance(data, torch.Tensor) else data.copy()
    ours = ZScoreIntensityd("image", **kwargs)({"image": data})["image"]
    monai = NormalizeIntensityd("image", **kwargs)({"image": copy})["image"]
    assert type(ours) is type(monai) and ours.dtype == monai.dtype and ours.shape == monai.shape
    assert torch.equal(bits(ours), bits(monai))
    if isinstance(monai, MetaTensor):
        np.testing.assert_array_equal(np.asarray(ours.affine), np.asarray(monai.affine))


def test_fast_normalize_is_the_config_z_score() -> None:
    """Every method's z-score (train.yaml's intensity_transform, M3's) is the fast one."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    assert parser.get_parsed_content("intensity_transform")["zscore"].func is ZScoreIntensityd
    m3 = ConfigParser()
    m3.read_config(
        [str(REPO_ROOT / "configs" / f) for f in ("train.yaml", "train_2d.yaml", "variants/m3_resse_lka_unet.yaml")]
    )
    steps = m3.get_parsed_content("intensity_transform")
    assert list(steps)[-1] == "zscore" and steps["zscore"].func is ZScoreIntensityd


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32, torch.uint8])
def test_crop_foreground_box_is_monai_default(dtype: torch.dtype) -> None:
    """train.yaml's select_fn crops the same box as MONAI's default rule (> 0), negative voxels included."""
    from monai.transforms import CropForeground
    from monai.transforms.utils import is_positive

    rng = np.random.default_rng(5)
    volume = np.zeros((4, 30, 26, 22), dtype=np.float32)
    volume[:, 6:20, 4:17, 9:15] = rng.normal(3.0, 2.0, size=(4, 14, 13, 6))
    volume[2, 25, 2, 1] = -7.0  # a negative voxel outside the rest: not foreground by the rule
    volume[1, 3, 24, 20] = 0.5  # one positive voxel in one channel only: foreground
    image = MetaTensor(torch.from_numpy(volume).to(dtype), affine=demo_affine(volume.shape[1:]))
    assert np.array_equal(is_positive_numpy(image), is_positive(image).numpy())
    ours = CropForeground(select_fn=is_positive_numpy, allow_smaller=True)(image.clone())
    monai = CropForeground(allow_smaller=True)(image.clone())
    assert ours.shape == monai.shape and torch.equal(ours, monai)
    assert ours.applied_operations[-1]["extra_info"]["cropped"] == monai.applied_operations[-1]["extra_info"]["cropped"]
