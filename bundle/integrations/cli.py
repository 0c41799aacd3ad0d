"""Command line: ``python -m bundle COMMAND --flags`` (built with fire).

Each command is a thin wrapper over a library function, imported lazily so that one
command's optional dependencies never slow down or break another.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bundle.errors import OptionError
from bundle.options import as_bool, check_command_flags, check_config_keys, check_options
from bundle.paths import BUNDLE_ROOT, LOGGING_CONF, resolve_config_files


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
) -> str:
    """Discover and check a BraTS 2021 / BraTS 2023 / MSD Task01 dataset and write its datalist.

    ``holdout_fraction``: labelled cases kept out of every fold as a test set (M4: 0.2);
    ``subset_fraction`` / ``subset_seed``: train on a seeded random part of the labelled cases (M3: 0.1, 42).
    """
    from bundle.data import prepare as _prepare

    skip_bad = as_bool(skip_bad, "skip_bad")
    read = check_options(
        "prepare",
        output=output,
        folds=folds,
        seed=seed,
        layout=layout,
        holdout_fraction=holdout_fraction,
        subset_fraction=subset_fraction,
        subset_seed=subset_seed,
    )
    return _prepare(
        dataset_dir,
        output=output,
        folds=read["folds"],
        seed=read["seed"],
        skip_bad=skip_bad,
        layout=layout,
        holdout_fraction=holdout_fraction,
        subset_fraction=subset_fraction,
        subset_seed=subset_seed,
        empty_folds=False,  # a datalist of folds to train and score on: each must hold a case
    )


def train(config_file: str | list[str] = "configs/train.yaml", **overrides: Any) -> None:
    """Run ``monai.bundle run training`` in-process with optional ``--key value`` overrides."""
    from monai.bundle import run

    check_config_keys(resolve_config_files(config_file), list(overrides))
    run("training", config_file=resolve_config_files(config_file), logging_file=str(LOGGING_CONF), **overrides)


def demo(output_dir: str = "runs/demo", epochs: int | None = None) -> dict[str, Any]:
    """The main job on the embedded demo: train, segment the held-out case, score it, draw it.

    1. ``configs/train.yaml`` with ``configs/demo.yaml`` (the demo phantoms, generated once under
       ``data/demo``, and the demo's schedule and width), best model to ``output_dir/models/model.pt``;
    2. ``configs/inference.yaml`` (the model's plan: its window, 8-flip TTA, regions -> labels, clean-up)
       on the held-out case, written to ``output_dir/inference/<case>_seg.nii.gz``;
    3. its Dice / HD95 against the held-out truth, and ``output_dir/overlay.png`` (truth above,
       prediction below; NCR red, ED green, ET yellow).
    Returns the validation and held-out figures (also written to ``output_dir/demo_result.json``).
    """
    import json

    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigWorkflow

    from bundle.data import select_cases
    from bundle.errors import DataError
    from bundle.evaluation.files import load_label_map
    from bundle.evaluation.metrics import evaluate_case
    from bundle.evaluation.plots import plot_overlay
    from bundle.inference.run import infer

    read = check_options("demo", output_dir=output_dir, epochs=epochs)  # before the phantoms are made or read
    log = logging.getLogger(__name__)
    start = time.perf_counter()
    out = Path(output_dir).resolve()
    overrides: dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "output_dir": str(out / "train"),
        "ckpt_dir": str(out / "models"),
    }
    if read["epochs"] is not None:
        overrides["epochs"] = read["epochs"]
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / name) for name in ("train.yaml", "demo.yaml")],
        logging_file=str(LOGGING_CONF),
        workflow_type="train",
        run_id="training",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    demo_dir = Path(workflow.parser.get_parsed_content("demo_dir"))
    held_out = select_cases(datalist=workflow.parser.get_parsed_content("datalist_file"), split="test")
    train_seconds = time.perf_counter() - start
    workflow.finalize()
    if not held_out:
        raise DataError(f"{demo_dir}: the demo has no held-out case")
    case = held_out[0]["case_id"]

    log.info("segmenting the held-out demo case %s", case)
    infer_start = time.perf_counter()
    (segmentation,) = infer(
        str(demo_dir / case),
        output=str(out / "inference"),
        checkpoint=str(out / "models" / "model.pt"),
    )  # the model's plan records the demo's window: one pass over a whole case
    infer_seconds = time.perf_counter() - infer_start

    truth, spacing, _ = load_label_map(demo_dir / "heldout_truth" / f"{case}_seg.nii.gz", "brats2021")
    pred, _, _ = load_label_map(segmentation, "brats2021")
    rows = evaluate_case(pred, truth, spacing, lesion_wise=False, case_id=case)
    flair = np.asarray(nib.load(str(demo_dir / case / f"{case}_flair.nii.gz")).dataobj, dtype=np.float32)
    overlay = out / "overlay.png"
    plot_overlay(flair, truth, pred, overlay, spacing=spacing, title=f"{case} (FLAIR): truth above, prediction below")

    result = {
        "best_val_mean_dice": round(float(evaluator.state.best_metric), 4),
        "best_epoch": int(evaluator.state.best_metric_epoch),
        "held_out_case": case,
        "held_out": {r["region"]: {"dice": round(r["dice"], 4), "hd95_mm": round(r["hd95"], 2)} for r in rows},
        "train_seconds": round(train_seconds, 1),
        "inference_seconds": round(infer_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "model": str(out / "models" / "model.pt"),
        "segmentation": segmentation,
        "overlay": str(overlay),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("demo result: %s", json.dumps(result))
    return result


def label_serve(
    studies: str,
    checkpoint: str | None = None,
    work_dir: str = "runs/label",
    host: str = "127.0.0.1",
    port: int = 8000,
    tta: bool | str | None = None,
    import_labels: bool | str = True,
    **overrides: Any,
) -> int:
    """Serve the bundle with MONAI Label (needs the ``label`` extra; docs/guides/monai-label-slicer.md).

    ``--studies``: a BraTS 2021 / 2023 or MSD Task01 folder as downloaded (or MONAI Label's own folder of
    4-D images); ``--work_dir``: the app, the served and trained weights and the labels; ``--tta``: default
    of the served inference (default: on with CUDA, off without); any other ``--key value`` overrides the
    inference and training configs.
    """
    import logging.config

    from bundle.integrations.monailabel import label_serve as _label_serve

    check_options(port=port)

    # the bundle's logging, as monai.bundle run sets it: what is served and why is said at start-up
    logging.config.fileConfig(LOGGING_CONF, disable_existing_loggers=False)
    return _label_serve(
        studies,
        checkpoint=checkpoint,
        work_dir=work_dir,
        host=host,
        port=port,
        tta=tta,
        import_labels=import_labels,
        overrides=overrides or None,
    )


def export(output: str, zip: bool = False, checkpoint: str | None = None, url_base: str | None = None) -> str:
    """Assemble a self-contained model-zoo bundle in ``output`` (see bundle/)."""
    from bundle.integrations.export import export as _export

    # --output: export.check_destination, before any work (a file, a link, this repository, a read-only folder)
    return _export(output, zip=as_bool(zip, "zip"), checkpoint=checkpoint, url_base=url_base)


def infer(
    *inputs: str,
    output: str = "runs/inference",
    checkpoint: str | list[str] | None = None,
    tta: bool | str | None = None,
    device: str | None = None,
    overwrite: bool | str = False,
    **overrides: Any,
) -> list[str]:
    """Segment a dataset folder, a case folder or one case's files with configs/inference.yaml (inference.run.infer).

    ``inputs``: one dataset or case folder, or the files of one case in the order T1, T1ce, T2, FLAIR
    (``infer t1.nrrd t1ce.nrrd t2.nrrd flair.mha``, or as one list ``infer "[t1.nrrd,t1ce.nrrd,t2.nrrd,flair.mha]"``),
    or one 4-D image; every other setting is a ``--flag``. ``--checkpoint a.pt b.pt ...`` (or
    ``--checkpoint "[a.pt,b.pt]"``) is a fold ensemble: the models' probabilities are averaged before the
    recipe's thresholds and clean-up; their plans must agree. The checkpoint's own inference recipe runs
    unless ``--tta``, another recipe key or ``--config_file <variant>`` overrides it. Cases whose outputs
    already exist in ``output`` are skipped (logged), so rerunning a killed run continues it;
    ``--overwrite true`` redoes them. Returns every case's segmentation file.
    """
    from bundle.inference.run import infer as _infer

    check_options(**_given(device=device))  # the output folder and every config key: configs/inference.yaml
    if "input" in overrides:  # --input X, the flag of earlier versions
        inputs = (*inputs, overrides.pop("input"))
    files = [path for value in inputs for path in _paths(value)]
    if not files:
        raise OptionError("infer: give a dataset folder, a case folder or the files of one case (T1, T1ce, T2, FLAIR)")
    overwrite = as_bool(overwrite, "overwrite")  # an OptionError ends python -m bundle with its sentence (main)
    source = files[0] if len(files) == 1 else files
    return _infer(
        source, output=output, checkpoint=checkpoint, tta=tta, device=device, overwrite=overwrite, **overrides
    )


def _paths(value: Any) -> list[str]:
    """The paths in one positional argument as Fire hands it over.

    Fire reads ``"[a,b]"`` as a list of strings, but ``"[t1.nrrd,...]"`` as one string (``t1.nrrd`` is no
    Python literal), and a bare number as a number.
    """
    from bundle.data import file_list

    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return file_list(str(value))


def evaluate(
    pred: str | None = None,
    truth: str | None = None,
    label_scheme: str = "brats2021",
    output_dir: str | None = None,
    pred_label_scheme: str | None = None,
    lesion_wise: bool = True,
    include_disjoint: bool = False,
    plots: bool = False,
    overlays: int = 5,
    checkpoint: str | None = None,
    tta: bool | str | None = None,
    config_file: str | list[str] | None = None,
    **overrides: Any,
) -> str:
    """Score a folder of predicted label maps against the ground truth (bundle.evaluation.reports.evaluate_folder).

    Writes ``metrics.csv`` and ``summary.json`` to ``output_dir`` (default ``<pred>/evaluation``) and prints
    the summary table; ``--plots`` adds the Dice box plot and overlays of the ``overlays`` worst cases.
    With ``--checkpoint`` instead of ``--pred``, the labelled cases of the dataset ``--truth`` are first
    segmented by configs/evaluate.yaml over configs/inference.yaml (predictions and tables in
    ``output_dir``, default ``runs/evaluate``) with the checkpoint's inference recipe (``--checkpoint a.pt b.pt``:
    the fold ensemble, as ``infer``); ``--config_file``
    adds configs after those two (a variant: its inference recipe) and other ``--key value`` pairs are
    their keys. Returns the output folder.
    """
    from bundle.evaluation.reports import check_predictions_exist, evaluate_folder, evaluation_plots

    check_options(**_given(output_dir=output_dir, overlays=overlays))

    lesion_wise, include_disjoint = as_bool(lesion_wise, "lesion_wise"), as_bool(include_disjoint, "include_disjoint")
    plots, tta = as_bool(plots, "plots"), None if tta is None else as_bool(tta, "tta")  # None: the recipe's
    if (pred is None) == (checkpoint is None) or truth is None:
        raise SystemExit("error: give --truth and either --pred (predictions on disk) or --checkpoint")
    if checkpoint is not None:
        from bundle.errors import DataError
        from bundle.inference.run import infer

        out = Path(output_dir or "runs/evaluate").resolve()
        extra = [] if config_file is None else [config_file] if isinstance(config_file, str) else list(config_file)
        with _user_errors(DataError, FileNotFoundError):
            infer(
                truth,
                output=str(out),
                checkpoint=checkpoint,
                tta=tta,
                config_file=["configs/inference.yaml", "configs/evaluate.yaml", *extra],
                lesion_wise=lesion_wise,
                include_disjoint=include_disjoint,
                **overrides,
            )
            if plots:
                evaluation_plots(out / "metrics.csv", out, out, truth, label_scheme, pred_label_scheme, overlays)
        return str(out)
    out = Path(output_dir) if output_dir else Path(pred) / "evaluation"
    with _user_errors():
        check_predictions_exist(pred, truth)
        evaluate_folder(pred, truth, label_scheme, out, pred_label_scheme, lesion_wise, include_disjoint)
        if plots:
            evaluation_plots(out / "metrics.csv", out, pred, truth, label_scheme, pred_label_scheme, overlays)
    return str(out)


def compare(
    run_a: str,
    run_b: str,
    *more_runs: str,
    metrics: str | list[str] | None = None,
    output: str | None = None,
    n_bootstrap: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> None:
    """Paired comparison of runs with A, B minus A (bundle.evaluation.statistics): prints the table.

    ``run_a`` / ``run_b``: a ``metrics.csv`` (or ``cv_metrics.csv``) or a folder holding one, paired by case;
    or two repeated cross-validations (``bundle cv --seeds N`` folders, ``seed_<s>/``), paired by seed:
    mean +- sd over the runs and the paired t-test across them. More runs after B are further variants,
    each compared with A. Every p-value is Holm-adjusted over the regions and variants of its metric.
    ``--metrics dice,hd95`` restricts the metrics; ``--output FILE.csv`` also writes the table.
    """
    from bundle.evaluation.statistics import compare_runs, compare_variants, seed_runs

    check_options("compare", **_given(n_bootstrap=n_bootstrap, seed=seed, alpha=alpha, output=output))
    names = metrics.split(",") if isinstance(metrics, str) else metrics
    variants = [str(run_b), *(str(r) for r in more_runs)]
    with _user_errors():
        seeded = [bool(Path(r).is_dir() and seed_runs(r)) for r in (run_a, *variants)]
        if any(seeded):
            if not all(seeded):
                plain = next(r for r, s in zip((run_a, *variants), seeded, strict=True) if not s)
                raise ValueError(
                    f"{plain}: not a repeated cross-validation (no seed_<s>/cv_metrics.csv), unlike "
                    f"{next(r for r, s in zip((run_a, *variants), seeded, strict=True) if s)}; compare like with like"
                )
            compare_runs(run_a, variants, names, alpha, output, verbose=True)
            return
        tables = [_metrics_csv(r) for r in variants]
        compare_variants(_metrics_csv(run_a), tables, names, n_bootstrap, seed, alpha, output, verbose=True)


def cv(
    config_file: str | list[str] = "configs/train.yaml",
    folds: int = 5,
    fold_ids: str | int | list[int] | None = None,
    dataset_dir: str | None = None,
    datalist: str | None = None,
    output_dir: str = "runs/cv",
    seed: int = 42,
    include_disjoint: bool | str | None = None,
    scoring: str = "recipe",
    seeds: int = 1,
    **overrides: Any,
) -> str:
    """K-fold cross-validation (bundle.integrations.cv.run_cv): train each fold, score its validation cases, pool them.

    ``--scoring recipe`` (default): each fold's best checkpoint segments its cases as ``bundle infer``
    would (its own TTA, thresholds, post-processing); ``--scoring raw``: no TTA, 0.5 thresholds, no
    post-processing, on the validation grid. ``--seeds N`` repeats the whole cross-validation with training
    seeds ``seed`` .. ``seed + N - 1`` (same split), each in ``output_dir/seed_<s>``, and reports mean +- sd
    over the runs (``cv_runs.json``). ``--include_disjoint true`` also scores NCR and ED (default: the
    config's ``validate_disjoint``, true for M3). Any other ``--key value`` overrides the training config.
    Prints the fold summary and the fold-ensemble command; returns the summary's path.
    """
    from bundle.errors import DataError
    from bundle.integrations.cv import parse_fold_ids, run_cv

    read = check_options(
        "cv",
        **_given(folds=folds, seed=seed, output_dir=output_dir, datalist=datalist, scoring=scoring, seeds=seeds),
    )
    with _user_errors():
        parse_fold_ids(fold_ids, folds)
    with _user_errors(DataError):
        run_cv(
            config_file,
            folds,
            fold_ids,
            dataset_dir,
            datalist,
            output_dir,
            seed,
            include_disjoint=include_disjoint,
            scoring=read["scoring"],
            seeds=read["seeds"],
            **overrides,
        )
    return str(Path(output_dir) / ("cv_summary.json" if read["seeds"] == 1 else "cv_runs.json"))


def plots(path: str, output_dir: str | None = None, metric: str = "dice") -> list[str]:
    """Training curves from a run's ``metrics_per_epoch.csv`` and/or a box plot from its ``metrics.csv``.

    ``path``: a run folder (both pictures, whichever CSVs it holds) or one of the CSV files. Pictures go
    to ``output_dir`` (default: the CSV's folder). Returns the written files.
    """
    from bundle.evaluation.plots import plot_training_curves
    from bundle.evaluation.reports import evaluation_plots

    check_options(**_given(output_dir=output_dir))

    source = Path(path)
    if source.is_dir():
        candidates = [source / "metrics_per_epoch.csv", source / "metrics.csv", source / "cv_metrics.csv"]
        csvs = [c for c in candidates if c.is_file()]
    else:
        csvs = [source]
    with _user_errors():
        if not csvs or not csvs[0].is_file():
            raise FileNotFoundError(f"{source}: no metrics_per_epoch.csv, metrics.csv or cv_metrics.csv")
        written: list[str] = []
        for csv_file in csvs:
            out = Path(output_dir) if output_dir else csv_file.parent
            if csv_file.read_text().split(",", 1)[0].strip() == "epoch":
                plot_training_curves(csv_file, out / "training_curves.png")
                written.append(str(out / "training_curves.png"))
            else:
                written += [str(p) for p in evaluation_plots(csv_file, out, metric=metric)]
    return written


def _given(**values: Any) -> dict[str, Any]:
    """The options given (not ``None``): ``None`` is each command's "as the config says"."""
    return {name: value for name, value in values.items() if value is not None}


def _metrics_csv(run: str) -> Path:
    """A run's per-case table: the file itself, or ``metrics.csv`` / ``cv_metrics.csv`` in a run folder."""
    path = Path(run)
    if path.is_dir():
        for name in ("metrics.csv", "cv_metrics.csv", "evaluation/metrics.csv"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no metrics.csv or cv_metrics.csv in this folder")
    return path


@contextmanager
def _user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Stop with the one-sentence message of a user's bad input instead of a traceback (exit status 1).

    ``kinds`` default to ``FileNotFoundError`` and ``ValueError`` (what bundle.evaluation raises for bad
    input); around training or inference only the bundle's ``DataError`` is, so real bugs keep their traceback.
    """
    caught = kinds or (FileNotFoundError, ValueError)
    try:
        yield
    except caught as err:
        raise SystemExit(f"error: {err}") from err


COMMANDS = {
    "prepare": prepare,
    "train": train,
    "demo": demo,
    "label_serve": label_serve,
    "export": export,
    "infer": infer,
    "evaluate": evaluate,
    "compare": compare,
    "cv": cv,
    "plots": plots,
}


#: Commands whose ``--checkpoint`` takes several files (a fold ensemble), and what a checkpoint's name ends with.
CHECKPOINT_LISTS = ("infer", "evaluate")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def _checkpoint_lists(args: list[str]) -> list[str]:
    """``--checkpoint a.pt b.pt`` as the one list Fire reads, ``--checkpoint "['a.pt','b.pt']"``.

    Fire gives a flag one value: ``b.pt`` would become an input to segment. The files after
    ``--checkpoint`` that end in ``.pt`` / ``.pth`` / ``.ckpt`` are taken as its list; other names are
    given as one list (``--checkpoint "[a,b]"``), which is passed on as typed.
    """
    if not args or args[0] not in CHECKPOINT_LISTS:
        return args
    out, i = list(args[:1]), 1
    while i < len(args):
        out.append(args[i])
        if args[i] == "--checkpoint":
            files = []
            while i + 1 < len(args) and args[i + 1].lower().endswith(CHECKPOINT_SUFFIXES):
                files.append(args[i + 1])
                i += 1
            if len(files) > 1:
                out.append("[" + ",".join(repr(f) for f in files) + "]")
            else:
                out += files
        i += 1
    return out


def _check_flag_names(args: list[str]) -> None:
    """A fixed-signature command given a flag it does not take stops here, before it runs (bundle.options)."""
    if args and args[0] in COMMANDS:
        check_command_flags(args[0], COMMANDS[args[0]], args[1:])


def main() -> None:
    """Entry point of ``python -m bundle``: a dataset problem ends with its one sentence, exit code 1."""
    import fire

    try:
        args = _checkpoint_lists(sys.argv[1:])
        _check_flag_names(args)
        fire.Fire(COMMANDS, command=args)
    except Exception as err:
        from bundle.errors import find_user_error, user_error_message

        user_error = find_user_error(err)
        if user_error is None:
            raise
        # The sentence names the file or option and the problem; a traceback would only bury it.
        if not getattr(user_error, "logged", False):
            print(user_error_message(user_error), file=sys.stderr)
        raise SystemExit(1) from None
