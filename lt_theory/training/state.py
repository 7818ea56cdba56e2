"""A whole training state captured at one step and put back later, and the files that hold it.

A run forked or rewound at step :math:`k` must continue exactly as the original did from :math:`k`: the
weights and all buffers (BatchNorm statistics), every optimizer's state (momentum, Adam moments) and
hyper-parameters, and every LR scheduler's state. :func:`capture_training_state` takes CPU copies of these;
:func:`restore_training_state` loads them into a running Trainer, the optimizers either rewound with their
state or emptied with only their hyper-parameters kept (Frankle et al. 2020 rewind the weights and the
schedule; open_lth empties the optimizer). The loop position and the RNG states are the Trainer's (a
Lightning checkpoint) and :mod:`lt_theory.training.rng`'s.

Files the package writes for later runs are written atomically (:func:`save_atomically`) and identified by
their SHA-256 (:func:`file_sha256`); a state dict by the hash of its bytes (:func:`state_fingerprint`).
"""

from __future__ import annotations

import hashlib
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lt_theory.measures.modes import forked_rng
from lt_theory.training.stored import partial_file

__all__ = [
    "OPTIMIZER_STATES",
    "capture_training_state",
    "cpu_copy",
    "file_sha256",
    "load_beside_checkpoints",
    "reinitialize",
    "restore_training_state",
    "save_atomically",
    "save_beside_checkpoints",
    "state_fingerprint",
]

OPTIMIZER_STATES = ("reset", "rewind")


def cpu_copy(obj: Any) -> Any:
    """A copy of a nested collection with every tensor detached and copied to the CPU."""
    return apply_to_collection(obj, Tensor, lambda t: t.detach().to("cpu", copy=True))


def state_fingerprint(state: dict[str, Tensor]) -> str:
    """A hash of a state dict's keys and bytes: equal for bit-identical weights, and only for them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a partial file renamed into place: a crash never leaves a truncated ``path``."""
    partial = partial_file(path)
    torch.save(obj, partial)
    partial.replace(path)


def capture_training_state(trainer: Trainer, module: LightningModule) -> dict[str, Any]:
    """CPU copies of the module's state dict, every optimizer's and every LR scheduler's, at this step.

    Args:
        trainer: the running trainer.
        module: its LightningModule.

    Returns:
        ``{"step", "model", "optimizers", "schedulers"}``.
    """
    return {
        "step": trainer.global_step,
        "model": cpu_copy(module.state_dict()),
        "optimizers": [cpu_copy(optimizer.state_dict()) for optimizer in trainer.optimizers],
        "schedulers": [deepcopy(config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs],
    }


def restore_training_state(
    trainer: Trainer,
    module: LightningModule,
    state: dict[str, Any],
    optimizer_state: str = "rewind",
    load_model: bool = True,
) -> None:
    """Put a captured state back into a running Trainer (the loop position is not changed).

    Args:
        trainer: the running trainer.
        module: its LightningModule.
        state: what :func:`capture_training_state` returned.
        optimizer_state: ``"rewind"`` loads each optimizer's captured state; ``"reset"`` empties it and keeps
            only the captured hyper-parameters of each parameter group (learning rate, momentum, ...).
        load_model: also load the captured weights and buffers.

    Raises:
        ValueError: for an unknown ``optimizer_state``.
    """
    if optimizer_state not in OPTIMIZER_STATES:
        raise ValueError(f"`optimizer_state` must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}")
    if load_model:
        module.load_state_dict(state["model"])
    for optimizer, saved in zip(trainer.optimizers, state["optimizers"]):
        if optimizer_state == "rewind":
            optimizer.load_state_dict(deepcopy(saved))
        else:
            optimizer.state.clear()
            for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
                group.update({key: deepcopy(value) for key, value in saved_group.items() if key != "params"})
    for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
        config.scheduler.load_state_dict(deepcopy(saved))


def _checkpoint_dir(trainer: Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return callback.dirpath
    return None


def save_beside_checkpoints(trainer: Trainer, obj: Any, filename: str) -> dict[str, str] | None:
    """Write ``obj`` next to the run's checkpoints (rank zero; every rank enters) instead of into each of them.

    Returns:
        ``{"path", "sha256"}`` for the checkpoint to keep (and :func:`load_beside_checkpoints` to check), or
        None when the trainer has no ``ModelCheckpoint`` with a folder (then keep ``obj`` in the checkpoint).
    """
    directory = _checkpoint_dir(trainer)
    if directory is None:
        return None
    path = Path(directory) / filename
    digest = None
    if trainer.is_global_zero:
        save_atomically(obj, path)
        digest = file_sha256(path)
    return {"path": str(path), "sha256": trainer.strategy.broadcast(digest, src=0)}


def load_beside_checkpoints(record: dict[str, str], what: str) -> Any:
    """Load a file :func:`save_beside_checkpoints` wrote, after checking it is the one the checkpoint names.

    It holds optimizer and scheduler states, so it is loaded as a checkpoint is (a file to trust): the SHA-256
    kept in the checkpoint ties it to the run.

    Raises:
        ValueError: naming ``what`` and the file, when it is missing or another run wrote over it.
    """
    path = Path(record["path"])
    if not path.is_file():
        raise ValueError(
            f"cannot resume: {what} {str(path)!r}, written next to the checkpoints, is missing; keep it beside "
            "the checkpoint (or start again)."
        )
    if file_sha256(path) != record["sha256"]:
        raise ValueError(
            f"cannot resume: {str(path)!r} is not {what} of this run (its SHA-256 differs from the one in the "
            "checkpoint); another run wrote over it."
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def reinitialize(module: nn.Module, generator: torch.Generator, init_fn=None) -> None:
    """A fresh initialisation of ``module`` from its own init, drawn from ``generator``; the global RNG state
    that training sees is left as it was.

    ``init_fn(module)`` if given (BatchNorm statistics reset too); else ``reset_parameters`` of every module,
    children before parents (reversed ``modules()`` order), so a model-level ``reset_parameters`` (e.g.
    CIFARResNet's He-normal convolutions) applies its init over its layers' defaults.
    """
    device = next((t.device for t in list(module.parameters()) + list(module.buffers())), torch.device("cpu"))
    with forked_rng(device):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        if init_fn is not None:
            init_fn(module)
            for child in module.modules():
                if isinstance(child, nn.modules.batchnorm._NormBase):
                    child.reset_running_stats()
        else:
            for child in reversed(list(module.modules())):
                if callable(getattr(child, "reset_parameters", None)):
                    child.reset_parameters()
