"""Preemption on SLURM of the work a callback does after ``fit``: child runs and their evaluation.

Lightning's SLURM support (``SLURMEnvironment(auto_requeue=True)``, detected under ``srun``) answers the
requeue signal (``#SBATCH --signal=SIGUSR1@90``) only while ``fit`` runs: its handler writes
``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` and runs ``scontrol requeue <job id>``, and the requeued job's
``fit(ckpt_path=None)`` resumes from the highest-numbered such file. ``on_fit_end`` runs after ``fit`` gave
the handlers back, so work done there (LinearModeConnectivity's siblings) had none: a child Trainer installed
its own, which checkpointed the child into the child's folder and requeued, and the requeued job found no
checkpoint of its parent and trained it again; between children the signal's default action killed the
process and nothing was requeued.

:func:`requeue_guard` covers such a phase:

1. it installs its handler for the requeue signal first (a child Trainer then installs none: Lightning does
   not replace a handler that is already there), then writes the parent's checkpoint at its end state where
   Lightning's handler would (every rank enters, at a point where nothing changes the parent), so that a
   requeued ``fit(ckpt_path=None)`` restores the finished parent and goes straight to ``on_fit_end``;
2. on the signal between children (or while one is evaluated) it requeues the job at once, as Lightning does;
3. while a child trains (:meth:`RequeueGuard.watch_child`), the child first writes its progress checkpoint at
   its next step boundary, all ranks at the same step, and then the job is requeued; a checkpoint written
   from inside the handler could hold a half-applied optimizer step, and under DDP the ranks would enter its
   collectives at different points;
4. at its end it puts the previous handler back and, if no signal came and nothing raised, removes the
   checkpoint of step 1.

:func:`detached_requeue_guard` does steps 2 and 3 for a child trained outside its parent's process (a deferred
sibling in a SLURM array task, :mod:`lt_theory.training.deferred`): there is no parent to checkpoint, and the
requeued task finds the child's progress checkpoint.

The files the phase relies on are written atomically (:func:`save_checkpoint_atomically`), so a kill while
writing never leaves a truncated file under the name that is later read.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lt_theory.compat import cluster_environment, hpc_checkpoint_path
from lt_theory.training.progress import info, is_rank_zero

__all__ = [
    "RequeueGuard",
    "detached_requeue_guard",
    "requeue_environment",
    "requeue_guard",
    "requeue_job",
    "save_checkpoint_atomically",
]


def requeue_environment(trainer: Trainer) -> SLURMEnvironment | None:
    """The trainer's SLURM environment when Lightning requeues the job on its signal, else None.

    Args:
        trainer: the parent's trainer.

    Returns:
        Its :class:`~lightning.fabric.plugins.environments.SLURMEnvironment` if ``auto_requeue`` is on and the
        platform has the requeue signal; None otherwise (not on SLURM, ``auto_requeue=False``, Windows).
    """
    environment = cluster_environment(trainer)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        return environment
    return None


def requeue_job() -> int | None:
    """``scontrol requeue <job id>`` as Lightning's SLURM handler runs it (``<array job>_<task>`` in an array).

    Returns:
        The command's exit status, or None (and a warning) when the job id is not SLURM's.
    """
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        job_id = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    else:
        job_id = os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_-]+", job_id):
        rank_zero_warn(f"lt_theory: not requeueing: {job_id!r} is not a SLURM job id.")
        return None
    command = ["scontrol", "requeue", job_id]
    info(f"lt_theory: requeueing SLURM job {job_id}", "lt_theory.training")
    try:
        status = subprocess.call(command)
    except FileNotFoundError:  # outside a shell context, as Lightning retries
        status = subprocess.call(" ".join(command), shell=True)
    if status != 0:
        rank_zero_warn(f"lt_theory: requeueing SLURM job {job_id} failed with exit status {status}.")
    return status


def save_checkpoint_atomically(
    trainer: Trainer, path: str | os.PathLike, partial: str | os.PathLike | None = None
) -> None:
    """``trainer.save_checkpoint`` to a partial file that rank zero renames to ``path`` (every rank enters).

    A kill while writing (or a requeue signal whose handler writes a checkpoint of its own in the middle)
    leaves at most the partial file, never a truncated ``path``. An asynchronous checkpoint IO (which writes
    in a thread after this returns; the Trainer's teardown waits for it) and a remote ``path`` are written in
    place, atomically through fsspec as Lightning writes every checkpoint.

    Args:
        trainer: the trainer whose state is written.
        path: the checkpoint file.
        partial: the partial file, on the same filesystem; ``<path>.partial`` by default.
    """
    if isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO) or "://" in str(path):
        trainer.save_checkpoint(path)
        return
    partial = Path(f"{path}.partial" if partial is None else partial)
    trainer.save_checkpoint(partial)
    if trainer.is_global_zero:
        os.replace(partial, path)


class RequeueGuard:
    """What :func:`requeue_guard` does on the requeue signal; built by it (or :func:`detached_requeue_guard`, with
    no parent ``trainer``), not directly.

    Attributes:
        checkpoint: the parent's checkpoint written at the start of the phase (``hpc_ckpt_<n>.ckpt``).
        signalled: whether the requeue signal arrived during the phase.
        requeued: whether this process ran ``scontrol requeue`` (rank zero) or took part in it.
    """

    def __init__(self, trainer: Trainer | None) -> None:
        self.trainer = trainer
        self.checkpoint: str | None = None
        self.signalled = self.requeued = False
        self._pending = False
        self._deferring = trainer is not None  # until the parent's checkpoint is on disk

    def handle(self, signum: int, frame) -> None:
        """The signal handler: requeue now, or at the next safe point (see the module's docstring)."""
        info(f"lt_theory: received the requeue signal {signum} after fit", "lt_theory.training")
        self.signalled = self._pending = True
        if not self._deferring:
            self._requeue()

    def write_parent_checkpoint(self) -> None:
        """Write the parent's checkpoint where a requeued ``fit(ckpt_path=None)`` finds it (every rank)."""
        trainer = self.trainer
        self.checkpoint = trainer.strategy.broadcast(hpc_checkpoint_path(trainer), src=0)
        # Lightning numbers HPC checkpoints by every file whose name holds "ckpt_": not the partial one's
        partial = os.path.join(os.path.dirname(self.checkpoint), "lt_theory_requeue.partial")
        save_checkpoint_atomically(trainer, self.checkpoint, partial)
        self._stop_deferring()

    def _requeue(self) -> None:
        self._pending = False
        if self.requeued:
            return
        self.requeued = True
        if self.trainer is None:
            if is_rank_zero():
                requeue_job()
            return
        for logger in self.trainer.loggers:  # as Lightning's handler: what was logged is on disk
            logger.finalize("finished")
        if self.trainer.is_global_zero:
            requeue_job()

    def _stop_deferring(self) -> None:
        self._deferring = False
        if self._pending:
            self._requeue()

    def checkpoint_child_if_signalled(self, child: Trainer, progress_checkpoint: str) -> None:
        """At a child's step boundary: if the signal came (on any rank), write the child's progress, then
        requeue. Every rank of the child enters."""
        if child.strategy.reduce_boolean_decision(self._pending, all=False):
            save_checkpoint_atomically(child, progress_checkpoint)
            self.signalled = True
            self._requeue()

    @contextmanager
    def watch_child(self, progress_checkpoint: str | os.PathLike) -> Iterator[Callback]:
        """A callback for a child Trainer: while the child trains, the signal is answered at its step boundaries.

        Args:
            progress_checkpoint: the checkpoint the child resumes from after a requeue.

        Yields:
            The callback to pass to the child Trainer. Leaving the block (once the caller has stored what the
            child produced) answers a signal that came after the child's last step.
        """
        try:
            yield _ChildCheckpointOnSignal(self, str(progress_checkpoint))
        finally:
            self._stop_deferring()


class _ChildCheckpointOnSignal(Callback):
    """In a child Trainer: defers the requeue signal from the start of training to the caller's
    :meth:`RequeueGuard.watch_child` exit, writing the child's progress at its step boundaries."""

    def __init__(self, guard: RequeueGuard, progress_checkpoint: str) -> None:
        self.guard, self.progress_checkpoint = guard, progress_checkpoint

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.guard._deferring = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self.guard.checkpoint_child_if_signalled(trainer, self.progress_checkpoint)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.guard.checkpoint_child_if_signalled(trainer, self.progress_checkpoint)


@contextmanager
def requeue_guard(trainer: Trainer) -> Iterator[RequeueGuard | None]:
    """Make the work in the block requeue-safe on SLURM (see the module's docstring); every rank enters.

    Nothing is done, and None yielded, unless the trainer runs under SLURM with ``auto_requeue`` and this is the
    main thread (where Python handles signals).

    Args:
        trainer: the parent's trainer, after its fit (in ``on_fit_end``).

    Yields:
        The :class:`RequeueGuard`, to pass to child runs (:meth:`RequeueGuard.watch_child`), or None.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> with requeue_guard(Trainer(logger=False)) as guard:  # not on SLURM here
        ...     print(guard)
        None
    """
    environment = requeue_environment(trainer)
    if environment is None or threading.current_thread() is not threading.main_thread():
        yield None
        return
    guard = RequeueGuard(trainer)
    previous = signal.signal(environment.requeue_signal, guard.handle)
    finished = False
    try:
        guard.write_parent_checkpoint()
        yield guard
        finished = True
    finally:
        signal.signal(environment.requeue_signal, signal.SIG_DFL if previous is None else previous)
        if finished and not guard.signalled and trainer.is_global_zero and guard.checkpoint is not None:
            Path(guard.checkpoint).unlink(missing_ok=True)  # the phase is done: nothing to resume


@contextmanager
def detached_requeue_guard() -> Iterator[RequeueGuard | None]:
    """Make a child trained outside its parent's process requeue-safe on SLURM (a deferred sibling's task).

    Under SLURM (``SLURMEnvironment.detect()``, main thread) the requeue signal is answered as in
    :func:`requeue_guard` while a child trains (:meth:`RequeueGuard.watch_child`: its progress checkpoint at the
    next step boundary, then ``scontrol requeue <array job>_<task>``), and at once otherwise; there is no parent
    checkpoint to write. A child Trainer then installs no handler of its own.

    Yields:
        The :class:`RequeueGuard` to pass to the child, or None when not under SLURM.

    Example:
        >>> with detached_requeue_guard() as guard:  # not on SLURM here
        ...     print(guard)
        None
    """
    environment = SLURMEnvironment() if SLURMEnvironment.detect() else None
    usable = environment is not None and environment.auto_requeue and environment.requeue_signal
    if not usable or threading.current_thread() is not threading.main_thread():
        yield None
        return
    guard = RequeueGuard(None)
    previous = signal.signal(environment.requeue_signal, guard.handle)
    try:
        yield guard
    finally:
        signal.signal(environment.requeue_signal, signal.SIG_DFL if previous is None else previous)
