"""Callbacks the tests use to record a run, so that values can be recomputed from what the run really had."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import Callback


class StatesAtSteps(Callback):
    """Copies of the module's state dict at train start and after each optimizer step that ``keep(step)``
    accepts (every step by default), keyed by the global step."""

    def __init__(self, keep: Callable[[int], bool] = lambda step: True) -> None:
        self.keep = keep
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _record(self, trainer, pl_module) -> None:
        if self.keep(trainer.global_step):
            self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer, pl_module)


class StopAfterEpochs(Callback):
    """Stops the fit at the end of epoch ``epochs`` (counted from 1), after its checkpoint: a preemption that
    leaves the run's schedule as it was configured (unlike a smaller ``max_epochs``)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
