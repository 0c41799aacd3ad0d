"""K-fold cross-validation in one command: ``python -m bundle cv --folds 5 [--fold_ids 0,2] [--seeds 3] ...``.

:func:`run_cv` prepares *one* datalist with the requested number of folds (so every fold sees the same
split), trains each chosen fold through MONAI's ``ConfigWorkflow`` on the training config with
``fold=k``, ``output_dir=<out>/fold_k`` and ``ckpt_dir=<out>/fold_k/models``, then scores that fold's
validation cases (and the held-out ones) with its best checkpoint, one of two ways (``scoring``):

* ``recipe`` (default): as ``python -m bundle evaluate --checkpoint`` does: ``configs/evaluate.yaml`` over
  ``configs/inference.yaml`` runs the checkpoint's own plan and inference recipe (TTA, thresholds,
  post-processing; what ``bundle infer`` on it writes, in ``fold_k/val_predictions``), scored on each
  case's own grid. This is how the papers report their cross-validation (M4's five folds).
* ``raw``: the network's validation output on the validation grid (RAS, cropped to the brain), no TTA,
  0.5 thresholds (argmax for class models), no post-processing, like nnU-Net's fold validation: a
  ``SupervisedEvaluator`` on the workflow's validation parts whose :class:`CaseMetricsCollector` turns
  every case into per-region rows of :func:`bundle.evaluation.metrics.evaluate_case`. Specificity and
  accuracy then count only voxels inside the crop.

Outputs in ``<out>``:

* ``fold_k/metrics.csv`` + ``fold_k/summary.json`` - one fold, the same files as ``python -m bundle evaluate``;
  ``fold_k/cv_fold.json`` records the seed and the scoring (folds pooled from earlier calls must match);
* ``cv_metrics.csv`` - every validation case of every fold once, with a ``fold`` column;
* ``cv_summary.json`` - per-fold means, the fold summary (mean +- std of the per-fold means, as papers
  report cross-validation) and the pooled per-case summary; the fold summary is printed as a table.

``seeds`` > 1 repeats the whole cross-validation with training seeds ``seed``, ``seed + 1``, ... (the split
stays ``seed``'s, so every run scores the same cases) in ``<out>/seed_<s>/``, and ``<out>/cv_runs.json``
holds mean +- sd over the runs (M1 reports repeated runs so); ``bundle compare`` of two such folders
pairs the runs by seed. The run ends by printing the fold-ensemble command (every fold's best
checkpoint, their probabilities averaged: :class:`bundle.plan.CheckpointEnsemble`).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.atomic import write_text_atomic
from bundle.constants import REGION_NAMES
from bundle.data import select_cases
from bundle.evaluation.files import case_id_from_path, read_metrics_csv, write_metrics_csv
from bundle.evaluation.handlers import spacing_of
from bundle.evaluation.metrics import evaluate_case
from bundle.evaluation.reports import SUMMARY_METRICS, metric_table, save_evaluation, summarize
from bundle.options import as_bool, check_config_keys, check_options
from bundle.paths import BUNDLE_ROOT, LOGGING_CONF, resolve_config_files, working_directory
from bundle.training.validation import validation_postprocessing

logger = logging.getLogger(__name__)


class CaseMetricsCollector:
    """Ignite handler: per-case, per-region metric rows from an evaluator's ``pred`` and ``label`` channels.

    MONAI's ``MetricsSaver`` writes one file per metric with one column per channel; the bundle's
    evaluation tables have one row per case and region with every metric (:mod:`bundle.evaluation`), so
    this handler scores each decollated item with :func:`bundle.evaluation.metrics.evaluate_case` (official HD95 in
    mm from the label's affine, lesion-wise scores) and keeps the rows in ``self.rows``.

    The channels are binary region masks (WT, TC, ET after validation's post-processing). They are packed
    into one label map with bit ``i`` for channel ``i`` and scored with matching regions, which is exact
    even where a prediction's regions are not nested (ET outside TC).

    Args:
        names: channel names (default ``WT, TC, ET``; one channel alone is called ``WT``).
        lesion_wise: also compute the BraTS lesion-wise scores.
        include_disjoint: with WT, TC, ET channels, also score the disjoint classes NCR (TC without
            ET) and ED (WT without TC), as M3 reports them.
        extra: constant columns added to every row, e.g. ``{"fold": 2}``.
        pred_key, label_key: keys of the items in ``engine.state.output``.
        name_key: key of the case id in ``engine.state.batch`` items (fallback: the label's file name).
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        lesion_wise: bool = True,
        extra: dict[str, Any] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        name_key: str = "case_id",
        include_disjoint: bool = False,
    ) -> None:
        self.names = None if names is None else tuple(names)
        self.lesion_wise = lesion_wise
        self.include_disjoint = include_disjoint
        self.extra = dict(extra or {})
        self.pred_key, self.label_key, self.name_key = pred_key, label_key, name_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        """Collect after every iteration; start empty on every run."""
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Score every item of the current (decollated) batch."""
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(outputs)
        for output, item in zip(outputs, batch, strict=True):
            self.rows += self.score(output[self.pred_key], output[self.label_key], self._case_id(item, output))

    def score(self, pred: torch.Tensor, label: torch.Tensor, case_id: str) -> list[dict]:
        """Rows of one case from ``[C, *spatial]`` binary region channels (values > 0.5 are foreground)."""
        if pred.shape != label.shape:
            raise ValueError(f"case {case_id}: pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
        channels = pred.shape[0]
        names = self.names or (REGION_NAMES if channels == len(REGION_NAMES) else REGION_NAMES[:1])
        if len(names) != channels:
            raise ValueError(f"case {case_id}: {channels} channel(s) but region names {names}; pass names=")
        weights = (2 ** np.arange(channels)).reshape(-1, *[1] * (pred.ndim - 1))
        packed_pred = ((_numpy(pred) > 0.5) * weights).sum(0)
        packed_true = ((_numpy(label) > 0.5) * weights).sum(0)
        regions = {n: tuple(v for v in range(1, 2**channels) if v >> i & 1) for i, n in enumerate(names)}
        if self.include_disjoint and tuple(names) == REGION_NAMES:
            bit = {n: 1 << i for i, n in enumerate(names)}
            values = range(1, 2**channels)
            regions["NCR"] = tuple(v for v in values if v & bit["TC"] and not v & bit["ET"])
            regions["ED"] = tuple(v for v in values if v & bit["WT"] and not v & bit["TC"])
        spacing = spacing_of(label, label.ndim - 1)
        if spacing is None:
            logger.warning("label without an affine (not a MetaTensor): distances and volumes in voxels")
        rows = evaluate_case(
            packed_pred, packed_true, spacing, regions=regions, lesion_wise=self.lesion_wise, case_id=case_id
        )
        return [{"case": r["case"], "region": r["region"], **self.extra, **r} for r in rows]

    def _case_id(self, item: dict, output: dict) -> str:
        if isinstance(item, dict) and item.get(self.name_key):
            return str(item[self.name_key])
        meta = getattr(output[self.label_key], "meta", {})
        return case_id_from_path(str(meta.get("filename_or_obj", "case")))


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def parse_fold_ids(fold_ids: int | str | Sequence[int] | None, folds: int) -> list[int]:
    """Folds to run: all by default, else ``0,2`` / ``[0, 2]`` / ``2`` (fire gives ints or tuples)."""
    if fold_ids is None or fold_ids == "":
        chosen = list(range(folds))
    elif isinstance(fold_ids, int):
        chosen = [fold_ids]
    elif isinstance(fold_ids, str):
        chosen = [int(v) for v in fold_ids.replace("[", "").replace("]", "").split(",") if v.strip()]
    else:
        chosen = [int(v) for v in fold_ids]
    bad = [k for k in chosen if not 0 <= k < folds]
    if bad:
        raise ValueError(f"fold_ids {bad} outside 0..{folds - 1} (--folds {folds})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"fold_ids {chosen} name a fold twice")
    return chosen


def summarize_folds(rows: Sequence[dict], metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-fold means and the fold summary of per-case rows carrying a ``fold`` column.

    ``across_folds[region][metric]`` holds ``n_folds``, ``mean`` (mean of the per-fold means), ``std``
    (sample std of the per-fold means, 0 for one fold) and ``fold_means``; ``per_fold[k]`` is
    :func:`bundle.evaluation.reports.summarize` of fold ``k``; ``pooled`` summarises all cases together.
    """
    folds = sorted({int(r["fold"]) for r in rows})
    per_fold = {str(k): summarize([r for r in rows if int(r["fold"]) == k], metrics) for k in folds}
    across: dict[str, dict[str, dict[str, Any]]] = {}
    for region in dict.fromkeys(r["region"] for r in rows):
        across[region] = {}
        for metric in [m for m in (metrics or SUMMARY_METRICS) if any(m in r for r in rows)]:
            means = [per_fold[str(k)][region][metric]["mean"] for k in folds if metric in per_fold[str(k)][region]]
            if not means:
                continue
            across[region][metric] = {
                "n_folds": len(means),
                "mean": float(np.mean(means)),
                "std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
                "fold_means": [float(m) for m in means],
            }
    cases = {str(k): sorted({r["case"] for r in rows if int(r["fold"]) == k}) for k in folds}
    return {
        "folds": folds,
        "cases_per_fold": {k: len(v) for k, v in cases.items()},
        "across_folds": across,
        "per_fold": per_fold,
        "pooled": summarize(rows, metrics),
    }


def format_cv_summary(summary: dict[str, Any]) -> str:
    """Table of the fold summary: one line per metric, ``mean +- std`` across folds per region."""
    lines = metric_table(summary["across_folds"], lambda s: f"{s['mean']:.4f} +- {s['std']:.4f}", 20)
    folds = ", ".join(f"{k} ({n} cases)" for k, n in summary["cases_per_fold"].items())
    lines.append(f"folds {folds}; mean +- std of the per-fold means")
    return "\n".join(lines)


def run_cv(
    config_file: str | Sequence[str] = "configs/train.yaml",
    folds: int = 5,
    fold_ids: int | str | Sequence[int] | None = None,
    dataset_dir: str | None = None,
    datalist: str | None = None,
    output_dir: str = "runs/cv",
    seed: int = 42,
    lesion_wise: bool = True,
    verbose: bool = True,
    include_disjoint: bool | str | None = None,
    scoring: str = "recipe",
    seeds: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Train and evaluate the chosen folds of a ``folds``-fold cross-validation; return the CV summary.

    Args:
        config_file: training config(s), e.g. ``configs/train.yaml`` or a list ending in a variant.
        folds: number of folds of the datalist prepared in ``output_dir/datalist.json``.
        fold_ids: folds to run (default all), e.g. ``"0,2"``.
        dataset_dir: a BraTS 2021 / 2023 / MSD folder (or ``datalist``; one of them is needed).
        datalist: an existing datalist JSON (from ``python -m bundle prepare --folds N``) with ``folds`` folds.
        output_dir: ``fold_k/`` (checkpoints, logs, per-fold metrics), ``cv_metrics.csv``, ``cv_summary.json``;
            with ``seeds`` > 1, one ``seed_<s>/`` folder of those per run and ``cv_runs.json``.
        seed: seed of the fold assignment and of training (of the first run with ``seeds``).
        lesion_wise: also compute the lesion-wise scores per case.
        verbose: print the fold summary table.
        include_disjoint: also score the disjoint classes NCR and ED; default: the config's
            ``validate_disjoint`` (true for M3, which reports them).
        scoring: ``recipe`` (default): each fold's best checkpoint segments its validation (and held-out)
            cases as ``bundle evaluate --checkpoint`` does, with its own inference recipe (TTA, thresholds,
            post-processing), scored on each case's own grid; ``raw``: the network's validation output on
            the validation grid, no TTA, 0.5 thresholds, no post-processing (nnU-Net's fold validation).
        seeds: repeat the whole cross-validation with training seeds ``seed``, ``seed + 1``, ...; the split
            stays the one of ``seed``, so every run is scored on the same cases and runs pair case by case.
        overrides: any key of the training config, a nested one by its ``#`` path (``epochs``, ``roi_size``,
            ``network_factory#filters``...).
    """
    from bundle.data import resolve_datalist
    from bundle.errors import DataError

    # one fold would score each model on its own training cases
    read = check_options("cv", folds=folds, seed=seed, scoring=scoring, seeds=seeds)
    seeds = read["seeds"]
    out = Path(output_dir).resolve()
    configs = resolve_config_files(config_file)
    check_config_keys(configs, list(overrides))  # a key no config reads would be ignored by every fold
    chosen = parse_fold_ids(fold_ids, folds)
    # one datalist for every fold: folds trained in separate calls still share the split, with the
    # hold-out and subset the config stack asks for (train.yaml: 20 % held out; M3: a 10 % subset)
    split = split_settings(configs, overrides)
    if include_disjoint is None:
        include_disjoint = config_value(configs, overrides, "validate_disjoint", False)
    include_disjoint = as_bool(include_disjoint, "include_disjoint")
    datalist_file = resolve_datalist(
        dataset_dir, datalist, str(out), folds=folds, seed=seed, empty_folds=False, **split
    )
    declared = json.loads(Path(datalist_file).read_text()).get("num_folds")
    if declared is not None and int(declared) != folds:
        raise DataError(f"{datalist_file}: the datalist has {declared} folds, not --folds {folds}")
    for k in chosen:  # every fold trains on some cases and is scored on others, before the first one trains
        select_cases(datalist=datalist_file, fold=k, split="train")
        select_cases(datalist=datalist_file, fold=k, split="val")
    holdout = select_cases(datalist=datalist_file, split="holdout")
    run = {"configs": configs, "folds": folds, "chosen": chosen, "datalist_file": datalist_file}
    run.update(holdout=holdout, lesion_wise=lesion_wise, include_disjoint=include_disjoint, scoring=scoring)
    if seeds == 1:
        summary = _run_folds(out, seed, verbose=verbose, **run, overrides=overrides)
        checkpoints = _checkpoints(out, folds)
    else:
        runs = {}
        for s in range(seed, seed + seeds):
            logger.info("cross-validation: run with seed %d of %d -> %s", s, seeds, out / f"seed_{s}")
            runs[s] = _run_folds(out / f"seed_{s}", s, verbose=verbose, **run, overrides=overrides)
        summary = summarize_runs(runs)
        summary.update(num_folds=folds, datalist=datalist_file, split_seed=seed, scoring=scoring)
        checkpoints = [c for s in runs for c in _checkpoints(out / f"seed_{s}", folds)]
        if verbose:
            print(format_runs_summary(summary))
    summary["ensemble"] = ensemble_commands(checkpoints, dataset_dir, datalist_file, out, bool(holdout))
    write_text_atomic(
        out / ("cv_summary.json" if seeds == 1 else "cv_runs.json"),
        json.dumps(summary, indent=2, allow_nan=True) + "\n",
    )
    if verbose:
        print("fold ensemble (the folds' probabilities averaged; nnU-Net's default):")
        print("\n".join(f"  {command}" for command in summary["ensemble"].values()))
    return summary


def _run_folds(
    out: Path,
    seed: int,
    configs: list[str],
    folds: int,
    chosen: list[int],
    datalist_file: str,
    holdout: list[dict],
    lesion_wise: bool,
    include_disjoint: bool,
    scoring: str,
    overrides: dict[str, Any],
    verbose: bool = True,
) -> dict[str, Any]:
    """One cross-validation into ``out`` with training seed ``seed``: train, score, pool, write, print."""
    from monai.bundle import ConfigWorkflow

    rows: list[dict] = []
    holdout_rows: list[dict] = []
    for k in chosen:
        fold_dir = out / f"fold_{k}"
        settings = {
            "bundle_root": str(BUNDLE_ROOT),
            "dataset_dir": None,
            "datalist": datalist_file,
            "num_folds": folds,
            "seed": seed,
            "fold": k,
            "output_dir": str(fold_dir),
            "ckpt_dir": str(fold_dir / "models"),
            **overrides,
        }
        logger.info("cross-validation: fold %d of %s -> %s", k, chosen, fold_dir)
        workflow = ConfigWorkflow(
            config_file=configs,
            logging_file=str(LOGGING_CONF),
            workflow_type="train",
            run_id="training",
            **settings,
        )
        workflow.initialize()
        workflow.run()
        best = Path(settings["ckpt_dir"]) / "model.pt"
        if scoring == "raw":
            fold_rows = _evaluate_fold(workflow, best, k, lesion_wise, include_disjoint=include_disjoint)
            # the held-out test cases, scored by this fold's model: reported apart from the validation folds
            fold_holdout = (
                _evaluate_fold(workflow, best, k, lesion_wise, cases=holdout, include_disjoint=include_disjoint)
                if holdout
                else []
            )
        else:
            device = workflow.parser.get_parsed_content("device")
            score = {"lesion_wise": lesion_wise, "include_disjoint": include_disjoint, "device": device}
            fold_rows = score_with_recipe(best, datalist_file, k, "val", fold_dir / "val_predictions", **score)
            fold_holdout = (
                score_with_recipe(best, datalist_file, k, "holdout", fold_dir / "holdout_predictions", **score)
                if holdout
                else []
            )
        workflow.finalize()
        save_evaluation(fold_rows, fold_dir, verbose=False)
        if fold_holdout:
            write_metrics_csv(fold_holdout, fold_dir / HOLDOUT_CSV)
        write_text_atomic(fold_dir / FOLD_JSON, json.dumps({"fold": k, "seed": seed, "scoring": scoring}) + "\n")
        rows += fold_rows
        holdout_rows += fold_holdout
    rows += _earlier_folds(out, datalist_file, folds, skip=chosen, scoring=scoring)
    holdout_rows += _earlier_folds(out, datalist_file, folds, skip=chosen, holdout=True, scoring=scoring)
    rows.sort(key=lambda r: int(r["fold"]))
    holdout_rows.sort(key=lambda r: int(r["fold"]))
    write_metrics_csv(rows, out / "cv_metrics.csv")
    summary = {"num_folds": folds, "datalist": datalist_file, "seed": seed, "scoring": scoring}
    summary.update(summarize_folds(rows))
    if holdout_rows:
        write_metrics_csv(holdout_rows, out / "cv_holdout_metrics.csv")
        # each fold's model on the same held-out cases: mean +- std across the fold models
        summary["holdout"] = {"num_cases": len(holdout), **summarize_folds(holdout_rows)}
    write_text_atomic(out / "cv_summary.json", json.dumps(summary, indent=2, allow_nan=True) + "\n")
    if verbose:
        print(f"cross-validation, seed {seed}, {scoring} scoring ({SCORING_WORDS[scoring]}):")
        print(format_cv_summary(summary))
        if "holdout" in summary:
            print(f"held-out test set ({summary['holdout']['num_cases']} cases), each fold's model:")
            print(format_cv_summary(summary["holdout"]))
    return summary


#: What each scoring does, as the printed tables say it.
SCORING_WORDS = {
    "recipe": "each checkpoint's inference recipe, as bundle infer runs it",
    "raw": "no TTA, 0.5 thresholds, no post-processing, on the validation grid",
}


def score_with_recipe(
    checkpoint: str | Path,
    datalist_file: str,
    fold: int,
    split: str,
    output_dir: Path,
    lesion_wise: bool = True,
    include_disjoint: bool = False,
    device: Any = None,
) -> list[dict]:
    """Per-case rows of one fold's ``split`` cases (``val`` or ``holdout``), as ``bundle evaluate --checkpoint``
    scores them: ``configs/evaluate.yaml`` over ``configs/inference.yaml`` with the checkpoint's own plan and
    recipe (TTA, thresholds, post-processing), predictions in ``output_dir``, scored on each case's grid.
    """
    from monai.bundle import ConfigWorkflow

    settings: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dataset_dir": None,
        "datalist_file": datalist_file,
        "fold": fold if split == "val" else None,
        "split": split,
        "output_dir": str(output_dir),
        "lesion_wise": lesion_wise,
        "include_disjoint": include_disjoint,
    }
    if device is not None:
        settings["device"] = f"$torch.device({str(device)!r})"
    configs = resolve_config_files(["configs/inference.yaml", "configs/evaluate.yaml"])
    with working_directory(BUNDLE_ROOT):
        workflow = ConfigWorkflow(config_file=configs, workflow_type="inference", **settings)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    rows = read_metrics_csv(Path(output_dir) / "metrics.csv")
    if not rows:
        raise RuntimeError(f"fold {fold}: no {split} case was evaluated")
    dice = {g: s["dice"]["mean"] for g, s in summarize(rows, ["dice"]).items() if "dice" in s}
    logger.info("fold %d (%s, recipe): %d case(s), mean Dice %s", fold, split, len({r["case"] for r in rows}), dice)
    return [{"case": r["case"], "region": r["region"], "fold": fold, **r} for r in rows]


def _checkpoints(out: Path, folds: int) -> list[Path]:
    """The best checkpoint of every fold trained in ``out`` (this call's or an earlier one's)."""
    return [p for k in range(folds) if (p := out / f"fold_{k}" / "models" / "model.pt").is_file()]


def ensemble_commands(
    checkpoints: Sequence[Path], dataset_dir: str | None, datalist_file: str, out: Path, has_holdout: bool
) -> dict[str, str]:
    """The commands that run the folds as one ensemble: segment new cases, and score it on the held-out cases."""
    files = " ".join(shlex.quote(str(c)) for c in checkpoints)
    cases = shlex.quote(str(dataset_dir)) if dataset_dir else "CASES"
    quoted = {
        name: shlex.quote(str(path))
        for name, path in (
            ("ensemble", out / "ensemble"),
            ("holdout", out / "ensemble_holdout"),
            ("datalist", datalist_file),
        )
    }
    commands = {"infer": f"python -m bundle infer {cases} --checkpoint {files} --output {quoted['ensemble']}"}
    if has_holdout:
        commands["evaluate_holdout"] = (
            f"python -m bundle evaluate --checkpoint {files} --truth {cases} --datalist_file {quoted['datalist']} "
            f"--split holdout --output_dir {quoted['holdout']}"
        )
    return commands


def summarize_runs(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean +- sd over repeated cross-validations (one per seed) of each run's figure, the mean of its fold means.

    ``across_runs[region][metric]`` holds ``n_runs``, ``mean``, ``std`` (sample, 0 for one run) and
    ``run_means`` by seed; the same for the held-out set (``holdout``) when the runs scored one.
    """

    def across(summaries: dict[int, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        table: dict[str, dict[str, dict[str, Any]]] = {}
        first = next(iter(summaries.values()))["across_folds"]
        for region in first:
            table[region] = {}
            for metric in first[region]:
                means = {s: r["across_folds"][region][metric]["mean"] for s, r in summaries.items()}
                values = np.array(list(means.values()), dtype=float)
                table[region][metric] = {
                    "n_runs": len(values),
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "run_means": {str(s): float(m) for s, m in means.items()},
                }
        return table

    summary: dict[str, Any] = {"seeds": list(runs), "across_runs": across(runs)}
    summary["cases"] = sum(next(iter(runs.values()))["cases_per_fold"].values())
    if all("holdout" in r for r in runs.values()):
        summary["holdout"] = {
            "num_cases": next(iter(runs.values()))["holdout"]["num_cases"],
            "across_runs": across({s: r["holdout"] for s, r in runs.items()}),
        }
    return summary


def format_runs_summary(summary: dict[str, Any]) -> str:
    """Table of repeated cross-validations: ``mean +- sd`` over the runs of each run's mean of fold means."""
    lines = metric_table(summary["across_runs"], lambda s: f"{s['mean']:.4f} +- {s['std']:.4f}", 20)
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines.append(
        f"{len(summary['seeds'])} runs (seeds {seeds}), {summary['cases']} validation cases each; "
        "mean +- sd over the runs of each run's mean of fold means"
    )
    if "holdout" in summary:
        lines.append(f"held-out test set ({summary['holdout']['num_cases']} cases), each fold model's mean:")
        lines += metric_table(summary["holdout"]["across_runs"], lambda s: f"{s['mean']:.4f} +- {s['std']:.4f}", 20)
    return "\n".join(lines)


HOLDOUT_CSV = "holdout_metrics.csv"
#: How a fold was scored and with which seed, beside its metrics.csv (earlier folds are pooled only if it fits).
FOLD_JSON = "cv_fold.json"
SPLIT_KEYS = ("holdout_fraction", "subset_fraction", "subset_seed")


def _config(configs: Sequence[str]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(configs))
    return parser


def config_value(configs: Sequence[str], overrides: dict[str, Any], key: str, default: Any = None) -> Any:
    """A plain top-level value of a training config stack, as ``overrides`` would set it."""
    if key in overrides:
        return overrides[key]
    parser = _config(configs)
    return parser.get(key, default)


def split_settings(configs: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The datalist's hold-out and subset settings of a training config stack (and the overrides)."""
    parser = _config(configs)
    return {k: overrides.get(k, parser.get(k)) for k in SPLIT_KEYS if k in overrides or k in parser}


def _evaluate_fold(
    workflow: Any,
    best: Path,
    fold: int,
    lesion_wise: bool,
    cases: Sequence[dict] | None = None,
    include_disjoint: bool = False,
) -> list[dict]:
    """Per-case rows of one fold's validation cases (or of ``cases``), predicted by its best checkpoint.

    A fresh ``SupervisedEvaluator`` on the workflow's own validation parts rather than re-running
    ``validate#evaluator`` itself: that one carries training handlers (early stopping, LR schedule,
    best-model saver, TensorBoard) that must not act again after training. The cases are read through
    an uncached ``Dataset`` with ``validate#preprocessing``: MONAI's ``PersistentDataset`` (the disk
    cache of real data) stores plain tensors, and the affine, hence the voxel size in mm for HD95 and
    volumes, would be lost; one pass per fold gains nothing from a cache anyway.
    """
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointLoader

    if not best.is_file():
        raise FileNotFoundError(
            f"{best}: fold {fold} saved no best checkpoint (validation never ran: is epochs >= val_interval?)"
        )
    parser = workflow.parser
    network = parser.get_parsed_content("network")
    device = parser.get_parsed_content("device")
    collector = CaseMetricsCollector(lesion_wise=lesion_wise, extra={"fold": fold}, include_disjoint=include_disjoint)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(
            Dataset(
                list(cases) if cases is not None else parser.get_parsed_content("val_datalist"),
                parser.get_parsed_content("validate#preprocessing"),
            ),
            batch_size=1,
            shuffle=False,
            num_workers=int(parser.get_parsed_content("num_workers")),
        ),
        network=network,
        inferer=parser.get_parsed_content("validate#inferer"),
        # raw: thresholds at 0.5 (argmax for class models), whatever validate_with_recipe says
        postprocessing=validation_postprocessing(parser.get_parsed_content("model_plan"), with_recipe=False),
        val_handlers=[CheckpointLoader(load_path=str(best), load_dict={"model": network}, map_location=device)],
        amp=as_bool(parser.get_parsed_content("amp"), "amp"),
    )
    collector.attach(evaluator)
    evaluator.run()
    if not collector.rows:
        raise RuntimeError(f"fold {fold}: no validation case was evaluated")
    dice = {g: s["dice"]["mean"] for g, s in summarize(collector.rows, ["dice"]).items() if "dice" in s}
    logger.info("fold %d: %d case(s), mean Dice %s", fold, len({r["case"] for r in collector.rows}), dice)
    return collector.rows


def _earlier_folds(
    out: Path, datalist_file: str, folds: int, skip: Sequence[int], holdout: bool = False, scoring: str = "recipe"
) -> list[dict]:
    """Rows of folds evaluated by earlier calls (``--fold_ids 0,2`` now, ``1,3,4`` later) into the same ``out``.

    A fold's ``metrics.csv`` (``holdout_metrics.csv`` with ``holdout``) is taken only if it holds exactly
    the cases the current datalist puts in that fold (or in its hold-out), and was scored the same way
    (``cv_fold.json``'s ``scoring``; a fold without one was scored raw, as before scoring was a choice),
    so results of another split (other ``--folds`` or data) or scoring are never pooled.
    """
    rows: list[dict] = []
    for k in range(folds):
        path = out / f"fold_{k}" / (HOLDOUT_CSV if holdout else "metrics.csv")
        if k in skip or not path.is_file():
            continue
        fold_rows = read_metrics_csv(path)
        split = "holdout" if holdout else "val"
        expected = {str(i["case_id"]) for i in select_cases(datalist=datalist_file, fold=k, split=split)}
        record = path.parent / FOLD_JSON
        scored = json.loads(record.read_text()).get("scoring") if record.is_file() else "raw"
        if scored != scoring:
            logger.warning("%s: scored %s, not %s; left out of the pooled table", path, scored, scoring)
            continue
        if {r["case"] for r in fold_rows} != expected or any(r.get("fold") != k for r in fold_rows):
            logger.warning("%s: not fold %d of %s; left out of the pooled table", path, k, datalist_file)
            continue
        logger.info("pooling fold %d from an earlier call (%s)", k, path)
        rows += [{**r, "fold": k} for r in fold_rows]
    return rows
