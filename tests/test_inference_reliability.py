"""Reliability of inference runs: the output folder checked first, continuing a killed run, concurrent writers.

Through the entry points users type (``python -m bundle infer``, ``python -m monai.bundle run``,
``python -m bundle evaluate --checkpoint``) on tiny cases and a tiny network.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import yaml
from test_inference_config import TINY_NET, _checkpoint, _write_case

from bundle.data import generate_demo_dataset
from bundle.errors import DataError, OptionError
from bundle.inference.run import infer
from bundle.inference.writers import AtomicSaveImaged
from bundle.integrations.cli import COMMANDS
from bundle.paths import BUNDLE_ROOT

ENV = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
CASES = ("Case_000", "Case_001", "Case_002")


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    """Three small cases, a tiny checkpoint and a config file that selects the tiny network."""
    data = tmp_path / "data"
    for i, case in enumerate(CASES):
        _write_case(data, case, shape=(17 + i, 15, 11), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"window": [16, 16, 16]}))
    return {"data": data, "checkpoint": _checkpoint(tmp_path / "model.pt", TINY_NET), "tiny": tiny}


def _configs(tiny: Path) -> str:
    return f"['configs/inference.yaml','{tiny}']"


def _bundle_infer(setup: dict[str, Path], output: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bundle", "infer", str(setup["data"]), "--output", str(output)]
    command += ["--checkpoint", str(setup["checkpoint"]), "--config_file", _configs(setup["tiny"]), *args]
    return subprocess.run(command, cwd=BUNDLE_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _in_process(setup: dict[str, Path], output: Path, **kwargs) -> list[str]:
    kwargs.setdefault("tta", False)
    return infer(
        str(setup["data"]),
        output=str(output),
        checkpoint=str(setup["checkpoint"]),
        config_file=["configs/inference.yaml", str(setup["tiny"])],
        **kwargs,
    )


def _marker(path: Path) -> None:
    """A valid NIfTI under a final output name that no real run writes: untouched means skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), 7, np.uint8), np.eye(4)), path)


def _is_marker(path: Path) -> bool:
    return nib.load(path).shape == (2, 2, 2)


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# ----------------------------------------------------------------------------- output folder checked first


