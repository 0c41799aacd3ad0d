"""Cross-validation (``python -m bundle cv``): two folds end to end on tiny demo data, the fold summary."""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.data import generate_demo_dataset, prepare
from bundle.errors import DataError
from bundle.inference.run import infer
from bundle.integrations.cli import COMMANDS, main
from bundle.integrations.cv import CaseMetricsCollector, parse_fold_ids, run_cv, summarize_folds

# the tiny network and schedule of tests/test_training.py, as command-line flags
TINY_FLAGS = [
    "--patch_size",
    "[32,32,32]",
    "--network_factory#filters",
    "[4,8,16,32,64]",
    "--epochs",
    "1",
    "--val_interval",
    "1",
    "--num_workers",
    "0",
    "--learning_rate",
    "0.001",
]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Small volumes on a shared 2-core machine: one intra-op thread avoids contention overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five labelled 32 x 32 x 24 demo phantoms in the BraTS 2021 layout: train.yaml holds 20 % (one) out."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=5, num_test_cases=0, shape=(32, 32, 24))


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_cv_two_folds_end_to_end_through_the_cli(
    tmp_path: Path, tiny_demo: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default each fold's checkpoint segments its cases as ``bundle infer`` would (its recipe: TTA, thresholds,
    clean-up), and cv ends with the fold-ensemble command, which runs as printed."""
    out = tmp_path / "cv"
    command = ["cv", "--folds", "2", "--dataset_dir", str(tiny_demo), "--output_dir", str(out), *TINY_FLAGS]
    fire.Fire(COMMANDS, command=command)
    printed = capsys.readouterr().out
    assert "mean +- std of the per-fold means" in printed and "dice" in printed
    assert "recipe scoring (each checkpoint's inference recipe, as bundle infer runs it)" in printed
    assert json.loads((out / "fold_0" / "cv_fold.json").read_text()) == {"fold": 0, "seed": 42, "scoring": "recipe"}
    # what fold 0 scored is what bundle infer writes with its checkpoint
    case = next(i["case_id"] for i in json.loads((out / "datalist.json").read_text())["training"] if i["fold"] == 0)
    best = str(out / "fold_0" / "models" / "model.pt")
    (alone,) = infer(str(tiny_demo / case), output=str(tmp_path / "alone"), checkpoint=best)
    scored = out / "fold_0" / "val_predictions" / f"{case}_seg.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(scored).dataobj), np.asarray(nib.load(alone).dataobj))
    # the printed ensemble command, typed as printed
    (line,) = [t.strip() for t in printed.splitlines() if t.strip().startswith("python -m bundle infer")]
    monkeypatch.setattr(sys, "argv", ["bundle", *shlex.split(line)[3:]])
    main()
    assert sorted(p.name for p in (out / "ensemble").glob("*_seg.nii.gz")) == sorted(
        f"{d.name}_seg.nii.gz" for d in tiny_demo.iterdir() if d.is_dir()
    )

    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["num_folds"] == 2 and datalist["holdout_fraction"] == 0.2
    fold_of = {item["case_id"]: item["fold"] for item in datalist["training"]}
    (held,) = [item["case_id"] for item in datalist["holdout"]]  # M4's 20 % test set: in no fold
    assert held not in fold_of and len(fold_of) == 4
    rows = _read_csv(out / "cv_metrics.csv")
    assert list(rows[0])[:3] == ["case", "region", "fold"]
    # every case of the dataset exactly once per region, in the fold it was held out in
    pairs = [(r["case"], r["region"]) for r in rows]
    assert sorted(pairs) == sorted((c, g) for c in fold_of for g in ("WT", "TC", "ET"))
    assert all(int(r["fold"]) == fold_of[r["case"]] for r in rows)
    for k in (0, 1):
        assert (out / f"fold_{k}" / "models" / "model.pt").is_file()
        assert len(_read_csv(out / f"fold_{k}" / "metrics.csv")) == 3 * sum(f == k for f in fold_of.values())

    # distances and volumes in mm (2.4 mm demo voxels): the WT volume is the label's voxel count x 2.4^3
    case = rows[0]["case"]
    truth = np.asarray(nib.load(tiny_demo / case / f"{case}_seg.nii.gz").dataobj)
    wt = next(r for r in rows if r["case"] == case and r["region"] == "WT")
    assert float(wt["volume_true"]) == pytest.approx((truth > 0).sum() * 2.4**3, rel=1e-5)

    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == [0, 1]
    # the held-out case, scored by each fold's model, reported apart from the validation folds
    held_rows = _read_csv(out / "cv_holdout_metrics.csv")
    assert sorted((r["case"], r["fold"]) for r in held_rows) == sorted((held, str(k)) for k in (0, 1) for _ in range(3))
    assert summary["holdout"]["num_cases"] == 1 and summary["holdout"]["folds"] == [0, 1]
    assert "held-out test set (1 cases)" in printed
    for region in ("WT", "TC", "ET"):
        for metric in ("dice", "hd95"):
            fold_means = [
                np.mean([float(r[metric]) for r in rows if r["region"] == region and int(r["fold"]) == k])
                for k in (0, 1)
            ]
            entry = summary["across_folds"][region][metric]
            assert entry["fold_means"] == pytest.approx(fold_means)
            assert entry["mean"] == pytest.approx(np.mean(fold_means))
            assert entry["std"] == pytest.approx(np.std(fold_means, ddof=1))
            for k in (0, 1):
                assert summary["per_fold"][str(k)][region][metric]["mean"] == pytest.approx(fold_means[k])


def test_a_datalist_with_other_folds_stops_before_training(tmp_path: Path, tiny_demo: Path) -> None:
    datalist = prepare(str(tiny_demo), str(tmp_path / "datalist.json"), folds=3)
    with pytest.raises(DataError, match="3 folds, not --folds 2"):
        run_cv(folds=2, datalist=datalist, output_dir=str(tmp_path / "cv"))
    assert not (tmp_path / "cv" / "fold_0").exists()


def test_parse_fold_ids() -> None:
    assert parse_fold_ids(None, 3) == [0, 1, 2]
    assert parse_fold_ids("0,2", 5) == [0, 2]
    assert parse_fold_ids((0, 2), 5) == [0, 2]  # what fire makes of --fold_ids 0,2
    assert parse_fold_ids(1, 5) == [1]
    with pytest.raises(ValueError, match=r"outside 0\.\.4"):
        parse_fold_ids("0,5", 5)
    with pytest.raises(ValueError, match="twice"):
        parse_fold_ids("1,1", 5)


def test_collector_scores_each_channel_exactly_even_when_regions_are_not_nested() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((3, 12, 10, 8)) > 0.6  # ET, TC, WT channels independent: not nested
    label = rng.random((3, 12, 10, 8)) > 0.5
    affine = torch.diag(torch.tensor([2.0, 1.0, 1.5, 1.0], dtype=torch.float64))
    rows = CaseMetricsCollector(lesion_wise=False, extra={"fold": 3}).score(
        torch.as_tensor(pred, dtype=torch.float32), MetaTensor(torch.as_tensor(label, dtype=torch.float32), affine), "c"
    )
    assert [r["region"] for r in rows] == ["WT", "TC", "ET"] and all(r["fold"] == 3 for r in rows)
    for channel, row in enumerate(rows):
        p, t = pred[channel], label[channel]
        assert row["dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
        assert row["volume_pred"] == pytest.approx(p.sum() * 3.0)  # 2 x 1 x 1.5 mm voxels


def test_summarize_folds_averages_fold_means_not_cases() -> None:
    # fold 0: three cases at 0.9; fold 1: one case at 0.5 -> fold mean 0.7, pooled case mean 0.8
    rows = [{"case": f"a{i}", "region": "WT", "fold": 0, "dice": 0.9} for i in range(3)]
    rows.append({"case": "b0", "region": "WT", "fold": 1, "dice": 0.5})
    summary = summarize_folds(rows, ["dice"])
    assert summary["across_folds"]["WT"]["dice"]["mean"] == pytest.approx(0.7)
    assert summary["across_folds"]["WT"]["dice"]["std"] == pytest.approx(np.std([0.9, 0.5], ddof=1))
    assert summary["pooled"]["WT"]["dice"]["mean"] == pytest.approx(0.8)
    assert summary["cases_per_fold"] == {"0": 3, "1": 1}


@pytest.mark.slow
def test_fold_ids_runs_a_subset_and_pools_earlier_folds(tmp_path: Path, tiny_demo: Path) -> None:
    out = tmp_path / "cv"
    base = ["cv", "--folds", "2", "--dataset_dir", str(tiny_demo), "--output_dir", str(out), *TINY_FLAGS]
    fire.Fire(COMMANDS, command=[*base, "--fold_ids", "0"])
    assert not (out / "fold_1").exists(), "--fold_ids 0 must train fold 0 only"
    first = _read_csv(out / "cv_metrics.csv")
    assert {r["fold"] for r in first} == {"0"}
    best_0 = (out / "fold_0" / "models" / "model.pt").stat().st_mtime_ns

    fire.Fire(COMMANDS, command=[*base, "--fold_ids", "1"])
    assert (out / "fold_0" / "models" / "model.pt").stat().st_mtime_ns == best_0, "fold 0 was retrained"
    pooled = _read_csv(out / "cv_metrics.csv")
    assert {r["fold"] for r in pooled} == {"0", "1"}
    assert len({(r["case"], r["region"]) for r in pooled}) == len(pooled) == 4 * 3
    fold_0 = [{k: v for k, v in r.items() if k != "fold"} for r in pooled if r["fold"] == "0"]
    assert [r["dice"] for r in fold_0] == [r["dice"] for r in first]
    summary = json.loads((out / "cv_summary.json").read_text())
    assert summary["folds"] == [0, 1] and summary["holdout"]["folds"] == [0, 1]  # the hold-out pooled too
    # fold 1 again, scored raw: fold 0 (scored with its recipe) is not pooled with it
    fire.Fire(COMMANDS, command=[*base, "--fold_ids", "1", "--scoring", "raw"])
    assert {r["fold"] for r in _read_csv(out / "cv_metrics.csv")} == {"1"}


def test_collector_scores_the_disjoint_classes_from_the_region_channels() -> None:
    """M3 reports NCR (TC without ET) and ED (WT without TC); cv offers them next to WT/TC/ET."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(2, 12, 10, 8))  # internal labels: 1 NCR, 2 ED, 3 ET
    regions = np.stack([np.isin(labels, v) for v in ((1, 2, 3), (1, 3), (3,))], axis=1).astype(np.float32)
    pred, truth = torch.as_tensor(regions[0]), MetaTensor(torch.as_tensor(regions[1]), torch.eye(4))
    rows = CaseMetricsCollector(lesion_wise=False, include_disjoint=True).score(pred, truth, "c")
    by_region = {r["region"]: r for r in rows}
    assert list(by_region) == ["WT", "TC", "ET", "NCR", "ED"]
    for name, value in (("NCR", 1), ("ED", 2)):
        p, t = labels[0] == value, labels[1] == value
        assert by_region[name]["dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    assert [r["region"] for r in CaseMetricsCollector(lesion_wise=False).score(pred, truth, "c")] == ["WT", "TC", "ET"]


def test_one_fold_or_an_empty_fold_is_one_sentence_before_any_training(
    tmp_path: Path, tiny_demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``cv --folds 1`` would score each model on its own training cases and call it cross-validation;
    ``--folds 5`` of four cases (one of five held out) leaves a fold without a case: both refused before
    any fold trains (python -m bundle cv, and run_cv for a library caller)."""
    import sys

    from bundle.errors import OptionError
    from bundle.integrations.cli import main

    trained: list[dict] = []
    monkeypatch.setattr("monai.bundle.ConfigWorkflow", lambda **kw: trained.append(kw))
    out = tmp_path / "cv"
    for folds, sentence in (
        ("1", "error: folds: 1 is not allowed: use a whole number of at least 2; cross-validation needs 2 folds"),
        (
            "5",
            f"error: {tiny_demo}: 5 folds of 4 labelled case(s) (1 held out) would leave 1 fold(s) empty; "
            "use --folds 4 or fewer",
        ),
    ):
        monkeypatch.setattr(sys, "argv", ["bundle", "cv", "--folds", folds, "--dataset_dir", str(tiny_demo)])
        monkeypatch.setattr(sys, "argv", [*sys.argv, "--output_dir", str(out), *TINY_FLAGS])
        with pytest.raises(SystemExit) as info:
            main()
        message = info.value.code if isinstance(info.value.code, str) else capsys.readouterr().err.strip()
        assert message.startswith(sentence), message
    with pytest.raises(OptionError, match="cross-validation needs 2 folds or more"):
        run_cv(folds=1, dataset_dir=str(tiny_demo), output_dir=str(out))
    # a datalist of four folds for four cases, then a case moved: fold 3 empty
    datalist = Path(prepare(str(tiny_demo), str(tmp_path / "datalist.json"), folds=4, holdout_fraction=0.2))
    data = json.loads(datalist.read_text())
    emptied = next(i for i in data["training"] if i["fold"] == 3)
    emptied["fold"] = 0
    datalist.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"fold 3 holds no case to validate on \(4 labelled case\(s\) in 4 folds\)"):
        run_cv(folds=4, datalist=str(datalist), output_dir=str(out))
    assert not trained, "a fold trained"
    assert not any(p.name.startswith("fold_") for p in out.glob("*"))


@pytest.mark.slow
def test_seeds_repeat_the_whole_cv_each_in_its_folder_and_compare_pairs_the_runs(
    tmp_path: Path, tiny_demo: Path, capsys
) -> None:
    """``cv --seeds 2 --scoring raw``: two runs (training seeds 42, 43; the split of 42) in seed_42/ and seed_43/,
    mean +- sd over them in cv_runs.json; ``bundle compare`` of two such folders pairs the runs by seed."""
    out = tmp_path / "cv"
    base = ["cv", "--folds", "2", "--dataset_dir", str(tiny_demo), "--output_dir", str(out), *TINY_FLAGS]
    fire.Fire(COMMANDS, command=[*base, "--seeds", "2", "--scoring", "raw"])
    printed = capsys.readouterr().out
    assert "raw scoring (no TTA, 0.5 thresholds, no post-processing" in printed
    assert "2 runs (seeds 42, 43)" in printed and "python -m bundle infer" in printed
    runs = json.loads((out / "cv_runs.json").read_text())
    assert runs["seeds"] == [42, 43] and runs["split_seed"] == 42 and runs["scoring"] == "raw"
    split = {i["case_id"]: i["fold"] for i in json.loads((out / "datalist.json").read_text())["training"]}
    per_seed = {}
    for s in (42, 43):
        summary = json.loads((out / f"seed_{s}" / "cv_summary.json").read_text())
        assert summary["seed"] == s and summary["scoring"] == "raw"
        assert summary["datalist"] == str(out / "datalist.json")
        assert json.loads((out / f"seed_{s}" / "fold_1" / "cv_fold.json").read_text())["seed"] == s
        rows = _read_csv(out / f"seed_{s}" / "cv_metrics.csv")
        assert {r["case"]: int(r["fold"]) for r in rows} == split  # the same split in every run
        per_seed[s] = summary["across_folds"]["WT"]["dice"]["mean"]
    entry = runs["across_runs"]["WT"]["dice"]
    assert entry["run_means"] == {"42": pytest.approx(per_seed[42]), "43": pytest.approx(per_seed[43])}
    assert entry["mean"] == pytest.approx(np.mean(list(per_seed.values())))
    assert entry["std"] == pytest.approx(np.std(list(per_seed.values()), ddof=1))
    weights = [torch.load(out / f"seed_{s}" / "fold_0" / "models" / "model.pt", weights_only=True) for s in (42, 43)]
    assert any(not torch.equal(weights[0]["model"][k], weights[1]["model"][k]) for k in weights[0]["model"])
    # the printed ensemble command names the four checkpoints (two folds of two runs)
    assert printed.count("models/model.pt") >= 4

    fire.Fire(COMMANDS, command=["compare", str(out), str(out), "--metrics", "dice"])
    table = capsys.readouterr().out
    assert "2 runs per side, paired by seed" in table and "p Holm-adjusted" in table.splitlines()[1]
    assert "no significant difference" in table


def test_a_misspelt_scoring_or_no_seeds_is_one_sentence_before_any_training(
    tmp_path: Path, tiny_demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from bundle.errors import OptionError

    trained: list[dict] = []
    monkeypatch.setattr("monai.bundle.ConfigWorkflow", lambda **kw: trained.append(kw))
    out = tmp_path / "cv"
    base = ["bundle", "cv", "--folds", "2", "--dataset_dir", str(tiny_demo), "--output_dir", str(out)]
    for flags, sentence in (
        (["--scoring", "rwa"], "error: scoring: 'rwa' is not one of recipe, raw; did you mean raw?"),
        (["--seeds", "0"], "error: seeds: 0 is not allowed: use a whole number of at least 1"),
    ):
        monkeypatch.setattr(sys, "argv", [*base, *flags])
        with pytest.raises(SystemExit) as info:
            main()
        message = info.value.code if isinstance(info.value.code, str) else capsys.readouterr().err.strip()
        assert message.startswith(sentence), message
    with pytest.raises(OptionError, match="scoring: 'tta' is not one of recipe, raw"):
        run_cv(folds=2, dataset_dir=str(tiny_demo), output_dir=str(out), scoring="tta")
    assert not trained and not out.exists()
