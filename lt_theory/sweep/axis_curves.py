r"""The curves of a sweep over any axes: test error and the callbacks' final scalars against each axis, one
curve per value of the other axes.

Each axis is read from the runs' records (``axes: {key: value}``; a record of the old format, with only
``width``, has the one axis ``width``) and takes one of four kinds, from what changes along it:

- **width**: the parameter count changes (``model.net.init_args.k``, ``hidden``, ...): the model-wise curve
  of :func:`lt_theory.sweep.curve.model_wise_curve` (interpolation threshold, peaks, bias-variance, verdict);
- **train_size**: the number of training examples changes (``data.init_args.num_train``): the sample-wise
  curve of Nakkiran et al. (2019, "Deep Double Descent", section 6), drawn against the number of examples, with
  the effective model complexity :math:`\mathrm{EMC}_\varepsilon` (the largest tested size whose mean train
  error is at most :math:`\varepsilon`, :func:`lt_theory.measures.risk.effective_model_complexity`);
- **seed**: ``seed_everything``: replicates, averaged like the splits, never drawn;
- **value**: anything else (``data.init_args.label_noise``, ``model.lr``, ...).

Every callback scalar a run recorded (``ntk/relative_change``, ...) is averaged per point too, and its
least-squares slope on log-log axes, :math:`\hat b` of :math:`\log y = a + b \log x`, is reported when the
axis is numeric (``ntk/relative_change`` against width: the lazy regime predicts :math:`b \approx -1/2` for
the NTK's relative change, Lee et al. 2019).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lt_theory.measures.risk import Peak, effective_model_complexity, find_peaks
from lt_theory.sweep.curve import (
    _CURVE_METRICS,
    ModelWiseCurve,
    _mean,
    _test_error_noise_level,
    model_wise_curve,
)
from lt_theory.sweep.tasks import short_names

SEED_KEY = "seed_everything"


@dataclass
class SweepCurve:
    """One curve: the runs whose other axes have the values ``fixed``, against the values of ``axis``."""

    axis: str
    """The config key on the x axis."""
    kind: str
    """``width``, ``train_size`` or ``value`` (see the module docstring)."""
    label: str
    """Its name in tags: ``width``, ``train_size``, or the key's short name."""
    fixed: dict[str, Any]
    """The values of the other drawn axes along this curve (empty for a sweep of one axis)."""
    values: list
    """The axis values, increasing when numeric."""
    positions: list[float]
    """Where each point is drawn: the value, the number of training examples (``train_size``), or its index."""
    steps: list[int]
    """The TensorBoard step of each point: the position when it is an int, else the index."""
    num_parameters: list[int | None]
    train_sizes: list[int | None]
    runs: list[int]
    """Runs averaged at each point (seeds, splits)."""
    metrics: dict[str, list[float]]
    """``train_error``, ``test_error``, ... per point: the mean over its runs."""
    scalars: dict[str, list[float]]
    """Each callback scalar (``ntk/relative_change``, ...) per point: the mean of the runs' final values."""
    slopes: dict[str, float]
    """Least-squares slope of each scalar on log-log axes (NaN with fewer than two positive points)."""
    peaks: list[Peak]
    """Test-error peaks (:func:`lt_theory.measures.risk.find_peaks`, the standard error as noise floor)."""
    emc: int | None = None
    """``train_size`` curves: the effective model complexity at ``epsilon``."""
    model_wise: ModelWiseCurve | None = None
    """``width`` curves with int values: the model-wise curve (threshold, peaks, bias-variance, verdict)."""
    verdict: str = ""

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        out = dict(self.__dict__)
        out["peaks"] = [peak._asdict() for peak in self.peaks]
        out["model_wise"] = None if self.model_wise is None else self.model_wise.as_dict()
        return out


