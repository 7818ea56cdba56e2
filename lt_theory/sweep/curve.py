"""The model-wise curve: means per width, interpolation threshold, peaks, bias-variance, the verdict."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lt_theory.measures.risk import (
    Peak,
    cross_entropy_bias_variance,
    find_peaks,
    interpolation_threshold,
    mse_bias_variance,
)

_CURVE_METRICS = (
    "train_error",
    "test_error",
    "test_loss",
    "train_error_clean",
    "train_error_noisy",
    "memorized_fraction",
)


@dataclass
class ModelWiseCurve:
    """The model-wise curve of a sweep and what it says (see :func:`model_wise_curve`)."""

    widths: list[int]
    """The widths, increasing."""
    num_parameters: list[int]
    """Parameter count of each width."""
    metrics: dict[str, list[float]]
    """``train_error``, ``test_error``, ``test_loss``, ... per width: the mean over that width's runs."""
    runs: list[int]
    """Number of runs averaged at each width."""
    epsilon: float
    """The train error at or below which a width counts as interpolating."""
    interpolation_width: int | None
    """The smallest width whose train error is at most ``epsilon``, or None."""
    peaks: list[Peak]
    """Peaks of the test error over the widths (:func:`lt_theory.measures.risk.find_peaks`)."""
    best_width: int
    """The width of lowest test error."""
    wider_helps: bool
    """Whether the widest model's test error is within two standard errors of the lowest."""
    tolerance: float
    """Those two standard errors (0.01 when the test-set size is unknown)."""
    verdict: str
    """A few sentences: the threshold, the peak, and whether wider helps or hurts."""
    bias_variance: dict[str, list[float]] = field(default_factory=dict)
    """``bias_squared``, ``variance``, ``risk`` (cross-entropy) and ``mse_*`` per width, bias-variance mode."""

    def as_dict(self) -> dict:
        """A JSON-ready dict (peaks as dicts)."""
        out = dict(self.__dict__)
        out["peaks"] = [peak._asdict() for peak in self.peaks]
        return out


