"""The sweep's aggregation: the model-wise machinery against theory (min-norm random features); what the
aggregation computes itself, on hand-written runs with known answers (means by width and by parameter count,
the interpolation threshold, the peak and its noise level, the verdict, the summary table, the figure, the
bias-variance decomposition by width against its definitions); the curves of any axes on hand-written records
(axis kinds, crossed axes, replicates, the effective model complexity, callback scalars and their log-log
slopes against numpy.polyfit). The config format is tested in test_sweep_config.py, trained sweeps in
test_sweep_run.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lt_theory.sweep.curve as sweep_curve
from lt_theory import loggers
from lt_theory.measures.risk import effective_model_complexity
from lt_theory.sweep import (
    AGGREGATE_DIR,
    AGGREGATE_FILE,
    RESULT_FILE,
    aggregate,
    axis_kinds,
    loglog_slope,
    model_wise_curve,
    sweep_curves,
)
from lt_theory.sweep.report import summary

# --------------------------------------------------------------------------------------------------------
# Theory: min-norm least squares on random ReLU features (Belkin, Hsu, Ma & Mandal, PNAS 2019)
# --------------------------------------------------------------------------------------------------------



def _random_features_runs(n: int, seeds: int = 4) -> list[dict]:
    """Test and train MSE of the min-norm least-squares fit on p random ReLU features, p swept through n.

    Data: x ~ N(0, I_10), y = <beta, x> + tanh(2 x_1) / 2 + 0.1 * noise, n >= 6 d so that the classical
    regime p < n has its descent. Features relu(W x / sqrt(d)) with W ~ N(0, 1)^{p x d}, fitted by
    torch.linalg.lstsq (gelsd: the minimum-norm solution when p > n), averaged over `seeds` draws of W. The
    theory: the variance term diverges at p = n, where the feature matrix is square and its smallest singular
    value goes to 0, and the test error falls again for p > n.
    """
    d, num_test = 10, 2000
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x_test = torch.randn(num_test, d, generator=generator, dtype=torch.float64)
    beta = torch.randn(d, generator=generator, dtype=torch.float64) / math.sqrt(d)

    def target(inputs):
        return inputs @ beta + 0.5 * torch.tanh(2 * inputs[:, 0])

    y = target(x) + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64)
    y_test = target(x_test)
    ratios = (
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        0.95,
        1.0,
        1.05,
        1.1,
        1.2,
        1.4,
        1.7,
        2,
        3,
        5,
        10,
        20,
    )
    runs = []
    for p in sorted({round(r * n) for r in ratios}):
        train_mse = test_mse = 0.0
        for seed in range(seeds):
            weights = torch.randn(
                p, d, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64
            )
            features = torch.relu(x @ weights.T / math.sqrt(d))
            test_features = torch.relu(x_test @ weights.T / math.sqrt(d))
            coefficients = torch.linalg.lstsq(features, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            train_mse += float((features @ coefficients - y).pow(2).mean()) / seeds
            test_mse += float((test_features @ coefficients - y_test).pow(2).mean()) / seeds
        runs.append(
            {"width": p, "num_parameters": p, "metrics": {"train_error": train_mse, "test_error": test_mse}}
        )
    return runs


def _write_runs(directory: Path, runs: list[dict]) -> None:
    for run in runs:
        folder = directory / f"width_{run['width']:04d}"
        folder.mkdir(parents=True)
        (folder / RESULT_FILE).write_text(json.dumps(run))


def test_lstsq_gives_the_minimum_norm_interpolant_above_the_threshold():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(10, 30, generator=generator, dtype=torch.float64)
    y = torch.randn(10, 1, generator=generator, dtype=torch.float64)
    solution = torch.linalg.lstsq(features, y, driver="gelsd").solution
    assert torch.allclose(solution, torch.linalg.pinv(features) @ y, atol=1e-12)


@pytest.mark.parametrize("n", [60, 120, 200])
def test_min_norm_random_features_peak_at_p_equal_n_through_the_aggregation(tmp_path, n):
    """The same aggregation code as a sweep: result.json files in, the peak and the threshold out."""
    _write_runs(tmp_path, _random_features_runs(n))
    curve = aggregate(tmp_path, epsilon=1e-8).model_wise
    assert curve.interpolation_width == n  # the first p whose training MSE is 0: p = n
    assert [peak.position for peak in curve.peaks] == [n]  # exactly one peak, at p = n
    test = dict(zip(curve.widths, curve.metrics["test_error"]))
    assert test[n] > 5 * max(test[curve.widths[0]], test[curve.widths[-1]])
    assert curve.peaks[0].left_base < n < curve.peaks[0].right_base == curve.widths[-1]
    assert curve.wider_helps  # the widest model is within the tolerance of the best
    assert "at the interpolation threshold, as double descent predicts" in curve.verdict
    assert "Wider helps here" in curve.verdict
    saved = json.loads((tmp_path / AGGREGATE_DIR / AGGREGATE_FILE).read_text())
    assert (
        saved["model_wise"]["peaks"][0]["position"] == n and saved["model_wise"]["interpolation_width"] == n
    )


# --------------------------------------------------------------------------------------------------------
# The verdict on hand-made curves
# --------------------------------------------------------------------------------------------------------


def _runs(test_errors, train_errors, num_test=None):
    return [
        {
            "width": w,
            "num_parameters": 100 * w,
            "num_test": num_test,
            "metrics": {"train_error": tr, "test_error": te},
        }
        for w, te, tr in zip(range(1, len(test_errors) + 1), test_errors, train_errors)
    ]


@pytest.mark.parametrize(("num_test", "found"), [(10_000, True), (500, False)])
def test_the_model_wise_peak_must_stand_out_of_the_test_sets_standard_error(num_test, found):
    # A 0.03 rise into width 48: 3.1 binomial standard errors sqrt(.47 x .53 / 10000) = 0.005 above the
    # floor 1.25 x sqrt(2 ln 10) x 0.005 = 0.0134 on 10,000 test points; within it on 500 (floor 0.060).
    test = [0.62, 0.49, 0.44, 0.457, 0.47, 0.451, 0.41, 0.37, 0.32, 0.30]
    widths = [8, 16, 24, 32, 48, 64, 96, 128, 256, 512]
    runs = [
        {"width": w, "num_parameters": 10 * w, "num_test": num_test, "metrics": {"test_error": e}}
        for w, e in zip(widths, test)
    ]
    curve = model_wise_curve(runs)
    assert [p.position for p in curve.peaks] == ([48] if found else [])
    # Two runs per width that disagree by 0.1: the standard error of their mean (0.05) is the floor.
    spread = [
        {**r, "metrics": {"test_error": r["metrics"]["test_error"] + d}} for r in runs for d in (-0.05, 0.05)
    ]
    assert model_wise_curve(spread).peaks == []


def test_a_curve_rising_at_the_top_of_the_grid_says_wider_hurts():
    curve = model_wise_curve(
        _runs([0.5, 0.4, 0.3, 0.25, 0.3, 0.4, 0.45], [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02], num_test=10_000)
    )
    assert curve.interpolation_width is None and curve.peaks == [] and not curve.wider_helps
    assert curve.best_width == 4
    assert curve.tolerance == pytest.approx(2 * math.sqrt(0.25 * 0.75 / 10_000))
    assert "Wider hurts here: the test error rises from 0.25 at width 4 to 0.45 at width 7" in curve.verdict
    assert "threshold lies beyond width 7" in curve.verdict


def test_a_monotone_curve_has_no_peak_and_wider_helps():
    curve = model_wise_curve(_runs([0.6, 0.5, 0.45, 0.4, 0.35, 0.3], [0.5, 0.3, 0.1, 0.0, 0.0, 0.0]))
    assert curve.interpolation_width == 4 and curve.peaks == [] and curve.wider_helps
    assert "No test-error peak" in curve.verdict and "Wider helps here" in curve.verdict


def test_runs_of_one_width_are_averaged_and_mixed_noise_rates_are_refused():
    runs = _runs([0.5, 0.4], [0.2, 0.1]) + _runs([0.3, 0.2], [0.0, 0.1])
    curve = model_wise_curve(runs)
    assert curve.runs == [2, 2]
    assert curve.metrics["test_error"] == pytest.approx([0.4, 0.3])
    assert curve.metrics["train_error"] == pytest.approx([0.1, 0.1])
    mixed = [dict(r, label_noise=0.1) for r in _runs([0.5], [0.1])] + [
        dict(r, label_noise=0.2) for r in _runs([0.5], [0.1])
    ]
    with pytest.raises(ValueError, match="different label-noise rates"):
        model_wise_curve(mixed)
    with pytest.raises(ValueError, match="empty"):
        model_wise_curve([])


# --------------------------------------------------------------------------------------------------------
# What the aggregation computes itself, on hand-written runs with known answers
# --------------------------------------------------------------------------------------------------------

# Two runs per width (train error, test error, test loss; None: not recorded). Means by hand: train 0.52,
# 0.28, 0.02, 0.01, 0, 0, 0 (width 4 has one interpolating run, but its mean 0.02 is above epsilon = 0.01;
# width 8's mean is exactly 0.01: the threshold); test 0.41, 0.31, 0.27, 0.36, 0.29, 0.25, 0.215 (one peak,
# at width 8, from the valley at width 4 down to width 64).
_HAND_RUNS = {
    1: [(0.50, 0.40, 1.40), (0.54, 0.42, 1.44)],
    2: [(0.30, 0.32, 1.30), (0.26, 0.30, None)],
    4: [(0.00, 0.28, 1.20), (0.04, 0.26, 1.24)],
    8: [(0.00, 0.35, 1.50), (0.02, 0.37, 1.52)],
    16: [(0.00, 0.30, 1.10), (0.00, 0.28, 1.12)],
    32: [(0.00, 0.24, 1.00), (0.00, 0.26, 1.04)],
    64: [(0.00, 0.22, 0.90), (0.00, 0.21, 0.94)],
}
_HAND_MEANS = {
    "train_error": [0.52, 0.28, 0.02, 0.01, 0.0, 0.0, 0.0],
    "test_error": [0.41, 0.31, 0.27, 0.36, 0.29, 0.25, 0.215],
    "test_loss": [1.42, 1.30, 1.22, 1.51, 1.11, 1.02, 0.92],
}
_HAND_WIDTHS = sorted(_HAND_RUNS)
_HAND_PARAMS = [10 * w * w + 7 for w in _HAND_WIDTHS]  # 17, 47, 167, 647, ...: steps unlike the widths


def _write_hand_runs(directory: Path) -> None:
    for width, runs in _HAND_RUNS.items():
        for seed, (train, test, loss) in enumerate(runs):
            metrics = {"train_error": train, "test_error": test}
            if loss is not None:
                metrics["test_loss"] = loss
            folder = directory / f"width_{width:04d}_seed_{seed}"
            folder.mkdir(parents=True)
            record = {"width": width, "num_parameters": 10 * width * width + 7, "num_test": 10_000}
            (folder / RESULT_FILE).write_text(json.dumps({**record, "metrics": metrics}))


def _spy(monkeypatch, module, name: str) -> list:
    """Record every call of ``module.name`` (its arguments and the figure or curve it got) and let it run."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_aggregate_logs_hand_computed_means_threshold_and_peak_by_width_and_by_params(tmp_path, monkeypatch):
    _write_hand_runs(tmp_path)
    peak_calls = _spy(monkeypatch, sweep_curve, "find_peaks")
    figures = _spy(monkeypatch, loggers, "log_figure")
    curve = aggregate(tmp_path, epsilon=0.01).model_wise

    assert curve.widths == _HAND_WIDTHS and curve.num_parameters == _HAND_PARAMS and curve.runs == [2] * 7
    for name, means in _HAND_MEANS.items():
        assert curve.metrics[name] == pytest.approx(means, rel=1e-12, abs=1e-15), name
    assert curve.interpolation_width == 8
    [peak] = curve.peaks
    assert (peak.position, peak.value, peak.left_base, peak.right_base) == (8, pytest.approx(0.36), 4, 64)
    # noise floor: the standard error of the mean of two runs 0.02 apart, |a - b| / 2 = 0.01, is above every
    # binomial one (at most sqrt(0.41 x 0.59 / 10000) = 0.0049)
    [(_, kwargs)] = peak_calls
    assert kwargs["noise_level"] == pytest.approx(0.01, rel=1e-9)
    assert curve.best_width == 64 and curve.wider_helps
    assert curve.tolerance == pytest.approx(2 * math.sqrt(0.215 * 0.785 / 10_000), rel=1e-12)
    assert curve.verdict == (
        "Model-wise curve over widths 1..64 (17 to 40,967 parameters). Interpolation threshold: width 8 "
        "(train error <= 0.01 from width 8 on). Test-error peak at width 8 (test error 0.36) at the "
        "interpolation threshold, as double descent predicts: wider hurts from width 4 to 8, and helps again "
        "from 8 to 64. Wider helps here: the widest model (width 64, test error 0.215) is within 0.0082 of the "
        "lowest test error (0.215 at width 64)."
    )

    events = _events(tmp_path / AGGREGATE_DIR)
    for name, means in _HAND_MEANS.items():
        logged = [(e.step, e.value) for e in events.Scalars(f"dd/{name}_by_width")]
        assert logged == [(w, pytest.approx(m, abs=1e-7)) for w, m in zip(_HAND_WIDTHS, means)], name
    for name in ("train_error", "test_error"):
        logged = [(e.step, e.value) for e in events.Scalars(f"dd/{name}_by_params")]
        assert logged == [(p, pytest.approx(m, abs=1e-7)) for p, m in zip(_HAND_PARAMS, _HAND_MEANS[name])]
    assert [(e.step, e.value) for e in events.Scalars("dd/interpolation_width")] == [(8, 8.0)]
    assert [(e.step, e.value) for e in events.Scalars("dd/peak_width")] == [(8, 8.0)]
    assert [(e.step, e.value) for e in events.Scalars("dd/peak_test_error")] == [(8, pytest.approx(0.36))]
    (text,) = events.Tensors("dd/modelwise_summary/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| width | parameters | runs | train_error | test_error | test_loss |" in table
    assert "| 2 | 47 | 2 | 0.2800 | 0.3100 | 1.3000 |" in table  # the run without a test loss is skipped
    assert "| 8 | 647 | 2 | 0.0100 | 0.3600 | 1.5100 |" in table

    [(args, _)] = [(a, k) for a, k in figures if a[1] == "dd/modelwise_curve"]
    by_width, by_params = args[2].axes
    for axis, positions in ((by_width, _HAND_WIDTHS), (by_params, _HAND_PARAMS)):
        lines = {line.get_label(): line for line in axis.get_lines()}
        assert list(lines["test error"].get_xdata()) == positions
        assert list(lines["test error"].get_ydata()) == pytest.approx(_HAND_MEANS["test_error"])
        assert list(lines["train error"].get_ydata()) == pytest.approx(_HAND_MEANS["train_error"])
        at = positions[_HAND_WIDTHS.index(8)]
        assert list(lines["interpolation threshold"].get_xdata()) == [at, at]
        [annotation] = [child for child in axis.texts if child.get_text() == "peak"]
        assert tuple(annotation.xy) == (at, pytest.approx(0.36))


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        # one run per width and two at width 1 on test sets of 100 and 400: the largest binomial standard
        # error, sqrt(0.5 x 0.5 / 100) = 0.05 at width 1 (the smaller test set; runs sharing a test set do not
        # average its error away), beats sqrt(0.3 x 0.7 / 100) = 0.0458 at width 2
        ([(1, 0.5, 100), (1, 0.5, 400), (2, 0.3, 100), (3, 0.2, 100)], 0.05),
        # three runs at width 2: sample standard deviation 0.1 over sqrt(3) = 0.0577 beats sqrt(.21 / 10000)
        (
            [(1, 0.5, 10_000), (2, 0.2, 10_000), (2, 0.3, 10_000), (2, 0.4, 10_000), (3, 0.2, 10_000)],
            0.1 / 3**0.5,
        ),
    ],
)
def test_the_peak_detector_gets_the_standard_error_of_the_mean_test_error_as_noise_level(
    monkeypatch, runs, expected
):
    calls = _spy(monkeypatch, sweep_curve, "find_peaks")
    records = [
        {"width": w, "num_parameters": w, "num_test": n, "metrics": {"test_error": e}} for w, e, n in runs
    ]
    model_wise_curve(records)
    [(_, kwargs)] = calls
    assert kwargs["noise_level"] == pytest.approx(expected, rel=1e-12)


