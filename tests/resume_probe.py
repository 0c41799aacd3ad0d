"""Test-only trainer handler for tests/test_resume.py: exact losses and metrics, and a SIGKILL on cue.

Merged over train.yaml by ``tests/resume_probe.yaml`` (``+train#handlers`` appends it after the
ValidationHandler and the CSV handler, and before the "last" checkpoint saver, which ``training``
attaches later), so its EPOCH_COMPLETED runs between validation and the checkpoint write.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class ResumeProbe:
    """Append ``iteration N loss HEX`` and ``validation E NAME HEX`` lines to ``log_file``; kill at ``kill_at``.

    ``kill_at``: ``iteration:N`` (after iteration N), ``epoch_end:E`` (after epoch E's validation and
    CSV row, before its checkpoint) or ``checkpoint_write:E`` (half-way through writing epoch E's
    checkpoint file).
    """

    def __init__(self, log_file: str, kill_at: str | None = None, evaluator: Engine | None = None) -> None:
        self.log_file = Path(log_file)
        kind, _, value = (kill_at or "none:0").partition(":")
        self.kill_kind, self.kill_value = kind, int(value)
        self.evaluator = evaluator

    def _log(self, line: str) -> None:
        with self.log_file.open("a") as handle:  # one write per line: complete lines survive SIGKILL
            handle.write(line + "\n")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _iteration(self, engine: Engine) -> None:
        loss = engine.state.output[0]["loss"] if isinstance(engine.state.output, list) else engine.state.output["loss"]
        self._log(f"iteration {engine.state.iteration} loss {float(loss).hex()}")
        if self.kill_kind == "iteration" and engine.state.iteration == self.kill_value:
            _die()

    def _validated(self, evaluator: Engine) -> None:
        for name, value in sorted(evaluator.state.metrics.items()):
            if isinstance(value, (int, float)):
                self._log(f"validation {evaluator.state.epoch} {name} {float(value).hex()}")
        self._log(
            f"best {evaluator.state.epoch} {float(evaluator.state.best_metric).hex()} "
            f"{evaluator.state.best_metric_epoch}"
        )

    def _epoch(self, engine: Engine) -> None:
        if engine.state.epoch != self.kill_value:
            return
        if self.kill_kind == "epoch_end":
            _die()
        if self.kill_kind == "checkpoint_write":
            real_save = torch.save

            def half_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                _die()

            torch.save = half_save  # the next torch.save is the "last" checkpoint's
