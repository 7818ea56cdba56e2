"""The width sweep: the model-wise machinery against theory (min-norm random features); what the aggregation
computes itself, on hand-written runs with known answers (means by width and by parameter count, the
interpolation threshold, the peak and its noise level, the verdict, the summary table, the figure, the
bias-variance decomposition by width against its definitions); the CLI on a tiny grid (hparams, final metrics
against a plain evaluation of the final models, the aggregated curve, the data module reused, a SLURM task
equal to its sequential run), the bias-variance mode, and bad inputs."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import lt_theory.data.datamodule as datamodule_module
import lt_theory.sweep.curve as sweep_curve
import lt_theory.sweep.run as sweep_run
from lt_theory import loggers
from lt_theory.measures.risk import cross_entropy_bias_variance, mse_bias_variance
from lt_theory.sweep import (
    AGGREGATE_DIR,
    AGGREGATE_FILE,
    RESULT_FILE,
    aggregate,
    build_model,
    check_splits,
    check_widths,
    main,
    model_wise_curve,
    sweep_tasks,
)

# --------------------------------------------------------------------------------------------------------
# Theory: min-norm least squares on random ReLU features (Belkin, Hsu, Ma & Mandal, PNAS 2019)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """LAPACK on one intra-op thread: on a busy 2-core machine, two threads waiting for each other made the
    least-squares fits 60 times slower (2 s -> 130 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def test_min_norm_random_features_peak_at_p_equal_n_through_the_aggregation(tmp_path, n, one_thread):
    """The same aggregation code as a sweep: result.json files in, the peak and the threshold out."""
    _write_runs(tmp_path, _random_features_runs(n))
    curve = aggregate(tmp_path, epsilon=1e-8)
    assert curve.interpolation_width == n  # the first p whose training MSE is 0: p = n
    assert [peak.position for peak in curve.peaks] == [n]  # exactly one peak, at p = n
    test = dict(zip(curve.widths, curve.metrics["test_error"]))
    assert test[n] > 5 * max(test[curve.widths[0]], test[curve.widths[-1]])
    assert curve.peaks[0].left_base < n < curve.peaks[0].right_base == curve.widths[-1]
    assert curve.wider_helps  # the widest model is within the tolerance of the best
    assert "at the interpolation threshold, as double descent predicts" in curve.verdict
    assert "Wider helps here" in curve.verdict
    saved = json.loads((tmp_path / AGGREGATE_DIR / AGGREGATE_FILE).read_text())
    assert saved["peaks"][0]["position"] == n and saved["interpolation_width"] == n


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
    curve = aggregate(tmp_path, epsilon=0.01)

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
        curve = aggregate(tmp_path)

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


# --------------------------------------------------------------------------------------------------------
# The CLI on a tiny grid
# --------------------------------------------------------------------------------------------------------

TINY = [
    "--model.class_path=lt_theory.models.MLP",
    "--model.width_arg=hidden",
    "--data=lt_theory.data.SyntheticCIFARDataModule",
    "--data.num_train=48",
    "--data.num_test=24",
    "--data.batch_size=16",
    "--data.label_noise=0.25",
    "--module.optimizer=adam",
    "--module.lr=0.01",
    "--module.schedule=constant",
    "--trainer.max_epochs=1",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=0",
    "--trainer.log_every_n_steps=1",
    "--name=tiny",
]


def _run(tmp_path, *extra):
    return main(["run", *TINY, f"--logdir={tmp_path}", *extra])


def _events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _hparams(accumulator: EventAccumulator) -> dict:
    content = accumulator.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in values.items()}


def _plain_final_metrics(data, model) -> dict[str, float]:
    """The final metrics of a run by a plain loop over the whole training set and the test set."""
    train, test = data.train_dataset, data.test_dataset
    noisy = torch.zeros(len(train.labels), dtype=torch.bool)
    noisy[train.noisy_indices] = True
    model.eval()
    with torch.no_grad():
        right = (model(data.preprocess(train.images)).argmax(dim=1) == train.labels).double()
        test_logits = model(data.preprocess(test.images)).double()
    return {
        "train_error": 1 - float(right.mean()),
        "train_error_clean": 1 - float(right[~noisy].mean()),
        "train_error_noisy": 1 - float(right[noisy].mean()),
        "memorized_fraction": float(right[noisy].mean()),
        "test_error": float((test_logits.argmax(dim=1) != test.labels).double().mean()),
        "test_loss": float(torch.nn.functional.cross_entropy(test_logits, test.labels)),
    }


