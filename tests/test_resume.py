"""Resume is bit-exact: kill -9 the real ``python -m monai.bundle run training`` and resume with ``--resume True``.

Every run merges ``tests/resume_probe.yaml`` over ``configs/train.yaml``: its handler logs each
iteration's loss and each validation metric as exact hex floats, and SIGKILLs the process at a
chosen point (mid-epoch, after validation but before the "last" checkpoint, half-way through writing
that checkpoint). The resumed run's losses, metrics, per-epoch CSV, best model and final checkpoint
must equal an uninterrupted run's exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT
from test_training import TINY

from bundle.data import generate_demo_dataset
from bundle.training.workflow import (
    AtomicDiskSaver,
    NewPassEachEpoch,
    ResumableCheckpointSaver,
    ResumableState,
    random_states,
)

# 2 training cases, batch 1: 2 iterations an epoch; validation after epochs 2 and 4.
FAST = {**TINY, "epochs": 4, "val_interval": 2, "batch_size": 1}
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo"), num_cases=4, num_test_cases=0, shape=(32, 32, 24))


def _start(
    run_dir: Path,
    data: Path,
    kill_at: str | None = None,
    resume: bool = False,
    configs: Sequence[str] = ("configs/train.yaml",),
    **overrides: Any,
) -> Any:
    """Start one training process (stdout/stderr to files, so killed loader workers cannot hold a pipe open)."""
    config_files = "[" + ",".join(f"'{c}'" for c in (*configs, "tests/resume_probe.yaml")) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training"]
    cmd += ["--config_file", config_files, "--dataset_dir", str(data)]
    cmd += ["--output_dir", str(run_dir / "out"), "--ckpt_dir", str(run_dir / "models")]
    for key, value in {**FAST, **overrides}.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    if kill_at:
        cmd += ["--kill_at", kill_at]
    if resume:
        cmd += ["--resume", "True"]  # Fire turns True into a bool
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    run_dir.mkdir(parents=True, exist_ok=True)
    number = len(list(run_dir.glob("process*.log")))
    log = (run_dir / f"process{number}.log").open("w")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(process: Any, expected: int, run_dir: Path) -> None:
    returncode = process.wait(timeout=600)
    logs = sorted(run_dir.glob("process*.log"))
    assert returncode == expected, f"exit {returncode}, expected {expected}:\n{logs[-1].read_text()[-3000:]}"


def _probe(run_dir: Path) -> tuple[dict[int, str], dict[tuple[int, str], str]]:
    """Losses by iteration and validation lines by (epoch, name); a re-run iteration must repeat its loss."""
    losses: dict[int, str] = {}
    validations: dict[tuple[int, str], str] = {}
    for line in (run_dir / "out" / "probe.log").read_text().splitlines():
        kind, number, name, value = [*line.split(), ""][:4]
        if kind == "iteration":
            assert losses.setdefault(int(number), value) == value, f"iteration {number} differs when re-run"
        else:  # validation E NAME HEX / best E HEX EPOCH
            key, text = (int(number), name if kind == "validation" else "best"), f"{name} {value}"
            assert validations.setdefault(key, text) == text, f"epoch {number} {key[1]} differs when re-run"
    return losses, validations


def _last_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "out").iterdir() if "checkpoint" in p.name)


def _assert_same_outcome(resumed: Path, reference: Path, steps_per_epoch: int = 2) -> None:
    """Losses, metrics, CSV, best model and final checkpoint all equal the uninterrupted run's."""
    ref_losses, ref_validations = _probe(reference)
    losses, validations = _probe(resumed)
    assert losses == ref_losses and len(losses) == FAST["epochs"] * steps_per_epoch
    assert validations == ref_validations
    csv, ref_csv = (r / "out" / "metrics_per_epoch.csv" for r in (resumed, reference))
    assert csv.read_text() == ref_csv.read_text()
    assert [line.split(",")[0] for line in csv.read_text().splitlines()] == ["epoch", "1", "2", "3", "4"]
    runs = (resumed, reference)
    best, ref_best = (torch.load(r / "models" / "model.pt", weights_only=True) for r in runs)
    assert best["model_record"] == ref_best["model_record"]
    best, ref_best = best["model"], ref_best["model"]
    assert best.keys() == ref_best.keys() and all(torch.equal(best[k], ref_best[k]) for k in best)
    assert _last_checkpoints(resumed) == _last_checkpoints(reference) == ["checkpoint_epoch=4.pt"]
    final, ref_final = (torch.load(r / "out" / "checkpoint_epoch=4.pt", weights_only=True) for r in runs)
    assert all(torch.equal(final["model"][k], ref_final["model"][k]) for k in ref_final["model"])
    assert final["lr_scheduler"] == ref_final["lr_scheduler"]
    for key in ("best_metric", "best_metric_epoch", "handlers"):
        assert final["resumable_state"][key] == ref_final["resumable_state"][key], key


