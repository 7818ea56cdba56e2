"""Progress of a sweep a user can follow: task i of n, its axis values, the time elapsed and an estimate of the
time left, on global rank zero through the ``lt_theory.sweep`` logger (:mod:`lt_theory.training.progress`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from lt_theory.sweep.tasks import SweepTask
from lt_theory.training.progress import duration, info

#: the logger of every message of the sweep
SWEEP_LOGGER = "lt_theory.sweep"


class Progress:
    """Says when each task starts and ends, with the elapsed time and an estimate of the time left.

    The estimate is the mean time of the tasks trained so far (not those found done) times the tasks left.

    Args:
        tasks: the tasks this process runs, in order.
        total: the number of tasks of the whole grid (task ``i`` is shown as ``i + 1`` of ``total``).
    """

    def __init__(self, tasks: Sequence[SweepTask], total: int) -> None:
        self.tasks, self.total = list(tasks), total
        self.start = time.monotonic()
        self.trained: list[float] = []
        self.finished = 0
        self._task_start = self.start

    def _head(self, task: SweepTask) -> str:
        return f"[sweep] task {task.index + 1} of {self.total} ({task.label()})"

    def _times(self) -> str:
        elapsed = time.monotonic() - self.start
        left = len(self.tasks) - self.finished
        text = f"{duration(elapsed)} elapsed"
        if left and self.trained:
            text += f", about {duration(math.fsum(self.trained) / len(self.trained) * left)} left"
        return text

    def started(self, task: SweepTask) -> None:
        """Say that ``task`` starts training."""
        self._task_start = time.monotonic()
        info(f"{self._head(task)}: training; {self._times()}", SWEEP_LOGGER)

    def done(self, task: SweepTask, summary: str, trained: bool) -> None:
        """Say that ``task`` ended (``trained``) or was found done, with ``summary`` (its final numbers)."""
        self.finished += 1
        if trained:
            took = time.monotonic() - self._task_start
            self.trained.append(took)
            what = f"done in {duration(took)}"
        else:
            what = "done already (its result.json is reused; `--sweep.rerun true` trains it again)"
        info(f"{self._head(task)} {what}: {summary}; {self._times()}", SWEEP_LOGGER)
