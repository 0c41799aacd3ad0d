"""Train the 2-D variants (MONAI UNet 2-D baseline, M1, M2, M3) and M2's gate with one budget, in one run.

Every model trains through ``monai.bundle``'s ``ConfigWorkflow`` on the same demo phantoms, fold and
schedule (epochs, volumes x slices per iteration, learning rate), each at its method's demo slice
size, and is validated on whole 3-D volumes slice by slice. Also measured, in the same process so
the numbers are comparable under a shared CPU: the training loader's rate (2-D samples per second,
``num_workers=0``) against the network's training step time, and how much inference time M2's gate
saves on the validation volumes. Prints a Markdown table and writes ``results.json``.

    OMP_NUM_THREADS=1 python scripts/benchmark_2d.py --epochs 12 --output runs/benchmark_2d
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.metrics import DiceMetric
from monai.utils import set_determinism

from bundle.data import generate_demo_dataset
from bundle.gate import GatedSliceInferer
from bundle.slices import ResizedSliceInferer

ROOT = Path(__file__).resolve().parents[1]
BASE = ["configs/train.yaml", "configs/train_2d.yaml"]
MODELS = {
    "UNet 2-D (MONAI)": "unet_2d.yaml",
    "M1 LA-ResUNet": "m1_la_resunet.yaml",
    "M2 ResUNet + Tversky": "m2_resunet_tversky.yaml",
    "M3 ResSE-LKA-UNet": "m3_resse_lka_unet.yaml",
}
GATE = "train_gate.yaml"
#: Demo sizes per model: the demo phantoms have 2.4 mm voxels, so 96 x 96 covers what 240 x 240 covers
#: at 1 mm; narrower networks than the papers' (the variant files hold the papers' values).
DEMO_WIDTH = [16, 32, 64, 128, 256]
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "unet_2d.yaml": {"slice_size": [64, 64], "network_factory#channels": DEMO_WIDTH},
    "m1_la_resunet.yaml": {"slice_size": [96, 96], "network_factory#channels": DEMO_WIDTH},
    "m2_resunet_tversky.yaml": {"slice_size": [96, 96], "network_factory#channels": DEMO_WIDTH},
    "m3_resse_lka_unet.yaml": {"slice_size": [64, 64], "network_factory#channels": DEMO_WIDTH},
    GATE: {"slice_size": [96, 96]},  # the paper's ResNet-50 classifier (bundle.networks.SliceGateClassifier)
}


def workflow(variant: str, out: Path, args: argparse.Namespace, **extra: Any) -> ConfigWorkflow:
    """An initialised training workflow of ``train.yaml + train_2d.yaml + variant`` with the shared budget."""
    name = Path(variant).stem
    # one caching thread: with make_dataset's default (a thread per CPU) a demo case intermittently
    # loads as one channel on this machine (not yet understood; see docs/pipeline_2d.md)
    extra["train#dataset#num_workers"] = 1
    if variant == GATE:
        extra["validate#dataset#data"] = (
            "$bundle.workflow.make_dataset(@val_datalist, @validate#preprocessing, @cache, @cache_dir, num_workers=1)"
        )
    else:
        extra["validate#dataset#num_workers"] = 1
    top = f"configs/{variant}" if variant == GATE else f"configs/variants/{variant}"
    wf = ConfigWorkflow(
        config_file=[str(ROOT / f) for f in [*BASE, top]],
        workflow_type="train",
        run_id="training",
        bundle_root=str(ROOT),
        dataset_dir=str(args.demo_dir),
        cache="memory",
        **DEMO_SIZES[variant],
        output_dir=str(out / name),
        ckpt_dir=str(out / name / "models"),
        epochs=args.epochs,
        val_interval=args.val_interval,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        learning_rate=args.learning_rate,
        early_stop_patience=10**6,
        num_workers=0,
        seed=args.seed,
        **extra,
    )
    wf.initialize()
    return wf


def loader_and_step(wf: ConfigWorkflow, batches: int) -> dict[str, float]:
    """2-D samples per second out of the training loader, and the network's training step time per batch."""
    loader = wf.parser.get_parsed_content("train#dataloader")
    network = wf.parser.get_parsed_content("network")
    loss_fn = wf.parser.get_parsed_content("loss")
    optimizer = wf.parser.get_parsed_content("optimizer")
    it = iter(loader)
    next(it)  # the first batch may pay for worker or lazy start-up
    samples, start = 0, time.perf_counter()
    batch_list = []
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        samples += batch["image"].shape[0]
        batch_list.append(batch)
    load_time = time.perf_counter() - start
    network.train()
    start = time.perf_counter()
    for batch in batch_list:
        optimizer.zero_grad()
        loss = loss_fn(network(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
    step_time = (time.perf_counter() - start) / len(batch_list)
    return {
        "batch_size_2d": samples / batches,
        "loader_samples_per_s": samples / load_time,
        "step_s_per_batch": step_time,
        "network_samples_per_s": samples / batches / step_time,
    }


def train(name: str, variant: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measure loader/step, then train from scratch (fresh workflow, same seed) and read the validation metrics."""
    set_determinism(seed=args.seed)
    probe = workflow(variant, out / "probe", args)
    speed = loader_and_step(probe, args.speed_batches)
    probe.finalize()
    set_determinism(seed=args.seed)
    wf = workflow(variant, out, args)
    start = time.perf_counter()
    wf.run()
    seconds = time.perf_counter() - start
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    metrics = {
        k: float(v)
        for k, v in evaluator.state.metrics.items()
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
    }
    result = {
        "model": name,
        "variant": variant,
        "slice_size": list(wf.parser.get_parsed_content("slice_size")),
        "params_M": sum(p.numel() for p in wf.parser.get_parsed_content("network").parameters()) / 1e6,
        "train_seconds": seconds,
        "best_metric": float(evaluator.state.best_metric),
        "best_epoch": int(evaluator.state.best_metric_epoch),
        "last_metrics": metrics,
        **speed,
    }
    result["workflow"] = wf
    return result


def gate_savings(seg: dict[str, Any], gate: dict[str, Any]) -> dict[str, float]:
    """Time M2's segmenter over the validation volumes with and without the gate (no TTA); Dice of both."""
    seg_wf, gate_wf = seg["workflow"], gate["workflow"]
    network = seg_wf.parser.get_parsed_content("network").eval()
    classifier = gate_wf.parser.get_parsed_content("network").eval()
    size = seg_wf.parser.get_parsed_content("slice_size")
    loader = seg_wf.parser.get_parsed_content("validate#dataloader")
    plain = ResizedSliceInferer(model_size=size, spatial_dim=2, sw_batch_size=16)
    gated = GatedSliceInferer(
        classifier,
        model_size=size,
        gate_size=gate_wf.parser.get_parsed_content("slice_size"),
        out_channels=1,
        spatial_dim=2,
        sw_batch_size=16,
    )
    times = {"plain": 0.0, "gated": 0.0}
    dice = {k: DiceMetric(include_background=True) for k in times}
    with torch.no_grad():
        for batch in loader:
            image, label = batch["image"], batch["label"]
            for key, inferer in (("plain", plain), ("gated", gated)):
                start = time.perf_counter()
                pred = inferer(image, network)
                times[key] += time.perf_counter() - start
                dice[key]((torch.sigmoid(pred) >= 0.5).float(), label)
    return {
        "seconds_without_gate": times["plain"],
        "seconds_with_gate": times["gated"],
        "time_saved_fraction": 1 - times["gated"] / times["plain"],
        "slices_segmented_fraction": gated.fraction_segmented,
        "dice_WT_without_gate": float(dice["plain"].aggregate()),
        "dice_WT_with_gate": float(dice["gated"].aggregate()),
    }


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the segmentation runs."""
    lines = [
        "| model | slice | params (M) | val Dice WT | TC | ET | mean | best mean (epoch) | train s "
        "| loader samples/s | step s/batch (samples) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["last_metrics"]

        def f(key: str, m: dict[str, float] = m) -> str:
            return f"{m[key]:.3f}" if key in m else "-"

        size = "x".join(str(s) for s in r["slice_size"])
        lines.append(
            f"| {r['model']} | {size} | {r['params_M']:.2f} | {f('val_dice_WT')} | {f('val_dice_TC')} | "
            f"{f('val_dice_ET')} | {f('val_mean_dice')} | {r['best_metric']:.3f} ({r['best_epoch']}) | "
            f"{r['train_seconds']:.0f} | {r['loader_samples_per_s']:.0f} | "
            f"{r['step_s_per_batch']:.3f} ({r['batch_size_2d']:.0f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every model with the same budget and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "benchmark_2d")
    parser.add_argument("--demo_dir", type=Path, default=None, help="demo phantoms (default: <output>/demo)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--val_interval", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=2, help="volumes per iteration")
    parser.add_argument("--num_samples", type=int, default=4, help="slices per volume per iteration")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--speed_batches", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="subset of: " + ", ".join(MODELS))
    parser.add_argument("--no_gate", action="store_true", help="skip M2's gate classifier")
    args = parser.parse_args()
    logging.getLogger("ignite").setLevel(logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    args.demo_dir = generate_demo_dataset(args.demo_dir or args.output / "demo")

    results = []
    for name in args.models:
        print(f"== {name}", flush=True)
        results.append(train(name, MODELS[name], args.output, args))
        print(table(results[-1:]), flush=True)
    summary: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "models": []}
    for r in results:
        summary["models"].append({k: v for k, v in r.items() if k != "workflow"})
    print("\n" + table(results))
    m2 = next((r for r in results if r["variant"] == MODELS["M2 ResUNet + Tversky"]), None)
    if not args.no_gate:
        print("== M2 gate classifier", flush=True)
        gate = train("M2 gate (ResNet)", GATE, args.output, args)
        g = gate["last_metrics"]
        gate_row = {k: g.get(f"val_{k}") for k in ("auc", "accuracy", "precision", "recall", "f1")}
        summary["gate"] = {**{k: v for k, v in gate.items() if k != "workflow"}, "metrics": gate_row}
        print("\n| gate | ROC AUC | accuracy | precision | recall | F1 | train s |\n|---|---|---|---|---|---|---|")
        print(
            f"| {GATE} | "
            + " | ".join(f"{gate_row[k]:.3f}" for k in ("auc", "accuracy", "precision", "recall", "f1"))
            + f" | {gate['train_seconds']:.0f} |"
        )
        if m2 is not None:
            savings = gate_savings(m2, gate)
            summary["gate_savings"] = savings
            print(
                f"\nM2 inference on the validation volumes (no TTA): {savings['seconds_without_gate']:.1f} s without "
                f"the gate, {savings['seconds_with_gate']:.1f} s with it ({100 * savings['time_saved_fraction']:.0f} % "
                f"saved; segmenter ran on {100 * savings['slices_segmented_fraction']:.0f} % of the slices); "
                f"WT Dice {savings['dice_WT_without_gate']:.3f} -> {savings['dice_WT_with_gate']:.3f}"
            )
    (args.output / "results.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
