"""Figures for TensorBoard's Images tab, drawn without pyplot.

Every figure of the package is a :class:`matplotlib.figure.Figure` rendered on its own Agg canvas. pyplot is
never imported, so importing a callback never switches a notebook's backend, and figures never pile up in
pyplot's registry (nothing needs closing: a figure is freed when its last reference goes).

TensorBoard shows an image at its pixel size, scaled down to the card's width when it is wider. Figures are
drawn at :data:`DPI` with fonts no smaller than :data:`FONT_SIZE` points and a constrained layout, so that
axis labels, tick labels and legends stay readable in the Images tab without enlarging the image.

Example:
    >>> from lt_theory.figures import new_figure, render_rgb
    >>> figure, axis = new_figure(width=4, height=3)
    >>> _ = axis.plot([0, 1], [1, 0], label="error")
    >>> render_rgb(figure).shape  # channels, height, width: 4 x 3 inches at 100 dpi
    (3, 300, 400)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "FONT_SIZE",
    "accuracy_vs_remaining_figure",
    "epochwise_figure",
    "error_along_path_figure",
    "new_figure",
    "render_rgb",
    "stability_figure",
]

DPI = 100
FONT_SIZE = 10


def new_figure(width: float = 5.0, height: float = 3.5, ncols: int = 1):
    """A figure of ``width`` x ``height`` inches with ``ncols`` axes side by side.

    Args:
        width: width in inches (pixels = width x :data:`DPI`).
        height: height in inches.
        ncols: number of axes in one row.

    Returns:
        ``(figure, axis)`` for one column, ``(figure, array of axes)`` for several.
    """
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols)
    for axis in np.atleast_1d(axes):
        axis.tick_params(labelsize=FONT_SIZE)
        axis.xaxis.label.set_size(FONT_SIZE + 1)
        axis.yaxis.label.set_size(FONT_SIZE + 1)
        axis.title.set_size(FONT_SIZE + 1)
    return figure, axes


def render_rgb(figure: Figure) -> np.ndarray:
    """Draw ``figure`` and return its pixels as a ``(3, height, width)`` uint8 array, as TensorBoard takes them.

    Args:
        figure: any matplotlib figure (one from :func:`new_figure`, or a pyplot figure).

    Returns:
        The RGB image, channels first.
    """
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, :3].transpose(2, 0, 1))


def _finite_or_nan(value) -> float:
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------------------------------------------------
# The callbacks' figures.


def accuracy_vs_remaining_figure(
    curves: Mapping[str, list[tuple[float, float]]],
    dense_accuracy: float | None = None,
    barriers: Mapping[str, list[tuple[float, float]]] | None = None,
) -> Figure:
    """Accuracy against the percentage of weights remaining (log x axis, decreasing to the right), and beside it
    the error barrier of each level's sparse network (its instability, Frankle et al. 2020) when given.

    Args:
        curves: label -> ``[(remaining_fraction, accuracy), ...]``, one curve per run (IMP and its controls;
            e.g. ``{"IMP": pruner.curve(), "random reinit": control.curve()}``).
        dense_accuracy: the dense network's accuracy, drawn as a horizontal line; None draws none.
        barriers: label -> ``[(remaining_fraction, error_barrier), ...]`` (e.g. ``pruner.barrier_curves()``),
            drawn in a second panel in percentage points; None (or empty) draws one panel.

    Returns:
        A matplotlib ``Figure``.

    Example:
        >>> figure = accuracy_vs_remaining_figure({"IMP": [(1.0, 0.9), (0.8, 0.91), (0.64, 0.9), (0.0, 0.1)]}, 0.9)
        >>> imp, dense = figure.axes[0].get_lines()
        >>> [float(x) for x in imp.get_xdata()], [float(y) for y in imp.get_ydata()]  # in %; none at 0% (log x)
        ([100.0, 80.0, 64.0], [90.0, 91.0, 90.0])
        >>> dense.get_label(), [float(y) for y in dense.get_ydata()]
        ('dense', [90.0, 90.0])
        >>> figure = accuracy_vs_remaining_figure({"IMP": [(1.0, 0.9)]}, barriers={"test": [(1.0, 0.25)]})
        >>> [float(y) for y in figure.axes[1].get_lines()[0].get_ydata()]
        [25.0]
    """
    panels = 2 if barriers else 1
    figure, axes = new_figure(5.5 * panels, 3.8, ncols=panels)
    axes = np.atleast_1d(axes)
    _percent_against_remaining(axes[0], curves, "accuracy (%)")
    if dense_accuracy is not None and math.isfinite(dense_accuracy):
        axes[0].axhline(100 * dense_accuracy, color="gray", linestyle="--", label="dense")
    axes[0].legend(fontsize=FONT_SIZE)
    if barriers:
        _percent_against_remaining(axes[1], barriers, "error barrier (percentage points)")
        axes[1].axhline(0.0, color="gray", linewidth=0.8)
        axes[1].set_title("instability of each level's network", fontsize=FONT_SIZE + 1)
        axes[1].legend(fontsize=FONT_SIZE)
    return figure


def _percent_against_remaining(axis, curves: Mapping[str, list[tuple[float, float]]], ylabel: str) -> None:
    """Each curve's values in percent against the weights remaining in percent (log x axis, decreasing)."""
    for label, points in curves.items():
        points = [(r, _finite_or_nan(v)) for r, v in points if r > 0]
        axis.plot([100 * r for r, _ in points], [100 * v for _, v in points], "o-", label=label)
    axis.set_xscale("log")
    axis.invert_xaxis()
    axis.set_xlabel("weights remaining (%)")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)


