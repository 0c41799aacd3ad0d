"""Images as Slicer and scanners write them: NRRD, MetaImage and DICOM series read like NIfTI, `.seg.nrrd` out.

Every case is written in NIfTI first and converted with ITK (as 3D Slicer or a converter would), so each
test compares the other format with the NIfTI original: the same case found, the same voxels and
geometry loaded, the same segmentation and the same scores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import convert_with_itk, shared_samples_dir, write_dicom_series
from monai.bundle import ConfigParser
from monai.data import ITKReader
from monai.data.utils import orientation_ras_lps
from monai.transforms import Compose
from test_inference_config import TINY_NET, _checkpoint, _oblique_lps_affine

from bundle.constants import MODALITIES
from bundle.data import check_case, check_cases, discover_cases, image_reader, read_header, select_cases
from bundle.errors import DataError
from bundle.evaluation.files import read_label_map
from bundle.evaluation.reports import evaluate_folder
from bundle.inference.run import infer
from bundle.paths import BUNDLE_ROOT
from bundle.plan.checkpoints import save_model
from bundle.transforms import LoadCaseImaged

ITK_FORMATS = (".nrrd", ".mha", ".mhd")
SHAPE = (19, 16, 12)


def write_case(root: Path, case_id: str, shape=SHAPE, affine=None, with_label: bool = True) -> Path:
    """A BraTS 2021 case in NIfTI, int16 voxels (what scanners store) on an oblique LPS grid, with a label."""
    rng = np.random.default_rng(len(case_id))
    case_dir = root / case_id
    case_dir.mkdir(parents=True)
    affine = _oblique_lps_affine() if affine is None else affine
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    dist = np.sqrt(((grid - np.array(shape)[:, None, None, None] / 2.0) ** 2).sum(0))
    brain = dist < min(shape) * 0.45
    for i, modality in enumerate(MODALITIES):
        image = (rng.normal(100.0 + 10 * i, 5.0, size=shape) + 200.0 * (dist < 3)) * brain
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), case_dir / f"{case_id}_{modality}.nii.gz")
    if with_label:
        label = np.zeros(shape, dtype=np.uint8)
        label[dist < 4], label[dist < 3], label[dist < 1.5] = 2, 4, 1
        nib.save(nib.Nifti1Image(label, affine), case_dir / f"{case_id}_seg.nii.gz")
    return case_dir


def convert_dataset(source: Path, target: Path, suffix: str) -> Path:
    """Every image of a BraTS folder rewritten with ITK as ``suffix`` (labels too), same names otherwise."""
    for path in sorted(source.rglob("*.nii.gz")):
        relative = path.relative_to(source)
        convert_with_itk(path, target / relative.parent / (path.name[: -len(".nii.gz")] + suffix))
    return target


def load_case(item: dict) -> dict:
    """What training and inference load of a datalist item (the bundle's loader, channel first)."""
    loader = LoadCaseImaged(keys=["image", "label"], ensure_channel_first=True, allow_missing_keys=True)
    return Compose([loader])(dict(item))


def assert_same_volume(a: torch.Tensor, b: torch.Tensor) -> None:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine), atol=1e-4)


def assert_same_scores(rows: list[dict], expected: list[dict]) -> None:
    """The same rows and scores; volumes may differ in the last bits (NIfTI's float32 spacing, ITK's double)."""
    assert [(r["case"], r["region"]) for r in rows] == [(r["case"], r["region"]) for r in expected]
    for row, reference in zip(rows, expected):
        numbers = {k: v for k, v in reference.items() if k not in ("case", "region")}
        assert {k: row[k] for k in numbers} == pytest.approx(numbers, rel=1e-9, nan_ok=True)


@pytest.fixture
def nifti_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "nifti"
    write_case(root, "BraTS2021_00001")
    write_case(root, "BraTS2021_00002", with_label=False)
    return root