def test_unwritable_output_folder_is_one_sentence_before_the_model_or_a_case_is_read(setup, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should go")
    # a missing checkpoint and a broken case: reported only if the output check did not come first
    (setup["data"] / "Case_001" / "Case_001_flair.nii.gz").unlink()
    setup = {**setup, "checkpoint": tmp_path / "missing.pt"}
    result = _bundle_infer(setup, blocker / "out")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.count(f"{blocker / 'out'}: the output folder is not writable") == 1, output[-3000:]
    assert "missing.pt" not in output and "missing modality" not in output, output[-3000:]
    # the output folder is itself a file
    with pytest.raises(DataError, match=r"blocker: the output folder is an existing file, not a folder"):
        _in_process(setup, blocker)
    # a writable but new output folder is made only after every check passed
    with pytest.raises(DataError, match="missing modality"):
        _in_process(setup, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(setup, tmp_path):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(DataError, match=r"read_only: the output folder is not writable \(Permission denied\)"):
            _in_process(setup, out)
    finally:
        out.chmod(0o755)


def test_monai_bundle_run_checks_the_output_folder_first(setup, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(setup["tiny"])]
    command += ["--dataset_dir", str(setup["data"]), "--checkpoint", str(tmp_path / "missing.pt")]
    command += ["--output_dir", str(blocker / "out")]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{blocker / 'out'}: the output folder is not writable" in output, output[-3000:]
    assert "checkpoint file does not exist" not in output, output[-3000:]


# ----------------------------------------------------------------------------- continuing a killed run


def test_rerun_skips_complete_cases_and_continues_a_killed_run(setup, tmp_path):
    """A killed run: Case_000 complete, Case_001 only a hidden temporary file, Case_002 not started."""
    out = tmp_path / "out"
    _marker(out / "Case_000_seg.nii.gz")
    # a write in progress: this test's process runs (bundle.atomic removes one only once its writer is gone)
    leftover = out / f".Case_001_seg.nii.gz.{os.getpid()}-deadbeef.partial.nii.gz"
    leftover.write_bytes(b"half a file")
    # the string "false" as typed on the command line
    result = _bundle_infer(setup, out, "--tta", "false", "--overwrite", "false")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "skipping Case_000: Case_000_seg.nii.gz already written" in output, output[-3000:]
    assert "1 of 3 case(s) already segmented" in output and "skipping Case_001" not in output
    assert _is_marker(out / "Case_000_seg.nii.gz"), "a complete case must not be redone"
    for case in CASES[1:]:
        assert nib.load(out / f"{case}_seg.nii.gz").shape == nib.load(setup["data"] / case / f"{case}_t1.nii.gz").shape
    # the command returns every case's segmentation, skipped or written
    for case in CASES:
        assert str(out / f"{case}_seg.nii.gz") in result.stdout
    # another process's temporary file is never taken for a result, nor removed while that process runs
    assert leftover.read_bytes() == b"half a file"

    # asking for probabilities too: Case_000 lacks its _prob file, so it is redone
    written = _in_process(setup, out, save_probabilities=True)
    assert written == [str(out / f"{c}_seg.nii.gz") for c in CASES]
    assert not _is_marker(out / "Case_000_seg.nii.gz")
    assert all((out / f"{c}_prob.nii.gz").is_file() for c in CASES)

    # overwrite: every case redone, even complete ones
    _marker(out / "Case_002_seg.nii.gz")
    _in_process(setup, out, overwrite="true")
    assert not _is_marker(out / "Case_002_seg.nii.gz")


def test_nothing_left_to_do_runs_no_inference(setup, tmp_path):
    """Every case complete: the run ends at once (an empty loader would stop ignite with an error)."""
    out = tmp_path / "out"
    for case in CASES:
        _marker(out / f"{case}_seg.nii.gz")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _configs(setup["tiny"])]
    command += ["--dataset_dir", str(setup["data"]), "--checkpoint", str(setup["checkpoint"])]
    command += ["--output_dir", str(out), "--overwrite", "False"]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 of 3 case(s) already segmented" in result.stdout + result.stderr
    assert all(_is_marker(out / f"{c}_seg.nii.gz") for c in CASES)


def test_overwrite_must_be_a_boolean(setup, tmp_path):
    """Its spellings are tests/test_options.py's; a typo stops before any case is read."""
    with pytest.raises(OptionError, match=r"^overwrite: 'flase' is not a boolean"):
        fire.Fire(COMMANDS, command=["infer", str(setup["data"]), "--output", str(tmp_path), "--overwrite", "flase"])


def test_evaluate_from_a_checkpoint_scores_skipped_cases_too(tmp_path):
    """evaluate.yaml redoes every case by default (another checkpoint may have written output_dir);
    --overwrite false continues a killed run, and every case is still scored."""
    data = generate_demo_dataset(tmp_path / "data", num_cases=2, num_test_cases=0, shape=(32, 32, 24))
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"window": [32, 32, 32]}))
    checkpoint = _checkpoint(tmp_path / "model.pt", TINY_NET)
    out = tmp_path / "out"
    args = ["--truth", str(data), "--checkpoint", str(checkpoint), "--config_file", str(tiny)]
    args += ["--output_dir", str(out), "--tta", "false", "--lesion_wise", "false"]
    fire.Fire(COMMANDS, command=["evaluate", *args])
    first = (out / "metrics.csv").read_text()
    seg = out / "Demo_00000_seg.nii.gz"
    reference = _data(seg)

    # killed after the first case: rerun with --overwrite false segments the other and scores both
    (out / "Demo_00001_seg.nii.gz").unlink()
    (out / "metrics.csv").unlink()
    mtime = seg.stat().st_mtime_ns
    fire.Fire(COMMANDS, command=["evaluate", *args, "--overwrite", "false"])
    assert seg.stat().st_mtime_ns == mtime, "the complete case is skipped"
    assert (out / "metrics.csv").read_text() == first

    # by default a stale prediction in output_dir is replaced, never scored
    _marker(out / "Demo_00001_seg.nii.gz")
    fire.Fire(COMMANDS, command=["evaluate", *args])
    assert not _is_marker(out / "Demo_00001_seg.nii.gz")
    assert np.array_equal(_data(seg), reference)
    assert (out / "metrics.csv").read_text() == first


# ----------------------------------------------------------------------------- temporary names, concurrency