def test_bias_variance_by_width_assembles_each_widths_splits_and_leaves_incomplete_widths_nan(
    tmp_path, monkeypatch
):
    """Two splits at widths 2 and 4 with hand-made logits, one split at width 8; the decompositions by their
    definitions (Yang et al. 2020), computed here without the measures, logged and drawn per width."""
    labels = torch.tensor([0, 1, 2])
    logits = {
        (2, 0): [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        (2, 1): [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 1.0]],
        (4, 0): [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]],
        (4, 1): [[3.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 1.0, 3.0]],
        (8, 0): [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    }
    for (width, split), rows in logits.items():
        folder = tmp_path / f"width_{width:04d}_split_{split}"
        folder.mkdir()
        torch.save({"logits": torch.tensor(rows), "labels": labels}, folder / "test_predictions.pt")
        record = {"width": width, "num_parameters": width, "split": split, "num_splits": 2, "num_test": 3}
        record.update(metrics={"test_error": 0.1}, test_predictions="test_predictions.pt")
        (folder / RESULT_FILE).write_text(json.dumps(record))
    figures = _spy(monkeypatch, loggers, "log_figure")
    with pytest.warns(UserWarning, match=r"width 8: .* split\(s\) \[1\] have not finished"):
        curve = aggregate(tmp_path).model_wise

    expected: dict[str, list[float]] = {}
    for width in (2, 4):
        z = torch.tensor([logits[width, 0], logits[width, 1]], dtype=torch.float64)  # (2 models, 3 points, 3)
        p = z.exp() / z.exp().sum(dim=-1, keepdim=True)
        y = torch.eye(3, dtype=torch.float64)[labels]
        mse_variance = float(((p[0] - p[1]) ** 2).sum(dim=-1).mean() / 2)  # sum_j ||p_j - mean||^2 / (m - 1)
        mse_risk = float(((p - y) ** 2).sum(dim=-1).mean())
        geometric = (p[0] * p[1]).sqrt()
        geometric = geometric / geometric.sum(dim=-1, keepdim=True)
        risk = float(-(p.log() * y).sum(dim=-1).mean())
        bias = float(-(geometric.log() * y).sum(dim=-1).mean())
        variance = float((geometric * (geometric.log() - p.log())).sum(dim=-1).mean())
        values = {
            "bias_squared": bias,
            "variance": variance,
            "risk": risk,
            "mse_bias_squared": mse_risk - mse_variance,
            "mse_variance": mse_variance,
            "mse_risk": mse_risk,
        }
        for name, value in values.items():
            expected.setdefault(name, []).append(value)
    for name, (at_2, at_4) in expected.items():  # the widths differ: a value given to the wrong width shows
        assert abs(at_2 - at_4) > 0.02 and min(at_2, at_4) > 0, (name, at_2, at_4)
    events = _events(tmp_path / AGGREGATE_DIR)
    for name, values in expected.items():
        assert curve.bias_variance[name][:2] == pytest.approx(values, rel=1e-12), name
        assert math.isnan(curve.bias_variance[name][2]), name
        logged = [(e.step, e.value) for e in events.Scalars(f"dd/{name}_by_width")]
        assert logged[:2] == [
            (2, pytest.approx(values[0], rel=1e-6)),
            (4, pytest.approx(values[1], rel=1e-6)),
        ]
        assert logged[2][0] == 8 and math.isnan(logged[2][1])
    [(args, _)] = [(a, k) for a, k in figures if a[1] == "dd/bias_variance"]
    for axis, prefix in zip(args[2].axes, ("", "mse_")):
        for line in axis.get_lines():
            name = prefix + line.get_label()
            assert list(line.get_xdata()) == [2, 4, 8], name
            assert list(line.get_ydata())[:2] == pytest.approx(expected[name], rel=1e-12), name
            assert math.isnan(line.get_ydata()[2]), name
    assert sorted(line.get_label() for line in args[2].axes[1].get_lines()) == [
        "bias_squared",
        "risk",
        "variance",
    ]


