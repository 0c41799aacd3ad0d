"""``python -m bundle export`` never deletes what it did not write, and a failed export leaves nothing.

Through the command users type (``python -m bundle export``, i.e. :func:`bundle.integrations.cli.main`): a folder
shaped like a clone of this repository (``.git``, tests, notes, runs, ``configs/metadata.json``), the
folder the user stands in (``--output .``), a folder holding it, a file, a bad checkpoint. A real
export then replaces an earlier export, but not one a user has added a file to, nor a zip it did not write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import bundle.data.datalist
import bundle.errors
import bundle.evaluation.files
import bundle.evaluation.metrics
import bundle.evaluation.plots
import bundle.evaluation.reports
import bundle.evaluation.statistics
import bundle.inference.run
import bundle.integrations.cli
import bundle.integrations.cv
import bundle.integrations.export
import bundle.integrations.monailabel
import bundle.networks
import bundle.options
import bundle.paths
import bundle.plan.checkpoints
from bundle.errors import OptionError
from bundle.integrations.export import EXPORT_MARKER, export
from bundle.plan.checkpoints import save_model
from bundle.plan.network import network_from_spec


def _checkout(root: Path) -> dict[Path, bytes]:
    """A folder shaped like a clone of the repository with a user's own work in it; its files and bytes."""
    files = {
        root / ".git" / "HEAD": b"ref: refs/heads/main\n",
        root / "configs" / "metadata.json": b'{"version": "0.2.0"}\n',
        root / "tests" / "test_mine.py": b"def test(): pass\n",
        root / "notes.md": b"my notes\n",
        root / "runs" / "train" / "metrics_per_epoch.csv": b"epoch,loss\n1,0.5\n",
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def _unchanged(files: dict[Path, bytes]) -> bool:
    return all(path.is_file() and path.read_bytes() == content for path, content in files.items())


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``python -m bundle export ARGS``: exit status and what it printed on stderr."""
    monkeypatch.setattr(sys, "argv", ["bundle", "export", *args])
    try:
        bundle.integrations.cli.main()
        status = 0
    except SystemExit as stop:
        status = int(stop.code or 0)
    return status, capsys.readouterr().err


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    spec = {"_target_": "bundle.networks.ResUNet", "spatial_dims": 3, "in_channels": 4, "out_channels": 3}
    network = network_from_spec({**spec, "channels": [4, 8]})
    return save_model(tmp_path / "weights.pt", network, patch_size=[16, 16, 16])


def test_export_over_a_checkout_deletes_nothing(monkeypatch, capsys, tmp_path: Path, checkpoint: Path) -> None:
    files = _checkout(tmp_path / "clone")
    status, err = _cli(monkeypatch, capsys, "--output", str(tmp_path / "clone"), "--checkpoint", str(checkpoint))
    assert status == 1
    assert "was not written by an export" in err and str(tmp_path / "clone") in err
    assert len(err.strip().splitlines()) == 1
    assert _unchanged(files)


@pytest.mark.parametrize("output", [".", "..", "./"])
def test_export_to_the_folder_one_stands_in_is_refused(
    monkeypatch, capsys, tmp_path: Path, checkpoint: Path, output: str
) -> None:
    files = _checkout(tmp_path / "clone")
    (tmp_path / "clone" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "clone" / ("sub" if output == ".." else ""))
    status, err = _cli(monkeypatch, capsys, "--output", output, "--checkpoint", str(checkpoint))
    assert status == 1 and "is the folder you are in, or holds it" in err
    assert _unchanged(files)


def test_export_into_this_repository_is_refused(monkeypatch, tmp_path: Path, checkpoint: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for inside in (bundle.paths.BUNDLE_ROOT, bundle.paths.BUNDLE_ROOT / "bundle" / "exported"):
        with pytest.raises(OptionError, match="is this repository or a folder of it"):
            export(str(inside), checkpoint=str(checkpoint))


def test_output_that_is_a_file_is_refused(monkeypatch, capsys, tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "out").write_text("mine")
    status, err = _cli(monkeypatch, capsys, "--output", str(tmp_path / "out"), "--checkpoint", str(checkpoint))
    assert status == 1 and "is a file or a link, not a folder" in err
    assert (tmp_path / "out").read_text() == "mine"


def test_a_failed_export_leaves_nothing(monkeypatch, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    before = sorted(p.name for p in tmp_path.iterdir())
    status, err = _cli(monkeypatch, capsys, "--output", str(tmp_path / "new" / "dist"), "--checkpoint", str(bad))
    assert status == 1 and "bad.pt: not a readable PyTorch checkpoint" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no hidden staging, no made parent


def _fake_torchscript(out: Path, record: object) -> None:
    """Stands in for MONAI's ckpt_export child process (the slow export tests run it for real)."""
    torch.save({}, out / "models" / "model.ts")


def test_an_earlier_export_is_replaced_only_while_it_holds_only_its_own_files(
    monkeypatch, tmp_path: Path, checkpoint: Path
) -> None:
    monkeypatch.setattr(bundle.integrations.export, "_export_torchscript", _fake_torchscript)
    out = tmp_path / "dist" / "brats"
    export(str(out), zip=True, checkpoint=str(checkpoint))
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["checkpoint_md5"] == bundle.integrations.export.md5sum(checkpoint)
    assert "models/model.pt" in marker["files"] and "configs/metadata.json" in marker["files"]
    assert not [p for p in tmp_path.joinpath("dist").iterdir() if p.name.startswith(".")]  # no staging left
    assert (out.stat().st_mode & 0o777) == (out.parent.stat().st_mode & 0o777)  # as a folder made with mkdir

    # byte-code caches of running it are the export's own: replaced
    (out / "bundle" / "__pycache__").mkdir()
    (out / "bundle" / "__pycache__" / "cli.cpython-311.pyc").write_bytes(b"\0")
    (out / "models" / "model.pt").write_bytes(b"stale")
    export(str(out), zip=True, checkpoint=str(checkpoint))
    assert (out / "models" / "model.pt").read_bytes() != b"stale"

    # a file the user put there stops the next export; nothing is touched
    (out / "my_results.csv").write_text("case,dice\n")
    with pytest.raises(OptionError, match=r"holds my_results\.csv, which the earlier export did not write"):
        export(str(out), zip=True, checkpoint=str(checkpoint))
    assert (out / "my_results.csv").is_file()
    (out / "my_results.csv").unlink()

    # a zip that is not the export's is never replaced
    zip_file = out.with_name("brats.zip")
    zip_file.write_bytes(b"my own archive")
    with pytest.raises(OptionError, match=r"brats\.zip exists and is not the zip of the export"):
        export(str(out), zip=True, checkpoint=str(checkpoint))
    assert zip_file.read_bytes() == b"my own archive"
    export(str(out), zip=False, checkpoint=str(checkpoint))  # without --zip the zip is not touched
    assert zip_file.read_bytes() == b"my own archive"


def test_an_empty_folder_is_used(monkeypatch, tmp_path: Path, checkpoint: Path) -> None:
    monkeypatch.setattr(bundle.integrations.export, "_export_torchscript", _fake_torchscript)
    (tmp_path / "empty").mkdir()
    export(str(tmp_path / "empty"), checkpoint=str(checkpoint))
    assert (tmp_path / "empty" / "models" / "model.pt").is_file()