def test_temporary_names_are_unique_hidden_and_removed_on_failure(tmp_path, monkeypatch):
    saver = AtomicSaveImaged(keys="pred", output_dir=str(tmp_path), output_postfix="seg")
    names: list[str] = []

    def fake_write(img, path):  # AtomicSaveImaged's one write (SaveImage's, keeping the writer's OSError)
        names.append(Path(path).name)
        Path(path).write_bytes(b"partial")
        if len(names) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(saver, "_save", fake_write)
    item = {"pred": np.zeros((1, 2, 2, 2)), "case_id": "Case_7"}
    saver(item)
    with pytest.raises(OSError, match="disk full"):
        saver(item)
    assert len(set(names)) == 2, names
    assert all(n.startswith(".Case_7_seg.") and f".{os.getpid()}-" in n for n in names)
    assert all(n.endswith(".partial.nii.gz") for n in names)
    # the first call's file under its final name, the failed call's temporary file gone
    assert [p.name for p in tmp_path.iterdir()] == ["Case_7_seg.nii.gz"]


SLOW_WRITERS = """
import time
from monai.data import image_writer

for _cls in (image_writer.ITKWriter, image_writer.NibabelWriter):
    def _slow(self, *args, _write=_cls.write, **kwargs):
        _write(self, *args, **kwargs)
        time.sleep(0.3)
    _cls.write = _slow
"""


