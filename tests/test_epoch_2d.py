"""The 2-D epoch (docs/reference/pipeline_2d.md): what an epoch holds, where its slices come from, its schedule.

An epoch of the 2-D methods is every kept slice (with brain) of every training volume exactly once, in
an order the DataLoader shuffles from torch's generator; ``slices_per_volume`` draws a few per volume
instead, with ``tumour_slice_ratio``. The slices come from train.yaml's cached preprocessing (memory,
or memory-mapped disk files). Validation runs within ``epochs`` whatever a variant's ``val_interval``,
and M3's learning rate moves once per epoch.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader, MetaTensor, set_track_meta
from monai.transforms import Compose, MapTransform
from monai.utils import set_determinism
from test_options import _monai_bundle_run
from test_pipeline_2d import train_workflow
from test_resume import KILLED, _last_checkpoints, _probe, _wait

from bundle.errors import find_user_error
from bundle.training.slices import SliceClassesd, SliceDataset, SliceDraw, check_slice_options
from bundle.training.workflow import ResumableState, random_states

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = REPO_ROOT / "configs"
TWO_D = ["configs/train.yaml", "configs/train_2d.yaml"]
M3 = [*TWO_D, "configs/variants/m3_resse_lka_unet.yaml"]
SHAPE = (12, 10)  # in-plane size of the synthetic volumes
DEPTH, EMPTY, TUMOUR = 20, range(16, 20), range(5, 9)  # slices without brain, slices with tumour


def _slice_id(case: int, z: int) -> int:
    return 1000 * (case + 1) + z


def _volumes(cases: int = 3) -> list[dict[str, MetaTensor]]:
    """Volumes as train.yaml's deterministic_transforms give them, (C, H, W, D); channel 0 names each slice."""
    items = []
    for case in range(cases):
        image = torch.zeros(4, *SHAPE, DEPTH)
        for z in range(DEPTH):
            if z not in EMPTY:
                image[:, 2:10, 2:8, z] = _slice_id(case, z)
        label = torch.zeros(3, *SHAPE, DEPTH)
        label[:, 4:6, 3:5, list(TUMOUR)] = 1
        items.append({"image": MetaTensor(image), "label": MetaTensor(label)})
    return items


class _LoadSynthetic(MapTransform):
    """Stands for train.yaml's deterministic_transforms: datalist item ``caseN`` -> the synthetic volume N."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        case = int(data["image"][4:])
        return dict(_volumes(case + 1)[case])


def _parser(files: list[str] = TWO_D, augment: bool = False, **overrides: Any) -> ConfigParser:
    """The 2-D training config over the synthetic volumes (names in the datalist), by default without augmentation."""
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / f) for f in files])
    if not augment:
        parser["train#augmentations"] = []
    settings = {
        "bundle_root": str(REPO_ROOT),
        "deterministic_transforms": [_LoadSynthetic(keys=["image", "label"])],
        "train_datalist": [{"image": f"case{c}", "label": f"case{c}"} for c in range(3)],
        "patch_size": list(SHAPE),
        "cache": "memory",
        "num_workers": 0,
        **overrides,
    }
    for key, value in settings.items():
        parser[key] = value
    return parser


def _ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return [int(i) for i in batch["image"][:, 0].amax(dim=(1, 2))]


KEPT = sorted(_slice_id(c, z) for c in range(3) for z in range(DEPTH) if z not in EMPTY)


# ------------------------------------------------------------------------------------ what an epoch holds


def test_an_epoch_is_every_kept_slice_once_in_a_seeded_random_order() -> None:
    """Through train_2d.yaml's own train#dataloader: each slice with brain exactly once, batches of batch_size."""
    set_determinism(seed=7)
    loader = _parser().get_parsed_content("train#dataloader")
    first = [_ids(b) for b in loader]
    second = [i for b in loader for i in _ids(b)]
    assert [len(b) for b in first] == [8] * 6  # 48 kept slices, batch_size 8
    flat = [i for b in first for i in b]
    assert sorted(flat) == KEPT and sorted(second) == KEPT  # every kept slice once; none without brain
    assert flat != KEPT and second != flat  # shuffled, and anew each epoch
    set_determinism(seed=7)
    again = _parser().get_parsed_content("train#dataloader")
    assert [i for b in again for i in _ids(b)] == flat  # the same seed, the same epoch
    set_determinism(seed=None)


