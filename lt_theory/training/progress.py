"""How far long work after ``fit`` has got: siblings and path evaluations, shown on global rank zero only.

Messages go to the ``lt_theory`` Python logger (:func:`get_logger`; a child logger per module, e.g.
``lt_theory.lmc``), never to ``print``. Like Lightning's own logger, it gets a handler writing INFO to stderr
when the application has configured none (no handler on the root logger), and then does not propagate; otherwise
the application's logging configuration decides (configure logging before the first message, or set
``logging.getLogger("lt_theory").propagate = True`` afterwards). Bars are tqdm's (a dependency of Lightning), on stderr:

- :class:`SiblingsProgress`: one line per sibling, ``sibling i of n (k = K): training steps K to T; 3 min 10 s
  elapsed, about 9 min left`` (the time left estimated from the time per step of the siblings trained so far),
  and, when bars are on, a bar over the sibling's steps with its own rate and ETA
  (:meth:`SiblingsProgress.callback`, a callback of the child Trainer, which shows no bar of its own);
- :class:`PathProgress`: the hook :func:`~lt_theory.measures.interpolation.linear_paths` calls after each
  alpha, as a bar ``path k=K: alpha j of m`` (``m`` grows once the coarse grid is refined), or a line per alpha
  without bars.

Every function here is silent on ranks other than zero (:func:`is_rank_zero`).

Example:
    >>> progress = SiblingsProgress({100: 400, 500: 400}, bars=False)  # two siblings of 400 steps each
    >>> progress.total
    2
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm.auto import tqdm

__all__ = ["PathProgress", "SiblingsProgress", "duration", "get_logger", "info", "is_rank_zero"]

LOGGER_NAME = "lt_theory"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The ``lt_theory`` logger (or its child ``name``), with a stderr handler at INFO when nothing else is set.

    Args:
        name: ``"lt_theory"`` or a name under it, e.g. ``"lt_theory.lmc"``.

    Returns:
        The :class:`logging.Logger`.

    Example:
        >>> get_logger("lt_theory.lmc").name
        'lt_theory.lmc'
    """
    package = logging.getLogger(LOGGER_NAME)
    if not package.handlers and not logging.getLogger().handlers:  # as Lightning does for its own logger
        package.addHandler(logging.StreamHandler())
        package.propagate = False
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    return logging.getLogger(name)


