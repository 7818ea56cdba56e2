"""The report: runs built to break exactly one condition each get that condition's verdict, reference and first
advice; a healthy run gets no "violated"; the outputs (Markdown, self-contained HTML, TensorBoard text, the command
line); bad input; and a real Lightning run read back by `diagnose`.

The synthetic runs are event files written with torch's SummaryWriter, as the callbacks write them; the numbers
are chosen on either side of each rule's reference.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lt_theory.callbacks.ntk import NTKDrift
from lt_theory.callbacks.spectral import SpectralNormMonitor
from lt_theory.report import RULES, TheoryReport, diagnose
from lt_theory.report.__main__ import main
from lt_theory.report.checks import CHECKS
from lt_theory.report.rules import STAGE_LABELS, STAGES
from lt_theory.training.tickets import save_ticket

REPO = Path(__file__).resolve().parents[1]
HEALTHY_HPARAMS = {"num_classes": 10, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False}


def write_run(directory: Path, scalars=None, texts=None, images=(), hparams=None) -> Path:
    """An event file holding ``scalars`` ({tag: value at step 0, or [(step, value), ...]}), texts and images."""
    directory.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(str(directory)) as writer:
        for tag, series in (scalars or {}).items():
            for step, value in series if isinstance(series, list) else [(0, series)]:
                writer.add_scalar(tag, value, global_step=step)
        for tag, text in (texts or {}).items():
            writer.add_text(tag, text, global_step=0)
        for tag in images:
            writer.add_image(tag, np.full((3, 8, 8), 128, dtype=np.uint8), global_step=0)
    if hparams is not None:
        (directory / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return directory


def assert_advice_ordered(report) -> None:
    """Every finding's advice: the items it takes from other findings ("... (see '<condition>')": an earlier
    stage's, or the measured cause that explains a symptom) first, then its own, debugging, then data, then
    algorithm (the report's promise); no advice where it holds or is unknown."""
    rank = {STAGE_LABELS[s]: i for i, s in enumerate(STAGES)}
    for finding in report.findings:
        taken = [bool(re.search(r" \(see '[^']*'\)$", item)) for item in finding.advice]
        assert taken == sorted(taken, reverse=True), finding
        stages = [rank[item.split(":", 1)[0]] for item, t in zip(finding.advice, taken) if not t]
        assert stages == sorted(stages), finding
        assert (finding.verdict in ("holds", "unknown")) <= (not finding.advice), finding


def judge(tmp_path, condition, **run):
    report = diagnose(write_run(tmp_path / "run", **run))
    assert_advice_ordered(report)
    return report.finding(condition)


# ------------------------------------------------------------------------------------------------------------
# The rules are data, each with a check.


def test_every_rule_has_a_check_a_reference_a_source_and_staged_advice():
    assert [r.key for r in RULES] == list(dict.fromkeys(r.key for r in RULES))  # one rule per condition
    assert set(CHECKS) == {r.key for r in RULES}
    for rule in RULES:
        assert rule.condition and rule.quantity and rule.reference and rule.source, rule.key
        assert rule.stage in STAGES
        assert all(stage in STAGES for stage, _ in (*rule.advice, *(rule.borderline_advice or ())))


# ------------------------------------------------------------------------------------------------------------
# One broken condition per run.


def test_lr_times_sharpness_of_40_violates_smoothness_with_learning_rate_advice(tmp_path):
    finding = judge(
        tmp_path,
        "Smoothness vs learning rate",
        scalars={"landscape/sharpness": 400.0, "landscape/sharpness_x_lr": 40.0},
    )
    assert (finding.verdict, finding.value) == ("violated", 40.0)
    assert finding.reference.startswith("< 2 (gradient descent")
    assert finding.advice[0].startswith("Algorithm: Lower the learning rate to at most 0.005")
    assert "Cohen" in finding.source


@pytest.mark.parametrize(
    ("value", "hparams", "verdict", "limit"),
    [
        (1.7, None, "holds", "< 2 "),
        (2.05, None, "borderline", "< 2 "),  # the edge of stability: within 10% of 2
        (2.3, None, "violated", "< 2 "),
        (3.0, HEALTHY_HPARAMS, "holds", "< 3.8 (heavy-ball momentum 0.9"),  # 2 + 2m
        (3.0, {**HEALTHY_HPARAMS, "nesterov": True}, "violated", "< 1.36 (Nesterov"),  # (2 + 2m) / (1 + 2m)
    ],
)
def test_smoothness_limit_and_band(tmp_path, value, hparams, verdict, limit):
    finding = judge(
        tmp_path, "Smoothness vs learning rate", scalars={"landscape/sharpness_x_lr": value}, hparams=hparams
    )
    assert finding.verdict == verdict and finding.reference.startswith(limit)


def test_smoothness_is_judged_at_its_largest_not_where_the_schedule_ends(tmp_path):
    """A cosine schedule ends at lr 0, so lr x sharpness is 0 at the last measurement: the step too large for the
    curvature at step 100 is still a violation."""
    series = [(0, 1.0), (100, 40.0), (200, 0.0)]
    finding = judge(tmp_path, "Smoothness vs learning rate", scalars={"landscape/sharpness_x_lr": series})
    assert finding.verdict == "violated" and finding.value == 40.0


def test_adam_has_no_raw_stability_limit(tmp_path):
    finding = judge(
        tmp_path,
        "Smoothness vs learning rate",
        scalars={"landscape/sharpness_x_lr": 40.0},
        hparams={"optimizer": "adam"},
    )
    assert finding.verdict == "unknown" and finding.value == 40.0 and not finding.advice


def test_an_error_barrier_of_0_3_violates_stability(tmp_path):
    finding = judge(
        tmp_path, "Stability to SGD noise (LMC)", scalars={"lmc/test_error_barrier": [(0, 0.3), (200, 0.3)]}
    )
    assert finding.verdict == "violated" and finding.value == pytest.approx(0.3)
    assert finding.reference == "< 0.02 at some k" and "Frankle" in finding.source
    assert finding.advice[0].startswith("Algorithm: Lower the learning rate or add warm-up")
    assert any("later than step 200" in item for item in finding.advice)


def test_stable_from_the_first_k_under_two_percent(tmp_path):
    finding = judge(
        tmp_path,
        "Stability to SGD noise (LMC)",
        scalars={"lmc/test_error_barrier": [(0, 0.3), (100, 0.019), (500, 0.005)]},
    )
    assert finding.verdict == "holds" and "stable from k=100" in finding.evidence


def test_a_nan_loss_without_a_measured_cause_puts_a_bug_hunt_first_everywhere(tmp_path):
    report = diagnose(
        write_run(
            tmp_path / "run",
            scalars={
                "train/loss_step": [(0, 2.3), (1, 2.1), (2, math.nan), (3, math.nan)],
                "landscape/sharpness": [(0, 10.0), (2, math.nan)],
                "landscape/sharpness_x_lr": [(0, 1.0), (2, math.nan)],  # under 2 while finite: not the cause
                "lmc/test_error_barrier": [(0, 0.3), (2, 0.3)],
            },
        )
    )
    assert_advice_ordered(report)
    finite = report.finding("Finite loss")
    assert finite.verdict == "violated" and "first at step 2" in finite.evidence
    assert finite.advice[0].startswith("Debug: Look for a bug: NaN or Inf in the inputs")
    smooth = report.finding("Smoothness vs learning rate")
    assert smooth.verdict == "holds" and smooth.value == 1.0 and "does not explain it" in smooth.evidence
    # violated too: the bug hunt comes before its advice
    barrier = report.finding("Stability to SGD noise (LMC)")
    assert barrier.advice[0].startswith("Debug: Look for a bug")
    assert barrier.advice[0].endswith("(see 'Finite loss')")
    assert report.leads == {} and report.advice()[0].startswith("Debug: Look for a bug")
    # once, not per finding
    assert sum(item.startswith("Debug: Look for a bug") for item in report.advice()) == 1


def test_a_nan_loss_after_lr_times_sharpness_of_40_puts_the_learning_rate_first(tmp_path):
    """The step past 2 / sharpness, measured while the loss was finite, explains the NaN: lowering the learning rate
    to the number the rule computes is tried first, the bug hunt next (rules.py, "Measured causes")."""
    report = diagnose(
        write_run(
            tmp_path / "run",
            scalars={
                "train/loss_step": [(0, 2.3), (1, 2.1), (2, math.nan), (3, math.nan)],
                "landscape/sharpness": [(0, 400.0), (2, math.nan)],
                "landscape/sharpness_x_lr": [(0, 40.0), (2, math.nan)],
            },
        )
    )
    assert_advice_ordered(report)
    lower = "Algorithm: Lower the learning rate to at most 0.005 (= 2 / sharpness 400 at step 0)"
    smooth = report.finding("Smoothness vs learning rate")
    assert (smooth.verdict, smooth.value) == ("violated", 40.0)  # its largest finite value, not the NaN
    assert "Not finite from step 2: the run diverged" in smooth.evidence
    assert smooth.advice[0].startswith(lower)  # no bug hunt pushed ahead of it
    finite = report.finding("Finite loss")
    assert finite.verdict == "violated"
    assert finite.advice[0].startswith(lower)
    assert finite.advice[0].endswith("(see 'Smoothness vs learning rate')")
    assert finite.advice[1:] == (
        "Debug: Look for a bug: NaN or Inf in the inputs or labels, a log or a division by zero in the loss (give "
        "cross_entropy logits, not probabilities), a layer dividing by a zero statistic.",
    )  # the rest of its advice (lower the rate x0.1 ...) is the cause's own
    advice = report.advice()
    assert advice[0].startswith(lower) and not advice[0].endswith("')")
    assert advice[1].startswith("Debug: Look for a bug")
    assert sum(item.startswith(lower) for item in advice) == 1


def test_lr_times_sharpness_never_finite_is_unknown_and_explains_nothing(tmp_path):
    report = diagnose(
        write_run(
            tmp_path / "run",
            scalars={
                "train/loss_step": [(0, math.nan), (1, math.nan)],
                "landscape/sharpness_x_lr": [(0, math.nan), (1, math.nan)],
            },
        )
    )
    smooth = report.finding("Smoothness vs learning rate")
    assert smooth.verdict == "unknown" and "not finite at any measurement" in smooth.evidence
    assert report.advice()[0].startswith("Debug: Look for a bug")


@pytest.mark.parametrize("from_hparams", [True, False])
def test_loss_at_ln_10_with_chance_accuracy_points_at_labels_and_pipeline(tmp_path, from_hparams):
    scalars = {"train/loss_epoch": [(5, 2.303), (11, 2.302), (17, 2.304)], "train/acc_epoch": 0.1}
    run = write_run(tmp_path / "run", scalars=scalars, hparams={"num_classes": 10} if from_hparams else None)
    report = diagnose(run, num_classes=None if from_hparams else 10)
    assert_advice_ordered(report)
    chance = report.finding("Training loss below chance")
    assert chance.verdict == "violated" and chance.value == pytest.approx(2.304 / math.log(10), rel=1e-6)
    assert chance.reference == f"< 0.95 x ln C = {0.95 * math.log(10):.4g} (C = 10)"
    assert chance.advice[0].startswith("Debug: Check the labels and the pipeline")
    assert report.finding("Training loss decreases").verdict == "violated"


@pytest.mark.parametrize(("loss", "verdict"), [(2.2, "violated"), (2.1, "holds")])  # 0.95 ln 10 = 2.187
def test_chance_level_margin(tmp_path, loss, verdict):
    scalars = {"train/loss_epoch": [(0, 2.4), (9, loss)]}
    assert (
        judge(tmp_path, "Training loss below chance", scalars=scalars, hparams={"num_classes": 10}).verdict
        == verdict
    )


def test_chance_level_without_the_number_of_classes_is_unknown(tmp_path):
    finding = judge(
        tmp_path, "Training loss below chance", scalars={"train/loss_epoch": [(0, 2.3), (9, 2.3)]}
    )
    assert finding.verdict == "unknown" and "number of classes is unknown" in finding.evidence


def test_input_condition_1e8_without_batchnorm_asks_for_input_normalisation(tmp_path):
    finding = judge(
        tmp_path,
        "Activation conditioning",
        scalars={
            "landscape/input_condition/net.fc1": 1e8,
            "landscape/input_condition/net.fc2": 30.0,
        },
    )
    assert finding.verdict == "violated" and finding.value == pytest.approx(1e8)
    assert finding.reference == "< 8.39e+06 (1 / float32 epsilon)"
    assert finding.advice[0].startswith("Data: Normalise the inputs (net.fc1 is the first layer measured)")
    assert (
        finding.advice[-1] == "Algorithm: Add BatchNorm (or LayerNorm) before net.fc1 (the model has no "
        "normalisation layer)."
    )


@pytest.mark.parametrize(
    ("rms", "verdict"),
    [
        (1.0, "holds"),
        (3.0, "holds"),  # within half a decade of 1
        (0.33, "holds"),
        (5.0, "borderline"),
        (0.2, "borderline"),
        (12.0, "violated"),  # beyond a decade
        (0.05, "violated"),
    ],
)
def test_input_scale_bands(tmp_path, rms, verdict):
    scalars = {"landscape/input_rms/net.fc1": rms, "landscape/input_rms/net.fc2": 1.0}
    finding = judge(tmp_path, "Input scale", scalars=scalars)
    assert (finding.verdict, finding.value) == (verdict, pytest.approx(rms))
    assert finding.reference == "0.1 <= RMS <= 10 (within a decade of 1, the RMS of standardised inputs)"
    assert finding.quantity == "landscape/input_rms/net.fc1"
    if verdict != "holds":
        expected = f"Data: Normalise the inputs: net.fc1, the first layer, sees values of RMS {rms:.3g}"
        assert finding.advice[0].startswith(expected)


def test_inputs_1000_times_too_large_ask_for_normalisation_before_the_learning_rate(tmp_path):
    report = diagnose(
        write_run(
            tmp_path / "run",
            scalars={
                "train/loss_step": [(0, 230.0), (1, 1e9), (2, math.inf)],
                "landscape/sharpness": [(0, 4e4)],
                "landscape/sharpness_x_lr": [(0, 2000.0)],
                "landscape/input_rms/net.fc1": [(0, 1000.0)],
                "landscape/input_rms/net.fc2": [(0, 300.0)],
            },
        )
    )
    assert_advice_ordered(report)
    scale = report.finding("Input scale")
    assert scale.verdict == "violated" and "far above the 1 of standardised data" in scale.advice[0]
    normalise = "Data: Normalise the inputs: net.fc1, the first layer, sees values of RMS 1e+03"
    assert scale.advice[1] == (
        "Algorithm: If the inputs cannot be normalised, put a normalisation layer right after net.fc1 (BatchNorm "
        "absorbs the scale of its input), or retune the learning rate: the scale multiplies the first layer's "
        "curvature by about 1e+06."
    )
    for condition in ("Finite loss", "Smoothness vs learning rate"):  # explained, and data before algorithm
        assert report.finding(condition).advice[0].startswith(normalise), condition
    assert report.leads == {".": scale.advice[0]} and report.advice()[0] == scale.advice[0]


def test_the_generic_normalise_advice_goes_when_the_input_scale_was_measured(tmp_path):
    # exploding updates: "normalise the inputs" among the advice
    scalars = {"landscape/grad_to_weight/net.fc1": 5.0, "lr": 1.0}
    blind = judge(tmp_path, "Gradient health", scalars=scalars)
    generic = "Data: Normalise the inputs: subtract the training set's"
    assert blind.verdict == "violated" and any(item.startswith(generic) for item in blind.advice)
    scalars["landscape/input_rms/net.fc1"] = 1.0  # measured, and in range: not the data
    seeing = judge(tmp_path / "b", "Gradient health", scalars=scalars)
    assert seeing.verdict == "violated" and not any(item.startswith("Data:") for item in seeing.advice)


def test_a_normalisation_layer_after_the_first_absorbs_a_large_input_scale(tmp_path):
    scalars = {"landscape/input_rms/net.conv1": 130.0, "landscape/input_rms/net.bn1": 40.0}
    finding = judge(tmp_path, "Input scale", scalars=scalars)
    assert (
        finding.verdict == "holds"
        and "net.bn1, a normalisation layer, takes net.conv1's output" in finding.evidence
    )
    scalars["landscape/input_rms/net.conv1"] = (
        0.01  # too small: BatchNorm's epsilon is not negligible, not absorbed
    )
    assert judge(tmp_path / "b", "Input scale", scalars=scalars).verdict == "violated"


def test_an_ill_conditioned_hidden_layer_points_at_dead_units_first(tmp_path):
    finding = judge(
        tmp_path,
        "Activation conditioning",
        scalars={
            "landscape/input_condition/net.fc1": 30.0,
            "landscape/input_condition/net.fc2": 2e6,  # a decade below float32's limit
            "landscape/input_condition/net.bn1": 1e9,  # BatchNorm's own input does not count: it normalises it
            "landscape/output_condition/net.bn1": 4.0,
        },
    )
    assert finding.verdict == "borderline" and finding.quantity == "landscape/input_condition/net.fc2"
    assert finding.advice[0].startswith("Debug: Near-zero-variance directions at net.fc2")
    assert finding.advice[-1] == "Algorithm: Add BatchNorm (or LayerNorm) before net.fc2."


def test_rank_deficient_covariances_are_not_judged(tmp_path):
    scalars = {"landscape/input_condition/net.conv1": 20.0, "landscape/input_condition/net.fc": 1e12}
    finding = judge(tmp_path, "Activation conditioning", scalars=scalars)
    assert finding.verdict == "holds" and finding.value == 20.0
    assert "not judged (fewer probe examples than features, or dead units): net.fc" in finding.evidence
    alone = judge(
        tmp_path / "b", "Activation conditioning", scalars={"landscape/input_condition/net.fc": 1e12}
    )
    assert alone.verdict == "unknown" and not alone.advice


def test_batchnorm_that_raises_the_condition_number_is_borderline(tmp_path):
    scalars = {
        "landscape/input_condition/net.bn1": 10.0,
        "landscape/output_condition/net.bn1": 40.0,
        "landscape/input_condition/net.layer1.0.bn2": 50.0,
        "landscape/output_condition/net.layer1.0.bn2": 25.0,
    }
    finding = judge(tmp_path, "BatchNorm lowers conditioning", scalars=scalars)
    assert finding.verdict == "borderline" and finding.value == pytest.approx(
        math.sqrt(4.0 * 0.5)
    )  # geometric
    assert "net.bn1" in finding.advice[0]
    scalars["landscape/output_condition/net.bn1"] = 2.0
    assert judge(tmp_path / "b", "BatchNorm lowers conditioning", scalars=scalars).verdict == "holds"


def test_test_error_rising_past_interpolation_sits_at_the_peak(tmp_path):
    test = [0.50, 0.40, 0.33, 0.36, 0.44, 0.45, 0.46]
    train = [0.60, 0.45, 0.30, 0.10, 0.005, 0.0, 0.0]
    scalars = {
        "dd/test_error": list(enumerate(test)),
        "dd/train_error": list(enumerate(train)),
        "dd/interpolation_epoch": [(4, 5)],
    }
    finding = judge(tmp_path, "Double descent (epoch-wise)", scalars=scalars)
    assert finding.verdict == "violated" and finding.value == pytest.approx(0.46 - 0.33, abs=1e-6)
    assert finding.reference == "final test error <= best before interpolation + 0.01"
    assert finding.advice[0].startswith("Algorithm: The run sits at the double-descent peak")
    assert "go wider" in finding.advice[0] and "regularise" in finding.advice[0]
    assert any("step 2" in item for item in finding.advice)  # the best epoch before interpolation


@pytest.mark.parametrize(("tail", "verdict"), [([0.40, 0.37], "borderline"), ([0.33, 0.30], "holds")])
def test_double_descent_after_the_peak(tmp_path, tail, verdict):
    test = [0.50, 0.40, 0.33, 0.36, 0.44, 0.45, *tail]
    scalars = {"dd/test_error": list(enumerate(test)), "dd/interpolation_epoch": [(4, 5)]}
    assert judge(tmp_path, "Double descent (epoch-wise)", scalars=scalars).verdict == verdict


def test_not_interpolated_is_unknown(tmp_path):
    scalars = {"dd/test_error": [(0, 0.5), (1, 0.6)], "dd/train_error": [(0, 0.5), (1, 0.3)]}
    assert judge(tmp_path, "Double descent (epoch-wise)", scalars=scalars).verdict == "unknown"


def write_sweep(root: Path, test_errors: dict[int, float], interpolation_width: int | None) -> Path:
    aggregate = {"dd/test_error_by_width": list(test_errors.items())}
    if interpolation_width is not None:
        aggregate["dd/interpolation_width"] = [(interpolation_width, interpolation_width)]
    write_run(root / "aggregate", scalars=aggregate)
    (root / "aggregate" / "aggregate.json").write_text('{"tolerance": 0.009}')
    for width, error in test_errors.items():  # each width: its epoch-wise probe
        write_run(root / f"width_{width:04d}", scalars={"dd/test_error": [(0, 0.7), (1, error)]})
    return root


def test_a_sweep_where_wider_does_not_help_says_so_plainly(tmp_path):
    root = write_sweep(tmp_path / "sweep", {8: 0.40, 16: 0.35, 32: 0.38, 64: 0.45}, interpolation_width=64)
    report = diagnose(root)
    assert_advice_ordered(report)
    finding = report.finding("Over-parameterisation: wider helps")
    assert finding.run == "aggregate" and finding.verdict == "violated"
    assert finding.value == pytest.approx(0.10, abs=1e-6)
    assert finding.reference == "test error at the widest <= lowest + 0.009 (two standard errors)"
    assert "Wider does not help" in finding.evidence and "worse than the smallest" in finding.evidence
    assert finding.advice[0].startswith(
        "Algorithm: Wider does not help on this grid (the widest model is at the "
        "interpolation threshold, width 64"
    )
    assert {f.run for f in report.findings} == {
        "aggregate",
        "width_0008",
        "width_0016",
        "width_0032",
        "width_0064",
    }


def test_a_sweep_where_wider_helps(tmp_path):
    root = write_sweep(tmp_path / "sweep", {8: 0.40, 16: 0.45, 32: 0.30, 64: 0.305}, interpolation_width=16)
    finding = diagnose(root).finding("Over-parameterisation: wider helps")
    assert finding.verdict == "holds" and "Wider helps" in finding.evidence


def test_a_crossed_sweep_judges_each_width_curve_with_its_standard_error(tmp_path):
    root = tmp_path / "sweep"
    write_run(
        root / "aggregate",
        scalars={
            "dd/test_error_by_width/noise=0.1": [(8, 0.30), (16, 0.25), (32, 0.20)],
            "dd/test_error_by_width/noise=0.2": [(8, 0.40), (16, 0.30), (32, 0.36)],
            "dd/interpolation_width/noise=0.2": [(16, 16)],
        },
    )
    (root / "aggregate" / "aggregate.json").write_text(
        '{"model_wise": null, "curves": []}'
    )  # crossed: per curve
    for width in (8, 16, 32):
        (root / f"width_{width:04d}").mkdir()
        (root / f"width_{width:04d}" / "result.json").write_text('{"num_test": 1000}')
    finding = diagnose(root).finding("Over-parameterisation: wider helps")
    tolerance = 2 * math.sqrt(0.3 * 0.7 / 1000)  # two binomial standard errors at the lowest error, 0.30
    assert finding.verdict == "violated" and finding.quantity == "dd/test_error_by_width/noise=0.2"
    assert finding.reference == f"test error at the widest <= lowest + {tolerance:.3g} (two standard errors)"
    assert finding.evidence.startswith("curve noise=0.2: ") and "on 1 of 2 curves" in finding.evidence
    assert "width 16, where the peak is" in finding.advice[0]


def test_the_new_aggregate_json_keeps_the_tolerance_under_model_wise(tmp_path):
    root = write_sweep(tmp_path / "sweep", {8: 0.40, 16: 0.35, 32: 0.38, 64: 0.45}, interpolation_width=64)
    (root / "aggregate" / "aggregate.json").write_text('{"model_wise": {"tolerance": 0.2}, "curves": []}')
    finding = diagnose(root).finding("Over-parameterisation: wider helps")
    assert finding.verdict == "holds" and "(aggregate.json)" in finding.evidence


def test_pl_plateau_and_pl_healthy(tmp_path):
    base = {
        "landscape/loss": [(0, 2.3), (1000, 2.25)],
        "landscape/sharpness": 5.0,
        "landscape/sharpness_x_lr": 0.5,
        "lr": 0.1,
    }
    finding = judge(tmp_path, "PL condition", scalars={**base, "landscape/pl_ratio": 1e-7})
    assert finding.verdict == "violated" and finding.value == pytest.approx(1000 / (5.0 / 1e-7), rel=1e-5)
    assert finding.advice[0].startswith("Debug: A high loss with a vanishing gradient")
    healthy = judge(tmp_path / "b", "PL condition", scalars={**base, "landscape/pl_ratio": 0.05})
    assert healthy.verdict == "holds" and healthy.value == pytest.approx(1000 / (5.0 / 0.05), rel=1e-5)
    logged = judge(
        tmp_path / "d",
        "PL condition",
        scalars={**base, "landscape/pl_ratio": 0.05, "landscape/condition": 2e3},
    )
    assert logged.verdict == "violated" and logged.value == pytest.approx(0.5)  # the logged kappa first
    fell = judge(
        tmp_path / "c",
        "PL condition",
        scalars={**base, "landscape/loss": [(0, 2.3), (1000, 0.5)], "landscape/pl_ratio": 1e-7},
    )
    assert fell.verdict == "holds"  # the loss is already down e-fold


@pytest.mark.parametrize(
    ("ratios", "verdict", "first"),
    [
        ({"net.conv1": 1e-7, "net.fc": 1e-2}, "violated", "Debug: Check that net.conv1 is trained"),
        ({"net.conv1": 1e-2, "net.fc": 50.0}, "violated", "Debug: An exploding gradient at net.fc"),
        ({"net.conv1": 5e-5, "net.fc": 1e-2}, "borderline", "Debug: Check that net.conv1 is trained"),
        (
            {"net.conv1": 1e-2, "net.fc": 8.0},
            "borderline",
            "Debug: An exploding gradient at net.fc",
        ),  # lr 0.1: updates of 0.8
        ({"net.conv1": 1e-3, "net.fc": 1e-2}, "holds", None),
        ({"net.conv1": 1e-3, "net.fc": 1.5}, "holds", None),  # 0.15, the quick start's largest: healthy
    ],
)
def test_gradient_health(tmp_path, ratios, verdict, first):
    scalars = {f"landscape/grad_to_weight/{name}": value for name, value in ratios.items()}
    finding = judge(tmp_path, "Gradient health", scalars={**scalars, "lr": 0.1})
    assert finding.verdict == verdict
    assert (finding.advice[0][: len(first)] if finding.advice else None) == first


def test_an_exploding_update_is_judged_at_its_largest_not_where_a_cosine_schedule_ends(tmp_path):
    """lr 0.5 x grad/weight 40 = 20 at step 100 explodes, though the lr (from sharpness_x_lr / sharpness) is 0 at
    the last measurement."""
    scalars = {
        "landscape/sharpness": [(0, 10.0), (100, 10.0), (200, 10.0)],
        "landscape/sharpness_x_lr": [(0, 1.0), (100, 5.0), (200, 0.0)],
        "landscape/grad_to_weight/net.fc": [(0, 1e-2), (100, 40.0), (200, 1e-2)],
    }
    finding = judge(tmp_path, "Gradient health", scalars=scalars)
    assert finding.verdict == "violated" and finding.advice[0].startswith("Debug: An exploding gradient at net.fc")


def test_ntk_lazy_against_the_runs_own_threshold(tmp_path):
    assert (
        judge(
            tmp_path, "Feature learning (NTK drift)", scalars={"ntk/relative_change": [(0, 0.0), (10, 0.4)]}
        ).verdict
        == "holds"
    )
    lazy = judge(
        tmp_path / "b",
        "Feature learning (NTK drift)",
        scalars={"ntk/relative_change": 0.15},
        texts={"ntk/verdict": "Over 200 steps ... (threshold 0.2) ... Verdict: lazy."},
    )
    assert lazy.verdict == "borderline" and lazy.reference.startswith(">= 0.2")
    assert lazy.advice[0].startswith("Algorithm: The network trains lazily")


def test_margins_and_lipschitz(tmp_path):
    scalars = {
        "spectral/margin_normalized/p10": -0.01,
        "spectral/margin_normalized/p50": 0.02,
        "spectral/lipschitz_upper": [(0, 10.0), (100, 50.0)],
    }
    report = diagnose(write_run(tmp_path / "run", scalars=scalars))
    assert report.finding("Normalised margins").verdict == "borderline"
    growth = report.finding("Lipschitz bound growth")
    assert growth.verdict == "unknown" and growth.value == pytest.approx(5.0) and "x5" in growth.evidence
    scalars["spectral/margin_normalized/p50"] = -0.02
    scalars["spectral/lipschitz_upper"] = [(0, 10.0), (100, math.inf)]
    report = diagnose(write_run(tmp_path / "b", scalars=scalars))
    assert report.finding("Normalised margins").verdict == "violated"
    assert report.finding("Lipschitz bound growth").verdict == "violated"


def write_imp(directory: Path, curve: dict[int, float], control: str | None) -> Path:
    write_run(directory, scalars={"imp/accuracy_by_remaining_bp": list(curve.items())})
    save_ticket(
        directory / "imp" / "ticket_level01.pt",
        {"masks": {}, "start_state": {"w": torch.zeros(1)}, "control": control},
    )
    return directory


@pytest.mark.parametrize(("reinit", "verdict"), [(0.80, "holds"), (0.887, "borderline"), (0.90, "violated")])
def test_matching_ticket_against_the_random_controls(tmp_path, reinit, verdict):
    write_imp(tmp_path / "version_0", {10000: 0.90, 5000: 0.895, 2500: 0.85}, control=None)
    # compared at the sparsest level both reached (25%), not at 50% where the control is far behind
    write_imp(tmp_path / "version_1", {10000: 0.90, 5000: 0.5, 2500: reinit - 0.045}, control="random_reinit")
    report = diagnose(tmp_path)
    assert_advice_ordered(report)
    matching = report.finding("Matching ticket (IMP)", run="version_0")
    assert (
        matching.verdict == "holds" and matching.value == 0.5
    )  # 50% of the weights, within 1 point of dense
    assert matching.reference == "accuracy >= dense - 0.01 at some pruned level"
    controls = report.finding("Ticket beats random controls")
    assert controls.run == "version_0" and controls.verdict == verdict
    assert controls.value == pytest.approx(0.895 - reinit, abs=1e-6)
    assert "control run: random_reinit" in report.finding("Matching ticket (IMP)", run="version_1").evidence


def test_no_matching_ticket_and_no_controls(tmp_path):
    report = diagnose(
        write_run(tmp_path / "run", scalars={"imp/accuracy_by_remaining_bp": [(10000, 0.90), (5000, 0.85)]})
    )
    matching = report.finding("Matching ticket (IMP)")
    assert matching.verdict == "violated" and matching.advice[0].startswith(
        "Algorithm: Rewind to a later step k"
    )
    assert report.finding("Ticket beats random controls").verdict == "unknown"


def healthy_scalars() -> dict:
    return {
        "train/loss_epoch": [(5, 2.0), (11, 1.0), (17, 0.5)],
        "train/acc_epoch": [(5, 0.3), (11, 0.7), (17, 0.85)],
        "val/loss": [(5, 2.0), (11, 1.1), (17, 0.7)],
        "lr": 0.1,
        "landscape/loss": [(0, 2.3), (500, 1.0), (1000, 0.4)],
        "landscape/pl_ratio": [(0, 0.4), (1000, 0.5)],
        "landscape/pl_ratio_min": 0.3,
        "landscape/sharpness": 20.0,
        "landscape/sharpness_x_lr": 2.0,
        "landscape/condition": 40.0,
        "landscape/grad_to_weight/net.conv1": 1e-2,
        "landscape/grad_to_weight/net.fc": 5e-2,
        "landscape/input_condition/net.conv1": 50.0,
        "landscape/input_condition/net.bn1": 1e4,
        "landscape/output_condition/net.bn1": 1e2,
        "landscape/input_condition/net.fc": 1e3,
        "landscape/input_rms/net.conv1": 0.97,
        "landscape/input_rms/net.bn1": 40.0,  # hidden layers' scales are not judged
        "landscape/input_rms/net.fc": 0.5,
        "spectral/lipschitz_upper": [(0, 10.0), (1000, 50.0)],
        "spectral/margin_normalized/p10": 0.01,
        "spectral/margin_normalized/p50": 0.05,
        "spectral/margin_normalized/p90": 0.1,
        "ntk/relative_change": 0.4,
        "lmc/test_error_barrier": [(0, 0.2), (100, 0.01)],
        "dd/test_error": [(200, 0.5), (400, 0.3), (800, 0.25), (1000, 0.24)],
        "dd/train_error": [(200, 0.5), (400, 0.2), (800, 0.0), (1000, 0.0)],
        "dd/interpolation_epoch": [(800, 8)],
        "imp/accuracy_by_remaining_bp": [(10000, 0.90), (5000, 0.90)],
    }


def test_a_healthy_run_has_nothing_violated(tmp_path):
    report = diagnose(write_run(tmp_path / "run", scalars=healthy_scalars(), hparams=HEALTHY_HPARAMS))
    assert_advice_ordered(report)
    verdicts = report.verdicts()
    assert "violated" not in verdicts.values(), verdicts
    expected = {r.condition for r in RULES} - {
        "Path from initialisation",
        "Over-parameterisation: wider helps",
    }
    assert set(verdicts) == expected  # every rule of a single spawn-mode run found its tags
    assert [c for c, v in verdicts.items() if v != "holds"] == [
        "Lipschitz bound growth",
        "Ticket beats random controls",  # no threshold; no control run
    ]
    assert report.advice() == []


# ------------------------------------------------------------------------------------------------------------
# Outputs.


def test_markdown_html_and_tensorboard_text(tmp_path):
    run = write_run(
        tmp_path / "run", scalars={"lmc/test_error_barrier": [(0, 0.3), (50, 0.25)]}, images=["lmc/stability"]
    )
    report = diagnose(run)
    table = report.to_markdown(details=False).splitlines()
    assert "| condition | value | reference | verdict | advice |" in table
    assert (
        "| Stability to SGD noise (LMC) | 0.25 | < 0.02 at some k | **violated** | 1. Algorithm: Lower"
        in "\n".join(table)
    )
    page = report.to_html()
    assert page.count("data:image/png;base64,") == 1 and "lmc/stability" in page
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    paths = report.write()
    assert paths == {"markdown": run / "report.md", "html": run / "report.html"}
    assert paths["markdown"].read_text() == report.to_markdown()
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    assert "report/diagnosis/text_summary" in accumulator.Tags()["tensors"]
    again = diagnose(run)  # the report's own text is not read back as a run's tag
    assert again.findings == report.findings and "report/diagnosis" not in again.runs[0].texts


def test_advice_is_filled_skipped_and_sorted_by_stage():
    from lt_theory.report.checks import Judgement
    from lt_theory.report.diagnosis import _advice
    from lt_theory.report.rules import Rule

    made_up = Rule(
        key="k",
        condition="c",
        quantity="q",
        reference="r",
        source="s",
        stage="algorithm",
        limits={"n": 2.0},
        advice=(("algorithm", "A {n:g}"), ("bug", "B at {layer}"), ("data", "C {missing}"), ("data", "D")),
    )
    judgement = Judgement("violated", 1.0, "e", "q", {"layer": "net.fc"})
    assert _advice(made_up, judgement) == ("Debug: B at net.fc", "Data: D", "Algorithm: A 2")
    assert _advice(made_up, judgement._replace(verdict="holds")) == ()


def test_a_resumed_run_reads_as_one_the_last_write_of_a_step_winning(tmp_path):
    run = tmp_path / "run"
    write_run(run, scalars={"lmc/test_error_barrier": [(0, 0.3), (100, 0.25)]})
    write_run(run, scalars={"lmc/test_error_barrier": [(100, 0.01), (200, math.nan)]})  # resumed at step 100
    report = diagnose(run)
    series = report.runs[0].scalars["lmc/test_error_barrier"]
    assert [s for s, _ in series] == [0, 100, 200] and series[1][1] == pytest.approx(0.01)
    assert math.isnan(series[2][1])
    assert report.finding("Stability to SGD noise (LMC)").evidence.startswith(
        "error barriers k=0: 0.3, k=100: 0.01, k=200: nan: stable from k=100"
    )


def test_several_runs_are_diagnosed_each(tmp_path):
    write_run(tmp_path / "version_0", scalars={"ntk/relative_change": 0.01})
    write_run(tmp_path / "version_1", scalars={"ntk/relative_change": 0.5})
    write_run(tmp_path / "other", scalars={"foo/bar": 1.0})  # not an lt_theory run: skipped, and said so
    report = diagnose(tmp_path)
    assert report.verdicts() == {
        "version_0: Feature learning (NTK drift)": "borderline",
        "version_1: Feature learning (NTK drift)": "holds",
    }
    assert report.skipped == ["other"]
    assert "| run | condition |" in report.to_markdown()


def test_bad_input_says_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="no log directory at .*nowhere"):
        diagnose(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no TensorBoard event files"):
        diagnose(tmp_path)
    folder = write_run(tmp_path / "plain", scalars={"foo/bar": 1.0, "hp_metric": -1.0})
    with pytest.raises(ValueError) as error:
        diagnose(folder)
    message = str(error.value)
    assert str(folder) in message
    assert all(
        f"{prefix}/" in message for prefix in ("landscape", "spectral", "ntk", "lmc", "imp", "dd", "train")
    )


def test_command_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", scalars={"landscape/sharpness_x_lr": 40.0})
    result = subprocess.run(
        [sys.executable, "-m", "lt_theory.report", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "| Smoothness vs learning rate | 40 | < 2 (gradient descent" in result.stdout
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    quiet = write_run(tmp_path / "quiet", scalars={"landscape/sharpness_x_lr": 1.0})
    assert main([str(quiet), "--no-write", "--table-only"]) == 0
    assert "| Smoothness vs learning rate | 1 | < 2" in capsys.readouterr().out
    assert sorted(p.name for p in quiet.iterdir()) == [p.name for p in quiet.glob("events.out.tfevents.*")]
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "error: no log directory at" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# A real run.


def test_a_real_run_with_spectral_and_ntk_monitors(tmp_path, capsys):
    module, data = make_module_and_data()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0, default_hp_metric=False)
    callbacks = [
        SpectralNormMonitor(every_n_steps=3, bound_every_n_steps=6, probe_size=8),
        NTKDrift(every_n_steps=3, probe_size=8),
        TheoryReport(),
    ]
    trainer = make_trainer(tmp_path, callbacks=callbacks, logger=logger)
    trainer.fit(module, datamodule=data)
    live = callbacks[-1].report
    assert "| Feature learning (NTK drift) |" in capsys.readouterr().out
    report = diagnose(logger.log_dir)
    assert_advice_ordered(report)
    for condition in (
        "Normalised margins",
        "Feature learning (NTK drift)",
        "Finite loss",
        "Training loss below chance",
    ):  # num_classes from hparams.yaml
        assert report.finding(condition).verdict != "unknown", report.finding(condition)
    assert report.finding("Feature learning (NTK drift)").value == pytest.approx(
        callbacks[1].history[-1]["relative_change"], rel=1e-6
    )
    assert report.finding("Lipschitz bound growth").quantity == "spectral/lipschitz_upper"
    assert [f[:6] for f in live.findings] == [f[:6] for f in report.findings]  # the callback saw the same run
    assert (Path(logger.log_dir) / "report.html").is_file()
    assert (
        "data:image/png;base64," in (Path(logger.log_dir) / "report.html").read_text()
    )  # the spectra, sigmas


def test_hparams_yaml_is_read_without_instantiating_anything(tmp_path):
    run = write_run(tmp_path / "run", scalars={"train/loss_epoch": [(0, 2.3), (9, 2.3)]})
    marker = tmp_path / "executed"
    (run / "hparams.yaml").write_text(
        f"num_classes: 10\nbetas: !!python/tuple [0.9, 0.999]\nhook: !!python/object/apply:os.system "
        f"['touch {marker}']\n"
    )
    finding = diagnose(run).finding("Training loss below chance")
    assert finding.verdict == "violated" and "(C = 10)" in finding.reference
    assert not marker.exists()


def test_a_real_run_with_the_landscape_monitor(tmp_path):
    landscape = pytest.importorskip("lt_theory.callbacks.landscape")
    module, data = make_module_and_data()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0, default_hp_metric=False)
    monitor = landscape.LossLandscapeMonitor(every_n_steps=3, probe_size=16)
    make_trainer(tmp_path, callbacks=[monitor], logger=logger).fit(module, datamodule=data)
    report = diagnose(logger.log_dir)
    assert_advice_ordered(report)
    last = monitor.history[-1]
    smooth = report.finding("Smoothness vs learning rate")
    largest = max(record["sharpness_x_lr"] for record in monitor.history)  # a schedule's end hides it
    assert smooth.value == pytest.approx(largest, rel=1e-6)
    assert smooth.reference.startswith(
        "< 3.8 (heavy-ball momentum 0.9"
    )  # the module's SGD, from hparams.yaml
    steps = report.runs[0].scalars["landscape/loss"][-1][0]
    assert report.finding("PL condition").value == pytest.approx(steps / last["condition"], rel=1e-5)
    conditioning = report.finding("Activation conditioning")  # 16 probe examples, 64 features into net.fc
    assert conditioning.verdict != "unknown" and "not judged" in conditioning.evidence
    assert "net.fc" in conditioning.evidence.split("not judged")[1]
    for condition in ("BatchNorm lowers conditioning", "Gradient health"):
        assert report.finding(condition).verdict != "unknown"


def test_a_trainer_without_tensorboard(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    trainer = make_trainer(tmp_path, logger=CSVLogger(str(tmp_path)))
    with pytest.raises(
        ValueError, match="reads what the callbacks logged to TensorBoard, but the trainer has CSVLogger"
    ):
        diagnose(trainer)
    callback = TheoryReport()
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        callback.on_fit_end(trainer, None)
    assert callback.report is None
    with pytest.raises(ValueError, match="`num_classes` must be an integer >= 2"):
        TheoryReport(num_classes=1)


def test_only_global_rank_zero_reports(tmp_path, monkeypatch):
    """Under DDP every rank calls on_fit_end: the others neither read the logs nor write a file."""
    from types import SimpleNamespace

    from lt_theory.report import callback as report_callback

    calls = []
    monkeypatch.setattr(report_callback, "diagnose", lambda *args, **kwargs: calls.append(args))
    callback = TheoryReport()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    callback.on_fit_end(SimpleNamespace(is_global_zero=False, loggers=[logger], logger=logger), None)
    assert calls == [] and callback.report is None and not list(tmp_path.iterdir())
