"""``bundle compare`` with several regions, variants or repeated runs: Holm-adjusted p-values, runs paired by seed."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle.evaluation.files import write_metrics_csv
from bundle.evaluation.statistics import holm, with_holm
from bundle.integrations.cli import main


def test_holm_matches_a_hand_computed_example() -> None:
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06: step-down)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02]  # one test: nothing to adjust


def test_a_difference_significant_alone_is_not_after_holm_over_three_regions() -> None:
    rows = [
        {"region": g, "metric": "dice", "mean_diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p_wilcoxon": p}
        for g, p in (("WT", 0.02), ("TC", 0.03), ("ET", 0.04))
    ]
    adjusted = {r["region"]: r for r in with_holm(rows, "p_wilcoxon", alpha=0.05)}
    assert [adjusted[g]["p_holm"] for g in ("WT", "TC", "ET")] == pytest.approx([0.06, 0.06, 0.06])
    assert all(r["verdict"] == "no significant difference" for r in adjusted.values())
    assert with_holm(rows[:1], "p_wilcoxon")[0]["verdict"].startswith("B better")


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["bundle", *args])
    main()
    return capsys.readouterr().out


def _table(path: Path, shift: float, seed: int, folds: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {"case": f"c{i:02d}", "region": g, **({"fold": i % 2} if folds else {}), "dice": 0.7 + shift + noise}
        for i in range(12)
        for g in ("WT", "TC", "ET")
        for noise in [rng.normal(0, 0.02)]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(rows, path)
    return path


def test_bundle_compare_of_two_variants_holm_adjusts_over_regions_and_variants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    a, b, c = (_table(tmp_path / n / "metrics.csv", s, i) for i, (n, s) in enumerate((("a", 0), ("b", 0.05), ("c", 0))))
    out = tmp_path / "cmp.csv"
    printed = _main(monkeypatch, capsys, ["compare", str(a.parent), str(b.parent), str(c.parent), "--output", str(out)])
    header = printed.splitlines()[0]
    assert "p Holm-adjusted" in header and header.startswith("variant")
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6  # 3 regions x 2 variants, one family
    assert [float(r["p_holm"]) for r in rows] == pytest.approx(holm([float(r["p_wilcoxon"]) for r in rows]))
    assert all(r["verdict"].startswith("B better") for r in rows if r["variant"] == str(b))


def test_bundle_compare_of_repeated_cross_validations_reports_mean_sd_over_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Each run's figure is its mean of fold means; the runs pair by seed (a paired t-test across them)."""
    for seed in (1, 2, 3):
        _table(tmp_path / "a" / f"seed_{seed}" / "cv_metrics.csv", 0.0, seed, folds=True)
        _table(tmp_path / "b" / f"seed_{seed}" / "cv_metrics.csv", 0.1, seed + 10, folds=True)
    out = tmp_path / "runs.csv"
    printed = _main(monkeypatch, capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out)])
    assert printed.splitlines()[0].startswith("3 runs per side, paired by seed")
    assert "A mean +- sd" in printed and "p Holm-adjusted" in printed
    with out.open() as handle:
        rows = {r["region"]: r for r in csv.DictReader(handle)}
    figures = []
    for seed in (1, 2, 3):
        with (tmp_path / "a" / f"seed_{seed}" / "cv_metrics.csv").open() as handle:
            wt = [r for r in csv.DictReader(handle) if r["region"] == "WT"]
        figures.append(np.mean([np.mean([float(r["dice"]) for r in wt if r["fold"] == f]) for f in ("0", "1")]))
    assert float(rows["WT"]["mean_a"]) == pytest.approx(np.mean(figures))
    assert float(rows["WT"]["mean_a_sd"]) == pytest.approx(np.std(figures, ddof=1))
    assert int(rows["WT"]["n_runs"]) == 3 and float(rows["WT"]["mean_diff"]) == pytest.approx(0.1, abs=0.03)
    # a repeated cross-validation against one run: not alike
    plain = _table(tmp_path / "plain" / "cv_metrics.csv", 0.0, 5, folds=True)
    monkeypatch.setattr(sys, "argv", ["bundle", "compare", str(tmp_path / "a"), str(plain.parent)])
    with pytest.raises(SystemExit, match=r"plain: not a repeated cross-validation \(no seed_<s>/cv_metrics.csv\)"):
        main()
    # another seed on one side: the runs cannot be paired
    _table(tmp_path / "b" / "seed_4" / "cv_metrics.csv", 0.1, 4, folds=True)
    monkeypatch.setattr(sys, "argv", ["bundle", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match=r"seeds \[1, 2, 3, 4\] differ from .*'s \[1, 2, 3\]; runs are paired by seed"):
        main()
