"""The CPU recipe (configs/cpu.yaml) against the default recipe (configs/train.yaml) on the same wall time.

Both recipes train through the command users type, ``python -m monai.bundle run training``, on the
labelled cases of ``--dataset_dir`` except ``--val_case``, which is their validation case (a datalist
from ``python -m bundle prepare`` with one fold per case). Each training gets the same wall-time budget
(``--minutes``): Ignite's ``TimeLimit`` handler, attached to the trainer just before it runs, ends the
training after the first iteration or epoch that completes past the budget (a validation that has
started runs to its end; the table records each run's real training time). Each best model
(``models/model.pt``; the last checkpoint if no validation finished) then segments ``--val_case`` with
``python -m bundle infer --tta false`` and is scored with ``python -m bundle evaluate`` (Dice and HD95
per region WT / TC / ET).

Same conditions: the two pipelines run at the same time, each with ``--threads`` torch / OpenMP threads
(default 1 each on a 2-core machine), so both see the same load from the machine's other jobs.

Seconds per case (``--speed_rounds N``): after both pipelines, each final model segments ``--val_case``
again with ``python -m bundle infer --tta false`` N times, the recipes alternating, one at a time with
``--speed_threads`` threads (default: all cores), so each has the machine to itself and both see the
same drift of its load. Per run: the case's time by Ignite's own timer (loading, preprocessing, the
network, post-processing, writing the NIfTI; what every further case of a folder costs) and the
command's wall time (plus Python, torch and MONAI imports, config parsing and building the network).

    python scripts/benchmark_cpu_recipe.py --dataset_dir ../shared/brats_samples --minutes 20 \\
        --speed_rounds 3 --json docs/benchmarks/benchmark_cpu_recipe.json
    python scripts/benchmark_cpu_recipe.py --dataset_dir ../shared/brats_samples --minutes 3 --recipes cpu   # a trial
    python scripts/benchmark_cpu_recipe.py --reuse_training --speed_rounds 3 ...   # time saved models again
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "cpu": ["configs/train.yaml", "configs/cpu.yaml"],
    "default": ["configs/train.yaml"],
}
REGIONS = ("WT", "TC", "ET")
FINAL_MODEL = "final_model.pt"


def _budget_overlay(path: Path, seconds: int) -> Path:
    """An overlay whose ``training`` is train.yaml's with Ignite's TimeLimit attached just before ``trainer.run()``.

    Built from train.yaml's own list, so the benchmark runs exactly the shipped steps plus the budget. The
    network and its record are saved when the trainer stops (MONAI's ``save_final``: on the budget's
    ``terminate`` too) as ``ckpt_dir/final_model.pt``: the weights the budget bought, chosen by nothing.
    """
    steps = list(ConfigParser.load_config_file(str(REPO_ROOT / "configs" / "train.yaml"))["training"])
    limits = [
        f"$@train#trainer.add_event_handler(ignite.engine.Events.{event}, @wall_time_limit)"
        for event in ("ITERATION_COMPLETED", "EPOCH_COMPLETED")
    ]
    overlay = {
        "wall_time_budget_seconds": seconds,
        "wall_time_limit": "$ignite.handlers.TimeLimit(@wall_time_budget_seconds)",  # its clock starts here
        "final_model_saver": {
            "_target_": "bundle.training.workflow.ResumableCheckpointSaver",
            "save_dir": "@ckpt_dir",
            "save_dict": {"model": "@network", "model_record": "@model_plan"},
            "save_final": True,
            "final_filename": FINAL_MODEL,
        },
        "training": [*steps[:-1], *limits, "$@final_model_saver.attach(@train#trainer)", steps[-1]],
    }
    path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    return path


def _datalist(dataset_dir: str, val_case: str, work_dir: Path) -> tuple[Path, int]:
    """A datalist with one fold per labelled case (``python -m bundle prepare``) and the fold of ``val_case``."""
    out = work_dir / "datalist.json"
    cases = sorted(p.name for p in Path(dataset_dir).iterdir() if p.is_dir())
    _run(
        [sys.executable, "-m", "bundle", "prepare", "--dataset_dir", dataset_dir, "--output", str(out),
         "--folds", str(len(cases)), "--seed", "42", "--holdout_fraction", "0"],
        work_dir / "prepare.log", threads=None,
    )  # fmt: skip
    items = json.loads(out.read_text())["training"]
    folds = [int(i["fold"]) for i in items if i["case_id"] == val_case]
    if len(folds) != 1:
        raise SystemExit(f"{dataset_dir}: no labelled case {val_case!r} (cases: {', '.join(cases)})")
    if sum(int(i["fold"]) == folds[0] for i in items) != 1:
        raise SystemExit(f"{out}: the fold of {val_case} holds other cases too")
    return out, folds[0]


def _run(cmd: list[str], log: Path, threads: int | None) -> float:
    """Run ``cmd`` with its output in ``log``; the wall seconds it took. A failure stops the benchmark."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log}")
    return time.perf_counter() - start