def test_without_skip_empty_slices_an_epoch_is_every_slice() -> None:
    dataset = _parser(skip_empty_slices="false").get_parsed_content("train#dataset")
    assert len(dataset) == 3 * DEPTH
    assert sorted({_slice_id(c, z) for c, z in map(dataset.slice_of, range(len(dataset)))}) == sorted(
        _slice_id(c, z) for c in range(3) for z in range(DEPTH)
    )


@pytest.fixture
def no_meta() -> Any:
    """Plain tensors instead of MetaTensors (sampling statistics need thousands of slices)."""
    set_track_meta(False)
    yield
    set_track_meta(True)


@pytest.mark.parametrize("ratio", [None, 0.5, 0.8])
def test_slices_per_volume_draws_tumour_slices_at_the_ratio(ratio: float | None, no_meta: None) -> None:
    dataset = _parser(slices_per_volume=700, tumour_slice_ratio=ratio).get_parsed_content("train#dataset")
    dataset.draw.set_random_state(seed=3)
    assert len(dataset) == 3 * 700
    items = [dataset[i] for i in range(len(dataset))]
    assert all(tuple(s["image"].shape) == (4, *SHAPE) and s["label"].dtype == torch.float32 for s in items)
    ids = [int(s["image"][0].amax()) for s in items]
    assert set(ids) <= set(KEPT)  # never a slice without brain
    assert [i // 1000 - 1 for i in ids] == [c for c in range(3) for _ in range(700)]  # N per volume
    tumour = np.mean([float(s["label"].sum() > 0) for s in items])
    expected = len(TUMOUR) / (DEPTH - len(EMPTY)) if ratio is None else ratio
    assert abs(tumour - expected) < 4 * math.sqrt(expected * (1 - expected) / len(items))  # 4 binomial sigmas


def test_a_volume_without_tumour_draws_from_its_kept_slices() -> None:
    draw = SliceDraw(tumour_slice_ratio=0.9)
    draw.set_random_state(seed=0)
    other = np.arange(3, 9)
    assert {draw(np.array([], dtype=int), other) for _ in range(200)} == set(other.tolist())


def test_slice_classes_are_cached_with_the_slice_first_volume() -> None:
    volume = Compose(_parser().get_parsed_content("train#volume_transforms"))(_volumes(1)[0])
    assert tuple(volume["image"].shape) == (4, DEPTH, *SHAPE) and volume["image"].is_contiguous()
    assert volume["label"].dtype == torch.uint8
    brain, tumour = volume["slice_classes"].bool()
    assert brain.tolist() == [z not in EMPTY for z in range(DEPTH)]
    assert tumour.tolist() == [z in TUMOUR for z in range(DEPTH)]
    out = SliceClassesd("label", image_key=None)({"label": torch.zeros(1, 3, 2, 2)})["slice_classes"]
    assert out.tolist() == [[1, 1, 1], [0, 0, 0]]  # without an image every slice counts as brain


# ------------------------------------------------------------------------------------ where slices come from


def test_disk_cache_serves_memory_mapped_slices_equal_to_the_memory_cache(tmp_path: Path) -> None:
    """cache: disk writes each case once, then every slice is a memory-mapped read of its cached file."""
    memory = _parser().get_parsed_content("train#dataset")
    disk = _parser(cache="disk", cache_dir=str(tmp_path)).get_parsed_content("train#dataset")
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 3
    for index in range(len(memory)):
        assert memory.slice_of(index) == disk.slice_of(index)
        for key in ("image", "label"):
            torch.testing.assert_close(disk[index][key], memory[index][key])
    volume = disk.volumes[1]
    maps = Path("/proc/self/maps")
    if maps.is_file():  # the tensors live in a mapping of the cached file, not in a copy of it
        pointer = volume["image"].data_ptr()
        mapped = [line for line in maps.read_text().splitlines() if line.endswith(str(disk.volumes.files[1]))]
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
        assert any(start <= pointer < end for start, end in spans)
    # a second run reads the same files, writing none
    mtimes = [f.stat().st_mtime_ns for f in files]
    _parser(cache="disk", cache_dir=str(tmp_path)).get_parsed_content("train#dataset")
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.glob("*.pt"))] == mtimes


def test_memory_cache_is_read_in_place() -> None:
    """The cached volume is not copied per slice (MONAI copies only before random transforms)."""
    dataset = _parser().get_parsed_content("train#dataset")
    assert isinstance(dataset.volumes.dataset, CacheDataset)
    assert dataset.volumes[0]["image"].data_ptr() == dataset.volumes[0]["image"].data_ptr()