# ------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("suffix", ITK_FORMATS)
def test_itk_formats_are_found_checked_and_loaded_like_nifti(nifti_dataset: Path, tmp_path: Path, suffix: str) -> None:
    other = convert_dataset(nifti_dataset, tmp_path / suffix.strip("."), suffix)
    expected, found = discover_cases(nifti_dataset), discover_cases(other)
    assert [(c.case_id, c.layout, c.label is not None) for c in found] == [
        (c.case_id, c.layout, c.label is not None) for c in expected
    ]
    assert all(Path(f).name.endswith(suffix) for f in found[0].image)
    assert image_reader(found[0].image) == "ITKReader" and image_reader(expected[0].image) == "NibabelReader"
    assert check_cases(found, progress=False) == found
    header, nifti_header = read_header(found[0].image[0]), read_header(expected[0].image[0])
    assert header.shape == nifti_header.shape
    np.testing.assert_allclose(header.affine, nifti_header.affine, atol=1e-4)
    np.testing.assert_allclose(header.spacing, nifti_header.spacing, atol=1e-5)
    a, b = load_case(expected[0].to_item()), load_case(found[0].to_item())
    assert a["image"].shape == (4, *SHAPE)
    assert_same_volume(a["image"], b["image"])
    assert_same_volume(a["label"], b["label"])


def test_header_affine_of_itk_files_is_monai_itk_readers(nifti_dataset: Path, tmp_path: Path) -> None:
    """The case checks compare headers read without voxels; they must equal what the loader then reads."""
    path = convert_with_itk(next(nifti_dataset.rglob("*_t1.nii.gz")), tmp_path / "t1.nrrd")
    reader = ITKReader()
    _, meta = reader.get_data(reader.read(str(path)))
    np.testing.assert_allclose(read_header(path).affine, meta["affine"], atol=1e-6)


