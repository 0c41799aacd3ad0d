"""The 2-D pipeline measured: the models with one budget, and what an epoch costs (docs/benchmarks/methods_2d.md).

Models (default): train the 2-D variants (MONAI UNet 2-D baseline, M1, M2, M3) and M2's gate through
``monai.bundle``'s ``ConfigWorkflow`` on the same demo phantoms, fold and schedule (epochs, slices per
volume and per iteration, learning rate), each at its method's demo slice size, validated on whole 3-D
volumes slice by slice. Also measured in the same process: the training loader's rate (2-D samples per
second, ``num_workers=0``) against the network's training step time, and how much inference time M2's
gate saves on the validation volumes. Prints a Markdown table and writes ``results.json``.

    OMP_NUM_THREADS=1 python scripts/benchmark_2d.py --epochs 12 --output runs/benchmark_2d

Epoch cost (``--epoch_cost``): for the demo's training volumes and for full-size BraTS cases
(``--real_dir``), with M3's configuration, the data side of one training epoch - cache build, seconds,
slices, iterations, peak resident memory - for each cache (memory; disk, with the cache files dropped
from the page cache before every epoch) and each way of choosing slices: main's sampler before the
paper's epoch (4 slices drawn per volume, 2 volumes per batch: ``RandWeightedCropd`` on the whole
cached volume), ``slices_per_volume: 4``, and the paper's epoch (every slice with brain). Every
configuration runs in a fresh process (its own peak memory); M3's network step per batch is measured
in the same run, so the table also gives a training epoch's cost.

    OMP_NUM_THREADS=1 python scripts/benchmark_2d.py --epoch_cost --output runs/epoch_cost_2d \
      --real_dir ../shared/brats_samples
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import DataLoader
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandWeightedCropd,
    Resized,
    SqueezeDimd,
)
from monai.utils import set_determinism

from bundle.data import generate_demo_dataset, select_cases
from bundle.inference.gate import GatedSliceInferer
from bundle.inference.inferers import ResizedSliceInferer
from bundle.training.slices import slice_classes
from bundle.training.workflow import make_dataset

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
    "unet_2d.yaml": {"patch_size": [64, 64], "network_factory#channels": DEMO_WIDTH},
    "m1_la_resunet.yaml": {"patch_size": [96, 96], "network_factory#channels": DEMO_WIDTH},
    "m2_resunet_tversky.yaml": {"patch_size": [96, 96], "network_factory#channels": DEMO_WIDTH},
    "m3_resse_lka_unet.yaml": {"patch_size": [64, 64], "network_factory#channels": DEMO_WIDTH},
    GATE: {"patch_size": [96, 96]},  # the paper's ResNet-50 classifier (bundle.networks.SliceGateClassifier)
}


def workflow(variant: str, out: Path, args: argparse.Namespace, **extra: Any) -> ConfigWorkflow:
    """An initialised training workflow of ``train.yaml + train_2d.yaml + variant`` with the shared budget."""
    name = Path(variant).stem
    # one caching thread: with make_dataset's default (a thread per CPU) a demo case intermittently
    # loads as one channel on this machine (not yet understood; see docs/reference/pipeline_2d.md, "Known issues")
    extra["train#dataset#volume_dataset#num_workers"] = 1
    extra["validate#dataset#" + ("volume_dataset#num_workers" if variant == GATE else "num_workers")] = 1
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
        slices_per_volume=args.slices_per_volume or None,
        tumour_slice_ratio=args.tumour_slice_ratio if args.slices_per_volume else None,
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
        "slice_size": list(wf.parser.get_parsed_content("patch_size")),
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
    size = seg_wf.parser.get_parsed_content("patch_size")
    loader = seg_wf.parser.get_parsed_content("validate#dataloader")
    plain = ResizedSliceInferer(model_size=size, spatial_dim=2, sw_batch_size=16)
    gated = GatedSliceInferer(
        classifier,
        model_size=size,
        gate_size=gate_wf.parser.get_parsed_content("patch_size"),
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


# ----------------------------------------------------------------------------- epoch cost

EPOCH_VARIANT = "configs/variants/m3_resse_lka_unet.yaml"
#: how slices are chosen: main's sampler before the paper's epoch, slices_per_volume 4, every kept slice
SAMPLERS = {"main": "main's sampler, 4 per volume", "per_volume": "slices_per_volume: 4", "epoch": "every slice"}
#: slice size and network widths: M3's on real data; the demo's (2.4 mm phantoms) as in DEMO_SIZES
EPOCH_DATA = {
    "demo": {"patch_size": [64, 64], "channels": DEMO_WIDTH},
    "real": {"patch_size": [128, 128], "channels": [32, 64, 128, 256, 512]},
}


class MainSliceWeightsd(MapTransform):
    """main's ``bundle.slices.SliceSamplingWeightsd`` (commit 3b1e379), kept here as the baseline's sampler.

    A per-voxel weight map, constant within each axial slice, with which ``RandWeightedCropd`` draws a
    tumour slice with probability ``tumour_ratio`` and never a slice without brain.
    """

    def __init__(self, keys: str, image_key: str = "image", tumour_ratio: float = 0.5) -> None:
        super().__init__(keys)
        self.image_key, self.tumour_ratio = image_key, tumour_ratio

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add ``slice_weight``, a broadcast view of one weight per slice."""
        d = dict(data)
        label = torch.as_tensor(d[self.keys[0]])
        tumour, brain = slice_classes(label, torch.as_tensor(d[self.image_key]), slice_dim=2)
        pos, neg = tumour & brain, ~tumour & brain
        if pos.any() and neg.any():
            weights = pos.double() * (self.tumour_ratio / pos.sum()) + neg.double() * (
                (1 - self.tumour_ratio) / neg.sum()
            )
        else:
            weights = brain.double() / brain.sum()
        d["slice_weight"] = weights.float().reshape(1, 1, 1, -1).expand(1, *label.shape[1:])
        return d


