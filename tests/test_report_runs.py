"""The report on real training runs, each built to break one condition: a Lightning Trainer with
LossLandscapeMonitor and a TensorBoardLogger, read back by `diagnose(log_dir)`; the verdict of the broken condition
and the first advice of the report (issue #13).

- a learning rate far past 2 / sharpness (plain SGD, lr = 20 / the sharpness measured at initialisation): the
  loss goes to NaN; the smoothness rule explains it, so the first advice is to lower the rate to 2 / sharpness;
- inputs multiplied by 1000, no normalisation layer: normalising the inputs comes first, before the rate;
- the same x1000 inputs into a BatchNorm network: the normalisation layer absorbs the scale (the same sharpness and
  loss as on x1 inputs), so the input scale holds;
- a network too narrow for its data (width 1; the classes need |x_c|, two ReLUs each): a loss at chance, the bug
  checks first (one run cannot tell capacity from a bug), then "wider"; its width-64 twin fits;
- shuffled labels: a loss at chance, the labels first; the twin with the true labels fits;
- a healthy quick-start-like run (a BatchNorm ResNet on the synthetic CIFAR data, SGD with momentum, cosine
  schedule, the landscape, spectral, NTK and double-descent monitors): nothing violated.

The data are Gaussian clusters or |x|-classes of a few hundred points, the networks MLPs of 64 units or a ResNet-8 on
8x8 pooled images; every run is a few hundred steps at most (the file takes about 25 s on one CPU thread).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contract_setup import make_trainer
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.callbacks.landscape import LossLandscapeMonitor
from lt_theory.callbacks.ntk import NTKDrift
from lt_theory.callbacks.spectral import SpectralNormMonitor
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.measures.landscape import sharpness
from lt_theory.models import MLP, CIFARResNet, PooledInput
from lt_theory.module import ClassificationModule
from lt_theory.report import diagnose

pytestmark = [
    pytest.mark.filterwarnings("ignore:LossLandscapeMonitor.*not finite"),  # the diverging runs, on purpose
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
    pytest.mark.filterwarnings("ignore:DoubleDescentProbe.*label_noise=0"),  # clean labels, on purpose
]

CLASSES = 10
# examples of the landscape probe: more than the 32 input features, so their covariance has full rank
PROBE = 64


def clusters(seed: int = 0, n: int = 640, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten Gaussian clusters in ``d`` dimensions, standardised per feature (an MLP of 64 units fits them)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, d, generator=g)
    y = torch.arange(n) % CLASSES
    x = centres[y] + torch.randn(n, d, generator=g)
    return (x - x.mean(0)) / x.std(0), y


def largest_magnitude_classes(seed: int = 0, n: int = 640) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I_10), class argmax_c |x_c|: every class has mean 0, and telling class c needs |x_c| =
    relu(x_c) + relu(-x_c), two ReLUs per class; one ReLU unit cannot represent it for any c."""
    x = torch.randn(n, CLASSES, generator=torch.Generator().manual_seed(seed))
    return x, x.abs().argmax(1)


def fit(tmp_path, name, net, x, y, lr, epochs=3, momentum=0.0, every=5):
    """Train ``net`` on ``(x, y)`` (batches of 32, shuffled by its own generator) with plain SGD at ``lr``,
    LossLandscapeMonitor on the first ``PROBE`` examples, TensorBoard; return the report of the run and the
    monitor."""
    module = ClassificationModule(
        net, num_classes=CLASSES, lr=lr, momentum=momentum, weight_decay=0.0, schedule="constant"
    )
    monitor = LossLandscapeMonitor(every_n_steps=every, probe_inputs=x[:PROBE], probe_targets=y[:PROBE])
    logger = TensorBoardLogger(str(tmp_path), name=name, version=0, default_hp_metric=False)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    make_trainer(tmp_path, [monitor], logger=logger, max_epochs=epochs).fit(module, loader)
    return diagnose(logger.log_dir), monitor


def mlp(seed: int, in_features: int = 32, width: int = 64) -> MLP:
    seed_everything(seed, verbose=False)
    return MLP((in_features,), hidden=(width,), num_classes=CLASSES)