def _old_lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """The hand-written flip read_header used before MONAI's ``orientation_ras_lps`` (issue 21): the reference."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def test_orientation_ras_lps_is_the_old_flip() -> None:
    rng = np.random.default_rng(0)
    for affine in [_oblique_lps_affine(), *(np.vstack([rng.normal(size=(3, 4)), [0, 0, 0, 1]]) for _ in range(5))]:
        np.testing.assert_array_equal(orientation_ras_lps(affine), _old_lps_to_ras(affine))


def test_header_of_a_real_case_through_itk_is_its_nifti_header(tmp_path: Path) -> None:
    """A real BraTS image rewritten by ITK (MetaImage, uncompressed: quick): the header's RAS affine is the NIfTI's."""
    samples = shared_samples_dir()
    if samples is None:
        pytest.skip("no real BraTS samples (../shared/brats_samples)")
    source = sorted(samples.glob("*/*_t1.nii.gz"))[0]
    header = read_header(convert_with_itk(source, tmp_path / "t1.mhd"))
    np.testing.assert_allclose(header.affine, read_header(source).affine, atol=1e-4)


def test_dicom_series_folder_per_modality(nifti_dataset: Path, tmp_path: Path) -> None:
    """A case whose four modalities are DICOM series folders (CASE/CASE_t1/*.dcm) loads like its NIfTI files."""
    source = nifti_dataset / "BraTS2021_00001"
    case_dir = tmp_path / "dicom" / "BraTS2021_00001"
    for modality in MODALITIES:
        write_dicom_series(source / f"BraTS2021_00001_{modality}.nii.gz", case_dir / f"BraTS2021_00001_{modality}")
    (case_dir / "notes.txt").write_text("not an image")
    (case_dir, found) = (case_dir, discover_cases(case_dir))
    assert len(found) == 1 and found[0].layout == "brats2021" and found[0].label is None
    assert [Path(p).name for p in found[0].image] == [f"BraTS2021_00001_{m}" for m in MODALITIES]
    check_case(found[0])
    nifti = load_case({"image": [str(source / f"BraTS2021_00001_{m}.nii.gz") for m in MODALITIES]})
    dicom = load_case(found[0].to_item())
    assert_same_volume(nifti["image"], dicom["image"])


def test_a_modality_folder_named_by_the_modality_alone(nifti_dataset: Path, tmp_path: Path) -> None:
    source = nifti_dataset / "BraTS2021_00001"
    case_dir = tmp_path / "Patient_7"
    for modality in MODALITIES:
        write_dicom_series(source / f"BraTS2021_00001_{modality}.nii.gz", case_dir / modality)
    (case,) = discover_cases(case_dir)
    assert case.case_id == "Patient_7" and [Path(p).name for p in case.image] == list(MODALITIES)


def test_two_dicom_series_in_one_folder_is_one_sentence(nifti_dataset: Path, tmp_path: Path) -> None:
    source = nifti_dataset / "BraTS2021_00001"
    case_dir = tmp_path / "Patient_8"
    for modality in MODALITIES:
        write_dicom_series(source / f"BraTS2021_00001_{modality}.nii.gz", case_dir / modality)
    for path in (case_dir / "t2").iterdir():  # another series' slices in the FLAIR folder
        shutil.copy(path, case_dir / "flair" / f"t2_{path.name}")
    (case,) = discover_cases(case_dir)
    with pytest.raises(DataError, match=r"flair: expected one DICOM series in the folder, found 2"):
        check_case(case)


def test_metaimage_without_its_data_file_is_one_sentence(nifti_dataset: Path, tmp_path: Path) -> None:
    other = convert_dataset(nifti_dataset, tmp_path / "mhd", ".mhd")
    raw = other / "BraTS2021_00001" / "BraTS2021_00001_t2.raw"
    raw.unlink()
    case = discover_cases(other)[0]
    with pytest.raises(DataError, match=r"BraTS2021_00001_t2\.mhd: "):
        check_case(case)


def test_label_maps_in_nrrd_are_scored_like_nifti(nifti_dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "nifti_truth").mkdir()
    source = nifti_dataset / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    truth = Path(shutil.copy(source, tmp_path / "nifti_truth" / "BraTS2021_00001_seg.nii.gz"))
    nrrd = convert_with_itk(truth, tmp_path / "nrrd_truth" / "BraTS2021_00001_seg.nrrd")
    a, b = read_label_map(truth), read_label_map(nrrd)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    np.testing.assert_allclose(a[2], b[2], atol=1e-4)
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(truth, pred / "BraTS2021_00001.nii.gz")
    rows_nifti = evaluate_folder(pred, truth.parent, output_dir=tmp_path / "e1", lesion_wise=False, verbose=False)
    rows_nrrd = evaluate_folder(pred, nrrd.parent, output_dir=tmp_path / "e2", lesion_wise=False, verbose=False)
    assert_same_scores(rows_nrrd, rows_nifti)


# ------------------------------------------------------------------------------------ inference


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", TINY_NET)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_inference_on_itk_formats_equals_nifti_and_writes_a_slicer_segmentation(
    nifti_dataset: Path, tmp_path: Path, tiny_checkpoint: Path, suffix: str
) -> None:
    other = convert_dataset(nifti_dataset, tmp_path / "other", suffix)
    settings = dict(checkpoint=str(tiny_checkpoint), window=[16, 16, 16], tta=False)
    (a,) = infer(str(nifti_dataset / "BraTS2021_00001"), output=str(tmp_path / "a"), **settings)
    (b,) = infer(str(other / "BraTS2021_00001"), output=str(tmp_path / "b"), save_seg_nrrd="true", **settings)
    nifti, from_other = nib.load(a), nib.load(b)
    assert Path(b).name == "BraTS2021_00001_seg.nii.gz"  # NIfTI whatever the input format
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), np.asarray(from_other.dataobj))
    np.testing.assert_allclose(from_other.affine, nifti.affine, atol=1e-4)
    assert np.asarray(nifti.dataobj).any(), "the test needs some tumour voxels"

    slicer = tmp_path / "b" / "BraTS2021_00001_seg.seg.nrrd"
    header = slicer.read_bytes().split(b"\n\n", 1)[0].decode()
    assert "Segment0_Name:=NCR" in header and "Segment1_Name:=ED" in header and "Segment2_Name:=ET" in header
    assert "Segment2_LabelValue:=4" in header and "Segment0_Color:=1 0 0" in header
    assert "Segmentation_MasterRepresentation:=Binary labelmap" in header
    labels, _, affine = read_label_map(slicer)
    np.testing.assert_array_equal(labels, np.asarray(nifti.dataobj))
    np.testing.assert_allclose(affine, nifti.affine, atol=1e-4)
    extent = next(line for line in header.splitlines() if line.startswith("Segment2_Extent:="))
    ets = np.argwhere(labels == 4)
    expected = " ".join(str(v) for axis in range(3) for v in (ets[:, axis].min(), ets[:, axis].max()))
    assert extent == f"Segment2_Extent:={expected}"


def test_inference_on_dicom_series_folders(nifti_dataset: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    source = nifti_dataset / "BraTS2021_00001"
    folders = [write_dicom_series(source / f"BraTS2021_00001_{m}.nii.gz", tmp_path / "dicom" / m) for m in MODALITIES]
    settings = dict(checkpoint=str(tiny_checkpoint), window=[16, 16, 16], tta=False)
    (a,) = infer(str(source), output=str(tmp_path / "a"), **settings)
    (b,) = infer([str(f) for f in folders], output=str(tmp_path / "b"), **settings)
    assert Path(b).name == "dicom_seg.nii.gz"  # folders named by their modality: the case is their folder
    np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
    np.testing.assert_allclose(nib.load(b).affine, nib.load(a).affine, atol=1e-4)


def test_seg_nrrd_is_not_written_unless_asked(nifti_dataset: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    infer(
        str(nifti_dataset / "BraTS2021_00002"),
        output=str(tmp_path / "out"),
        checkpoint=str(tiny_checkpoint),
        window=[16, 16, 16],
        tta=False,
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["BraTS2021_00002_seg.nii.gz"]


def test_the_files_of_one_case_as_docs_ecosystem_md_types_them(
    nifti_dataset: Path, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``infer "[t1.nrrd,t1ce.nrrd,t2.nrrd,flair.mha]"``, the four files as positional arguments, and
    ``monai.bundle run --input_files "[...]"``: the segmentation of the case folder in NIfTI, named after the folder."""
    import fire
    from monai.bundle.scripts import run

    from bundle.integrations.cli import COMMANDS

    source = nifti_dataset / "BraTS2021_00001"
    patient = tmp_path / "Patient_7"
    for modality, suffix in zip(MODALITIES, (".nrrd", ".nrrd", ".nrrd", ".mha"), strict=True):
        convert_with_itk(source / f"BraTS2021_00001_{modality}.nii.gz", patient / f"{modality}{suffix}")
    files = ["t1.nrrd", "t1ce.nrrd", "t2.nrrd", "flair.mha"]
    settings = ["--checkpoint", str(tiny_checkpoint), "--window", "[16,16,16]", "--tta", "false"]
    (expected,) = infer(
        str(source), output=str(tmp_path / "nifti"), checkpoint=str(tiny_checkpoint), window=[16] * 3, tta=False
    )
    monkeypatch.chdir(patient)  # the documented command names the files relative to the case's folder
    written = [
        fire.Fire(
            COMMANDS, command=["infer", "[t1.nrrd,t1ce.nrrd,t2.nrrd,flair.mha]", "--output", "out_list", *settings]
        ),
        fire.Fire(COMMANDS, command=["infer", *files, "--output", "out_files", *settings]),
        fire.Fire(
            COMMANDS,
            command=["infer", "['t1.nrrd', 't1ce.nrrd', 't2.nrrd', 'flair.mha']", "--output", "out_quoted", *settings],
        ),
    ]
    monkeypatch.chdir(BUNDLE_ROOT)
    absolute = "[" + ",".join(str(patient / f) for f in files) + "]"
    run(
        config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"),
        input_files=absolute,
        output_dir=str(patient / "out_monai"),
        checkpoint=str(tiny_checkpoint),
        window=[16, 16, 16],
        tta="false",
    )
    written.append([str(patient / "out_monai" / "Patient_7_seg.nii.gz")])
    for (segmentation,) in written:
        assert (
            Path(segmentation).resolve().parent.parent == patient and Path(segmentation).name == "Patient_7_seg.nii.gz"
        )
        np.testing.assert_array_equal(
            np.asarray(nib.load(segmentation).dataobj), np.asarray(nib.load(expected).dataobj)
        )
        np.testing.assert_allclose(nib.load(segmentation).affine, nib.load(expected).affine, atol=1e-4)


def test_a_wrong_number_of_files_is_one_sentence(tmp_path: Path) -> None:
    import fire

    from bundle.integrations.cli import COMMANDS

    with pytest.raises(
        DataError, match=r"/a\.nrrd, .*/b\.nrrd: expected four files \(T1, T1ce, T2, FLAIR\) or one 4-D image, got 2"
    ):
        fire.Fire(COMMANDS, command=["infer", "a.nrrd", "b.nrrd", "--output", str(tmp_path / "out")])


