"""Seconds per full-size BraTS case through MONAI Label, one pass and 8-flip TTA, measured in one run.

Serves a real BraTS 2021 case folder (``label_serve``'s steps: studies view, served weights, app) with
the default full-width network of configs/train.yaml, randomly initialised (untrained weights give the
timing, not a segmentation), and times ``MONAILabelClient.infer`` for the same case: first one pass
(the CPU default), then with ``{"tta": true}`` in the request. The bundle's own inference of the case
in this process (``bundle.inference.run.infer``, one pass) is the baseline, so the server's overhead shows.
Needs the MONAI Label venv. Prints a Markdown table and writes ``results.json``.

    .venv-label/bin/python scripts/benchmark_label_inference.py --studies ../shared/brats_samples \
        --output runs/benchmark_label
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from bundle.inference.run import infer
from bundle.integrations.monailabel import MODEL_NAME, prepare_server, start_server
from bundle.plan.checkpoints import save_model

ROOT = Path(__file__).resolve().parents[1]


def random_full_width_checkpoint(path: Path) -> Path:
    """train.yaml's network as it is (full width), random weights, patch as train.yaml's patch_size."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.yaml"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    return save_model(path, network, patch_size=parser.get_parsed_content("patch_size"))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed_infer(client: Any, case: str, params: dict[str, Any]) -> float:
    """Wall-clock seconds of one ``POST /infer`` for ``case``, the label file received."""
    start = time.perf_counter()
    label, _ = client.infer(MODEL_NAME, case, params)
    seconds = time.perf_counter() - start
    assert label and Path(label).is_file(), "no label map returned"
    return seconds


def main() -> None:
    """Serve, time one pass and TTA through the client, time the bundle's own inference; print and save."""
    from monailabel.client import MONAILabelClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", required=True, help="a BraTS 2021 / 2023 folder (the first case is timed)")
    parser.add_argument("--output", default="runs/benchmark_label")
    parser.add_argument("--skip_tta", action="store_true", help="time one pass only")
    args = parser.parse_args()
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = random_full_width_checkpoint(out / "random_full_width.pt")
    case_dir = sorted(p for p in Path(args.studies).iterdir() if p.is_dir())[0]

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "case": case_dir.name,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "cuda": torch.cuda.is_available(),
        "network": "train.yaml's network_factory, full width, random weights",
    }
    start = time.perf_counter()
    infer(str(case_dir), output=str(out / "bundle_infer"), checkpoint=str(checkpoint), tta=False, overwrite=True)
    results["bundle_infer_one_pass_s"] = round(time.perf_counter() - start, 1)

    app, studies = prepare_server(args.studies, checkpoint, out / "work", tta=None)  # the CPU default: one pass
    port = free_port()
    process = start_server(app, studies, port=port, log_file=out / "server.log")
    try:
        client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(out / "client"))
        (out / "client").mkdir(exist_ok=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                results["served_tta_default"] = client.info()["models"][MODEL_NAME]["config"]["tta"]
                break
            except Exception:  # not listening yet
                time.sleep(3)
        results["server_one_pass_s"] = round(timed_infer(client, case_dir.name, {}), 1)
        if not args.skip_tta:
            results["server_tta_8_flips_s"] = round(timed_infer(client, case_dir.name, {"tta": True}), 1)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['date']}, {results['machine']}, CUDA: {results['cuda']}, case {results['case']}")
    print("| inference of one full-size case | seconds |\n|---|---|")
    print(f"| bundle.inference.run, one pass (baseline, no server) | {results['bundle_infer_one_pass_s']} |")
    print(f"| MONAI Label, one pass (CPU default) | {results['server_one_pass_s']} |")
    if "server_tta_8_flips_s" in results:
        print(f'| MONAI Label, 8-flip TTA (`{{"tta": true}}`) | {results["server_tta_8_flips_s"]} |')


if __name__ == "__main__":
    main()