def _engine_seconds(log: Path, engine: str) -> float | None:
    """The last 'Engine run finished. Time taken: H:M:S' of ``engine`` in ``log`` (Ignite's own timer)."""
    times = re.findall(rf"{engine} - INFO - Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)", log.read_text())
    return None if not times else int(times[-1][0]) * 3600 + int(times[-1][1]) * 60 + float(times[-1][2])


def _training_summary(train_dir: Path, log: Path) -> dict[str, Any]:
    """Iterations, epochs and the best validation from the run's per-epoch CSV and log."""
    text = log.read_text()
    iterations = [int(m) for m in re.findall(r"Iter: (\d+)/\d+ -- train_loss", text)]
    epochs = [int(m) for m in re.findall(r"Epoch: (\d+)/\d+, Iter", text)]
    epoch_length = re.findall(r"Iter: \d+/(\d+) -- train_loss", text)
    steps = 0 if not iterations else (max(epochs) - 1) * int(epoch_length[-1]) + iterations[-1]
    rows = []
    csv_file = train_dir / "metrics_per_epoch.csv"
    if csv_file.is_file():
        with csv_file.open() as f:
            rows = list(csv.DictReader(f))
    rows = [r for r in rows if r.get("val_mean_dice")]  # epochs without a validation have empty cells
    best = max(rows, key=lambda r: float(r["val_mean_dice"]), default=None)
    return {
        "steps": steps,
        "validations": len(rows),
        "best_val_mean_dice": None if best is None else float(best["val_mean_dice"]),
        "best_epoch": None if best is None else int(best["epoch"]),
        "trainer_seconds": _engine_seconds(log, "SupervisedTrainer"),
    }


def _scores(eval_dir: Path) -> dict[str, float]:
    """Dice and HD95 per region of the scored case (``python -m bundle evaluate``: metrics.csv, a row per region)."""
    with (eval_dir / "metrics.csv").open() as f:
        rows = {row["region"]: row for row in csv.DictReader(f)}
    return {f"{m}_{r}": float(rows[r][m]) for m in ("dice", "hd95") for r in REGIONS}


def _pipeline(name: str, args: argparse.Namespace, datalist: Path, fold: int, overlay: Path, results: dict) -> None:
    """Train one recipe within the budget, segment the validation case without TTA, score it."""
    work = Path(args.work_dir).resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    configs = [str(REPO_ROOT / c) for c in RECIPES[name]] + [str(overlay)]
    train_log = work / "train.log"
    train_cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs),
        "--bundle_root", str(REPO_ROOT), "--datalist", str(datalist), "--fold", str(fold),
        "--output_dir", str(work / "train"), "--ckpt_dir", str(work / "models"),
    ]  # fmt: skip
    if name == "cpu" and args.cpu_epochs:
        train_cmd += ["--epochs", str(args.cpu_epochs)]
    checkpoint = work / "models" / FINAL_MODEL
    try:
        if args.reuse_training and checkpoint.is_file():  # score a finished training again
            record = {"config_file": RECIPES[name], "training_wall_seconds": None}
        else:
            wall = _run(train_cmd, train_log, args.threads)
            record = {"config_file": RECIPES[name], "training_wall_seconds": round(wall, 1)}
        if name == "cpu" and args.cpu_epochs:
            record["epochs"] = args.cpu_epochs
        record.update(_training_summary(work / "train", train_log))
        # scored: the final weights, not the best validation's, because the validation case is the scored case
        case_dir = Path(args.dataset_dir).resolve() / args.val_case
        infer_log = work / "infer.log"
        infer_cmd = [
            sys.executable, "-m", "bundle", "infer", str(case_dir), "--output", str(work / "inference"),
            "--checkpoint", str(checkpoint), "--tta", "false", "--overwrite", "true",
        ]  # fmt: skip
        record["infer_wall_seconds"] = round(_run(infer_cmd, infer_log, args.threads), 1)
        record["infer_case_seconds"] = _engine_seconds(infer_log, "SupervisedEvaluator")
        truth = work / "truth"  # the case's segmentation alone: evaluate scores every NIfTI of --truth
        truth.mkdir(exist_ok=True)
        for seg in case_dir.glob("*_seg.nii.gz"):
            (truth / seg.name).unlink(missing_ok=True)
            (truth / seg.name).symlink_to(seg)
        eval_cmd = [
            sys.executable, "-m", "bundle", "evaluate", "--pred", str(work / "inference"), "--truth", str(truth),
            "--output_dir", str(work / "evaluation"),
        ]  # fmt: skip
        _run(eval_cmd, work / "evaluate.log", args.threads)
        record.update(_scores(work / "evaluation"))
    except Exception as error:  # the other pipeline goes on; the error is reported with the results
        record = {"config_file": RECIPES[name], "error": str(error)}
    results[name] = record
    print(f"{name}: {json.dumps(record)}", flush=True)


