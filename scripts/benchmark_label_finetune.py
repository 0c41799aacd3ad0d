"""Seconds per case of MONAI Label inference before and after one epoch of fine-tuning in MONAI Label + a restart.

Issue 21's done-means: a checkpoint trained by ``configs/cpu.yaml``, fine-tuned one epoch through MONAI
Label, keeps its recorded window and recipe and infers at the same speed after a server restart. This
script does what a user does and times it in one run:

1. trains a short ``configs/cpu.yaml`` checkpoint (``python -m monai.bundle run training`` with
   ``--epochs 1 --steps_per_epoch N``), unless ``--checkpoint`` gives one;
2. serves it (``label_serve``'s steps: studies view, served weights, app) on ``--dataset_dir`` and times
   ``MONAILabelClient.infer`` of one case ``--repeats`` times (one warm-up request first, not counted);
3. clicks Train (``train_start`` with ``max_epochs 1``, MONAI Label's trainer on the cases' labels),
   waits for it, stops the server, starts it again as ``label_serve`` does and times the same case
   the same way;
4. compares the plans (window, patch, inference recipe) of the served checkpoint before and after.

Repeat ``i`` before and repeat ``i`` after form a pair; the result is the median of the ratios
after / before. Needs the MONAI Label venv. Writes ``results.json`` and ``README.md`` to ``--output``.

    .venv-label/bin/python scripts/benchmark_label_finetune.py --dataset_dir ../shared/brats_samples \
        --output docs/benchmarks/label_finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bundle.integrations.monailabel import MODEL_NAME, prepare_server, start_server
from bundle.plan import read_plan
from bundle.plan.specs import same_component

ROOT = Path(__file__).resolve().parents[1]
#: The parts of a plan that decide how a model is inferred.
PLAN_KEYS = ("network", "input_channels", "preprocessing", "patch_size", "window", "inference_recipe")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train_cpu_checkpoint(dataset_dir: Path, output: Path, steps: int) -> Path:
    """A short ``configs/cpu.yaml`` training (one epoch of ``steps`` steps) on ``dataset_dir``; its model.pt."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.yaml','configs/cpu.yaml']",
        "--dataset_dir",
        str(dataset_dir),
        "--epochs",
        "1",
        "--steps_per_epoch",
        str(steps),
        "--num_folds",
        "2",
        "--holdout_fraction",
        "0",
        "--output_dir",
        str(output / "runs"),
        "--ckpt_dir",
        str(output / "models"),
    ]
    subprocess.run(command, cwd=ROOT, check=True)
    return output / "models" / "model.pt"


class Served:
    """One MONAI Label server on the benchmark's work folder, started as ``label_serve`` starts it."""

    def __init__(self, dataset_dir: Path, checkpoint: Path, work: Path, overrides: dict[str, Any]) -> None:
        self.dataset_dir, self.checkpoint, self.work, self.overrides = dataset_dir, checkpoint, work, overrides
        self.process: Any = None
        self.client: Any = None

    def start(self) -> None:
        """Prepare (studies, served weights, app) and start the server; wait until it answers."""
        from monailabel.client import MONAILabelClient

        app, studies = prepare_server(
            self.dataset_dir, self.checkpoint, self.work, tta=False, overrides=self.overrides or None
        )
        port = free_port()
        self.process = start_server(app, studies, port=port, log_file=self.work / "server.log")
        (self.work / "client").mkdir(exist_ok=True)
        self.client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(self.work / "client"))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.client.info()
                return
            except Exception:  # not listening yet
                time.sleep(3)
        raise RuntimeError(f"the server did not start; see {self.work / 'server.log'}")

    def stop(self) -> None:
        """Stop the server by its process group."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers: one process group
            self.process.wait(timeout=120)

    def seconds_per_case(self, case: str, repeats: int) -> list[float]:
        """Wall-clock seconds of ``repeats`` ``POST /infer`` of ``case`` (one pass), after one warm-up request."""
        times = []
        for index in range(repeats + 1):
            start = time.perf_counter()
            label, _ = self.client.infer(MODEL_NAME, case, {"device": "cpu", "tta": False})
            seconds = time.perf_counter() - start
            assert label and Path(label).is_file(), "no label map returned"
            Path(label).unlink()
            if index:
                times.append(seconds)
        return times

    def fine_tune(self, timeout: float = 3600) -> dict[str, Any]:
        """One epoch of MONAI Label's training on the labelled cases (a click on Train); its status and stats."""
        started = time.perf_counter()
        self.client.train_start(MODEL_NAME, {"max_epochs": 1, "multi_gpu": False, "device": "cpu", "val_split": 0.34})
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.client.train_status()
            if status.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(5)
        if status.get("status") != "DONE":
            raise RuntimeError(f"fine-tuning ended {status.get('status')}: {list(status.get('details', []))[-5:]}")
        return {
            "seconds": time.perf_counter() - started,
            "train_stats": self.client.info()["train_stats"][MODEL_NAME],
        }


