r"""LinearModeConnectivity: instability analysis (Frankle et al.) and the path from initialisation, in a run.

**Spawn mode** (Frankle, Dziugaite, Roy & Carbin, ICML 2020, "Linear Mode Connectivity and the Lottery
Ticket Hypothesis"). At each spawn step :math:`k` the whole training state is written to disk as a Lightning
checkpoint (weights, buffers, optimizer, LR schedulers, loop position, data-module state) together with the
global RNG states. When the parent run ends at step :math:`T`, a *sibling* is trained from each snapshot to
:math:`T` in a child ``Trainer`` (same accelerator, strategy, devices and precision) with a different seed for
the data order and the augmentation (with an lt_theory data module nothing else differs), and the path
:math:`\theta(\alpha) = (1 - \alpha)\theta_{parent} + \alpha\theta_{sibling}` is evaluated on a fixed
subset of the training set and on the test (or validation) set, BatchNorm statistics re-estimated at each
:math:`\alpha` by default. The error barrier

.. math::
    B(k) = \max_\alpha E(\alpha) - \tfrac12 \big(E(0) + E(1)\big)

is the instability at :math:`k`; the network is *stable* at the first :math:`k` with :math:`B(k)` under a
threshold (2%, as in the paper). Frankle et al. find LeNet stable at initialisation and ResNet-20 on
CIFAR-10 stable after about 3% of training (iteration 2000 of 63K).

**Init mode** (Goodfellow, Vinyals & Saxe, ICLR 2015, "Qualitatively characterizing neural network
optimization problems"). Every ``every_n_epochs`` epochs, the path from the initial weights to the current
ones, with the same barriers; no child run.

The mathematics (interpolation, BatchNorm reset, paths, barriers, stable point) is in
:mod:`lt_theory.measures.interpolation`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.evaluation_sets import computed_once
from lt_theory.callbacks.siblings import (
    BARRIERS,
    PathSettings,
    Sibling,
    SiblingMeasurement,
    SpawnSnapshots,
    as_float,
    log_path_result,
    sibling_phase,
)
from lt_theory.checks import check_fraction, check_int, check_positive_int
from lt_theory.figures import error_along_path_figure, stability_figure
from lt_theory.measures.interpolation import DEFAULT_NUM_ALPHAS, stable_point
from lt_theory.training.child import (
    ChildRun,
    check_child_strategy,
    train_from_snapshot,
    warn_about_training_callbacks,
)
from lt_theory.training.deferred import check_rebuildable, write_task_list
from lt_theory.training.progress import SiblingsProgress, info
from lt_theory.training.siblings import SiblingStore, check_spawn_steps, resolve_spawn_steps, sibling_seed
from lt_theory.training.state import cpu_copy, save_atomically, state_fingerprint

__all__ = ["LinearModeConnectivity"]

MODES = ("spawn", "init")
SIBLINGS = ("in_job", "deferred")
_WHO = "LinearModeConnectivity(mode='spawn') trains siblings"
_HINT = "Use mode='init', or strategy='ddp' / one device."
_LOGGER = "lt_theory.lmc"


#: ``"auto"`` subset sizes (train, test) per mode: a spawn's path is evaluated once per ``k`` after a sibling's
#: training, an init path every few epochs of the run it watches (``benchmarks/bench_lmc.py --versus-training``)
AUTO_SUBSETS = {"spawn": (1000, None), "init": (512, 1024)}


def _subset_sizes(mode: str, train: int | str | None, test: int | str | None) -> tuple[int | None, int | None]:
    """The subset sizes with ``"auto"`` resolved for ``mode`` (other values are checked by PathSettings)."""
    for name, value in (("train_subset_size", train), ("test_subset_size", test)):
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"`{name}` must be a positive int, None (all) or 'auto', got {value!r}")
    auto_train, auto_test = AUTO_SUBSETS[mode]
    return (auto_train if train == "auto" else train, auto_test if test == "auto" else test)


class LinearModeConnectivity(TheoryCallback):
    """Instability analysis (spawn siblings at step k, error barrier of parent vs sibling) or the init path.

    ``mode="spawn"``: at each spawn step ``k`` the whole training state is saved as a checkpoint under
    ``directory``; when the parent's fit ends, one sibling per ``k`` is trained from it to the end in a child
    Trainer (:mod:`lt_theory.training.child`) with another data order, and the path between the parent's and
    the sibling's final weights is evaluated coarse to fine. ``mode="init"``: every ``every_n_epochs`` epochs,
    the path from the initial weights to the current ones. The siblings' data order, the evaluation sets,
    preemption, DDP and the cost: ``docs/callbacks.md`` (LinearModeConnectivity).

    Logged tags (``spawn``): ``lmc/test_error_barrier``, ``lmc/train_error_barrier``,
    ``lmc/test_loss_barrier``, ``lmc/train_loss_barrier`` at step ``k`` (so TensorBoard draws stability
    against ``k``); the image ``lmc/error_along_path`` (error against alpha, train and test) at step ``k``;
    at the end, ``lmc/stable_point`` (the first ``k`` whose test error barrier, else train, is under
    ``threshold``; not logged when there is none), the image ``lmc/stability`` (barriers against ``k``) and
    the text ``lmc/summary``. (``init``): ``lmc/init_test_error_barrier``, ``lmc/init_train_error_barrier``,
    ``lmc/init_test_loss_barrier``, ``lmc/init_train_loss_barrier`` and the image ``lmc/init_path``. A
    custom-scalars panel ``lmc``. A sibling that diverges gives NaN barriers and one warning; the other ``k``
    go on.

    Args:
        mode: ``"spawn"`` or ``"init"``.
        spawn_steps: optimizer steps ``k`` (ints >= 0) or fractions of training (floats in [0, 1), resolved
            against ``trainer.estimated_stepping_batches`` at the start of training); every ``k`` must be
            before the end of training.
        every_n_epochs: the cadence of ``mode="init"`` (every 10 epochs: about 1.5% of the training time of
            ResNet-20 on CIFAR-10 with the default subsets; ``docs/callbacks.md``).
        num_alphas: points of the path's grid, endpoints included (30 as in Frankle et al.).
        coarse_every: evaluate every ``coarse_every``-th point of the grid first, then the grid points around
            the maxima of the error and the loss (:func:`~lt_theory.measures.interpolation.linear_paths`): the
            same barrier for single-peaked paths at about half the cost of the whole grid (11 of 30 points on
            a ResNet-20 init path with the default 5); None or 1 evaluates the whole grid.
        bn: ``"reset"`` or ``"interpolate"`` (see :func:`~lt_theory.measures.interpolation.linear_path`);
            a model without BatchNorm gives the same path in both.
        bn_batches: batches of the training subset used per reset; None for all of them.
        train_subset_size: training examples evaluated (fixed, drawn from ``seed``; also the BatchNorm reset's);
            None for all; ``"auto"``: 1,000 in spawn mode, 512 in init mode.
        test_subset_size: first test (or validation) examples evaluated; None for all; ``"auto"``: all of them
            in spawn mode (as Frankle et al.), the first 1,024 in init mode (measured every few epochs).
        eval_batch_size: batch size of the evaluation and reset passes.
        threshold: the error barrier under which a network counts as stable (0.02).
        sibling_seed: seed of the siblings' data order and augmentation; None draws one per ``k`` from the
            parent's seed (different from it).
        seed: seed of the training subset.
        directory: where snapshots, initial weights, sibling weights and results go; None for
            ``<trainer.log_dir>/lmc``.
        siblings: ``"in_job"`` (spawn mode: train the siblings in the parent's job when its fit ends) or
            ``"deferred"``: write the snapshots, the parent's final weights and a task list
            (``<directory>/sibling_tasks.json``, :mod:`lt_theory.training.deferred`) and end the fit; then one
            ``python -m lt_theory.lmc train-sibling --dir <directory> --task-index i`` per sibling (a SLURM array
            task each: ``recipes/slurm/lmc_siblings_array.sbatch``) and ``python -m lt_theory.lmc aggregate --dir
            <directory>``, which logs the same tags into the parent's TensorBoard run. The module and the data
            module must be rebuildable in another process (checked at setup).

    Attributes:
        results: ``{k: {...}}`` for spawn mode: barriers, the path (``alphas``, ``train_error``,
            ``test_error``, losses), the final step, the sibling's seed and weights file.
        history: one dict per init-mode measurement.

    Raises:
        ValueError: for a bad argument, naming it; at setup, without a data module or (spawn mode) with a
            strategy other than one device or DDP; at the start of training, for spawn steps at or beyond the
            end of training (or colliding once fractions are resolved).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> lmc = LinearModeConnectivity(mode="spawn", spawn_steps=[0, 100, 500, 2000])
        >>> trainer = Trainer(max_steps=10_000, callbacks=[lmc])
        >>> # trainer.fit(module, datamodule=CIFAR10DataModule(...)) fills lmc.results, e.g. these barriers:
        >>> lmc.results = {
        ...     k: {"test_error_barrier": b, "train_error_barrier": b / 2, "test_loss_barrier": 2 * b}
        ...     for k, b in [(0, 0.31), (100, 0.02), (500, 0.015), (2000, 0.004)]
        ... }
        >>> lmc.stable_point()  # the first k whose test error barrier is under threshold=0.02 (100 is not)
        500
        >>> print(lmc.summary())
        | spawn step k | test error barrier | train error barrier | test loss barrier |
        |---|---|---|---|
        | 0 | 0.3100 | 0.1550 | 0.6200 |
        | 100 | 0.0200 | 0.0100 | 0.0400 |
        | 500 | 0.0150 | 0.0075 | 0.0300 |
        | 2000 | 0.0040 | 0.0020 | 0.0080 |
        <BLANKLINE>
        Stable from spawn step 500 (error barrier < 0.02).
    """

    prefix = "lmc"

    def __init__(
        self,
        mode: str = "spawn",
        spawn_steps: Sequence[int | float] = (0,),
        every_n_epochs: int = 10,
        num_alphas: int = DEFAULT_NUM_ALPHAS,
        coarse_every: int | None = 5,
        bn: str = "reset",
        bn_batches: int | None = None,
        train_subset_size: int | str | None = "auto",
        test_subset_size: int | str | None = "auto",
        eval_batch_size: int = 256,
        threshold: float = 0.02,
        sibling_seed: int | None = None,
        seed: int = 0,
        directory: str | os.PathLike | None = None,
        siblings: str = "in_job",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
        if siblings not in SIBLINGS:
            raise ValueError(f"`siblings` must be one of {SIBLINGS}, got {siblings!r}")
        if siblings != "in_job" and mode != "spawn":
            raise ValueError(f"`siblings={siblings!r}` needs mode='spawn' (the init path trains no sibling)")
        self.siblings = siblings
        self.spawn_steps = check_spawn_steps(spawn_steps)
        check_positive_int("every_n_epochs", every_n_epochs)
        train_subset_size, test_subset_size = _subset_sizes(mode, train_subset_size, test_subset_size)
        self.path_settings = PathSettings(
            num_alphas, coarse_every, bn, bn_batches, train_subset_size, test_subset_size, eval_batch_size, seed
        )
        check_fraction("threshold", threshold, low_open=True)
        check_int("sibling_seed", sibling_seed, minimum=0, allow_none=True)
        self.mode, self.every_n_epochs, self.num_alphas, self.bn = mode, every_n_epochs, num_alphas, bn
        self.coarse_every, self.bn_batches = coarse_every, bn_batches
        self.train_subset_size, self.test_subset_size = train_subset_size, test_subset_size
        self.eval_batch_size, self.threshold = eval_batch_size, threshold
        self.sibling_seed, self.seed = sibling_seed, seed
        self.directory = None if directory is None else str(directory)
        self.resolved_steps: list[int] | None = None
        self.results: dict[int, dict] = {}
        self.history: list[dict] = []
        self.init_weights: str | None = None
        self._snapshots = SpawnSnapshots()
        self._measurement = SiblingMeasurement(self.path_settings, "LinearModeConnectivity", self.warn_once)
        self._store: SiblingStore | None = None
        self._init_state: dict[str, Tensor] | None = None
        self._guard = None  # the requeue guard of the sibling phase (SLURM)

    @property
    def snapshots(self) -> dict[int, str]:
        """Spawn step -> its snapshot's file (spawn mode)."""
        return self._snapshots.paths

    @property
    def state_key(self) -> str:
        # one spawn-mode and one init-mode instance can share a Trainer, each with its state
        return self._generate_state_key(mode=self.mode)

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.mode == "spawn":
            check_child_strategy(trainer, _WHO, _HINT)  # refuse what a child Trainer cannot reproduce, now
            warn_about_training_callbacks(trainer, self, "siblings", self.warn_once)
            if self.siblings == "deferred":
                check_rebuildable(trainer, pl_module)  # refused now, not in each sibling's task
        self._reset_run_state()  # a reused instance starts afresh; a resumed fit's state is loaded after setup
        # rank zero's choice of folder (a filesystem every rank sees, as for checkpoints)
        root = self.directory or os.path.join(trainer.log_dir or trainer.default_root_dir, "lmc")
        self._store = SiblingStore(trainer.strategy.broadcast(str(root), src=0))
        self._measurement.paths.reset()
        if trainer.datamodule is None:
            raise ValueError(
                "LinearModeConnectivity needs a data module (`trainer.fit(module, datamodule=...)`): it "
                "evaluates the path on its training and test sets (and trains siblings on it); found none."
            )

    def _reset_run_state(self) -> None:
        self.resolved_steps = None
        self.results, self.history = {}, []
        self.init_weights, self._init_state = None, None
        self._snapshots.reset()

    # -- hooks --------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        charts = {
            "spawn": {
                "Instability (error barrier) vs spawn step": ["test_error_barrier", "train_error_barrier"],
                "Loss barrier vs spawn step": ["test_loss_barrier", "train_loss_barrier"],
            },
            "init": {
                "Path from init: error barrier": ["init_test_error_barrier", "init_train_error_barrier"],
                "Path from init: loss barrier": ["init_test_loss_barrier", "init_train_loss_barrier"],
            },
        }[self.mode]
        self.add_charts(trainer, charts)
        if self.mode == "spawn":
            self.resolved_steps = resolve_spawn_steps(self.spawn_steps, trainer.estimated_stepping_batches)
            if trainer.global_step > 0:  # resumed from a checkpoint taken at k before k's snapshot was recorded
                self._maybe_snapshot(trainer)
        else:
            self._start_init_path(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # k = 0 once the first batch is fetched: the data module's state then holds the epoch's order
        if self.mode == "spawn" and trainer.global_step == 0:
            self._maybe_snapshot(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.mode == "spawn":
            self._maybe_snapshot(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "init" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure_init_path(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_fit_end, not on_train_end: it also runs when a finished run is resumed (the fit loop is skipped),
        # so siblings interrupted by a preemption are trained then; on SLURM the phase is requeue-safe
        if self.mode == "spawn" and self.siblings == "deferred":
            steps = self._sibling_steps(trainer.global_step)
            seeds = {k: sibling_seed(trainer.datamodule, k, self.sibling_seed) for k in steps}
            with sibling_phase(trainer):  # a requeue signal while the files are written: written again after it
                write_task_list(
                    trainer, pl_module, self._store, steps, seeds, self.path_settings, self.threshold, self.warn_once
                )
        elif self.mode == "spawn":
            with sibling_phase(trainer) as self._guard:
                self._run_siblings(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self.mode == "spawn":  # a snapshot, or a checkpoint before it: a resume writes the snapshot then
            self._snapshots.on_save_checkpoint(trainer, checkpoint, self.resolved_steps or ())

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._snapshots.on_load_checkpoint(checkpoint)

    # -- snapshots ----------------------------------------------------------------------------------

    def _maybe_snapshot(self, trainer: Trainer) -> None:
        k = trainer.global_step
        if self.mode == "spawn" and self._snapshots.due(k, self.resolved_steps or ()):
            self._snapshots.write(trainer, self._store.snapshot(k))  # every rank enters; rank zero writes

    def _paths(self, trainer: Trainer, model_a, model_b, device) -> dict:
        """Train and test paths between two networks, with their barriers, as plain Python numbers."""
        return self._measurement.paths.record(trainer, model_a, model_b, device)

    # -- spawn: siblings ------------------------------------------------------------------------------

    def _sibling_steps(self, final_step: int) -> dict[int, str]:
        """Spawn step -> snapshot of every sibling to train; a warning for each ``k`` that has none."""
        steps = {}
        for k in self.resolved_steps or []:
            if k >= final_step or k not in self.snapshots:
                why = f"training ended at step {final_step}" if k >= final_step else "its snapshot is missing"
                self.warn_once(f"skip:{k}", f"no sibling for spawn step {k}: {why}.")
                self.results.pop(k, None)  # a result against another end of training
                continue
            steps[k] = self.snapshots[k]
        return steps

    def _run_siblings(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final_step = trainer.global_step
        fingerprint = state_fingerprint(pl_module.state_dict())
        steps = self._sibling_steps(final_step)
        bars = trainer.progress_bar_callback is not None
        progress = SiblingsProgress({k: final_step - k for k in steps}, bars=bars, logger=_LOGGER)
        for k in steps:
            seed = sibling_seed(trainer.datamodule, k, self.sibling_seed)
            sibling = Sibling(self._store, k, final_step, fingerprint, seed, f"spawned at step {k}", f"path k={k}")
            train = partial(self._train_sibling, trainer, pl_module, k, final_step, seed, fingerprint)
            self.results[k] = self._measurement.result(
                trainer, pl_module, sibling, self.results.get(k), partial(train, progress), lambda: pl_module
            )
            progress.found(k, self.results[k])
            log_path_result(self, trainer, self.results[k], k, f"parent vs sibling spawned at {k}")
        self.log_stability(trainer)

    def _train_sibling(
        self, trainer: Trainer, pl_module: LightningModule, k: int, final_step: int, seed: int, fingerprint: str,
        progress: SiblingsProgress,
    ) -> dict[str, Tensor]:  # fmt: skip
        """Train the sibling of ``k``; its final weights are written before its path is evaluated."""
        run = ChildRun(
            self.snapshots[k],
            start_step=k,
            max_steps=final_step,
            order_seed=seed,
            progress_dir=self._store.progress(k, final_step, seed),
            root_dir=self._store.root(k),
            warn=self.warn_once,
            final_weights=self._store.file(k, final_step, seed, fingerprint, ".pt"),
            guard=self._guard,
            callbacks=[progress.callback(k, k, final_step)],
        )
        return train_from_snapshot(trainer, pl_module, run)

    # -- spawn: logging -------------------------------------------------------------------------------

    def stable_point(self) -> int | None:
        """The first spawn step whose test error barrier (train if no test set) is under ``threshold``."""
        steps = sorted(self.results)
        split = "test" if all("test_error_barrier" in self.results[k] for k in steps) else "train"
        barriers = [as_float(self.results[k][f"{split}_error_barrier"]) for k in steps]
        return stable_point(steps, barriers, threshold=self.threshold)

    def log_stability(self, trainer: Trainer) -> None:
        """Log ``stable_point``, the ``summary`` and the ``stability`` figure of ``results`` at the trainer's step
        (a Trainer, or a :class:`~lt_theory.loggers.LoggerTarget` at the parent's last step)."""
        if not self.results:
            return
        point = self.stable_point()
        if point is not None:
            self.log_scalars(trainer, {"stable_point": point})
        text = self.summary()
        self.log_text(trainer, "summary", text)
        if trainer.is_global_zero:
            self.log_figure(trainer, "stability", stability_figure(self.results, self.threshold))
        info(f"LinearModeConnectivity: {text}", _LOGGER)

    def summary(self) -> str:
        """A markdown table of the barriers per spawn step and the stable point."""
        lines = [
            "| spawn step k | test error barrier | train error barrier | test loss barrier |",
            "|---|---|---|---|",
        ]
        for k in sorted(self.results):
            r = self.results[k]
            names = ("test_error_barrier", "train_error_barrier", "test_loss_barrier")
            cells = [as_float(r.get(name, math.nan)) for name in names]
            lines.append(f"| {k} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
        point = self.stable_point()
        verdict = (
            f"Stable from spawn step {point} (error barrier < {self.threshold:g})."
            if point is not None
            else f"Not stable at any spawn step measured (no error barrier < {self.threshold:g})."
        )
        return "\n".join(lines) + "\n\n" + verdict

    # -- init mode ------------------------------------------------------------------------------------

    def _start_init_path(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._init_state is not None:
            return
        if self.init_weights is not None and Path(self.init_weights).exists():
            self._init_state = torch.load(self.init_weights, map_location="cpu", weights_only=True)
            return
        if trainer.global_step != 0:
            self.warn_once(
                "no-init", "training resumed without the initial weights on disk: the init path is off."
            )
            return
        self._init_state = cpu_copy(dict(pl_module.state_dict()))
        path = self._store.directory / "init_weights.pt"
        if trainer.is_global_zero:
            save_atomically(self._init_state, path)  # a kill while writing leaves no truncated file to read back
        self.init_weights = str(path)

    def _measure_init_path(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._init_state is None:
            return
        record = computed_once(
            trainer, pl_module, lambda: self._paths(trainer, self._init_state, pl_module, pl_module.device)
        )
        record.update(epoch=trainer.current_epoch + 1, step=trainer.global_step)
        self.history.append(record)
        scalars = {f"init_{name}": record[name] for name in BARRIERS if name in record}
        self.log_scalars(trainer, scalars)
        if trainer.is_global_zero:
            self.log_figure(trainer, "init_path", error_along_path_figure(record, "initial weights -> current weights"))

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "directory": None if self._store is None else str(self._store.directory),
            "resolved_steps": None if self.resolved_steps is None else list(self.resolved_steps),
            "snapshots": dict(self.snapshots),
            "results": {k: dict(v) for k, v in self.results.items()},
            "history": [dict(h) for h in self.history],
            "init_weights": self.init_weights,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._store = None if state_dict["directory"] is None else SiblingStore(state_dict["directory"])
        self.resolved_steps = state_dict["resolved_steps"]
        self._snapshots.paths = {int(k): v for k, v in state_dict["snapshots"].items()}
        self.results = {int(k): dict(v) for k, v in state_dict["results"].items()}
        self.history = [dict(h) for h in state_dict["history"]]
        self.init_weights = state_dict["init_weights"]
        self._init_state = None
