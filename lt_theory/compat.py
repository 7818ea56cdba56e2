"""The Lightning internals lt_theory still reads, in one place, each covered by a test (tests/test_training.py).

Everything else in the package uses Lightning's public API. A child run (LinearModeConnectivity's siblings)
must be built with the parent Trainer's settings, and three of them have no public accessor:

- the options a :class:`~lightning.pytorch.strategies.DDPStrategy` was constructed with (start method,
  process-group timeout, the keyword arguments passed on to ``DistributedDataParallel``, such as
  ``find_unused_parameters``);
- the Trainer's ``use_distributed_sampler`` flag;
- the Trainer's cluster environment (public on parallel strategies only, not on a single device).

A run preempted on SLURM after its fit (:mod:`lt_theory.training.preemption`) writes the checkpoint a requeued
``fit(ckpt_path=None)`` resumes from, and only Lightning's checkpoint connector names it (``hpc_ckpt_<n>.ckpt``).

When a Lightning release renames one of them, the test of this module fails first and names it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.constants import default_pg_timeout

__all__ = ["DDPOptions", "cluster_environment", "ddp_options", "hpc_checkpoint_path", "uses_distributed_sampler"]


class DDPOptions(NamedTuple):
    """The options a DDP strategy was constructed with."""

    start_method: str
    timeout: timedelta
    ddp_kwargs: dict


def ddp_options(strategy: DDPStrategy) -> DDPOptions:
    """The constructor options of ``strategy`` that a copy of it needs.

    Args:
        strategy: a DDP strategy (of a running or configured Trainer).

    Returns:
        :class:`DDPOptions` ``(start_method, timeout, ddp_kwargs)``.
    """
    return DDPOptions(
        start_method=strategy._start_method,
        timeout=strategy._timeout or default_pg_timeout,
        ddp_kwargs=dict(strategy._ddp_kwargs),
    )


def uses_distributed_sampler(trainer: Trainer) -> bool:
    """The ``use_distributed_sampler`` flag the Trainer was built with."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def cluster_environment(trainer: Trainer) -> ClusterEnvironment:
    """The cluster environment the Trainer runs under (SLURM, torchelastic, ...), whatever its strategy.

    Args:
        trainer: a configured or running Trainer.

    Returns:
        The :class:`~lightning.fabric.plugins.environments.ClusterEnvironment` Lightning chose or was given
        (its signal handlers read the same one).
    """
    return trainer._accelerator_connector.cluster_environment


def hpc_checkpoint_path(trainer: Trainer) -> str:
    """Where Lightning's SLURM handler would write its next checkpoint: ``hpc_ckpt_<n + 1>.ckpt`` in
    ``default_root_dir``, ``n`` the highest number there (0 if none).

    A ``fit(ckpt_path=None)`` under SLURM resumes from the highest-numbered such file.

    Args:
        trainer: the Trainer whose ``default_root_dir`` is searched.

    Returns:
        The path, as a string.
    """
    return trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
