"""Serve the bundle in MONAI Label (auto-segmentation in 3D Slicer, training from final labels).

``python -m bundle label_serve --studies DIR`` takes the data as users have it and keeps every piece of
work in one folder, ``--work_dir`` (default ``runs/label``)::

    WORK/app/        the MONAI Label app, rebuilt at every start (monailabel_app + this bundle's configs)
    WORK/models/     model.pt, the served weights; MONAI Label's training replaces it (never rebuilt)
    WORK/runs/       training logs and checkpoints of MONAI Label's trainings
    WORK/studies/    for a dataset folder: one link per case, and MONAI Label's labels/ (never rebuilt)

**Studies.** ``DIR`` may be a BraTS 2021 / 2023 dataset as downloaded (a folder per case, four files
each, in any format :mod:`bundle.data` reads), a single case folder, an MSD Task01 folder, or a folder
MONAI Label already uses (one 4-D image per case, MSD channel order). MONAI Label's datastore lists
the files at the top of one folder, one image per case, so a dataset becomes a *view*
(:func:`prepare_studies`): ``WORK/studies/<case>.<ext>``, a link to the case's FLAIR, which is what a
3D Slicer user sees. Inference and training follow the link back to the case folder and load its
four modalities (``LoadCaseImaged(case_image_key=...)``); the dataset's own segmentations are
copied once to ``labels/final`` (links there would make MONAI Label write into the dataset). Labels
are read and written in the dataset's values: BraTS 2021 1, 2, 4; BraTS 2023 1, 2, 3; MSD 1 ED,
2 NCR, 3 ET.

**Weights.** The served checkpoint is chosen once per start (:func:`choose_checkpoint`) and logged:
``WORK/models/model.pt`` if it exists, trained in MONAI Label or copied at an earlier start, else
``--checkpoint`` (default ``models/model.pt``). A ``--checkpoint`` other than the one the served weights
came from replaces them, after the old file is kept as ``WORK/models/previous/model-<time>.pt``.

**The app's configs.** MONAI Label prefers ``configs/inference.json`` / ``train.json``: the app gets
both as JSON, macros expanded, with the dataset's layout and label values, the loader expanding one
file to its case, the label map copied to ``pred`` (MONAI Label's output key) and the server's
test-time augmentation default (:func:`default_tta`). Inference builds from the served checkpoint's
plan; training continues that plan (:func:`app_train_config`: the same network, preprocessing, window,
recipe and training recipe; ``cache: none``, as a corrected label must be read again), so a model
fine-tuned in MONAI Label keeps its plan, and a restart serves it as before.

**At start-up** (:func:`prepare_server`) every case is checked (:func:`check_studies`: a broken case
is named in the log, not at a user's first click) and the trainer's default epochs are sized for about
:data:`TRAIN_MINUTES` minutes from the plan and one measured training step (:func:`size_training`).
While the server runs, the datastore follows the dataset folder (:func:`follow_dataset`), a training
request is checked before any work (:func:`check_train_request`, :func:`check_labelled_cases`), and
:class:`TrainStats` writes MONAI Label's ``train_stats``. The MONAI Label side of these is
:mod:`bundle.integrations.monailabel_app`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from bundle.atomic import write_json_atomic
from bundle.constants import CLASS_NAMES, LABEL_SCHEMES, MODALITIES
from bundle.data import IMAGE_SUFFIXES, Case, case_of_image, check_case, detect_layout, discover_cases, image_stem
from bundle.errors import DataError, OptionError, UserError
from bundle.integrations.export import md5sum
from bundle.options import as_bool
from bundle.paths import BUNDLE_ROOT, working_directory
from bundle.plan import fine_tune_overrides, read_plan
from bundle.plan.network import network_data_format
from bundle.plan.plan import training_config_files

logger = logging.getLogger(__name__)

#: Name of the bundle inside the app (``--conf models <name>``, ``POST /infer/<name>``).
MODEL_NAME = "brats_resunet_segmentation"
#: MONAI Label takes the label map from this key (after its own filtering of SaveImaged).
PRED_KEY = "pred"
#: The case file a Slicer user sees for a case, in order of preference.
SHOWN_MODALITIES = ("flair", "t1ce", "t1", "t2")
#: File suffixes MONAI Label's datastore lists (bundle.integrations.monailabel_app.DATASTORE_EXTENSIONS).
STUDY_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")
#: What the studies view records (the dataset it shows, its layout); its presence marks a view.
VIEW_MARKER = "bundle_studies.json"
#: The app's main.py: MONAI Label loads it and takes the MONAILabelApp subclass it finds.
APP_MAIN = '''"""MONAI Label app of the BraTS bundle (written by bundle.integrations.monailabel)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "model", {name!r}))
from bundle.integrations.monailabel_app import BratsBundleApp  # noqa: E402, F401
'''


@dataclass(frozen=True)
class Studies:
    """The folder MONAI Label serves and the label convention of its cases."""

    folder: Path
    layout: str  # brats2021 | brats2023 | msd: channel order and label values
    source: Path  # what the user gave


def label_channel_def(scheme: str) -> dict[str, str]:
    """Label value -> class name for the values a label scheme writes (MONAI Label's label names)."""
    return {str(value): CLASS_NAMES[internal] for value, internal in sorted(LABEL_SCHEMES[scheme].items())}


# ------------------------------------------------------------------------------------------ studies


def _image_suffix(path: str | Path) -> str:
    name = Path(path).name
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), Path(path).suffix)


def _shown_file(case: Case) -> str | None:
    """The file that stands for a case in MONAI Label: its FLAIR (else T1ce, T1, T2), or its 4-D image."""
    if isinstance(case.image, str):
        return case.image
    files = dict(zip(MODALITIES, case.image))
    for modality in SHOWN_MODALITIES:
        path = files.get(modality, "")
        # a DICOM series folder is no file MONAI Label can list, and a MetaImage header without its .raw
        # beside the link would be useless to a client
        if path and Path(path).is_file() and _image_suffix(path) in STUDY_SUFFIXES:
            return path
    return None


def _sync_links(view: Path, wanted: Mapping[str, str]) -> None:
    """Make ``view`` hold exactly the links ``wanted`` (name -> target) among its symbolic links."""
    for entry in view.iterdir():
        if entry.is_symlink() and entry.name not in wanted:
            entry.unlink()  # a case that left the dataset
    for name, target in wanted.items():
        link = view / name
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.exists() and not link.is_symlink():
            raise UserError(f"{link}: a file that is not the bundle's link is in the way of case {name}")
        link.unlink(missing_ok=True)
        link.symlink_to(target)


def _import_labels(view: Path, cases: list[Case]) -> int:
    """Copy each case's ground truth to ``labels/final`` unless MONAI Label already holds a label for it."""
    final = view / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    held = {image_stem(p.name) for p in final.iterdir() if p.is_file()}
    copied = 0
    for case in cases:
        if case.label and case.case_id not in held:
            shutil.copy2(case.label, final / f"{case.case_id}{_image_suffix(case.label)}")
            copied += 1
    return copied


def _sync_view(
    source: Path, view: Path, layout: str, import_labels: bool, new_only: bool = False
) -> tuple[dict[str, str], int]:
    """Link each case of the dataset ``source`` into ``view`` and copy ground truths; return (links, copies).

    ``new_only``: copy the ground truth of cases that were not linked yet only (a refresh while the server
    runs must not bring back a label a user removed in MONAI Label).
    """
    cases = discover_cases(source, layout)
    linked = {image_stem(p.name) for p in view.iterdir() if p.is_symlink()}
    wanted: dict[str, str] = {}
    for case in cases:
        shown = _shown_file(case)
        if shown is None:
            if case.case_id not in _LEFT_OUT:
                logger.warning("studies: %s has no single-file image MONAI Label can list; left out", case.case_id)
                _LEFT_OUT.add(case.case_id)
            continue
        wanted[case.case_id + _image_suffix(shown)] = str(Path(shown).resolve())
    _sync_links(view, wanted)
    if not import_labels:
        return wanted, 0
    return wanted, _import_labels(view, [c for c in cases if not new_only or c.case_id not in linked])


#: Cases already reported as left out of the view (said once per process, not at every refresh).
_LEFT_OUT: set[str] = set()


def follow_dataset(view: str | Path) -> bool:
    """Make a studies view follow its dataset folder now: new cases linked, removed ones unlinked; True if it changed.

    MONAI Label's datastore lists the view's files; a case added to (or removed from) the dataset
    while the server runs shows up at the datastore's next refresh (:class:`.monailabel_app.StudiesDatastore`
    calls this first). A folder that is no view (MONAI Label's own folder) is left as it is.
    """
    view = Path(view)
    marker = view / VIEW_MARKER
    if not marker.is_file():
        return False
    made = json.loads(marker.read_text())
    before = {p.name: os.readlink(p) for p in view.iterdir() if p.is_symlink()}
    _sync_view(Path(made["dataset"]), view, made["layout"], bool(made.get("import_labels", True)), new_only=True)
    after = {p.name: os.readlink(p) for p in view.iterdir() if p.is_symlink()}
    for name in sorted(set(after) - set(before)):
        logger.info("studies: new case %s (%s)", image_stem(name), after[name])
    for name in sorted(set(before) - set(after)):
        logger.info("studies: case %s left the dataset", image_stem(name))
    return before != after


def prepare_studies(studies: str | Path, work_dir: str | Path, import_labels: bool = True) -> Studies:
    """The folder MONAI Label serves for ``studies`` (see the module docstring) and its layout.

    A dataset (BraTS 2021 / 2023, a single case, MSD Task01) becomes ``work_dir/studies``: one link per
    case to the file a Slicer user sees (:func:`_shown_file`), updated at every start and, while the
    server runs, at every refresh of its datastore (:func:`follow_dataset`), and with ``import_labels``
    the dataset's segmentations copied to ``labels/final`` where MONAI Label holds no label yet. Any
    other folder (created if missing) is served as it is, as MONAI Label's own studies folder of 4-D
    images in MSD channel order. ``work_dir/studies`` serves one dataset: another one is a
    :class:`UserError` naming both.
    """
    source = Path(studies).resolve()
    if not source.exists():
        source.mkdir(parents=True)
    if (source / VIEW_MARKER).is_file():  # a view made earlier, given itself
        made = json.loads((source / VIEW_MARKER).read_text())
        logger.info("studies: %s is the view of %s, served as it is", source, made["dataset"])
        return Studies(source, made["layout"], Path(made["dataset"]))
    try:
        detect_layout(source)
    except DataError:
        logger.info("studies: %s is served as it is (one 4-D image per case, MSD channel order)", source)
        return Studies(source, "msd", source)
    layout = discover_cases(source)[0].layout
    view = Path(work_dir).resolve() / "studies"
    marker = view / VIEW_MARKER
    if marker.is_file():
        previous = json.loads(marker.read_text())["dataset"]
        if previous != str(source):
            raise UserError(
                f"{view}: holds the studies and labels of {previous}; pass another --work_dir to serve {source}"
            )
    view.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"dataset": str(source), "layout": layout, "import_labels": bool(import_labels)}, marker)
    wanted, copied = _sync_view(source, view, layout, import_labels)
    logger.info(
        "studies: %d case(s) of the %s dataset %s, one link per case in %s; %d ground-truth segmentation(s) "
        "copied to labels/final (labels MONAI Label saves stay there)",
        len(wanted),
        layout,
        source,
        view,
        copied,
    )
    return Studies(view, layout, source)


#: The check results of a studies folder, by case (kept so that a restart checks only changed files).
CHECKS_FILE = ".bundle_checks.json"


def _study_images(folder: Path) -> dict[str, Path]:
    """Image id -> file (or link) for every image MONAI Label lists at the top of ``folder``."""
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = _image_suffix(path.name)
        if suffix in STUDY_SUFFIXES and (path.is_file() or path.is_symlink()):
            images[path.name[: -len(suffix)]] = path
    return images


def _final_label(folder: Path, image_id: str) -> str | None:
    final = folder / "labels" / "final"
    found = [p for p in final.glob(f"{image_id}.*") if image_stem(p.name) == image_id] if final.is_dir() else []
    return str(found[0]) if found else None


def _signature(case: Case) -> list[list[Any]]:
    """(file, size, modification time) of every file a case check reads: what a cached result holds for."""
    files = [case.image] if isinstance(case.image, str) else list(case.image)
    files += [case.label] if case.label else []
    out: list[list[Any]] = []
    for name in files:
        try:
            info = os.stat(name)
            out.append([str(name), info.st_size, info.st_mtime_ns])
        except OSError:
            out.append([str(name), None, None])
    return out


def check_studies(folder: str | Path, image_ids: Sequence[str] | None = None) -> dict[str, str]:
    """Check the cases of a studies folder (:func:`bundle.data.check_case`, every voxel); return id -> problem.

    Each broken case is logged as a warning with the one sentence naming its file, so that a server
    says at start-up which cases cannot be segmented or trained on, not at a user's first click. The
    cases stay listed: a user may repair a file while the server runs. Results are kept in
    ``folder/.bundle_checks.json`` by the files' sizes and times, so a restart checks only the cases
    whose files changed (decoding costs about 0.2 s per real BraTS case: docs/reliability.md).
    ``image_ids``: only these (a refresh's new cases); default every image of the folder.
    """
    folder = Path(folder)
    cache_file = folder / CHECKS_FILE
    try:
        cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    images = _study_images(folder)
    wanted = [i for i in (images if image_ids is None else image_ids) if i in images]
    cases: dict[str, Case] = {}
    for image_id in wanted:
        case = case_of_image(images[image_id])
        case.label = _final_label(folder, image_id)
        cases[image_id] = case
    todo = [i for i in wanted if cache.get(i, {}).get("files") != _signature(cases[i])]

    def problem(image_id: str) -> str | None:
        try:
            check_case(cases[image_id])
        except UserError as err:
            return str(err)
        return None

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for image_id, found in zip(todo, pool.map(problem, todo)):
            cache[image_id] = {"files": _signature(cases[image_id]), "problem": found}
    if todo:
        write_json_atomic({k: v for k, v in cache.items() if k in images}, cache_file)
    problems = {i: cache[i]["problem"] for i in wanted if cache[i]["problem"]}
    for image_id, sentence in problems.items():
        logger.warning("studies: case %s cannot be segmented or trained on as it is: %s", image_id, sentence)
    if image_ids is None or todo:
        logger.info(
            "studies: %d case(s) checked (%d read now in %.1f s, the others unchanged since the last check), %d broken",
            len(wanted),
            len(todo),
            time.monotonic() - started,
            len(problems),
        )
    return problems


# ------------------------------------------------------------------------------------------ weights


def choose_checkpoint(models_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Put the weights to serve in ``models_dir/model.pt``; say which and why; never delete trained weights.

    * ``checkpoint`` is ``models_dir/model.pt`` itself: served as it is.
    * ``models_dir/model.pt`` exists and ``checkpoint`` is not given, or is the file it was copied from
      (path and content as recorded in ``served.json``): the weights there are served, trained in MONAI
      Label since or not.
    * another ``checkpoint``: the weights there are kept in ``models_dir/previous/`` and ``checkpoint``
      is copied in.
    * nothing there yet: ``checkpoint`` (default: the repository's ``models/model.pt``) is copied in.
    """
    models = Path(models_dir).resolve()
    served = models / "model.pt"
    provenance = models / "served.json"
    models.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and served.is_file() and Path(checkpoint).resolve() == served:
        logger.info("serving %s (given as --checkpoint)", served)
        return served
    origin = json.loads(provenance.read_text()) if provenance.is_file() else {}
    if served.is_file():
        trained = origin.get("md5") != md5sum(served)
        state = "trained in MONAI Label since it was copied" if trained else "as copied"
        if checkpoint is None:
            logger.info("serving %s (%s from %s)", served, state, origin.get("source", "an earlier start"))
            return served
        source = Path(checkpoint).resolve()
        if origin.get("source") == str(source) and source.is_file() and origin.get("source_md5") == md5sum(source):
            logger.info(
                "serving %s (%s from --checkpoint %s; to start again from that file, move %s away)",
                served,
                state,
                source,
                served,
            )
            return served
        keep = (
            models / "previous" / f"model-{time.strftime('%Y%m%d-%H%M%S', time.localtime(served.stat().st_mtime))}.pt"
        )
        keep.parent.mkdir(exist_ok=True)
        served.replace(keep)
        logger.info("the weights served until now are kept as %s", keep)
    source = Path(checkpoint).resolve() if checkpoint is not None else BUNDLE_ROOT / "models" / "model.pt"
    if not source.is_file():
        raise UserError(f"{source}: checkpoint does not exist (train one first, or pass --checkpoint)")
    read_plan(source)  # one sentence now if it is not a checkpoint of this bundle
    shutil.copy2(source, served)
    md5 = md5sum(served)
    write_json_atomic({"source": str(source), "source_md5": md5, "md5": md5}, provenance)
    logger.info("serving %s (copied from %s)", served, source)
    return served


# ------------------------------------------------------------------------------------------ the app


def default_tta(tta: Any = None) -> bool:
    """Test-time augmentation of the served inference: as given, else on with CUDA and off without (logged).

    On a CPU the 8 flips take 8 times one pass (docs/benchmarks/monai_label.md has the measured seconds per case).
    """
    import torch

    if tta is not None:
        chosen = as_bool(tta, "tta")
        logger.info("inference: test-time augmentation %s (--tta)", "on, 8 flips" if chosen else "off, one pass")
        return chosen
    if torch.cuda.is_available():
        logger.info("inference: CUDA, test-time augmentation on (8 flips; --tta false for one pass)")
        return True
    logger.info(
        "inference: no CUDA, one pass per case (test-time augmentation off; --tta true for all requests, or "
        '{"tta": true} in a request\'s params)'
    )
    return False


def expand_config(bundle_dir: Path, configs: str | Sequence[str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``bundle_dir/configs/<config>`` (merged in order), expand their macros and apply ``overrides``.

    Macros are expanded with ``bundle_dir`` as working directory, which is how ``monai.bundle run``
    resolves them when started from the bundle root.
    """
    names = [configs] if isinstance(configs, str) else list(configs)
    parser = ConfigParser()
    with working_directory(bundle_dir):
        parser.read_config([str(bundle_dir / "configs" / Path(name).name) for name in names])
        parser.resolve_macro_and_relative_ids()
    for key, value in overrides.items():
        parser[key] = value
    return parser.get()


def app_inference_config(bundle_dir: Path, overrides: Mapping[str, Any], layout: str = "msd") -> dict[str, Any]:
    """inference.yaml as the app serves it: the dataset's layout, one file per case, the label map in ``pred``.

    Everything about the model comes from the served checkpoint's plan, as in every other inference.
    """
    # the served network is the one its plan records: training's network_factory does not apply
    overrides = {k: v for k, v in overrides.items() if not k.startswith("network_factory")}
    # the studies' label values; a binary model (M2) writes its whole-tumour mask as 0/1 whatever the layout
    scheme = f"$'internal' if @output_type == 'binary' else '{layout}'"
    layout_keys = {"label_layout": layout, "output_label_scheme": scheme, "case_image_key": "image"}
    config = expand_config(bundle_dir, "inference.yaml", {**overrides, **layout_keys})
    # MONAI Label takes the label map from "pred"; inference.yaml leaves it in "pred_label".
    config["postprocessing"]["transforms"].append({"_target_": "CopyItemsd", "keys": "pred_label", "names": PRED_KEY})
    return config


def app_train_config(
    bundle_dir: Path, plan: Mapping[str, Any], overrides: Mapping[str, Any], layout: str = "msd"
) -> dict[str, Any]:
    """The training MONAI Label runs: the served model's plan continued, only what the user gives changed.

    The workflow is train.yaml's (with train_2d.yaml for a 2-D model); every value of the model, its
    preprocessing, window, recipe and training recipe comes from the plan
    (:func:`bundle.plan.fine_tune_overrides`), so the new checkpoint records the same plan. ``overrides``
    are the user's keys (logged where they change the plan). No preprocessing cache: MONAI Label's items
    are the same file names after a label was corrected. Macros are expanded, so ``train#handlers`` is
    a list of handler configs, which MONAI Label's training task extends with its ``CheckpointLoader``.
    """
    planned = fine_tune_overrides(plan)
    for key, value in overrides.items():
        if key in planned and planned[key] != value:
            logger.info("training: %s %s instead of the served model's %s (given)", key, value, planned[key])
    data = {"label_layout": layout, "cache": "none", "case_image_key": "@image_key"}
    return expand_config(bundle_dir, training_config_files(plan), {**planned, **data, **overrides})


def _rescue_weights(bundle_in_app: Path, models: Path) -> None:
    """Move weights an earlier version kept inside the app folder (rebuilt at every start) to ``models``.

    ``model.pt`` becomes the served file unless there is one already; anything else, or a second
    ``model.pt``, goes to ``models/previous``. Nothing is overwritten.
    """
    old = bundle_in_app / "models"
    if not old.is_dir() or old.is_symlink():
        return
    for path in sorted(old.glob("*.pt")):
        target = models / path.name
        if path.name != "model.pt" or target.exists():
            target = models / "previous" / f"{path.stem}-from-app{path.suffix}"
            while target.exists():
                target = target.with_name(target.stem + "_" + target.suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        logger.info("moved %s out of the app folder (rebuilt at every start) to %s", path, target)


def _check_overrides(bundle_dir: Path, overrides: Mapping[str, Any]) -> None:
    """One sentence for an override that is no key of inference.yaml or train.yaml (it would be ignored)."""
    configs = ("inference.yaml", ["train.yaml", "train_2d.yaml"])
    known = [ConfigParser(expand_config(bundle_dir, names, {})) for names in configs]
    for key in overrides:
        if not any(key in parser for parser in known):
            raise OptionError(
                f"--{key}: not a key of configs/inference.yaml or configs/train.yaml (it would be ignored)"
            )


def assemble_app(
    work_dir: str | Path,
    layout: str = "msd",
    tta: bool = False,
    name: str = MODEL_NAME,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """(Re)build ``work_dir/app`` serving this bundle on the weights in ``work_dir/models``; return the bundle's folder.

    The app folder holds no work: ``app/model/<name>/models`` and ``runs`` are links to ``work_dir/models``
    and ``work_dir/runs``. ``layout``: the studies' channel order and label values; ``tta``: the served
    default; ``overrides`` (config key -> value) go into both JSON configs.
    """
    _check_overrides(BUNDLE_ROOT, overrides or {})
    work = Path(work_dir).resolve()
    app, models = work / "app", work / "models"
    target = app / "model" / name
    _rescue_weights(target, models)
    if app.exists():
        shutil.rmtree(app)  # links inside are removed, not followed
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(BUNDLE_ROOT / "configs", target / "configs", ignore=ignore)
    shutil.copytree(BUNDLE_ROOT / "bundle", target / "bundle", ignore=ignore)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (target / "models").symlink_to(models, target_is_directory=True)
    (target / "runs").symlink_to(work / "runs", target_is_directory=True)
    (app / "main.py").write_text(APP_MAIN.format(name=name))

    common = {**(overrides or {})}
    # inference.json builds the network the checkpoint's plan records; training continues that plan
    plan = read_plan(models / "model.pt")
    train = app_train_config(target, plan, common, layout)
    infer = app_inference_config(target, {**common, "tta": tta}, layout)
    ConfigParser.export_config_file(train, str(target / "configs" / "train.json"), indent=2)
    ConfigParser.export_config_file(infer, str(target / "configs" / "inference.json"), indent=2)

    metadata_file = target / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    # the recorded model's channels (M4's best: 5 inputs) and size multiple
    metadata["network_data_format"] = network_data_format(plan, metadata["network_data_format"])
    outputs = metadata["network_data_format"]["outputs"]
    pred = dict(outputs.pop(PRED_KEY, {}))
    pred["channel_def"] = label_channel_def(layout)  # MONAI Label's label names: value -> name, as the app writes
    metadata["network_data_format"]["outputs"] = {PRED_KEY: pred, **outputs}
    metadata_file.write_text(json.dumps(metadata, indent=4))
    logger.info("MONAI Label app assembled in %s (bundle %s, network %s)", app, target, plan["network"]["_target_"])
    return target


# ------------------------------------------------------------------------------------------ training

#: How long a click on Train should take by default: MONAI Label's own default, 50 epochs, is hours on a CPU.
TRAIN_MINUTES = 15.0
#: A cropped BraTS brain in voxels (the brain boxes of the real samples are about 135 x 175 x 140): what
#: one validation case costs in windows when the default epochs are sized.
TYPICAL_BRAIN = (140, 176, 140)
#: Where the app's training finds its default epochs (written at start-up, :func:`size_training`).
BUDGET_FILE = "monailabel_training.json"
#: MONAI Label's ``train_stats`` of the served model, written by :class:`TrainStats` beside the weights.
STATS_FILE = "train_stats.json"
#: Request keys MONAI Label and its client add to a training request (not the user's options).
TRAIN_REQUEST_KEYS = ("model", "bundle_path", "local_rank", "force_multi_gpu", "tracking_run_name", "client_id")


def _network_input(plan: Mapping[str, Any], size: Sequence[int], batch: int, device: Any) -> Any:
    import torch

    return torch.randn(batch, len(plan["input_channels"]), *[int(s) for s in size], device=device)


def _tensors(output: Any) -> list[Any]:
    """Every tensor of a network's output (deep-supervision heads come as a list or a stacked tensor)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    return [t for item in output for t in _tensors(item)]


def measure_training(plan: Mapping[str, Any], device: Any = "cpu") -> dict[str, float]:
    """Seconds of one training step and of one validation window of the planned model, measured now on ``device``.

    A step is what the trainer runs per iteration: forward, backward and an optimiser step on
    ``batch_size x num_samples`` random patches of the plan's ``patch_size``; a window is one forward pass
    over the plan's validation ``window``. Each is run twice and the second run is kept (the first
    allocates). Random weights and inputs cost what trained ones cost.
    """
    import torch

    from bundle.plan import network_from_spec

    training = dict(plan.get("training") or {})
    batch = int(training.get("batch_size") or 2) * int(training.get("num_samples") or 1)
    network = network_from_spec(plan["network"]).to(device)
    optimiser = torch.optim.SGD(network.parameters(), lr=0.0)
    seconds: dict[str, float] = {}
    network.train()
    patch = _network_input(plan, plan["patch_size"], batch, device)
    for _ in range(2):
        started = time.perf_counter()
        optimiser.zero_grad()
        sum(t.float().mean() for t in _tensors(network(patch))).backward()
        optimiser.step()
        seconds["step"] = time.perf_counter() - started
    network.eval()
    window = _network_input(plan, plan.get("window") or plan["patch_size"], 1, device)
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            network(window)
            seconds["window"] = time.perf_counter() - started
    return seconds


def _windows_per_case(window: Sequence[int], overlap: float = 0.25) -> int:
    """Sliding windows (MONAI's default overlap) over :data:`TYPICAL_BRAIN`; slices x tiles for a 2-D window."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = TYPICAL_BRAIN[: len(window)]
    roi = [min(w, s) for w, s in zip(window, size)]
    tiles = len(dense_patch_slices(size, roi, _get_scan_interval(size, roi, len(roi), [overlap] * len(roi))))
    return tiles * (TYPICAL_BRAIN[-1] if len(window) == 2 else 1)


def _epoch_cap(training: Mapping[str, Any]) -> tuple[int, str]:
    """The most epochs a fine-tuning should run, and why: its learning-rate schedule's length, else MONAI Label's 50.

    A schedule that decays to zero over ``total_iters`` epochs (configs/cpu.yaml's ``PolynomialLR``, stepped
    at each epoch's end) trains no further after that many epochs.
    """
    schedule = training.get("lr_scheduler_factory")
    total = schedule.get("total_iters") if isinstance(schedule, Mapping) else None
    if isinstance(total, int) and total > 0:
        return total, "the length of the model's learning-rate schedule"
    return 50, "MONAI Label's default"


def default_epochs(
    plan: Mapping[str, Any],
    labelled: int,
    seconds: Mapping[str, float],
    minutes: float = TRAIN_MINUTES,
    val_split: float = 0.2,
) -> tuple[int, str]:
    """The epochs a click on Train runs by default so that it ends in about ``minutes``, and the sentence saying why.

    An epoch is the plan's ``steps_per_epoch`` steps (else one pass over the training cases, ``batch_size``
    cases a step), plus, every ``val_interval`` epochs, one validation of the validation cases at
    :func:`_windows_per_case` windows each; ``seconds`` are :func:`measure_training`'s. ``labelled``: the
    cases holding a final label now, split as MONAI Label splits them (``val_split``). At least 1 epoch,
    at most :func:`_epoch_cap`.
    """
    from monai.data import partition_dataset

    training = dict(plan.get("training") or {})
    cases = max(2, labelled)  # the epochs of the first training, which needs 2 labelled cases
    train_cases, val_cases = (len(p) for p in partition_dataset(list(range(cases)), ratios=[1 - val_split, val_split]))
    batch = int(training.get("batch_size") or 2)
    steps = int(training.get("steps_per_epoch") or -(-max(1, train_cases) // batch))
    interval = int(training.get("val_interval") or 1)
    windows = _windows_per_case(plan.get("window") or plan["patch_size"])
    epoch = steps * seconds["step"] + max(1, val_cases) * windows * seconds["window"] / interval
    cap, capped_by = _epoch_cap(training)
    epochs = int(max(1, min(cap, (minutes * 60) // epoch)))
    reason = (
        f"training: {epochs} epoch(s) by default, about {epochs * epoch / 60:.0f} min: one step of "
        f"{batch} x {'x'.join(map(str, plan['patch_size']))} patches took {seconds['step']:.2f} s and one "
        f"validation window {seconds['window']:.2f} s here (measured at start-up), {steps} step(s) an epoch, "
        f"{max(1, val_cases)} validation case(s) of {labelled} labelled at {windows} window(s) each every "
        f"{interval} epoch(s); sized for about {minutes:.0f} min"
        + (f", at most {cap} ({capped_by})" if epochs == cap else "")
        + " (Slicer's max_epochs overrides it)"
    )
    return epochs, reason


def size_training(work: Path, bundle_dir: Path, plan: Mapping[str, Any], labelled: int) -> int:
    """Measure (or reuse the measurement of the same model on this machine), size the default epochs, log why.

    The measurement is kept in ``work/models/training_budget.json`` by the network, patch, batch, window,
    device and thread count, so a restart does not repeat it; the epochs go to the app's
    ``configs/monailabel_training.json``, which :class:`.monailabel_app.BratsTrainTask` offers as
    MONAI Label's ``max_epochs``.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    training = dict(plan.get("training") or {})
    key = json.dumps(
        [
            plan["network"],
            plan["patch_size"],
            plan.get("window"),
            training.get("batch_size"),
            training.get("num_samples"),
            device,
            torch.get_num_threads(),
        ],
        sort_keys=True,
        default=str,
    )
    cache_file = work / "models" / "training_budget.json"
    try:
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cached = {}
    if cached.get("key") == key:
        seconds = cached["seconds"]
    else:
        logger.info("training: measuring one training step and one validation window of the served model ...")
        seconds = measure_training(plan, device)
        write_json_atomic({"key": key, "seconds": seconds}, cache_file)
    epochs, reason = default_epochs(plan, labelled, seconds)
    logger.info("%s", reason)
    write_json_atomic({"max_epochs": epochs, "reason": reason}, bundle_dir / "configs" / BUDGET_FILE)
    return epochs


def check_train_request(params: Mapping[str, Any], known: Sequence[str], labelled: int) -> None:
    """Refuse a training request before any work: an unknown or bad option, too few labelled cases.

    ``params``: the request's options (Slicer sends the trainer's options, ``max_epochs``, ``val_split``,
    ``device`` ...); ``known``: the option names the trainer offers; ``labelled``: cases with a final label.
    MONAI Label splits the labelled cases by ``val_split`` (MONAI's ``partition_dataset``); both parts must
    hold a case. Raises :class:`OptionError` with one sentence.
    """
    from monai.data import partition_dataset

    from bundle.options import check_options, closest

    for key in params:
        if key not in known and key not in TRAIN_REQUEST_KEYS:
            near = closest(key, list(known))
            raise OptionError(
                f"train: unknown option {key!r} (it would be ignored)" + (f"; did you mean {near!r}?" if near else "")
            )
    read = check_options(
        "label_train", **{k: params[k] for k in ("max_epochs", "val_split") if params.get(k) is not None}
    )
    device = params.get("device")
    if isinstance(device, str):
        check_options(device=device)
    for flag in ("pretrained", "multi_gpu"):
        if flag in params:
            as_bool(params[flag], flag)
    if labelled == 0:
        raise OptionError(
            "train: no case holds a final label yet; save the labels of at least 2 cases (Submit Label in "
            "3D Slicer), then train"
        )
    val_split = read.get("val_split", 0.2)
    train_part, val_part = (len(p) for p in partition_dataset(list(range(labelled)), ratios=[1 - val_split, val_split]))
    if not train_part or not val_part:
        missing = "to train on" if not train_part else "to validate on"
        raise OptionError(
            f"train: {labelled} labelled case(s) split by val_split {val_split} leave no case {missing}; "
            "save the labels of more cases or change val_split"
        )


def check_labelled_cases(items: Sequence[Mapping[str, str]]) -> None:
    """Check every case MONAI Label trains on (its four modalities and its final label), before any work.

    MONAI Label runs the training config without its ``initialize`` section, where the bundle checks the
    cases of a training; a broken case (a file deleted or truncated since start-up, a label with values
    the layout does not have) is therefore named here, in one sentence, before the first epoch.
    """
    from bundle.data import check_cases

    cases = []
    for item in items:
        case = case_of_image(item["image"])
        case.label = item.get("label")
        cases.append(case)
    check_cases(cases, progress=False)


class TrainStats:
    """Write MONAI Label's ``train_stats`` (epochs, best metric, time) as JSON after every training epoch.

    MONAI Label's ``BundleTrainTask`` reports ``{}``: the handler that fills them (``PublishStatsAndModel``)
    belongs to its ``BasicTrainTask``. The keys are that handler's (``epoch``, ``total_epochs``,
    ``best_metric``, ``total_time`` / ``current_time``, ``eval``), which 3D Slicer shows. Attach it after
    the validation handler, so that an epoch's validation is counted.
    """

    def __init__(self, filename: str, evaluator: Any = None) -> None:
        self.filename = filename
        self.evaluator = evaluator
        self.started = time.time()

    def attach(self, engine: Any) -> None:
        """Write at the start, after every epoch and at the end of ``engine``'s run."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _start(self, engine: Any) -> None:
        self.started = time.time()
        self.write(engine)

    def write(self, engine: Any) -> None:
        """The stats of ``engine`` (the trainer) and of the evaluator now."""
        import datetime

        elapsed = time.time() - self.started
        done = engine.state.epoch >= engine.state.max_epochs
        stats: dict[str, Any] = {
            "epoch": engine.state.epoch,
            "total_epochs": engine.state.max_epochs,
            "start_ts": int(self.started),
            "seconds": round(elapsed, 1),
            ("total_time" if done else "current_time"): str(datetime.timedelta(seconds=int(elapsed))),
        }
        state = getattr(self.evaluator, "state", None)
        if state is not None and getattr(state, "best_metric_epoch", -1) >= 0:
            metrics = {k: float(v) for k, v in state.metrics.items() if isinstance(v, (int, float))}
            stats["best_metric"] = float(state.best_metric)
            stats["eval"] = {
                "key_metric_name": state.key_metric_name,
                "best_metric": float(state.best_metric),
                "best_metric_epoch": int(state.best_metric_epoch),
                "metrics": metrics,
            }
        write_json_atomic(stats, self.filename)


# ------------------------------------------------------------------------------------------ the server


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
        "--host",
        host,
        "--port",
        str(port),
        # MONAI Label's FastAPI app behind the bundle's request checks (monailabel_server)
        "--uvicorn_app",
        UVICORN_APP,
    ]


#: The ASGI app the server runs: MONAI Label's, with the bundle's checks of image ids and training requests.
UVICORN_APP = "bundle.integrations.monailabel_server:app"


def server_env(app_dir: str | Path | None = None, name: str = MODEL_NAME) -> dict[str, str]:
    """Environment for the server: the offline bundle source (nothing is downloaded), the app's bundle importable.

    The server imports :data:`UVICORN_APP` before the app's ``main.py``, so the app's copy of the
    bundle goes first on ``PYTHONPATH``, as ``main.py`` puts it first on ``sys.path``.
    """
    env = {**os.environ, "BUNDLE_DOWNLOAD_SRC": "ngc"}
    if app_dir is not None:
        copy = str(Path(app_dir).resolve() / "model" / name)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (copy, os.environ.get("PYTHONPATH", "")) if p)
    return env


def start_server(
    app_dir: str | Path,
    studies: str | Path,
    name: str = MODEL_NAME,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_file: str | Path | None = None,
) -> subprocess.Popen:
    """Start the MONAI Label server in its own process group (stop it with ``os.killpg(p.pid, ...)``)."""
    output = open(log_file, "a") if log_file else None  # noqa: SIM115 - handed to the child process
    return subprocess.Popen(
        server_command(app_dir, studies, name, host, port),
        env=server_env(app_dir, name),
        stdout=output or None,
        stderr=subprocess.STDOUT if output else None,
        start_new_session=True,
    )


def prepare_server(
    studies: str | Path,
    checkpoint: str | Path | None = None,
    work_dir: str | Path = "runs/label",
    name: str = MODEL_NAME,
    tta: Any = None,
    import_labels: Any = True,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Everything before the server starts: studies, served weights, the app; return (app folder, studies folder)."""
    _check_overrides(BUNDLE_ROOT, overrides or {})  # before anything is read or written
    work = Path(work_dir).resolve()
    served = prepare_studies(studies, work, as_bool(import_labels, "import_labels"))
    _rescue_weights(work / "app" / "model" / name, work / "models")  # before the choice, which may copy in
    choose_checkpoint(work / "models", checkpoint)
    check_studies(served.folder)  # broken cases named now, not at a user's first click
    bundle_dir = assemble_app(work, served.layout, default_tta(tta), name, overrides)
    final = served.folder / "labels" / "final"
    labelled = len([p for p in final.iterdir() if p.is_file()]) if final.is_dir() else 0
    size_training(work, bundle_dir, read_plan(work / "models" / "model.pt"), labelled)
    return work / "app", served.folder


def label_serve(
    studies: str,
    checkpoint: str | None = None,
    work_dir: str = "runs/label",
    name: str = MODEL_NAME,
    host: str = "127.0.0.1",
    port: int = 8000,
    tta: Any = None,
    import_labels: Any = True,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Prepare (:func:`prepare_server`) and run MONAI Label on ``studies`` until it is stopped; return its exit code.

    ``studies``: a BraTS 2021 / 2023 or MSD Task01 dataset folder, a case folder, or MONAI Label's own
    folder of 4-D images (MSD channel order). ``checkpoint``: see :func:`choose_checkpoint`. ``tta``:
    the served default (:func:`default_tta`). ``import_labels``: copy the dataset's segmentations to
    the final labels. ``overrides``: any other inference / training config key.
    """
    app, folder = prepare_server(studies, checkpoint, work_dir, name, tta, import_labels, overrides)
    command = server_command(app, folder, name, host, port)
    logger.info("starting: %s", " ".join(command))
    return subprocess.call(command, env=server_env(app, name))
