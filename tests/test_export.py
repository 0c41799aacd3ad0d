"""Model-zoo export: the exported folder alone passes the zoo's CI as it calls MONAI, and the zoo's test pattern.

Every check runs in a child process started in the export folder with only that folder on
``PYTHONPATH``, as the model zoo's CI runs a bundle. The fast tests check that ``configs/metadata.json``
describes the network ``configs/train.yaml`` builds, derived from it (the zoo's shape check reads it).
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
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, verify_net_in_out

from bundle.integrations.export import MAX_FILE_BYTES, bundle_env, export, md5sum
from bundle.plan.checkpoints import read_plan, save_model
from bundle.plan.network import input_divisors, network_data_format

METADATA = REPO_ROOT / "configs" / "metadata.json"


# ------------------------------------------------------------------ metadata.json describes train.yaml's network


def _train_yaml_record(**overrides: object) -> dict:
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("model_plan").state_dict()  # what training records: network, channels


def test_metadata_network_data_format_is_derived_from_train_yaml() -> None:
    """Channels from the model record, spatial shapes from the network's down-sampling: no hand-kept copy."""
    metadata = json.loads(METADATA.read_text())
    expected = network_data_format(_train_yaml_record(), metadata["network_data_format"])
    assert metadata["network_data_format"] == expected, (
        "configs/metadata.json's network_data_format does not describe the network train.yaml builds; "
        "it should be:\n" + json.dumps(expected, indent=4)
    )


def test_the_derivation_follows_the_network() -> None:
    """A deeper network (six levels, 32x down-sampling) gives 32*(n+1): 64 voxels at the zoo's n = 1."""
    six_levels = _train_yaml_record(
        **{
            "network_factory#kernel_size": [3] * 6,
            "network_factory#strides": [1, 2, 2, 2, 2, 2],
            "network_factory#upsample_kernel_size": [2] * 5,
            "network_factory#filters": [32, 64, 128, 256, 320, 320],
        }
    )
    assert input_divisors(six_levels["network"]) == (32, 32, 32)
    template = json.loads(METADATA.read_text())["network_data_format"]
    assert network_data_format(six_levels, template)["inputs"]["image"]["spatial_shape"] == ["32*(n+1)"] * 3
    anisotropic = {"_target_": "DynUNet", "spatial_dims": 3, "strides": [1, [2, 2, 1], 2]}
    assert input_divisors(anisotropic) == (4, 4, 2)


def test_zoo_shape_check_with_default_arguments_on_train_yaml_network() -> None:
    """``verify_net_in_out`` exactly as the zoo's ci/verify_bundle.py calls it (n = 1), on train.yaml's network."""
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(METADATA),
        config_file=str(REPO_ROOT / "configs" / "train.yaml"),
        bundle_root=str(REPO_ROOT),
        device="cpu",  # the zoo's default is cuda:0 when there is one; the check is the same
    )


# ------------------------------------------------------------------ the export (slow)


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


@pytest.fixture(scope="module")
def trained_weights(exported: Path) -> Path:
    """The training checkpoint the export was made from (deep-supervision heads included)."""
    return exported.parent / "weights.pt"


