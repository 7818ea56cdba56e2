"""The figures module: no pyplot (a notebook's backend is never switched), legible figures, exact pixels."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from matplotlib.text import Text

from lt_theory.figures import (
    DPI,
    FONT_SIZE,
    accuracy_vs_remaining_figure,
    epochwise_figure,
    error_along_path_figure,
    new_figure,
    render_rgb,
    stability_figure,
)


@pytest.mark.parametrize("how", ["environment", "matplotlib.use"])
def test_importing_the_package_keeps_the_users_backend(how):
    """A notebook's backend stays what the user chose (the package draws on its own Agg canvases)."""
    code = (
        "import matplotlib\n"
        + ("matplotlib.use('svg')\n" if how == "matplotlib.use" else "")
        + "import lt_theory, lt_theory.sweep, lt_theory.callbacks.imp, lt_theory.callbacks.lmc, lt_theory.figures\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    )
    environment = dict(os.environ, MPLBACKEND="svg") if how == "environment" else dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


FIGURES = {
    "imp": lambda: accuracy_vs_remaining_figure({"IMP": [(1.0, 0.9), (0.8, 0.91)], "reinit": [(1.0, 0.9)]}, 0.9),
    "dd": lambda: epochwise_figure(
        [{"epoch": e, "train_error": 0.5 / e, "test_error": 0.4} for e in (1, 2, 3)],
        2,
        [SimpleNamespace(position=2, value=0.4)],
    ),
    "path": lambda: error_along_path_figure(
        {"alphas": [0, 0.5, 1], "train_error": [0.1, 0.3, 0.1], "test_error": [0.2, 0.4, 0.2]}, "parent vs sibling"
    ),
    "stability": lambda: stability_figure(
        {0: {"test_error_barrier": 0.3, "train_error_barrier": 0.2}, 100: {"test_error_barrier": 0.01}}, 0.02
    ),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_text_of_a_figure_is_at_least_the_legible_size(name):
    figure = FIGURES[name]()
    texts = [t for t in figure.findobj(Text) if t.get_text().strip()]
    assert texts
    small = {t.get_text(): t.get_fontsize() for t in texts if t.get_fontsize() < FONT_SIZE}
    assert not small, small
    image = render_rgb(figure)
    width, height = figure.get_size_inches() * DPI
    assert image.shape == (3, round(height), round(width)) and image.shape[2] <= 1100


def test_new_figure_has_the_asked_pixels_and_columns():
    figure, axes = new_figure(11, 4, ncols=2)
    assert len(axes) == 2
    assert render_rgb(figure).shape == (3, 400, 1100)
