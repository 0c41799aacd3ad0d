"""Model-zoo export: the exported folder alone passes MONAI's bundle checks and the zoo's test pattern.

Every check runs in a child process started in the export folder with only that folder on
``PYTHONPATH``, as the model zoo's CI runs a bundle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser

from bundle.checkpoints import save_model
from bundle.export import MAX_FILE_BYTES, bundle_env, export, md5sum

pytestmark = pytest.mark.slow


def run_in(bundle_dir: Path, args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in the export folder with nothing but it on PYTHONPATH; fail with its stderr."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=bundle_dir,
        env=bundle_env(bundle_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-8000:]}"
    return result


def write_random_brats(root: Path, num_cases: int = 3, shape: tuple[int, int, int] = (64, 64, 64)) -> Path:
    """Random NIfTIs in the BraTS 2021 layout (the zoo's unit tests use random data the same way)."""
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(num_cases):
        case = root / f"BraTS2021_{i:05d}"
        case.mkdir(parents=True)
        for modality in ("t1", "t1ce", "t2", "flair"):
            image = rng.uniform(1, 100, size=shape).astype(np.float32)
            image[:4] = 0
            nib.save(nib.Nifti1Image(image, affine), case / f"{case.name}_{modality}.nii.gz")
        label = np.zeros(shape, dtype=np.uint8)
        label[16:48, 16:48, 16:48] = 2
        label[24:40, 24:40, 24:40] = 4
        label[28:36, 28:36, 28:36] = 1
        nib.save(nib.Nifti1Image(label, affine), case / f"{case.name}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of randomly initialised demo-width weights, with its zip."""
    root = tmp_path_factory.mktemp("export")
    parser = ConfigParser()
    parser.read_config([str(Path(__file__).resolve().parents[1] / "configs" / f) for f in ("train.yaml", "demo.yaml")])
    torch.manual_seed(0)
    save_model(root / "weights.pt", parser.get_parsed_content("network_def"), patch_size=[64, 64, 64])
    return Path(export(str(root / "brats_resunet_segmentation"), zip=True, checkpoint=str(root / "weights.pt")))


def test_layout_hashes_and_sizes(exported: Path) -> None:
    for relative in (
        "configs/metadata.json",
        "configs/train.yaml",
        "configs/inference.yaml",
        "configs/evaluate.yaml",
        "configs/multi_gpu_train.yaml",
        "models/model.pt",
        "models/model.ts",
        "docs/README.md",
        "docs/methods.md",
        "docs/data_license.txt",
        "LICENSE",
        "large_files.yml",
        "bundle/__init__.py",
        "schemas/meta_schema.json",
    ):
        assert (exported / relative).is_file(), relative
    large = yaml.safe_load((exported / "large_files.yml").read_text())["large_files"]
    assert {entry["path"]: entry["hash_val"] for entry in large} == {
        "models/model.pt": md5sum(exported / "models" / "model.pt"),
        "models/model.ts": md5sum(exported / "models" / "model.ts"),
    }
    assert all(p.stat().st_size <= MAX_FILE_BYTES for p in exported.rglob("*") if p.is_file())
    metadata = json.loads((exported / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    assert exported.with_suffix(".zip").is_file()


def test_verify_metadata_against_the_schema(exported: Path, tmp_path: Path) -> None:
    args = ["-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json"]
    run_in(exported, [*args, "--filepath", "schemas/meta_schema.json"])
    # the schema really constrains: metadata without a version is rejected
    broken = json.loads((exported / "configs" / "metadata.json").read_text())
    del broken["version"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(tmp_path / "metadata.json"),
            "--filepath",
            "schemas/meta_schema.json",
        ],
        cwd=exported,
        env=bundle_env(exported),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "version" in bad.stdout + bad.stderr


def test_verify_net_in_out(exported: Path) -> None:
    run_in(
        exported,
        [
            "-m",
            "monai.bundle",
            "verify_net_in_out",
            "network_def",
            "--n",
            "2",  # spatial_shape 32*n: n = 1 leaves a 1-voxel bottleneck, where instance norm is undefined
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.yaml",
        ],
    )


PARITY = """
import torch, monai
from monai.bundle import ConfigParser
parser = ConfigParser(); parser.read_config('configs/inference.yaml')
net = parser.get_parsed_content('network_def')
net.load_state_dict(torch.load('models/model.pt', map_location='cpu', weights_only=True)['model']); net.eval()
ts = torch.jit.load('models/model.ts', map_location='cpu'); ts.eval()
torch.manual_seed(1)
for shape in [(1, 4, 64, 64, 64), (1, 4, 64, 96, 32)]:  # sizes: multiples of 32 (six levels)
    x = torch.randn(shape)
    with torch.no_grad():
        a, b = net(x), ts(x)
    assert a.shape == b.shape == (shape[0], 3, *shape[2:]), (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < 1e-4, err
    print('parity', shape, err)
"""


def test_torchscript_matches_pytorch(exported: Path) -> None:
    assert "parity" in run_in(exported, ["-c", PARITY]).stdout


ONNX = """
import numpy, torch, onnxruntime
from monai.bundle import ConfigParser
parser = ConfigParser(); parser.read_config('configs/inference.yaml')
net = parser.get_parsed_content('network_def')
net.load_state_dict(torch.load('models/model.pt', map_location='cpu', weights_only=True)['model']); net.eval()
session = onnxruntime.InferenceSession('models/model.onnx', providers=['CPUExecutionProvider'])
x = torch.randn(1, 4, 64, 64, 64)
with torch.no_grad():
    expected = net(x).numpy()
got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
err = float(numpy.abs(expected - got).max())
assert err < 1e-3, err
print('onnx parity', err)
"""


def test_onnx_export_matches_pytorch(exported: Path) -> None:
    pytest.importorskip("onnxruntime")
    run_in(
        exported,
        [
            "-m",
            "monai.bundle",
            "onnx_export",
            "network_def",
            "--filepath",
            "models/model.onnx",
            "--ckpt_file",
            "models/model.pt",
            "--key_in_ckpt",
            "model",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.yaml",
            "--input_shape",
            "[1,4,64,64,64]",
            "--use_trace",
            "True",
        ],
    )
    try:
        assert "onnx parity" in run_in(exported, ["-c", ONNX]).stdout
    finally:
        (exported / "models" / "model.onnx").unlink(missing_ok=True)


PROPERTIES = """
import sys
from monai.bundle import create_workflow
data, work = sys.argv[1], sys.argv[2]
settings = {
    'configs/train.yaml': dict(workflow_type='train', dataset_dir=data, num_folds=3, cache='none', output_dir=work),
    # the exported weights are demo-width: the checkpoint records that, no flag needed
    'configs/inference.yaml': dict(workflow_type='infer', dataset_dir=data, output_dir=work),
}
for config, kwargs in settings.items():
    workflow = create_workflow(config_file=config, **kwargs)
    missing = workflow.check_properties()
    assert not missing, (config, missing)
    print('properties ok', config)
"""


def test_workflow_properties(exported: Path, tmp_path: Path) -> None:
    data = write_random_brats(tmp_path / "data", shape=(32, 32, 32))
    assert run_in(exported, ["-c", PROPERTIES, str(data), str(tmp_path / "work")]).stdout.count("properties ok") == 2


ZOO_PATTERN = """
import sys, os, glob
from monai.bundle import ConfigWorkflow
data, work = sys.argv[1], sys.argv[2]
common = dict(bundle_root='.', dataset_dir=data, roi_size=[64, 64, 64], num_workers=0)
train = ConfigWorkflow(config_file='configs/train.yaml', workflow_type='train', **common,
    epochs=1, val_interval=1, num_folds=3, output_dir=work + '/train', ckpt_dir=work + '/models', cache='none')
train.initialize(); train.run(); train.finalize()
ckpt = work + '/models/model.pt'
assert os.path.isfile(ckpt)
evaluate = ConfigWorkflow(config_file=['configs/inference.yaml', 'configs/evaluate.yaml'], workflow_type=None, **common,
    checkpoint=ckpt, tta=False, lesion_wise=False, output_dir=work + '/evaluate')
evaluate.initialize(); evaluate.run(); evaluate.finalize()
assert os.path.isfile(work + '/evaluate/metrics.csv') and os.path.isfile(work + '/evaluate/summary.json')
infer = ConfigWorkflow(config_file='configs/inference.yaml', workflow_type='infer', **common,
    checkpoint=ckpt, tta=False, output_dir=work + '/infer')
infer.initialize(); infer.run(); infer.finalize()
print('segmentations', len(glob.glob(work + '/infer/*_seg.nii.gz')))
"""


def test_zoo_unit_test_pattern_train_evaluate_infer(exported: Path, tmp_path: Path) -> None:
    data = write_random_brats(tmp_path / "data")
    result = run_in(exported, ["-c", ZOO_PATTERN, str(data), str(tmp_path / "work")], timeout=2400)
    assert "segmentations 3" in result.stdout
