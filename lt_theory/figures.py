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

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DPI", "FONT_SIZE", "new_figure", "render_rgb"]

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