@dataclass
class SweepAggregate:
    """Every curve of a sweep (see :func:`sweep_curves`)."""

    axes: list[str]
    kinds: dict[str, str]
    labels: dict[str, str]
    epsilon: float
    curves: list[SweepCurve] = field(default_factory=list)

    @property
    def model_wise(self) -> ModelWiseCurve | None:
        """The model-wise curve of a sweep over one width axis (replicates aside), else None."""
        drawn = [c for c in self.curves if not c.fixed]
        return drawn[0].model_wise if len(self.curves) == 1 and drawn else None

    def curve(self, axis: str, **fixed: Any) -> SweepCurve:
        """The curve against ``axis`` (a key or a label) whose other axes take the values ``fixed``
        (given by short name or key).

        Args:
            axis: the axis on the x axis: its key (``model.net.init_args.k``) or label (``width``).
            fixed: the values of the other axes, by short name or key (``label_noise=0.2``).

        Returns:
            The :class:`SweepCurve`.

        Raises:
            KeyError: when there is no such curve.
        """
        names = short_names(self.axes)
        for curve in self.curves:
            given = {names.get(k, k): v for k, v in curve.fixed.items()}
            if axis in (curve.axis, curve.label) and all(
                given.get(k, curve.fixed.get(k)) == v for k, v in fixed.items()
            ):
                return curve
        raise KeyError(f"no curve against {axis!r} with {fixed}")

    def as_dict(self) -> dict:
        """A JSON-ready dict, with ``model_wise`` at the top for a sweep of one width axis."""
        out = {k: v for k, v in self.__dict__.items() if k != "curves"}
        out["curves"] = [curve.as_dict() for curve in self.curves]
        out["model_wise"] = None if self.model_wise is None else self.model_wise.as_dict()
        return out