def _main_sampler_loader(parser: ConfigParser, items: list[dict], cache: str, cache_dir: str) -> DataLoader:
    """main's 2-D training data for M3: every iteration 2 cached volumes x 4 slices drawn by RandWeightedCropd."""
    image, label = "image", "label"
    size = parser.get_parsed_content("patch_size")
    chain = [
        *parser.get_parsed_content("deterministic_transforms"),
        MainSliceWeightsd(label, image),
        RandWeightedCropd(keys=[image, label], w_key="slice_weight", spatial_size=[-1, -1, 1], num_samples=4),
        DeleteItemsd(keys="slice_weight"),
        SqueezeDimd(keys=[image, label], dim=3),
        Resized(keys=[image, label], spatial_size=size, mode=["bilinear", "nearest"]),
        *parser.get_parsed_content("train#augmentations"),
        EnsureTyped(keys=[image, label], track_meta=False),
    ]
    # flattened as the paper's epoch is (train_2d.yaml): both cache M3's intensity transform
    dataset = make_dataset(items, Compose(chain).flatten(), cache, cache_dir, num_workers=1)
    return DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0)


def _drop_page_cache(folder: Path) -> None:
    """Evict the cache files from the page cache (this process's files only), so an epoch reads them from disk."""
    for path in folder.rglob("*.pt"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, MB.

    Not ``getrusage``'s ``ru_maxrss``: after fork + exec it keeps the parent's peak, which here (the
    benchmark's own process) exceeds a small configuration's.
    """
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def epoch_cost_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: build its training data, run ``epochs`` loader epochs, peak memory."""
    torch.manual_seed(0)
    rss_start = _memory_mb("VmRSS")  # libraries imported, nothing built
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in [*BASE, EPOCH_VARIANT]])
    sampler = spec["sampler"]
    overrides = {
        "bundle_root": str(ROOT),
        "cache": spec["cache"],
        "cache_dir": spec["cache_dir"],
        "slice_size": EPOCH_DATA[spec["data"]]["slice_size"],
        "num_workers": 0,
        "slices_per_volume": 4 if sampler == "per_volume" else None,
        "tumour_slice_ratio": 0.5 if sampler == "per_volume" else None,
        "train#dataset#volume_dataset#num_workers": 1,
        "train#dataset#progress": False,
    }
    for key, value in overrides.items():
        parser[key] = value
    parser["train_datalist"] = spec["items"]
    start = time.perf_counter()
    if sampler == "main":
        loader = _main_sampler_loader(parser, spec["items"], spec["cache"], spec["cache_dir"])
    else:
        loader = parser.get_parsed_content("train#dataloader")
    build = time.perf_counter() - start
    rss_built = _memory_mb("VmRSS")
    epochs = []
    for _ in range(spec["epochs"]):
        if spec["cache"] == "disk":
            _drop_page_cache(Path(spec["cache_dir"]))
        slices, iterations, start = 0, 0, time.perf_counter()
        for batch in loader:
            slices += batch["image"].shape[0]
            iterations += 1
        epochs.append({"seconds": time.perf_counter() - start, "slices": slices, "iterations": iterations})
    peak = _memory_mb("VmHWM")
    return {
        "build_seconds": build,
        "rss_start_mb": rss_start,
        "rss_after_build_mb": rss_built,
        "peak_rss_mb": peak,
        "epochs": epochs,
    }


def step_cost_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per training step of M3's network, loss and optimiser on a batch of 8 random slices."""
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in [*BASE, EPOCH_VARIANT]])
    size = EPOCH_DATA[spec["data"]]
    parser["network_factory#channels"] = size["channels"]
    network = parser.get_parsed_content("network").train()
    loss_fn, optimizer = parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer")
    image = torch.randn(8, 4, *size["slice_size"])
    label = torch.randint(0, 4, (8, 1, *size["slice_size"])).float()
    times = []
    for _ in range(spec["steps"] + 1):  # the first step pays for allocation
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(network(image), label).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"step_seconds": sum(times[1:]) / spec["steps"]}


