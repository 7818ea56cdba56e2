"""What every lt_theory callback shares: argument checks, cadence, logger warnings, strategy checks.

The contract (``docs/design.md``) asks each callback to validate its arguments with a ``ValueError`` naming the
argument, to warn once (and not crash) when there is no logger or no TensorBoard, to log NaN with one
warning when a measurement is not finite, and to refuse sharded strategies at setup. :class:`TheoryCallback`
does these once for all of them; the measurements themselves live in :mod:`lt_theory.measures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lt_theory import loggers
from lt_theory.checks import check_positive_int

__all__ = ["TheoryCallback"]


class TheoryCallback(Callback):
    """Base class of the lt_theory callbacks.

    Subclasses set ``prefix`` (the first part of their tags), call ``super().setup(...)`` from ``setup``, and
    log through :meth:`log_scalars` and the other ``log_*`` methods, which prepend the prefix, write on rank
    zero only, and turn a non-finite value into NaN with a single warning per tag.

    Args:
        every_n_steps: measure every this many optimizer steps; None disables step-wise measurement.
    """

    prefix: str = "theory"
    #: Sharded strategies keep each parameter in pieces on different ranks; monitors that need whole
    #: parameters list here the strategy class names they refuse.
    refused_strategies: tuple[str, ...] = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")

    def __init__(self, every_n_steps: int | None = None) -> None:
        check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        self.every_n_steps = every_n_steps
        self._warned: set[str] = set()

    # -- warnings ---------------------------------------------------------------------------------

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` is seen by this callback (rank zero only)."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{type(self).__name__}: {message}", category=UserWarning)

    def _check_loggers(self, trainer: Trainer) -> None:
        if not trainer.loggers:
            self.warn_once(
                "no-logger",
                "the trainer has no logger, so the measurements are computed but not recorded. "
                "Pass `logger=TensorBoardLogger(save_dir=...)` (or any Lightning logger) to the Trainer.",
            )
        elif not loggers.has_tensorboard(trainer):
            names = ", ".join(type(lg).__name__ for lg in trainer.loggers)
            self.warn_once(
                "no-tensorboard",
                f"scalars go to {names}, but figures, histograms, text and the custom-scalars layout need a "
                "TensorBoardLogger and are skipped. Add `TensorBoardLogger(save_dir=...)` to the loggers "
                "to see them.",
            )

    def _check_strategy(self, trainer: Trainer) -> None:
        strategy = type(trainer.strategy).__name__
        if strategy in self.refused_strategies:
            raise ValueError(
                f"{type(self).__name__} needs each parameter whole on every rank, but the trainer uses "
                f"{strategy}, which shards parameters. Use strategy='ddp' (or a single device) with this callback."
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_strategy(trainer)
        self._check_loggers(trainer)

    # -- cadence ----------------------------------------------------------------------------------

    def is_step_due(self, trainer: Trainer, every_n_steps: int | None = None) -> bool:
        """Whether the step just finished (``trainer.global_step``) is a multiple of the cadence."""
        every = self.every_n_steps if every_n_steps is None else every_n_steps
        return every is not None and trainer.global_step > 0 and trainer.global_step % every == 0

    # -- logging ----------------------------------------------------------------------------------

    def _tag(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def log_scalars(
        self,
        trainer: Trainer,
        scalars: Mapping[str, float | torch.Tensor],
        step=None,
        warn_nonfinite: bool = True,
    ) -> None:
        """Log ``{name: value}`` as ``<prefix>/<name>``; non-finite values become NaN with one warning per tag.

        ``warn_nonfinite=False`` is for a caller that has already said, in one warning of its own, why the
        values are not finite (e.g. a NaN kernel behind every ``ntk/`` scalar).
        """
        values = {}
        for name, value in scalars.items():
            value = float(value.detach().cpu().item()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(value):
                if warn_nonfinite:
                    self.warn_once(
                        f"nonfinite:{name}",
                        f"`{self._tag(name)}` is not finite (NaN/Inf in weights, activations or kernels); "
                        "it is logged as NaN and training goes on.",
                    )
                value = math.nan
            values[self._tag(name)] = value
        loggers.log_scalars(trainer, values, step)

    def log_figure(self, trainer: Trainer, name: str, figure, step=None) -> None:
        loggers.log_figure(trainer, self._tag(name), figure, step)

    def log_histogram(self, trainer: Trainer, name: str, values: torch.Tensor, step=None) -> None:
        loggers.log_histogram(trainer, self._tag(name), values, step)

    def log_text(self, trainer: Trainer, name: str, text: str, step=None) -> None:
        loggers.log_text(trainer, self._tag(name), text, step)

    def add_charts(self, trainer: Trainer, charts: Mapping[str, list[str]], kind: str = "Multiline") -> None:
        """Add charts to the custom-scalars panel named after the prefix; tags are given without the prefix."""
        tagged = {title: [self._tag(t) for t in tags] for title, tags in charts.items()}
        loggers.add_custom_scalar_charts(trainer, self.prefix, tagged, kind)