def is_rank_zero() -> bool:
    """Whether this process is global rank zero (Lightning's ``rank_zero_only.rank``, 0 outside a launcher)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def info(message: str, name: str = LOGGER_NAME) -> None:
    """Log ``message`` at INFO on global rank zero only."""
    if is_rank_zero():
        get_logger(name).info(message)


def duration(seconds: float) -> str:
    """A duration in words: ``42 s``, ``3 min 05 s``, ``2 h 07 min``.

    Example:
        >>> duration(185.2), duration(7620)
        ('3 min 05 s', '2 h 07 min')
    """
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class SiblingsProgress:
    """Progress over a family of siblings: a line when each starts and ends, and a bar over its steps.

    Args:
        steps: spawn step ``k`` -> the steps its sibling trains, for every sibling of the family in order (those
            found done included: they count in ``i of n``).
        bars: show a tqdm bar over each sibling's steps (rank zero).
        label: how the lines call one of them.
        logger: the logger's name.
        key: what the keys of ``steps`` are, in the lines (``"k"``; ``"level"`` for IMP's level siblings).
        here: the keys this process trains (None: all of them): the time left counts only theirs (an array
            task trains one sibling of the family).
    """

    def __init__(
        self,
        steps: Mapping[int, int],
        bars: bool = True,
        label: str = "sibling",
        logger: str = LOGGER_NAME,
        key: str = "k",
        here: Iterable[int] | None = None,
    ) -> None:
        self.steps, self.bars, self.label, self.logger, self.key = dict(steps), bars, label, logger, key
        self.here = set(self.steps if here is None else here)
        self.order = {k: i for i, k in enumerate(self.steps)}
        self.start = time.monotonic()
        self._seconds = self._trained_steps = 0.0
        self._done: set[int] = set()

    @property
    def total(self) -> int:
        """The number of siblings of the family."""
        return len(self.steps)

    def head(self, k: int) -> str:
        """``sibling i of n (k = K)``."""
        return f"{self.label} {self.order[k] + 1} of {self.total} ({self.key} = {k})"

    def _times(self) -> str:
        text = f"{duration(time.monotonic() - self.start)} elapsed"
        left = sum(n for k, n in self.steps.items() if k in self.here and k not in self._done)
        if left and self._trained_steps:
            text += f", about {duration(self._seconds / self._trained_steps * left)} left"
        return text

    def skipped(self, k: int, why: str) -> None:
        """Say that the sibling of ``k`` needs no training (``why``); nothing when it was trained just now."""
        if k in self._done:
            return
        self._done.add(k)
        info(f"{self.head(k)}: {why}", self.logger)

    def found(self, k: int, result: Mapping) -> None:
        """Say how the sibling of ``k`` ended when it was not trained just now: failed, or reused from disk."""
        failed = result.get("failed")
        self.skipped(k, f"failed ({failed})" if failed else "trained already (its stored result or weights are reused)")

    def callback(self, k: int, start: int, end: int) -> Callback:
        """Say that the sibling of ``k`` starts training from ``start`` to ``end``; the callback for its Trainer.

        Returns:
            A callback drawing the bar over the child's steps (rank zero, when bars are on) and saying when the
            child's training ends, with the time it took.
        """
        info(f"{self.head(k)}: training steps {start} to {end}; {self._times()}", self.logger)
        return _SiblingBar(self, k, start, end)

    def _finished(self, k: int, steps: int, seconds: float) -> None:
        self._done.add(k)
        self._seconds += seconds
        self._trained_steps += max(steps, 0)
        info(f"{self.head(k)}: trained in {duration(seconds)}; {self._times()}", self.logger)


class _SiblingBar(Callback):
    """In a child Trainer: a tqdm bar over its optimizer steps, ``sibling i of n (k = K)``, on rank zero."""

    def __init__(self, progress: SiblingsProgress, k: int, start: int, end: int) -> None:
        self.progress, self.k, self.start, self.end = progress, k, start, end
        self._bar = None
        self._shown = 0
        self._began = time.monotonic()
        self._first_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._began, self._first_step = time.monotonic(), trainer.global_step
        if self.progress.bars and trainer.is_global_zero:
            self._shown = trainer.global_step - self.start
            self._bar = tqdm(
                total=self.end - self.start,
                initial=self._shown,
                desc=self.progress.head(self.k),
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if self._bar is not None:
            done = trainer.global_step - self.start
            self._bar.update(done - self._shown)
            self._shown = done

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()
        steps = trainer.global_step - (self._first_step or 0)
        self.progress._finished(self.k, steps, time.monotonic() - self._began)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PathProgress:
    """The ``progress`` hook of :func:`~lt_theory.measures.interpolation.linear_paths`: ``<label>: alpha j of m``
    on rank zero, as a bar (``bars``) or, without bars, one line per alpha; :meth:`close` says when it is done.

    Args:
        label: e.g. ``"path k=100"``.
        bars: a tqdm bar rather than one line per alpha.
        logger: the logger's name.

    Example:
        >>> hook = PathProgress("path k=100", bars=False)
        >>> hook(1, 7)  # logs "path k=100: alpha 1 of 7" (rank zero)
        >>> hook.close()
    """

    def __init__(self, label: str, bars: bool = True, logger: str = LOGGER_NAME) -> None:
        self.label, self.bars, self.logger = label, bars, logger
        self.done = 0
        self._bar = None
        self._began = time.monotonic()

    def __call__(self, done: int, planned: int) -> None:
        """After each alpha: ``done`` evaluated of the ``planned`` known so far."""
        self.done = done
        if not is_rank_zero():
            return
        if not self.bars:
            get_logger(self.logger).info(f"{self.label}: alpha {done} of {planned}")
            return
        if self._bar is None:
            self._bar = tqdm(
                total=planned,
                desc=self.label,
                bar_format="{desc}: alpha {n} of {total} |{bar}| {elapsed}<{remaining}",
                dynamic_ncols=True,
                mininterval=0,  # an alpha takes seconds: draw each
                leave=False,
            )
        self._bar.total = max(planned, self._bar.total)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """Close the bar and say how many alphas took how long."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.done:
            took = duration(time.monotonic() - self._began)
            info(f"{self.label}: {self.done} alphas evaluated in {took}", self.logger)