def model_wise_curve(
    results: Sequence[Mapping[str, Any]],
    epsilon: float = 0.01,
    smoothing: str | None = None,
    window: int = 3,
    load_predictions: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor] | None] | None = None,
) -> ModelWiseCurve:
    """The model-wise curve of a sweep: its metrics per width, interpolation threshold, peaks and verdict.

    Each record is what a run wrote to ``result.json``: ``width``, ``num_parameters``, ``metrics``
    (``train_error``, ``test_error``, ...) and optionally ``num_test``, ``split``, ``num_splits``. Runs of the
    same width (splits, or seeds) are averaged. In the bias-variance mode, ``load_predictions(record)`` gives
    each run's ``{"logits": (N, C), "labels": (N,)}`` on the test set, and a width with all its ``num_splits``
    runs gets the decompositions.

    Args:
        results: the run records.
        epsilon: the train error at or below which a width interpolates, in [0, 1).
        smoothing, window: passed to :func:`lt_theory.measures.risk.find_peaks` (window counts widths). No
            smoothing by default: a width grid is coarse, a peak can be one width wide, and the detector's
            noise floor is the known standard error of the test error (``num_test`` in the records).
        load_predictions: reads a run's test predictions; None skips the bias-variance decomposition.

    Returns:
        :class:`ModelWiseCurve`.

    Raises:
        ValueError: for no records, a record without ``width`` / ``metrics.test_error``, runs of one width
            with different parameter counts, or runs at different label-noise rates.

    Example:
        >>> runs = [{"width": w, "num_parameters": 10 * w, "metrics": {"train_error": t, "test_error": e}}
        ...         for w, t, e in [(1, .5, .40), (2, .3, .30), (3, .1, .35), (4, 0., .45), (5, 0., .30),
        ...                         (6, 0., .25), (7, 0., .20)]]
        >>> curve = model_wise_curve(runs, smoothing=None)
        >>> curve.interpolation_width, [p.position for p in curve.peaks], curve.wider_helps
        (4, [4], True)
    """
    if not results:
        raise ValueError("`results` is empty: no run of the sweep has finished (no result.json found)")
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < 1):
        raise ValueError(f"`epsilon` must be a number in [0, 1), got {epsilon!r}")
    noise = {r.get("label_noise") for r in results}
    if len(noise) > 1:
        raise ValueError(
            f"the runs have different label-noise rates {sorted(noise, key=str)}: aggregate one rate at a time "
            "(give each rate its own `--sweep.name`, or make the rate an axis)"
        )
    kinds = {(r.get("split") is None, r.get("num_splits")) for r in results}
    if len(kinds) > 1:
        raise ValueError(
            "the runs mix full-data runs and bias-variance runs, or different numbers of splits "
            f"{sorted({k[1] for k in kinds}, key=str)}: models trained on n and on n/m examples cannot be averaged; "
            "give each its own `--sweep.name`"
        )
    by_width: dict[int, list[Mapping[str, Any]]] = {}
    for record in results:
        if "width" not in record or "test_error" not in record.get("metrics", {}):
            raise ValueError(f"a run record needs `width` and `metrics.test_error`, got {dict(record)}")
        by_width.setdefault(int(record["width"]), []).append(record)
    widths = sorted(by_width)
    num_parameters = []
    for width in widths:
        counts = {int(r.get("num_parameters", -1)) for r in by_width[width]}
        if len(counts) != 1:
            raise ValueError(f"the runs of width {width} have different parameter counts {sorted(counts)}")
        num_parameters.append(counts.pop())
    metrics: dict[str, list[float]] = {}
    for name in _CURVE_METRICS:
        if any(name in r["metrics"] for r in results):
            metrics[name] = [_mean(r["metrics"].get(name, math.nan) for r in by_width[w]) for w in widths]
    test = metrics["test_error"]
    train = metrics.get("train_error", [math.nan] * len(widths))
    threshold = interpolation_threshold(widths, train, epsilon)
    noise_level = _test_error_noise_level(by_width, widths, test)
    peaks = find_peaks(test, widths, smoothing=smoothing, window=window, noise_level=noise_level)
    finite = [i for i, e in enumerate(test) if math.isfinite(e)]
    best = min(finite, key=lambda i: test[i]) if finite else len(widths) - 1
    sizes = [r.get("num_test") for r in results if r.get("num_test")]
    tolerance = 0.01
    if sizes and math.isfinite(test[best]):
        e = min(max(test[best], 0.0), 1.0)
        tolerance = 2 * math.sqrt(max(e * (1 - e), 1e-12) / min(sizes))
    wider_helps = math.isfinite(test[-1]) and test[-1] <= test[best] + tolerance
    curve = ModelWiseCurve(
        widths=widths,
        num_parameters=num_parameters,
        metrics=metrics,
        runs=[len(by_width[w]) for w in widths],
        epsilon=float(epsilon),
        interpolation_width=threshold,
        peaks=peaks,
        best_width=widths[best],
        wider_helps=bool(wider_helps),
        tolerance=tolerance,
        verdict="",
    )
    if load_predictions is not None:
        curve.bias_variance = _bias_variance(by_width, widths, load_predictions)
    curve.verdict = _verdict(curve, results[0].get("label_noise"))
    return curve


def _test_error_noise_level(
    by_width: Mapping[int, Sequence[Mapping[str, Any]]], widths: Sequence[int], test: Sequence[float]
) -> float | None:
    r"""The standard deviation of one point of the mean test-error curve, for the peak detector.

    At each width, the larger of the binomial standard error of an error rate on ``num_test`` examples,
    :math:`\sqrt{e(1-e)/N}` (not divided by the number of runs: they share one test set), and the standard
    error of the mean of the runs' test errors when there are two or more; the largest over the widths.
    None when no run recorded ``num_test`` (then :func:`find_peaks` estimates the noise from the curve).
    """
    levels = []
    for width, error in zip(widths, test):
        runs = by_width[width]
        sizes = [r["num_test"] for r in runs if r.get("num_test")]
        if not sizes or not math.isfinite(error):
            continue
        e = min(max(error, 0.0), 1.0)
        level = math.sqrt(e * (1 - e) / min(sizes))  # the runs share the test set: its error does not average
        errors = [float(r["metrics"]["test_error"]) for r in runs]
        if len(errors) >= 2 and all(math.isfinite(x) for x in errors):
            level = max(level, statistics.stdev(errors) / math.sqrt(len(errors)))
        levels.append(level)
    return max(levels) if levels else None


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return math.fsum(values) / len(values) if values else math.nan


