r"""The levels of iterative magnitude pruning as steps of one ``trainer.fit`` (Frankle et al. 2020).

Level 0 trains the dense network for :math:`T` optimizer steps; every later level restarts from step
:math:`k` (the rewind step) and trains :math:`T - k` steps, so level :math:`\ell` ends at the global step

.. math::
    \text{end}(\ell) = T + \ell\,(T - k).

:math:`T` is given in steps, or in epochs and turned into steps with the Trainer's own count of one epoch's
optimizer steps (``trainer.estimated_stepping_batches``).
"""

from __future__ import annotations

import math

from lightning.pytorch import Trainer

from lt_theory.checks import check_int, check_positive_int

__all__ = ["LevelSchedule"]


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

    def cut_warning(self, trainer: Trainer, user_max_steps: int | None) -> str | None:
        """What ends ``trainer``'s fit before the last level does (``max_epochs`` or ``max_steps``), or None."""
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
