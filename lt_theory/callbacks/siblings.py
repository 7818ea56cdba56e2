r"""Siblings trained after ``fit`` and the linear path to them: the glue LinearModeConnectivity and IMPPruner share.

**Instability analysis** (Frankle, Dziugaite, Roy & Carbin, ICML 2020, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis"). A network trained from a state :math:`\theta_k` to step :math:`T` and a *sibling*
trained from the same :math:`\theta_k` to :math:`T` with another data order end at :math:`\theta_T` and
:math:`\theta'_T`. With :math:`E(\alpha)` the error of :math:`(1 - \alpha)\,\theta_T + \alpha\,\theta'_T`, the
error barrier

.. math::
    B = \max_\alpha E(\alpha) - \tfrac12 \big(E(0) + E(1)\big)

says how far SGD noise alone sends the two apart: the network is *stable* when :math:`B \approx 0` (under 2%).
:class:`~lt_theory.callbacks.lmc.LinearModeConnectivity` measures it for the dense network at several
:math:`k`; ``IMPPruner(stability=True)`` for every level of iterative magnitude pruning, the sibling trained with
the level's masks from the level's start (:class:`~lt_theory.callbacks.ticket_stability.LevelSiblings`):
Frankle et al. find that the IMP subnetworks that reach full accuracy are exactly the stable ones, and that
rewinding to :math:`k > 0` instead of to initialisation is what makes those of deeper networks stable.

What both callbacks share, here:

- :class:`PathSettings`: the path's evaluation settings, checked once;
- :class:`PathEvaluation`: the fixed training subset and the test split (built once,
  :func:`~lt_theory.callbacks.evaluation_sets.evaluation_sets`), the train and test paths and their barriers
  (:func:`~lt_theory.measures.interpolation.linear_paths`, :func:`~lt_theory.measures.interpolation.paths_record`);
- :class:`SpawnSnapshots`: Lightning checkpoints at given steps with the global RNG states;
- :func:`sibling_phase`: the block in which siblings train, after ``fit``: the global RNG given back at its
  end, and requeue-safe on SLURM (:func:`~lt_theory.training.preemption.requeue_guard`);
- :class:`SiblingMeasurement`: a stored result reused only for the same parent, seed and settings, else the
  sibling trained (or its stored weights read back), its path evaluated once, the result stored; a sibling
  that raises or diverges gives NaN barriers and one warning;
- :func:`log_path_result`: the barriers and the error along the path, logged at a step.

A path's evaluation shows its alphas (``path k=K: alpha j of m``) on rank zero
(:class:`~lt_theory.training.progress.PathProgress`), as a bar when the trainer shows one.

The mathematics is in :mod:`lt_theory.measures.interpolation`; child runs, stored results and the requeue
guard in :mod:`lt_theory.training`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lt_theory.callbacks.evaluation_sets import computed_once, evaluation_sets
from lt_theory.checks import check_int, check_positive_int
from lt_theory.figures import error_along_path_figure
from lt_theory.measures.interpolation import BN_MODES, DEFAULT_NUM_ALPHAS, linear_paths, paths_record
from lt_theory.training.child import (
    SNAPSHOT_RNG_KEY,
)
from lt_theory.training.preemption import RequeueGuard, requeue_guard, save_checkpoint_atomically
from lt_theory.training.progress import PathProgress
from lt_theory.training.rng import rng_states
from lt_theory.training.siblings import SiblingStore

__all__ = [
    "BARRIERS",
    "PathEvaluation",
    "PathSettings",
    "Sibling",
    "SiblingMeasurement",
    "SpawnSnapshots",
    "as_float",
    "log_path_result",
    "sibling_phase",
]

SPLITS = ("train", "test")
BARRIERS = tuple(f"{split}_{kind}_barrier" for split in SPLITS for kind in ("error", "loss"))
"""The barriers a path's result holds: ``train_error_barrier``, ``train_loss_barrier``, ``test_...``."""

Warn = Callable[[str, str], None]


def as_float(value) -> float:
    """A stored number as a float (None, as a NaN may read back from JSON, is NaN)."""
    return math.nan if value is None else float(value)