def run_axes(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's axis values (``{"width": w}`` for a record of the old format).

    Args:
        record: a run record (``result.json``).

    Returns:
        ``{axis key: value}``.

    Raises:
        ValueError: for a record with neither ``axes`` nor ``width``, or without ``metrics.test_error``.
    """
    if "test_error" not in record.get("metrics", {}) or not ("axes" in record or "width" in record):
        raise ValueError(
            f"a run record needs `axes` (or `width`) and `metrics.test_error`, got {dict(record)}"
        )
    return dict(record["axes"]) if "axes" in record else {"width": record["width"]}


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _changes_along(records: Sequence[Mapping], axes: Sequence[dict], key: str, name: str) -> bool:
    """Whether ``record[name]`` takes different values for different values of ``key``, the others fixed."""
    groups: dict[str, dict[str, set]] = {}
    for record, values in zip(records, axes):
        others = _key({k: v for k, v in values.items() if k != key})
        groups.setdefault(others, {}).setdefault(_key(values[key]), set()).add(record.get(name))
    for by_value in groups.values():
        seen = {x for xs in by_value.values() for x in xs if x is not None}
        if len(by_value) > 1 and len(seen) > 1:
            return True
    return False


def axis_kinds(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The kind of each axis of the records (module docstring), in the order of the first record's axes.

    Args:
        records: the run records (see :func:`run_axes`).

    Returns:
        ``{axis key: "width" | "train_size" | "seed" | "value"}``.
    """
    axes = [run_axes(r) for r in records]
    keys = list(dict.fromkeys(k for values in axes for k in values))
    kinds = {}
    for key in keys:
        if key == SEED_KEY:
            kinds[key] = "seed"
        elif (key == "width" and "axes" not in records[0]) or _changes_along(
            records, axes, key, "num_parameters"
        ):
            kinds[key] = "width"
        elif _changes_along(records, axes, key, "train_size"):
            kinds[key] = "train_size"
        else:
            kinds[key] = "value"
    return kinds


def axis_labels(kinds: Mapping[str, str]) -> dict[str, str]:
    """Tag names of the axes: ``width`` and ``train_size`` for the one axis of that kind, else short names.

    Args:
        kinds: ``{axis key: kind}`` (:func:`axis_kinds`).

    Returns:
        ``{axis key: label}``.
    """
    names = short_names(list(kinds))
    counts = {kind: list(kinds.values()).count(kind) for kind in kinds.values()}
    return {
        key: kind if kind in ("width", "train_size") and counts[kind] == 1 else names[key]
        for key, kind in kinds.items()
    }


def loglog_slope(positions: Sequence[float], values: Sequence[float]) -> float:
    r"""The least-squares slope :math:`b` of :math:`\log y = a + b \log x` over the points with
    :math:`x, y > 0` finite (``numpy.polyfit`` of degree 1 on the logarithms).

    Args:
        positions: the x values (widths, sizes).
        values: the y values, one per position.

    Returns:
        The slope, or NaN with fewer than two such points (or one ``x``).

    Example:
        >>> round(loglog_slope([1, 2, 4, 8], [1.0, 0.5, 0.25, 0.125]), 12)
        -1.0
    """
    points = [
        (math.log(x), math.log(y))
        for x, y in zip(positions, values)
        if isinstance(x, (int, float))
        and isinstance(y, (int, float))
        and math.isfinite(x)
        and math.isfinite(y)
        and x > 0
        and y > 0
    ]
    if len({x for x, _ in points}) < 2:
        return math.nan
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _one(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def sweep_curves(
    results: Sequence[Mapping[str, Any]],
    epsilon: float = 0.01,
    smoothing: str | None = None,
    window: int = 3,
    load_predictions: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor] | None] | None = None,
) -> SweepAggregate:
    """Every curve of a sweep: against each axis other than ``seed_everything``, one per value of the others.

    Args:
        results: the run records (``result.json``).
        epsilon: the train error at or below which a run interpolates (threshold and EMC), in [0, 1).
        smoothing, window: passed to :func:`lt_theory.measures.risk.find_peaks`.
        load_predictions: reads a run's test predictions, for the bias-variance decomposition of width curves.

    Returns:
        :class:`SweepAggregate`.

    Raises:
        ValueError: for no records, a record without axes or ``metrics.test_error``, an ``epsilon`` outside
            [0, 1), or records that mix full-data and bias-variance runs (or numbers of splits).
    """
    if not results:
        raise ValueError("`results` is empty: no run of the sweep has finished (no result.json found)")
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < 1):
        raise ValueError(f"`epsilon` must be a number in [0, 1), got {epsilon!r}")
    splits = {(r.get("split") is None, r.get("num_splits")) for r in results}
    if len(splits) > 1:
        raise ValueError(
            "the runs mix full-data runs and bias-variance runs, or different numbers of splits "
            f"{sorted({k[1] for k in splits}, key=str)}: models trained on n and on n/m examples cannot be "
            "averaged; give each its own `--sweep.name`"
        )
    kinds = axis_kinds(results)
    labels = axis_labels(kinds)
    aggregate = SweepAggregate(list(kinds), kinds, labels, float(epsilon))
    drawn = [k for k in kinds if kinds[k] != "seed"]
    for axis in drawn:
        groups: dict[str, list] = {}
        for record in results:
            values = run_axes(record)
            fixed = {k: values.get(k) for k in drawn if k != axis}
            groups.setdefault(_key(fixed), [fixed, []])[1].append(record)
        for fixed, records in groups.values():
            aggregate.curves.append(
                _curve(
                    axis,
                    kinds[axis],
                    labels[axis],
                    fixed,
                    records,
                    epsilon,
                    smoothing,
                    window,
                    load_predictions,
                )
            )
    return aggregate