def test_full_data_and_bias_variance_runs_are_not_averaged_together():
    plain = {"width": 2, "num_parameters": 20, "metrics": {"test_error": 0.3}}
    split = {**plain, "split": 0, "num_splits": 2}
    with pytest.raises(ValueError, match="cannot be averaged"):
        model_wise_curve([plain, split])
    with pytest.raises(ValueError, match="cannot be averaged"):
        model_wise_curve([{**split, "num_splits": 4}, split])


def test_a_partial_bias_variance_sweep_names_the_missing_splits():
    run = {"width": 2, "num_parameters": 20, "split": 0, "num_splits": 3, "metrics": {"test_error": 0.3}}
    with pytest.warns(UserWarning, match=r"split\(s\) \[1, 2\] have not finished"):
        curve = model_wise_curve([run], load_predictions=lambda record: None)
    assert curve.bias_variance == {}


def test_a_damaged_result_file_is_named_and_nothing_is_overwritten(tmp_path):
    _write_runs(tmp_path, [{"width": 2, "num_parameters": 10, "metrics": {"test_error": 0.5}}])
    damaged = tmp_path / "width_0002" / RESULT_FILE
    damaged.write_text('{"width": 2, "metr')  # a crash while another tool wrote it
    with pytest.raises(ValueError, match="width_0002/result.json"):
        aggregate(tmp_path)
    assert damaged.read_text() == '{"width": 2, "metr'
    assert not (tmp_path / AGGREGATE_DIR).exists()


