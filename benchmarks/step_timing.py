"""What the callback benchmarks share: training steps timed in the same run as a callback's measurements.

``bench_landscape.py`` and ``bench_ntk.py`` train a ResNet-20 for a few steps with the callback measuring every
``measure_every`` steps, and print a measurement's time over a training step's, both timed in that run:
:class:`StepTimer` times the steps, :func:`timed_fit` runs the fit. The benchmarks run as
``python benchmarks/<script>.py``, which puts this folder on the import path.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def quiet_lightning() -> None:
    """Lightning's INFO lines (and callbacks' verdicts logged at INFO) off: the benchmark prints its ratios."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def synchronize(device: str) -> None:
    """Wait for the work queued on a GPU (a CPU has none), so that a wall-clock time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer(Callback):
    """The wall-clock time of each training step (batch start to batch end) not followed by a measurement.

    Place it before the callback timed in the Trainer's callbacks: its ``on_train_batch_end`` then runs right
    after the optimizer step, before the callback's.

    Args:
        device: the device trained on (:func:`synchronize`).
        measure_every: the callback's cadence in steps; the steps it measures after are left out.

    Attributes:
        durations: seconds per timed step, in order (the first pays for lazy initialisation).
    """

    def __init__(self, device: str, measure_every: int) -> None:
        self.device, self.measure_every = device, measure_every
        self.start, self.durations = 0.0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        if trainer.global_step % self.measure_every:  # steps not followed by a measurement
            self.durations.append(time.perf_counter() - self.start)


def timed_fit(
    module: LightningModule, data: LightningDataModule, callbacks: list[Callback], device: str, steps: int
) -> None:
    """Train ``module`` on ``data`` for ``steps`` optimizer steps on one device, with ``callbacks``.

    The callbacks log to TensorBoard (in a temporary folder) as in a run; no validation, checkpoints, progress
    bar or model summary, and warnings silenced, so that only training and the callbacks are timed.
    """
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
            max_steps=steps,
            logger=TensorBoardLogger(root, name="bench"),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=data)