def _speed(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Seconds per case without TTA of each recipe's final model, one process at a time, recipes alternating."""
    case_dir = Path(args.dataset_dir).resolve() / args.val_case
    threads = args.speed_threads or os.cpu_count() or 1
    runs: dict[str, dict[str, list[float]]] = {n: {"case_seconds": [], "wall_seconds": []} for n in names}
    for round_index in range(args.speed_rounds):
        for name in names:
            work = Path(args.work_dir).resolve() / name
            checkpoint = work / "models" / FINAL_MODEL
            if not checkpoint.is_file():
                continue
            log = work / f"speed_{round_index}.log"
            cmd = [
                sys.executable, "-m", "bundle", "infer", str(case_dir), "--output", str(work / "speed"),
                "--checkpoint", str(checkpoint), "--tta", "false", "--overwrite", "true",
            ]  # fmt: skip
            runs[name]["wall_seconds"].append(round(_run(cmd, log, threads), 1))
            runs[name]["case_seconds"].append(_engine_seconds(log, "SupervisedEvaluator"))
            print(f"speed {name} round {round_index}: {runs[name]}", flush=True)
    return {
        name: {
            **r,
            "threads": threads,
            "median_case_seconds": statistics.median(r["case_seconds"]) if r["case_seconds"] else None,
        }
        for name, r in runs.items()
    }


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell: rounded numbers, '-' for missing."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison as a Markdown table, one row per recipe."""
    head = ["recipe", "training s (Ignite)", "steps", "validations", "best val Dice (epoch)"]
    head += [f"Dice {r}" for r in REGIONS] + [f"HD95 {r} (mm)" for r in REGIONS] + ["infer s/case (no TTA)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        best = f"{_fmt(r['best_val_mean_dice'])} ({_fmt(r['best_epoch'])})"
        cells = [name, _fmt(r["trainer_seconds"], 0), _fmt(r["steps"]), _fmt(r["validations"]), best]
        cells += [_fmt(r[f"dice_{g}"]) for g in REGIONS] + [_fmt(r[f"hd95_{g}"], 1) for g in REGIONS]
        cells.append(_fmt(r["infer_case_seconds"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the arguments, run the pipelines side by side, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default=str(REPO_ROOT.parent / "shared" / "brats_samples"))
    parser.add_argument("--val_case", default="BraTS2021_00006", help="the labelled case held out for validation")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of each training")
    parser.add_argument(
        "--cpu_epochs", type=int, default=None, help="the CPU recipe's epochs (default: configs/cpu.yaml's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of each pipeline")
    parser.add_argument("--recipes", default="cpu,default", help="comma-separated: cpu, default")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "runs" / "benchmark_cpu_recipe"))
    parser.add_argument(
        "--reuse_training", action="store_true", help="skip a recipe's training when --work_dir holds its final model"
    )
    parser.add_argument("--speed_rounds", type=int, default=0, help="runs of each final model for seconds per case")
    parser.add_argument("--speed_threads", type=int, default=None, help="threads of those runs (default: all cores)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown or not names:
        raise SystemExit(f"--recipes: unknown {unknown}; choose from {sorted(RECIPES)}")
    if not Path(args.dataset_dir).is_dir():
        raise SystemExit(f"--dataset_dir {args.dataset_dir}: not a folder")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    datalist, fold = _datalist(args.dataset_dir, args.val_case, work)
    overlay = _budget_overlay(work / "wall_time_budget.yaml", round(args.minutes * 60))
    results: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(target=_pipeline, args=(n, args, datalist, fold, overlay, results)) for n in names
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {n: results[n] for n in names}
    load_after_training = os.getloadavg()
    speed = _speed(args, names) if args.speed_rounds else None
    load = os.getloadavg()
    report = {
        "command": "python " + " ".join(sys.argv),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_minutes": args.minutes,
        "threads_each": args.threads,
        "val_case": args.val_case,
        "cpu_count": os.cpu_count(),
        "load_average_after_scoring": [round(x, 2) for x in load_after_training],
        "load_average_at_end": [round(x, 2) for x in load],
        "platform": platform.platform(),
        "results": results,
        "seconds_per_case_no_tta": speed,
    }
    print(markdown_table(results))
    text = json.dumps(report, indent=2)
    (work / "results.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
