"""Per-case time, CPU time and peak memory of configs/inference.yaml, against the model zoo's pipeline.

    python scripts/benchmark_inference.py --network standin --modes ours,zoo --rounds 3 --cases 3   # overhead
    python scripts/benchmark_inference.py --network full --modes notta,tta                     # real network
    python scripts/benchmark_inference.py --network full --device cuda --modes notta,tta        # on a GPU

Modes (each run in a fresh Python process, so that its peak RSS is its own; ``--rounds`` repeats
the list, alternating the modes, so a noisy shared machine slows all of them alike):

* ``notta`` / ``ours``: configs/inference.yaml without TTA (the same thing, two names);
* ``plain``: the same with MONAI's own loading in place of the bundle's (``LoadImaged`` +
  ``NibabelReader``: the files one after the other, zlib, float32 from the load), i.e. the load path
  before ISA-L decoding, concurrent files and int16-until-the-crop; same outputs;
* ``tta``: configs/inference.yaml with M4's 8-flip TTA;
* ``zoo``: the MONAI model zoo's ``brats_mri_segmentation`` inference pipeline, written out here
  (nothing is fetched): ``LoadImaged`` + ``NormalizeIntensityd(nonzero, channel_wise)``, a
  240 x 240 x 160 sliding window (overlap 0.5), sigmoid, ``Invertd``, threshold 0.5, BraTS labels,
  ``SaveImaged``; its network is the zoo's SegResNet, or with ``--network tiny`` / ``standin`` the same
  network as ours (the per-case overhead is what is compared; the network's time is measured and
  subtracted).

In every process the case is segmented ``--cases`` times one after the other: the first case pays
the allocator's and the first calls' warm-up, the next ones are what every further case of a folder
costs ("steady"). The case is ../shared/brats_samples/BraTS2021_00000 when present
(4 x 240 x 240 x 155), else a synthetic phantom of that size. ``full`` is train.yaml's network
(6-level M4UNet, 32 -> 320 filters) built from the config exactly as training builds it, ``demo``
adds configs/demo.yaml, both with random weights (the network's time does not depend on them);
``tiny`` is a 22k-parameter DynUNet with random weights, which predicts tumour in every voxel of the
brain's box, the worst case for the clean-up steps; ``standin`` is a fixed 1 x 1 x 1 convolution
that thresholds the z-scored FLAIR and T1ce (:data:`STANDIN_NET`), a tumour-sized, noisy prediction
like a model's, the per-case overhead a user sees. The time of both is negligible. Everything runs
through the real workflow (MONAI ConfigWorkflow + SupervisedEvaluator); network forward, data loading, inferer and every
post-processing transform are timed from inside, so "overhead" = total - network time. Import time
(~4 s for torch + MONAI) is not part of any figure. ``windows_per_s`` is network throughput in
windows (``roi_size`` patches) per second of forward time, the unit of NVIDIA's nnU-Net inference
table (images/s at 128^3); ``volumes_per_s`` is whole cases per second, loading and writing included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
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
from monai.transforms import apply_transform  # noqa: E402

from bundle.constants import MODALITIES  # noqa: E402
from bundle.plan.checkpoints import save_model  # noqa: E402

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
# ``standin``: a 1 x 1 x 1 convolution with fixed weights that thresholds the z-scored intensities,
# p(WT) from FLAIR > 1.5, p(TC) from T1ce > 2.0, p(ET) from T1ce > 2.5 (channel order T1, T1ce, T2,
# FLAIR). Random weights predict tumour in every voxel of the brain's box (measured: all three regions
# in all 3.4 M voxels of BraTS2021_00000's box), so the clean-up steps then label one box-sized
# component; a trained model's output is a tumour with a few stray blobs. On the three sample cases
# this stand-in predicts 72-119 k WT voxels (the truths: 57-191 k) in 35-4558 components, Dice WT
# 0.46-0.92: tumour-sized, and noisier than a trained model, so the clean-up is not flattered.
STANDIN_NET = {"_target_": "torch.nn.Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1}
STANDIN_THRESHOLDS = ((3, 1.5), (1, 2.0), (1, 2.5))  # (input channel, z-score) of WT, TC, ET
STANDIN_SLOPE = 8.0


def intensity_standin(network: torch.nn.Conv3d) -> torch.nn.Conv3d:
    """Set :data:`STANDIN_NET`'s weights: logit of region r = 8 * (z-score of its channel - its threshold)."""
    with torch.no_grad():
        network.weight.zero_()
        for region, (channel, threshold) in enumerate(STANDIN_THRESHOLDS):
            network.weight[region, channel] = STANDIN_SLOPE
            network.bias[region] = -STANDIN_SLOPE * threshold
    return network


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


