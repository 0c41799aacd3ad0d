"""scripts/benchmark_inference.py: its stand-in network and one run of the overhead comparison."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmark_inference.py"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standin_thresholds_the_z_scores() -> None:
    """Region r's logit is 8 * (z-score of its channel - its threshold): WT from FLAIR, TC and ET from T1ce."""
    bench = _script()
    network = bench.intensity_standin(
        torch.nn.Conv3d(**{k: v for k, v in bench.STANDIN_NET.items() if k != "_target_"})
    )
    z = torch.randn(1, 4, 5, 6, 7)
    logits = network(z)
    t1ce, flair = z[:, 1], z[:, 3]
    expected = torch.stack([8 * (flair - 1.5), 8 * (t1ce - 2.0), 8 * (t1ce - 2.5)], dim=1)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_overhead_run_reports_ours_and_the_zoo(tmp_path: Path) -> None:
    """docs/benchmarks/inference.md's command on a small phantom: both pipelines segment it and report overheads."""
    bench = _script()
    case = bench.synthetic_case(tmp_path / "data", shape=(64, 72, 48))
    report = tmp_path / "report.json"
    command = [sys.executable, str(SCRIPT), "--case", str(case), "--network", "standin", "--modes", "ours,zoo"]
    command += ["--cases", "2", "--threads", "1", "--json", str(report)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    summary = json.loads(report.read_text())["summary"]
    for mode in ("ours", "zoo"):
        for clock in ("first_wall", "steady_wall"):
            timing = summary[mode][clock]
            assert 0 < timing["network_s"] < timing["total_s"] and timing["overhead_s"] > 0, (mode, clock)
    # ours runs M4's clean-up steps on the stand-in's tumour: they are timed, so they ran
    assert summary["ours"]["first_wall"]["breakdown_s"]["post: CloseTumourRegionsd"] > 0