def epochwise_figure(history: list[dict], interpolation_epoch: int | None, peaks: Sequence) -> Figure:
    """Train errors (all, clean, noisy) and test error against the epoch, the interpolation epoch and the
    test-error peaks marked (DoubleDescentProbe's ``dd/curves``).

    Args:
        history: one ``{"epoch", "train_error", "train_error_clean", "train_error_noisy", "test_error"}`` per
            measurement (missing keys are not drawn).
        interpolation_epoch: drawn as a vertical line; None draws none.
        peaks: objects with ``position`` (epoch) and ``value``, annotated.

    Returns:
        The figure.
    """
    epochs = [h["epoch"] for h in history]
    figure, axis = new_figure(6, 4)
    for key, style in (("train_error", "-"), ("train_error_clean", "--"), ("train_error_noisy", ":")):
        axis.plot(epochs, [h.get(key, math.nan) for h in history], style, label=key)
    axis.plot(epochs, [h.get("test_error", math.nan) for h in history], "o-", label="test_error")
    if interpolation_epoch is not None:
        axis.axvline(interpolation_epoch, color="grey", linestyle="--", label="interpolation")
    for peak in peaks:
        axis.annotate("peak", (peak.position, peak.value), textcoords="offset points", xytext=(0, 8))
    axis.set_xlabel("epoch")
    axis.set_ylabel("error")
    axis.legend(fontsize=FONT_SIZE)
    return figure


def error_along_path_figure(record: dict, title: str) -> Figure:
    """Train and test error against alpha along a linear path (LinearModeConnectivity's ``lmc/error_along_path``).

    Args:
        record: ``{"alphas": [...], "train_error": [...], "test_error": [...]}`` (either error may be missing).
        title: the figure's title.

    Returns:
        The figure.
    """
    figure, axis = new_figure(5, 3.5)
    alphas = record["alphas"]
    for split, style in (("train", "--"), ("test", "-")):
        if f"{split}_error" in record:
            values = [_finite_or_nan(v) for v in record[f"{split}_error"]]
            axis.plot(alphas, values, style + "o", markersize=3, label=f"{split} error")
    axis.set_xlabel("alpha")
    axis.set_ylabel("error")
    axis.set_title(title, fontsize=FONT_SIZE)
    axis.legend(fontsize=FONT_SIZE)
    return figure


def stability_figure(results: dict, threshold: float) -> Figure:
    """Error barriers against the spawn step k, with the stability threshold (``lmc/stability``).

    Args:
        results: ``{k: {"train_error_barrier": ..., "test_error_barrier": ...}}``.
        threshold: the barrier under which a network counts as stable.

    Returns:
        The figure.
    """
    figure, axis = new_figure(5, 3.5)
    steps = sorted(results)
    for split, style in (("train", "--"), ("test", "-")):
        name = f"{split}_error_barrier"
        if all(name in results[k] for k in steps):
            axis.plot(steps, [_finite_or_nan(results[k][name]) for k in steps], style + "o", label=name)
    axis.axhline(threshold, color="grey", linestyle=":", label=f"threshold {threshold:g}")
    positive = [k for k in steps if k > 0]
    if len(positive) > 1 and max(positive) > 10 * min(positive):  # spawn steps spread over decades
        axis.set_xscale("symlog", linthresh=min(positive))
    axis.set_xlabel("spawn step k")
    axis.set_ylabel("error barrier")
    axis.legend(fontsize=FONT_SIZE)
    return figure
