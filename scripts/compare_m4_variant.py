"""The M4 variant against the default training on the demo data, one run after the other in one process.

Both runs go through ``monai.bundle``'s ``ConfigWorkflow`` with ``configs/demo.yaml``, so the demo
phantoms and the demo schedule apply to both (validation every 5 epochs, early stopping); only the
config stack differs (the variant after demo.yaml, at its old demo width [16, 32, 64, 128, 256]):

    default: ['configs/train.yaml', 'configs/demo.yaml']
    m4:      ['configs/train.yaml', 'configs/demo.yaml', 'configs/variants/m4_resunet_ds.yaml']

For each run the report holds the best validation mean Dice, the per-region Dice (WT, TC, ET) of the
validation at which it was reached, the epochs trained, the wall time and the CPU time (this
process, all threads, plus DataLoader worker processes once they have exited). A JSON file and a
markdown table (plus one of the Dice at every validation, the runs side by side) are written to
``--work_dir`` and printed; ``partial.json`` is rewritten after every validation, so an interrupted
comparison still shows how far each run got.

    OMP_NUM_THREADS=1 python scripts/compare_m4_variant.py            # runs/compare_m4/
    python scripts/compare_m4_variant.py --report runs/compare_m4/partial.json   # tables so far
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

RUNS: dict[str, list[str]] = {
    "default": ["configs/train.yaml", "configs/demo.yaml"],
    "m4": ["configs/train.yaml", "configs/demo.yaml", "configs/variants/m4_resunet_ds.yaml"],
}
#: the variant's network at a demo width comparable to demo.yaml's (the variant file holds the paper's)
RUN_OVERRIDES: dict[str, dict[str, Any]] = {"m4": {"network_factory#channels": [16, 32, 64, 128, 256]}}
REGIONS = ("WT", "TC", "ET")


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's exited and waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop_workers(loader: Any) -> None:
    """Shut down a DataLoader's persistent worker processes so their CPU time is accounted for."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _finite(value: Any) -> float | None:
    """``float(value)`` rounded to 4 decimals, or ``None`` if it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 4) if math.isfinite(number) else None


def run_one(name: str, config_files: list[str], work_dir: Path, partial: dict[str, Any]) -> dict[str, Any]:
    """Train one config stack on the demo data with its demo schedule and return its summary."""
    out = work_dir / name
    workflow = ConfigWorkflow(
        config_file=[str(REPO_ROOT / f) for f in config_files],
        workflow_type="train",
        run_id="training",
        bundle_root=str(REPO_ROOT),
        output_dir=str(out / "train"),
        ckpt_dir=str(out / "models"),
        **RUN_OVERRIDES.get(name, {}),
    )
    wall0, cpu0, children0 = time.perf_counter(), time.process_time(), _children_cpu()
    workflow.initialize()
    parser = workflow.parser
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    network = parser.get_parsed_content("network")
    summary: dict[str, Any] = {
        "config_file": config_files,
        "network": type(network).__name__,
        "parameters": sum(p.numel() for p in network.parameters()),
        "widths": parser.get_parsed_content("network_factory#channels")
        if "channels" in parser["network_factory"]
        else parser.get_parsed_content("network_factory#filters"),
        "learning_rate": parser.get_parsed_content("learning_rate"),
        "roi_size": parser.get_parsed_content("roi_size"),
        "max_epochs": parser.get_parsed_content("epochs"),
        "val_interval": parser.get_parsed_content("val_interval"),
        "validations": [],
    }

    @evaluator.on(Events.COMPLETED)
    def _record(engine: Any) -> None:
        metrics = engine.state.metrics
        row = {"epoch": trainer.state.epoch, "val_mean_dice": _finite(metrics.get("val_mean_dice"))}
        row.update({f"val_dice_{r}": _finite(metrics.get(f"val_dice_{r}")) for r in REGIONS})
        row["wall_seconds"] = round(time.perf_counter() - wall0, 1)
        summary["validations"].append(row)
        partial[name] = summary
        (work_dir / "partial.json").write_text(json.dumps(partial, indent=2) + "\n")
        print(f"[{name}] epoch {row['epoch']}: val_mean_dice {row['val_mean_dice']}", flush=True)

    workflow.run()
    _stop_workers(parser.get_parsed_content("train#dataloader"))
    _stop_workers(parser.get_parsed_content("validate#dataloader"))
    workflow.finalize()

    scored = [v for v in summary["validations"] if v["val_mean_dice"] is not None]
    best = max(scored, key=lambda v: v["val_mean_dice"]) if scored else None  # max keeps the first of ties
    summary.update(
        {
            "epochs_trained": trainer.state.epoch,
            "best_val_mean_dice": best["val_mean_dice"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_region_dice": {r: best[f"val_dice_{r}"] for r in REGIONS} if best else None,
            "wall_seconds": round(time.perf_counter() - wall0, 1),
            "cpu_seconds_process": round(time.process_time() - cpu0, 1),
            "cpu_seconds_workers": round(_children_cpu() - children0, 1),
            "checkpoint": str(out / "models" / "model.pt"),
        }
    )
    partial[name] = summary
    (work_dir / "partial.json").write_text(json.dumps(partial, indent=2) + "\n")
    return summary


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table with one row per run."""

    def fmt(value: Any, spec: str = ".4f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        "| run | network (demo widths) | params | best val mean Dice | WT | TC | ET | best epoch "
        "| epochs | wall (min) | CPU (min, process + workers) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        region = s.get("best_region_dice") or {}
        cpu = (s.get("cpu_seconds_process") or 0) + (s.get("cpu_seconds_workers") or 0)
        lines.append(
            f"| {name} | {s['network']} {s['widths']} | {s['parameters'] / 1e6:.2f} M "
            f"| {fmt(s.get('best_val_mean_dice'))} | {fmt(region.get('WT'))} | {fmt(region.get('TC'))} "
            f"| {fmt(region.get('ET'))} | {s.get('best_epoch')} | {s.get('epochs_trained')} "
            f"| {s.get('wall_seconds', 0) / 60:.1f} | {cpu / 60:.1f} |"
        )
    return "\n".join(lines)


def validation_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of val_mean_dice (WT / TC / ET) per validation epoch, the runs side by side."""
    names = list(results)
    by_epoch: dict[int, dict[str, dict[str, Any]]] = {}
    for name in names:
        for row in results[name].get("validations", []):
            by_epoch.setdefault(row["epoch"], {})[name] = row
    lines = ["| epoch | " + " | ".join(f"{n}: mean (WT / TC / ET)" for n in names) + " |"]
    lines.append("|---:|" + "---|" * len(names))
    for epoch in sorted(by_epoch):
        cells = []
        for name in names:
            row = by_epoch[epoch].get(name)
            cells.append(
                "-"
                if row is None
                else f"{row['val_mean_dice']} ({row['val_dice_WT']} / {row['val_dice_TC']} / {row['val_dice_ET']})"
            )
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run the default and the M4-variant demo trainings and write ``comparison.json`` / ``comparison.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="runs/compare_m4")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs, in order")
    parser.add_argument("--report", default=None, help="only print the tables of an existing partial.json")
    args = parser.parse_args()

    if args.report:  # e.g. a comparison that was interrupted
        partial_results = json.loads(Path(args.report).read_text())
        print(validation_table(partial_results))
        return

    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    partial: dict[str, Any] = {}
    results = {name: run_one(name, RUNS[name], work_dir, partial) for name in args.runs}
    report = {
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "python", *sys.argv]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "runs": results,
    }
    table = markdown_table(results) + "\n\n" + validation_table(results)
    (work_dir / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    (work_dir / "comparison.md").write_text(table + "\n")
    print(json.dumps(report, indent=2))
    print(table)


if __name__ == "__main__":
    main()
