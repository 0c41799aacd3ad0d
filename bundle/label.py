"""Serve the bundle with MONAI Label's ``monaibundle`` sample app (auto-segmentation and training).

MONAI Label 0.8.5 runs a bundle from ``<app>/model/<name>/`` with its own conventions, which this
module adapts without changing the bundle:

* It prefers ``configs/inference.json`` / ``configs/train.json`` over the YAML files and runs
  them from its own working directory, where the ``%configs/train.yaml::...`` macros of
  ``inference.yaml`` would not resolve. :func:`assemble_app` therefore writes both JSON files:
  the YAML configs with macros expanded plus :data:`APP_OVERRIDES`.
* Its datastore holds one image file per case. The app uses the Medical Segmentation Decathlon
  Task01 convention throughout: a single 4-D NIfTI with the channels FLAIR, T1w, T1gd, T2w
  (layout ``msd``), and label values 1 edema, 2 non-enhancing tumour core, 3 enhancing tumour
  for both the labels it writes and the final labels it trains on.
* It reads the label names from ``metadata.json``'s ``outputs.pred.channel_def`` (label value ->
  name), takes the label map from the ``pred`` key and drops ``SaveImaged`` from the
  post-processing; the app's metadata and post-processing are adapted accordingly (``Invertd``
  stays, so labels come back on the input's own grid and orientation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from bundle.checkpoints import network_data_format, read_record, salient_channel
from bundle.constants import CLASS_NAMES, LABEL_SCHEMES
from bundle.paths import BUNDLE_ROOT, working_directory

logger = logging.getLogger(__name__)

#: Name of the bundle inside the app (``--conf models <name>``, ``POST /infer/<name>``).
MODEL_NAME = "brats_resunet_segmentation"
#: Image channel order and label values of the app's datastore (see the module docstring).
APP_LAYOUT = "msd"
#: Config keys the app sets in both train.json and inference.json.
APP_OVERRIDES: dict[str, Any] = {"label_layout": APP_LAYOUT}
#: Config keys the app sets in inference.json only.
APP_INFER_OVERRIDES: dict[str, Any] = {"output_label_scheme": APP_LAYOUT}
#: MONAI Label takes the label map from this key (after its own filtering of SaveImaged).
PRED_KEY = "pred"
#: Config targets that load the image (MONAI Label wraps any LoadImaged in its LoadImageTensord).
LOADERS = ("LoadImaged", "monai.transforms.LoadImaged", "bundle.transforms.ThreadUnsafeLoadImaged")


def sample_app_dir() -> Path:
    """Return the ``monaibundle`` sample app that ships inside the monailabel wheel."""
    candidates = [Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"]
    with contextlib.suppress(ImportError):
        import monailabel

        candidates.append(Path(monailabel.__file__).resolve().parents[1] / "sample-apps" / "monaibundle")
    for candidate in candidates:
        if (candidate / "main.py").is_file():
            return candidate
    raise FileNotFoundError(
        "MONAI Label's monaibundle sample app was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install the 'label' extra: pip install -e '.[label]'"
    )


def label_channel_def(scheme: str = APP_LAYOUT) -> dict[str, str]:
    """Label value -> class name for the values a label scheme writes (MONAI Label's label names)."""
    return {str(value): CLASS_NAMES[internal] for value, internal in sorted(LABEL_SCHEMES[scheme].items())}


def expand_config(bundle_dir: Path, config: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``bundle_dir/configs/<config>``, expand its ``%file::id`` macros and apply ``overrides``.

    Macros are expanded with ``bundle_dir`` as working directory, which is how
    ``monai.bundle run`` resolves them when started from the bundle root.
    """
    parser = ConfigParser()
    with working_directory(bundle_dir):
        parser.read_config(str(bundle_dir / "configs" / config))
        parser.resolve_macro_and_relative_ids()
    for key, value in overrides.items():
        parser[key] = value
    return parser.get()


def app_inference_config(bundle_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """inference.yaml as the app serves it: macros expanded, MSD convention, label map in ``pred``."""
    # the served network is the one the checkpoint records: training's network_factory does not apply
    overrides = {k: v for k, v in overrides.items() if not k.startswith("network_factory")}
    config = expand_config(bundle_dir, "inference.yaml", {**APP_OVERRIDES, **overrides, **APP_INFER_OVERRIDES})
    for transform in config["preprocessing"]["transforms"]:
        # MONAI Label wraps LoadImaged in its LoadImageTensord, which ignores allow_missing_keys:
        # inference requests carry no label, so the loader gets the image key only.
        if isinstance(transform, dict) and transform.get("_target_") in LOADERS:
            transform["keys"] = ["@image_key"]
    # MONAI Label takes the label map from "pred"; inference.yaml leaves it in "pred_label".
    config["postprocessing"]["transforms"].append({"_target_": "CopyItemsd", "keys": "pred_label", "names": PRED_KEY})
    return config


def app_train_config(bundle_dir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """train.yaml as the app trains with it: macros expanded, so ``train#handlers`` is a list of handler configs.

    MONAI Label's training task inserts its ``CheckpointLoader`` into that list; train.yaml's entries
    are ``%`` copies of its named handlers, which MONAI Label would not expand.
    """
    return expand_config(bundle_dir, "train.yaml", overrides)


def recorded_network_factory(checkpoint: str | Path) -> dict[str, Any]:
    """train.yaml's ``network_factory`` for the network ``checkpoint`` records (MONAI Label trains on from it)."""
    return {**read_record(checkpoint)["network"], "_mode_": "callable"}


def assemble_app(
    app_dir: str | Path,
    checkpoint: str | Path | None = None,
    name: str = MODEL_NAME,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Build a MONAI Label app folder serving this bundle; return the bundle's folder in it.

    ``app_dir`` gets a copy of the ``monaibundle`` sample app; ``app_dir/model/<name>/`` gets the
    bundle: configs (plus the app's inference.json / train.json), the ``bundle`` package and
    ``models/model.pt`` from ``checkpoint`` (default: the repository's models/model.pt).
    ``overrides`` (config key -> value) go into both JSON configs, e.g. a smaller network.
    """
    app = Path(app_dir).resolve()
    source = Path(checkpoint) if checkpoint else BUNDLE_ROOT / "models" / "model.pt"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: checkpoint does not exist (train one first, or pass --checkpoint)")
    shutil.copytree(sample_app_dir(), app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    target = app / "model" / name
    if target.exists():
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(BUNDLE_ROOT / "configs", target / "configs", ignore=ignore)
    shutil.copytree(BUNDLE_ROOT / "bundle", target / "bundle", ignore=ignore)
    (target / "models").mkdir(parents=True)
    shutil.copy2(source, target / "models" / "model.pt")

    common = {**APP_OVERRIDES, **(overrides or {})}
    # inference.json builds the network the checkpoint records; training continues that same network
    network = recorded_network_factory(target / "models" / "model.pt")
    record = read_record(target / "models" / "model.pt")
    train = app_train_config(target, {"network_factory": network, "salient_channel": salient_channel(record), **common})
    infer = app_inference_config(target, common)
    ConfigParser.export_config_file(train, str(target / "configs" / "train.json"), indent=2)
    ConfigParser.export_config_file(infer, str(target / "configs" / "inference.json"), indent=2)

    metadata_file = target / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    # the recorded model's channels (M4's best: 5 inputs) and size multiple
    metadata["network_data_format"] = network_data_format(record, metadata["network_data_format"])
    outputs = metadata["network_data_format"]["outputs"]
    pred = dict(outputs.pop(PRED_KEY, {}))
    pred["channel_def"] = label_channel_def(APP_LAYOUT)
    metadata["network_data_format"]["outputs"] = {PRED_KEY: pred, **outputs}
    metadata_file.write_text(json.dumps(metadata, indent=4))
    logger.info("MONAI Label app assembled in %s (bundle %s, network %s)", app, target, network["_target_"])
    return target


def server_command(
    app_dir: str | Path, studies: str | Path, name: str = MODEL_NAME, host: str = "127.0.0.1", port: int = 8000
) -> list[str]:
    """The ``monailabel start_server`` command line for an assembled app (offline settings included)."""
    return [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(Path(app_dir).resolve()),
        "--studies",
        str(Path(studies).resolve()),
        "--conf",
        "models",
        name,
        "--conf",
        "zoo_source",
        "ngc",  # the default source (GitHub) is unreachable offline; the bundle is local anyway
        "--conf",
        "sam2",
        "false",  # SAM2 would download weights at start-up
        "--host",
        host,
        "--port",
        str(port),
    ]


def server_env() -> dict[str, str]:
    """Environment for the server: offline bundle source, and ``bundle`` importable from the app."""
    return {**os.environ, "BUNDLE_DOWNLOAD_SRC": "ngc"}


def start_server(
    app_dir: str | Path,
    studies: str | Path,
    name: str = MODEL_NAME,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_file: str | Path | None = None,
) -> subprocess.Popen:
    """Start the MONAI Label server in its own process group (stop it with ``os.killpg(p.pid, ...)``)."""
    output = open(log_file, "w") if log_file else None  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        server_command(app_dir, studies, name, host, port),
        env=server_env(),
        stdout=output or None,
        stderr=subprocess.STDOUT if output else None,
        start_new_session=True,
    )


def label_serve(
    studies: str,
    checkpoint: str | None = None,
    app_dir: str = "runs/label/app",
    name: str = MODEL_NAME,
    host: str = "127.0.0.1",
    port: int = 8000,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Assemble the app and run MONAI Label on ``studies`` until it is stopped; return its exit code.

    ``studies``: a folder of single 4-D NIfTI images in MSD channel order (FLAIR, T1w, T1gd, T2w);
    final labels (MSD values) go to ``studies/labels/final/``.
    """
    Path(studies).mkdir(parents=True, exist_ok=True)
    assemble_app(app_dir, checkpoint, name, overrides)
    command = server_command(app_dir, studies, name, host, port)
    logger.info("starting: %s", " ".join(command))
    return subprocess.call(command, env=server_env())