def _bias_variance(by_width, widths, load_predictions) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    names = ("bias_squared", "variance", "risk", "mse_bias_squared", "mse_variance", "mse_risk")
    for width in widths:
        runs = [r for r in by_width[width] if r.get("split") is not None]
        m = runs[0].get("num_splits") if runs else None
        if runs and sorted(r["split"] for r in runs) != list(range(m or 0)):
            missing = sorted(set(range(m or 0)) - {r["split"] for r in runs})
            warnings.warn(
                f"width {width}: the bias-variance decomposition needs the runs of all {m} splits; "
                f"split(s) {missing} have not finished (their SLURM tasks?): its bias and variance are NaN",
                UserWarning,
                stacklevel=2,
            )
        values = dict.fromkeys(names, math.nan)
        splits = sorted(r["split"] for r in runs)
        if m and splits == list(range(m)):
            predictions = [load_predictions(r) for r in sorted(runs, key=lambda r: r["split"])]
            if all(p is not None for p in predictions):
                labels = predictions[0]["labels"]
                if any(not torch.equal(p["labels"], labels) for p in predictions):
                    raise ValueError(f"the runs of width {width} were tested on different test sets")
                logits = torch.stack([p["logits"].double() for p in predictions])  # (m, N, C)
                ce = cross_entropy_bias_variance(logits, labels)
                mse = mse_bias_variance(torch.softmax(logits, dim=-1), labels)
                values = {
                    "bias_squared": float(ce.bias_squared),
                    "variance": float(ce.variance),
                    "risk": float(ce.risk),
                    "mse_bias_squared": float(mse.bias_squared),
                    "mse_variance": float(mse.variance),
                    "mse_risk": float(mse.risk),
                }
        for name in names:
            out.setdefault(name, []).append(values[name])
    if all(math.isnan(v) for v in out["risk"]):
        return {}
    return out


def _verdict(curve: ModelWiseCurve, label_noise) -> str:
    widths, test = curve.widths, curve.metrics["test_error"]
    index = {w: i for i, w in enumerate(widths)}
    noise = "" if label_noise is None else f", label noise {label_noise:g}"
    parts = [
        f"Model-wise curve over widths {widths[0]}..{widths[-1]} ({curve.num_parameters[0]:,} to "
        f"{curve.num_parameters[-1]:,} parameters{noise})."
    ]
    if curve.interpolation_width is None:
        parts.append(
            f"No width interpolates the training set (train error <= {curve.epsilon:g}): the interpolation "
            f"threshold lies beyond width {widths[-1]}."
        )
    else:
        k = curve.interpolation_width
        parts.append(
            f"Interpolation threshold: width {k} (train error <= {curve.epsilon:g} from width {k} on)."
        )
    for peak in curve.peaks:
        where = ""
        if curve.interpolation_width is not None:
            gap = index[peak.position] - index[curve.interpolation_width]
            where = (
                " at the interpolation threshold, as double descent predicts"
                if abs(gap) <= 1
                else f", {abs(gap)} grid steps {'below' if gap < 0 else 'above'} the interpolation threshold"
            )
        parts.append(
            f"Test-error peak at width {peak.position} (test error {peak.value:.3g}){where}: wider hurts from "
            f"width {peak.left_base} to {peak.position}, and helps again from {peak.position} to "
            f"{peak.right_base}."
        )
    if not curve.peaks:
        parts.append("No test-error peak: no model-wise double descent on this grid.")
    best, last = curve.best_width, widths[-1]
    if curve.wider_helps:
        parts.append(
            f"Wider helps here: the widest model (width {last}, test error {test[-1]:.3g}) is within "
            f"{curve.tolerance:.2g} of the lowest test error ({test[index[best]]:.3g} at width {best})."
        )
    else:
        parts.append(
            f"Wider hurts here: the test error rises from {test[index[best]]:.3g} at width {best} to "
            f"{test[-1]:.3g} at width {last} (more than {curve.tolerance:.2g})"
            + (
                "; the widest models sit near the interpolation threshold: go wider, past the peak, or narrower."
                if curve.interpolation_width is None
                or curve.interpolation_width >= widths[max(0, len(widths) - 3)]
                else "; extend the grid to see whether it descends again."
            )
        )
    return " ".join(parts)
