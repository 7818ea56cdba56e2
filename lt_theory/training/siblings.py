"""Siblings of a run (Frankle et al. 2020's instability analysis): spawn steps, seeds and finished results.

A sibling is a copy of a run taken at step ``k`` and trained to the parent's end ``T`` with another data
order (:func:`lt_theory.training.child.train_from_snapshot`). This module holds what does not depend on
Lightning's loop:

- the spawn steps as a user gives them (steps, or fractions of training) and as they resolve against the
  number of optimizer steps of the run (:func:`check_spawn_steps`, :func:`resolve_spawn_steps`);
- the sibling's data-order seed, different from the parent's (:func:`sibling_seed`);
- the folder of finished siblings (:class:`SiblingStore`): a sibling's final weights and its result are
  named by ``k``, ``T``, the seed and a fingerprint of the parent's final weights, and a stored result is
  reused only for that parent, that seed and the same evaluation settings
  (:func:`lt_theory.training.stored.changed_settings`). The weights are written as soon as the sibling is
  trained, before its path is evaluated: weights without a result are a sibling to evaluate, not to train.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path

import torch
from torch import Tensor

from lt_theory.data.datamodule import derived_seed
from lt_theory.training.stored import changed_settings, read_json, write_json

__all__ = ["SiblingStore", "check_spawn_steps", "resolve_spawn_steps", "sibling_seed"]


def check_spawn_steps(spawn_steps) -> list:
    """The spawn steps as given (ints >= 0, or fractions of training in [0, 1)), checked.

    Raises:
        ValueError: naming ``spawn_steps``, for an empty list, a value of another kind, or a repeated value.

    Example:
        >>> check_spawn_steps(0.5), check_spawn_steps([0, 100, 0.1])
        ([0.5], [0, 100, 0.1])
    """
    if isinstance(spawn_steps, (Integral, Real)) and not isinstance(spawn_steps, bool):
        spawn_steps = [spawn_steps]
    if isinstance(spawn_steps, (str, bytes)) or not isinstance(spawn_steps, Sequence) or not spawn_steps:
        raise ValueError(
            "`spawn_steps` must be a non-empty list of steps (ints >= 0) or fractions of training "
            f"(floats in [0, 1)), got {spawn_steps!r}"
        )
    for value in spawn_steps:
        is_step = isinstance(value, Integral) and not isinstance(value, bool) and value >= 0
        is_fraction = (
            isinstance(value, Real)
            and not isinstance(value, (bool, Integral))
            and math.isfinite(value)
            and 0 <= value < 1
        )
        if not (is_step or is_fraction):
            raise ValueError(
                f"`spawn_steps` must hold steps (ints >= 0) or fractions of training (floats in [0, 1)), "
                f"got {value!r} in {list(spawn_steps)!r}"
            )
    if len(set(spawn_steps)) != len(spawn_steps):
        raise ValueError(f"`spawn_steps` must not repeat a step, got {list(spawn_steps)!r}")
    return list(spawn_steps)


def resolve_spawn_steps(spawn_steps: Sequence[int | float], total: float) -> list[int]:
    """The spawn steps as sorted optimizer steps of a run of ``total`` steps (a fraction ``f`` is ``int(f T)``).

    Raises:
        ValueError: for a fraction when training has no end (``total`` infinite), steps that collide once
            fractions are resolved, or a step at or beyond the end of training.

    Example:
        >>> resolve_spawn_steps([0.5, 3], total=100)
        [3, 50]
    """
    steps = []
    for value in spawn_steps:
        if isinstance(value, Integral):
            steps.append(int(value))
        elif math.isinf(total):
            raise ValueError(
                f"`spawn_steps` holds the fraction {value!r}, but training has no end (max_steps=-1 and "
                "max_epochs=-1): give steps, or an end of training"
            )
        else:
            steps.append(int(value * total))
    if len(set(steps)) != len(steps):
        raise ValueError(f"`spawn_steps` {list(spawn_steps)!r} give repeated steps {steps} for {total} steps")
    late = [k for k in steps if k >= total]
    if late:
        raise ValueError(
            f"`spawn_steps` must be before the end of training ({total} optimizer steps): {late} is not"
        )
    return sorted(steps)


def sibling_seed(datamodule, k: int, given: int | None = None, stream: str = "lmc-sibling") -> int:
    """The data-order seed of the sibling ``k``: ``given``, else one derived from the parent's.

    The parent's seed is the data module's ``order_seed`` (an lt_theory data module), else its ``seed``, else
    0; the derived seed differs from it and between values of ``k`` and of ``stream``.

    Args:
        datamodule: the parent's data module.
        k: what tells siblings apart: the spawn step (LinearModeConnectivity), the level (IMPPruner).
        given: a seed chosen by the user, used as it is.
        stream: the name of the family of siblings.
    """
    if given is not None:
        return int(given)
    parent = getattr(datamodule, "order_seed", None)
    parent = getattr(datamodule, "seed", 0) if parent is None else parent
    return derived_seed(stream, int(parent or 0), k) % 2**31


class SiblingStore:
    """The folder of a run's snapshots and finished siblings, and the rule for reusing a sibling's result.

    Args:
        directory: the folder (created when a file is written).

    Example:
        >>> store = SiblingStore("runs/lmc")
        >>> store.file(100, 500, seed=7, parent="0123456789abcdef", suffix=".json").name
        'sibling_step=100_to=500_seed=7_parent=0123456789ab.json'
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def snapshot(self, k: int) -> Path:
        """Where the training state of step ``k`` is written."""
        return self.directory / f"snapshot_step={k}.ckpt"

    def file(self, k: int, final_step: int, seed: int, parent: str, suffix: str) -> Path:
        """A finished sibling's file: ``.pt`` its final weights, ``.json`` its result."""
        return self.directory / f"sibling_step={k}_to={final_step}_seed={seed}_parent={parent[:12]}{suffix}"

    def progress(self, k: int, final_step: int, seed: int) -> Path:
        """The folder of a sibling's progress checkpoints (found again after a preemption)."""
        return self.directory / f"sibling_step={k}_to={final_step}_seed={seed}_progress"

    def root(self, k: int) -> Path:
        """The child Trainer's ``default_root_dir`` for the sibling of ``k``."""
        return self.directory / f"sibling_step={k}"

    @staticmethod
    def reusable(result: Mapping | None, final_step: int, parent: str, seed: int, settings: Mapping) -> bool:
        """Whether ``result`` is a finished sibling's for this parent's end, seed and evaluation settings."""
        return (
            result is not None
            and result.get("final_step") == final_step
            and result.get("parent") == parent
            and result.get("sibling_seed") == seed
            and not changed_settings(result.get("settings", {}), settings)
            and not result.get("failed")
        )

    def stored_result(self, k: int, final_step: int, parent: str, seed: int, settings: Mapping) -> dict | None:
        """The result written for this sibling, if there is one that :meth:`reusable` accepts."""
        path = self.file(k, final_step, seed, parent, ".json")
        if not path.exists():
            return None
        stored = read_json(path)
        return stored if self.reusable(stored, final_step, parent, seed, settings) else None

    def trained_weights(
        self, k: int, final_step: int, seed: int, parent: str, tidy: bool = True
    ) -> dict[str, Tensor]:
        """The final weights of the sibling of ``k``, trained for this parent's end and seed, read back.

        They are on disk without a result when a preemption came while the path was evaluated (written
        atomically: a file under their name is complete).

        Args:
            k, final_step, seed, parent: the sibling, as in :meth:`file`.
            tidy: also remove the sibling's progress folder, if a kill left it (one rank only).

        Returns:
            The state dict, on the CPU.
        """
        if tidy:
            shutil.rmtree(self.progress(k, final_step, seed), ignore_errors=True)
        return torch.load(self.file(k, final_step, seed, parent, ".pt"), map_location="cpu", weights_only=True)

    def save(self, k: int, result: Mapping) -> None:
        """Write a finished sibling's result (JSON, atomic); its weights (``result["weights"]``) are on disk."""
        json_file = self.file(k, result["final_step"], result["sibling_seed"], result["parent"], ".json")
        write_json(json_file, dict(result))