def _events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


# --------------------------------------------------------------------------------------------------------
# Any axes, on hand-written records: kinds, crossed curves, replicates, EMC, callback scalars and slopes
# --------------------------------------------------------------------------------------------------------

WIDTH, SIZE, NOISE, SEED = (
    "model.net.init_args.k",
    "data.init_args.num_train",
    "data.init_args.label_noise",
    "seed_everything",
)

# Mean train error by (k, n) over two seeds, at epsilon = 0.01: k = 2 fits n <= 200 (the seeds 0.00 and 0.02
# at n = 200 average to 0.01), so its EMC is 200; k = 8 fits n <= 400 (EMC 400), and 800 is the first failure
# of both. Test errors peak where each k's EMC is (Nakkiran et al.'s sample-wise non-monotonicity).
_SAMPLE_TRAIN = {
    (2, 100): (0.0, 0.0),
    (2, 200): (0.0, 0.02),
    (2, 400): (0.10, 0.12),
    (2, 800): (0.30, 0.28),
    (8, 100): (0.0, 0.0),
    (8, 200): (0.0, 0.0),
    (8, 400): (0.01, 0.0),
    (8, 800): (0.06, 0.04),
}
_SAMPLE_TEST = {
    (2, 100): 0.50,
    (2, 200): 0.62,
    (2, 400): 0.45,
    (2, 800): 0.35,
    (8, 100): 0.40,
    (8, 200): 0.38,
    (8, 400): 0.47,
    (8, 800): 0.30,
}


