"""Time configs/inference.yaml on one full-size case, with and without 8-flip TTA, in one process.

    python scripts/benchmark_inference.py                       # train.yaml's full network, roi 128
    python scripts/benchmark_inference.py --network tiny        # overhead only (network ~free)
    python scripts/benchmark_inference.py --case DIR --device cuda --json out.json

The case is ../shared/brats_samples/BraTS2021_00000 when present (4 x 240 x 240 x 155), else a
synthetic phantom of that size. The network has random weights (timing does not depend on them).
Everything runs through the real workflow (MONAI ConfigWorkflow + SupervisedEvaluator); the
network's forward, the data loading, the inferer and every post-processing transform are timed
from inside, so "network-only" is the time of exactly the windows the run used and
"non-network" = total - network-only. Peak RSS is the process's high-water mark after each mode.
Import time (~4 s for torch + MONAI here) is not part of any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser, ConfigWorkflow  # noqa: E402

from bundle.checkpoints import save_model  # noqa: E402
from bundle.constants import MODALITIES  # noqa: E402

DEFAULT_CASE = ROOT.parent / "shared" / "brats_samples" / "BraTS2021_00000"
TINY_NET = {
    "_target_": "DynUNet",
    "spatial_dims": 3,
    "in_channels": 4,
    "out_channels": 3,
    "kernel_size": [3, 3, 3],
    "strides": [1, 2, 2],
    "upsample_kernel_size": [2, 2],
    "filters": [4, 8, 16],
    "norm_name": ["INSTANCE", {"affine": True}],
    "res_block": True,
}


def synthetic_case(root: Path, shape: tuple[int, int, int] = (240, 240, 155)) -> Path:
    """A full-size BraTS-2021-style case from the demo phantom generator (BraTS-like LPS affine)."""
    from bundle.data import demo_affine, make_phantom

    image, _ = make_phantom(0, shape)
    case = root / "Synthetic_00000"
    case.mkdir(parents=True, exist_ok=True)
    affine = demo_affine(shape, (1.0, 1.0, 1.0))
    for channel, modality in enumerate(MODALITIES):
        nib.save(nib.Nifti1Image(image[channel], affine), case / f"Synthetic_00000_{modality}.nii.gz")
    return case


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system: robust to other jobs sharing the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """Accumulates wall and CPU time per name; synchronises CUDA so GPU work is attributed correctly."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def now(self) -> float:
        """Seconds on the performance counter, after the GPU's queued work."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, name: str, fn: Any) -> Any:
        """``fn`` wrapped so that its wall and CPU time accumulate under ``name``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start, start_cpu = self.now(), cpu_seconds()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += self.now() - start
                self.cpu[name] += cpu_seconds() - start_cpu
                self.calls[name] += 1

        return timed