# ------------------------------------------------------------------------------------ a real case


def _random_checkpoint_of_train_yaml(path: Path) -> Path:
    """train.yaml's network at a small width with random weights: the test compares I/O, not accuracy.

    A negative output bias keeps its labels to a few thousand voxels, so scoring them (HD95 of noise)
    takes seconds rather than a minute per format.
    """
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.yaml"))
    parser["network_factory#filters"] = [4 * 2**i for i in range(len(parser["network_factory#filters"]))]
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        network.output_block.conv.conv.bias.fill_(-1.5)
    return save_model(path, network, patch_size=[64, 64, 64])


@pytest.mark.slow
def test_real_case_in_nrrd_and_mha_gives_the_nifti_segmentation_and_scores(tmp_path: Path) -> None:
    samples = shared_samples_dir()
    if samples is None:
        pytest.skip("../shared/brats_samples not present")
    case = sorted(p for p in samples.iterdir() if p.is_dir())[0]
    nifti = tmp_path / "nifti"
    shutil.copytree(case, nifti / case.name)
    checkpoint = _random_checkpoint_of_train_yaml(tmp_path / "model.pt")
    results = {}
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        data = nifti if suffix == ".nii.gz" else convert_dataset(nifti, tmp_path / suffix.strip("."), suffix)
        out = tmp_path / f"out{suffix}"
        # one window over the whole cropped brain: a sixth of the sliding-window work at 64^3 with 50 % overlap
        (segmentation,) = infer(
            str(data / case.name), output=str(out), checkpoint=str(checkpoint), tta=False, window=[160, 192, 160]
        )
        rows = evaluate_folder(out, data, output_dir=out / "evaluation", lesion_wise=False, verbose=False)
        results[suffix] = (read_label_map(segmentation), rows, select_cases(data, labelled=True)[0]["label"])
    reference, rows, _ = results[".nii.gz"]
    assert reference[0].any(), "a random network should still label some voxels"
    for suffix in (".nrrd", ".mha"):
        (labels, _, affine), other_rows, truth = results[suffix]
        assert truth.endswith(f"_seg{suffix}")
        np.testing.assert_array_equal(labels, reference[0])
        np.testing.assert_allclose(affine, reference[2], atol=1e-4)
        assert_same_scores(other_rows, rows)
