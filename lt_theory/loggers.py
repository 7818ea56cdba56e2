"""Logging shared by every lt_theory callback: scalars to every logger, extras to TensorBoard.

Scalars go to each logger in ``trainer.loggers`` at ``trainer.global_step`` (TensorBoard, CSV, W&B, ...).
Figures, histograms, text and the custom-scalars layout need a :class:`~lightning.pytorch.loggers.TensorBoardLogger`
and go to every one present. Only the global rank zero writes; on other ranks every function here returns
without touching a logger, so callers need not guard.

TensorBoard's custom-scalars plugin reads one layout per run (the last one written), so callbacks that each
add a panel would overwrite each other. :func:`add_custom_scalar_charts` therefore merges every contribution
made to a writer and writes the whole merged layout each time.

Example:
    >>> import tempfile
    >>> from lightning.pytorch import Trainer
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from lt_theory.loggers import has_tensorboard, log_scalars
    >>> trainer = Trainer(logger=CSVLogger(tempfile.mkdtemp()), enable_progress_bar=False)
    >>> log_scalars(trainer, {"spectral/lipschitz_upper": 12.5}, step=100)  # in a hook: at the global step
    >>> trainer.logger.save()
    >>> open(trainer.logger.experiment.metrics_file_path).read().splitlines()
    ['spectral/lipschitz_upper,step', '12.5,100']
    >>> has_tensorboard(trainer)  # figures, text and add_custom_scalar_charts(...) go nowhere
    False
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lt_theory.figures import render_rgb

__all__ = [
    "LoggerTarget",
    "add_custom_scalar_charts",
    "has_tensorboard",
    "log_figure",
    "log_histogram",
    "log_scalars",
    "log_text",
    "tensorboard_writers",
]

# writer -> {category: {chart title: (chart kind, [tag regexes])}}; weak so finished runs are released.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Number of writes that reached a logger in this process; the distributed contract test reads it.
emitted_writes = 0


class LoggerTarget(NamedTuple):
    """Loggers to write to without a Trainer (a sweep's aggregation, a report): every function here takes it
    where it takes a trainer, since they read only ``loggers``, ``is_global_zero`` and ``global_step``.

    Example:
        >>> import tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> target = LoggerTarget([CSVLogger(tempfile.mkdtemp())])
        >>> log_scalars(target, {"dd/test_error_by_width": 0.31}, step=64)
        >>> target.loggers[0].save()
        >>> open(target.loggers[0].experiment.metrics_file_path).read().splitlines()
        ['dd/test_error_by_width,step', '0.31,64']
    """

    loggers: list
    is_global_zero: bool = True
    global_step: int = 0


#: where the functions here write: a running Trainer, or loggers without one
LogTarget = Trainer | LoggerTarget


def _step(trainer: LogTarget, step: int | None) -> int:
    return trainer.global_step if step is None else int(step)


def _emit() -> None:
    global emitted_writes
    emitted_writes += 1


def has_tensorboard(trainer: LogTarget) -> bool:
    """Whether the trainer has at least one :class:`TensorBoardLogger`.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.

    Returns:
        True when figures, histograms, text and layouts have somewhere to go.
    """
    return any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)


def tensorboard_writers(trainer: LogTarget) -> list:
    """The ``SummaryWriter`` of every TensorBoardLogger, on global rank zero only (else an empty list).

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.

    Returns:
        A list of :class:`torch.utils.tensorboard.SummaryWriter`.
    """
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a scalar needs a one-element tensor, got shape {tuple(value.shape)}")
        return float(value.detach().cpu().item())
    return float(value)


def log_scalars(
    trainer: LogTarget, scalars: Mapping[str, float | torch.Tensor], step: int | None = None
) -> None:
    """Log scalars to every logger of the trainer at ``trainer.global_step`` (or ``step``).

    NaN and Inf are logged as they are (TensorBoard shows them); warning about them is the caller's job.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.
        scalars: tag -> value; tensors must have one element.
        step: the step to log at; defaults to ``trainer.global_step``.

    Example:
        >>> # log_scalars(trainer, {"ntk/trace": 3.2, "ntk/eig_max": 1.1})
    """
    if not scalars or not trainer.is_global_zero or not trainer.loggers:
        return
    values = {tag: _as_float(v) for tag, v in scalars.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=_step(trainer, step))
        _emit()


def log_tensorboard_scalars(
    trainer: LogTarget, scalars: Mapping[str, float | torch.Tensor], step: int | None = None
) -> None:
    """Log scalars to the TensorBoardLoggers of the trainer only, at ``trainer.global_step`` (or ``step``).

    For scalars whose step is not the global step (e.g. a step that decreases, such as a remaining fraction):
    TensorBoard draws each tag against its own steps, while CSV, W&B or MLflow loggers would mix such rows
    into their step-ordered tables.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.
        scalars: tag -> value; tensors must have one element.
        step: the step to log at; defaults to ``trainer.global_step``.

    Example:
        >>> # log_tensorboard_scalars(trainer, {"imp/accuracy_by_remaining_bp": 0.91}, step=6400)
    """
    for writer in tensorboard_writers(trainer):
        for tag, value in scalars.items():
            writer.add_scalar(tag, _as_float(value), global_step=_step(trainer, step))
        _emit()


def log_figure(trainer: LogTarget, tag: str, figure, step: int | None = None, close: bool = True) -> None:
    """Log a matplotlib figure as an image to every TensorBoardLogger.

    The figure is drawn once on its own Agg canvas (:func:`lt_theory.figures.render_rgb`), so no pyplot backend
    is needed or switched.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.
        tag: the image tag, e.g. ``"spectral/sigma_max_by_depth"``.
        figure: a :class:`matplotlib.figure.Figure` (from :func:`lt_theory.figures.new_figure`, or a pyplot one).
        step: the step to log at; defaults to ``trainer.global_step``.
        close: close a pyplot figure afterwards (also when nothing was written), so figures do not pile up;
            figures made without pyplot need no closing.
    """
    try:
        writers = tensorboard_writers(trainer)
        image = render_rgb(figure) if writers else None
        for writer in writers:
            writer.add_image(tag, image, global_step=_step(trainer, step), dataformats="CHW")
            _emit()
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if close and pyplot is not None:
            pyplot.close(figure)


def log_histogram(trainer: LogTarget, tag: str, values: torch.Tensor, step: int | None = None) -> None:
    """Log a histogram of ``values`` to every TensorBoardLogger; non-finite values are dropped from it.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.
        tag: the histogram tag.
        values: any tensor; it is flattened.
        step: the step to log at; defaults to ``trainer.global_step``.
    """
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    flat = values.detach().flatten().to("cpu", torch.float64)
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return
    for writer in writers:
        writer.add_histogram(tag, flat, global_step=_step(trainer, step))
        _emit()


def log_text(trainer: LogTarget, tag: str, text: str, step: int | None = None) -> None:
    """Log markdown text to every TensorBoardLogger.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.
        tag: the text tag, e.g. ``"ntk/verdict"``.
        text: markdown shown in TensorBoard's TEXT panel.
        step: the step to log at; defaults to ``trainer.global_step``.
    """
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=_step(trainer, step))
        _emit()


def add_custom_scalar_charts(
    trainer: LogTarget,
    category: str,
    charts: Mapping[str, Sequence[str]],
    kind: str = "Multiline",
) -> None:
    """Add charts to the run's custom-scalars layout, merged with what other callbacks added.

    Args:
        trainer: the running trainer, or a :class:`LoggerTarget`.
        category: the panel's title in the CUSTOM SCALARS tab, e.g. ``"spectral"``.
        charts: chart title -> tags or regular expressions of tags drawn in it.
        kind: ``"Multiline"`` (one line per tag) or ``"Margin"`` (exactly three tags: value, lower, upper).

    Raises:
        ValueError: for an unknown ``kind`` or a Margin chart without exactly three tags.

    Example:
        >>> # add_custom_scalar_charts(trainer, "ntk", {"Kernel movement": ["ntk/relative_change",
        >>> #                                                               "ntk/distance_from_init"]})
    """
    if kind not in ("Multiline", "Margin"):
        raise ValueError(f"kind must be 'Multiline' or 'Margin', got {kind!r}")
    if kind == "Margin" and any(len(tags) != 3 for tags in charts.values()):
        raise ValueError("a Margin chart takes exactly three tags: value, lower, upper")
    for writer in tensorboard_writers(trainer):
        layout = _LAYOUTS.setdefault(writer, {})
        panel = layout.setdefault(category, {})
        for title, tags in charts.items():
            panel[title] = [kind, list(tags)]
        writer.add_custom_scalars(layout)
        writer.flush()
        _emit()


def merged_layout(writer) -> dict:
    """The merged custom-scalars layout written so far to ``writer`` (category -> title -> [kind, tags])."""
    return {cat: dict(charts) for cat, charts in _LAYOUTS.get(writer, {}).items()}
