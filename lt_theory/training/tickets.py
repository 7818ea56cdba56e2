"""Lottery tickets on disk: the file IMPPruner writes at each level's end, read back safely.

A ticket of level :math:`\\ell` (Frankle & Carbin 2019) is the pair (masks :math:`m_\\ell`, the weights the
level was trained from: the step-:math:`k` snapshot, or a control's fresh initialisation). The file
``ticket_level<ll>.pt`` holds a dict of tensors, numbers, strings, lists and dicts only:

``level``, ``remaining_fraction``, ``accuracy``, ``masks`` (parameter name -> bool tensor), ``start_state``
(the LightningModule's state dict), ``rewind_step``, ``fraction``, ``scope``, ``control`` and ``history``.

Tickets are files people share, so they are read with ``torch.load(weights_only=True)``, which runs no code
from the file; a file that is not a ticket is refused with a ``ValueError`` naming it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lt_theory.measures.pruning import apply_masks, masks_from_state, masks_to_state, prunable_parameters
from lt_theory.training.state import save_atomically

__all__ = [
    "IMP_CONTROLS",
    "check_control",
    "check_reference_directory",
    "level_ticket",
    "load_ticket",
    "pruned_names",
    "read_ticket",
    "reference_masks",
    "save_ticket",
    "ticket_path",
]

IMP_CONTROLS = ("random_reinit", "random_prune")
"""The lottery-ticket controls of Frankle & Carbin (2019) that ``IMPPruner(control=...)`` runs."""

_REQUIRED = ("masks", "start_state")


def ticket_path(directory: str | os.PathLike, level: int) -> Path:
    """``<directory>/ticket_level<ll>.pt``."""
    return Path(directory) / f"ticket_level{level:02d}.pt"


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