def _curve(axis, kind, label, fixed, records, epsilon, smoothing, window, load_predictions) -> SweepCurve:
    by_value: dict[str, list] = {}
    for record in records:
        value = run_axes(record)[axis]
        by_value.setdefault(_key(value), [value, []])[1].append(record)
    values = [v for v, _ in by_value.values()]
    if _numeric(values):
        values = sorted(values)
    runs = [by_value[_key(v)][1] for v in values]
    train_sizes = [_one({r.get("train_size") for r in rs}) for rs in runs]
    positions: list = list(values) if _numeric(values) else list(range(len(values)))
    if kind == "train_size" and all(isinstance(n, int) for n in train_sizes):
        positions = list(train_sizes)
    if not all(a < b for a, b in zip(positions, positions[1:])):
        positions = list(range(len(values)))  # drawn in the order of the values
    steps = [p if isinstance(p, int) and not isinstance(p, bool) else i for i, p in enumerate(positions)]
    metrics = {
        name: [_mean(r["metrics"].get(name, math.nan) for r in rs) for rs in runs]
        for name in _CURVE_METRICS
        if any(name in r["metrics"] for r in records)
    }
    tags = sorted({tag for r in records for tag in (r.get("final_scalars") or {})})
    scalars = {
        tag: [_mean((r.get("final_scalars") or {}).get(tag, math.nan) for r in rs) for rs in runs]
        for tag in tags
    }
    numeric = _numeric(positions) and _numeric(values)
    curve = SweepCurve(
        axis=axis,
        kind=kind,
        label=label,
        fixed=fixed,
        values=values,
        positions=positions,
        steps=steps,
        num_parameters=[_one({r.get("num_parameters") for r in rs}) for rs in runs],
        train_sizes=train_sizes,
        runs=[len(rs) for rs in runs],
        metrics=metrics,
        scalars=scalars,
        slopes={tag: loglog_slope(positions, ys) if numeric else math.nan for tag, ys in scalars.items()},
        peaks=[],
    )
    if kind == "width" and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        curve.model_wise = model_wise_curve(
            [{**r, "width": run_axes(r)[axis]} for r in records], epsilon, smoothing, window, load_predictions
        )
        curve.peaks, curve.verdict = curve.model_wise.peaks, curve.model_wise.verdict
    else:
        test = metrics["test_error"]
        noise = _test_error_noise_level(dict(zip(positions, runs)), positions, test)
        curve.peaks = find_peaks(test, positions, smoothing=smoothing, window=window, noise_level=noise)
        if kind == "train_size":
            curve.emc = _emc(records, epsilon)
        curve.verdict = _verdict(curve, epsilon)
    if fixed:
        curve.verdict = f"[{', '.join(f'{k}={v}' for k, v in fixed.items())}] " + curve.verdict
    return curve


def _emc(records: Sequence[Mapping[str, Any]], epsilon: float) -> int | None:
    usable = [r for r in records if r.get("train_size") and "train_error" in r["metrics"]]
    if not usable:
        return None
    return effective_model_complexity(
        [int(r["train_size"]) for r in usable], [float(r["metrics"]["train_error"]) for r in usable], epsilon
    )


def _verdict(curve: SweepCurve, epsilon: float) -> str:
    test, x = curve.metrics["test_error"], curve.positions
    unit = "n = " if curve.kind == "train_size" else f"{curve.label} = "
    shown = [
        f"{v:,}" if isinstance(v, int) else str(v)
        for v in (x if curve.kind == "train_size" else curve.values)
    ]
    finite = [i for i, e in enumerate(test) if math.isfinite(e)]
    if not finite:
        return f"Test error against {curve.label}: no finite value."
    best, worst = min(finite, key=lambda i: test[i]), max(finite, key=lambda i: test[i])
    what = "Sample-wise curve" if curve.kind == "train_size" else f"Test error against {curve.label}"
    parts = [
        f"{what} over {unit}{shown[0]}..{shown[-1]}: lowest test error {test[best]:.3g} at {unit}{shown[best]}, "
        f"highest {test[worst]:.3g} at {unit}{shown[worst]}."
    ]
    if curve.kind == "train_size":
        parts.append(
            f"Effective model complexity (largest n with mean train error <= {epsilon:g}): "
            + (
                f"n = {curve.emc:,}."
                if curve.emc is not None
                else f"none of the sizes tested (below n = {shown[0]})."
            )
        )
    for peak in curve.peaks:
        left, right = peak.left_base, peak.right_base
        more = "more data hurts" if curve.kind == "train_size" else "a larger value hurts"
        parts.append(
            f"Test-error peak at {unit}{peak.position:,} ({peak.value:.3g}): {more} from {left:,} to "
            f"{peak.position:,} and helps again up to {right:,}."
            if curve.kind == "train_size"
            else f"Test-error peak at {unit}{peak.position} ({peak.value:.3g}): {more} from {left} to {peak.position}."
        )
    if not curve.peaks and curve.kind == "train_size":
        parts.append("No test-error peak: more data does not hurt on this grid.")
    return " ".join(parts)
