"""The width grid and the sweep's task list: one (width, split) per run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_WIDTHS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64)
"""The width grid of PreAct ResNet-18 (Nakkiran et al. 2019 sweep k = 1..64; the peak is near 10-12)."""


def check_widths(widths: object) -> tuple[int, ...]:
    """The width grid, validated and sorted.

    Args:
        widths: a non-empty sequence of distinct ints >= 1.

    Returns:
        The widths in increasing order.

    Raises:
        ValueError: for an empty grid, a width that is not an int >= 1, or a repeated width.

    Example:
        >>> check_widths([4, 1, 2])
        (1, 2, 4)
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"`widths` must be a non-empty list of ints >= 1, got {widths!r}")
    if len(widths) == 0:
        raise ValueError("`widths` must be a non-empty list of ints >= 1, got an empty grid")
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad:
        raise ValueError(f"`widths` must hold ints >= 1, got {bad} in {list(widths)}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"`widths` must not repeat a width, got {list(widths)}")
    return tuple(sorted(widths))


def check_splits(splits: object) -> int | None:
    """The number of disjoint training splits per width of the bias-variance mode.

    Args:
        splits: None (no bias-variance mode) or an int >= 2 (a sample variance needs two models).

    Returns:
        ``splits``.

    Raises:
        ValueError: if ``splits`` is neither None nor an int >= 2.
    """
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 2):
        raise ValueError(
            f"`splits` must be None or an int m >= 2 (m models on m disjoint parts of the training set "
            f"per width), got {splits!r}"
        )
    return splits


@dataclass(frozen=True)
class SweepTask:
    """One run of a sweep: a width and, in the bias-variance mode, the training split."""

    width: int
    split: int | None = None

    @property
    def name(self) -> str:
        """The run's folder and TensorBoard version: ``width_0008`` or ``width_0008_split_1``."""
        base = f"width_{self.width:04d}"
        return base if self.split is None else f"{base}_split_{self.split}"


def sweep_tasks(widths: Sequence[int], splits: int | None = None) -> list[SweepTask]:
    """Every task of a sweep, in the order of their task index: split by split, width by width.

    Task ``i`` trains width ``widths[i % len(widths)]`` on split ``i // len(widths)``; a SLURM array
    ``--array=0-(len - 1)`` runs them all.

    Args:
        widths: the width grid (validated by :func:`check_widths`).
        splits: None, or the number ``m >= 2`` of disjoint training splits per width.

    Returns:
        The tasks.

    Raises:
        ValueError: for a bad grid or number of splits.

    Example:
        >>> [task.name for task in sweep_tasks([2, 1], splits=2)]
        ['width_0001_split_0', 'width_0002_split_0', 'width_0001_split_1', 'width_0002_split_1']
    """
    widths = check_widths(widths)
    splits = check_splits(splits)
    if splits is None:
        return [SweepTask(w) for w in widths]
    return [SweepTask(w, s) for s in range(splits) for w in widths]