def test_kill_mid_epoch_or_after_validation_then_resume_is_bit_exact(tmp_path: Path, tiny_demo: Path) -> None:
    """kill -9 in epoch 3's 1st iteration, and after epoch 4's validation before its checkpoint; both resume exactly.

    The three first runs go in parallel (they are independent), the two resumes too.
    """
    reference, mid_epoch, after_validation = tmp_path / "reference", tmp_path / "mid_epoch", tmp_path / "after_val"
    first = [
        (_start(reference, tiny_demo), 0, reference),
        (_start(mid_epoch, tiny_demo, kill_at="iteration:5"), KILLED, mid_epoch),
        (_start(after_validation, tiny_demo, kill_at="epoch_end:4"), KILLED, after_validation),
    ]
    for process, expected, run_dir in first:
        _wait(process, expected, run_dir)
    assert _last_checkpoints(mid_epoch) == ["checkpoint_epoch=2.pt"]
    assert _last_checkpoints(after_validation) == ["checkpoint_epoch=3.pt"]
    # the killed run had already validated epoch 4 and written models/model.pt
    assert any(k == (4, "val_mean_dice") for k in _probe(after_validation)[1])

    resumes = [(_start(d, tiny_demo, resume=True), 0, d) for d in (mid_epoch, after_validation)]
    for process, expected, run_dir in resumes:
        _wait(process, expected, run_dir)
    for run_dir in (mid_epoch, after_validation):
        _assert_same_outcome(run_dir, reference)


def test_resume_is_bit_exact_when_the_batches_do_not_divide_steps_per_epoch(tmp_path: Path, tiny_demo: Path) -> None:
    """configs/cpu.yaml's fixed epochs: 3 steps over passes of 2 batches, so epoch 1 ends inside the second pass.

    Killed in epoch 2 and resumed from epoch 1's checkpoint (iteration 3, mid-pass), the run equals the
    uninterrupted one (before bundle.training.workflow.NewPassEachEpoch, iteration 4 differed).
    """
    cpu = {"configs": ("configs/train.yaml", "configs/cpu.yaml"), "steps_per_epoch": 3, "window": [32, 32, 32]}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    first = [(_start(reference, tiny_demo, **cpu), 0, reference)]
    first.append((_start(killed, tiny_demo, kill_at="iteration:5", **cpu), KILLED, killed))
    for process, expected, run_dir in first:
        _wait(process, expected, run_dir)
    assert _last_checkpoints(killed) == ["checkpoint_epoch=1.pt"], "iteration 3 of passes of 2 batches: mid-pass"
    assert "[3/3] 100%" in (reference / "process0.log").read_text(), "an epoch is steps_per_epoch steps"
    _wait(_start(killed, tiny_demo, resume=True, **cpu), 0, killed)
    _assert_same_outcome(killed, reference, steps_per_epoch=3)