def test_volume_transforms_with_a_random_step_are_refused() -> None:
    from monai.transforms import RandFlipd

    with pytest.raises(ValueError, match="deterministic"):
        SliceDataset(_volumes(1), lambda data: CacheDataset(data, Compose([RandFlipd("image")])))


# ------------------------------------------------------------------------------------ options as users type them


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slices_per_volume", "0"], "slices_per_volume: 0 is not a positive integer"),
        (["--slices_per_volume", "four"], "slices_per_volume: 'four' is not a positive integer"),
        (["--tumour_slice_ratio", "0.5"], "tumour_slice_ratio: 0.5 applies to slices drawn with slices_per_volume"),
        (["--slices_per_volume", "4", "--tumour_slice_ratio", "1.5"], "tumour_slice_ratio: 1.5 is not in"),
        (["--num_samples", "4"], "num_samples: 4 counts train.yaml's 3-D patches per case"),
        (["--cache", "none"], "cache: 'none' would preprocess a whole volume again for every 2-D slice"),
    ],
)
def test_slice_options_are_refused_with_one_sentence(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    parser = _monai_bundle_run(monkeypatch, TWO_D, flags[0][2:], flags[1])
    for key, value in zip(flags[2::2], flags[3::2]):
        parser[key[2:]] = int(value) if value.isdigit() else float(value)
    step = next(i for i, s in enumerate(parser["initialize"]) if "check_slice_options" in str(s))
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content(f"initialize#{step}")
    assert str(find_user_error(info.value)).startswith(message)


def test_short_run_options_are_accepted() -> None:
    check_slice_options(4, 0.5)
    check_slice_options(None, None, num_samples=1, cache="disk")


# ------------------------------------------------------------------------------------ validation and schedule per epoch

VARIANT_STACKS = [
    [*TWO_D, f"configs/variants/{p.name}"]
    if p.stem in ("m1_la_resunet", "m2_resunet_tversky", "m3_resse_lka_unet") or p.stem.endswith("_2d")
    else ["configs/train.yaml", f"configs/variants/{p.name}"]
    for p in sorted((CONFIGS / "variants").glob("*.yaml"))
] + [[*TWO_D, "configs/train_gate.yaml"]]


@pytest.mark.parametrize("files", VARIANT_STACKS, ids=[Path(f[-1]).stem for f in VARIANT_STACKS])
def test_every_variant_validates_within_a_one_epoch_run(files: list[str]) -> None:
    """--epochs 1, or MONAI Label's train#trainer#max_epochs 1: the one epoch is validated, whatever val_interval."""
    for key in ("epochs", "train#trainer#max_epochs"):
        parser = ConfigParser()
        parser.read_config([str(REPO_ROOT / f) for f in files])
        parser[key] = 1
        assert parser.get_parsed_content("train#named_handlers#validation#interval") == 1, (files[-1], key)


TINY_M3 = {
    "num_folds": 2,
    "subset_fraction": 1.0,  # 10 % of four cases would be none
    "patch_size": [32, 32],
    "network_factory#channels": [4, 8, 16, 32, 64],
    "num_workers": 0,
    "cache": "memory",
}


def test_m3_one_epoch_through_monai_bundle_run_writes_the_best_model(tmp_path: Path, tiny_demo: Path) -> None:
    """M3 validates every 5 epochs; `--epochs 1` still validates once and writes models/model.pt."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(M3).replace(" ", "")]
    settings = {"dataset_dir": tiny_demo, "output_dir": tmp_path / "out", "ckpt_dir": tmp_path / "models"}
    short = {"slices_per_volume": 2, "tumour_slice_ratio": 0.5}  # the epoch's length is not what is tested here
    for key, value in {**settings, **TINY_M3, **short, "epochs": 1}.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert re.search(r"epoch 1/1: loss .*val_mean_dice", result.stdout + result.stderr)  # the epoch's summary line
    header = (tmp_path / "out" / "metrics_per_epoch.csv").read_text().splitlines()[0]
    assert "val_dice_NCR" in header  # M3 is scored on its classes too; every value stays in the CSV


def test_m3_learning_rate_moves_once_per_epoch_over_whole_epochs(tmp_path: Path, tiny_demo: Path) -> None:
    """Warm-up then x lr_decay per epoch, stepped at each epoch's end; an epoch is every kept slice once."""
    lrs: list[float] = []
    files = [str(REPO_ROOT / f) for f in M3]
    workflow = train_workflow(files, tmp_path, tiny_demo, **TINY_M3, epochs=4, warmup_epochs=2, learning_rate=1e-3)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    dataset = workflow.parser.get_parsed_content("train#dataset")
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(optimizer.param_groups[0]["lr"]))
    workflow.run()
    workflow.finalize()
    per_epoch = math.ceil(dataset.kept_slices / 8)
    assert dataset.kept_slices == len(dataset) > 2 * 8 and trainer.state.iteration == 4 * per_epoch
    # start 0.2 x lr, linear to lr over 2 epochs, then x 0.95 per epoch; constant within an epoch
    expected = [1e-3 * f for f in (0.2, 0.6, 1.0, 0.95)]
    for epoch, lr in enumerate(expected):
        assert lrs[epoch * per_epoch : (epoch + 1) * per_epoch] == pytest.approx([lr] * per_epoch), epoch


