"""Datalists: the checked cases of a dataset as MONAI datalist JSON, with deterministic k-fold splits.

Every datalist item is ``{"case_id", "layout", "image", "label"?, "fold"?}`` where ``image`` is
either the four files in the canonical order (T1, T1ce, T2, FLAIR) or one 4-D file; the
``layout`` key tells :class:`bundle.transforms.ToInternalConventiond` how to reorder channels
and map label values. MONAI's ``load_decathlon_datalist`` reads the JSON back. :func:`select_cases`
is the one way every workflow picks its cases (a dataset folder, a datalist and fold, or files).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bundle.atomic import write_json_atomic
from bundle.constants import (
    BRATS2021_SUFFIXES,
    BRATS2023_SUFFIXES,
    MODALITIES,
)
from bundle.data.checks import check_cases
from bundle.data.demo import generate_demo_dataset
from bundle.data.layouts import Case, discover_cases, image_stem
from bundle.errors import DataError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------- datalists


def assign_folds(num_cases: int, folds: int, seed: int) -> list[int]:
    """Deterministic fold index per case: a seeded permutation dealt round-robin into ``folds``."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    order = np.random.default_rng(seed).permutation(num_cases)
    fold_of = [0] * num_cases
    for rank, index in enumerate(order):
        fold_of[int(index)] = rank % folds
    return fold_of


def _unique_names(cases: Sequence[Case]) -> list[Case]:
    """``cases``, or a :class:`DataError` at the first case name used twice (outputs would overwrite each other)."""
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(f"{case.image}: case name {case.case_id} is used twice (also {seen[case.case_id].image})")
        seen[case.case_id] = case
    return list(cases)


def _fraction(value: float, name: str) -> float:
    """``value`` as a fraction in [0, 1], or one sentence naming the option."""
    fraction = float(value)
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"{name}: {value!r} is not a fraction between 0 and 1")
    return fraction


def labelled_subset(cases: Sequence[Case], fraction: float = 1.0, seed: int = 42) -> list[Case]:
    """A seeded random ``fraction`` of the labelled cases (in discovery order), and every unlabelled one.

    M3 trains on 10 % of BraTS 2021 drawn with seed 42 (docs/methods.md). Taken before the checks,
    so only the chosen cases are read.
    """
    fraction = _fraction(fraction, "subset_fraction")
    labelled = [i for i, c in enumerate(cases) if c.label is not None]
    if fraction >= 1.0:
        return list(cases)
    keep = {
        labelled[i] for i in np.random.default_rng(seed).permutation(len(labelled))[: round(len(labelled) * fraction)]
    }
    if not keep:
        raise DataError(f"subset_fraction {fraction} of {len(labelled)} labelled cases keeps none")
    logger.info("subset: %d of %d labelled cases (fraction %s, seed %d)", len(keep), len(labelled), fraction, seed)
    return [c for i, c in enumerate(cases) if c.label is None or i in keep]


def _checked_items(
    cases: Sequence[Case],
    source: str | Path,
    folds: int,
    seed: int,
    check_labels: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
    holdout_fraction: float = 0.0,
    empty_folds: bool = True,
    decode: bool = True,
) -> list[dict[str, Any]]:
    """Datalist items of ``cases`` (in order) once every one passed :func:`check_cases`.

    Labelled cases get a fold, except a seeded ``holdout_fraction`` of them, marked ``"holdout": True``:
    a test set no fold trains or validates on (M4 holds out 20 %). Without a hold-out the folds are
    exactly those of earlier versions. More folds than cases to deal leaves folds empty: an error
    unless ``empty_folds`` (a training run's own datalist, whose run checks its one fold).
    """
    good = check_cases(_unique_names(cases), check_labels, skip_bad, progress, decode=decode)
    if not good:
        raise DataError(f"{source}: no usable cases")
    labelled = [i for i, c in enumerate(good) if c.label is not None]
    count = round(len(labelled) * _fraction(holdout_fraction, "holdout_fraction"))
    # its own random stream, so the hold-out does not depend on the fold seed's other uses
    held = {labelled[i] for i in np.random.default_rng([seed, 1]).permutation(len(labelled))[:count]}
    if labelled and len(held) == len(labelled):
        raise DataError(f"{source}: holdout_fraction {holdout_fraction} leaves no case to train on")
    dealt = len(labelled) - len(held)
    if labelled and not empty_folds and folds > dealt:
        after = f" ({len(held)} held out)" if held else ""
        raise DataError(
            f"{source}: {folds} folds of {dealt} labelled case(s){after} would leave {folds - dealt} fold(s) empty; "
            f"use --folds {dealt} or fewer"
        )
    fold_of = iter(assign_folds(dealt, folds, seed))
    items = []
    for i, case in enumerate(good):
        if case.label is None:
            items.append(case.to_item())
        else:
            items.append(
                {**case.to_item(), "holdout": True} if i in held else {**case.to_item(), "fold": next(fold_of)}
            )
    return items


