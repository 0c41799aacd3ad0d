"""Assemble a self-contained MONAI model-zoo bundle from this repository.

``python -m bundle export --output DIR [--zip] [--checkpoint models/model.pt]`` writes::

    DIR/configs/      metadata.json, train/inference/evaluate/multi_gpu_train YAML, logging.conf, variants
    DIR/models/       model.pt (plain state dict), model_record.json (what built it), model.ts (TorchScript)
    DIR/docs/         README.md (model card), methods.md, data_license.txt
    DIR/bundle/       this package, vendored so `_target_: bundle....` resolves from DIR alone
    DIR/schemas/      meta_schema.json for `monai.bundle verify_metadata` offline
    DIR/LICENSE, DIR/large_files.yml (md5 of the model files)
    DIR/.bundle_export.json  the checkpoint it came from and every file written (left out of the zip)

Nothing of the user's is ever deleted: ``DIR`` must be new, empty, or an earlier export holding only what
that export wrote; the folder is assembled beside ``DIR`` and renamed into place when complete, so a
failed export leaves nothing (:func:`check_destination`, :func:`export`).

The folder passes the model zoo's CI as ``ci/verify_bundle.py`` calls MONAI (default arguments):
``verify_metadata``, ``verify_net_in_out`` with ``n = 1``, ``ckpt_export`` (scripted, no ``key_in_ckpt``)
and ``torch.jit.load``. Hence three things differ from a training checkpoint:

* ``models/model.pt`` is the inference network's plain state dict and its model record is
  ``models/model_record.json`` (:func:`bundle.plan.checkpoints.record_file`): the zoo's ``ckpt_export`` loads
  the whole file into ``network_def``.
* The inference network is the trained one without its deep-supervision heads (``deep_supervision:
  false``, :func:`inference_form`): they are only used in training, the eval-mode output is the same,
  and DynUNet's head bookkeeping cannot be scripted (the zoo's DynUNet bundles do the same).
* M2 with its gate (:class:`bundle.networks.GatedSegmenter`) is exported whole: ``model.pt`` holds the
  gate's and the segmenter's weights, ``model.ts`` runs the gate, then the segmenter on the slices it passes.
* ``metadata.json``'s ``network_data_format`` is derived from the exported network
  (:func:`network_data_format`): ``spatial_shape`` is ``"d*(n+1)"`` with ``d`` the network's total
  down-sampling, so the zoo's ``n = 1`` gives the smallest input with a 2-voxel bottleneck (instance
  normalisation is undefined on one voxel).

TorchScript export runs MONAI's own ``ckpt_export`` in a child process started in ``DIR`` with only
``DIR`` on ``PYTHONPATH``, so a successful export already proves the bundle needs nothing else.
The model zoo accepts no file over 25 MB; model files above that are hashed in large_files.yml
and left out of the zip (to be hosted at ``url_base``), everything else over it is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pydoc
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from bundle.errors import OptionError
from bundle.networks import M4UNet
from bundle.options import folder_problem
from bundle.paths import BUNDLE_ROOT
from bundle.plan.checkpoints import MODEL_KEY, RECORD_KEY, CheckpointError, load_checkpoint, record_file
from bundle.plan.network import input_divisors, is_gated, network_data_format, network_from_spec

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 25 * 1024 * 1024
MODEL_FILES = ("models/model.pt", "models/model.ts")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")
#: Written into every export: the checkpoint it came from and every file it wrote, so that a later export
#: replaces that folder only while it holds nothing else (:func:`check_destination`).
EXPORT_MARKER = ".bundle_export.json"
#: The repository's folders copied into an export whole.
COPIED_FOLDERS = ("configs", "bundle", "schemas")


def inference_form(
    record: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The recorded network without its deep-supervision heads, and its weights taken from ``state``.

    In eval mode a deep-supervised network returns its main output only, so the heads are training
    state; without them the network scripts (the zoo's ``ckpt_export``) and the weights load strictly.
    Every weight of the inference network must be in ``state`` with its shape.

    :class:`bundle.networks.M4UNet` differs from MONAI's ``DynUNet`` only in what its training-mode
    deep supervision returns (same weights, same eval-mode graph), and its list return cannot be
    scripted: its inference form is MONAI's ``DynUNet`` itself.
    """
    spec = dict(record["network"])
    if is_gated(spec):  # M2 with its gate: the segmenter in its inference form, the gate as it is
        spec["segmenter"] = _inference_spec(spec["segmenter"])
    else:
        spec = _inference_spec(spec)
    network = network_from_spec(spec)
    wanted = network.state_dict()
    missing = [k for k, v in wanted.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if missing:
        raise OptionError(
            f"{spec['_target_']}: {len(missing)} weights of the inference network are not in the checkpoint "
            f"(e.g. {missing[0]!r})"
        )
    weights = {k: state[k].clone() for k in wanted}
    network.load_state_dict(weights)  # strict: exactly the inference network's weights
    dropped = len(state) - len(weights)
    if dropped:
        logger.info("export: %d training-only weights (deep-supervision heads) left out", dropped)
    return {**record, "network": spec}, weights


def _inference_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A segmenter's spec without deep-supervision heads (M4UNet: MONAI's DynUNet; see :func:`inference_form`)."""
    spec = dict(spec)
    if spec.get("deep_supervision"):
        spec["deep_supervision"] = False
    constructor = pydoc.locate(str(spec["_target_"]))
    if isinstance(constructor, type) and issubclass(constructor, M4UNet):
        spec["_target_"] = "monai.networks.nets.DynUNet"
        spec.pop("upsample_heads", None)
    return spec


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file, read in chunks (the hash type the model zoo's large_files.yml uses)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_env(bundle_dir: str | Path) -> dict[str, str]:
    """Environment for a child process that must see only ``bundle_dir`` (and site-packages)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(bundle_dir).resolve())
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no byte-code caches in the exported folder
    return env