@pytest.mark.slow
def test_loader_workers_and_a_kill_during_the_checkpoint_write_resume_bit_exactly(
    tmp_path: Path, tiny_demo: Path
) -> None:
    """Two loader workers (train.yaml's default): kill half-way through writing epoch 2's checkpoint, resume, kill
    mid-epoch 4, resume: the result equals the uninterrupted two-worker run's."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    runs = [(_start(reference, tiny_demo, num_workers=2), 0, reference)]
    runs.append((_start(killed, tiny_demo, kill_at="checkpoint_write:2", num_workers=2), KILLED, killed))
    for process, expected, run_dir in runs:
        _wait(process, expected, run_dir)
    names = sorted(p.name for p in (killed / "out").iterdir())
    assert "checkpoint_epoch=1.pt" in names and "checkpoint_epoch=2.pt" not in names, names
    assert any(n.startswith(".checkpoint_epoch=2.pt.") for n in names), "the half-written temporary file"
    _wait(_start(killed, tiny_demo, kill_at="iteration:7", resume=True, num_workers=2), KILLED, killed)
    assert _last_checkpoints(killed) == ["checkpoint_epoch=3.pt"], "epoch 1's and the temporary file are gone"
    _wait(_start(killed, tiny_demo, resume=True, num_workers=2), 0, killed)
    _assert_same_outcome(killed, reference)


# ----------------------------------------------------------------------------- in-process pieces


class _Killed(BaseException):
    """Stands for the process dying inside torch.save."""


def _dying_save(*args: Any, **kwargs: Any) -> None:
    raise _Killed


def test_monai_checkpoint_saver_is_not_atomic_and_ours_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI 1.6.1 writes with ignite's DiskSaver(atomic=False), after removing the previous file: dying in
    torch.save leaves no usable checkpoint. ResumableCheckpointSaver keeps the previous one intact."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver

    for cls, survives in ((CheckpointSaver, False), (ResumableCheckpointSaver, True)):
        folder = tmp_path / cls.__name__
        net = torch.nn.Linear(2, 2)
        saver = cls(str(folder), {"model": net, "other": torch.nn.Linear(1, 1)}, save_interval=1, n_saved=1)
        engine = Engine(lambda e, b: None)
        engine.state.epoch = 1
        saver.interval_completed(engine)
        engine.state.epoch = 2
        monkeypatch.setattr(torch, "save", _dying_save)
        with pytest.raises(_Killed):
            saver.interval_completed(engine)
        monkeypatch.undo()
        assert (folder / "checkpoint_epoch=1.pt").is_file() is survives, cls.__name__
        assert not (folder / "checkpoint_epoch=2.pt").is_file() or not survives
        if survives:
            assert torch.load(folder / "checkpoint_epoch=1.pt", weights_only=True)["model"]["weight"].shape == (2, 2)
            assert not list(folder.glob(".*.tmp")), "the temporary file is removed on an exception"


def test_replaced_best_model_is_removed_only_after_the_new_one_is_written(tmp_path: Path) -> None:
    saver = AtomicDiskSaver(tmp_path, filename=None)
    saver({"a": torch.zeros(1)}, "old.pt")
    saver.remove("old.pt")  # ignite asks for this before saving the new file
    assert (tmp_path / "old.pt").is_file()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process that has ended
    (tmp_path / f".new.pt.{child.pid}.tmp").write_bytes(b"half")  # left by a killed write
    in_progress = tmp_path / f".new.pt.{os.getppid()}.tmp"  # another run's write, under way: kept
    in_progress.write_bytes(b"half")
    saver({"a": torch.ones(1)}, "new.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new.pt", in_progress.name])


def test_a_checkpoint_on_a_full_disk_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch reports Errno 28 as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"."""
    import errno

    from bundle.errors import WriteError

    def full(obj, handle, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            # as PyTorch raises it: the OSError only as the context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError) as info:
        AtomicDiskSaver(tmp_path, filename="model.pt")({"a": torch.zeros(1)}, "ignored.pt")
    assert str(info.value) == (
        f"{tmp_path / 'model.pt'}: cannot be written: no space left on device "
        "(free some space there, or write elsewhere)"
    )
    assert not list(tmp_path.iterdir())


def test_resumable_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    """RNGs and transform states survive MONAI's CheckpointLoader (torch.load(weights_only=True))."""
    import random

    import numpy as np
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd

    transform = Compose(
        [
            RandCropByPosNegLabeld(keys="x", label_key="x", spatial_size=(2, 2), num_samples=1),
            RandFlipd(keys="x", prob=0.5),
        ]
    )
    loader = DataLoader(Dataset([{"x": torch.rand(1, 4, 4)}], transform), num_workers=0)
    state = ResumableState(loaders=[loader])
    assert len(random_states(loader.dataset)) >= 4, "Compose, the two transforms and their inner croppers/flippers"
    torch.save(state.state_dict(), tmp_path / "s.pt")

    def draws() -> list[float]:
        return [
            float(torch.rand(())),
            float(np.random.rand()),
            random.random(),
            *(float(r.rand()) for r in random_states(loader.dataset)),
        ]

    expected = draws()
    draws()  # move on
    state.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert draws() == expected


def _run_recording_batches(
    loader: Any, epochs: int, epoch_length: int, new_pass: bool, resume_from: tuple[int, torch.Tensor] | None = None
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """Run a bare Ignite engine over ``loader``: the batches it saw, and torch's RNG state at each epoch end.

    ``resume_from``: (epoch, RNG state) where a resumed run starts, as ``resume_training`` and
    ``ResumableState`` leave the trainer and the generator.
    """
    from ignite.engine import Engine, Events

    seen: list[list[int]] = []
    engine = Engine(lambda engine, batch: seen.append(batch.tolist()))
    if new_pass:
        NewPassEachEpoch().attach(engine)
    states: dict[int, torch.Tensor] = {}
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: states.__setitem__(e.state.epoch, torch.get_rng_state()))
    if resume_from is not None:
        epoch, rng_state = resume_from
        engine.load_state_dict({"epoch": epoch, "epoch_length": epoch_length, "max_epochs": epochs})
        torch.set_rng_state(rng_state)
    else:
        torch.manual_seed(0)
    engine.run(loader, max_epochs=epochs, epoch_length=epoch_length)
    return seen, states


def test_every_epoch_starts_a_new_pass_and_resumes_exactly() -> None:
    """5 items in batches of 2: 3 batches a pass. Epochs of 4 steps end inside a pass; resumed there, the run
    continues as the uninterrupted one only with NewPassEachEpoch. Epochs of 6 steps: the handler changes nothing."""
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(5)), batch_size=2, shuffle=True)
    with torch.random.fork_rng(devices=[]):  # the runs seed torch's generator; the other tests keep theirs
        divisible = [_run_recording_batches(loader, 3, 6, new_pass)[0] for new_pass in (False, True)]
        assert divisible[0] == divisible[1], "when the batches divide the epoch, nothing changes"

        for new_pass in (True, False):
            uninterrupted, states = _run_recording_batches(loader, 3, 4, new_pass)
            resumed, _ = _run_recording_batches(loader, 3, 4, new_pass, resume_from=(1, states[1]))
            assert (resumed == uninterrupted[4:]) is new_pass, f"exact resume with new_pass={new_pass}"
            if new_pass:
                epoch_2 = [i for batch in uninterrupted[4:7] for i in batch]
                assert sorted(epoch_2) == list(range(5)), "epoch 2 begins with a whole new pass"


