"""Aggregation: read the runs' results, log every curve, its figures and its summary to TensorBoard.

Tags of the TensorBoard run ``<sweep>/aggregate``, for each curve against an axis whose tag name is
``<label>`` (``width``, ``train_size``, or the key's short name, e.g. ``label_noise``), with ``<suffix>`` empty
for a sweep of one axis and ``/<other>=<value>`` for each curve of a crossed sweep; the step of a point is the
width or number of examples (an int axis value), else the value's index:

- ``dd/<metric>_by_<label><suffix>``: the mean final ``train_error``, ``test_error``, ``test_loss``, ...;
- width axes: ``dd/<metric>_by_params<suffix>`` (step = parameter count), ``dd/interpolation_width``,
  ``dd/peak_width``, ``dd/peak_test_error`` (other labels: ``dd/interpolation_<label>``, ``dd/peak_<label>``,
  ``dd/peak_test_error_by_<label>``), the figures ``dd/modelwise_curve<suffix>`` and, with splits,
  ``dd/bias_variance<suffix>`` and ``dd/<bias-variance term>_by_<label><suffix>``; the text
  ``dd/modelwise_summary<suffix>``;
- training-set-size axes: ``dd/effective_model_complexity<suffix>`` (step 0);
- every callback scalar the runs recorded: ``<tag>_by_<label><suffix>`` (e.g. ``ntk/relative_change_by_width``)
  and its log-log least-squares slope ``<tag>_loglog_slope_by_<label><suffix>`` (step 0), with the figure
  ``<tag>_by_<label>_loglog`` (every curve of the axis, with its fitted line);
- the figure ``dd/error_by_<label>`` (train and test error, one line per curve; against a training-set size
  with each curve's EMC and test-error peaks marked) and the text ``dd/sweep_summary`` (every table and
  verdict).

Every figure is also written as a PNG file to ``<sweep>/aggregate/figures/``, named after its tag with each
``/`` as ``_`` (:func:`figure_filename`: ``dd/error_by_train_size`` in ``dd_error_by_train_size.png``), for a
paper or a README without TensorBoard.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lt_theory import loggers
from lt_theory.figures import DPI, FONT_SIZE, new_figure
from lt_theory.sweep.axis_curves import SweepAggregate, SweepCurve, sweep_curves
from lt_theory.sweep.curve import ModelWiseCurve
from lt_theory.sweep.progress import SWEEP_LOGGER
from lt_theory.sweep.run import RESULT_FILE
from lt_theory.sweep.tasks import short_names, value_text
from lt_theory.training.progress import info
from lt_theory.training.stored import read_json, write_json

AGGREGATE_FILE = "aggregate.json"


AGGREGATE_DIR = "aggregate"

FIGURES_DIR = "figures"
"""The folder of ``<sweep>/aggregate`` that holds each figure as a PNG file."""


def _read_results(directory: Path) -> list[dict]:
    results = []
    for path in sorted(directory.glob(f"*/{RESULT_FILE}")):
        if path.parent.name == AGGREGATE_DIR:
            continue
        record = read_json(path)
        record["_dir"] = str(path.parent)
        results.append(record)
    return results


def _load_predictions(record: Mapping[str, Any]) -> dict | None:
    if not record.get("test_predictions"):
        return None
    return torch.load(Path(record["_dir"]) / record["test_predictions"], map_location="cpu")


def aggregate(
    logdir: str | os.PathLike,
    epsilon: float = 0.01,
    smoothing: str | None = None,
    window: int = 3,
) -> SweepAggregate:
    """Read every run of a sweep folder, draw its curves into TensorBoard and say what they show.

    Writes the TensorBoard run ``<logdir>/aggregate`` (replacing an earlier one; tags in the module
    docstring), ``<logdir>/aggregate/aggregate.json`` and every figure as a PNG file in
    ``<logdir>/aggregate/figures/`` (:func:`figure_filename`; earlier PNG files there are removed), and logs
    the tables and verdicts on rank zero.
    A partial sweep (a job array with tasks still running or failed) is aggregated from the runs that ended.

    Args:
        logdir: the sweep folder (``<sweep.logdir>/<sweep.name>``), holding one folder per run.
        epsilon: the train error at or below which a run interpolates (threshold, EMC).
        smoothing, window: passed to :func:`lt_theory.measures.risk.find_peaks`.

    Returns:
        The :class:`~lt_theory.sweep.axis_curves.SweepAggregate` (``.model_wise`` for a sweep of one width axis).

    Raises:
        ValueError: if ``logdir`` is not a folder or holds no finished run (see
            :func:`~lt_theory.sweep.axis_curves.sweep_curves`).
    """
    directory = Path(logdir)
    if not directory.is_dir():
        raise ValueError(f"`logdir` must be the folder of a sweep, {str(directory)!r} is not a folder")
    results = _read_results(directory)
    if not results:
        sweeps = sorted(str(p.parent.parent) for p in directory.glob(f"*/*/{RESULT_FILE}"))
        hint = f"; the sweeps under it: {sorted(set(sweeps))}" if sweeps else ""
        raise ValueError(
            f"`logdir` {str(directory)!r} holds no finished run (no */{RESULT_FILE}): it must be the sweep's "
            f"folder, <sweep.logdir>/<sweep.name>{hint}"
        )
    result = sweep_curves(results, epsilon, smoothing, window, load_predictions=_load_predictions)
    out = directory / AGGREGATE_DIR
    if out.is_dir():
        for old in [*out.glob("events.out.tfevents.*"), *(out / FIGURES_DIR).glob("*.png")]:
            old.unlink()
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    _log(result, directory)
    write_json(out / AGGREGATE_FILE, result.as_dict())
    info(f"[sweep] {len(results)} runs aggregated into {out}\n" + summary(result), SWEEP_LOGGER)
    return result


def figure_filename(tag: str) -> str:
    """The PNG file name of a figure's tag: each ``/`` becomes ``_``, and any character other than letters,
    digits and ``._=,+-`` becomes ``_``.

    Args:
        tag: the figure's TensorBoard tag, e.g. ``dd/modelwise_curve/label_noise=0.2``.

    Returns:
        The file name, e.g. ``dd_modelwise_curve_label_noise=0.2.png``.

    Example:
        >>> figure_filename("ntk/relative_change_by_width_loglog")
        'ntk_relative_change_by_width_loglog.png'
    """
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", tag) + ".png"


def _log_figure(target: loggers.LoggerTarget, tag: str, figure, folder: Path) -> None:
    """Log ``figure`` at step 0 under ``tag`` and write it to ``folder`` as a PNG file (:func:`figure_filename`).

    The figure is drawn once before: a constrained layout can move by a pixel between the first and the second
    drawing (an annotation above the axes), and TensorBoard and the file must show the same pixels.
    """
    figure.canvas.draw()
    loggers.log_figure(target, tag, figure, step=0)
    path, count = folder / figure_filename(tag), 1
    while path.exists():  # another tag of this aggregation had the same file name (values differing in `[(`)
        count += 1
        path = folder / f"{figure_filename(tag)[: -len('.png')]}_{count}.png"
    if count > 1:
        info(f"[sweep] figure {tag} written to {path.name}: {figure_filename(tag)} holds another tag's", SWEEP_LOGGER)
    figure.savefig(path, dpi=DPI)


def _suffix(result: SweepAggregate, curve: SweepCurve) -> str:
    if not curve.fixed:
        return ""
    names = short_names(result.axes)
    return "/" + ",".join(f"{names[k]}={value_text(v)}" for k, v in curve.fixed.items())


def _log(result: SweepAggregate, directory: Path) -> None:
    logger = TensorBoardLogger(
        save_dir=str(directory), name="", version=AGGREGATE_DIR, default_hp_metric=False
    )
    target = loggers.LoggerTarget([logger])  # no Trainer (nor its cluster detection) just to write events
    folder = directory / AGGREGATE_DIR / FIGURES_DIR
    charts: dict[str, list[str]] = {}
    for curve in result.curves:
        suffix = _suffix(result, curve)
        if curve.model_wise is not None:
            _log_model_wise(target, curve.model_wise, curve.label, suffix, charts, folder)
        else:
            _log_points(target, curve, suffix, charts)
        _log_callback_scalars(target, curve, suffix, charts)
    for axis in dict.fromkeys(curve.axis for curve in result.curves):
        curves = [c for c in result.curves if c.axis == axis]
        label = curves[0].label
        _log_figure(target, f"dd/error_by_{label}", _error_figure(result, curves), folder)
        for tag in sorted({t for c in curves for t in c.scalars}):
            _log_figure(target, f"{tag}_by_{label}_loglog", _scalar_figure(result, curves, tag), folder)
    loggers.add_custom_scalar_charts(target, "dd sweep", charts)
    loggers.log_text(target, "dd/sweep_summary", summary(result, markdown=True), step=0)
    logger.save()
    logger.finalize("success")


def _peak_tags(label: str) -> tuple[str, str]:
    return (
        f"dd/peak_{label}",
        "dd/peak_test_error" if label == "width" else f"dd/peak_test_error_by_{label}",
    )


def _log_model_wise(
    target: loggers.LoggerTarget, curve: ModelWiseCurve, label: str, suffix: str, charts: dict, folder: Path
) -> None:
    series = {**curve.metrics, **curve.bias_variance}
    for i, (width, params) in enumerate(zip(curve.widths, curve.num_parameters)):
        loggers.log_scalars(target, {f"dd/{n}_by_{label}{suffix}": v[i] for n, v in series.items()}, width)
        by_params = {
            f"dd/{name}_by_params{suffix}": curve.metrics[name][i]
            for name in ("train_error", "test_error")
            if name in curve.metrics
        }
        loggers.log_scalars(target, by_params, params)
    position_tag, error_tag = _peak_tags(label)
    for peak in curve.peaks:
        loggers.log_scalars(
            target, {position_tag + suffix: peak.position, error_tag + suffix: peak.value}, peak.position
        )
    if curve.interpolation_width is not None:
        at = curve.interpolation_width
        loggers.log_scalars(target, {f"dd/interpolation_{label}{suffix}": at}, at)
    charts[f"Model-wise: error by {label}{suffix}"] = [
        f"dd/train_error_by_{label}{suffix}",
        f"dd/test_error_by_{label}{suffix}",
    ]
    charts[f"Model-wise: error by parameter count{suffix}"] = [
        f"dd/train_error_by_params{suffix}",
        f"dd/test_error_by_params{suffix}",
    ]
    if curve.bias_variance:
        for title, prefix in (("cross-entropy", ""), ("squared error", "mse_")):
            charts[f"Bias-variance by {label} ({title}){suffix}"] = [
                f"dd/{prefix}{name}_by_{label}{suffix}" for name in ("bias_squared", "variance", "risk")
            ]
    _log_figure(target, f"dd/modelwise_curve{suffix}", _curve_figure(curve), folder)
    if curve.bias_variance:
        _log_figure(target, f"dd/bias_variance{suffix}", _bias_variance_figure(curve), folder)
    loggers.log_text(
        target,
        f"dd/modelwise_summary{suffix}",
        curve.verdict + "\n\n" + _table(curve, markdown=True),
        step=0,
    )


def _log_points(target: loggers.LoggerTarget, curve: SweepCurve, suffix: str, charts: dict) -> None:
    label = curve.label
    for i, step in enumerate(curve.steps):
        loggers.log_scalars(
            target, {f"dd/{n}_by_{label}{suffix}": v[i] for n, v in curve.metrics.items()}, step
        )
    position_tag, error_tag = _peak_tags(label)
    for peak in curve.peaks:
        step = curve.steps[curve.positions.index(peak.position)]
        loggers.log_scalars(
            target, {position_tag + suffix: peak.position, error_tag + suffix: peak.value}, step
        )
    if curve.emc is not None:
        loggers.log_scalars(target, {f"dd/effective_model_complexity{suffix}": curve.emc}, 0)
    charts[f"Error by {label}{suffix}"] = [
        f"dd/train_error_by_{label}{suffix}",
        f"dd/test_error_by_{label}{suffix}",
    ]


def _log_callback_scalars(target: loggers.LoggerTarget, curve: SweepCurve, suffix: str, charts: dict) -> None:
    label = curve.label
    steps = curve.model_wise.widths if curve.model_wise is not None else curve.steps
    for i, step in enumerate(steps):
        loggers.log_scalars(target, {f"{t}_by_{label}{suffix}": v[i] for t, v in curve.scalars.items()}, step)
    slopes = {f"{t}_loglog_slope_by_{label}{suffix}": b for t, b in curve.slopes.items() if math.isfinite(b)}
    loggers.log_scalars(target, slopes, 0)
    for tag in curve.scalars:
        charts.setdefault(f"{tag} by {label}", []).append(f"{tag}_by_{label}{suffix}")


def _group_label(result: SweepAggregate, curve: SweepCurve) -> str:
    names = short_names(result.axes)
    return ", ".join(f"{names[k]}={value_text(v)}" for k, v in curve.fixed.items())


def _error_figure(result: SweepAggregate, curves: list[SweepCurve]):
    figure, axis = new_figure(7, 4)
    for curve in curves:
        group = _group_label(result, curve)
        test = axis.plot(
            curve.positions, curve.metrics["test_error"], "o-", label=f"test error {group}".strip()
        )
        color = test[0].get_color()
        if "train_error" in curve.metrics:
            axis.plot(curve.positions, curve.metrics["train_error"], "s--", color=color, alpha=0.6)
        if curve.emc is not None:
            axis.axvline(curve.emc, color=color, linestyle=":", label=f"EMC {group}".strip() + f" = {curve.emc:,}")
        for peak in curve.peaks:
            if peak.position in curve.positions:
                axis.annotate(
                    "peak", (peak.position, peak.value), textcoords="offset points", xytext=(0, 8), ha="center"
                )
    axis.margins(y=0.1)  # room for a peak's label inside the axes
    _x_axis(axis, curves[0])
    axis.set_ylabel("error (dashed: train)")
    axis.legend(fontsize=FONT_SIZE)
    return figure


def _x_axis(axis, curve: SweepCurve) -> None:
    names = {"train_size": "training examples", "width": f"width ({curve.axis.rsplit('.', 1)[-1]})"}
    axis.set_xlabel(names.get(curve.kind, curve.axis))
    if curve.kind in ("width", "train_size") and all(p > 0 for p in curve.positions):
        axis.set_xscale("log")
    if curve.positions == list(range(len(curve.values))) and curve.values != curve.positions:
        axis.set_xticks(curve.positions, [value_text(v) for v in curve.values])


def _scalar_figure(result: SweepAggregate, curves: list[SweepCurve], tag: str):
    figure, axis = new_figure(7, 4)
    for curve in curves:
        if tag not in curve.scalars:
            continue
        x, y = np.asarray(curve.positions, dtype=float), np.asarray(curve.scalars[tag], dtype=float)
        slope = curve.slopes.get(tag, math.nan)
        name = _group_label(result, curve)
        points = axis.plot(
            x, y, "o", label=f"{name} slope {slope:.3f}".strip() if math.isfinite(slope) else name
        )
        keep = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
        if math.isfinite(slope):
            intercept = np.mean(np.log(y[keep])) - slope * np.mean(np.log(x[keep]))
            axis.plot(x[keep], np.exp(intercept + slope * np.log(x[keep])), "-", color=points[0].get_color())
    _x_axis(axis, curves[0])
    if all(p > 0 for p in curves[0].positions):
        axis.set_xscale("log")
    if all(v > 0 for c in curves for v in c.scalars.get(tag, []) if math.isfinite(v)):
        axis.set_yscale("log")
    axis.set_ylabel(tag)
    axis.legend(fontsize=FONT_SIZE)
    return figure


def _curve_figure(curve: ModelWiseCurve):
    figure, axes = new_figure(11, 4, ncols=2)
    for axis, positions, label in (
        (axes[0], curve.widths, "width"),
        (axes[1], curve.num_parameters, "parameters"),
    ):
        axis.plot(positions, curve.metrics["test_error"], "o-", label="test error")
        if "train_error" in curve.metrics:
            axis.plot(positions, curve.metrics["train_error"], "s--", label="train error")
        if curve.interpolation_width is not None:
            at = positions[curve.widths.index(curve.interpolation_width)]
            axis.axvline(at, color="grey", linestyle=":", label="interpolation threshold")
        for peak in curve.peaks:
            at = positions[curve.widths.index(peak.position)]
            axis.annotate("peak", (at, peak.value), textcoords="offset points", xytext=(0, 8), ha="center")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("error")
        axis.legend(fontsize=FONT_SIZE)
    figure.suptitle("Model-wise double descent")
    return figure


def _bias_variance_figure(curve: ModelWiseCurve):
    figure, axes = new_figure(11, 4, ncols=2)
    for axis, prefix, title in ((axes[0], "", "cross-entropy"), (axes[1], "mse_", "squared error")):
        for name, style in (("risk", "o-"), ("bias_squared", "s--"), ("variance", "^:")):
            axis.plot(curve.widths, curve.bias_variance[prefix + name], style, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("width")
        axis.set_title(title)
        axis.legend(fontsize=FONT_SIZE)
    return figure


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(x.rjust(n) for x, n in zip(line, widths)) for line in [header, *rows])


def _table(curve: ModelWiseCurve, markdown: bool = False) -> str:
    names = list(curve.metrics) + list(curve.bias_variance)
    header = ["width", "parameters", "runs", *names]
    rows = [
        [str(w), f"{p:,}", str(r), *(f"{(curve.metrics | curve.bias_variance)[n][i]:.4f}" for n in names)]
        for i, (w, p, r) in enumerate(zip(curve.widths, curve.num_parameters, curve.runs))
    ]
    return _render(header, rows, markdown)


def _number(value: Any) -> str:
    return "" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _points_table(curve: SweepCurve, markdown: bool) -> str:
    names = list(curve.metrics) + list(curve.scalars)
    header = [curve.label, "parameters", "train size", "runs", *names]
    rows = [
        [value_text(v), _number(curve.num_parameters[i]), _number(curve.train_sizes[i]), str(curve.runs[i])]
        + [f"{(curve.metrics | curve.scalars)[n][i]:.4f}" for n in names]
        for i, v in enumerate(curve.values)
    ]
    return _render(header, rows, markdown)


def summary(result: SweepAggregate, markdown: bool = False) -> str:
    """Every curve's table and verdict, the EMC and the log-log slopes, as text (or markdown).

    Args:
        result: the aggregate.
        markdown: markdown tables and headings (TensorBoard's text panel) instead of aligned columns.

    Returns:
        The text.
    """
    names = short_names(result.axes)
    parts = []
    for curve in result.curves:
        title = f"Against {curve.axis}" + (f" ({_group_label(result, curve)})" if curve.fixed else "")
        slopes = [f"{tag}: log-log slope {b:.4f}" for tag, b in curve.slopes.items() if math.isfinite(b)]
        parts += [
            ("### " if markdown else "") + title,
            _points_table(curve, markdown),
            curve.verdict,
            *slopes,
        ]
    replicates = [names[k] for k, kind in result.kinds.items() if kind == "seed"]
    if replicates:
        parts.append(f"Runs of different {', '.join(replicates)} are averaged.")
    return "\n\n".join(parts) if markdown else "\n".join(parts)