def _datalist(items: Sequence[dict[str, Any]], name: str, folds: int, seed: int, **settings: Any) -> dict[str, Any]:
    """The datalist dictionary (the JSON ``prepare`` writes) of checked items.

    ``training``: labelled cases with their fold; ``holdout``: labelled cases kept out of every fold
    (the test set); ``testing``: cases without a segmentation. ``settings`` are recorded as given.
    """
    data = {
        "name": name,
        "layout": items[0]["layout"],
        "modalities": list(MODALITIES),
        "num_folds": folds,
        "seed": seed,
        **settings,
        "training": [i for i in items if "label" in i and not i.get("holdout")],
        "testing": [i for i in items if "label" not in i],
    }
    held = [{k: v for k, v in i.items() if k != "holdout"} for i in items if i.get("holdout")]
    if held:
        data["holdout"] = held
    return data


def make_datalist(
    dataset_dir: str | Path,
    folds: int = 5,
    seed: int = 42,
    skip_bad: bool = False,
    layout: str | None = None,
    check_labels: bool = True,
    progress: bool = True,
    holdout_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    subset_seed: int = 42,
    empty_folds: bool = True,
) -> dict[str, Any]:
    """Discover, check and split a dataset into a MONAI datalist dictionary.

    Labelled cases go to ``training`` (each with a ``fold``), except a seeded ``holdout_fraction`` of
    them, which go to ``holdout`` (a test set); unlabelled ones go to ``testing``. ``subset_fraction``
    first keeps a random part of the labelled cases (seed ``subset_seed``). A bad case raises
    :class:`DataError`; with ``skip_bad`` it is left out with a warning. ``progress`` shows a bar
    while the cases are checked (for 20 cases or more). Without ``empty_folds``, more ``folds`` than
    labelled cases to deal is an error (``python -m bundle prepare``, cross-validation).
    """
    cases = labelled_subset(discover_cases(dataset_dir, layout), subset_fraction, subset_seed)
    items = _checked_items(
        cases, dataset_dir, folds, seed, check_labels, skip_bad, progress, holdout_fraction, empty_folds
    )
    settings: dict[str, Any] = {}
    if holdout_fraction:
        settings["holdout_fraction"] = holdout_fraction
    if subset_fraction < 1.0:
        settings.update(subset_fraction=subset_fraction, subset_seed=subset_seed)
    return _datalist(items, Path(dataset_dir).name, folds, seed, **settings)


def prepare(
    dataset_dir: str,
    output: str = "datalist.json",
    folds: int = 5,
    seed: int = 42,
    skip_bad: bool = False,
    layout: str | None = None,
    holdout_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    subset_seed: int = 42,
    empty_folds: bool = True,
) -> str:
    """Discover and check a dataset and write its datalist JSON; return the path written.

    Without ``empty_folds`` (``python -m bundle prepare``), more ``folds`` than labelled cases is an error."""
    datalist = make_datalist(
        dataset_dir,
        folds=folds,
        seed=seed,
        skip_bad=skip_bad,
        layout=layout,
        holdout_fraction=holdout_fraction,
        subset_fraction=subset_fraction,
        subset_seed=subset_seed,
        empty_folds=empty_folds,
    )
    path = write_json_atomic(datalist, output)
    logger.info(
        "%s: %d training, %d held-out and %d testing cases (%s layout) -> %s",
        dataset_dir,
        len(datalist["training"]),
        len(datalist.get("holdout", [])),
        len(datalist["testing"]),
        datalist["layout"],
        path,
    )
    return str(path)