def _sample_records() -> list[dict]:
    records = []
    for (k, n), train_errors in _SAMPLE_TRAIN.items():
        for seed, train in enumerate(train_errors):
            records.append(
                {
                    "axes": {WIDTH: k, SIZE: n, SEED: seed},
                    "num_parameters": 100 * k * k,
                    "train_size": n,
                    "num_test": 10_000,
                    "metrics": {"train_error": train, "test_error": _SAMPLE_TEST[k, n] + 0.001 * seed},
                }
            )
    return records


def _write_records(directory: Path, records: list[dict]) -> None:
    for i, record in enumerate(records):
        folder = directory / f"run_{i:03d}"
        folder.mkdir(parents=True)
        (folder / RESULT_FILE).write_text(json.dumps(record))


def test_a_training_set_size_axis_gives_the_sample_wise_curve_and_the_emc_by_hand(tmp_path):
    records = _sample_records()
    assert axis_kinds(records) == {WIDTH: "width", SIZE: "train_size", SEED: "seed"}
    _write_records(tmp_path, records)
    result = aggregate(tmp_path, epsilon=0.01)
    assert result.model_wise is None  # two drawn axes: one curve per value of the other
    events = _events(tmp_path / AGGREGATE_DIR)
    for k in (2, 8):
        stored = [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"run_*/{RESULT_FILE}"))]
        mine = [r for r in stored if r["axes"][WIDTH] == k]
        by_size: dict[int, list[float]] = {}
        for r in mine:
            by_size.setdefault(r["train_size"], []).append(r["metrics"]["train_error"])
        hand_emc = max(n for n, errors in by_size.items() if sum(errors) / len(errors) <= 0.01)
        assert hand_emc == {2: 200, 8: 400}[k]
        curve = result.curve("train_size", k=k)
        assert (curve.kind, curve.axis, curve.emc) == ("train_size", SIZE, hand_emc)
        assert curve.positions == [100, 200, 400, 800] and curve.runs == [2, 2, 2, 2]
        hand_test = [
            sum(r["metrics"]["test_error"] for r in mine if r["train_size"] == n) / 2 for n in by_size
        ]
        assert curve.metrics["test_error"] == pytest.approx(hand_test, rel=1e-12)
        assert f"n = {hand_emc}." in curve.verdict and f"[{WIDTH}={k}]" in curve.verdict
        assert [(e.step, e.value) for e in events.Scalars(f"dd/effective_model_complexity/k={k}")] == [
            (0, float(hand_emc))
        ]
        logged = [(e.step, e.value) for e in events.Scalars(f"dd/test_error_by_train_size/k={k}")]
        assert logged == [(n, pytest.approx(e, rel=1e-6)) for n, e in zip(curve.positions, hand_test)]
    [peak] = result.curve("train_size", k=8).peaks  # more data hurts from n = 200 to 400 at k = 8, its EMC
    assert (peak.position, peak.left_base, peak.right_base) == (400, 200, 800)
    # the model-wise curves at each n (seeds averaged): widths 2 and 8
    at_400 = result.curve("width", num_train=400)
    assert at_400.model_wise.widths == [2, 8] and at_400.model_wise.interpolation_width == 8
    assert "dd/modelwise_curve/num_train=400" in events.Tags()["images"]


