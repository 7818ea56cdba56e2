"""Lottery tickets on disk: the file IMPPruner writes at each level's end, read back safely.

A ticket of level :math:`\\ell` (Frankle & Carbin 2019) is the pair (masks :math:`m_\\ell`, the weights the
level was trained from: the step-:math:`k` snapshot, or a control's fresh initialisation). The file
``ticket_level<ll>.pt`` holds a dict of tensors, numbers, strings, lists and dicts only:

``level``, ``remaining_fraction``, ``accuracy``, ``masks`` (parameter name -> bool tensor), ``start_state``
(the LightningModule's state dict), ``rewind_step``, ``fraction``, ``scope``, ``control`` and ``history``.

Tickets are files people share, so they are read with ``torch.load(weights_only=True)``, which runs no code
from the file; a file that is not a ticket is refused with a ``ValueError`` naming it. :class:`LevelTickets` is
an IMP run's bookkeeping of them: where each level's ticket goes and, for a control run, the masks of the IMP
run it follows.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lt_theory.measures.pruning import (
    apply_masks,
    masks_from_state,
    masks_to_state,
    prunable_parameters,
    random_masks_like,
)
from lt_theory.training.state import save_atomically

__all__ = [
    "IMP_CONTROLS",
    "LevelTickets",
    "check_control",
    "check_reference_directory",
    "dense_masks",
    "level_ticket",
    "load_ticket",
    "pruned_names",
    "pruned_weights",
    "read_ticket",
    "reference_masks",
    "save_ticket",
    "ticket_directory",
    "ticket_path",
]

IMP_CONTROLS = ("random_reinit", "random_prune")
"""The lottery-ticket controls of Frankle & Carbin (2019) that ``IMPPruner(control=...)`` runs."""

_REQUIRED = ("masks", "start_state")


def ticket_path(directory: str | os.PathLike, level: int) -> Path:
    """``<directory>/ticket_level<ll>.pt``."""
    return Path(directory) / f"ticket_level{level:02d}.pt"


def ticket_directory(ticket_dir: str | os.PathLike | None, trainer: Trainer) -> Path:
    """``ticket_dir``, or IMPPruner's default ``<trainer.log_dir>/imp`` when it is None (read only then)."""
    return Path(ticket_dir) if ticket_dir is not None else Path(trainer.log_dir) / "imp"


def save_ticket(path: str | os.PathLike, ticket: Mapping) -> None:
    """Write a ticket atomically (a crash never leaves a truncated file).

    Args:
        path: where, usually :func:`ticket_path`.
        ticket: the fields listed in the module docstring.
    """
    missing = [key for key in _REQUIRED if key not in ticket]
    if missing:
        raise ValueError(f"a ticket needs {list(_REQUIRED)}, this one lacks {missing}")
    save_atomically(dict(ticket), path)


def level_ticket(
    masks: Mapping[str, Tensor], start_state: Mapping[str, Tensor], history: Sequence[Mapping], settings: Mapping
) -> dict:
    """The fields of the ticket of the level that just ended (the last of ``history``).

    Args:
        masks: the level's masks (all ones for the dense level).
        start_state: the state the level was trained from.
        history: the completed levels, the last one this ticket's (``level``, ``remaining_fraction``,
            ``accuracy``).
        settings: the run's ``rewind_step``, ``fraction``, ``scope`` and ``control``.
    """
    last = history[-1]
    return {
        "level": last["level"],
        "remaining_fraction": last["remaining_fraction"],
        "accuracy": last["accuracy"],
        "masks": masks_to_state(masks),
        "start_state": start_state,
        **settings,
        "history": [dict(h) for h in history],
    }


