r"""``IMPPruner(stability=True)``: the stability of each IMP level's sparse network to SGD noise.

Frankle, Dziugaite, Roy & Carbin (ICML 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
section 5): the subnetworks iterative magnitude pruning finds reach full accuracy exactly when they are stable,
i.e. when two copies trained from the level's start with the level's masks and different data orders end
linearly connected (error barrier :math:`B \approx 0`, under 2%); rewinding to :math:`k > 0` instead of to
initialisation is what makes those of deeper networks stable. :class:`LevelSiblings` is that measurement for
every level of an :class:`~lt_theory.callbacks.imp.IMPPruner` run, built on the sibling glue LinearModeConnectivity
uses (:mod:`lt_theory.callbacks.siblings`).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lt_theory.callbacks.siblings import (
    PathSettings,
    Sibling,
    SiblingMeasurement,
    SpawnSnapshots,
    Warn,
    as_float,
    log_path_result,
    sibling_phase,
)
from lt_theory.loggers import log_tensorboard_scalars
from lt_theory.training.child import (
    ChildRun,
    check_child_strategy,
    detached_copy,
    train_from_snapshot,
    warn_about_training_callbacks,
)
from lt_theory.training.levels import remaining_bp
from lt_theory.training.progress import SiblingsProgress
from lt_theory.training.siblings import SiblingStore, sibling_seed
from lt_theory.training.sparse import MaskedStart
from lt_theory.training.state import cpu_copy, save_atomically, state_fingerprint
from lt_theory.training.tickets import read_ticket

__all__ = ["LevelSiblings"]


class LevelSiblings:
    """``IMPPruner(stability=True)``: a sibling of each completed IMP level, and the path to it.

    The IMP run writes a Lightning snapshot at the rewind step ``k`` (:meth:`snapshot`) and each level's final
    weights at the level's end (:meth:`keep_level`). After the fit, the sibling of level ``l`` starts from that
    snapshot and restarts as the level did, from the level's ticket (its start weights and masks,
    :class:`~lt_theory.training.sparse.MaskedStart`; level 0, the dense network, goes on from the snapshot as
    it is), trains to ``T`` with the level's masks enforced and another data order
    (:func:`~lt_theory.training.child.train_from_snapshot`), and the path between the level's final weights and
    the sibling's is evaluated. Files, under ``directory``: ``snapshot_step=<k>.ckpt``,
    ``final_level<ll>.pt``, and per level a :class:`~lt_theory.training.siblings.SiblingStore` ``level<ll>/``.

    Args:
        settings: the path's evaluation.
        sibling_seed: the siblings' data-order seed; None derives one per level from the parent's.
        warn: ``warn(key, message)``, called once per problem.

    Attributes:
        levels: level -> ``{"weights", "ticket", "parent", "step"}``: its final weights' and its ticket's
            files, the fingerprint of the final weights, and the global step the level ended at.
        results: level -> the sibling's result (:meth:`SiblingMeasurement.result`).
    """

    who = "IMPPruner(stability=True)"

    def __init__(self, settings: PathSettings, sibling_seed: int | None, warn: Warn) -> None:
        self.measurement = SiblingMeasurement(settings, self.who, warn)
        self.sibling_seed, self.warn = sibling_seed, warn
        self.snapshots = SpawnSnapshots()
        self.directory: Path | None = None
        self.levels: dict[int, dict] = {}
        self.results: dict[int, dict] = {}

    def setup(self, trainer: Trainer, callback: Callback, directory: str | os.PathLike) -> None:
        """Check the strategy, the data module and the other callbacks; start afresh in ``directory`` (rank
        zero's).

        Raises:
            ValueError: for a strategy a child Trainer cannot reproduce, or without a data module.
        """
        check_child_strategy(
            trainer, f"{self.who} trains siblings", "Use stability=False, or strategy='ddp'."
        )
        if trainer.datamodule is None:
            raise ValueError(
                f"{self.who} needs a data module (`trainer.fit(module, datamodule=...)`): it trains the siblings "
                "on it and evaluates the paths on its training and test sets; found none."
            )
        warn_about_training_callbacks(trainer, callback, "siblings", self.warn)
        self.directory = Path(trainer.strategy.broadcast(str(directory), src=0))
        self.snapshots.reset()
        self.levels, self.results = {}, {}
        self.measurement.paths.reset()

    def snapshot(self, trainer: Trainer, k: int) -> None:
        """At the rewind step ``k``: the snapshot the siblings start from, once (every rank enters)."""
        if self.snapshots.due(trainer.global_step, (k,)):
            self.snapshots.write(trainer, self.directory / f"snapshot_step={k}.ckpt")

    def keep_level(self, trainer: Trainer, pl_module: LightningModule, level: int, ticket: str) -> None:
        """At a level's end: write its final weights (rank zero, atomically) and remember them with its ticket."""
        state = cpu_copy(pl_module.state_dict())
        path = self.directory / f"final_level{level:02d}.pt"
        if trainer.is_global_zero:
            save_atomically(state, path)
        parent, step = state_fingerprint(state), trainer.global_step
        self.levels[level] = {"weights": str(path), "ticket": ticket, "parent": parent, "step": step}

    def run(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        rewind: dict,
        optimizer_state: str,
        k: int,
        final_step: int,
    ) -> None:
        """The siblings of the completed levels, in order (reused when stored): fills :attr:`results`.

        Args:
            trainer, pl_module: the IMP run's, after its fit.
            rewind: the IMP's state of step ``k`` (``capture_training_state``): the optimizers and schedulers a
                level restarts with.
            optimizer_state: ``"reset"`` or ``"rewind"``, as the IMP's.
            k: the rewind step.
            final_step: ``T``, where every level's training ends in its own count.
        """
        snapshot = self.snapshots.paths.get(k)
        bars = trainer.progress_bar_callback is not None
        progress = SiblingsProgress(dict.fromkeys(sorted(self.levels), final_step - k), bars, key="level")
        with sibling_phase(trainer) as guard:
            for level in sorted(self.levels):
                if snapshot is None:
                    self.warn(
                        "no-snapshot", f"no siblings: the snapshot of step {k} is missing (resumed past it?)."
                    )
                    self.results.pop(level, None)
                    continue
                seed = sibling_seed(trainer.datamodule, level, self.sibling_seed, stream="imp-stability")
                store = SiblingStore(self.directory / f"level{level:02d}")
                sibling = Sibling(
                    store, k, final_step, self.levels[level]["parent"], seed, f"of level {level}"
                )
                self.results[level] = self.measurement.result(
                    trainer,
                    pl_module,
                    sibling,
                    self.results.get(level),
                    partial(
                        self._train,
                        trainer,
                        pl_module,
                        level,
                        sibling,
                        snapshot,
                        guard,
                        rewind,
                        optimizer_state,
                        progress,
                    ),
                    partial(self._parent, trainer, pl_module, level),
                )
                progress.found(level, self.results[level])

    def log(self, callback, trainer: Trainer, history: list[dict]) -> None:
        """Log each level's barriers and path at the level's end step (``history[level]["step"]``), and its
        test error barrier to TensorBoard against the weights remaining in basis points.

        Args:
            callback: the IMPPruner logging.
            trainer: the IMP run's trainer.
            history: the IMP's completed levels (``level``, ``remaining_fraction``, ``step``).
        """
        for level, result in sorted(self.results.items()):
            record = history[level]
            title = f"level {level} ({100 * record['remaining_fraction']:.2f}% of the weights) vs its sibling"
            log_path_result(callback, trainer, result, record["step"], title)
            if "test_error_barrier" in result:  # TensorBoard only, as imp/accuracy_by_remaining_bp
                tag = callback._tag("test_error_barrier_by_remaining_bp")
                barrier = {tag: as_float(result["test_error_barrier"])}
                log_tensorboard_scalars(trainer, barrier, step=remaining_bp(record["remaining_fraction"]))

    def curves(self, history: list[dict]) -> dict[str, list[tuple[float, float]]]:
        """``{"test": [(remaining_fraction, error_barrier), ...], "train": ...}`` of the levels measured."""
        curves = {
            split: [
                (history[level]["remaining_fraction"], as_float(result[f"{split}_error_barrier"]))
                for level, result in sorted(self.results.items())
                if f"{split}_error_barrier" in result
            ]
            for split in ("test", "train")
        }
        return {split: points for split, points in curves.items() if points}

    def _train(
        self, trainer, pl_module, level, sibling: Sibling, snapshot, guard, rewind, optimizer_state, progress
    ):
        callbacks = []
        if level > 0:  # restart as the level did: its start weights, its masks, the optimizer as the IMP's
            ticket = read_ticket(self.levels[level]["ticket"])
            start = {**rewind, "model": ticket["start_state"]}
            callbacks.append(MaskedStart(start, ticket["masks"], optimizer_state, sibling.k))
        callbacks.append(progress.callback(level, sibling.k, sibling.final_step))
        run = ChildRun(
            snapshot,
            start_step=sibling.k,
            max_steps=sibling.final_step,
            order_seed=sibling.seed,
            progress_dir=sibling.store.progress(sibling.k, sibling.final_step, sibling.seed),
            root_dir=sibling.store.root(sibling.k),
            warn=self.warn,
            final_weights=sibling.weights,
            guard=guard,
            callbacks=callbacks,
        )
        return train_from_snapshot(trainer, pl_module, run)

    def _parent(self, trainer: Trainer, pl_module: LightningModule, level: int) -> nn.Module:
        """A copy of the module holding the level's final weights."""
        parent = detached_copy(pl_module, trainer)
        parent.load_state_dict(
            torch.load(self.levels[level]["weights"], map_location="cpu", weights_only=True)
        )
        return parent

    def state_dict(self) -> dict:
        return {
            "directory": None if self.directory is None else str(self.directory),
            "snapshots": dict(self.snapshots.paths),
            "levels": {level: dict(files) for level, files in self.levels.items()},
            "results": {level: dict(result) for level, result in self.results.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.directory = None if state["directory"] is None else Path(state["directory"])
        self.snapshots.paths = {int(k): path for k, path in state["snapshots"].items()}
        self.levels = {int(level): dict(files) for level, files in state["levels"].items()}
        self.results = {int(level): dict(result) for level, result in state["results"].items()}
