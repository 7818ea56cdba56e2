r"""A sparse network restarted from a rewind point, in the IMP run or in a child run of it.

A level :math:`\ell \ge 1` of iterative magnitude pruning (Frankle, Dziugaite, Roy & Carbin, ICML 2020, "Linear
Mode Connectivity and the Lottery Ticket Hypothesis") trains :math:`m_\ell \odot \theta` from the state
:math:`\theta_k` of step :math:`k`: the weights and buffers of step :math:`k` (or a control's fresh
initialisation), the optimizer emptied (``"reset"``) or at its step-:math:`k` state with the pruned entries
zeroed (``"rewind"``), the LR schedulers at step :math:`k`, and the pruned weights kept at exactly zero at every
step. :class:`RewindPoint` keeps the state of step :math:`k` (in memory and next to the checkpoints) and
restarts each level from it; :func:`rewind_masked` is the restart itself, and :class:`MaskedStart` does the
same restart in a child Trainer started from the run's snapshot of step :math:`k`
(:func:`lt_theory.training.child.train_from_snapshot`), then keeps the masks at every step: the sibling of a
level in ``IMPPruner(stability=True)``, which differs from the level's own training only by its data order.
The masks themselves are :mod:`lt_theory.measures.pruning`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lt_theory.measures.pruning import MaskEnforcer, apply_masks, mask_optimizer_state
from lt_theory.training.state import (
    capture_training_state,
    cpu_copy,
    load_beside_checkpoints,
    reinitialize,
    restore_training_state,
    save_beside_checkpoints,
)

__all__ = ["MaskedStart", "RewindPoint", "rewind_masked"]


def rewind_masked(
    trainer: Trainer,
    module: LightningModule,
    state: Mapping[str, Any],
    masks: Mapping[str, Tensor],
    optimizer_state: str,
    load_model: bool = True,
) -> MaskEnforcer:
    """Restart training from a captured state with masks: IMP's rewind.

    Loads ``state`` (:func:`~lt_theory.training.state.restore_training_state`: weights and buffers unless
    ``load_model`` is False, optimizers reset or rewound, LR schedulers), sets the pruned weights to ``+0.0``,
    zeroes the optimizer state at pruned positions when it is rewound, and returns the enforcer of the masks.

    Args:
        trainer: the running trainer.
        module: its LightningModule.
        state: ``{"model", "optimizers", "schedulers"}`` as :func:`~lt_theory.training.state.capture_training_state`
            returns it (``"model"`` is not read when ``load_model`` is False).
        masks: parameter name -> bool mask (``True`` = kept), on any device.
        optimizer_state: ``"reset"`` or ``"rewind"``.
        load_model: also load ``state["model"]`` (False keeps the module's weights, e.g. a fresh initialisation).

    Returns:
        A :class:`~lt_theory.measures.pruning.MaskEnforcer` of ``masks`` on ``module``, to call after every step.

    Raises:
        ValueError: for an unknown ``optimizer_state``, or masks that do not fit ``module``.
    """
    restore_training_state(trainer, module, state, optimizer_state, load_model=load_model)
    apply_masks(module, masks)
    if optimizer_state == "rewind":
        for optimizer in trainer.optimizers:
            mask_optimizer_state(optimizer, module, masks)
    return MaskEnforcer(module, masks)


class RewindPoint:
    """IMP's rewind point: the full training state of step ``k``, and each level's restart from it.

    Args:
        rewind_step: ``k``.
        optimizer_state: ``"reset"`` or ``"rewind"``: the optimizer of a restarted level.

    Attributes:
        state: the state of step ``k`` (:func:`~lt_theory.training.state.capture_training_state`, CPU copies), or
            None before step ``k``.
        file: ``{"path", "sha256"}`` of its copy next to the checkpoints, or None (it is then kept in them).
        reinit_state: a ``random_reinit`` control's weights the current level started from (masks applied).
    """

    def __init__(self, rewind_step: int, optimizer_state: str) -> None:
        self.rewind_step, self.optimizer_state = rewind_step, optimizer_state
        self.state: dict | None = None
        self.file: dict | None = None
        self.reinit_state: dict | None = None

    def capture(self, trainer: Trainer, module: LightningModule) -> None:
        """Keep the training state of this step (``k``); write it next to the checkpoints (rank zero)."""
        self.state = capture_training_state(trainer, module)
        self.file = save_beside_checkpoints(trainer, self.state, f"imp_rewind_step{self.rewind_step}.pt")

    def restart(
        self, trainer: Trainer, module: LightningModule, masks: Mapping[str, Tensor], reinit: tuple | None = None
    ) -> MaskEnforcer:
        """Restart a level with ``masks`` from step ``k``'s weights, or from a fresh initialisation drawn by
        :func:`~lt_theory.training.state.reinitialize` with ``reinit = (generator, init_fn)``.

        Returns:
            The enforcer of the masks (:func:`rewind_masked`).

        Raises:
            RuntimeError: before step ``k`` was captured.
        """
        if self.state is None:  # cannot happen in IMPPruner: k < T, so step k comes before level 0 ends
            raise RuntimeError("IMPPruner: no step-k snapshot at a level's end")
        if reinit is not None:
            reinitialize(module, *reinit)
        enforcer = rewind_masked(trainer, module, self.state, masks, self.optimizer_state, reinit is None)
        if reinit is not None:
            self.reinit_state = cpu_copy(module.state_dict())
        return enforcer

    def start_state(self, module: LightningModule, level: int) -> dict[str, Tensor]:
        """The weights and buffers ``level`` started from (a ticket's ``start_state``)."""
        if self.reinit_state is not None and level > 0:
            return self.reinit_state
        return self.state["model"] if self.state is not None else cpu_copy(module.state_dict())

    def state_dict(self) -> dict:
        """``rewind`` (None when written next to the checkpoints), ``rewind_file``, ``reinit_state``."""
        in_file = self.file is not None
        return {"rewind": None if in_file else self.state, "rewind_file": self.file, "reinit_state": self.reinit_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state_dict` gave (the file next to the checkpoints read back and checked).

        Raises:
            ValueError: when that file is missing or was written over by another run.
        """
        self.file, self.reinit_state = state["rewind_file"], state["reinit_state"]
        what = f"IMPPruner's step-{self.rewind_step} snapshot"
        self.state = load_beside_checkpoints(self.file, what) if self.file is not None else state["rewind"]


class MaskedStart(Callback):
    """In a child Trainer started at step ``start_step``: the restart of a sparse level, then its masks at every step.

    At the start of training, if the child is at ``start_step`` (started from the snapshot, not resumed from
    its own progress checkpoint), :func:`rewind_masked` with ``start``; then, as IMPPruner does, the gradients
    of the pruned weights are set to zero before every optimizer step (before gradient clipping) and the pruned
    weights to ``+0.0`` after every batch.

    Args:
        start: the level's start: ``{"model", "optimizers", "schedulers"}`` (the level's start weights and
            buffers, and the optimizers' and LR schedulers' states of step ``start_step``).
        masks: parameter name -> bool mask of the level (CPU tensors are fine).
        optimizer_state: ``"reset"`` or ``"rewind"``, as the IMP run's.
        start_step: the step of the snapshot the child starts from.

    Example:
        >>> # train_from_snapshot(..., callbacks=[MaskedStart(start, masks, "reset", start_step=k)])
    """

    def __init__(
        self, start: Mapping[str, Any], masks: Mapping[str, Tensor], optimizer_state: str, start_step: int
    ) -> None:
        self.start, self.masks, self.optimizer_state, self.start_step = (
            start,
            masks,
            optimizer_state,
            start_step,
        )
        self.enforcer: MaskEnforcer | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == self.start_step:
            self.enforcer = rewind_masked(trainer, pl_module, self.start, self.masks, self.optimizer_state)
        else:  # resumed from the child's own progress checkpoint: its state is the level's, mid-training
            apply_masks(pl_module, self.masks)
            self.enforcer = MaskEnforcer(pl_module, self.masks)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        self.enforcer.mask_gradients()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self.enforcer()
