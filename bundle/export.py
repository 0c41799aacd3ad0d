"""Assemble a self-contained MONAI model-zoo bundle from this repository.

``python -m bundle export --output DIR [--zip] [--checkpoint models/model.pt]`` writes::

    DIR/configs/      metadata.json, train/inference/evaluate/multi_gpu_train YAML, logging.conf, variants
    DIR/models/       model.pt (state dict), model.ts (TorchScript, MONAI's ckpt_export)
    DIR/docs/         README.md (model card), methods.md, data_license.txt
    DIR/bundle/       this package, vendored so `_target_: bundle....` resolves from DIR alone
    DIR/schemas/      meta_schema.json for `monai.bundle verify_metadata` offline
    DIR/LICENSE, DIR/large_files.yml (md5 of the model files)

TorchScript export runs MONAI's own ``ckpt_export`` in a child process started in ``DIR`` with only
``DIR`` on ``PYTHONPATH``, so a successful export already proves the bundle needs nothing else.
The model zoo accepts no file over 25 MB; model files above that are hashed in large_files.yml
and left out of the zip (to be hosted at ``url_base``), everything else over it is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bundle.checkpoints import network_data_format, read_record
from bundle.paths import BUNDLE_ROOT

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 25 * 1024 * 1024
MODEL_FILES = ("models/model.pt", "models/model.ts")
#: Patch of the TorchScript trace when the checkpoint records none (any valid size works afterwards).
TRACE_PATCH = (64, 64, 64)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")


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
    return env


def _copy_tree(out: Path) -> None:
    for folder in ("configs", "bundle", "schemas"):
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


def _zip(out: Path, leave_out: list[str]) -> Path:
    staging = out.parent / f".{out.name}.zipping"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(out, staging / out.name)
    for relative in leave_out:
        (staging / out.name / relative).unlink()
    result = Path(shutil.make_archive(str(out), "zip", root_dir=staging, base_dir=out.name))
    shutil.rmtree(staging)
    return result


def export(
    output: str,
    zip: bool = False,  # the CLI flag is --zip
    checkpoint: str | None = None,
    url_base: str | None = None,
) -> str:
    """Write the model-zoo bundle to ``output`` (replacing an earlier export there); return its path.

    ``checkpoint``: the trained state dict (default models/model.pt). ``zip``: also write
    ``<output>.zip``. ``url_base``: where the large model files will be hosted (large_files.yml).
    """
    out = Path(output).resolve()
    source = Path(checkpoint) if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: checkpoint does not exist (train one first, or pass --checkpoint)")
    if out.exists():
        if any(out.iterdir()) and not (out / "configs" / "metadata.json").is_file():
            raise FileExistsError(f"{out}: exists and is not an earlier export; choose an empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _copy_tree(out)
    (out / "models").mkdir()
    shutil.copy2(source, out / "models" / "model.pt")

    record = read_record(out / "models" / "model.pt")  # inference.yaml builds the network from the record
    network = record["network"]
    # the channels the recorded model takes (M4's best: 5), and one training patch to trace
    metadata_file = out / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["network_data_format"] = network_data_format(record, metadata["network_data_format"])
    metadata_file.write_text(json.dumps(metadata, indent=4) + "\n")
    trace_shape = [1, len(record["input_channels"]), *(record.get("patch_size") or TRACE_PATCH)]
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
        "--key_in_ckpt",
        "model",  # {"model": weights, "model_record": ...} (bundle.checkpoints)
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.yaml",
        # DynUNet's deep-supervision bookkeeping cannot be scripted; the eval-mode graph is traced.
        "--use_trace",
        "True",
        "--input_shape",
        str(trace_shape).replace(" ", ""),
    ]
    result = subprocess.run(command, cwd=out, env=bundle_env(out), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ckpt_export failed in {out}:\n{result.stderr[-3000:]}")
    _write_large_files(out, url_base)
    leave_out = _check_sizes(out)
    if leave_out:
        logger.warning("over 25 MB, to be hosted (url in large_files.yml), not zipped: %s", ", ".join(leave_out))
    logger.info("bundle exported to %s (network %s)", out, network["_target_"])
    if zip:
        logger.info("zip: %s", _zip(out, leave_out))
    return str(out)
