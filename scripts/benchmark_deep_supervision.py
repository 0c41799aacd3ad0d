"""The cost of M4's two deep-supervision forms: labels down-sampled to each head vs heads up-sampled.

``upsample_ds_heads: false`` (M4, nnU-Net) keeps the two auxiliary heads at 1/2 and 1/4 resolution and
MONAI's ``DeepSupervisionLoss`` down-samples the labels to them; ``true`` up-samples the heads to the
full patch (MONAI ``DynUNet``'s form) and computes the loss there. Everything else is
``configs/train.yaml``: its network (``network``: device, channels-last), loss and optimiser, built
with MONAI's ``ConfigParser``; a step is what ``SupervisedTrainer`` does per iteration (forward, loss,
backward, Adam step) on random images and region labels.

Each measurement runs in its own child process, so its peak resident memory is its own; the two
forms alternate (A, B, A, B, ...) because the machine is shared and its speed drifts. The whole steps
share the network's cost, which dominates and drowns the difference in noise on a loaded machine, so
each child also times the part that differs on its own: from the decoder's raw outputs (main output
and the heads at their own resolution, leaf tensors) to the loss and its backward pass, with the
labels down-sampled by the loss (M4) or the heads up-sampled as MONAI's ``DynUNet`` does.

    python scripts/benchmark_deep_supervision.py                                  # demo network, 64^3
    python scripts/benchmark_deep_supervision.py --filters 32,64,128,256,320,320 --patch 128 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
MODES = {"labels down-sampled (M4)": False, "heads up-sampled": True}


def measure(upsample: bool, filters: list[int], patch: int, batch: int, steps: int, threads: int) -> dict:
    """Median seconds of ``steps`` training steps after one warm-up, and this process's peak RSS."""
    from monai.bundle import ConfigParser

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(REPO_ROOT), "upsample_ds_heads": upsample, "network_factory#filters": filters})
    network = parser.get_parsed_content("network").train()
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    device = parser.get_parsed_content("device")
    channels = len(parser.get_parsed_content("input_channels"))
    image = torch.randn(batch, channels, patch, patch, patch, device=device)
    label = torch.zeros(batch, 3, patch, patch, patch, device=device)
    quarter = patch // 4
    label[:, 0, quarter : 3 * quarter, quarter : 3 * quarter, quarter : 3 * quarter] = 1  # WT
    label[:, 1:, quarter + 4 : 2 * quarter, quarter + 4 : 2 * quarter, quarter + 4 : 2 * quarter] = 1  # TC, ET
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(image), label)
        loss.backward()
        optimizer.step()
        if step:  # the first step is the warm-up (allocator, oneDNN kernel selection)
            seconds.append(time.perf_counter() - start)
    heads = network(image)
    shapes = [list(h.shape) for h in heads] if isinstance(heads, list) else [list(heads.shape)]
    supervision = time_supervision(network, image, label, loss_fn, upsample, repeats=10)
    return {
        "upsample_ds_heads": upsample,
        "step_seconds": [round(s, 3) for s in seconds],
        "median_step_seconds": round(statistics.median(seconds), 3),
        "supervision_seconds": round(supervision, 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "output_shapes": shapes,
        "loss": round(loss.item(), 4),
    }


def time_supervision(
    network: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: object, upsample: bool, repeats: int
) -> float:
    """Median seconds from the raw outputs (main, heads at their own size) to the loss and its gradients."""
    network.upsample_heads = False  # the raw heads, as the decoder makes them
    with torch.no_grad():
        raw = [t.detach() for t in network(image)]
    network.upsample_heads = upsample
    seconds = []
    for _ in range(repeats):
        outputs = [t.clone().requires_grad_(True) for t in raw]
        start = time.perf_counter()
        if upsample:  # MONAI DynUNet.forward: nearest up-sampling to the main output's size, stacked
            main = outputs[0]
            pred = torch.stack([main, *(F.interpolate(h, main.shape[2:]) for h in outputs[1:])], dim=1)
        else:
            pred = outputs
        loss_fn(pred, label).backward()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    """Alternate the two forms in child processes and print a JSON report and a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", default="8,16,32,64,80,80", help="network_factory#filters (demo: 8..80)")
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per child, after one warm-up step")
    parser.add_argument("--rounds", type=int, default=2, help="A, B rounds (one child per form per round)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    filters = [int(f) for f in args.filters.split(",")]
    if args.child:
        result = measure(args.child == "true", filters, args.patch, args.batch, args.steps, args.threads)
        print(json.dumps(result))
        return

    results: dict[str, list[dict]] = {name: [] for name in MODES}
    for round_ in range(args.rounds):
        for name, upsample in MODES.items():
            command = [sys.executable, __file__, "--child", str(upsample).lower(), "--filters", args.filters]
            command += ["--patch", str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps)]
            command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}, {name}: {results[name][-1]}", file=sys.stderr, flush=True)

    report = {
        "filters": filters,
        "patch": args.patch,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    baseline = statistics.median(s for r in results["labels down-sampled (M4)"] for s in r["step_seconds"])
    print(f"\nfilters {filters}, {args.patch}^3 patches, batch {args.batch}, {args.threads} thread(s)\n")
    supervision = statistics.median(r["supervision_seconds"] for r in results["labels down-sampled (M4)"])
    print(
        "| deep supervision | step (s), median | each round's median | vs M4 | heads -> loss -> backward (s) "
        "| vs M4 | peak RSS (GB) per round |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        median = statistics.median(s for r in runs for s in r["step_seconds"])
        rounds = ", ".join(f"{r['median_step_seconds']:.3f}" for r in runs)
        part = statistics.median(r["supervision_seconds"] for r in runs)
        rss = ", ".join(f"{r['peak_rss_gb']:.2f}" for r in runs)
        cells = [name, f"{median:.3f}", rounds, f"{median / baseline:.2f}x"]
        cells += [f"{part:.4f}", f"{part / supervision:.2f}x", rss]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