def sharpness_at_initialisation(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The top Hessian eigenvalue of the probe loss, measured here, before training (Lanczos to 1e-6)."""
    return sharpness(net, F.cross_entropy, [(x[:PROBE], y[:PROBE])], iters=40, tol=1e-6).value


def lower_the_rate(sharpness_value: float, step: int) -> str:
    return (
        f"Algorithm: Lower the learning rate to at most {2 / sharpness_value:.4g} (= 2 / sharpness "
        f"{sharpness_value:.4g} at step {step}): the step is too large for the curvature."
    )


# ------------------------------------------------------------------------------------------------------------
# The learning rate


@pytest.mark.parametrize("seed", [0, 1])
def test_a_learning_rate_20_times_2_over_sharpness_diverges_and_is_told_to_go_down_first(tmp_path, seed):
    x, y = clusters(seed)
    net = mlp(seed)
    beta = sharpness_at_initialisation(net, x, y)
    lr = 20 / beta
    report, monitor = fit(tmp_path, "lr", net, x, y, lr)
    start = monitor.history[0]
    # the same probe, measured by the monitor (8 Lanczos steps: a lower bound within a few per cent)
    assert start["step"] == 0 and start["sharpness"] == pytest.approx(beta, rel=0.05)
    smooth = report.finding("Smoothness vs learning rate")
    assert smooth.verdict == "violated" and smooth.reference.startswith("< 2 (gradient descent)")
    largest = max(h["sharpness_x_lr"] for h in monitor.history if math.isfinite(h["sharpness_x_lr"]))
    assert smooth.value == pytest.approx(largest, rel=1e-5) and smooth.value >= 18
    # 2 / the sharpness at the step the rate was first too large for, not the sharpness of the diverging network
    advice = lower_the_rate(start["sharpness"], 0)
    assert smooth.advice[0] == advice and 2 / start["sharpness"] < lr / 9
    last = [h["sharpness"] for h in monitor.history if math.isfinite(h["sharpness"])][-1]
    assert abs(last / start["sharpness"] - 1) > 0.01
    # the run diverged: the measured cause explains the NaN, so the rate comes before the bug hunt
    finite = report.finding("Finite loss")
    assert finite.verdict == "violated" and not math.isfinite(finite.value)
    assert finite.advice == (
        f"{advice} (see 'Smoothness vs learning rate')",
        "Debug: Look for a bug: NaN or Inf in the inputs or labels, a log or a division by zero in the loss (give "
        "cross_entropy logits, not probabilities), a layer dividing by a zero statistic.",
    )
    assert report.advice()[0] == advice and report.advice()[1].startswith("Debug: Look for a bug")
    assert report.finding("PL condition").verdict == "unknown"  # a diverged network's PL is not judged
    # the input scale was measured, and holds: no "normalise the inputs" from the rules that cannot see it
    assert report.finding("Input scale").verdict == "holds"
    assert not any(item.startswith("Data:") for item in report.advice())


# ------------------------------------------------------------------------------------------------------------
# The data


def test_inputs_scaled_by_1000_without_normalisation_ask_for_normalisation_before_the_learning_rate(tmp_path):
    x, y = clusters()
    report, _ = fit(tmp_path, "x1000", mlp(0), 1000 * x, y, lr=0.05)
    scale = report.finding("Input scale")
    rms = float((1000 * x[:PROBE]).double().square().mean().sqrt())
    assert (scale.verdict, scale.quantity) == ("violated", "landscape/input_rms/net.net.1")
    assert scale.value == pytest.approx(rms, rel=1e-5)
    normalise = (
        f"Data: Normalise the inputs: net.net.1, the first layer, sees values of RMS {rms:.3g}, far above the 1 of "
        "standardised data."
    )
    assert scale.advice[0].startswith(normalise)
    assert report.advice()[0] == scale.advice[0]  # data before algorithm, and before the bug hunt
    assert [item for item in report.advice() if item.startswith("Data:")] == [scale.advice[0]]  # said once
    assert not any(item.startswith("Algorithm: Lower the learning rate") for item in report.advice()[:3])
    # the scale also made the step too large (sharpness ~ s^2) and the loss blow up: both point at the data
    for condition in ("Smoothness vs learning rate", "Finite loss"):
        finding = report.finding(condition)
        assert finding.verdict == "violated" and finding.advice[0].startswith(normalise), finding
    # the same pipeline on the standardised inputs: in range, nothing violated
    twin, _ = fit(tmp_path, "x1", mlp(0), x, y, lr=0.05)
    assert twin.finding("Input scale").verdict == "holds"
    assert "violated" not in twin.verdicts().values(), twin.verdicts()


class Scaled(SyntheticCIFARDataModule):
    """The synthetic CIFAR data with every normalised input multiplied by ``factor``."""

    def __init__(self, factor: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.factor = factor

    def transform_batch(self, images, training):
        return super().transform_batch(images, training) * self.factor


def test_a_batchnorm_right_after_the_first_layer_absorbs_the_input_scale(tmp_path):
    """ResNet's conv1 feeds bn1: inputs x1000 give the network the same loss, the same sharpness (measured at
    initialisation, against the same run on x1 inputs); the report sees the RMS and the BatchNorm after it."""
    reports, starts = {}, {}
    for factor in (1.0, 1000.0):
        seed_everything(0, verbose=False)
        module = ClassificationModule(PooledInput(CIFARResNet(depth=8), pool=4), lr=0.05, schedule="constant")
        data = Scaled(factor, num_train=32 * 4, num_test=32, batch_size=32, seed=0)
        logger = TensorBoardLogger(str(tmp_path), name=f"x{factor:g}", version=0, default_hp_metric=False)
        monitor = LossLandscapeMonitor(every_n_steps=4, probe_size=32)
        make_trainer(tmp_path, [monitor], logger=logger, max_epochs=1).fit(module, datamodule=data)
        reports[factor], starts[factor] = diagnose(logger.log_dir), monitor.history[0]
    assert starts[1000.0]["sharpness"] == pytest.approx(starts[1.0]["sharpness"], rel=1e-3)
    assert starts[1000.0]["loss"] == pytest.approx(starts[1.0]["loss"], rel=1e-4)
    for factor, report in reports.items():
        scale = report.finding("Input scale")
        assert scale.quantity == "landscape/input_rms/net.net.conv1" and scale.verdict == "holds"
        assert scale.value == pytest.approx(factor * reports[1.0].finding("Input scale").value, rel=1e-4)
    assert "net.net.bn1, a normalisation layer" in reports[1000.0].finding("Input scale").evidence


# ------------------------------------------------------------------------------------------------------------
# Capacity and labels


def test_a_network_too_narrow_for_its_data_is_told_bug_checks_first_then_wider(tmp_path):
    """One run cannot tell a network too small from a bug (its wider twin can): the report says the loss is at
    chance, the bug checks come first (labels, then overfitting one small batch: Karpathy's order) and "wider"
    after them."""
    x, y = largest_magnitude_classes()
    report, _ = fit(tmp_path, "narrow", mlp(0, in_features=CLASSES, width=1), x, y, lr=0.5, epochs=4)
    chance = report.finding("Training loss below chance")
    assert chance.verdict == "violated" and chance.value >= 0.95
    assert report.finding("Smoothness vs learning rate").verdict == "holds"  # no measured cause: the bug hunt
    stages = [item.split(":", 1)[0] for item in chance.advice]
    assert stages == ["Debug", "Debug", "Algorithm"]
    assert chance.advice[0].startswith("Debug: Check the labels and the pipeline")
    assert chance.advice[1].startswith("Debug: Overfit one small batch")
    assert "make it wider" in chance.advice[2]
    advice = report.advice()
    assert advice[0] == chance.advice[0] and report.leads == {}
    assert advice.index(chance.advice[1]) < advice.index(chance.advice[2])
    wide, _ = fit(tmp_path, "wide", mlp(0, in_features=CLASSES, width=64), x, y, lr=0.5, epochs=4)
    assert wide.finding("Training loss below chance").value < 0.8
    assert "violated" not in wide.verdicts().values(), wide.verdicts()


def test_shuffled_labels_keep_the_loss_at_chance_and_point_at_the_labels(tmp_path):
    x, y = clusters()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    report, _ = fit(tmp_path, "shuffled", mlp(0), x, shuffled, lr=0.05)
    chance = report.finding("Training loss below chance")
    assert chance.verdict == "violated" and chance.value >= 0.98
    labels = "Debug: Check the labels and the pipeline: labels aligned with their inputs"
    assert chance.advice[0].startswith(labels)
    assert report.advice()[0] == chance.advice[0]
    assert [c for c, v in report.verdicts().items() if v == "violated"] == ["Training loss below chance"]
    truth, _ = fit(tmp_path, "labels", mlp(0), x, y, lr=0.05)
    assert truth.finding("Training loss below chance").value < 0.7
    assert "violated" not in truth.verdicts().values(), truth.verdicts()


# ------------------------------------------------------------------------------------------------------------
# A healthy run


def test_a_healthy_quick_start_run_has_nothing_violated(tmp_path):
    """The quick start in small: a BatchNorm ResNet (ResNet-8 on 8x8 pooled inputs) on the synthetic CIFAR data,
    SGD with momentum 0.9 at lr 0.1 on a cosine schedule, 256 steps, with the monitors the report reads."""
    seed_everything(0, verbose=False)
    module = ClassificationModule(PooledInput(CIFARResNet(depth=8), pool=4), lr=0.1, schedule="cosine")
    data = SyntheticCIFARDataModule(num_train=32 * 16, num_test=128, batch_size=32, seed=0)
    logger = TensorBoardLogger(str(tmp_path), name="quick", version=0, default_hp_metric=False)
    callbacks = [
        LossLandscapeMonitor(every_n_steps=32, probe_size=32),
        SpectralNormMonitor(every_n_steps=32, bound_every_n_steps=64, probe_size=32),
        NTKDrift(every_n_steps=32, probe_size=16),
        DoubleDescentProbe(every_n_epochs=2, train_subset_size=128),
    ]
    make_trainer(tmp_path, callbacks, logger=logger, max_epochs=16).fit(module, datamodule=data)
    report = diagnose(logger.log_dir)
    verdicts = report.verdicts()
    assert "violated" not in verdicts.values(), verdicts
    assert report.advice() == [], report.advice()
    for condition in (
        "Finite loss",
        "Training loss decreases",
        "Training loss below chance",
        "PL condition",
        "Smoothness vs learning rate",
        "Input scale",
        "Activation conditioning",
        "BatchNorm lowers conditioning",
        "Gradient health",
        "Normalised margins",
        "Feature learning (NTK drift)",
    ):
        assert verdicts[condition] == "holds", (condition, report.finding(condition))


# ------------------------------------------------------------------------------------------------------------
# The measurements behind the input-scale limits (rules.py, INPUT_SCALE)


def train_scaled(scale: float, lr: float, seed: int = 0) -> float:
    """Plain SGD on the clusters times ``scale``: 3 epochs of batches of 32; the full training loss after."""
    x, y = clusters(seed)
    x = x * scale
    net = mlp(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(3):
        for batch in torch.randperm(len(x), generator=order).split(32):
            optimizer.zero_grad()
            F.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def test_input_scale_limits_where_learning_rates_stop_working():
    """A decade from unit scale, a learning rate that trains the standardised data fails; within half a decade
    the three rates tried all train. The sharpness at initialisation grows about as the square of the scale."""
    x, y = clusters()
    beta = {s: sharpness_at_initialisation(mlp(0), s * x, y) for s in (1.0, 3.0, 10.0)}
    assert 5 < beta[3.0] / beta[1.0] < 10 and beta[10.0] / beta[1.0] > 50  # measured x7.2 and x74
    chance = 0.95 * math.log(CLASSES)
    for lr in (0.05, 0.1, 0.5):
        assert train_scaled(1.0, lr) < chance
        for scale in (10**-0.5, 10**0.5):  # the "holds" band's ends
            assert train_scaled(scale, lr) < chance, (scale, lr)
    assert not train_scaled(10.0, 0.5) < chance  # diverges: NaN (measured)
    assert train_scaled(0.1, 0.05) >= chance  # stays at chance (2.28, measured)