@pytest.mark.slow
def test_two_processes_writing_the_same_cases(setup, tmp_path):
    """Two runs on one folder at once: both succeed and every output equals a single-process run's.

    MONAI's writers pause 0.3 s after each file (a slow disk), in both runs, through a
    ``sitecustomize`` on PYTHONPATH: the command is the user's, unchanged, and the two runs'
    temporary files of one case are certain to exist at the same time (with one shared temporary
    name, one run renames the other's file and then fails).
    """
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WRITERS)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(hooks), str(BUNDLE_ROOT)])}
    cases = sorted(p.name for p in setup["data"].iterdir())
    reference, shared = tmp_path / "reference", tmp_path / "shared"
    extra = ["--save_probabilities", "true", "--save_uncertainty", "true"]
    single = _bundle_infer(setup, reference, *extra)
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "bundle", "infer", str(setup["data"]), "--output", str(shared)]
    command += ["--checkpoint", str(setup["checkpoint"]), "--config_file", _configs(setup["tiny"]), *extra]
    # overwrite: neither skips what the other finished first, so both write every file
    command += ["--overwrite", "true"]
    runs = [
        subprocess.Popen(command, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert output.count("bundle.inference.writers - INFO - wrote ") == 3 * len(cases), output[-3000:]
    # the two runs wrote at the same time (each started writing before the other had finished)
    spans = [_write_span(output) for output in outputs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    expected = sorted(f"{c}_{p}.nii.gz" for c in cases for p in ("seg", "prob", "uncertainty"))
    assert sorted(p.name for p in shared.iterdir()) == expected, "no temporary file left behind"
    for name in expected:
        assert np.array_equal(_data(shared / name), _data(reference / name)), name
        np.testing.assert_array_equal(nib.load(shared / name).affine, nib.load(reference / name).affine)


def _write_span(log: str) -> tuple[datetime, datetime]:
    """Time of the first and the last "wrote" line of a run's log (progress bars share the lines)."""
    pattern = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - bundle\.inference\.writers - INFO - wrote "
    stamps = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f") for m in re.findall(pattern, log)]
    return min(stamps), max(stamps)


@pytest.mark.parametrize("output_dtype", [np.uint8, np.float32])
def test_fortran_order_writer_writes_monai_nibabel_writers_bytes(tmp_path, output_dtype):
    """AtomicSaveImaged's NIfTI writer gives the file MONAI's NibabelWriter gives, to the decompressed byte."""
    import gzip

    import torch
    from monai.data import MetaTensor, NibabelWriter

    from bundle.inference.writers import NiftiWriter

    rng = np.random.default_rng(2)
    voxels = rng.integers(0, 4, size=(1, 23, 19, 11)).astype(np.float32)
    affine = torch.tensor([[-1.0, 0, 0, 30], [0, -1.2, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    image = MetaTensor(torch.from_numpy(voxels), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    ours = AtomicSaveImaged("pred", output_dir=tmp_path, output_postfix="ours", output_dtype=output_dtype)
    assert ours.saver.writers == (NiftiWriter,)
    monai = AtomicSaveImaged(
        "pred", output_dir=tmp_path, output_postfix="monai", output_dtype=output_dtype, writer=NibabelWriter
    )
    for saver in (ours, monai):
        saver({"pred": image.clone(), "case_id": "case"})
    written = [gzip.decompress((tmp_path / f"case_{name}.nii.gz").read_bytes()) for name in ("ours", "monai")]
    assert written[0] == written[1]
    loaded = nib.load(tmp_path / "case_ours.nii.gz")
    assert loaded.get_data_dtype() == output_dtype
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), voxels[0].astype(output_dtype))


# ----------------------------------------------------------------------------- what killed runs leave, write faults


def _dead_pid() -> int:
    """The id of a process that has ended (a child, waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_run_removes_what_killed_writes_left_and_nothing_else(setup, tmp_path):
    """A killed write leaves a hidden 0-byte temporary file for ever; the next run in the folder removes it,
    but only a file the bundle names that way, of a process that no longer runs, on this machine."""
    from bundle.atomic import host_tag

    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    stale = [  # the probe's name (the format before the machine was recorded) and today's
        out / f".Case_000_seg.nii.gz.{dead}-0badc0de.partial.nii.gz",
        out / f".Case_001_prob.nii.gz.{dead}-0badc0de.{host_tag()}.partial.nii.gz",
    ]
    kept = [
        out / f".Case_002_seg.nii.gz.{os.getpid()}-0badc0de.partial.nii.gz",  # a write in progress
        out / f".Case_002_seg.nii.gz.{dead}-0badc0de.other-machine.partial.nii.gz",  # a shared folder's other host
        out / ".Case_000_seg.nii.gz.notes",  # the user's
        out / "Case_000_seg.partial.nii.gz",
        out / f".Case_000_seg.nii.gz.{dead}-notahex0.partial.nii.gz",
        out / f"Case_000_seg.nii.gz.{dead}-0badc0de.partial.nii.gz",  # not hidden: not the bundle's
    ]
    for path in stale + kept:
        path.write_bytes(b"")
    folder_like = out / f".Case_003_seg.nii.gz.{dead}-0badc0de.partial.nii.gz"
    folder_like.mkdir()
    link = out / f".Case_004_seg.nii.gz.{dead}-0badc0de.partial.nii.gz"
    link.symlink_to(setup["checkpoint"])
    result = _bundle_infer(setup, out, "--tta", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(p.exists() for p in stale), [p.name for p in stale if p.exists()]
    assert all(p.exists() for p in kept) and folder_like.is_dir() and link.is_symlink()
    for path in stale:
        assert f"removed {path}: the temporary file of a write that process {dead} did not finish" in result.stdout
    assert all((out / f"{c}_seg.nii.gz").is_file() for c in CASES)


def test_atomic_writes_remove_the_leftovers_of_their_own_file(tmp_path):
    """Tables and datalists (bundle.atomic.write_text_atomic) clear a dead writer's temporary file of the same name."""
    from bundle.atomic import temporary_name, write_text_atomic

    target = tmp_path / "metrics.csv"
    stale = tmp_path / f".metrics.csv.{_dead_pid()}-0badc0de.partial"
    other = tmp_path / f".summary.json.{_dead_pid()}-0badc0de.partial"
    for path in (stale, other):
        path.write_text("half")
    write_text_atomic(target, "case,region\n")
    assert target.read_text() == "case,region\n"
    assert not stale.exists() and other.exists(), "another file's leftover waits for its own next write"
    name = temporary_name(target, ".nii.gz").name
    assert name.startswith(".metrics.csv.") and f".{os.getpid()}-" in name and name.endswith(".partial.nii.gz")


def _full_disk(monkeypatch, written: list[Path]) -> None:
    """nibabel's save on a full disk: it creates the file, then the first write fails with Errno 28."""
    import errno

    def save(image, filename, *args, **kwargs):
        Path(filename).write_bytes(b"")
        written.append(Path(filename))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", save)


def test_a_full_disk_is_one_sentence_with_the_file_and_the_cause(setup, tmp_path, monkeypatch, capsys):
    """It read "SaveImage cannot find a suitable writer ... install the writer libraries"."""
    from bundle.integrations.cli import main

    out = tmp_path / "out"
    written: list[Path] = []
    _full_disk(monkeypatch, written)
    argv = ["bundle", "infer", str(setup["data"]), "--output", str(out), "--checkpoint", str(setup["checkpoint"])]
    monkeypatch.setattr(sys, "argv", [*argv, "--config_file", _configs(setup["tiny"]), "--tta", "false"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"error: {out / 'Case_000_seg.nii.gz'}: cannot be written: no space left on device "
        "(free some space there, or write elsewhere)"
    )
    assert written and not any(p.exists() for p in written), "the temporary file is removed"
    assert not any(out.iterdir())
