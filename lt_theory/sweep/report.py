"""Aggregation: read the runs' results, log the curve, its figures and its summary to TensorBoard."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lt_theory import loggers
from lt_theory.figures import FONT_SIZE, new_figure
from lt_theory.sweep.curve import ModelWiseCurve, model_wise_curve
from lt_theory.sweep.run import RESULT_FILE
from lt_theory.training.stored import read_json, write_json

AGGREGATE_FILE = "aggregate.json"


AGGREGATE_DIR = "aggregate"


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
) -> ModelWiseCurve:
    """Read every run of a sweep folder, draw the model-wise curve into TensorBoard and say what it shows.

    Writes the TensorBoard run ``<logdir>/aggregate`` (replacing an earlier one; tags in the module
    docstring) and ``<logdir>/aggregate/aggregate.json`` (the curve), and prints the curve and the verdict.

    Args:
        logdir: the sweep folder (``<run --logdir>/<run --name>``), holding one folder per run.
        epsilon: the train error at or below which a width interpolates.
        smoothing, window: passed to :func:`lt_theory.measures.risk.find_peaks`.

    Returns:
        The :class:`ModelWiseCurve`.

    Raises:
        ValueError: if ``logdir`` is not a folder or holds no finished run (see :func:`model_wise_curve`).
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
            f"folder, <run --logdir>/<run --name>{hint}"
        )
    curve = model_wise_curve(results, epsilon, smoothing, window, load_predictions=_load_predictions)
    out = directory / AGGREGATE_DIR
    if out.is_dir():
        for old in out.glob("events.out.tfevents.*"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _log_curve(curve, directory)
    write_json(out / AGGREGATE_FILE, curve.as_dict())
    print(_table(curve))
    print(curve.verdict)
    return curve


def _log_curve(curve: ModelWiseCurve, directory: Path) -> None:
    logger = TensorBoardLogger(
        save_dir=str(directory), name="", version=AGGREGATE_DIR, default_hp_metric=False
    )
    trainer = Trainer(
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    series = {**curve.metrics, **curve.bias_variance}
    for i, (width, params) in enumerate(zip(curve.widths, curve.num_parameters)):
        loggers.log_scalars(
            trainer, {f"dd/{name}_by_width": values[i] for name, values in series.items()}, width
        )
        by_params = {
            f"dd/{name}_by_params": curve.metrics[name][i]
            for name in ("train_error", "test_error")
            if name in curve.metrics
        }
        loggers.log_scalars(trainer, {k: v for k, v in by_params.items()}, params)
    for peak in curve.peaks:
        loggers.log_scalars(
            trainer, {"dd/peak_width": peak.position, "dd/peak_test_error": peak.value}, peak.position
        )
    if curve.interpolation_width is not None:
        loggers.log_scalars(
            trainer, {"dd/interpolation_width": curve.interpolation_width}, curve.interpolation_width
        )
    charts = {
        "Model-wise: error by width": ["dd/train_error_by_width", "dd/test_error_by_width"],
        "Model-wise: error by parameter count": ["dd/train_error_by_params", "dd/test_error_by_params"],
    }
    if curve.bias_variance:
        charts["Bias-variance by width (cross-entropy)"] = [
            "dd/bias_squared_by_width",
            "dd/variance_by_width",
            "dd/risk_by_width",
        ]
        charts["Bias-variance by width (squared error)"] = [
            "dd/mse_bias_squared_by_width",
            "dd/mse_variance_by_width",
            "dd/mse_risk_by_width",
        ]
    loggers.add_custom_scalar_charts(trainer, "dd sweep", charts)
    loggers.log_figure(trainer, "dd/modelwise_curve", _curve_figure(curve), step=0)
    if curve.bias_variance:
        loggers.log_figure(trainer, "dd/bias_variance", _bias_variance_figure(curve), step=0)
    loggers.log_text(
        trainer, "dd/modelwise_summary", curve.verdict + "\n\n" + _table(curve, markdown=True), step=0
    )
    logger.save()
    logger.finalize("success")


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


def _table(curve: ModelWiseCurve, markdown: bool = False) -> str:
    names = list(curve.metrics) + list(curve.bias_variance)
    header = ["width", "parameters", "runs", *names]
    rows = [
        [str(w), f"{p:,}", str(r), *(f"{(curve.metrics | curve.bias_variance)[n][i]:.4f}" for n in names)]
        for i, (w, p, r) in enumerate(zip(curve.widths, curve.num_parameters, curve.runs))
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(x.rjust(n) for x, n in zip(line, widths)) for line in [header, *rows])