def test_best_model_and_early_stopping_continue_after_a_resume(tmp_path: Path) -> None:
    """A worse validation after a resume does not overwrite model.pt; the early-stopping count goes on."""
    from ignite.engine import Engine, Events
    from monai.handlers import EarlyStopHandler

    def process(scores: list[float], state: dict | None = None) -> tuple[Any, Any, dict]:
        net = torch.nn.Linear(1, 1)
        trainer = Engine(lambda e, b: None)
        evaluator = Engine(lambda e, b: None)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1
        saver = ResumableCheckpointSaver(
            str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice", key_metric_filename="m.pt"
        )
        stopper = EarlyStopHandler(patience=2, score_function=lambda e: e.state.metrics["dice"], trainer=trainer)
        for handler in (stopper, saver):
            handler.attach(evaluator)
        resumable = ResumableState(evaluator=evaluator, handlers=[stopper, saver])
        if state is not None:
            resumable.load_state_dict(state)
        for score in scores:
            torch.nn.init.constant_(net.weight, score)

            @evaluator.on(Events.EPOCH_STARTED)
            def _set(engine: Engine, value: float = score) -> None:
                engine.state.metrics = {"dice": value}

            evaluator.run([0], max_epochs=1)
            evaluator.remove_event_handler(_set, Events.EPOCH_STARTED)
        return stopper, trainer, resumable.state_dict()

    _, _, state = process([0.8, 0.7])  # best 0.8, one validation without improvement
    stopper, trainer, _ = process([0.5], state)
    assert float(torch.load(tmp_path / "m.pt", weights_only=True)["weight"]) == pytest.approx(0.8)
    assert stopper._handler.counter == 2 and trainer.should_terminate, "patience 2 reached across the resume"