def _copy_tree(out: Path) -> None:
    for folder in COPIED_FOLDERS:
        shutil.copytree(BUNDLE_ROOT / folder, out / folder, ignore=_IGNORE)
    (out / "docs").mkdir()
    for name in ("README.md", "methods.md", "data_license.txt"):  # configs cite docs/methods.md
        shutil.copy2(BUNDLE_ROOT / "docs" / name, out / "docs" / name)
    shutil.copy2(BUNDLE_ROOT / "LICENSE", out / "LICENSE")


def _write_large_files(out: Path, url_base: str | None) -> None:
    entries = []
    for relative in MODEL_FILES:
        entry = {"path": relative, "hash_val": md5sum(out / relative), "hash_type": "md5"}
        entry["url"] = f"{url_base.rstrip('/')}/{Path(relative).name}" if url_base else ""
        entries.append(entry)
    (out / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))


def _check_sizes(out: Path) -> list[str]:
    """Return the model files over the limit; raise for any other file over it."""
    too_big = [
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES
    ]
    others = [p for p in too_big if p not in MODEL_FILES]
    if others:
        raise ValueError(f"files over 25 MB cannot go into a model-zoo bundle: {', '.join(others)}")
    return too_big


def _zip(folder: Path, name: str, leave_out: list[str], destination: Path) -> None:
    """Zip ``folder`` as ``name/...`` (without ``leave_out`` and the export marker) to ``destination``.

    Staged in a new hidden folder beside ``destination`` (removed whatever happens), so no file or
    folder of the user's is touched and a failed zip leaves nothing.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".zipping", dir=destination.parent))
    try:
        shutil.copytree(folder, staging / name, ignore=_IGNORE)
        for relative in [*leave_out, EXPORT_MARKER]:
            (staging / name / relative).unlink(missing_ok=True)
        made = Path(shutil.make_archive(str(staging / "archive"), "zip", root_dir=staging, base_dir=name))
        os.replace(made, destination)
    finally:
        shutil.rmtree(staging)


def _export_torchscript(out: Path, record: Mapping[str, Any]) -> None:
    """``models/model.ts`` by MONAI's ``ckpt_export`` called as the zoo's CI calls it (scripted, plain weights).

    A network TorchScript cannot script is traced instead, with a warning: the zoo's CI would then need
    the bundle in its ``exclude_verify_torchscript_list``.
    """
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "network_def",
        "--filepath",
        "models/model.ts",
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
    ]
    result = subprocess.run(command, cwd=out, env=bundle_env(out), capture_output=True, text=True)
    if result.returncode == 0:
        return
    channels = len(record["input_channels"])
    shape = [1, channels, *(2 * d for d in input_divisors(record["network"]))]
    logger.warning(
        "export: %s cannot be scripted (the model zoo's CI scripts it); traced at %s instead",
        record["network"]["_target_"],
        shape,
    )
    traced = [*command, "--use_trace", "True", "--input_shape", json.dumps(shape).replace(" ", "")]
    result = subprocess.run(traced, cwd=out, env=bundle_env(out), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ckpt_export failed in {out}:\n{result.stderr[-3000:]}")


def _files_under(folder: Path) -> list[str]:
    """Every file (or link) below ``folder``, relative, sorted; Python's byte-code caches left out."""
    found = []
    for path in folder.rglob("*"):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        if path.is_file() or path.is_symlink():
            found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The export marker of ``folder`` (what an earlier export wrote there), or None."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(out: Path, archive: Path | None = None) -> bool:
    """Refuse, in one sentence and before any work, an output the export may not replace; True if one is replaced.

    The export writes a new folder, or replaces a folder only when everything in it was written by an
    earlier export (its :data:`EXPORT_MARKER` lists the files; Python's byte-code caches aside). Never the
    folder the user stands in or one holding it, never this repository or a folder it copies from, never a
    file, nor a folder one cannot write in. ``archive`` (with ``--zip``): ``<output>.zip`` is replaced only
    if the earlier export wrote it.
    """
    where = f"--output {out}"
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        raise OptionError(f"{where}: is the folder you are in, or holds it; export to a new folder, e.g. dist/brats")
    if _inside(BUNDLE_ROOT, out) or any(_inside(out, BUNDLE_ROOT / f) for f in (*COPIED_FOLDERS, "docs", "models")):
        raise OptionError(f"{where}: is this repository or a folder of it that the export copies; choose a new folder")
    replaced = False
    marker: dict[str, Any] | None = None
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OptionError(f"{where}: is a file or a link, not a folder; choose a new folder")
    # the export is assembled beside it and renamed into place: a read-only mount stops it before any work
    problem = folder_problem(out.parent, "the folder of the export")
    if problem:
        raise OptionError(f"--output {out}: {problem}")
    if out.is_dir() and any(out.iterdir()):
        marker = _read_marker(out)
        if marker is None:
            raise OptionError(
                f"{where}: the folder exists and was not written by an export (no {EXPORT_MARKER}); "
                "choose a new or empty folder"
            )
        foreign = [f for f in _files_under(out) if f not in set(marker["files"]) | {EXPORT_MARKER}]
        if foreign:
            raise OptionError(
                f"{where}: holds {foreign[0]}"
                + (f" and {len(foreign) - 1} other file(s)" if len(foreign) > 1 else "")
                + ", which the earlier export did not write; move them away or choose a new folder"
            )
        replaced = True
    if archive is not None and (archive.exists() or archive.is_symlink()):
        recorded = (marker or {}).get("zip_md5")
        if not archive.is_file() or archive.is_symlink() or recorded is None or md5sum(archive) != recorded:
            raise OptionError(
                f"--zip: {archive} exists and is not the zip of the export in {out}; move it away or choose "
                "a new folder"
            )
    return replaced