class PathSettings:
    """How the linear path between two networks is evaluated: the arguments LinearModeConnectivity and
    ``IMPPruner(stability=True)`` share, checked once.

    Args:
        num_alphas: points of the path's grid, endpoints included (30 as in Frankle et al.).
        coarse_every: evaluate every ``coarse_every``-th grid point first, then around the maxima
            (:func:`~lt_theory.measures.interpolation.linear_paths`); None or 1 evaluates the whole grid.
        bn: ``"reset"`` or ``"interpolate"`` (:func:`~lt_theory.measures.interpolation.linear_path`).
        bn_batches: batches of the training subset used per BatchNorm reset; None for all of them.
        train_subset_size: training examples evaluated (a fixed subset drawn from ``seed``); None for all.
        test_subset_size: first test (or validation) examples evaluated; None for all.
        eval_batch_size: batch size of the evaluation and reset passes.
        seed: seed of the training subset.

    Raises:
        ValueError: naming the argument, for a bad value.

    Example:
        >>> PathSettings(num_alphas=5).stored()["num_alphas"]
        5
    """

    def __init__(
        self,
        num_alphas: int = DEFAULT_NUM_ALPHAS,
        coarse_every: int | None = 5,
        bn: str = "reset",
        bn_batches: int | None = None,
        train_subset_size: int | None = 1000,
        test_subset_size: int | None = None,
        eval_batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        check_positive_int("num_alphas", num_alphas)
        if num_alphas < 2:
            raise ValueError(f"`num_alphas` must be at least 2 (both endpoints), got {num_alphas}")
        if bn not in BN_MODES:
            raise ValueError(f"`bn` must be one of {BN_MODES}, got {bn!r}")
        for name, value in (
            ("coarse_every", coarse_every),
            ("bn_batches", bn_batches),
            ("train_subset_size", train_subset_size),
            ("test_subset_size", test_subset_size),
        ):
            check_positive_int(name, value, allow_none=True)
        self.eval_batch_size = check_positive_int("eval_batch_size", eval_batch_size)
        self.seed = check_int("seed", seed, minimum=0)
        self.num_alphas, self.coarse_every, self.bn, self.bn_batches = (
            num_alphas,
            coarse_every,
            bn,
            bn_batches,
        )
        self.train_subset_size, self.test_subset_size = train_subset_size, test_subset_size

    def stored(self) -> dict:
        """What a stored result was evaluated with: it is reused only under the same settings."""
        names = (
            "num_alphas",
            "coarse_every",
            "bn",
            "bn_batches",
            "train_subset_size",
            "test_subset_size",
            "seed",
        )
        return {name: getattr(self, name) for name in names}


class PathEvaluation:
    """The evaluation sets of a data module (built once) and the paths between two networks on them.

    Args:
        settings: the evaluation's settings.
        who: the callback's name, for the messages.
        warn: ``warn(key, message)``, called once per problem.
    """

    def __init__(self, settings: PathSettings, who: str, warn: Warn) -> None:
        self.settings, self.who, self.warn = settings, who, warn
        self._sets: dict | None = None

    def reset(self) -> None:
        """Forget the sets (a new fit, maybe on other data)."""
        self._sets = None

    def sets(self, trainer: Trainer) -> dict:
        """``{"loaders": {"train": ..., "test": ...}, "transform": ...}`` of ``trainer.datamodule``, built once.

        Raises:
            ValueError: when the training set cannot be read as a map-style dataset with a length.
        """
        if self._sets is not None:
            return self._sets
        s = self.settings
        sets = evaluation_sets(
            trainer, s.train_subset_size, s.test_subset_size, s.seed, s.eval_batch_size, self.warn
        )
        if sets.train is None:
            raise ValueError(
                f"{self.who} needs the training set of {type(trainer.datamodule).__name__} as a map-style "
                "dataset with a length (a DataLoader over it) to evaluate the path; found none."
            )
        loaders = {"train": sets.train}
        if sets.test is None:
            self.warn("no-test-set", "the data module has no test or validation set: only train barriers.")
        else:
            loaders["test"] = sets.test
        self._sets = {"loaders": loaders, "transform": sets.transform}
        return self._sets

    def record(self, trainer: Trainer, model_a, model_b, device, progress: PathProgress | None = None) -> dict:
        """Train and test paths between two networks (modules or state dicts, one a module), with their
        barriers, as plain Python numbers (:func:`~lt_theory.measures.interpolation.paths_record`); ``progress``
        is told of each alpha evaluated and closed at the end."""
        sets, s = self.sets(trainer), self.settings
        try:
            paths = linear_paths(
                model_a,
                model_b,
                sets["loaders"],
                alphas=s.num_alphas,
                coarse_every=s.coarse_every,
                bn=s.bn,
                bn_loader=sets["loaders"]["train"],
                bn_batches=s.bn_batches,
                transform=sets["transform"],
                device=device,
                progress=progress,
            )
        finally:
            if progress is not None:
                progress.close()
        return paths_record(paths)


class SpawnSnapshots:
    """Lightning checkpoints of a run at given steps, each written once with the global RNG states.

    ``trainer.save_checkpoint`` draws no random number and changes nothing, so the run is bit-identical to
    one without snapshots. A checkpoint the trainer writes at a due step before the step's snapshot is
    recorded (SLURM's requeue signal came while the snapshot was written) also keeps the RNG states of that
    step, and a run resumed there writes the snapshot with them (a resume does not restore the RNG states).

    Attributes:
        paths: step -> the snapshot's file.
    """

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self._resumed: tuple = (None, None)  # (step, RNG states) of the checkpoint a fit resumed from

    def reset(self) -> None:
        """Forget the snapshots of another fit."""
        self.paths, self._resumed = {}, (None, None)

    def due(self, step: int, steps: Iterable[int]) -> bool:
        """Whether ``step`` is one of ``steps`` and its snapshot is not written yet."""
        return step in steps and step not in self.paths

    def write(self, trainer: Trainer, path: str | os.PathLike) -> None:
        """Write the snapshot of ``trainer.global_step`` to ``path`` (atomically; every rank enters)."""
        save_checkpoint_atomically(trainer, path)
        self.paths[trainer.global_step] = str(path)

    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict, steps: Iterable[int]) -> None:
        """Add the global RNG states of a due step to a checkpoint being written (the caller's hook)."""
        if self.due(trainer.global_step, steps):
            step, states = self._resumed
            fresh = step != trainer.global_step or states is None
            checkpoint[SNAPSHOT_RNG_KEY] = (
                rng_states(include_cuda=torch.cuda.is_available()) if fresh else states
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Remember the step and the RNG states of the checkpoint a fit resumes from (the caller's hook)."""
        self._resumed = (checkpoint.get("global_step"), checkpoint.get(SNAPSHOT_RNG_KEY))


@contextmanager
def sibling_phase(trainer: Trainer) -> Iterator[RequeueGuard | None]:
    """The block in which siblings train after ``fit`` (every rank enters): the global RNG states are given
    back at its end, and on SLURM with ``auto_requeue`` the block is requeue-safe.

    Yields:
        The :class:`~lt_theory.training.preemption.RequeueGuard` to pass to the children, or None.
    """
    with isolate_rng(include_cuda=torch.cuda.is_available()), requeue_guard(trainer) as guard:
        yield guard


class Sibling(NamedTuple):
    """One sibling: its folder and what names its files (start step, end, seed, the parent's fingerprint)."""

    store: SiblingStore
    k: int
    final_step: int
    parent: str
    seed: int
    label: str
    """How the messages call it: ``"spawned at step 3"``, ``"of level 2"``."""
    path_label: str | None = None
    """How its path's progress is shown (``"path k=3"``); None for ``"path <label>"``."""

    @property
    def weights(self) -> Path:
        """Its final weights' file."""
        return self.store.file(self.k, self.final_step, self.seed, self.parent, ".pt")


class SiblingMeasurement:
    """A sibling's result: reused when stored, else trained and its path to the parent evaluated.

    Args:
        settings: the path's evaluation.
        who: the callback's name, for the messages.
        warn: ``warn(key, message)``, called once per problem.
    """

    def __init__(self, settings: PathSettings, who: str, warn: Warn) -> None:
        self.settings, self.warn = settings, warn
        self.paths = PathEvaluation(settings, who, warn)

    def result(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        sibling: Sibling,
        previous: dict | None,
        train: Callable[[], dict[str, Tensor]],
        parent: Callable[[], nn.Module],
    ) -> dict:
        """The sibling's result (every rank enters, every rank gets it).

        Args:
            trainer, pl_module: the parent's.
            sibling: the sibling.
            previous: its result kept in the callback's state, or None.
            train: trains the sibling, writes its final weights to ``sibling.weights`` (rank zero) and returns
                them (CPU state dict); called only when neither a result nor the weights are stored.
            parent: returns the parent network (a module holding the parent's final weights).

        Returns:
            The path (:meth:`PathEvaluation.record`) and ``final_step``, ``parent``, ``sibling_seed``,
            ``settings``, ``weights`` and ``diverged``; or NaN barriers and ``failed`` (the error), not stored.
        """
        settings = self.settings.stored()
        s = sibling
        if not SiblingStore.reusable(previous, s.final_step, s.parent, s.seed, settings):
            previous = None
            if trainer.is_global_zero:
                previous = s.store.stored_result(s.k, s.final_step, s.parent, s.seed, settings)
        previous = trainer.strategy.broadcast(previous, src=0)
        return previous if previous is not None else self._new(trainer, pl_module, sibling, train, parent)

    def _new(self, trainer, pl_module, sibling: Sibling, train, parent) -> dict:
        error = None
        try:
            state = self._trained(trainer, sibling, train)
        except Exception as exception:  # noqa: BLE001 - one failed sibling must not lose the others
            error = f"{type(exception).__name__}: {exception}"
        # every rank takes the same branch: the evaluation is collective
        if not trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            return self._evaluated(trainer, pl_module, sibling, state, parent)
        error = error or "on another rank"
        self.warn(
            f"failed:{sibling.label}",
            f"the sibling {sibling.label} failed ({error}): its barriers are NaN, the other siblings go on, and a "
            "resumed run trains it again.",
        )
        names = {"final_step": sibling.final_step, "parent": sibling.parent, "sibling_seed": sibling.seed}
        return {**dict.fromkeys(BARRIERS, math.nan), **names, "failed": error}

    @staticmethod
    def _trained(trainer: Trainer, sibling: Sibling, train) -> dict[str, Tensor]:
        """The sibling's final weights: read back if a preemption came while its path was evaluated, else trained."""
        s = sibling
        if trainer.strategy.broadcast(s.weights.exists() if trainer.is_global_zero else None, src=0):
            return s.store.trained_weights(s.k, s.final_step, s.seed, s.parent, tidy=trainer.is_global_zero)
        return train()

    def _evaluated(self, trainer, pl_module, sibling: Sibling, state: dict[str, Tensor], parent) -> dict:
        """Evaluate parent vs sibling (once), store the result on rank zero (the weights are stored), share it."""
        diverged = self._diverged(sibling, state)
        device = trainer.strategy.root_device
        progress = self._progress(sibling, bars=trainer.progress_bar_callback is not None)
        result = computed_once(
            trainer, pl_module, lambda: self.paths.record(trainer, parent(), state, device, progress)
        )
        return self._stored(result, sibling, diverged, write=trainer.is_global_zero)

    def evaluated_outside_fit(
        self, data, parent: nn.Module, sibling: Sibling, state: dict[str, Tensor], device, bars: bool = True
    ) -> dict:
        """The result of a sibling trained elsewhere (a deferred sibling), evaluated in this one process and stored.

        Args:
            data: what the evaluation sets are read from in place of a trainer: an object with ``datamodule`` (set
                up) and ``train_dataloader`` (None: the data module's).
            parent: the parent network (a module holding the parent's final weights).
            sibling: the sibling.
            state: its final weights.
            device: where to evaluate.
            bars: show the path's progress as a bar (else one line per alpha).

        Returns:
            As :meth:`result`, the same numbers the parent's process computes from the same weights and data.
        """
        diverged = self._diverged(sibling, state)
        result = self.paths.record(data, parent, state, device, self._progress(sibling, bars))
        return self._stored(result, sibling, diverged, write=True)

    @staticmethod
    def _progress(sibling: Sibling, bars: bool) -> PathProgress:
        return PathProgress(sibling.path_label or f"path {sibling.label}", bars=bars)

    def _diverged(self, sibling: Sibling, state: dict[str, Tensor]) -> bool:
        diverged = not all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())
        if diverged:
            self.warn(
                f"diverged:{sibling.label}",
                f"the sibling {sibling.label} diverged (NaN/Inf in its weights): its barriers are NaN; the other "
                "siblings go on.",
            )
        return diverged

    def _stored(self, result: dict, sibling: Sibling, diverged: bool, write: bool) -> dict:
        if diverged:  # the path's errors are numbers (NaN rows count as wrong), but no barrier exists
            result.update(dict.fromkeys(BARRIERS, math.nan))
        result.update(
            final_step=sibling.final_step,
            parent=sibling.parent,
            sibling_seed=sibling.seed,
            settings=self.settings.stored(),
            weights=str(sibling.weights),
            diverged=diverged,
        )
        if write:
            sibling.store.save(sibling.k, result)
        return result


def log_path_result(callback, trainer: Trainer, result: dict, step: int, title: str) -> None:
    """Log a sibling's barriers (``<prefix>/<split>_<error|loss>_barrier``) and the image
    ``<prefix>/error_along_path`` at ``step``; the NaN of a sibling that failed or diverged warns no more.

    Args:
        callback: the :class:`~lt_theory.callbacks.base.TheoryCallback` logging.
        trainer: the parent's trainer.
        result: what :meth:`SiblingMeasurement.result` returned.
        step: the step to log at.
        title: the figure's title.
    """
    scalars = {name: as_float(result[name]) for name in BARRIERS if name in result}
    explained = result.get("diverged") or result.get("failed")  # one warning of their own said why
    callback.log_scalars(trainer, scalars, step=step, warn_nonfinite=not explained)
    if trainer.is_global_zero and not result.get("failed"):
        callback.log_figure(trainer, "error_along_path", error_along_path_figure(result, title), step=step)
