"""Parameter count, FLOPs/MACs and CPU forward+backward time of the bundle's network variants.

Usage::

    python scripts/benchmark_networks.py                 # every variant, markdown table on stdout
    python scripts/benchmark_networks.py --only m4_baseline,m4_resunet_ds,unet

Every network is the one its config stack builds (``configs/train.yaml`` [+ ``train_2d.yaml``] +
the variant file, parsed with MONAI's ``ConfigParser``: ``network_def``, with ``input_channels``
giving the input), so a row cannot drift from its file. Each variant runs in its own child process
so its peak memory (max RSS) is its own and an out-of-memory kill cannot end the whole run. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (no computation, so the
count is exact for the full input size at no cost); MACs = FLOPs / 2 (the counter counts one
multiply-add as two FLOPs and counts only matmul/convolution-like ops). The time is the mean of
``--iters`` forward+backward passes (one for 3-D) in training mode (deep-supervision heads
included) with batch 1, after one warm-up pass. A 3-D variant whose pass would take longer than
``--max-seconds`` at its size (estimated from its FLOPs and the throughput measured so far, or
seen in its warm-up) is measured at the fallback size instead, and the table says so (variants run in
the order listed below, so the throughput is known before the large ones: keep ``m4_baseline`` in
an ``--only`` list that has ``m4_resunet_ds``, whose 128^3 pass would need ~16 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

TRAIN_3D = ("configs/train.yaml",)
TRAIN_2D = ("configs/train.yaml", "configs/train_2d.yaml")


@dataclass(frozen=True)
class Variant:
    """One network setting to benchmark: the network its config stack builds."""

    name: str
    description: str
    config_files: tuple[str, ...]
    spatial_dims: int
    size: int
    fallback_size: int | tuple[int, ...] | None = None

    def _parser(self):  # noqa: ANN202 - monai.bundle is imported in the child process only
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(REPO_ROOT / f) for f in self.config_files])
        parser["bundle_root"] = str(REPO_ROOT)
        return parser

    def build(self) -> nn.Module:
        """``network_def`` of the config stack (a fresh, randomly initialised network)."""
        return self._parser().get_parsed_content("network_def")

    @property
    def in_channels(self) -> int:
        """The channels the config's preprocessing gives the network (``input_channels``)."""
        return len(self._parser().get_parsed_content("input_channels"))


def _variants() -> list[Variant]:
    """The bundle's method settings and the MONAI baselines, each from its config files."""
    return [
        Variant(
            "m1_la_resunet",
            "ResUNet 2-D, M1: stem, strided conv, BN/ReLU, 32-512, 3 sigmoid regions",
            (*TRAIN_2D, "configs/variants/m1_la_resunet.yaml"),
            2,
            240,
        ),
        Variant(
            "m2_resunet_tversky",
            "ResUNet 2-D, M2: max-pool, BN/ReLU, 32-512, 1 binary channel",
            (*TRAIN_2D, "configs/variants/m2_resunet_tversky.yaml"),
            2,
            256,
        ),
        Variant(
            "m3_resse_lka_unet",
            "ResSELKAUNet 2-D, M3: 32-512, CE bottleneck, 3 DS heads, 4 classes",
            (*TRAIN_2D, "configs/variants/m3_resse_lka_unet.yaml"),
            2,
            128,
        ),
        Variant(
            "m4_baseline",
            "configs/train.yaml (default), M4's baseline: M4UNet (DynUNet, res_block), 6 levels 32-320, "
            "IN/LeakyReLU, 2 DS heads at their own resolution",
            TRAIN_3D,
            3,
            128,
            96,
        ),
        Variant(
            "m4_resunet_ds",
            "M4's best: M4UNet, 7 levels 64-512, +salient channel (5 in), 2 DS heads at their own resolution",
            (*TRAIN_3D, "configs/variants/m4_resunet_ds.yaml"),
            3,
            128,
            # sizes must be multiples of 64 (no 96^3) and 64^3 leaves a 1-voxel bottleneck (instance norm
            # breaks); a 128^3 pass needs ~12 TFLOPs and ~16 GB (estimated), most of this shared machine
            (128, 64, 64),
        ),
        Variant(
            "unet",
            "MONAI UNet 3-D: 16-256, strides 2, 2 residual units",
            (*TRAIN_3D, "configs/variants/unet.yaml"),
            3,
            128,
            96,
        ),
        Variant(
            "attention_unet",
            "MONAI AttentionUnet 3-D: 16-256, strides 2",
            (*TRAIN_3D, "configs/variants/attention_unet.yaml"),
            3,
            128,
            96,
        ),
        Variant(
            "segresnet",
            "MONAI SegResNet 3-D, zoo: blocks_down 1,2,2,4, blocks_up 1,1,1, init_filters 16, dropout 0.2",
            (*TRAIN_3D, "configs/variants/segresnet.yaml"),
            3,
            128,
            96,
        ),
        Variant(
            "dynunet",
            "MONAI DynUNet 3-D as shipped, nnU-Net style: 6 levels 32-320, no residual, IN/LeakyReLU, "
            "2 DS heads up-sampled",
            (*TRAIN_3D, "configs/variants/dynunet.yaml"),
            3,
            128,
            96,
        ),
        Variant(
            "swinunetr",
            "MONAI SwinUNETR 3-D, feature_size 48",
            (*TRAIN_3D, "configs/variants/swinunetr.yaml"),
            3,
            128,
            96,
        ),
    ]


