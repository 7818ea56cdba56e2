"""The axes of a sweep and its task list: the product of the axes' values (and of the training splits).

An axis is a config key and the values it takes, e.g. ``model.net.init_args.k: [1, 2, 4]``; several axes
are crossed. Task ``i`` of the product is what a SLURM array task with ``$SLURM_ARRAY_TASK_ID = i`` runs:
the last axis varies fastest and the split (bias-variance mode) slowest, as in ``itertools.product(splits,
*axes)``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Axis:
    """One axis of a sweep: a config key (dotted, e.g. ``data.init_args.label_noise``) and its values."""

    key: str
    values: tuple


def check_axes(axes: object) -> tuple[Axis, ...]:
    """The sweep's axes, validated: ``{key: [values]}`` in the order given.

    Args:
        axes: a non-empty mapping from dotted config keys to non-empty lists of distinct JSON values.

    Returns:
        The axes, in the mapping's order.

    Raises:
        ValueError: for no axes, a key that is not a dotted name, an empty or non-list value list, or a
            repeated value.

    Example:
        >>> check_axes({"model.net.init_args.k": [1, 2]})
        (Axis(key='model.net.init_args.k', values=(1, 2)),)
    """
    if not isinstance(axes, Mapping) or not axes:
        raise ValueError(
            "`sweep.axes` must map config keys to their values, e.g. `sweep.axes: {model.net.init_args.k: "
            f"[1, 2, 4]}}`, got {axes!r}"
        )
    out = []
    for key, values in axes.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", key):
            raise ValueError(f"`sweep.axes` keys must be dotted config keys like `model.lr`, got {key!r}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"`sweep.axes.{key}` must be a non-empty list of values, got {values!r}")
        forms = [json.dumps(v, sort_keys=True, default=str) for v in values]
        repeated = sorted({f for f in forms if forms.count(f) > 1})
        if repeated:
            raise ValueError(f"`sweep.axes.{key}` repeats the value(s) {', '.join(repeated)}: {list(values)}")
        out.append(Axis(key, tuple(values)))
    return tuple(out)


def check_splits(splits: object) -> int | None:
    """The number of disjoint training splits per point of the bias-variance mode.

    Args:
        splits: None (no bias-variance mode) or an int >= 2 (a sample variance needs two models).

    Returns:
        ``splits``.

    Raises:
        ValueError: if ``splits`` is neither None nor an int >= 2.
    """
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 2):
        raise ValueError(
            f"`sweep.splits` must be None or an int m >= 2 (m models on m disjoint parts of the training set "
            f"per point), got {splits!r}"
        )
    return splits


@dataclass(frozen=True)
class SweepTask:
    """One run of a sweep: its index in the task list, the value of each axis and, optionally, a split."""

    index: int
    values: dict = field(hash=False)
    """``{axis key: value}``, in the order of the axes."""
    split: int | None = None
    name: str = ""
    """The run's folder and TensorBoard version, e.g. ``k_0008`` or ``hidden_0008_label_noise_0.2_split_1``."""

    def label(self) -> str:
        """The axis values in words, e.g. ``k=8, label_noise=0.2, split 1``."""
        names = short_names(list(self.values))
        parts = [f"{names[key]}={value_text(value)}" for key, value in self.values.items()]
        return ", ".join(parts + ([] if self.split is None else [f"split {self.split}"]))


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """A short name per key: its last component, or as many trailing components as tell the keys apart.

    Args:
        keys: dotted config keys.

    Returns:
        ``{key: short name}`` (``init_args`` components left out).

    Example:
        >>> short_names(["model.net.init_args.k", "data.init_args.label_noise"])
        {'model.net.init_args.k': 'k', 'data.init_args.label_noise': 'label_noise'}
    """
    names = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            name = "_".join(p for p in parts[-length:] if p != "init_args")
            others = [k for k in keys if k != key and k.split(".")[-length:] == parts[-length:]]
            if not others:
                break
        names[key] = name or key
    return names


def value_text(value: Any) -> str:
    """An axis value in a label or a folder name: floats with ``g``, lists joined by ``-``.

    Args:
        value: an axis value.

    Returns:
        The text.
    """
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(value_text(v) for v in value)
    return str(value)


def _folder_part(value: Any, digits: int) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return f"{value:0{digits}d}"
    return re.sub(r"[^\w.\-]+", "-", value_text(value))


def sweep_tasks(axes: Sequence[Axis], splits: int | None = None) -> list[SweepTask]:
    """Every task of a sweep, in the order of their task index (``itertools.product(splits, *axes)``).

    Args:
        axes: the axes (see :func:`check_axes`).
        splits: None, or the number ``m >= 2`` of disjoint training splits per point.

    Returns:
        The tasks; task ``i`` is run by the SLURM array task ``i``.

    Raises:
        ValueError: for a bad number of splits.

    Example:
        >>> axes = check_axes({"model.net.init_args.k": [1, 2], "data.init_args.label_noise": [0.1, 0.2]})
        >>> [task.name for task in sweep_tasks(axes)]
        ['k_0001_label_noise_0.1', 'k_0001_label_noise_0.2', 'k_0002_label_noise_0.1', 'k_0002_label_noise_0.2']
    """
    splits = check_splits(splits)
    names = short_names([axis.key for axis in axes])
    digits = {
        axis.key: max(
            [4] + [len(str(v)) for v in axis.values if isinstance(v, int) and not isinstance(v, bool)]
        )
        for axis in axes
    }
    tasks = []
    for split, *values in itertools.product(
        [None] if splits is None else range(splits), *[axis.values for axis in axes]
    ):
        chosen = {axis.key: value for axis, value in zip(axes, values)}
        parts = [f"{names[k]}_{_folder_part(v, digits[k])}" for k, v in chosen.items()]
        name = "_".join(parts + ([] if split is None else [f"split_{split}"]))
        tasks.append(SweepTask(len(tasks), chosen, split, name))
    return tasks


def describe_grid(axes: Sequence[Axis], splits: int | None) -> str:
    """The grid in words, e.g. ``k: 14 values x label_noise: 2 values x 2 splits = 56 tasks``.

    Args:
        axes: the axes.
        splits: None or the number of splits.

    Returns:
        The words.
    """
    names = short_names([axis.key for axis in axes])
    parts = [f"{names[a.key]}: {len(a.values)} value{'s' * (len(a.values) != 1)}" for a in axes]
    if splits:
        parts.append(f"{splits} splits")
    total = math.prod(len(a.values) for a in axes) * (splits or 1)
    return " x ".join(parts) + f" = {total} task{'s' * (total != 1)}"
