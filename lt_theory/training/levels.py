r"""The levels of iterative magnitude pruning as steps of one ``trainer.fit`` (Frankle et al. 2020).

Level 0 trains the dense network for :math:`T` optimizer steps; every later level restarts from step
:math:`k` (the rewind step) and trains :math:`T - k` steps, so level :math:`\ell` ends at the global step

.. math::
    \text{end}(\ell) = T + \ell\,(T - k).

:math:`T` is given in steps, or in epochs and turned into steps with the Trainer's own count of one epoch's
optimizer steps (``trainer.estimated_stepping_batches``). :class:`LossWatch` tells whether a level diverged;
:func:`level_record` is what a completed level reached, :func:`levels_table` the table of them (IMPPruner's
``imp/summary``) and :func:`level_charts` its custom-scalars panel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lt_theory.checks import check_int, check_positive_int
from lt_theory.measures.pruning import sparsity_report

__all__ = [
    "LevelSchedule",
    "LossWatch",
    "check_state_restored",
    "diverged_note",
    "level_charts",
    "level_end_note",
    "level_record",
    "level_scalars",
    "levels_table",
    "remaining_bp",
]


class LevelSchedule:
    """Where each level of an IMP run ends, in global optimizer steps.

    Args:
        levels: the pruning levels L (the fit trains L + 1 times).
        rewind_step: k, the step every pruned level restarts from.
        steps_per_level: T in optimizer steps; give this or ``epochs_per_level``.
        epochs_per_level: T in epochs.

    Raises:
        ValueError: naming the argument, for a bad value, both or neither of the level lengths, or
            ``rewind_step`` not smaller than ``steps_per_level``.

    Example:
        >>> schedule = LevelSchedule(levels=3, rewind_step=10, steps_per_level=100)
        >>> schedule.level_steps = schedule.resolve(trainer=None)
        >>> [schedule.end(level) for level in range(4)], schedule.end(3) == schedule.total
        ([100, 190, 280, 370], True)
    """

    def __init__(
        self,
        levels: int,
        rewind_step: int = 0,
        steps_per_level: int | None = None,
        epochs_per_level: int | None = None,
    ) -> None:
        self.levels = check_positive_int("levels", levels)
        self.rewind_step = check_int("rewind_step", rewind_step, minimum=0)
        self.steps_per_level = check_positive_int("steps_per_level", steps_per_level, allow_none=True)
        self.epochs_per_level = check_positive_int("epochs_per_level", epochs_per_level, allow_none=True)
        if (steps_per_level is None) == (epochs_per_level is None):
            raise ValueError(
                "give exactly one of `steps_per_level` and `epochs_per_level` (the length of a level), got "
                f"steps_per_level={steps_per_level!r}, epochs_per_level={epochs_per_level!r}"
            )
        if steps_per_level is not None and rewind_step >= steps_per_level:
            raise ValueError(
                f"`rewind_step` must be smaller than the first level's length `steps_per_level`="
                f"{steps_per_level}, got {rewind_step}"
            )
        self.level_steps: int | None = None
        """T in optimizer steps, once :meth:`resolve` has run."""
        self.user_max_steps: int | None = None
        """The Trainer's own ``max_steps``, kept by :meth:`setup` and given back by :meth:`give_back_max_steps`."""

    def setup(self, trainer: Trainer) -> None:
        """At the fit's setup (before the optimizers are configured): :meth:`resolve` T, keep the Trainer's own
        ``max_steps`` and set it to T (:meth:`end_of_first_level`), so that a schedule sized by
        ``trainer.estimated_stepping_batches`` (cosine) spans one level.
        """
        self.user_max_steps = trainer.fit_loop.max_steps
        self.level_steps = self.resolve(trainer)
        trainer.fit_loop.epoch_loop.max_steps = self.end_of_first_level(self.user_max_steps)

    def give_back_max_steps(self, trainer: Trainer) -> None:
        """Once the optimizers are configured: the Trainer's own ``max_steps`` back.

        The IMP ends the fit itself (``should_stop`` at the last level's end); with a ``max_steps`` of its own,
        Lightning would resume the fit as iteration-based training, which draws the data order of the epoch
        after a resume differently.
        """
        trainer.fit_loop.epoch_loop.max_steps = self.user_max_steps

    def resolve(self, trainer: Trainer | None) -> int:
        """T in optimizer steps: ``steps_per_level``, or ``epochs_per_level`` epochs of ``trainer``'s loader.

        Raises:
            ValueError: for ``epochs_per_level`` with a train loader of unknown length, or epochs shorter
                than ``rewind_step``.
        """
        if self.steps_per_level is not None:
            return self.steps_per_level
        loop = trainer.fit_loop
        saved = loop.max_epochs, loop.max_steps
        loop.max_epochs, loop.epoch_loop.max_steps = self.epochs_per_level, -1
        try:
            steps = trainer.estimated_stepping_batches
        finally:
            loop.max_epochs, loop.epoch_loop.max_steps = saved
        if not math.isfinite(steps):
            raise ValueError(
                "IMPPruner(epochs_per_level=...) needs a train loader with a length to turn epochs into steps; "
                "give `steps_per_level` for an iterable dataset"
            )
        if self.rewind_step >= steps:
            raise ValueError(
                f"`rewind_step`={self.rewind_step} must be smaller than the first level's length: "
                f"`epochs_per_level`={self.epochs_per_level} epochs are {int(steps)} optimizer steps"
            )
        return int(steps)

    def check_resumed_length(self, saved_level_steps: int | None) -> None:
        """Refuse a checkpoint whose levels were ``saved_level_steps`` long when this run's are not.

        Raises:
            ValueError: naming both lengths and the arguments that set them.
        """
        if saved_level_steps not in (None, self.level_steps) and self.level_steps is not None:
            raise ValueError(
                f"IMPPruner: the checkpoint's levels are {saved_level_steps} steps long, this run's "
                f"{self.level_steps}; resume with the same `steps_per_level` / `epochs_per_level` and data."
            )

    def end(self, level: int) -> int:
        """The global step at which ``level`` ends: ``T + level * (T - k)``."""
        return self.level_steps + level * (self.level_steps - self.rewind_step)

    @property
    def total(self) -> int:
        """The global step at which the last level ends."""
        return self.end(self.levels)

    def end_of_first_level(self, user_max_steps: int | None) -> int:
        """T, or the Trainer's own ``max_steps`` when it is smaller (a fit cut before level 0 ends)."""
        if user_max_steps in (None, -1):
            return self.level_steps
        return min(self.level_steps, user_max_steps)

    def cut_warning(self, trainer: Trainer) -> str | None:
        """What ends ``trainer``'s fit before the last level does (``max_epochs`` or its own ``max_steps``), or
        None."""
        user_max_steps = self.user_max_steps
        max_epochs, batches = trainer.fit_loop.max_epochs, trainer.num_training_batches
        limits = []
        if max_epochs not in (None, -1) and math.isfinite(batches):
            steps = max_epochs * math.ceil(batches / trainer.accumulate_grad_batches)
            limits.append((steps, f"max_epochs={max_epochs}", "`max_epochs=-1`"))
        if user_max_steps not in (None, -1):
            limits.append((user_max_steps, f"max_steps={user_max_steps}", "no `max_steps`"))
        for steps, given, advice in limits:
            if steps < self.total:
                return (
                    f"the Trainer's {given} ends the fit after about {steps} optimizer steps, before the "
                    f"{self.total} steps of the whole IMP ({self.levels} levels); the fit can be resumed from "
                    f"its checkpoint. Pass {advice} to run the IMP to its end."
                )
        return None


