"""Dataset discovery, case checks, folds, label schemes and the demo generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import AFFINE, SHAPE, shared_samples_dir, write_brats_case

from bundle.constants import LABEL_SCHEMES, MODALITIES
from bundle.data import (
    assign_folds,
    detect_layout,
    discover_cases,
    generate_demo_dataset,
    load_split,
    make_datalist,
    make_phantom,
    prepare,
    select_cases,
)
from bundle.errors import DataError
from bundle.transforms import LabelsToRegionsd, ToInternalConventiond, map_label_values

# ------------------------------------------------------------------------------------ discovery


def test_discovers_brats2021(brats2021_dir: Path) -> None:
    assert detect_layout(brats2021_dir) == "brats2021"
    datalist = make_datalist(brats2021_dir, folds=3, seed=1)
    assert datalist["layout"] == "brats2021"
    assert [i["case_id"] for i in datalist["training"]] == [f"BraTS2021_{i:05d}" for i in range(3)]
    assert [i["case_id"] for i in datalist["testing"]] == ["BraTS2021_09999"]
    first = datalist["training"][0]
    # canonical modality order, whatever order the files are listed in
    assert [Path(p).name for p in first["image"]] == [f"BraTS2021_00000_{m}.nii.gz" for m in MODALITIES]
    assert Path(first["label"]).name == "BraTS2021_00000_seg.nii.gz"
    assert sorted(i["fold"] for i in datalist["training"]) == [0, 1, 2]


def test_discovers_brats2023(brats2023_dir: Path) -> None:
    assert detect_layout(brats2023_dir) == "brats2023"
    datalist = make_datalist(brats2023_dir, folds=2)
    first = datalist["training"][0]
    assert [Path(p).name.split("-")[-1] for p in first["image"]] == [
        "t1n.nii.gz",
        "t1c.nii.gz",
        "t2w.nii.gz",
        "t2f.nii.gz",
    ]
    assert first["layout"] == "brats2023"


def test_discovers_msd(msd_dir: Path) -> None:
    assert detect_layout(msd_dir) == "msd"
    datalist = make_datalist(msd_dir, folds=3)
    assert len(datalist["training"]) == 3 and len(datalist["testing"]) == 1
    item = datalist["training"][0]
    assert isinstance(item["image"], str) and item["image"].endswith("imagesTr/BRATS_000.nii.gz")
    assert item["label"].endswith("labelsTr/BRATS_000.nii.gz")


def test_single_case_folder(make_brats_case) -> None:
    case_dir = make_brats_case("Single_1", "brats2023", with_label=False)
    assert detect_layout(case_dir) == "case"
    cases = discover_cases(case_dir)
    assert len(cases) == 1 and cases[0].layout == "brats2023" and cases[0].label is None


def test_unknown_layout_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty_case").mkdir()
    with pytest.raises(DataError, match=str(tmp_path)):
        detect_layout(tmp_path)


def test_prepare_writes_datalist(brats2021_dir: Path, tmp_path: Path) -> None:
    out = prepare(str(brats2021_dir), str(tmp_path / "out" / "datalist.json"), folds=3, seed=42)
    data = json.loads(Path(out).read_text())
    assert data["num_folds"] == 3 and len(data["training"]) == 3
    assert not list((tmp_path / "out").glob("*.tmp"))
    val = load_split(out, fold=1, split="val")
    train = load_split(out, fold=1, split="train")
    assert len(val) == 1 and len(train) == 2
    assert {i["case_id"] for i in val}.isdisjoint(i["case_id"] for i in train)
    with pytest.raises(DataError, match="fold 5"):
        load_split(out, fold=5, split="val")


@pytest.fixture(scope="module")
def ten_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten labelled BraTS 2021 cases and one without a segmentation."""
    root = tmp_path_factory.mktemp("ten")
    for i in range(10):
        write_brats_case(root, f"Case_{i:03d}", "brats2021")
    write_brats_case(root, "Case_900", "brats2021", with_label=False)
    return root


