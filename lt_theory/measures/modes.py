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
import torch.nn.functional as F
from torch import nn

__all__ = ["BN_STATISTICS", "batch_statistics", "eval_mode", "forked_rng", "measurement_mode"]

BN_STATISTICS = ("batch", "running")
"""How BatchNorm layers normalise during a measurement: as in a training step, or as at test time."""


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


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Make every BatchNorm layer (SyncBatchNorm included) normalise with the statistics of the batch it sees,
    as in a training step, whatever its mode, without updating its running statistics.

    Forward hooks replace each layer's output by ``F.batch_norm`` of its input with batch statistics and the
    layer's own affine parameters (those ``torch.func.functional_call`` passes, when it runs the model), so
    the layer's mode, its buffers and a SyncBatchNorm's process group are never touched: under DDP a
    measurement on one rank enters no collective. The hooks run before any other forward hook of the layer, so
    those see the batch-normalised output.

    Args:
        model: the module.

    Returns:
        A context manager yielding ``model``; the hooks are removed on exit.

    Example:
        >>> norm = nn.BatchNorm1d(1).eval()  # running statistics: mean 0, variance 1
        >>> inputs = torch.tensor([[1.0], [3.0]])
        >>> with batch_statistics(norm):
        ...     norm(inputs).flatten().tolist()  # (x - 2) / sqrt(1 + 1e-5)
        [-0.9999949932098389, 0.9999949932098389]
        >>> norm(inputs).flatten().tolist(), norm.running_mean.tolist()  # back to the running statistics
        ([0.9999949932098389, 2.9999849796295166], [0.0])
    """

    def with_batch_statistics(module: nn.modules.batchnorm._BatchNorm, args, output):
        return F.batch_norm(args[0], None, None, module.weight, module.bias, True, 0.0, module.eps)

    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [layer.register_forward_hook(with_batch_statistics, prepend=True) for layer in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def measurement_mode(model: nn.Module, bn_statistics: str = "running") -> Iterator[nn.Module]:
    """:func:`eval_mode` (dropout off, no buffer updated), with BatchNorm normalising by its running statistics
    (``"running"``, the network at test time) or by each batch's (``"batch"``, the loss a training step sees:
    :func:`batch_statistics`).

    Raises:
        ValueError: for another ``bn_statistics``.
    """
    if bn_statistics not in BN_STATISTICS:
        raise ValueError(f"`bn_statistics` must be one of {BN_STATISTICS}, got {bn_statistics!r}")
    with eval_mode(model), (batch_statistics(model) if bn_statistics == "batch" else contextlib.nullcontext()):
        yield model


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
