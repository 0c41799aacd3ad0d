"""One demo-scale run per 2-D method (M1, M2 with its gate, M3) through the commands users type.

For each method, in fresh processes, exactly as a user runs it (docs/benchmarks/methods_2d.md, "The methods at
demo scale"):

1. ``python -m monai.bundle run training --config_file "['configs/train.yaml','configs/demo.yaml',
   'configs/train_2d.yaml','configs/variants/<method>.yaml']"`` on the demo phantoms, with the demo's
   slice size and width for the method and a short schedule (``--slices_per_volume``, ``--epochs``);
   for M2 its gate first, the same way with ``configs/train_gate.yaml``, then the segmenter with
   ``--gate_checkpoint`` (M2 is then one model, gate and segmenter, docs/reference/pipeline_2d.md);
2. ``python -m bundle infer`` on the held-out phantom with the checkpoint's own inference recipe (no
   flag: M2's model runs its gate itself);
3. ``python -m bundle evaluate`` of that segmentation against the held-out truth (Dice and official
   HD95 per region; NCR and ED too for M3, as its paper reports them).

Prints a Markdown table and writes ``results.json`` in ``--output``. Every figure is read from what the
commands wrote (``metrics_per_epoch.csv``, the checkpoint, ``summary.json``); nothing is re-implemented.

    OMP_NUM_THREADS=1 python scripts/benchmark_methods_2d.py --output runs/methods_2d

Forward cost (``--forward_cost``): what M2's gate costs against what it can save at the papers' sizes,
the segmenter (M2's network at its full width) and the gate (``SliceGateClassifier``) each built from its
config stack, one forward pass of 16 slices of 256 x 256 (no gradient), the two alternated ``--repeats``
times in this process, the median of each. A gate saves time when the fraction of slices it passes is
below 1 - gate / segmenter. Writes ``forward_cost.json``.

    OMP_NUM_THREADS=1 python scripts/benchmark_methods_2d.py --forward_cost --output runs/methods_2d
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from bundle.data import generate_demo_dataset
from bundle.plan import network_from_spec, read_plan

ROOT = Path(__file__).resolve().parents[1]
#: The demo overlay goes before train_2d.yaml: its 3-D patch and network width are train.yaml's keys,
#: which the 2-D file and the variant then replace; its data, schedule and cache stay.
STACK = ["configs/train.yaml", "configs/demo.yaml", "configs/train_2d.yaml"]
DEMO_WIDTH = [16, 32, 64, 128, 256]
#: (label, top config file, overrides): the demo phantoms have 2.4 mm voxels, so each method's slice is
#: scaled to the field of view of its real size (M1 240 -> 96, M2 256 -> 96, M3 128 -> 64), at half
#: the papers' widths; the gate keeps the paper's ResNet-50 and M2's slice.
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "m1": ("M1 LA-ResUNet", "configs/variants/m1_la_resunet.yaml", {"patch_size": [96, 96]}),
    "m2": ("M2 ResUNet + Tversky", "configs/variants/m2_resunet_tversky.yaml", {"patch_size": [96, 96]}),
    "gate": ("M2's gate (ResNet-50)", "configs/train_gate.yaml", {"patch_size": [96, 96]}),
    "m3": (
        "M3 ResSE-LKA-UNet",
        "configs/variants/m3_resse_lka_unet.yaml",
        {"patch_size": [64, 64], "subset_fraction": 1.0},  # 10 % of 16 phantoms would be one case
    ),
}
REGIONS = {"m1": ["WT", "TC", "ET"], "m2": ["WT"], "m3": ["WT", "TC", "ET", "NCR", "ED"]}
GATE_METRICS = ["val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1"]


def shown(command: list[str]) -> str:
    """The command as a user types it in a POSIX shell (lists in double quotes)."""
    words = ["python", *command]
    return " ".join(f'"{w}"' if any(c in w for c in "[]' ") else w for w in words)


def run(command: list[str], log: Path) -> float:
    """Run ``python <command>`` in the bundle root, output to ``log``; return its wall seconds, stop on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shown(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{log}: the command failed (exit {result.returncode}); last lines:\n" + log.read_text()[-3000:])
    return seconds


def flag_value(value: Any) -> str:
    """A value as the command line takes it (lists without spaces, as users type them)."""
    return json.dumps(value).replace(" ", "") if isinstance(value, list) else str(value)


def train_command(
    method: str, out: Path, demo_dir: Path, args: argparse.Namespace, gate: Path | None = None
) -> list[str]:
    """The ``python -m monai.bundle run training`` arguments of one method's demo-scale run (M2: with ``gate``)."""
    _, top, sizes = METHODS[method]
    files = ",".join(f"'{f}'" for f in [*STACK, top])
    settings: dict[str, Any] = {
        "bundle_root": ".",
        "dataset_dir": demo_dir,
        "output_dir": out / "train",
        "ckpt_dir": out / "models",
        **sizes,
        "window": sizes["patch_size"],  # the slice size: demo.yaml's window is a 3-D one
        "epochs": args.epochs,
        "val_interval": args.val_interval,
        "slices_per_volume": args.slices_per_volume,
        "tumour_slice_ratio": args.tumour_slice_ratio,
    }
    if method != "gate":
        settings["network_factory#channels"] = DEMO_WIDTH
    if gate is not None:
        settings["gate_checkpoint"] = gate
    command = ["-m", "monai.bundle", "run", "training", "--config_file", f"[{files}]"]
    for key, value in settings.items():
        command += [f"--{key}", flag_value(value)]
    return command


def epoch_rows(out: Path) -> list[dict[str, str]]:
    """The training run's ``metrics_per_epoch.csv`` rows that hold a validation."""
    with (out / "train" / "metrics_per_epoch.csv").open() as f:
        return [row for row in csv.DictReader(f) if row.get("val_loss") or row.get("val_auc")]


def best_validation(rows: list[dict[str, str]], key: str) -> tuple[float, int]:
    """The best value of ``key`` over the validations and its epoch (the checkpoint kept by the run)."""
    best = max(rows, key=lambda row: float(row[key]))
    return float(best[key]), int(best["epoch"])


def held_out_scores(evaluation: Path, regions: list[str]) -> dict[str, dict[str, float]]:
    """Dice and HD95 per region from ``python -m bundle evaluate``'s ``summary.json`` (one case: the mean)."""
    summary = json.loads((evaluation / "summary.json").read_text())
    return {r: {"dice": summary[r]["dice"]["mean"], "hd95": summary[r]["hd95"]["mean"]} for r in regions}


def engine_seconds(log: Path) -> float:
    """The inference engine's own time (Ignite's "Engine run finished" line), without interpreter and model start."""
    finished = [line for line in log.read_text().splitlines() if "Engine run finished. Time taken:" in line]
    if not finished:
        sys.exit(f"{log}: no 'Engine run finished' line; did the inference run?")
    hours, minutes, seconds = finished[-1].rsplit("Time taken:", 1)[1].strip().split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def segment_and_score(method: str, out: Path, case: Path, truth: Path, name: str, extra: list[str]) -> dict[str, Any]:
    """``python -m bundle infer`` on the held-out case with the checkpoint's recipe, then ``evaluate``."""
    inference, evaluation = out / name, out / f"{name}_evaluation"
    infer = ["-m", "bundle", "infer", str(case), "--output", str(inference)]
    infer += ["--checkpoint", str(out / "models" / "model.pt"), "--overwrite", "true", *extra]
    log = out / "logs" / f"{name}.log"
    infer_seconds = run(infer, log)
    evaluate = ["-m", "bundle", "evaluate", "--pred", str(inference), "--truth", str(truth)]
    evaluate += ["--output_dir", str(evaluation), "--include_disjoint", str(method == "m3").lower()]
    run(evaluate, out / "logs" / f"{name}_evaluate.log")
    return {
        "inference_seconds": infer_seconds,
        "engine_seconds": engine_seconds(log),
        "segmentation": str(next(inference.glob("*_seg.nii.gz"))),
        "held_out": held_out_scores(evaluation, REGIONS[method]),
    }


def forward_cost(output: Path, repeats: int, slices: int = 16, size: int = 256) -> dict[str, Any]:
    """Median seconds of one no-gradient forward pass of ``slices`` slices, M2's segmenter vs its gate."""
    networks = {}
    for name, top in (("segmenter", METHODS["m2"][1]), ("gate", METHODS["gate"][1])):
        parser = ConfigParser()
        parser.read_config([str(ROOT / f) for f in ["configs/train.yaml", "configs/train_2d.yaml", top]])
        parser["bundle_root"] = str(ROOT)
        networks[name] = parser.get_parsed_content("network_def").eval()
    batch = torch.randn(slices, 4, size, size)
    times: dict[str, list[float]] = {name: [] for name in networks}
    with torch.no_grad():
        for network in networks.values():  # warm-up: first-call allocations
            network(batch)
        for _ in range(repeats):
            for name, network in networks.items():
                start = time.perf_counter()
                network(batch)
                times[name].append(time.perf_counter() - start)
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "slices": slices,
        "size": [size, size],
        "threads": torch.get_num_threads(),
        "seconds": times,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "params_M": {name: sum(p.numel() for p in n.parameters()) / 1e6 for name, n in networks.items()},
    }
    median = result["median_s"]
    result["break_even_fraction"] = 1.0 - median["gate"] / median["segmenter"]
    output.mkdir(parents=True, exist_ok=True)
    (output / "forward_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"one forward pass of {slices} slices of {size} x {size}, median of {repeats}: "
        f"M2 segmenter {median['segmenter']:.2f} s ({result['params_M']['segmenter']:.1f} M parameters), "
        f"gate {median['gate']:.2f} s ({result['params_M']['gate']:.1f} M); the gate saves time when it passes "
        f"less than {result['break_even_fraction']:.0%} of the slices"
    )
    return result


