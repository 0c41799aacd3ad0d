"""Decide a training recipe's settings by leave-one-case-out cross-validation, through the users' commands.

Every labelled case of ``--dataset_dir`` is held out once (with ../shared/brats_samples: 3 folds of 2
training cases and 1 held-out case), for each seed of ``--seeds``. Each fold trains with
``python -m monai.bundle run training --config_file <--configs> --datalist ... --fold k --seed s`` plus the
trial's ``--set KEY=VALUE`` overrides, on a fixed step budget (the recipe's). The held-out case is the
run's validation case, but validation chooses nothing: the recipe keeps the final weights
(``models/model.pt``) and their average over the last epochs (``models/model_average.pt``), so the
held-out case never influences the weights that are scored.

Each trained model then segments its held-out case once per scoring variant (``--variants``: which
weights, and ``python -m bundle infer`` options such as ``--tta true`` or ``--window [160,192,160]``),
and ``python -m bundle evaluate`` scores it. The report gives, per variant, the mean and standard
deviation over folds and seeds of Dice and HD95 per region (WT / TC / ET), the mean Dice over the three
regions, and the false-positive volume (predicted WT outside the true WT, in ml), with every fold's row
in the JSON.

    python scripts/tune_recipe.py --dataset_dir ../shared/brats_samples --seeds 0 1 --parallel 3 \\
        --json docs/benchmarks/cpu_recipe_cv.json
    python scripts/tune_recipe.py --name sampling31 --set crop_pos=3 --set crop_neg_in_brain=false ...
    python scripts/tune_recipe.py --score_only ...   # score finished trainings again (new variants)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("WT", "TC", "ET")
#: Scoring variants: the weights file in the fold's models/ and the options of `python -m bundle infer`.
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "final": {"weights": "model.pt", "options": {"tta": "false"}},
    "average": {"weights": "model_average.pt", "options": {"tta": "false"}},
    "average, TTA": {"weights": "model_average.pt", "options": {"tta": "true"}},
    "average, whole-brain window": {
        "weights": "model_average.pt",
        "options": {"tta": "false", "window": "[160,192,160]"},
    },
    "average, confident components 0.8": {
        "weights": "model_average.pt",
        "options": {"tta": "false", "remove_unconfident_components": "true", "component_min_prob": "0.8"},
    },
    "average, confident components 0.9": {
        "weights": "model_average.pt",
        "options": {"tta": "false", "remove_unconfident_components": "true", "component_min_prob": "0.9"},
    },
}


def _run(cmd: list[str], log: Path, threads: int) -> float:
    """Run ``cmd`` from the repository with its output in ``log``; its wall seconds. A failure raises."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log}")
    return time.perf_counter() - start


def labelled_cases(dataset_dir: Path) -> list[str]:
    """The labelled cases of the folder as the bundle discovers them (its layouts), sorted."""
    from bundle.data import select_cases

    items = select_cases(dataset_dir, labelled=True, progress=False, decode=False)
    return sorted(str(i["case_id"]) for i in items if i.get("label"))


def one_fold_per_case(dataset_dir: Path, work: Path) -> tuple[Path, dict[str, int]]:
    """A datalist with one fold per labelled case (``python -m bundle prepare``) and each case's fold."""
    out = work / "datalist.json"
    cases = labelled_cases(dataset_dir)
    if len(cases) < 2:
        raise SystemExit(f"{dataset_dir}: leave-one-out needs at least 2 labelled cases, found {len(cases)}")
    cmd = [sys.executable, "-m", "bundle", "prepare", "--dataset_dir", str(dataset_dir), "--output", str(out)]
    _run([*cmd, "--folds", str(len(cases)), "--seed", "42", "--holdout_fraction", "0"], work / "prepare.log", 1)
    items = json.loads(out.read_text())["training"]
    folds = {str(i["case_id"]): int(i["fold"]) for i in items}
    if sorted(folds.values()) != list(range(len(cases))):
        raise SystemExit(f"{out}: expected one case per fold, got {folds}")
    return out, folds


def train(args: argparse.Namespace, datalist: Path, fold: int, seed: int, run: Path) -> dict[str, Any]:
    """One fold's training through ``python -m monai.bundle run training`` (skipped if its models exist)."""
    models = run / "models"
    if args.score_only or ((models / "model.pt").is_file() and (models / "model_average.pt").is_file()):
        return {"training_wall_seconds": None}
    configs = [str(REPO_ROOT / c) for c in args.configs]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs),
        "--bundle_root", str(REPO_ROOT), "--datalist", str(datalist), "--fold", str(fold), "--seed", str(seed),
        "--output_dir", str(run / "train"), "--ckpt_dir", str(models),
    ]  # fmt: skip
    for setting in args.set:
        key, value = setting.split("=", 1)
        cmd += [f"--{key}", value]
    run.mkdir(parents=True, exist_ok=True)
    return {"training_wall_seconds": round(_run(cmd, run / "train.log", args.threads), 1)}