def test_callback_scalars_against_width_and_their_loglog_slope_match_numpy_polyfit(tmp_path, monkeypatch):
    widths = [1, 2, 4, 8, 16]
    records = [
        {
            "axes": {WIDTH: k, SEED: seed},
            "num_parameters": 10 * k,
            "metrics": {"test_error": 0.3},
            "final_scalars": {
                "ntk/relative_change": 0.8 * k**-0.5 * (1.1 if seed else 0.95) * (1 + 0.05 * (k % 3)),
                "spectral/lipschitz_upper": 3.0 + k,
            },
        }
        for k in widths
        for seed in (0, 1)
    ]
    _write_records(tmp_path, records)
    figures = _spy(monkeypatch, loggers, "log_figure")
    result = aggregate(tmp_path)
    curve = result.curve("width")
    means = [
        sum(r["final_scalars"]["ntk/relative_change"] for r in records if r["axes"][WIDTH] == k) / 2
        for k in widths
    ]
    assert curve.scalars["ntk/relative_change"] == pytest.approx(means, rel=1e-12)
    expected = np.polyfit(np.log(widths), np.log(means), 1)[0]
    assert curve.slopes["ntk/relative_change"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-0.5, abs=0.05)
    assert abs(np.polyfit(widths, means, 1)[0] - expected) > 0.3  # a slope on linear axes would differ
    events = _events(tmp_path / AGGREGATE_DIR)
    logged = [(e.step, e.value) for e in events.Scalars("ntk/relative_change_by_width")]
    assert logged == [(k, pytest.approx(m, rel=1e-6)) for k, m in zip(widths, means)]
    [slope] = events.Scalars("ntk/relative_change_loglog_slope_by_width")
    assert (slope.step, slope.value) == (0, pytest.approx(expected, rel=1e-6))
    [(args, _)] = [(a, k) for a, k in figures if a[1] == "ntk/relative_change_by_width_loglog"]
    axis = args[2].axes[0]
    assert (axis.get_xscale(), axis.get_yscale()) == ("log", "log")
    points, fit = axis.get_lines()
    assert list(points.get_ydata()) == pytest.approx(means, rel=1e-12)
    assert np.polyfit(np.log(fit.get_xdata()), np.log(fit.get_ydata()), 1)[0] == pytest.approx(
        expected, rel=1e-9
    )
    assert f"ntk/relative_change: log-log slope {expected:.4f}" in summary(result)