def test_tiny_sweep_logs_hparams_and_final_metrics_and_aggregates_exactly_those(tmp_path, monkeypatch):
    generated = []
    original = datamodule_module.make_synthetic_cifar
    monkeypatch.setattr(
        datamodule_module,
        "make_synthetic_cifar",
        lambda *a, **k: generated.append(a) or original(*a, **k),
    )
    finals = {}  # width -> (the data module, a copy of the final model), taken as the sweep logs its hparams
    log_final = sweep_run._FinalHyperparameters.on_fit_end

    def keep_final_model(self, trainer, pl_module):
        finals[self.params["width"]] = (trainer.datamodule, copy.deepcopy(pl_module))
        return log_final(self, trainer, pl_module)

    monkeypatch.setattr(sweep_run._FinalHyperparameters, "on_fit_end", keep_final_model)
    curve = _run(
        tmp_path, "--widths=[4, 2]", "--seed=3", "--trainer.max_epochs=2", "--probe.every_n_epochs=1"
    )
    assert len(generated) == 1  # one data module for the whole sweep
    expected = {width: _plain_final_metrics(*finals[width]) for width in (2, 4)}
    sweep = tmp_path / "tiny"
    results = {w: json.loads((sweep / f"width_{w:04d}" / RESULT_FILE).read_text()) for w in (2, 4)}
    for width, result in results.items():
        events = _events(sweep / f"width_{width:04d}")
        expected_parameters = 3 * 32 * 32 * width + width + 10 * width + 10  # MLP((3, 32, 32), (w,))
        assert _hparams(events) == {
            "width": width,
            "seed": 3,
            "num_parameters": expected_parameters,
            "model": "lt_theory.models.MLP",
            "label_noise": 0.25,
        }
        assert result["num_parameters"] == expected_parameters and result["epochs"] == 2
        assert result["num_test"] == 24 and result["global_step"] == 6
        for name, value in result["metrics"].items():
            # the final model's numbers, not the first epoch's: a plain evaluation of its weights
            tolerance = 1e-5 if name == "test_loss" else 1e-12
            assert value == pytest.approx(expected[width][name], rel=tolerance, abs=1e-12), (width, name)
            logged = events.Scalars(f"dd/final_{name}")
            assert [(e.step, e.value) for e in logged] == [(6, pytest.approx(value, rel=1e-6))]
            assert [e.step for e in events.Scalars(f"dd/{name}")] == [3, 6]
            assert events.Scalars(f"dd/{name}")[-1].value == pytest.approx(value, rel=1e-6)
        assert set(result["metrics"]) == {
            "train_error",
            "train_error_clean",
            "train_error_noisy",
            "memorized_fraction",
            "test_error",
            "test_loss",
        }
    # the aggregated curve is made of exactly the runs' final metrics
    assert curve.widths == [2, 4] and curve.runs == [1, 1]
    for name in ("train_error", "test_error", "test_loss", "memorized_fraction"):
        assert curve.metrics[name] == [results[2]["metrics"][name], results[4]["metrics"][name]]
        assert curve.metrics[name] == pytest.approx(
            [expected[2][name], expected[4][name]], rel=1e-5, abs=1e-12
        )
    aggregated = _events(sweep / AGGREGATE_DIR)
    for name in ("train_error", "test_error"):
        by_width = [(e.step, e.value) for e in aggregated.Scalars(f"dd/{name}_by_width")]
        assert by_width == [(w, pytest.approx(results[w]["metrics"][name], rel=1e-6)) for w in (2, 4)]
        by_params = [(e.step, e.value) for e in aggregated.Scalars(f"dd/{name}_by_params")]
        assert [s for s, _ in by_params] == [results[w]["num_parameters"] for w in (2, 4)]
    assert "dd/modelwise_curve" in aggregated.Tags()["images"]
    assert "dd/modelwise_summary/text_summary" in aggregated.Tags()["tensors"]
    saved = json.loads((sweep / AGGREGATE_DIR / AGGREGATE_FILE).read_text())
    assert saved["metrics"]["test_error"] == curve.metrics["test_error"]
    assert "Wider" in saved["verdict"]


def test_a_slurm_task_trains_what_the_sequential_sweep_trained_and_done_runs_are_kept(tmp_path, monkeypatch):
    _run(tmp_path / "sequential", "--widths=[2, 4]")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    results = _run(tmp_path / "array", "--widths=[2, 4]")  # task 1 = width 4, no aggregation
    assert [r["width"] for r in results] == [4]
    assert not (tmp_path / "array" / "tiny" / "width_0002").exists()
    assert not (tmp_path / "array" / "tiny" / AGGREGATE_DIR).exists()
    alone = json.loads((tmp_path / "array" / "tiny" / "width_0004" / RESULT_FILE).read_text())
    in_sequence = json.loads((tmp_path / "sequential" / "tiny" / "width_0004" / RESULT_FILE).read_text())
    assert alone["metrics"] == in_sequence["metrics"]  # the data module was reset between the runs
    events_before = sorted((tmp_path / "array" / "tiny" / "width_0004").glob("events.*"))
    again = _run(tmp_path / "array", "--widths=[2, 4]", "--task_index=1")
    assert again[0]["metrics"] == alone["metrics"]
    assert sorted((tmp_path / "array" / "tiny" / "width_0004").glob("events.*")) == events_before
    curve = main(["aggregate", f"--logdir={tmp_path / 'array' / 'tiny'}"])
    assert curve.widths == [4]