def dense_masks(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All-``True`` masks shaped as ``weights`` (name -> tensor): the dense level's ticket keeps every weight."""
    return {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in weights.items()}


def read_ticket(path: str | os.PathLike) -> dict:
    """The fields of a ticket file, read without running code from it.

    Args:
        path: a ``ticket_level<ll>.pt`` file written by :class:`~lt_theory.callbacks.imp.IMPPruner`.

    Returns:
        The ticket's dict.

    Raises:
        ValueError: if the file is missing, damaged, holds objects other than tensors and plain Python
            values, or is not a ticket.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no ticket file at {str(path)!r}")
    try:
        ticket = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{str(path)!r} cannot be read as an IMPPruner ticket (a dict of tensors and plain values): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if not isinstance(ticket, Mapping) or any(key not in ticket for key in _REQUIRED):
        raise ValueError(f"{str(path)!r} is not a ticket written by IMPPruner (no `masks` / `start_state`)")
    return dict(ticket)


def load_ticket(path: str | os.PathLike, model: nn.Module) -> dict[str, Tensor]:
    """Load a ticket saved by :class:`~lt_theory.callbacks.imp.IMPPruner` into ``model``: its starting weights
    and buffers, then its masks.

    Loading it and training with the masks enforced (e.g. :class:`~lt_theory.measures.pruning.MaskEnforcer`
    after each step, with the LR schedule started at step :math:`k`) reproduces the sparse network.

    Args:
        path: a ``ticket_level<l>.pt`` file written by IMPPruner.
        model: a module with the structure of the one pruned (the ``LightningModule``, e.g. a
            ``ClassificationModule`` with the same ``net``).

    Returns:
        The masks (parameter name -> bool tensor on the parameter's device, ``True`` = kept), already applied.

    Raises:
        ValueError: if the file is not an IMPPruner ticket or does not fit ``model``.

    Example:
        >>> # masks = load_ticket("runs/imp/version_0/imp/ticket_level03.pt", module)
        >>> # trainer.fit(module, ...) with IMPPruner-style mask enforcement, or evaluate it directly
    """
    ticket = read_ticket(path)
    saved, expected = list(ticket["start_state"]), list(model.state_dict())
    if set(saved) != set(expected):
        missing = [k for k in expected if k not in ticket["start_state"]]
        unexpected = [k for k in saved if k not in set(expected)]
        raise ValueError(
            f"the ticket {str(path)!r} does not fit {type(model).__name__}: it holds the state of the "
            f"LightningModule IMPPruner pruned, with keys such as {saved[0]!r} (prefix "
            f"{saved[0].split('.')[0] + '.'!r}), while the model's keys are such as "
            f"{expected[0] if expected else None!r}; {len(missing)} key(s) missing (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). Load it into the "
            "LightningModule (e.g. a ClassificationModule with the same `net`), not into its bare network."
        )
    try:
        model.load_state_dict(ticket["start_state"])
    except RuntimeError as error:  # same keys, other shapes
        raise ValueError(f"the ticket {str(path)!r} does not fit {type(model).__name__}: {error}") from error
    masks = masks_from_state(ticket["masks"], model)
    apply_masks(model, masks)
    return masks


def pruned_names(
    module: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None, prune_output_layer: bool
) -> list[str]:
    """The parameters IMPPruner prunes (:func:`~lt_theory.measures.pruning.prunable_parameters`), the last
    prunable one in the model's order (the classifier) left out unless ``prune_output_layer``.

    Raises:
        ValueError: naming the module, for a model without a prunable parameter or bad ``include`` / ``exclude``.
    """
    try:
        exclude = list(exclude or [])
        if not prune_output_layer:
            exclude.append(list(prunable_parameters(module))[-1])
        return list(prunable_parameters(module, include, exclude or None))
    except ValueError as error:
        raise ValueError(f"IMPPruner cannot prune {type(module).__name__}: {error}") from error


def pruned_weights(module: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameter name -> parameter of ``module`` for each of ``names`` (the pruned ones), in their order."""
    params = dict(module.named_parameters())
    return {name: params[name] for name in names}


def check_control(control: str | None, reference_tickets, init_fn) -> None:
    """Check a control run's arguments: a control follows an IMP run's tickets, which only a control reads.

    Raises:
        ValueError: for an unknown ``control``, a control without ``reference_tickets`` (or the other way
            round), or an ``init_fn`` that is not callable or is given to anything but ``random_reinit``.
    """
    if control not in (None, *IMP_CONTROLS):
        raise ValueError(f"`control` must be one of {(None, *IMP_CONTROLS)}, got {control!r}")
    if control is not None and reference_tickets is None:
        raise ValueError(
            f"control={control!r} needs `reference_tickets`: the ticket directory of the IMP run it controls "
            "(a finished or running IMPPruner fit with control=None and the same model, data and settings; "
            "its `ticket_dir`, by default `<trainer.log_dir>/imp`, e.g. "
            "runs/imp/version_0/imp holding ticket_level01.pt, ...). Level l of the control then uses the "
            "masks of that run's ticket_level<l>.pt (random_reinit) or their per-layer counts (random_prune)."
        )
    if control is None and reference_tickets is not None:
        raise ValueError(
            "`reference_tickets` is only used by a control run (control='random_reinit' or 'random_prune'); "
            f"got reference_tickets={str(reference_tickets)!r} with control=None"
        )
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"`init_fn` must be a callable taking the LightningModule, or None, got {init_fn!r}")
    if init_fn is not None and control != "random_reinit":
        raise ValueError(f"`init_fn` is only used by control='random_reinit', got control={control!r}")


def check_reference_directory(control: str, reference_tickets: str) -> None:
    """Raise ``ValueError`` unless ``reference_tickets`` is a directory (checked when a control run starts)."""
    if not Path(reference_tickets).is_dir():
        raise ValueError(
            f"IMPPruner(control={control!r}): `reference_tickets`={reference_tickets!r} is not a "
            "directory; give the ticket directory of the IMP run this control follows (its `ticket_dir`, "
            "by default `<trainer.log_dir>/imp` of that run)"
        )


def reference_masks(
    directory: str | os.PathLike, level: int, pruned_names: Sequence[str], control: str, settings: Mapping
) -> dict[str, Tensor]:
    """The masks of an IMP run's level-``level`` ticket, for a control run that follows it.

    Args:
        directory: the IMP run's ticket folder (its ``reference_tickets``).
        level: the level whose masks the control trains.
        pruned_names: the parameters the control run prunes; the ticket must prune the same.
        control: the control's name, for the messages.
        settings: the control's ``fraction``, ``rewind_step`` and ``scope``; a difference is warned about.

    Returns:
        The masks as stored (parameter name -> bool tensor, on the CPU).

    Raises:
        ValueError: if the ticket does not exist yet, was written by a control run, or prunes other parameters.
    """
    path = ticket_path(directory, level)
    if not path.is_file():
        raise ValueError(
            f"IMPPruner(control={control!r}) needs the IMP's level-{level} ticket {str(path)!r}, which "
            "does not exist (yet): run the IMP (control=None) to at least this level first, or resume this "
            "control from its checkpoint once the IMP has written the ticket."
        )
    ticket = read_ticket(path)
    if ticket.get("control") is not None:
        raise ValueError(
            f"{str(path)!r} was written by a control run (control={ticket['control']!r}); "
            "`reference_tickets` must be the ticket directory of the IMP run itself (control=None)"
        )
    masks = dict(ticket["masks"])
    if list(masks) != list(pruned_names):
        raise ValueError(
            f"the masks of {str(path)!r} prune {sorted(masks)[:3]}..., this run prunes "
            f"{sorted(pruned_names)[:3]}... ({len(masks)} vs {len(pruned_names)} tensors): the "
            "control needs the IMP run's model and include / exclude / prune_output_layer settings"
        )
    for setting, value in settings.items():
        if setting in ticket and ticket[setting] != value:
            rank_zero_warn(
                f"IMPPruner(control={control!r}): the reference IMP run used {setting}={ticket[setting]!r}, "
                f"this run {value!r}",
                category=UserWarning,
            )
    return masks


class LevelTickets:
    """An IMP run's tickets: the file each completed level writes, and a control run's reference IMP run.

    Args:
        ticket_dir: where the tickets are written; None for ``<trainer.log_dir>/imp``.
        settings: the run's ``rewind_step``, ``fraction``, ``scope`` and ``control``, written into every ticket;
            a control warns where the reference IMP run's ``fraction``, ``rewind_step`` or ``scope`` differ.
        reference_tickets: a control run's: the ticket directory of the IMP run it follows; None otherwise.

    Example:
        >>> tickets = LevelTickets("runs/imp", {"rewind_step": 0, "fraction": 0.2, "scope": "global",
        ...                                     "control": None})
        >>> tickets.directory(trainer=None).as_posix()
        'runs/imp'
    """

    def __init__(
        self, ticket_dir: str | os.PathLike | None, settings: Mapping, reference_tickets: str | None = None
    ) -> None:
        self.ticket_dir, self.settings, self.reference_tickets = ticket_dir, dict(settings), reference_tickets
        self.control = self.settings.get("control")

    def directory(self, trainer: Trainer) -> Path:
        """:func:`ticket_directory` of this run."""
        return ticket_directory(self.ticket_dir, trainer)

    def check_reference(self) -> None:
        """:func:`check_reference_directory` for a control run (nothing to check otherwise)."""
        if self.reference_tickets is not None:
            check_reference_directory(self.control, self.reference_tickets)

    def save(
        self,
        trainer: Trainer,
        level: int,
        masks: Mapping[str, Tensor],
        start_state: Mapping[str, Tensor],
        history: Sequence[Mapping],
    ) -> str:
        """Write the ticket of ``level``, the last of ``history`` (rank zero only), and return its path.

        Args:
            trainer: the IMP run's trainer.
            level: the level that just ended.
            masks: its masks (:func:`dense_masks` for the dense level).
            start_state: the state the level was trained from.
            history: the completed levels (:func:`level_ticket`).
        """
        path = ticket_path(self.directory(trainer), level)
        if trainer.is_global_zero:
            save_ticket(path, level_ticket(masks, start_state, history, self.settings))
        return str(path)

    def reference_masks(self, level: int, pruned_names: Sequence[str]) -> dict[str, Tensor]:
        """:func:`reference_masks` of ``level`` in ``reference_tickets``, checked against this run's settings."""
        settings = {name: self.settings[name] for name in ("fraction", "rewind_step", "scope")}
        return reference_masks(self.reference_tickets, level, pruned_names, self.control, settings)

    def control_masks(
        self, level: int, pruned_names: Sequence[str], generator: torch.Generator
    ) -> dict[str, Tensor]:
        """A control's masks of ``level``: the IMP run's (``random_reinit``), or fresh random masks with its count
        in every layer (``random_prune``, drawn from ``generator``).
        """
        masks = self.reference_masks(level, pruned_names)
        return random_masks_like(masks, generator) if self.control == "random_prune" else masks