# ------------------------------------------------------------------------------------ resume


def test_resumable_state_carries_the_slice_draw_and_the_augmentations() -> None:
    """What bundle.training.workflow.ResumableState saves reaches SliceDraw's generator (slices_per_volume) too."""
    parser = _parser(M3, augment=True, slices_per_volume=2)
    loader: DataLoader = parser.get_parsed_content("train#dataloader")
    states = random_states(loader.dataset)
    assert any(r is loader.dataset.draw.R for r in states)
    assert len(states) >= 8  # the draw, Compose and M3's random augmentations with their inner transforms
    saved = ResumableState(loaders=[loader]).state_dict()
    first = [loader.dataset.slice_of(i) for i in range(6)]
    ResumableState(loaders=[loader]).load_state_dict(saved)
    assert [loader.dataset.slice_of(i) for i in range(6)] == first


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "kill_at"),
    [
        ({"num_workers": 0}, "iteration:8"),  # 6 iterations an epoch: in epoch 2
        ({"num_workers": 2, "slices_per_volume": 8, "tumour_slice_ratio": 0.5}, "iteration:3"),  # 2 an epoch
    ],
    ids=["every_slice", "slices_per_volume_with_workers"],
)
def test_a_killed_2d_run_resumes_bit_exactly(
    settings: dict[str, Any], kill_at: str, tmp_path: Path, tiny_demo: Path
) -> None:
    """kill -9 in epoch 2 of M3's 2-D training, resume: losses, validations, weights as the uninterrupted run's."""

    def start(run_dir: Path, kill_at: str | None = None, resume: bool = False) -> subprocess.Popen:
        files = str([*M3, "tests/resume_probe.yaml"]).replace(" ", "")
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files]
        overrides = {**TINY_M3, **settings, "epochs": 3, "val_interval": 1, "dataset_dir": tiny_demo}
        overrides.update(output_dir=run_dir / "out", ckpt_dir=run_dir / "models", warmup_epochs=1)
        for key, value in overrides.items():
            cmd += [f"--{key}", str(value).replace(" ", "")]
        cmd += ["--kill_at", kill_at] if kill_at else []
        cmd += ["--resume", "True"] if resume else []
        env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
        run_dir.mkdir(parents=True, exist_ok=True)
        log = (run_dir / f"process{len(list(run_dir.glob('process*.log')))}.log").open("w")
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    runs = [(start(reference), 0, reference), (start(killed, kill_at=kill_at), KILLED, killed)]
    for process, expected, run_dir in runs:
        _wait(process, expected, run_dir)
    assert _last_checkpoints(killed) == ["checkpoint_epoch=1.pt"]
    _wait(start(killed, resume=True), 0, killed)
    (ref_losses, ref_validations), (losses, validations) = _probe(reference), _probe(killed)
    assert losses == ref_losses and len(losses) >= 3 * 2  # several iterations an epoch
    assert validations == ref_validations and {epoch for epoch, _ in validations} == {1, 2, 3}
    final, ref_final = (torch.load(r / "out" / "checkpoint_epoch=3.pt", weights_only=True) for r in (killed, reference))
    assert all(torch.equal(final["model"][k], ref_final["model"][k]) for k in ref_final["model"])
    assert final["lr_scheduler"] == ref_final["lr_scheduler"]