def score(args: argparse.Namespace, case_dir: Path, run: Path, name: str, variant: dict[str, Any]) -> dict[str, Any]:
    """Segment the held-out case with one variant (``python -m bundle infer``) and score it (``bundle evaluate``)."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out = run / "scores" / slug
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "bundle", "infer", str(case_dir), "--output", str(out / "pred"),
        "--checkpoint", str(run / "models" / variant["weights"]), "--overwrite", "true",
    ]  # fmt: skip
    for key, value in variant["options"].items():
        cmd += [f"--{key}", str(value)]
    seconds = _run(cmd, out / "infer.log", args.threads)
    truth = out / "truth"  # the case's segmentation alone: evaluate scores every label map of --truth
    truth.mkdir(exist_ok=True)
    for seg in case_dir.glob("*seg.nii*"):
        (truth / seg.name).unlink(missing_ok=True)
        (truth / seg.name).symlink_to(seg.resolve())
    evaluate = [sys.executable, "-m", "bundle", "evaluate", "--pred", str(out / "pred"), "--truth", str(truth)]
    _run([*evaluate, "--output_dir", str(out / "evaluation"), "--lesion_wise", "false"], out / "evaluate.log", 1)
    with (out / "evaluation" / "metrics.csv").open() as f:
        rows = {row["region"]: row for row in csv.DictReader(f)}
    result: dict[str, Any] = {"infer_wall_seconds": round(seconds, 1)}
    for region in REGIONS:
        result[f"dice_{region}"] = float(rows[region]["dice"])
        result[f"hd95_{region}"] = float(rows[region]["hd95"])
        result[f"fp_ml_{region}"] = float(rows[region]["volume_false_positive"]) / 1000.0
    result["dice_mean"] = statistics.fmean(result[f"dice_{r}"] for r in REGIONS)
    return result


def fold_job(args: argparse.Namespace, datalist: Path, case: str, fold: int, seed: int, work: Path) -> list[dict]:
    """Train one (case, seed) fold, then score every variant on its held-out case."""
    run = work / f"seed{seed}" / case
    record = {"held_out": case, "fold": fold, "seed": seed, **train(args, datalist, fold, seed, run)}
    print(f"trained {case} seed {seed}: {record}", flush=True)
    rows = []
    for name, variant in args.variants.items():
        try:
            case_dir = Path(args.case_dirs[case])
            rows.append({**record, "variant": name, **score(args, case_dir, run, name, variant)})
        except Exception as error:  # the other variants and folds go on; the error is in the report
            rows.append({**record, "variant": name, "error": str(error)})
        print(f"scored {case} seed {seed} {name}: {rows[-1]}", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per variant: n, and mean / sd over folds and seeds of every score."""
    keys = ["dice_mean", *(f"{m}_{r}" for m in ("dice", "hd95", "fp_ml") for r in REGIONS)]
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        done = [r for r in rows if r["variant"] == name and "error" not in r]
        entry: dict[str, Any] = {"n": len(done), "failed": sum(r["variant"] == name and "error" in r for r in rows)}
        for key in keys:
            values = [r[key] for r in done]
            entry[key] = {
                "mean": statistics.fmean(values) if values else None,
                "sd": statistics.stdev(values) if len(values) > 1 else None,
            }
        out[name] = entry
    return out


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """One row per variant: mean +/- sd of Dice per region, mean Dice, HD95 per region, FP volume of WT."""

    def cell(stat: dict[str, Any], digits: int) -> str:
        if stat["mean"] is None:
            return "-"
        sd = "" if stat["sd"] is None else f" +/- {stat['sd']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}{sd}"

    head = ["variant", "n", *(f"Dice {r}" for r in REGIONS), "mean Dice", *(f"HD95 {r} (mm)" for r in REGIONS)]
    head.append("false WT (ml)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        cells = [name, str(s["n"]), *(cell(s[f"dice_{r}"], 3) for r in REGIONS), cell(s["dice_mean"], 3)]
        cells += [cell(s[f"hd95_{r}"], 1) for r in REGIONS] + [cell(s["fp_ml_WT"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the arguments, run the folds (``--parallel`` at a time), print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default=str(REPO_ROOT.parent / "shared" / "brats_samples"))
    parser.add_argument("--configs", nargs="+", default=["configs/train.yaml", "configs/cpu.yaml"])
    parser.add_argument("--set", action="append", default=[], help="a training override KEY=VALUE (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--name", default="candidate", help="the trial's folder under --work_dir")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "runs" / "tune_recipe"))
    parser.add_argument("--variants", default=None, help="a JSON file of scoring variants (default: the built-in)")
    parser.add_argument("--parallel", type=int, default=2, help="folds trained and scored at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of each process")
    parser.add_argument("--score_only", action="store_true", help="score existing trainings, train nothing")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    args.variants = json.loads(Path(args.variants).read_text()) if args.variants else DEFAULT_VARIANTS
    bad = [s for s in args.set if "=" not in s]
    if bad:
        raise SystemExit(f"--set {bad[0]}: expected KEY=VALUE")
    dataset_dir = Path(args.dataset_dir).resolve()
    if not dataset_dir.is_dir():
        raise SystemExit(f"--dataset_dir {dataset_dir}: not a folder")
    args.dataset_dir = str(dataset_dir)
    work = Path(args.work_dir).resolve() / args.name
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    datalist, folds = one_fold_per_case(dataset_dir, work)
    items = json.loads(datalist.read_text())["training"]
    args.case_dirs = {str(i["case_id"]): str(Path(i["label"]).parent) for i in items}
    jobs = [(case, fold, seed) for seed in args.seeds for case, fold in folds.items()]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = list(pool.map(lambda job: fold_job(args, datalist, *job, work), jobs))
    rows = [row for fold_rows in results for row in fold_rows]
    summary = summarise(rows)
    report = {
        "command": "python " + " ".join(sys.argv),
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "configs": args.configs,
        "overrides": args.set,
        "seeds": args.seeds,
        "cases": sorted(folds),
        "threads_each": args.threads,
        "parallel": args.parallel,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "variants": args.variants,
        "summary": summary,
        "folds": rows,
    }
    print(markdown_table(summary))
    text = json.dumps(report, indent=2)
    (work / "results.json").write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