class LossWatch:
    """The training loss summed on the device between two checks (no synchronisation per step), and whether
    any rank saw a non-finite one.

    Example:
        >>> import torch
        >>> watch = LossWatch()
        >>> watch.add({"loss": torch.tensor(float("nan"))})
        >>> bool(torch.isfinite(watch.total))
        False
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None

    def add(self, outputs) -> None:
        """Add the loss of a training step's outputs (a tensor, or a mapping with ``"loss"``)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            self.total = loss if self.total is None else self.total + loss

    def diverged(self, trainer: Trainer) -> bool:
        """Whether any rank saw a non-finite loss since the last check (a collective: every rank enters)."""
        local = self.total is not None and not bool(torch.isfinite(self.total))
        self.total = None
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False))


def check_state_restored(global_step: int, restored: bool) -> None:
    """Refuse a fit that starts past step 0 without IMPPruner's state (the level, masks and step k unknown).

    Args:
        global_step: the step the fit starts at.
        restored: whether the callback's state was loaded from the checkpoint.

    Raises:
        ValueError: for ``global_step > 0`` without ``restored``, saying how to start or resume instead.
    """
    if global_step > 0 and not restored:
        raise ValueError(
            f"IMPPruner: this fit starts at global step {global_step}, from a checkpoint without "
            "IMPPruner state (a dense training checkpoint, or one written by a fit without this callback), "
            "so the level, the masks and the step-k snapshot are unknown. Start the IMP from scratch (no "
            "`ckpt_path`; load pre-trained weights into the model yourself if that is what you mean), or "
            "resume from a checkpoint written by a fit with IMPPruner."
        )


def level_record(level: int, remaining_fraction: float, accuracy: float, loss: float, step: int) -> dict:
    """One entry of IMPPruner's ``history``: what the level reached, and the global step it ended at."""
    return {
        "level": level,
        "remaining_fraction": remaining_fraction,
        "accuracy": accuracy,
        "loss": loss,
        "step": step,
    }


def level_end_note(record: Mapping) -> str:
    """One line on a completed level (a :func:`level_record`): its end step, weights remaining and accuracy.

    Example:
        >>> level_end_note(level_record(1, 0.8, 0.9141, 0.3, 123120))
        'level 1 ended at step 123120: 80.00% of the weights, accuracy 91.41%'
    """
    return (
        f"level {record['level']} ended at step {record['step']}: "
        f"{100 * record['remaining_fraction']:.2f}% of the weights, accuracy {100 * record['accuracy']:.2f}%"
    )