def test_a_value_axis_crossed_with_width_gives_one_curve_per_value_of_the_other(tmp_path):
    errors = {(2, 0.1): 0.30, (2, 0.2): 0.40, (4, 0.1): 0.25, (4, 0.2): 0.45, (8, 0.1): 0.20, (8, 0.2): 0.35}
    records = [
        {
            "axes": {WIDTH: k, NOISE: p},
            "num_parameters": 10 * k,
            "label_noise": p,
            "train_size": 1000,
            "metrics": {"train_error": 0.0, "test_error": e},
        }
        for (k, p), e in errors.items()
    ]
    _write_records(tmp_path, records)
    result = aggregate(tmp_path)
    assert result.kinds == {WIDTH: "width", NOISE: "value"}
    assert result.labels == {WIDTH: "width", NOISE: "label_noise"}
    assert len(result.curves) == 2 + 3
    for p in (0.1, 0.2):
        curve = result.curve("width", label_noise=p)
        assert curve.model_wise.widths == [2, 4, 8]
        assert curve.metrics["test_error"] == [errors[k, p] for k in (2, 4, 8)]
    for k in (2, 4, 8):
        curve = result.curve(NOISE, k=k)
        assert (curve.values, curve.steps) == ([0.1, 0.2], [0, 1])  # a float axis is logged by index
        assert curve.metrics["test_error"] == [errors[k, 0.1], errors[k, 0.2]]
    events = _events(tmp_path / AGGREGATE_DIR)
    assert [e.step for e in events.Scalars("dd/test_error_by_width/label_noise=0.2")] == [2, 4, 8]
    logged = [(e.step, e.value) for e in events.Scalars("dd/test_error_by_label_noise/k=4")]
    assert logged == [(0, pytest.approx(0.25)), (1, pytest.approx(0.45))]
    assert {"dd/error_by_width", "dd/error_by_label_noise"} <= set(events.Tags()["images"])


def test_loglog_slope_keeps_positive_finite_points_and_needs_two_positions():
    assert loglog_slope([1, 10, 100], [2.0, 20.0, 200.0]) == pytest.approx(1.0, rel=1e-12)
    assert loglog_slope([0, 1, 10], [5.0, 2.0, 20.0]) == pytest.approx(1.0, rel=1e-12)  # x = 0 dropped
    assert loglog_slope([1, 10, 100], [2.0, -1.0, 200.0]) == pytest.approx(1.0, rel=1e-12)  # y < 0 dropped
    assert math.isnan(loglog_slope([3], [1.0])) and math.isnan(loglog_slope([2, 2], [1.0, 3.0]))


def test_the_emc_of_the_sweep_is_the_measures_own(tmp_path):
    records = _sample_records()
    result = sweep_curves(records, epsilon=0.05)
    for k in (2, 8):
        mine = [r for r in records if r["axes"][WIDTH] == k]
        sizes, train = [r["train_size"] for r in mine], [r["metrics"]["train_error"] for r in mine]
        assert result.curve("train_size", k=k).emc == effective_model_complexity(sizes, train, 0.05)