def load_split(
    datalist: str | Path | dict[str, Any], fold: int = 0, split: str = "train", source: str | None = None
) -> list[dict[str, Any]]:
    """Return the items of one split: ``train`` (not ``fold``), ``val`` (``fold``), ``all`` (both),
    ``holdout`` (labelled cases kept out of every fold) or ``test`` (cases without a segmentation).

    ``source`` names a datalist given as a dictionary in errors (default: the file or the dictionary).
    """
    data = json.loads(Path(datalist).read_text()) if not isinstance(datalist, dict) else datalist
    training = data.get("training", [])
    if split == "test":
        return list(data.get("testing", []))
    if split == "holdout":
        return list(data.get("holdout", []))
    if split == "all":
        return list(training)
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; expected train, val, all, holdout or test")
    name = source or datalist
    num_folds = int(data.get("num_folds", 1 + max((int(i.get("fold", 0)) for i in training), default=0)))
    if not training:
        raise DataError(f"{name}: no labelled case to {'train on' if split == 'train' else 'validate on'}")
    if num_folds < 2:
        if split == "val":  # said once, with the validation cases
            logger.warning(
                "%s: one fold: training and validation use the same %d case(s), so the validation scores "
                "are scores on the training cases",
                name,
                len(training),
            )
        return list(training)
    if not 0 <= fold < num_folds:
        raise DataError(f"{name}: fold {fold} is outside 0..{num_folds - 1}")
    chosen = [i for i in training if (int(i["fold"]) == fold) == (split == "val")]
    if not chosen:
        counts = f"{len(training)} labelled case(s) in {num_folds} folds"
        if split == "val":
            raise DataError(
                f"{name}: fold {fold} holds no case to validate on ({counts}); choose another --fold or fewer folds"
            )
        raise DataError(f"{name}: fold {fold} holds every case, leaving none to train on ({counts}); use more folds")
    return chosen


NO_DATA = (
    "no data given: pass --dataset_dir DIR (a BraTS 2021 / BraTS 2023 / MSD Task01 folder) or --datalist FILE "
    "(python -m bundle prepare), or run the demo: add configs/demo.yaml, e.g. "
    "--config_file \"['configs/train.yaml','configs/demo.yaml']\", or python -m bundle demo"
)


def file_list(files: str | Sequence[str]) -> list[str]:
    """The files of one case as a list: ``files`` itself, or a bracketed list typed as one string.

    ``python -m bundle infer "[t1.nrrd,t1ce.nrrd,t2.nrrd,flair.mha]"`` and ``monai.bundle run ...
    --input_files "[t1.nrrd,...]"`` hand the list over as that string: Fire reads ``[a,b]`` as a list
    only when every item is a Python literal or a bare word, and ``t1.nrrd`` is neither. Items may be
    quoted; a string naming an existing file is that file, brackets or not.
    """
    if not isinstance(files, str):
        return [str(f) for f in files]
    text = files.strip()
    if text.startswith("[") and text.endswith("]") and not Path(text).exists():
        return [item.strip().strip("'\"").strip() for item in text[1:-1].split(",") if item.strip()]
    return [files]


def _case_from_files(files: Sequence[str], layout: str | None) -> Case:
    """A case from explicit files: four 3-D volumes (T1, T1ce, T2, FLAIR, in that order) or one 4-D image."""
    paths = [str(Path(f)) for f in files]
    if len(paths) == 1:
        # the only 4-D layout the bundle knows is MSD's (FLAIR, T1w, T1gd, T2w); say "brats2021" if
        # the file's channels are already in the canonical order
        return Case(image_stem(Path(paths[0]).name), layout or "msd", paths[0])
    if len(paths) != 4:
        raise DataError(
            f"{', '.join(paths)}: expected four files (T1, T1ce, T2, FLAIR) or one 4-D image, got {len(paths)}"
        )
    stems = [image_stem(Path(p).name) for p in paths]
    modality_names = set(BRATS2021_SUFFIXES.values()) | set(BRATS2023_SUFFIXES.values())
    if all(stem in modality_names for stem in stems):  # t1.nrrd ... or DICOM folders t1/ ...: named by their folder
        case_id = Path(paths[0]).resolve().parent.name
    else:
        case_id = os.path.commonprefix(stems).rstrip("_-.") or stems[0]  # noqa: RUF071 - file names, not paths
    return Case(case_id, layout or "brats2021", paths)


def _dataset_or_demo(dataset_dir: str | Path | None, demo_dir: str | Path | None) -> str:
    """``dataset_dir``, or ``demo_dir`` (generated once if missing), or one sentence saying what to pass."""
    if dataset_dir:
        return str(dataset_dir)
    if demo_dir:
        return str(generate_demo_dataset(demo_dir))
    raise DataError(NO_DATA)