def count_parameters(variant: Variant) -> int:
    """Trainable parameters, counted on the meta device (no memory) where the network builds there."""
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                net = variant.build()
            break
        except (RuntimeError, NotImplementedError):
            if device == "cpu":
                raise
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def input_shape(variant: Variant, size: int | tuple[int, ...]) -> tuple[int, ...]:
    """``(1, channels, *spatial)`` for a cubic side or an explicit spatial shape."""
    spatial = tuple(size) if isinstance(size, tuple) else (size,) * variant.spatial_dims
    return (1, variant.in_channels, *spatial)


def size_text(size: int | tuple[int, ...], spatial_dims: int = 3) -> str:
    """``96^3`` for a cube, ``128x64x64`` otherwise."""
    return "x".join(map(str, size)) if isinstance(size, tuple) else f"{size}^{spatial_dims}"


def count_flops(variant: Variant, size: int | tuple[int, ...]) -> int:
    """Forward FLOPs for one input of batch 1: on the meta device, or on the CPU if the net needs real values."""
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                net = variant.build().eval()
                x = torch.zeros(input_shape(variant, size))
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(x)
            return int(counter.get_total_flops())
        except (RuntimeError, NotImplementedError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _outputs(output: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """The training output's tensors: one, stacked heads, or M4UNet's list of heads at their own sizes."""
    return output if isinstance(output, list) else [output]


def time_forward_backward(net: nn.Module, x: torch.Tensor, iters: int) -> float:
    """Mean seconds of a training forward + backward over ``iters`` passes."""
    total = 0.0
    for _ in range(iters):
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        sum(y.float().square().mean() for y in _outputs(net(x))).backward()
        total += time.perf_counter() - start
    return total / iters


def run_one(variant: Variant, size: int | tuple[int, ...], iters: int, max_seconds: float) -> dict:
    """Benchmark one variant at one size in this process."""
    torch.manual_seed(0)
    net = variant.build().train()
    x = torch.randn(input_shape(variant, size))
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    warmup = time_forward_backward(net, x, 1)
    result = {"name": variant.name, "size": size, "params": params, "warmup_s": round(warmup, 3)}
    if warmup > max_seconds:
        result["too_slow"] = True
        return result
    result["seconds"] = round(time_forward_backward(net, x, iters), 3)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def _child(name: str, size: int | tuple[int, ...], iters: int, max_seconds: float, threads: int) -> None:
    torch.set_num_threads(threads)
    variant = next(v for v in _variants() if v.name == name)
    print(json.dumps(run_one(variant, size, iters, max_seconds)))


def _spawn(name: str, size: int | tuple[int, ...], iters: int, max_seconds: float, threads: int) -> dict:
    spec = "x".join(map(str, size)) if isinstance(size, tuple) else str(size)
    command = [sys.executable, __file__, "--child", name, "--size", spec, "--iters", str(iters)]
    command += ["--max-seconds", str(max_seconds), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {
            "name": name,
            "size": size,
            "failed": done.stderr.strip().splitlines()[-1:] or [f"rc {done.returncode}"],
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Benchmark the selected variants and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--iters", type=int, default=3, help="timed passes for 2-D variants (3-D: 1)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per pass before the fallback size")
    # one thread by default: on a shared, loaded 2-core machine two OpenMP threads ran 3-10x slower than one
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="0", help=argparse.SUPPRESS)  # a side, or a shape "128x64x64"
    args = parser.parse_args()
    if args.child:
        size = tuple(int(n) for n in args.size.split("x")) if "x" in args.size else int(args.size)
        _child(args.child, size, args.iters, args.max_seconds, args.threads)
        return

    selected = [v for v in _variants() if not args.only or v.name in args.only.split(",")]
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s), batch 1, training-mode forward+backward\n")
    print("| variant | network | input | params (M) | GFLOPs (fwd) | GMACs (fwd) | fwd+bwd (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    measured_flops, measured_seconds = 0.0, 0.0  # running throughput, to skip sizes that would exceed the limit
    for variant in selected:
        iters = args.iters if variant.spatial_dims == 2 else 1
        flops = count_flops(variant, variant.size)
        shape = "x".join([str(variant.in_channels)] + [str(variant.size)] * variant.spatial_dims)
        params = count_parameters(variant) / 1e6
        size, note = variant.size, ""
        if variant.fallback_size and measured_seconds > 0:
            # backward costs about twice the forward
            estimate = 3 * flops / (measured_flops / measured_seconds)
            if estimate > args.max_seconds:
                size = variant.fallback_size
                note = f" (at {size_text(size)}: {variant.size}^3 estimated {estimate:.0f} s from its FLOPs)"
        # at the fallback size there is nothing smaller to fall back to: measure however long it takes
        limit = args.max_seconds if size == variant.size else float("inf")
        result = _spawn(variant.name, size, iters, limit, args.threads)
        if size == variant.size and (result.get("too_slow") or "failed" in result) and variant.fallback_size:
            why = f"warm-up {result['warmup_s']} s" if result.get("too_slow") else f"failed: {result['failed']}"
            size = variant.fallback_size
            note = f" (at {size_text(size)}: {variant.size}^3 {why})"
            result = _spawn(variant.name, size, iters, float("inf"), args.threads)
        if "seconds" in result:
            measured_flops += 3 * count_flops(variant, size) if size != variant.size else 3 * flops
            measured_seconds += result["seconds"]
        seconds = f"{result['seconds']:.2f}{note}" if "seconds" in result else f"not measured: {result}"
        print(
            f"| {variant.name} | {variant.description} | {shape} | {params:.2f} | {flops / 1e9:.1f} | "
            f"{flops / 2e9:.1f} | {seconds} | {result.get('peak_rss_gb', '?')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