def test_holdout_is_a_seeded_test_set_outside_every_fold(ten_cases: Path, tmp_path: Path) -> None:
    """M4 holds out 20 %: two of ten labelled cases, in no fold; the folds share the rest."""
    data = make_datalist(ten_cases, folds=4, seed=42, holdout_fraction=0.2)
    held = [i["case_id"] for i in data["holdout"]]
    training = [i["case_id"] for i in data["training"]]
    assert len(held) == 2 and len(training) == 8 and not set(held) & set(training)
    assert [i["case_id"] for i in data["testing"]] == ["Case_900"]
    assert all("fold" not in i and i["label"] for i in data["holdout"])
    assert sorted({i["fold"] for i in data["training"]}) == [0, 1, 2, 3]
    assert data == make_datalist(ten_cases, folds=4, seed=42, holdout_fraction=0.2), "seeded"
    assert held != [i["case_id"] for i in make_datalist(ten_cases, folds=4, seed=7, holdout_fraction=0.2)["holdout"]]
    # no hold-out: the folds of earlier versions, exactly
    plain = make_datalist(ten_cases, folds=4, seed=42)
    assert "holdout" not in plain and [i["fold"] for i in plain["training"]] == assign_folds(10, 4, 42)
    # the splits, through the datalist file
    path = prepare(str(ten_cases), str(tmp_path / "d.json"), folds=4, holdout_fraction=0.2)
    assert [i["case_id"] for i in load_split(path, split="holdout")] == held
    assert [i["case_id"] for i in select_cases(datalist=path, split="holdout", labelled=True)] == held
    everything = {i["case_id"] for i in select_cases(datalist=path)}
    assert everything == {f"Case_{i:03d}" for i in (*range(10), 900)}


def test_subset_is_a_seeded_part_of_the_labelled_cases_and_only_it_is_read(ten_cases: Path, tmp_path: Path) -> None:
    """M3 trains on a random 10 % of BraTS 2021 (seed 42): here 30 % of ten, chosen before any check."""
    data = make_datalist(ten_cases, folds=2, subset_fraction=0.3, subset_seed=42)
    chosen = [i["case_id"] for i in data["training"]]
    assert len(chosen) == 3 and data["subset_fraction"] == 0.3 and data["subset_seed"] == 42
    assert chosen == [i["case_id"] for i in make_datalist(ten_cases, folds=2, subset_fraction=0.3)["training"]]
    other = [i["case_id"] for i in make_datalist(ten_cases, folds=2, subset_fraction=0.3, subset_seed=1)["training"]]
    assert other != chosen
    assert chosen == sorted(chosen), "kept in discovery order"
    # a broken case outside the subset is never read; inside it, it stops the run
    copy = tmp_path / "copy"
    shutil.copytree(ten_cases, copy)
    outside = next(f"Case_{i:03d}" for i in range(10) if f"Case_{i:03d}" not in chosen)
    (copy / outside / f"{outside}_t2.nii.gz").write_bytes(b"not a NIfTI file")
    assert [i["case_id"] for i in make_datalist(copy, folds=2, subset_fraction=0.3)["training"]] == chosen
    (copy / chosen[0] / f"{chosen[0]}_t2.nii.gz").write_bytes(b"not a NIfTI file")
    with pytest.raises(DataError, match=chosen[0]):
        make_datalist(copy, folds=2, subset_fraction=0.3)


@pytest.mark.parametrize("key", ["holdout_fraction", "subset_fraction"])
def test_a_fraction_outside_0_1_is_one_sentence(ten_cases: Path, key: str) -> None:
    with pytest.raises(DataError, match=rf"^{key}: 1\.5 is not a fraction between 0 and 1$"):
        make_datalist(ten_cases, **{key: 1.5})


def test_prepare_command_takes_the_holdout_and_subset(ten_cases: Path, tmp_path: Path) -> None:
    import fire

    from bundle.integrations.cli import COMMANDS

    out = tmp_path / "d.json"
    args = ["prepare", str(ten_cases), "--output", str(out), "--folds", "2", "--holdout_fraction", "0.2"]
    fire.Fire(COMMANDS, command=[*args, "--subset_fraction", "0.5", "--subset_seed", "3"])
    data = json.loads(out.read_text())
    assert len(data["holdout"]) == 1 and len(data["training"]) == 4
    assert (data["holdout_fraction"], data["subset_fraction"], data["subset_seed"]) == (0.2, 0.5, 3)