def select_cases(
    dataset_dir: str | Path | None = None,
    datalist: str | Path | None = None,
    files: str | Sequence[str] | None = None,
    *,
    fold: int | None = None,
    split: str | None = None,
    labelled: bool | None = None,
    layout: str | None = None,
    demo_dir: str | Path | None = None,
    folds: int = 5,
    seed: int = 42,
    progress: bool = True,
    decode: bool = True,
) -> list[dict[str, Any]]:
    """The cases of one run (training, inference or evaluation) as datalist items, checked before it starts.

    The source is the first one given of ``files`` (the files of one case: four volumes T1, T1ce, T2,
    FLAIR or one 4-D image), ``datalist`` (a JSON from ``python -m bundle prepare`` or a training run)
    and ``dataset_dir`` (a BraTS 2021 / 2023 or MSD folder, or one case folder); with none of them,
    ``demo_dir`` if given (generated first if missing), else a :class:`DataError` saying what to pass
    (configs/demo.yaml gives the demo folder as ``dataset_dir``). Files and folders
    are discovered and every case is checked (:func:`check_cases`; label files too unless ``labelled``
    is ``False``), and a case name used twice is an error; a datalist was checked when it was written
    and is read as it is. Labelled cases of a folder are dealt into ``folds`` folds (``seed``).

    ``split`` picks among the cases: ``None`` every case (with a ``fold``: its validation cases),
    ``"train"`` / ``"val"`` the labelled cases outside / inside ``fold`` (:func:`load_split`), ``"test"``
    the unlabelled ones. ``labelled``:
    ``True`` keeps only cases with a ground truth (none left is an error), ``False`` drops the labels
    (inference never reads them), ``None`` keeps what there is. Every problem is a :class:`DataError`
    with one sentence naming the file. ``decode=False``: headers and label values only (inference, whose
    loader decodes each image once and refuses truncated or non-finite data naming the file).
    """
    if split is None and fold is not None:
        split = "val"
    if files:
        paths = file_list(files)
        source = ", ".join(paths)
        data = _datalist(
            _checked_items(
                [_case_from_files(paths, layout)], source, folds, seed, labelled is not False, decode=decode
            ),
            "files",
            folds,
            seed,
        )
        every = data["training"] + data["testing"]
    elif datalist:
        source = str(datalist)
        if not Path(datalist).is_file():
            raise DataError(f"{datalist}: datalist file does not exist")
        data = json.loads(Path(datalist).read_text())
        every = [*data.get("training", []), *data.get("holdout", []), *data.get("testing", [])]
    else:
        source = _dataset_or_demo(dataset_dir, demo_dir)
        cases = discover_cases(source, layout)
        every = _checked_items(cases, source, folds, seed, labelled is not False, progress=progress, decode=decode)
        data = _datalist(every, Path(source).name, folds, seed)
    if split is None:
        items = [dict(i) for i in every]
    else:
        items = [dict(i) for i in load_split(data, fold if fold is not None else 0, split, source=source)]
    if labelled:
        unlabelled = sum(1 for i in items if not i.get("label"))
        if unlabelled:
            logger.info("%s: %d case(s) without a segmentation left out", source, unlabelled)
        items = [i for i in items if i.get("label")]
        if not items:
            raise DataError(f"{source}: no case with a ground-truth segmentation")
    elif labelled is False:
        for item in items:
            item.pop("label", None)  # never read, so never a reason to stop
            item.pop("fold", None)
    logger.info("%s: %d case(s) selected", source, len(items))
    return items


def resolve_datalist(
    dataset_dir: str | Path | None,
    datalist: str | Path | None,
    output_dir: str | Path,
    folds: int = 5,
    seed: int = 42,
    demo_dir: str | Path | None = None,
    holdout_fraction: float = 0.0,
    subset_fraction: float = 1.0,
    subset_seed: int = 42,
    empty_folds: bool = True,
) -> str:
    """The datalist file of a training run, so every fold, rank and resumed run shares one split.

    The same sources as :func:`select_cases`: ``datalist`` is used as it is; a ``dataset_dir`` (or
    ``demo_dir``) is discovered, checked and dealt into folds in ``output_dir/datalist.json``, after
    the seeded subset and hold-out of :func:`make_datalist`. The run then takes its splits with
    ``select_cases(datalist=...)``, which refuses an empty training or validation split; other folds
    may be empty (``empty_folds``: a run of one fold does not need them; cross-validation does).
    """
    if datalist:
        if not Path(datalist).is_file():
            raise DataError(f"{datalist}: datalist file does not exist")
        return str(datalist)
    source = _dataset_or_demo(dataset_dir, demo_dir)
    return prepare(
        source,
        str(Path(output_dir) / "datalist.json"),
        folds=folds,
        seed=seed,
        holdout_fraction=holdout_fraction,
        subset_fraction=subset_fraction,
        subset_seed=subset_seed,
        empty_folds=empty_folds,
    )


def without_labels(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The datalist items without their ground truth (what inference is given: it never reads labels)."""
    return [{key: value for key, value in item.items() if key != "label"} for item in items]