def export(
    output: str,
    zip: bool = False,  # the CLI flag is --zip
    checkpoint: str | None = None,
    url_base: str | None = None,
) -> str:
    """Write the model-zoo bundle to ``output``; return its path. Nothing of the user's is ever deleted.

    ``output`` is a new or empty folder, or an earlier export, which is replaced only when it holds
    nothing the export did not write (:func:`check_destination`). The bundle is assembled in a hidden
    folder beside ``output`` and renamed into place when complete, so a failed export leaves nothing.
    ``checkpoint``: the trained state dict (default models/model.pt). ``zip``: also write
    ``<output>.zip``. ``url_base``: where the large model files will be hosted (large_files.yml).
    """
    out = Path(output).resolve()
    source = Path(checkpoint) if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
    archive = out.with_name(f"{out.name}.zip") if zip else None
    replacing = check_destination(out, archive)  # the options first, as every command checks them
    if not source.is_file():
        raise CheckpointError(f"{source}: checkpoint does not exist (train one first, or pass --checkpoint)")
    made_parents = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; the export is a folder like any other
    zipped: Path | None = None
    try:
        record, leave_out = _assemble(staging, source, url_base)
        marker = {"checkpoint": str(source.resolve()), "checkpoint_md5": md5sum(source), "files": []}
        if archive is not None:
            zipped = staging.with_name(f"{staging.name}.zip")
            _zip(staging, out.name, leave_out, zipped)
            marker["zip_md5"] = md5sum(zipped)
        marker["files"] = [*_files_under(staging), EXPORT_MARKER]
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(staging, out, replacing)
        if zipped is not None and archive is not None:
            os.replace(zipped, archive)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if zipped is not None:
            zipped.unlink(missing_ok=True)
        for parent in reversed(made_parents):  # only the empty folders this export made
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    if leave_out:
        logger.warning("over 25 MB, to be hosted (url in large_files.yml), not zipped: %s", ", ".join(leave_out))
    logger.info("bundle exported to %s (network %s)", out, record["network"]["_target_"])
    if archive is not None:
        logger.info("zip: %s", archive)
    return str(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out: Path, replacing: bool) -> None:
    """Rename the assembled ``staging`` to ``out``; an earlier export (or empty folder) there is removed after."""
    if not out.exists():
        os.replace(staging, out)
        return
    if not replacing:  # an empty folder
        out.rmdir()
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
    os.replace(out, old)  # onto the new empty folder: POSIX rename replaces an empty directory
    os.replace(staging, out)
    shutil.rmtree(old)


def _assemble(out: Path, source: Path, url_base: str | None) -> tuple[dict[str, Any], list[str]]:
    """Write the bundle's files into the (new, empty) folder ``out``; return the exported record and the large files."""
    _copy_tree(out)
    (out / "models").mkdir()
    checkpoint = load_checkpoint(source)  # read once: a full-width checkpoint is over 100 MB
    record, weights = inference_form(dict(checkpoint[RECORD_KEY]), checkpoint[MODEL_KEY])
    # the zoo's format: plain weights, loaded by ckpt_export without key_in_ckpt; the record beside them
    torch.save(weights, out / "models" / "model.pt")
    record_file(out / "models" / "model.pt").write_text(json.dumps(record, indent=2) + "\n")
    metadata_file = out / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["network_data_format"] = network_data_format(record, metadata["network_data_format"])
    metadata_file.write_text(json.dumps(metadata, indent=4) + "\n")
    _export_torchscript(out, record)
    _write_large_files(out, url_base)
    return record, _check_sizes(out)