def test_folds_are_deterministic_and_balanced() -> None:
    a = assign_folds(23, 5, seed=42)
    assert a == assign_folds(23, 5, seed=42)
    assert a != assign_folds(23, 5, seed=43)
    counts = np.bincount(a, minlength=5)
    assert counts.max() - counts.min() <= 1


# ------------------------------------------------------------------------------------ bad cases


def _case_file(case_dir: Path, suffix: str) -> Path:
    return next(case_dir.glob(f"*_{suffix}.nii.gz"))


def test_missing_modality(brats2021_dir: Path) -> None:
    missing = _case_file(brats2021_dir / "BraTS2021_00001", "t1ce")
    missing.unlink()
    with pytest.raises(DataError, match=r"BraTS2021_00001_t1ce\.nii\.gz: missing modality t1ce"):
        make_datalist(brats2021_dir)


def test_shape_mismatch(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00002", "t2")
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 9), np.float32), AFFINE), path)
    with pytest.raises(DataError, match=r"_t2\.nii\.gz: shape \(10, 12, 9\) differs"):
        make_datalist(brats2021_dir)


def test_affine_mismatch(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00000", "flair")
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), shifted), path)
    with pytest.raises(DataError, match=r"_flair\.nii\.gz: affine differs"):
        make_datalist(brats2021_dir)


def test_small_affine_difference_is_tolerated(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00000", "flair")
    nudged = AFFINE.copy()
    nudged[0, 3] = 1e-5  # float noise between modalities written by different tools
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), nudged), path)
    assert len(make_datalist(brats2021_dir)["training"]) == 3


def test_unknown_label_values(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00001", "seg")
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1] = 3  # 3 is not a BraTS 2021 value (ET is 4)
    nib.save(nib.Nifti1Image(label, AFFINE), path)
    with pytest.raises(DataError, match=r"_seg\.nii\.gz: unknown label values \[3\] for the brats2021 layout"):
        make_datalist(brats2021_dir)


def test_label_shape_mismatch(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00001", "seg")
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 7), np.uint8), AFFINE), path)
    with pytest.raises(DataError, match=r"_seg\.nii\.gz: label shape"):
        make_datalist(brats2021_dir)


def test_empty_file(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00002", "t1")
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"_t1\.nii\.gz: file is empty"):
        make_datalist(brats2021_dir)


def test_corrupt_file(brats2021_dir: Path) -> None:
    path = _case_file(brats2021_dir / "BraTS2021_00002", "t1")
    path.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(DataError, match=r"_t1\.nii\.gz: not a readable NIfTI"):
        make_datalist(brats2021_dir)


def test_msd_wrong_channel_count(msd_dir: Path) -> None:
    path = msd_dir / "imagesTr" / "BRATS_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 3), np.float32), AFFINE), path)
    with pytest.raises(DataError, match=r"BRATS_001\.nii\.gz: expected a 4-D image with 4 channels"):
        make_datalist(msd_dir)


def test_msd_missing_label(msd_dir: Path) -> None:
    (msd_dir / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/BRATS_002\.nii\.gz: missing label"):
        make_datalist(msd_dir)


def test_skip_bad_cases_with_warning(brats2021_dir: Path) -> None:
    _case_file(brats2021_dir / "BraTS2021_00001", "t2").unlink()
    with pytest.warns(UserWarning, match="skipping case BraTS2021_00001"):
        datalist = make_datalist(brats2021_dir, skip_bad=True)
    assert [i["case_id"] for i in datalist["training"]] == ["BraTS2021_00000", "BraTS2021_00002"]


# ---------------------------------------------------------------------------------- label schemes


@pytest.mark.parametrize(
    ("scheme", "raw", "expected"),
    [
        ("brats2021", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
        ("msd", [0, 1, 2, 3], [0, 2, 1, 3]),  # MSD: 1 edema, 2 non-enhancing, 3 enhancing
    ],
)
def test_label_mapping(scheme: str, raw: list[int], expected: list[int]) -> None:
    label = torch.tensor(raw).view(1, -1, 1, 1)
    assert map_label_values(label, scheme).flatten().tolist() == expected
    assert map_label_values(label.numpy(), scheme).flatten().tolist() == expected


def test_label_mapping_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match=r"unknown label values \[4\] for scheme brats2023"):
        map_label_values(torch.tensor([0, 4]), "brats2023")


def test_every_scheme_covers_the_internal_classes() -> None:
    for scheme, mapping in LABEL_SCHEMES.items():
        assert sorted(mapping.values()) == [0, 1, 2, 3], scheme


def test_to_internal_convention_reorders_msd_channels() -> None:
    image = torch.stack([torch.full((2, 2, 2), float(c)) for c in range(4)])  # file order F, T1, T1gd, T2
    label = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1).float()
    out = ToInternalConventiond()({"image": image, "label": label, "layout": "msd"})
    # canonical order T1, T1ce, T2, FLAIR = file channels 1, 2, 3, 0
    assert [int(out["image"][c, 0, 0, 0]) for c in range(4)] == [1, 2, 3, 0]
    assert out["label"].flatten().tolist() == [0, 2, 1, 3]