def main() -> None:
    """Train, segment and score each method in turn; print the table, write ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "methods_2d")
    parser.add_argument("--demo_dir", type=Path, default=None, help="default: OUTPUT/demo (a private copy)")
    parser.add_argument("--methods", default="m1,m2,m3", help="comma-separated: m1, m2 (its gate first), m3")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--val_interval", type=int, default=5)
    parser.add_argument("--slices_per_volume", type=int, default=8)
    parser.add_argument("--tumour_slice_ratio", type=float, default=0.5)
    parser.add_argument("--forward_cost", action="store_true", help="only the gate's and segmenter's forward cost")
    parser.add_argument("--report", action="store_true", help="print the table of OUTPUT/results.json again")
    parser.add_argument("--repeats", type=int, default=5, help="forward passes of each network (--forward_cost)")
    args = parser.parse_args()
    output = args.output.resolve()
    if args.forward_cost:
        forward_cost(output, args.repeats)
        return
    if args.report:  # the engine times are re-read from the inference logs (results.json before they were kept)
        results = json.loads((output / "results.json").read_text())
        for method, entry in results["runs"].items():
            for name, scores in (("inference", entry), ("inference_gated", entry.get("gated"))):
                if scores and "held_out" in scores:
                    scores["engine_seconds"] = engine_seconds(output / method / "logs" / f"{name}.log")
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(markdown(results))
        return
    demo_dir = generate_demo_dataset((args.demo_dir or output / "demo").resolve())
    truth = demo_dir / "heldout_truth"
    (case_id,) = [p.name.removesuffix("_seg.nii.gz") for p in truth.glob("*_seg.nii.gz")]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - {"m1", "m2", "m3"}
    if unknown:
        sys.exit(f"--methods: {', '.join(sorted(unknown))} unknown; give m1, m2, m3")
    if "m2" in methods:  # the gate first: the segmenter's training builds it into M2's model
        methods.insert(methods.index("m2"), "gate")

    results: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "held_out_case": case_id,
        "runs": {},
    }
    for method in methods:
        label, top, _ = METHODS[method]
        out = output / method
        gate = output / "gate" / "models" / "gate.pt" if method == "m2" else None
        command = train_command(method, out, demo_dir, args, gate)
        entry: dict[str, Any] = {"label": label, "config": top, "train_command": shown(command)}
        entry["train_seconds"] = run(command, out / "logs" / "train.log")
        checkpoint = out / "models" / ("gate.pt" if method == "gate" else "model.pt")
        record = read_plan(checkpoint)
        entry["params_M"] = sum(p.numel() for p in network_from_spec(record["network"]).parameters()) / 1e6
        entry["slice_size"] = record["patch_size"]
        entry["recipe"] = record.get("inference_recipe")
        rows = epoch_rows(out)
        if method == "gate":
            entry["best_val_auc"], entry["best_epoch"] = best_validation(rows, "val_auc")
            best = next(row for row in rows if int(row["epoch"]) == entry["best_epoch"])
            entry["val_at_best"] = {k: float(best[k]) for k in GATE_METRICS}
        else:
            entry["best_val_mean_dice"], entry["best_epoch"] = best_validation(rows, "val_mean_dice")
            best = next(row for row in rows if int(row["epoch"]) == entry["best_epoch"])
            entry["val_at_best"] = {r: float(best[f"val_dice_{r}"]) for r in REGIONS[method] if f"val_dice_{r}" in best}
            entry.update(segment_and_score(method, out, demo_dir / case_id, truth, "inference", []))
        results["runs"][method] = entry
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """The table docs/benchmarks/methods_2d.md records: one row per segmentation run (M2 with and without its gate)."""
    lines = [
        "| run | slice | params (M) | best val mean Dice (epoch) | held-out Dice WT / TC / ET | "
        "held-out HD95 mm WT / TC / ET | training s | inference s: engine (command) |",
        "|---|---|---:|---|---|---|---:|---:|",
    ]

    def cells(scores: dict[str, dict[str, float]], metric: str, digits: int) -> str:
        return " / ".join(f"{scores[r][metric]:.{digits}f}" if r in scores else "-" for r in ("WT", "TC", "ET"))

    for method, run_ in results["runs"].items():
        if method == "gate":
            continue
        size = "x".join(map(str, run_["slice_size"]))
        val = f"{run_['best_val_mean_dice']:.3f} ({run_['best_epoch']})"
        rows = [(run_["label"], run_)]
        if "gated" in run_:
            rows.append((run_["label"] + " + gate", run_["gated"]))
        for label, scores in rows:
            dice, hd95 = cells(scores["held_out"], "dice", 3), cells(scores["held_out"], "hd95", 1)
            inference = f"{scores['engine_seconds']:.1f} ({scores['inference_seconds']:.0f})"
            seconds = f"{run_['train_seconds']:.0f} | {inference}"
            lines.append(f"| {label} | {size} | {run_['params_M']:.2f} | {val} | {dice} | {hd95} | {seconds} |")
    if "m3" in results["runs"]:
        m3 = results["runs"]["m3"]["held_out"]
        lines.append("")
        lines.append(
            f"M3 per class on the held-out case: Dice NCR {m3['NCR']['dice']:.3f}, ED {m3['ED']['dice']:.3f}, "
            f"ET {m3['ET']['dice']:.3f}; HD95 NCR {m3['NCR']['hd95']:.1f}, ED {m3['ED']['hd95']:.1f}, "
            f"ET {m3['ET']['hd95']:.1f} mm"
        )
    if "gate" in results["runs"]:
        gate = results["runs"]["gate"]
        val = gate["val_at_best"]
        lines.append("")
        lines.append(
            "| gate | slice | params (M) | ROC AUC (epoch) | accuracy | precision | recall | F1 | training s |"
        )
        lines.append("|---|---|---:|---|---:|---:|---:|---:|---:|")
        lines.append(
            f"| {gate['label']} | {'x'.join(map(str, gate['slice_size']))} | {gate['params_M']:.2f} | "
            f"{gate['best_val_auc']:.3f} ({gate['best_epoch']}) | {val['val_accuracy']:.3f} | "
            f"{val['val_precision']:.3f} | {val['val_recall']:.3f} | {val['val_f1']:.3f} | "
            f"{gate['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    torch.set_num_threads(1)
    main()