def test_bias_variance_mode_decomposes_the_saved_test_predictions(tmp_path):
    curve = _run(tmp_path, "--widths=[2, 4]", "--splits=2")
    sweep = tmp_path / "tiny"
    assert sorted(p.name for p in sweep.iterdir()) == [
        AGGREGATE_DIR,
        "width_0002_split_0",
        "width_0002_split_1",
        "width_0004_split_0",
        "width_0004_split_1",
    ]
    for i, width in enumerate((2, 4)):
        saved = [torch.load(sweep / f"width_{width:04d}_split_{s}" / "test_predictions.pt") for s in (0, 1)]
        logits = torch.stack([p["logits"].double() for p in saved])
        labels = saved[0]["labels"]
        ce = cross_entropy_bias_variance(logits, labels)
        mse = mse_bias_variance(torch.softmax(logits, dim=-1), labels)
        assert curve.bias_variance["bias_squared"][i] == pytest.approx(float(ce.bias_squared), rel=1e-12)
        assert curve.bias_variance["variance"][i] == pytest.approx(float(ce.variance), rel=1e-12)
        assert curve.bias_variance["mse_variance"][i] == pytest.approx(float(mse.variance), rel=1e-12)
        assert curve.bias_variance["mse_bias_squared"][i] == pytest.approx(float(mse.bias_squared), rel=1e-12)
        assert curve.bias_variance["variance"][i] > 0  # two models on disjoint halves, two initialisations
        hparams = [_hparams(_events(sweep / f"width_{width:04d}_split_{s}")) for s in (0, 1)]
        assert [(h["split"], h["num_splits"]) for h in hparams] == [(0, 2), (1, 2)]
        errors = [
            json.loads((sweep / f"width_{width:04d}_split_{s}" / RESULT_FILE).read_text()) for s in (0, 1)
        ]
        assert curve.metrics["test_error"][i] == pytest.approx(
            (errors[0]["metrics"]["test_error"] + errors[1]["metrics"]["test_error"]) / 2
        )
    aggregated = _events(sweep / AGGREGATE_DIR)
    assert [e.step for e in aggregated.Scalars("dd/variance_by_width")] == [2, 4]
    assert "dd/bias_variance" in aggregated.Tags()["images"]


def test_print_tasks_lists_the_array(tmp_path, capsys):
    assert _run(tmp_path, "--widths=[1, 3]", "--splits=2", "--print_tasks=true") is None
    out = capsys.readouterr().out
    assert "4 tasks; as a SLURM array: sbatch --array=0-3" in out
    assert "task   3: width_0003_split_1" in out
    assert not (tmp_path / "tiny").exists()


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "widths, match",
    [
        ([], "empty grid"),
        ([0, 2], "ints >= 1"),
        ([-1], "ints >= 1"),
        ([2, 2], "repeat"),
        ([1.5], "ints >= 1"),
    ],
)
def test_bad_width_grids_raise_value_error(widths, match):
    with pytest.raises(ValueError, match=match):
        check_widths(widths)
    with pytest.raises(ValueError, match="`widths`"):
        sweep_tasks(widths)


@pytest.mark.parametrize("splits", [1, 0, -2, True, 2.0])
def test_fewer_than_two_splits_raise_value_error(splits):
    with pytest.raises(ValueError, match="`splits`.*m >= 2"):
        check_splits(splits)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--widths=[]"], "empty grid"),
        (["--widths=[0, 4]"], "ints >= 1"),
        (["--splits=1"], "m >= 2"),
        (["--widths=[2, 4]", "--task_index=2"], r"`task_index` must be in \[0, 2\)"),
        (["--model.width_arg=width"], "`model.width_arg` must name an argument"),
        (["--model.init_args={'hidden': 8}"], "must not set the swept width argument"),
        (["--model.class_path=lt_theory.models.NoSuchNet"], "`model.class_path`"),
    ],
)
def test_bad_cli_arguments_are_usage_errors(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, *extra)
    assert exit_info.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "tiny").exists()


