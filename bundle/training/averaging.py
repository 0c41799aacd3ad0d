"""Stochastic weight averaging over a run's last epochs, as an Ignite handler.

With a few validation cases the epoch of the best validation score is noise; the weights averaged
over the last epochs of a decaying schedule are a steadier choice (Izmailov et al., 2018, "Averaging
weights leads to wider optima"). PyTorch's :class:`torch.optim.swa_utils.AveragedModel` does the
averaging; MONAI has no handler that drives it from an Ignite engine, so this one does. The averaged
copy is an ``nn.Module``: it goes into the resumable checkpoint like the network (resume stays exact)
and a ``CheckpointSaver`` writes it with the plan at the end of the run.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel

from bundle.errors import OptionError

__all__ = ["EpochWeightAverage"]


class EpochWeightAverage:
    """The equal-weight average of ``network``'s weights at the end of each of the run's last ``last_epochs`` epochs.

    Args:
        network: the trained network (its parameters and buffers are averaged).
        epochs: the run's number of epochs.
        last_epochs: how many final epochs enter the average; 0 turns the handler off.
    """

    def __init__(self, network: torch.nn.Module, epochs: int, last_epochs: int = 0) -> None:
        if isinstance(last_epochs, bool) or not isinstance(last_epochs, int) or not 0 <= last_epochs <= epochs:
            raise OptionError(
                f"average_last_epochs must be an integer from 0 to epochs ({epochs}), not {last_epochs!r}"
            )
        self.network = network
        self.first_epoch = epochs - last_epochs + 1
        self.enabled = last_epochs > 0
        # a copy even when off, so the checkpoint's keys do not depend on the option
        self.averaged = AveragedModel(network, use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged network, saved as ``model`` beside the plan."""
        return self.averaged.module

    def attach(self, engine: Engine) -> None:
        """Update the average when each epoch completes."""
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.update)

    def update(self, engine: Engine) -> Any:
        """Add the network's current weights to the average once the last epochs begin."""
        if engine.state.epoch >= self.first_epoch:
            self.averaged.update_parameters(self.network)