def run_case(parser: ConfigParser, cuda: bool, tta: bool | None = None) -> dict[str, Any]:
    """Segment the dataset of ``parser``'s workflow once (one case) and return its timings.

    ``parser`` is a parsed inference workflow (ours or the zoo's) with ``evaluator``, ``inferer``,
    ``dataset`` and ``postprocessing``; ``tta`` switches our FlipTTAInferer (``None``: the zoo's).
    """
    evaluator = parser.get_parsed_content("evaluator")
    dataset = parser.get_parsed_content("dataset")
    post = parser.get_parsed_content("postprocessing")
    if tta is not None:
        parser.get_parsed_content("inferer").tta = tta
    timer = Timer(cuda)
    windows = [0]

    network = evaluator.network
    original_forward = network.forward
    timed_forward = timer.wrap("network", original_forward)

    def counted_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        windows[0] += int(x.shape[0])
        return timed_forward(x, *args, **kwargs)

    network.forward = counted_forward
    original_transform = dataset.transform
    dataset.transform = timer.wrap("load + preprocess", original_transform)
    original_post = list(post.transforms)
    # nested blocks (the recipe's clean-up steps are one Compose) flattened, so each step is timed
    post.transforms = [timer.wrap(f"post: {type(t).__name__}", t) for t in post.flatten().transforms]
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
            "overhead_s": round(total - net, 3),
            "breakdown_s": breakdown,
        }

    wall = summary(timer.seconds, stamps["end"] - stamps["start"])
    return {
        "network_calls": timer.calls["network"],
        "windows": windows[0],
        "windows_per_s": round(windows[0] / wall["network_s"], 3) if wall["network_s"] else None,
        "volumes_per_s": round(1.0 / wall["total_s"], 4),
        "wall": wall,
        "cpu": summary(timer.cpu, stamps["end_cpu"] - stamps["start_cpu"]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def preprocessing_steps(parser: ConfigParser, item: dict[str, Any], repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of each preprocessing transform on ``item``, run one by one outside the workflow."""
    transforms = parser.get_parsed_content("preprocessing").transforms
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        data: Any = dict(item)
        for index, transform in enumerate(transforms):
            start = time.perf_counter()
            data = apply_transform(transform, data)
            times[f"{index}: {type(transform).__name__}"].append(time.perf_counter() - start)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


# The model zoo's brats_mri_segmentation inference (configs/inference.json of Project-MONAI/model-zoo),
# written out so nothing is fetched at run time; only the data list, devices and paths are ours.
ZOO_SEGRESNET = {
    "_target_": "SegResNet",
    "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1],
    "init_filters": 16,
    "in_channels": 4,
    "out_channels": 3,
    "dropout_prob": 0.2,
}


def zoo_config(items: list[dict[str, Any]], output_dir: Path, device: str, network: dict[str, Any]) -> dict[str, Any]:
    """The zoo pipeline as a MONAI bundle config (its transforms, window, post-processing and evaluator)."""
    return {
        "imports": ["$import torch", "$import monai"],
        "device": f"$torch.device({device!r})",
        "network_def": network,
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": items, "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [240, 240, 160],
            "sw_batch_size": 1,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, "
                    "torch.where(x[[1]] > 0, 2, 0)))",
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": str(output_dir),
                    "output_postfix": "seg",
                    "output_dtype": "uint8",
                    "resample": False,
                    "squeeze_end_dims": True,
                    "separate_folder": False,
                },
            ],
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "amp": f"$torch.device({device!r}).type == 'cuda'",
        },
    }


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this process: build its workflow, segment the case ``--cases`` times, report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    case = Path(args.case) if args.case else (DEFAULT_CASE if DEFAULT_CASE.is_dir() else synthetic_case(work))
    from bundle.data import select_cases

    items = [{"image": item["image"]} for item in select_cases(case, labelled=False, progress=False)]
    rss_before = peak_rss_mb()
    if args.child == "zoo":
        network = {"tiny": TINY_NET, "standin": STANDIN_NET}.get(args.network, ZOO_SEGRESNET)
        parser = ConfigParser(zoo_config(items, work / "out", args.device, network))
        if args.network == "standin":
            parser["network"] = intensity_standin(parser.get_parsed_content("network_def")).to(args.device).eval()
        tta = None
        roi = [240, 240, 160]
        params = sum(p.numel() for p in parser.get_parsed_content("network").parameters())
    else:
        parser, roi, params = our_workflow(args, case, work)
        tta = args.child == "tta"
        if args.child == "plain":
            use_plain_loading(parser)
    cases = []
    for _ in range(args.cases):
        with _Cwd(ROOT):
            cases.append(run_case(parser, cuda, tta))
    with _Cwd(ROOT):
        steps = preprocessing_steps(parser, items[0])
    return {
        "mode": args.child,
        "network": args.network,
        "parameters": params,
        "roi_size": list(roi),
        "peak_rss_mb_before_first_case": round(rss_before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "cases": cases,
        "preprocessing_steps_s": steps,
    }


def our_workflow(args: argparse.Namespace, case: Path, work: Path) -> tuple[ConfigParser, list[int], int]:
    """configs/inference.yaml on ``case`` with a checkpoint of the chosen network saved as training saves it."""
    overrides: dict[str, Any] = {
        "dataset_dir": str(case),
        "output_dir": str(work / "out"),
        "checkpoint": str(work / "model.pt"),
        "device": f"$torch.device({args.device!r})",
        "flip_batch_size": args.flip_batch_size,
        "overwrite": True,
    }
    if args.sw_batch_size:
        overrides["sw_batch_size"] = args.sw_batch_size
    # the network as training builds it (full: train.yaml, demo: + demo.yaml), saved with its plan as
    # training saves it; inference builds it from that plan, window = the training patch
    parser = ConfigParser()
    parser.read_config(
        [str(ROOT / "configs" / c) for c in ("train.yaml", "demo.yaml")[: 2 if args.network == "demo" else 1]]
    )
    if args.network in ("tiny", "standin"):
        parser["network_factory"] = {**(TINY_NET if args.network == "tiny" else STANDIN_NET), "_mode_": "callable"}
        parser["patch_size"] = [128, 128, 128]
    with _Cwd(ROOT):
        network = parser.get_parsed_content("network_def")
        if args.network == "standin":
            intensity_standin(network)
        patch = parser.get_parsed_content("patch_size")
        recipe = parser.get_parsed_content("inference_recipe")  # M4's: flips, thresholds, the four steps
    save_model(work / "model.pt", network, patch_size=patch, inference_recipe=recipe)
    roi = [args.roi] * 3 if args.roi else patch
    if args.roi:
        overrides["window"] = roi
    params = sum(p.numel() for p in network.parameters())
    del network
    with _Cwd(ROOT):
        workflow = ConfigWorkflow(
            config_file="configs/inference.yaml", workflow_type="inference", logging_file=False, **overrides
        )
        workflow.initialize()
    return workflow.parser, list(roi), params


def use_plain_loading(parser: ConfigParser) -> None:
    """Our preprocessing with MONAI's own loading in place of the bundle's loader: ``LoadImaged`` with
    ``NibabelReader`` (one file after the other, zlib) and float32 from the load, as before the fast path.
    Same voxels either way (tests/test_loading.py); the later float32 conversion is then a no-op."""
    from monai.data import NibabelReader
    from monai.transforms import LoadImaged

    preprocessing = parser.get_parsed_content("preprocessing")  # also Invertd's: replaced in place
    loader, *rest = preprocessing.transforms
    plain = LoadImaged(
        keys=loader.keys, reader=NibabelReader(), ensure_channel_first=True, image_only=True, allow_missing_keys=True
    )
    preprocessing.transforms = (plain, *rest)


def median_of(values: list[float]) -> float | None:
    """Median rounded to ms, ``None`` for no values."""
    return round(statistics.median(values), 3) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the processes of one mode: first case and steady (every later case), wall and CPU."""
    out: dict[str, Any] = {"processes": len(runs), "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs)}
    for clock in ("wall", "cpu"):
        for which, cases in (
            ("first", [r["cases"][0] for r in runs]),
            ("steady", [c for r in runs for c in r["cases"][1:]]),
        ):
            if not cases:
                continue
            out[f"{which}_{clock}"] = {
                key: median_of([c[clock][key] for c in cases]) for key in ("total_s", "network_s", "overhead_s")
            }
            parts = sorted({k for c in cases for k in c[clock]["breakdown_s"]})
            out[f"{which}_{clock}"]["breakdown_s"] = {
                k: median_of([c[clock]["breakdown_s"].get(k, 0.0) for c in cases]) for k in parts
            }
    every = [c for r in runs for c in r["cases"]]
    out["windows_per_s"] = median_of([c["windows_per_s"] for c in every if c["windows_per_s"]])
    out["volumes_per_s"] = median_of([c["volumes_per_s"] for c in every])
    steps = sorted({k for r in runs for k in r["preprocessing_steps_s"]}, key=lambda k: int(k.split(":")[0]))
    out["preprocessing_steps_s"] = {k: median_of([r["preprocessing_steps_s"][k] for r in runs]) for k in steps}
    return out


def main() -> None:
    """Run every mode in fresh processes, alternating, ``--rounds`` times; print and save the medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default=None, help="case folder (default: BraTS2021_00000 sample, else synthetic)")
    ap.add_argument("--network", choices=["full", "demo", "tiny", "standin"], default="full")
    ap.add_argument("--roi", type=int, default=None, help="window edge (default: train.yaml's for the network)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--flip-batch-size", type=int, default=None)
    ap.add_argument("--sw-batch-size", type=int, default=None, help="windows per network call (default: the config's)")
    ap.add_argument("--modes", default="notta,tta", help="notta (= ours), plain, tta, zoo: one process each")
    ap.add_argument("--rounds", type=int, default=1, help="how often the list of modes is run (alternating)")
    ap.add_argument("--cases", type=int, default=1, help="cases segmented per process (first + steady)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"notta", "ours", "plain", "tta", "zoo"})
    if unknown:
        ap.error(f"unknown modes {unknown}; expected notta (= ours), plain, tta, zoo")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = list(os.getloadavg())
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    passthrough = list(sys.argv[1:])  # the child runs with the same options, without --json
    for i, arg in reversed(list(enumerate(passthrough))):
        if arg.startswith("--json="):
            del passthrough[i]
        elif arg == "--json":
            del passthrough[i : i + 2]
    for round_index in range(args.rounds):
        for mode in modes:
            command = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--child", mode]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            result = next((line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
            if done.returncode or result is None:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"mode {mode} (round {round_index + 1}) failed with exit status {done.returncode}")
            runs[mode].append(json.loads(result))
            print(f"round {round_index + 1}/{args.rounds} {mode}: done", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "case": str(args.case or (DEFAULT_CASE if DEFAULT_CASE.is_dir() else "synthetic 240 x 240 x 155")),
        "network": args.network,
        "device": args.device,
        "torch_threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "cases_per_process": args.cases,
        "summary": {mode: summarise(r) for mode, r in runs.items()},
        "runs": runs,
    }
    print(json.dumps(report["summary"], indent=2))
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