def test_aggregate_of_an_empty_or_missing_folder_is_a_usage_error(tmp_path, capsys):
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(SystemExit):
            main(["aggregate", f"--logdir={folder}"])
    assert "no finished run" in capsys.readouterr().err


def test_build_model_fills_sequence_width_arguments_and_passes_num_classes():
    assert build_model("lt_theory.models.MLP", "hidden", 5, {"in_shape": [4]}, num_classes=3).hidden == (5,)
    two = build_model("lt_theory.models.MLP", "hidden", 6, {"in_shape": [4], "hidden": [0, 0]})
    assert list(two.hidden) == [6, 6]
    net = build_model("lt_theory.models.PreActResNet18", "k", 2, num_classes=7)
    assert net.k == 2 and net.fc.out_features == 7
    with pytest.raises(ValueError, match="`model.width_arg`"):
        build_model("lt_theory.models.PreActResNet18", "width", 2)
    pooled = build_model("lt_theory.models.PreActResNet18", "k", 2, input_pool=2)
    assert isinstance(pooled[0], torch.nn.AvgPool2d) and pooled[0].kernel_size == 2
    plain = build_model("lt_theory.models.PreActResNet18", "k", 2)
    assert sum(p.numel() for p in pooled.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(pooled(x), pooled[1](torch.nn.functional.avg_pool2d(x, 2)))
    with pytest.raises(ValueError, match="`model.input_pool`"):
        build_model("lt_theory.models.PreActResNet18", "k", 2, input_pool=0)


TINY_CONFIG = """
widths: [2, 4]
logdir: {logdir}
name: tiny
model:
  class_path: lt_theory.models.MLP
  width_arg: hidden
data:
  class_path: lt_theory.data.SyntheticCIFARDataModule
  init_args: {{num_train: 48, num_test: 24, batch_size: 16, label_noise: 0.25}}
module: {{optimizer: adam, lr: 0.01, schedule: constant}}
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  limit_val_batches: 0
"""


def test_the_slurm_array_template_runs_its_task_of_a_sweep_config(tmp_path):
    """recipes/slurm/sweep_array.sbatch --sweep CONFIG, with `srun` replaced by a pass-through."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(logdir=tmp_path / "runs"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the pass-through also says which Python environment `python` starts in the template
    (bin_dir / "srun").write_text('#!/bin/bash\npython -c "import sys; print(\'PREFIX\', sys.prefix)"\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    # A wrapper, not a symlink: Python finds its virtual environment from the path it is started by, so a
    # symlink in another folder would start the base interpreter without this environment's packages.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    script = Path(__file__).parents[1] / "recipes" / "slurm" / "sweep_array.sbatch"
    environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="1")
    done = subprocess.run(
        ["bash", str(script), "--sweep", str(config), "--seed=2"],
        env=environment,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"PREFIX {sys.prefix}\n" in done.stdout  # the test's own (virtual) environment, not the base one
    runs = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert runs == ["width_0004"]  # task 1 of widths [2, 4], no aggregation inside an array task
    result = json.loads((tmp_path / "runs" / "tiny" / "width_0004" / RESULT_FILE).read_text())
    assert result["width"] == 4 and result["seed"] == 2


SWEEP_CONFIGS = sorted((Path(__file__).parents[1] / "recipes" / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_every_sweep_config_parses_and_lists_its_tasks(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: lt_theory" in capsys.readouterr().out
    assert main(["run", "--config", str(config), "--print_tasks=true"]) is None
    assert "tasks; as a SLURM array" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# Stale results: another config, a rerun, mixed runs
# --------------------------------------------------------------------------------------------------------


def test_a_sweep_folder_made_with_other_settings_is_refused_and_rerun_starts_afresh(tmp_path, capsys):
    _run(tmp_path, "--widths=[2]")
    run = tmp_path / "tiny" / "width_0002"
    before = json.loads((run / RESULT_FILE).read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _run(tmp_path, "--widths=[2]", "--data.label_noise=0.0")
    message = capsys.readouterr().err
    assert "data differ" in message and "--rerun true" in message and "--name" in message, message
    assert json.loads((run / RESULT_FILE).read_text()) == before  # untouched
    curve = _run(tmp_path, "--widths=[2]", "--data.label_noise=0.0", "--rerun=true")
    assert "train_error_noisy" in before["metrics"] and "train_error_noisy" not in curve.metrics
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the first run's events are gone
    assert json.loads((run / RESULT_FILE).read_text())["label_noise"] == 0.0


def test_a_data_seed_other_than_the_sweeps_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--widths=[2]", "--data.seed=5")
    assert "give `--seed` instead" in capsys.readouterr().err


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
