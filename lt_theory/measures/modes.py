"""Context managers that let a measurement run a model without changing anything training depends on.

A measurement that runs the model in evaluation mode must leave every submodule's own ``training`` flag as it
found it (a user may keep a frozen BatchNorm in eval mode inside a training model, so ``model.train()`` is not
a restore), and must not draw from the global random generators that drive training (dropout in a forward
pass would, and so would a random initialisation inside the measurement). The contract of docs/design.md asks
monitors to leave training bit-identical; these two helpers are how the measures meet it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["eval_mode", "forked_rng"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode; on exit give each its own ``training`` flag back.

    Args:
        model: the module.

    Returns:
        A context manager yielding ``model``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval()).train()
        >>> model[1].training = False
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training, model[1].training
        (True, False)
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def forked_rng(device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """Fork the CPU random generator, and the CUDA generator of ``device`` if it is a CUDA device.

    Draws inside the block do not advance the generators training uses; on exit they are as before.

    Args:
        device: the device the measurement runs on; None or a non-CUDA device forks the CPU generator only.

    Returns:
        ``torch.random.fork_rng`` over those devices.

    Example:
        >>> before = torch.random.get_rng_state()
        >>> with forked_rng("cpu"):
        ...     _ = torch.rand(3)
        >>> torch.equal(before, torch.random.get_rng_state())
        True
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    devices = []
    if device.type == "cuda":
        devices.append(device.index if device.index is not None else torch.cuda.current_device())
    return torch.random.fork_rng(devices=devices)
