"""The Lightning internals lt_theory still reads, in one place, each covered by a test (tests/test_compat.py).

Everything else in the package uses Lightning's public API. A child run (LinearModeConnectivity's siblings)
must be built with the parent Trainer's settings, and two of them have no public accessor:

- the options a :class:`~lightning.pytorch.strategies.DDPStrategy` was constructed with (start method,
  process-group timeout, the keyword arguments passed on to ``DistributedDataParallel``, such as
  ``find_unused_parameters``);
- the Trainer's ``use_distributed_sampler`` flag.

When a Lightning release renames one of them, the test of this module fails first and names it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.constants import default_pg_timeout

__all__ = ["DDPOptions", "ddp_options", "uses_distributed_sampler"]


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