def run_mode(workflow: ConfigWorkflow, tta: bool, cuda: bool) -> dict[str, Any]:
    """Run the evaluator once over the case with TTA on or off; return the timings."""
    parser = workflow.parser
    evaluator = parser.get_parsed_content("evaluator")
    inferer = parser.get_parsed_content("inferer")
    dataset = parser.get_parsed_content("dataset")
    post = parser.get_parsed_content("postprocessing")
    inferer.tta = tta
    timer = Timer(cuda)

    network = evaluator.network
    original_forward = network.forward
    network.forward = timer.wrap("network", original_forward)
    original_transform = dataset.transform
    dataset.transform = timer.wrap("load + preprocess", original_transform)
    original_post = list(post.transforms)
    post.transforms = [timer.wrap(f"post: {type(t).__name__}", t) for t in original_post]
    original_inferer = evaluator.inferer
    evaluator.inferer = timer.wrap("inferer (incl. network)", original_inferer)

    stamps: dict[str, float] = {}
    handlers = [
        (Events.GET_BATCH_STARTED, lambda e: stamps.setdefault("start", timer.now())),
        (Events.GET_BATCH_STARTED, lambda e: stamps.setdefault("start_cpu", cpu_seconds())),
        (Events.ITERATION_COMPLETED, lambda e: stamps.__setitem__("end", timer.now())),
        (Events.ITERATION_COMPLETED, lambda e: stamps.__setitem__("end_cpu", cpu_seconds())),
    ]
    for event, handler in handlers:
        evaluator.add_event_handler(event, handler)
    try:
        evaluator.run()
    finally:
        for event, handler in handlers:
            evaluator.remove_event_handler(handler, event)
        network.forward = original_forward
        dataset.transform = original_transform
        post.transforms = original_post
        evaluator.inferer = original_inferer

    def summary(seconds: dict[str, float], total: float) -> dict[str, Any]:
        net = seconds["network"]
        infer_total = seconds["inferer (incl. network)"]
        post_total = sum(v for k, v in seconds.items() if k.startswith("post: "))
        breakdown = {k: round(v, 3) for k, v in seconds.items() if v >= 0.0005}
        breakdown["inferer without network"] = round(infer_total - net, 3)
        breakdown["post-processing + inversion + writing"] = round(post_total, 3)
        breakdown["other (batch transfer, decollate, events)"] = round(
            total - seconds["load + preprocess"] - infer_total - post_total, 3
        )
        return {
            "total_s": round(total, 3),
            "network_s": round(net, 3),
            "non_network_s": round(total - net, 3),
            "breakdown_s": breakdown,
        }

    return {
        "tta": tta,
        "network_calls": timer.calls["network"],
        "wall": summary(timer.seconds, stamps["end"] - stamps["start"]),
        "cpu": summary(timer.cpu, stamps["end_cpu"] - stamps["start_cpu"]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    """Parse arguments, run both modes, print and optionally save the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default=None, help="case folder (default: BraTS2021_00000 sample, else synthetic)")
    ap.add_argument("--network", choices=["full", "demo", "tiny"], default="full")
    ap.add_argument("--roi", type=int, default=None, help="window edge (default: train.yaml's for the network)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--flip-batch-size", type=int, default=None)
    ap.add_argument("--modes", default="notta,tta", help="comma list of notta,tta (run in that order)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    case = Path(args.case) if args.case else (DEFAULT_CASE if DEFAULT_CASE.is_dir() else synthetic_case(work))
    shape = nib.load(next(p for p in sorted(case.iterdir()) if p.name.endswith(".nii.gz"))).shape

    overrides: dict[str, Any] = {
        "dataset_dir": str(case),
        "output_dir": str(work / "out"),
        "checkpoint": str(work / "model.pt"),
        "device": f"$torch.device({args.device!r})",
        "flip_batch_size": args.flip_batch_size,
    }
    # the network as training builds it (full: train.yaml, demo: + demo.yaml), saved with its model
    # record as training saves it; inference builds it from that record, window = the training patch
    parser = ConfigParser()
    parser.read_config(
        [str(ROOT / "configs" / c) for c in ("train.yaml", "demo.yaml")[: 2 if args.network == "demo" else 1]]
    )
    if args.network == "tiny":
        parser["network_factory"] = {**TINY_NET, "_mode_": "callable"}
        parser["roi_size"] = [128, 128, 128]
    with _Cwd(ROOT):
        network = parser.get_parsed_content("network_def")
        patch = parser.get_parsed_content("roi_size")
        recipe = parser.get_parsed_content("inference_recipe")  # M4's: flips, thresholds, the four steps
    save_model(work / "model.pt", network, patch_size=patch, inference_recipe=recipe, train_settings={"spacing": None})
    roi = [args.roi] * 3 if args.roi else patch
    if args.roi:
        overrides["roi_size"] = roi
    params = sum(p.numel() for p in network.parameters())

    with _Cwd(ROOT):
        workflow = ConfigWorkflow(
            config_file="configs/inference.yaml", workflow_type="inference", logging_file=False, **overrides
        )
        workflow.initialize()
        results = [run_mode(workflow, mode == "tta", args.device.startswith("cuda")) for mode in args.modes.split(",")]

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "case": str(case),
        "image_shape": [len(MODALITIES), *shape],
        "network": args.network,
        "parameters": params,
        "roi_size": list(roi),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "modes": results,
    }
    by_mode = {r["tta"]: r for r in results}
    if True in by_mode and False in by_mode:
        for clock in ("wall", "cpu"):
            tta, single = by_mode[True][clock], by_mode[False][clock]
            report[f"tta_over_single_pass_{clock}"] = {
                k: round(tta[k] / single[k], 2) for k in ("total_s", "network_s", "non_network_s")
            }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


class _Cwd:
    """Run from the bundle root: the configs reference train.yaml by a bundle-relative path."""

    def __init__(self, path: Path) -> None:
        self.path, self.previous = path, Path.cwd()

    def __enter__(self) -> None:
        self.previous = Path.cwd()
        os.chdir(self.path)

    def __exit__(self, *exc: Any) -> None:
        os.chdir(self.previous)


if __name__ == "__main__":
    main()