@pytest.mark.slow
def test_layout_hashes_and_sizes(exported: Path) -> None:
    for relative in (
        "configs/metadata.json",
        "configs/train.yaml",
        "configs/inference.yaml",
        "configs/evaluate.yaml",
        "configs/multi_gpu_train.yaml",
        "models/model.pt",
        "models/model_record.json",
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


@pytest.mark.slow
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


ZOO_CI = """
import os, sys, torch, yaml
from monai.apps import download_url
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
bundle_path = os.path.abspath('.')
sys.path = [bundle_path] + sys.path  # verify_bundle.verify() puts the bundle first on the path
# the large files the zoo downloads are present: download_url checks their md5 and downloads nothing
for entry in yaml.safe_load(open('large_files.yml'))['large_files']:
    download_url(url=entry['url'], filepath=os.path.join(bundle_path, entry['path']), hash_val=entry['hash_val'],
                 hash_type=entry['hash_type'], fuzzy=True)
# verify_metadata_format: ci/prepare_schema.py puts the hosted schema at eval/schema.json first; offline, the
# export's copy stands in for it
verify_metadata(meta_file=os.path.join(bundle_path, 'configs/metadata.json'),
                filepath=os.path.join(bundle_path, 'eval/schema.json'))
config_file = os.path.join('configs', 'inference.yaml')
# verify_data_shape
verify_net_in_out(net_id='network_def', meta_file=os.path.join(bundle_path, 'configs/metadata.json'),
                  config_file=os.path.join(bundle_path, config_file), bundle_root=bundle_path)
# verify_torchscript
ckpt_export(net_id='network_def', filepath=os.path.join(bundle_path, 'models/verify_model.ts'),
            ckpt_file=os.path.join(bundle_path, 'models', 'model.pt'),
            meta_file=os.path.join(bundle_path, 'configs/metadata.json'),
            config_file=os.path.join(bundle_path, config_file), bundle_root=bundle_path)
torch.jit.load(os.path.join(bundle_path, 'models', 'model.ts'))
print('zoo ci passed')
"""


@pytest.mark.slow
def test_the_zoo_ci_checks_as_it_calls_them(exported: Path) -> None:
    """ci/verify_bundle.py of Project-MONAI/model-zoo, its MONAI calls with its (default) arguments."""
    (exported / "eval").mkdir(exist_ok=True)
    (exported / "eval" / "schema.json").write_text((exported / "schemas" / "meta_schema.json").read_text())
    try:
        assert "zoo ci passed" in run_in(exported, ["-c", ZOO_CI]).stdout
        assert (exported / "models" / "verify_model.ts").is_file()
    finally:
        (exported / "models" / "verify_model.ts").unlink(missing_ok=True)
        (exported / "eval" / "schema.json").unlink()
        (exported / "eval").rmdir()


@pytest.mark.slow
def test_exported_record_and_metadata_describe_the_inference_network(exported: Path, trained_weights: Path) -> None:
    record = read_plan(exported / "models" / "model.pt")
    trained = read_plan(trained_weights)
    assert trained["network"]["deep_supervision"] is True
    trained_args = {k: v for k, v in trained["network"].items() if k not in ("_target_", "upsample_heads")}
    # M4UNet's inference form is MONAI's DynUNet (same weights and eval graph, and it scripts)
    assert trained["network"]["_target_"].rsplit(".", 1)[-1] == "M4UNet"
    assert record["network"] == {**trained_args, "_target_": "monai.networks.nets.DynUNet", "deep_supervision": False}
    assert {k: v for k, v in record.items() if k != "network"} == {k: v for k, v in trained.items() if k != "network"}
    weights = torch.load(exported / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values()), "a plain state dict, as the zoo loads it"
    metadata = json.loads((exported / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"] == network_data_format(record, metadata["network_data_format"])


PARITY = """
import sys, torch
from bundle.plan.checkpoints import load_model
trained = load_model(sys.argv[1])  # the training network, deep-supervision heads and all, in eval mode
exported = load_model('models/model.pt')  # plain weights + models/model_record.json
ts = torch.jit.load('models/model.ts', map_location='cpu'); ts.eval()
torch.manual_seed(1)
for shape in [(1, 4, 64, 64, 64), (1, 4, 64, 96, 32)]:  # sizes: multiples of 32 (six levels)
    x = torch.randn(shape)
    with torch.no_grad():
        a, b, c = trained(x), exported(x), ts(x)
    assert a.shape == b.shape == c.shape == (shape[0], 3, *shape[2:]), (a.shape, b.shape, c.shape)
    assert torch.equal(a, b), 'the exported weights are the trained ones'
    err = (a - c).abs().max().item()
    assert err < 1e-4, err
    print('parity', shape, err)
"""


@pytest.mark.slow
def test_torchscript_matches_pytorch(exported: Path, trained_weights: Path) -> None:
    assert "parity" in run_in(exported, ["-c", PARITY, str(trained_weights)]).stdout


ONNX = """
import numpy, torch, onnxruntime
from monai.bundle import ConfigParser
parser = ConfigParser(); parser.read_config('configs/inference.yaml')
net = parser.get_parsed_content('network_def')
net.load_state_dict(torch.load('models/model.pt', map_location='cpu', weights_only=True)); net.eval()
session = onnxruntime.InferenceSession('models/model.onnx', providers=['CPUExecutionProvider'])
x = torch.randn(1, 4, 64, 64, 64)
with torch.no_grad():
    expected = net(x).numpy()
got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
err = float(numpy.abs(expected - got).max())
assert err < 1e-3, err
print('onnx parity', err)
"""


@pytest.mark.slow
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


@pytest.mark.slow
def test_workflow_properties(exported: Path, tmp_path: Path) -> None:
    data = write_random_brats(tmp_path / "data", shape=(32, 32, 32))
    assert run_in(exported, ["-c", PROPERTIES, str(data), str(tmp_path / "work")]).stdout.count("properties ok") == 2


ZOO_PATTERN = """
import sys, os, glob
from monai.bundle import ConfigWorkflow
data, work = sys.argv[1], sys.argv[2]
common = dict(bundle_root='.', dataset_dir=data, num_workers=0)
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


@pytest.mark.slow
def test_zoo_unit_test_pattern_train_evaluate_infer(exported: Path, tmp_path: Path) -> None:
    data = write_random_brats(tmp_path / "data")
    result = run_in(exported, ["-c", ZOO_PATTERN, str(data), str(tmp_path / "work")], timeout=2400)
    assert "segmentations 3" in result.stdout


def test_a_plain_state_dict_reads_its_record_from_beside_it(tmp_path: Path) -> None:
    """The zoo export's model.pt: plain weights, the record in model_record.json; without it, one sentence."""
    from bundle.plan.checkpoints import CheckpointError, load_checkpoint, record_file

    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "configs" / f) for f in ("train.yaml", "demo.yaml")])
    nested = save_model(tmp_path / "nested.pt", parser.get_parsed_content("network_def"))
    torch.save(torch.load(nested, weights_only=True)["model"], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: .*a plain state dict, and no model_record\.json beside it"):
        read_plan(tmp_path / "model.pt")
    record_file(tmp_path / "model.pt").write_text(json.dumps(read_plan(nested)))
    assert load_checkpoint(tmp_path / "model.pt")["model_record"] == read_plan(nested)
