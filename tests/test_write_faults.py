"""A full disk and a read-only file system, real ones: each command ends with one sentence naming the cause.

A small tmpfs is mounted in a private mount namespace (``unshare -rm``: no root needed where user
namespaces are allowed, nothing left mounted afterwards) and the user's command runs inside it. Where
namespaces are not allowed the tests are skipped; tests/test_inference_reliability.py and
tests/test_options.py simulate the same faults in-process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_inference_config import TINY_NET, _checkpoint, _write_case

from bundle.paths import BUNDLE_ROOT

ENV = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _namespaces_allowed(), reason="no private mount namespaces (unshare -rm) here"),
]


def _run_on_tmpfs(mount: Path, prepare: str, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` with a 64 kB tmpfs on ``mount``, after the shell commands ``prepare`` (which may fill it)."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mount))} && {prepare} && exec {shlex.join(command)}"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=BUNDLE_ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


def _last_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_inference_on_a_full_disk(tmp_path: Path) -> None:
    """It ended with "SaveImage cannot find a suitable writer ... install the writer libraries" (Errno 28 hidden)."""
    data = tmp_path / "data"
    _write_case(data, "Case_000", shape=(17, 15, 11))
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"network_def": TINY_NET, "roi_size": [16, 16, 16]}))
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    out = tmp_path / "out"
    fill = f"(dd if=/dev/zero of={shlex.quote(str(out / 'filler'))} bs=1k count=128 2>/dev/null; true)"
    command = [sys.executable, "-m", "bundle", "infer", str(data), "--output", str(out), "--tta", "false"]
    command += ["--checkpoint", str(checkpoint), "--config_file", f"['configs/inference.yaml','{tiny}']"]
    last = _last_line(_run_on_tmpfs(out, fill, command))
    assert last == (
        f"error: {out / 'Case_000_seg.nii.gz'}: cannot be written: no space left on device "
        "(free some space there, or write elsewhere)"
    )


def test_commands_on_a_read_only_file_system(tmp_path: Path) -> None:
    """The output checked before any work: training, prepare, demo, export."""
    data = tmp_path / "data"
    for i in range(3):
        _write_case(data, f"BraTS2021_{i:05d}", shape=(17, 15, 11))
    read_only = tmp_path / "read_only"
    remount = f"mount -o remount,ro {shlex.quote(str(read_only))}"
    python = [sys.executable, "-m"]
    train = [*python, "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
    probes = {
        "prepare": (
            [*python, "bundle", "prepare", "--dataset_dir", str(data), "--output", str(read_only / "d.json")],
            f"error: output: {read_only}: the folder of the datalist file is not writable (Read-only file system)",
        ),
        "training": (
            [*train, "--dataset_dir", str(data), "--output_dir", str(read_only / "train")],
            f"error: output_dir: {read_only / 'train'}: the output folder is not writable "
            f"(Read-only file system in {read_only})",
        ),
        "demo": (
            [*python, "bundle", "demo", "--output_dir", str(read_only / "demo")],
            f"error: output_dir: {read_only / 'demo'}: the output folder is not writable "
            f"(Read-only file system in {read_only})",
        ),
        "export": (
            [*python, "bundle", "export", "--output", str(read_only / "zoo")],
            f"error: --output {read_only / 'zoo'}: {read_only}: the folder of the export is not writable "
            "(Read-only file system)",
        ),
    }
    for name, (command, sentence) in probes.items():
        assert _last_line(_run_on_tmpfs(read_only, remount, command)) == sentence, name


SEG_NRRD_ON_A_FULL_DISK = """
import sys
import numpy as np
import torch
from monai.data import MetaTensor
from bundle.errors import WriteError
from bundle.inference.writers import output_writers
writer = output_writers(sys.argv[1], "brats2021", "regions", slicer_segmentation=True)[1]
label = MetaTensor(torch.randint(0, 3, (1, 17, 15, 11), dtype=torch.uint8), affine=torch.eye(4))
label.meta["filename_or_obj"] = "Case_000.nii.gz"
try:
    writer({"pred_label": label})
except WriteError as err:
    print(err)
"""


def test_a_slicer_segmentation_on_a_full_disk(tmp_path: Path) -> None:
    """ITK's NRRD writer reports nothing on a full disk and leaves a 0-byte file: now the same sentence."""
    out = tmp_path / "out"
    fill = f"(dd if=/dev/zero of={shlex.quote(str(out / 'filler'))} bs=1k count=128 2>/dev/null; true)"
    result = _run_on_tmpfs(out, fill, [sys.executable, "-c", SEG_NRRD_ON_A_FULL_DISK, str(out)])
    assert result.stdout.strip() == (
        f"{out / 'Case_000_seg.seg.nrrd'}: cannot be written: no space left on device "
        "(free some space there, or write elsewhere)"
    ), (result.stdout + result.stderr)[-3000:]