def test_to_internal_convention_rejects_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match="expected 4 channels"):
        ToInternalConventiond()({"image": torch.zeros(3, 2, 2, 2), "layout": "brats2021"})


def test_labels_to_regions_are_float_and_nested() -> None:
    label = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)
    regions = LabelsToRegionsd(keys="label")({"label": label})["label"]
    assert regions.dtype == torch.float32 and regions.shape == (3, 4, 1, 1)
    assert regions[:, :, 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET


# ------------------------------------------------------------------------------------------ demo


def test_demo_generator_is_deterministic(tmp_path: Path) -> None:
    a = generate_demo_dataset(tmp_path / "a", num_cases=2, num_test_cases=1, seed=3, shape=(32, 32, 24))
    b = generate_demo_dataset(tmp_path / "b", num_cases=2, num_test_cases=1, seed=3, shape=(32, 32, 24))
    for file_a in sorted(a.rglob("*.nii.gz")):
        file_b = b / file_a.relative_to(a)
        assert np.array_equal(nib.load(file_a).get_fdata(), nib.load(file_b).get_fdata()), file_a.name
        assert np.allclose(nib.load(file_a).affine, nib.load(file_b).affine)
    datalist = make_datalist(a)
    assert len(datalist["training"]) == 2 and len(datalist["testing"]) == 1
    assert (a / "heldout_truth" / "Demo_00002_seg.nii.gz").is_file()
    # cached: a second call does not rewrite
    stamp = (a / "Demo_00000" / "Demo_00000_t1.nii.gz").stat().st_mtime_ns
    generate_demo_dataset(tmp_path / "a", num_cases=2, num_test_cases=1, seed=3, shape=(32, 32, 24))
    assert (a / "Demo_00000" / "Demo_00000_t1.nii.gz").stat().st_mtime_ns == stamp


def test_phantom_looks_like_brats() -> None:
    image, labels = make_phantom(seed=4, shape=(64, 64, 48))
    assert image.shape == (4, 64, 64, 48) and image.dtype == np.int16
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    brain = image[0] > 0
    assert (image[:, ~brain] == 0).all(), "skull-stripped: zeros outside the brain"
    assert 0.1 < brain.mean() < 0.6
    # Contrast that real data has: FLAIR edema brighter than white matter; T1ce ET brighter than edema.
    _t1, t1ce, t2, flair = image.astype(float)
    edema, et = labels == 2, labels == 4
    healthy = brain & (labels == 0)
    assert flair[edema].mean() > 1.5 * np.median(flair[healthy])
    assert t1ce[et].mean() > 1.5 * t1ce[edema].mean()
    assert t2[edema].mean() > np.median(t2[healthy])


def test_phantoms_vary_in_size_and_position() -> None:
    volumes, centres = [], []
    for seed in range(8):
        _, labels = make_phantom(seed, shape=(48, 48, 32))
        volumes.append(int((labels > 0).sum()))
        centres.append(np.argwhere(labels > 0).mean(0))
    assert min(volumes) > 0
    assert max(volumes) > 5 * min(volumes)
    assert np.ptp(np.array(centres)[:, 0]) > 5


@pytest.mark.skipif(shared_samples_dir() is None, reason="../shared/brats_samples not present")
def test_real_samples_pass_the_checks() -> None:
    datalist = make_datalist(shared_samples_dir(), folds=3)
    assert datalist["layout"] == "brats2021" and len(datalist["training"]) == 3


def test_write_brats_case_helper_is_a_valid_case(tmp_path: Path) -> None:
    # guards the fixtures themselves: a freshly written case passes every check
    write_brats_case(tmp_path, "X_1", "brats2021")
    assert len(make_datalist(tmp_path, folds=1)["training"]) == 1


def test_demo_replaces_a_partial_folder_in_one_move(tmp_path: Path) -> None:
    partial = tmp_path / "demo"
    (partial / "Demo_00000").mkdir(parents=True)
    (partial / "Demo_00000" / "Demo_00000_t1.nii.gz").write_bytes(b"half-written")
    root = generate_demo_dataset(partial, num_cases=1, num_test_cases=0, shape=(24, 24, 16))
    assert nib.load(root / "Demo_00000" / "Demo_00000_t1.nii.gz").shape == (24, 24, 16)
    assert not list(tmp_path.glob(".demo.tmp-*")), "no staging folder left behind"


def _case_files(case_dir: Path) -> tuple[list[str], str]:
    return [str(_case_file(case_dir, m)) for m in MODALITIES], str(_case_file(case_dir, "seg"))


def test_monai_nibabel_reader_shares_file_names_between_reads(brats2021_dir: Path) -> None:
    """The MONAI behaviour LoadCaseImaged guards against: a read in between truncates an image.

    If this starts failing, MONAI's reader no longer keeps per-read state and the subclass is moot.
    """
    from monai.data import NibabelReader

    images, label = _case_files(brats2021_dir / "BraTS2021_00000")
    reader = NibabelReader()
    four = reader.read(images)
    assert reader.get_data(four)[0].shape == (len(MODALITIES), *SHAPE)
    four = reader.read(images)
    reader.read(label)  # what another caching thread does meanwhile
    assert reader.get_data(four)[0].shape == SHAPE  # one modality, not four


def test_thread_unsafe_loader_gets_a_copy_per_threaded_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI's Compose deep-copies it when run threaded (as CacheDataset does), not otherwise."""
    from monai.transforms import Compose, LoadImaged

    from bundle.transforms import LoadCaseImaged

    loader = LoadCaseImaged(keys="image")
    assert isinstance(loader, LoadImaged)  # MONAI Label wraps it like MONAI's own
    called_on: list[object] = []

    def record_instance(self: LoadCaseImaged, data: dict) -> dict:
        called_on.append(self)
        return dict(data)

    monkeypatch.setattr(LoadCaseImaged, "__call__", record_instance)
    pipeline = Compose([loader])
    pipeline({"image": "unused"}, threading=True)
    pipeline({"image": "unused"})
    assert called_on[0] is not loader and called_on[1] is loader


def test_cache_dataset_threads_load_every_channel(tmp_path: Path) -> None:
    """train.yaml's preprocessing cached by four threads: every case keeps its four channels."""
    from monai.bundle import ConfigParser

    from bundle.training.workflow import make_dataset

    root = tmp_path / "cases"
    for i in range(12):
        write_brats_case(root, f"BraTS2021_{i:05d}", "brats2021")
    items = make_datalist(root, folds=2, seed=0)["training"]
    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "train.yaml"))
    parser["dataset_dir"] = str(root)
    parser["output_dir"] = str(tmp_path / "run")
    transform = parser.get_parsed_content("validate#preprocessing")
    for _ in range(3):
        dataset = make_dataset(items, transform, cache="memory", num_workers=4, progress=False)
        assert [dataset[i]["image"].shape[0] for i in range(len(dataset))] == [len(MODALITIES)] * len(items)


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 1, 2, 4], np.uint8),  # BraTS 2021
        np.array([0, 3, 1], np.int16),  # BraTS 2023, signed
        np.array([-2, 0, 5], np.int32),  # negative values (invalid, but must be reported as they are)
        np.array([0, 1, 200], np.uint8),  # a range too wide for the per-value test
        np.array([0.0, 1.0, 2.5], np.float32),  # non-integer labels
    ],
)
def test_label_values_are_read_exactly(tmp_path: Path, values: np.ndarray) -> None:
    from bundle.data.io import _read_label_values

    rng = np.random.default_rng(0)
    data = rng.choice(values, size=(12, 10, 8)).astype(values.dtype)
    data = np.asfortranarray(data)
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    np.testing.assert_array_equal(_read_label_values(str(path)), np.unique(values))