def _child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``kind`` (epoch or step) with ``spec`` in a fresh process; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{kind} {spec.get('data')} {spec.get('cache')} {spec.get('sampler')}: {result.stderr[-2000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def epoch_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Every data set x cache x sampler in its own processes, and M3's step time; prints the table.

    A first process starts from an empty cache folder ("first epoch" includes filling the cache); with
    ``cache: disk`` a second process reads the cache it left ("epoch", "peak RSS"), as a resumed or
    repeated run does.
    """
    data = {"demo": select_cases(dataset_dir=str(generate_demo_dataset(args.demo_dir)), fold=0, split="train")}
    if args.real_dir:
        data["real"] = select_cases(dataset_dir=str(args.real_dir), labelled=True)
    rows = []
    for name, items in data.items():
        step = _child("step", {"data": name, "steps": args.step_batches})["step_seconds"]
        for cache in ("memory", "disk"):
            for sampler in SAMPLERS:
                cache_dir = args.output / "cache" / name / sampler
                shutil.rmtree(cache_dir, ignore_errors=True)
                spec = {"data": name, "cache": cache, "sampler": sampler, "items": items, "cache_dir": str(cache_dir)}
                first = _child("epoch", {**spec, "epochs": args.cost_epochs if cache == "memory" else 1})
                steady = _child("epoch", {**spec, "epochs": args.cost_epochs}) if cache == "disk" else first
                last = steady["epochs"][-1]
                row = {"data": name, "volumes": len(items), "cache": cache, "sampler": SAMPLERS[sampler]}
                row.update(
                    first_epoch_seconds=first["build_seconds"] + first["epochs"][0]["seconds"],
                    epoch=last,
                    peak_rss_mb=steady["peak_rss_mb"],
                    data_rss_mb=steady["peak_rss_mb"] - steady["rss_start_mb"],
                    first_peak_rss_mb=first["peak_rss_mb"],
                    step_seconds=step,
                    train_epoch_seconds=last["seconds"] + last["iterations"] * step,
                )
                rows.append(row)
                print(epoch_table(rows[-1:], header=not rows[:-1]), flush=True)
    return {"rows": rows}


def epoch_table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """Markdown table of the epoch-cost rows."""
    lines = [
        "| data | cache | slices chosen | first epoch s (fills the cache) | slices / epoch | iterations "
        "| loader s / epoch | peak RSS MB (over imports) | training epoch s (loader + M3 steps) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epoch = r["epoch"]
        lines.append(
            f"| {r['data']} ({r['volumes']} volumes) | {r['cache']} | {r['sampler']} | {r['first_epoch_seconds']:.1f} "
            f"| {epoch['slices']} | {epoch['iterations']} | {epoch['seconds']:.1f} "
            f"| {r['peak_rss_mb']:.0f} ({r['data_rss_mb']:+.0f}) "
            f"| {r['train_epoch_seconds']:.0f} ({r['step_seconds']:.2f} s a step) |"
        )
    return "\n".join(lines if header else lines[2:])


def main() -> None:
    """Run every model with the same budget and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "benchmark_2d")
    parser.add_argument("--demo_dir", type=Path, default=None, help="demo phantoms (default: <output>/demo)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--val_interval", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="slices per iteration")
    parser.add_argument(
        "--slices_per_volume", type=int, default=4, help="slices drawn per volume and epoch (0: every kept slice)"
    )
    parser.add_argument("--tumour_slice_ratio", type=float, default=0.5, help="with slices_per_volume")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--speed_batches", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="subset of: " + ", ".join(MODELS))
    parser.add_argument("--no_gate", action="store_true", help="skip M2's gate classifier")
    parser.add_argument("--epoch_cost", action="store_true", help="measure what an epoch costs instead")
    parser.add_argument("--real_dir", type=Path, default=None, help="full-size BraTS cases for --epoch_cost")
    parser.add_argument("--cost_epochs", type=int, default=2, help="loader epochs per configuration (last reported)")
    parser.add_argument("--step_batches", type=int, default=3, help="M3 training steps timed per data set")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps((epoch_cost_child if kind == "epoch" else step_cost_child)(spec)))
        return
    logging.getLogger("ignite").setLevel(logging.WARNING)
    args.output.mkdir(parents=True, exist_ok=True)
    args.demo_dir = generate_demo_dataset(args.demo_dir or args.output / "demo")
    if args.epoch_cost:
        summary = {"settings": {k: str(v) for k, v in vars(args).items()}, **epoch_cost(args)}
        print("\n" + epoch_table(summary["rows"]))
        (args.output / "epoch_cost.json").write_text(json.dumps(summary, indent=2, default=str))
        return

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