def diverged_note(level: int, what: str, completed: int, ticket_paths: Sequence[str]) -> str:
    """Why the IMP stopped at a diverged ``level`` (IMPPruner's ``stopped``), and where its tickets are."""
    return (
        f"level {level} diverged ({what}); the IMP stops after {completed} completed level(s), whose "
        f"tickets are in {ticket_paths[-1] if ticket_paths else 'no file yet'}."
    )


def remaining_bp(remaining_fraction: float) -> int:
    """The weights remaining in basis points, ``round(10000 * remaining_fraction)``: the step of IMPPruner's
    ``*_by_remaining_bp`` tags, so that TensorBoard draws them against the weights remaining. That step decreases
    over the levels and is not the global step, which loggers that order rows by step (CSV, W&B, MLflow) would
    garble: those tags go to TensorBoard only.

    Example:
        >>> remaining_bp(0.8 ** 3)
        5120
    """
    return round(10_000 * remaining_fraction)


def level_charts(stability: bool) -> dict[str, list[str]]:
    """IMPPruner's custom-scalars panel: chart title -> tags (without the ``imp/`` prefix).

    Args:
        stability: add the charts of the error barriers (``IMPPruner(stability=True)``).
    """
    charts = {
        "Accuracy at level end": ["accuracy"],
        "Accuracy against remaining weights (step = basis points)": ["accuracy_by_remaining_bp"],
        "Remaining fraction": ["remaining_fraction"],
        "Sparsity per layer": ["sparsity/.*"],
    }
    if stability:
        charts["Error barrier at level end"] = ["test_error_barrier", "train_error_barrier"]
        charts["Test error barrier against remaining weights (bp)"] = ["test_error_barrier_by_remaining_bp"]
    return charts


def level_scalars(level: int, masks: Mapping[str, Tensor] | None, names: Sequence[str]) -> dict[str, float]:
    """What IMPPruner logs at a level's start: ``level``, ``remaining_fraction`` and ``sparsity/<layer>`` (the
    fraction of the layer's weights pruned; ``<layer>`` the parameter's name without ``.weight``).

    Args:
        level: the level starting.
        masks: its masks, or None for the dense level.
        names: the pruned parameters (all kept when ``masks`` is None).

    Example:
        >>> import torch
        >>> level_scalars(1, {"fc.weight": torch.tensor([True, False, False, False])}, ["fc.weight"])
        {'level': 1, 'remaining_fraction': 0.25, 'sparsity/fc': 0.75}
    """
    report = None if masks is None else sparsity_report(masks)
    scalars = {"level": level, "remaining_fraction": 1.0 if report is None else report.remaining_fraction}
    fractions = dict.fromkeys(names, 1.0) if report is None else report.layer_remaining_fraction
    for name, kept in fractions.items():
        scalars[f"sparsity/{name.removesuffix('.weight')}"] = 1.0 - kept
    return scalars


def levels_table(history: list[dict], barriers: Mapping[int, Mapping] | None = None) -> str:
    """A markdown table of IMP's completed levels: weights remaining and accuracy, and the error barriers.

    Args:
        history: one dict per completed level: ``level``, ``remaining_fraction``, ``accuracy``.
        barriers: level -> a dict with ``test_error_barrier`` and ``train_error_barrier`` (IMPPruner's
            ``stability_results``), in percentage points in the table, ``-`` for a level not measured (yet);
            None for no barrier columns.

    Returns:
        The table.

    Example:
        >>> history = [{"level": 0, "remaining_fraction": 1.0, "accuracy": 0.9}, {"level": 1,
        ...            "remaining_fraction": 0.8, "accuracy": 0.91}]
        >>> print(levels_table(history, {0: {"test_error_barrier": 0.125, "train_error_barrier": 0.0}}))
        | level | weights remaining | accuracy | test error barrier | train error barrier |
        |---|---|---|---|---|
        | 0 | 100.00% | 90.00% | 12.50% | 0.00% |
        | 1 | 80.00% | 91.00% | - | - |
    """
    names = [] if barriers is None else ["test_error_barrier", "train_error_barrier"]
    rows = [
        "| "
        + " | ".join(["level", "weights remaining", "accuracy", *(n.replace("_", " ") for n in names)])
        + " |"
    ]
    rows.append("|---" * (3 + len(names)) + "|")
    for h in history:
        cells = [str(h["level"]), f"{100 * h['remaining_fraction']:.2f}%", f"{100 * h['accuracy']:.2f}%"]
        result = {} if barriers is None else barriers.get(h["level"], {})
        cells += [_percent(result[name]) if name in result else "-" for name in names]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _percent(value) -> str:
    return f"{100 * (math.nan if value is None else float(value)):.2f}%"