def main() -> None:
    """Train (or take) a configs/cpu.yaml checkpoint, time, fine-tune, restart, time; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", type=Path, default=ROOT.parent / "shared" / "brats_samples")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a configs/cpu.yaml checkpoint (else trained)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the short configs/cpu.yaml training")
    parser.add_argument("--case", default=None, help="the case to time (default: the first of the dataset)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--fine_tune_steps",
        type=int,
        default=None,
        help="steps of the fine-tuning epoch (label_serve --steps_per_epoch; default: the plan's)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "benchmark_label_finetune")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks" / "label_finetune")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    args.work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        args.checkpoint = train_cpu_checkpoint(args.dataset_dir.resolve(), args.work / "cpu_training", args.steps)
    case = args.case or sorted(p.name for p in args.dataset_dir.iterdir() if p.is_dir())[0]
    overrides = {} if args.fine_tune_steps is None else {"steps_per_epoch": args.fine_tune_steps}
    served = Served(args.dataset_dir.resolve(), args.checkpoint.resolve(), args.work / "label", overrides)
    plan_before = read_plan(args.checkpoint)

    served.start()
    try:
        before = served.seconds_per_case(case, args.repeats)
        tuning = served.fine_tune()
    finally:
        served.stop()
    served.start()  # the same steps as label_serve at every start: the trained weights are served
    try:
        after = served.seconds_per_case(case, args.repeats)
    finally:
        served.stop()
    plan_after = read_plan(args.work / "label" / "models" / "model.pt")

    ratios = [a / b for a, b in zip(after, before)]
    kept = {key: same_component(plan_after[key], plan_before[key]) for key in PLAN_KEYS}
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "dataset_dir": str(args.dataset_dir),
        "case": case,
        "checkpoint": str(args.checkpoint),
        "window": {"before": plan_before.get("window"), "after": plan_after.get("window")},
        "patch_size": {"before": plan_before["patch_size"], "after": plan_after["patch_size"]},
        "plan_kept": kept,
        "seconds_per_case_before": before,
        "seconds_per_case_after_fine_tuning_and_restart": after,
        "ratio_after_over_before": ratios,
        "median_ratio": statistics.median(ratios),
        "fine_tuning": {**tuning, "label_serve_overrides": overrides},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2, default=str))
    tuned_eval = json.dumps(tuning["train_stats"].get("eval", {}))
    rows = "\n".join(f"| {i + 1} | {b:.2f} | {a:.2f} | {a / b:.2f} |" for i, (b, a) in enumerate(zip(before, after)))
    (args.output / "README.md").write_text(
        f"# MONAI Label: inference speed before and after fine-tuning + restart ({results['date']})\n\n"
        f"```bash\n{results['command']}\n```\n\n"
        f"Case `{case}` of `{args.dataset_dir}`, served one pass (no TTA) on {os.cpu_count()} CPU cores "
        f"shared with other work; checkpoint trained by configs/cpu.yaml. Fine-tuning: one epoch through MONAI "
        f"Label's trainer ({tuning['seconds']:.0f} s, train_stats {tuned_eval}"
        f"{', label_serve overrides ' + json.dumps(overrides) if overrides else ''}).\n\n"
        f"Window before / after: {plan_before.get('window')} / {plan_after.get('window')}; patch "
        f"{plan_before['patch_size']} / {plan_after['patch_size']}; plan kept: "
        f"{', '.join(k for k, v in kept.items() if v)}"
        f"{'; changed: ' + ', '.join(k for k, v in kept.items() if not v) if not all(kept.values()) else ''}.\n\n"
        "| repeat | s/case before | s/case after fine-tuning + restart | after / before |\n|---|---|---|---|\n"
        f"{rows}\n\nMedian ratio after / before: **{results['median_ratio']:.2f}**. Raw data: `results.json`.\n"
    )
    print((args.output / "README.md").read_text())


if __name__ == "__main__":
    main()
