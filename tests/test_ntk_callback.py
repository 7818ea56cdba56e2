"""NTKDrift in real training runs: its logged numbers against the measures applied independently, a model
linear in its parameters (kernel constant to the last bit), the verdict, and bad input.

The runs are the contract suite's tiny one (ResNet-8, synthetic CIFAR, 6 steps of 16 examples per epoch, two
epochs) unless a test needs another model. Logged values are read back from a CSVLogger's ``metrics.csv``.
"""

from __future__ import annotations

import copy
import csv
import math
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from recorders import StatesAtSteps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_theory.callbacks import ntk as ntk_callback
from lt_theory.callbacks.ntk import NTKDrift
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.measures.ntk import (
    empirical_ntk,
    kernel_alignment,
    kernel_distance,
    kernel_spectrum,
    relative_change,
)
from lt_theory.models import MLP
from lt_theory.module import ClassificationModule

REL = 1e-5  # logged (float32 kernels, then Python floats) against recomputed values
EVERY = 3
PROBE = 8
TAGS = (
    "relative_change",
    "distance_from_init",
    "velocity",
    "alignment",
    "trace",
    "eig_max",
    "effective_rank",
)



def logged(logger: CSVLogger) -> dict[str, dict[int, float]]:
    """``{quantity: {step: value}}`` of the ``ntk/`` tags in the logger's metrics.csv."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key.startswith("ntk/") and value != "":
                    series[key.removeprefix("ntk/")][int(row["step"])] = float(value)
    return series


def assert_close(actual: float, expected: float, what: str) -> None:
    assert actual == pytest.approx(expected, rel=REL, abs=1e-12), what


# ------------------------------------------------------------------------------------------------------------
# The logged numbers are the measures.


@pytest.mark.parametrize("kind", ["pntk", "full"])
def test_logged_numbers_equal_the_measures_applied_independently(kind, tmp_path, monkeypatch):
    printed = []
    monkeypatch.setattr(ntk_callback, "rank_zero_info", printed.append)
    module, data = make_module_and_data(seed=0)
    drift = NTKDrift(every_n_steps=EVERY, probe_size=PROBE, kind=kind)
    snapshots = StatesAtSteps(lambda step: step % EVERY == 0)
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one warning: no TensorBoardLogger
        trainer = make_trainer(tmp_path, [drift, snapshots], logger=logger)
        trainer.fit(module, datamodule=data)
    series = logged(logger)
    steps = list(range(0, trainer.global_step + 1, EVERY))
    assert trainer.global_step == 12 and sorted(series["relative_change"]) == steps

    # the same initial model from the same seed, and the probe from the data module
    initial_module, initial_data = make_module_and_data(seed=0)
    for name, value in initial_module.state_dict().items():
        assert torch.equal(value, snapshots.states[0][name]), name
    x, y, _ = initial_data.probe(PROBE, split="train", seed=0)
    assert torch.equal(drift.probe.inputs, x) and torch.equal(drift.probe.targets, y)
    kernels = {0: empirical_ntk(initial_module, x, kind=kind)}
    for step in steps[1:]:
        initial_module.load_state_dict(snapshots.states[step])
        kernels[step] = empirical_ntk(initial_module, x, kind=kind)
    # the final kernel from the trained module itself
    assert torch.equal(empirical_ntk(module, x, kind=kind), kernels[steps[-1]])
    expected_shape = (PROBE, PROBE, 10, 10) if kind == "full" else (PROBE, PROBE)
    assert kernels[0].shape == expected_shape

    for step in steps:
        kernel, spectrum = kernels[step], kernel_spectrum(kernels[step])
        expected = {
            "relative_change": relative_change(kernel, kernels[0]).item(),
            "distance_from_init": kernel_distance(kernel, kernels[0]).item(),
            "alignment": kernel_alignment(kernel, y).item(),
            "trace": spectrum.trace.item(),
            "eig_max": spectrum.eigenvalues[0].item(),
            "effective_rank": spectrum.effective_rank.item(),
        }
        if step > 0:  # kernel distance to the previous measurement per step elapsed
            expected["velocity"] = kernel_distance(kernel, kernels[step - EVERY]).item() / EVERY
        for quantity in TAGS:
            if quantity in expected:
                assert_close(series[quantity][step], expected[quantity], f"{quantity} at step {step}")
            else:
                assert step not in series[quantity], "no velocity before there are two kernels"
    assert series["relative_change"][0] == 0.0 and series["distance_from_init"][0] == 0.0

    # a run that moved its kernel by more than the threshold reads as feature learning, and says so at fit end
    last = series["relative_change"][steps[-1]]
    assert last > drift.lazy_threshold
    assert "Verdict: feature learning" in drift.verdict()
    assert f"relative change of {last:.3g}" in drift.verdict()
    assert printed == [f"NTKDrift: {drift.verdict()}"]


# ------------------------------------------------------------------------------------------------------------
# What the callback computes itself, against kernels built here with torch.func.


def pntk_by_hand(module: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    """The pNTK of ``module`` at ``state`` in float64, eval mode: ``J J^T`` for the gradients ``J`` of
    ``g(x) = sum_a f_a(x) / sqrt(O)`` with respect to every parameter (no lt_theory code)."""
    model = copy.deepcopy(module).double()
    model.load_state_dict(state)
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def g(p, example):
        out = torch.func.functional_call(model, (p, buffers), (example[None],))[0]
        return out.sum() / math.sqrt(out.numel())

    jacobians = torch.func.vmap(torch.func.grad(g), in_dims=(None, 0))(params, x.double())
    return sum(j.reshape(len(x), -1) @ j.reshape(len(x), -1).T for j in jacobians.values())


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (1 - (a * b).sum() / (a.norm() * b.norm())).item()


class FigureData:
    """Stands in for ``log_figure``: keeps the y data of every line, by step."""

    def __init__(self) -> None:
        self.lines: dict[int, list[list[float]]] = {}

    def __call__(self, trainer, name, figure, step=None) -> None:
        assert name == "eigenspectrum"
        self.lines[trainer.global_step] = [list(line.get_ydata()) for line in figure.axes[0].get_lines()]


def test_velocity_is_per_step_elapsed_across_a_resume_with_another_cadence(tmp_path):
    """Measured at 0, 3, 6 (every 3), stopped at step 6 and resumed every 4: 8, 12. The gaps are 3, 3, 2, 4,
    so dividing by ``every_n_steps``, by the steps since initialisation, or forgetting the previous step
    across the checkpoint gives other velocities. Kernels come from the weights recorded at those steps."""
    keep = StatesAtSteps(lambda step: step in {0, 3, 6, 8, 12})
    module, data = make_module_and_data(seed=0)
    first, first_figures = NTKDrift(every_n_steps=3, probe_size=PROBE), FigureData()
    first.log_figure = first_figures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first_logger = CSVLogger(tmp_path, name="first")
        trainer = make_trainer(tmp_path, [first, keep], logger=first_logger, max_steps=6)
        trainer.fit(module, datamodule=data)
        checkpoint = tmp_path / "step6.ckpt"
        trainer.save_checkpoint(checkpoint)
        module, data = make_module_and_data(seed=0)
        second, second_figures = NTKDrift(every_n_steps=4, probe_size=PROBE), FigureData()
        second.log_figure = second_figures
        second_logger = CSVLogger(tmp_path, name="second")
        trainer = make_trainer(tmp_path, [second, keep], logger=second_logger)
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint)
    assert trainer.global_step == 12 and sorted(keep.states) == [0, 3, 6, 8, 12]
    series = {quantity: {} for quantity in TAGS}
    for part in (logged(first_logger), logged(second_logger)):
        for quantity, values in part.items():
            series[quantity].update(values)
    assert sorted(series["velocity"]) == [3, 6, 8, 12]

    x, _, _ = make_module_and_data(seed=0)[1].probe(PROBE, split="train", seed=0)
    assert torch.equal(second.probe.inputs, x)
    reference, _ = make_module_and_data(seed=0)
    kernels = {step: pntk_by_hand(reference, state, x) for step, state in keep.states.items()}
    previous = 0
    for step in (3, 6, 8, 12):
        expected = cosine_distance(kernels[step], kernels[previous]) / (step - previous)
        assert_close(series["velocity"][step], expected, f"velocity at step {step}")
        previous = step
    for step, kernel in kernels.items():
        initial = kernels[0]
        change = ((kernel - initial).norm() / initial.norm()).item()
        assert_close(series["relative_change"][step], change, f"relative change at step {step}")
        assert_close(
            series["distance_from_init"][step], cosine_distance(kernel, initial), f"distance at {step}"
        )
        assert_close(series["trace"][step], kernel.trace().item(), f"trace at step {step}")
        eigenvalues = torch.linalg.eigvalsh(kernel).flip(0)
        assert_close(series["eig_max"][step], eigenvalues[0].item(), f"eig_max at step {step}")
        # the figure: the top eigenvalues at initialisation and at this step
        if step > 0:
            figures = first_figures if step <= 6 else second_figures
            at_init, now = figures.lines[step]
            scale = eigenvalues[0].item()
            for drawn, exact in ((at_init, torch.linalg.eigvalsh(initial).flip(0)), (now, eigenvalues)):
                torch.testing.assert_close(
                    torch.tensor(drawn, dtype=torch.float64),
                    exact.clamp_min(1e-30),
                    rtol=1e-4,
                    atol=1e-5 * scale,
                )
    assert sorted(first_figures.lines) == [3, 6] and sorted(second_figures.lines) == [8, 12]

    # the verdict of the resumed run, from the kernels above: regime against the threshold, the half-way step
    change = ((kernels[12] - kernels[0]).norm() / kernels[0].norm()).item()
    distances = {step: cosine_distance(kernels[step], kernels[0]) for step in sorted(kernels)}
    half = next(step for step, d in distances.items() if d >= 0.5 * distances[12])
    text = second.verdict()
    assert f"relative change of {change:.3g} " in text and f"kernel distance of {distances[12]:.3g} " in text
    assert f"half of that distance was reached by step {half}." in text
    second.lazy_threshold = change * (1 + 1e-3)
    assert "Verdict: lazy" in second.verdict()
    second.lazy_threshold = change * (1 - 1e-3)
    assert "Verdict: feature learning" in second.verdict()


# ------------------------------------------------------------------------------------------------------------
# A model linear in its parameters has a constant kernel.


class RandomFeatures(nn.Module):
    """``f(x) = W phi(x) + b`` with fixed random features ``phi(x) = tanh(A x / sqrt(d))``: linear in (W, b)."""

    def __init__(self, features: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, features), nn.Tanh())
        self.features.requires_grad_(False)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("kind", ["pntk", "trace", "full"])
def test_model_linear_in_its_parameters_has_a_constant_kernel(kind, tmp_path):
    torch.manual_seed(0)
    net = RandomFeatures()
    module = ClassificationModule(net, lr=0.5, schedule="constant")
    data = SyntheticCIFARDataModule(num_train=96, num_test=32, batch_size=16, seed=0)
    drift = NTKDrift(every_n_steps=2, probe_size=PROBE, kind=kind)
    logger = CSVLogger(tmp_path, name="csv")
    head_before = net.head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, [drift], logger=logger, max_epochs=1)
        trainer.fit(module, datamodule=data)
    assert not torch.allclose(net.head.weight, head_before)  # the parameters did move
    series = logged(logger)
    assert sorted(series["relative_change"]) == [0, 2, 4, 6]
    for quantity in ("relative_change", "distance_from_init"):
        assert all(abs(value) <= 1e-12 for value in series[quantity].values()), (quantity, series[quantity])
    assert all(abs(value) <= 1e-12 for value in series["velocity"].values())
    assert "Verdict: lazy" in drift.verdict()
    # and the kernel is the closed form: K[i, j, a, b] = (<phi_i, phi_j> + 1) delta_ab (bias included)
    phi = net.features(drift.probe.inputs)
    gram = phi @ phi.T + 1
    expected = {"full": torch.einsum("ij,ab->ijab", gram, torch.eye(10)), "trace": gram, "pntk": gram}[kind]
    torch.testing.assert_close(drift.initial_kernel, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The verdict.


class ZeroLearningRate(ClassificationModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_verdict_is_lazy_when_the_learning_rate_is_zero(tmp_path):
    # an MLP: with BatchNorm, the eval-mode kernel would still move with the running statistics
    torch.manual_seed(0)
    module = ZeroLearningRate(MLP((3, 32, 32), hidden=(32,)), schedule="constant")
    data = SyntheticCIFARDataModule(num_train=96, num_test=32, batch_size=16, seed=0)
    drift = NTKDrift(every_n_steps=3, probe_size=PROBE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [drift], max_epochs=1).fit(module, datamodule=data)
    assert [h["step"] for h in drift.history] == [0, 3, 6]
    assert all(h["relative_change"] == 0.0 and h["distance_from_init"] == 0.0 for h in drift.history)
    text = drift.verdict()
    assert "Verdict: lazy" in text and "relative change of 0 " in text and "half of that" not in text


def crafted(history: list[dict], threshold: float = 0.1) -> NTKDrift:
    drift = NTKDrift(lazy_threshold=threshold, kind="trace")
    drift.probe.inputs = torch.zeros(16, 3)
    drift.history = [
        {"step": s, "relative_change": c, "distance_from_init": d, "alignment": a} for s, c, d, a in history
    ]
    return drift


def test_verdict_on_crafted_histories():
    lazy = crafted([(0, 0.0, 0.0, 0.2), (100, 0.04, 0.001, 0.25), (200, 0.09, 0.002, 0.3)])
    assert lazy.verdict() == (
        "Over 200 steps the trace kernel on 16 probe examples moved by a relative change of 0.09 (threshold "
        "0.1) and a kernel distance of 0.002 from initialisation; half of that distance was reached by step "
        "100. Verdict: lazy (kernel regime): the network trains close to its linearisation at initialisation. "
        "Kernel-target alignment went from 0.2 to 0.3."
    )
    # the regime is read from the last measurement, against the threshold
    rich = crafted([(0, 0.0, 0.0, 0.2), (100, 0.5, 0.2, 0.4), (200, 0.9, 0.3, 0.6)])
    assert "Verdict: feature learning (rich regime)" in rich.verdict()
    assert "half of that distance was reached by step 100" in rich.verdict()  # 0.2 >= 0.3 / 2
    exactly_half = crafted([(0, 0.0, 0.0, 0.2), (100, 0.5, 0.25, 0.4), (200, 0.9, 0.5, 0.6)])
    assert "half of that distance was reached by step 100" in exactly_half.verdict()  # 0.25 >= 0.5 / 2
    assert "Verdict: lazy" in crafted([(0, 0.0, 0.0, 0.2), (200, 0.9, 0.3, 0.6)], threshold=0.95).verdict()
    assert "Verdict: feature learning" in crafted([(0, 0.0, 0.0, 0.2), (9, 0.1, 0.1, 0.2)]).verdict()
    # not measurable: the last defined numbers are quoted
    broken = crafted([(0, 0.0, 0.0, 0.2), (100, 0.5, 0.2, 0.4), (200, math.nan, math.nan, math.nan)])
    assert broken.verdict() == (
        "Over 200 steps the trace kernel on 16 probe examples is not measurable since step 200 (not finite: "
        "NaN or Inf in the weights or activations; or zero at initialisation). The last defined measurement, "
        "at step 100, had moved by a relative change of 0.5 (threshold 0.1). Verdict: undetermined."
    )
    never = crafted([(0, math.nan, math.nan, math.nan), (100, math.nan, math.nan, math.nan)])
    assert never.verdict().endswith(
        "since step 0 (not finite: NaN or Inf in the weights or activations; or zero "
        "at initialisation). Verdict: undetermined."
    )


# ------------------------------------------------------------------------------------------------------------
# Bad input.


def test_probe_larger_than_the_data_is_refused_naming_probe_size(tmp_path):
    module, data = make_module_and_data(seed=0)
    drift = NTKDrift(every_n_steps=EVERY, probe_size=500)
    trainer = make_trainer(tmp_path, [drift])
    with pytest.raises(
        ValueError, match=r"`probe_size` must be at most the 96 examples of the 'train' split"
    ):
        trainer.fit(module, datamodule=data)
    module, data = make_module_and_data(seed=0)
    drift = NTKDrift(every_n_steps=EVERY, probe_size=33, probe_split="test")
    with pytest.raises(ValueError, match=r"at most the 32 examples of the 'test' split .* got 33"):
        make_trainer(tmp_path, [drift]).fit(module, datamodule=data)


def test_probe_from_a_batch_smaller_than_probe_size_is_clamped_with_a_warning(tmp_path):
    torch.manual_seed(0)
    module = ClassificationModule(MLP((3, 8, 8), hidden=(8,)), lr=0.1, schedule="constant")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 8, 8, generator=generator), torch.randint(0, 10, (24,), generator=generator)
    drift = NTKDrift(every_n_steps=2, probe_size=PROBE)
    with pytest.warns(UserWarning, match="`probe_size` is 8 but the first training batch has 4 examples"):
        make_trainer(tmp_path, [drift], max_epochs=1).fit(
            module, DataLoader(TensorDataset(x, y), batch_size=4)
        )
    assert torch.equal(drift.probe.inputs, x[:4]) and torch.equal(drift.probe.targets, y[:4])
    assert len(drift.history) == 4  # steps 0, 2, 4, 6


class ExtraDimension(ClassificationModule):
    """Logits of shape (N, 10, 1): the training step copes, the NTK does not."""

    def forward(self, x):
        return self.net(x).unsqueeze(-1)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]).squeeze(-1), batch[1])


def test_model_output_not_n_by_o_is_refused_with_its_shape(tmp_path):
    torch.manual_seed(0)
    module = ExtraDimension(MLP((3, 32, 32), hidden=(8,)), schedule="constant")
    data = SyntheticCIFARDataModule(num_train=32, num_test=16, batch_size=16, seed=0)
    with pytest.raises(ValueError, match=r"shape \(n, O\).*got shape \(2, 10, 1\) for 2 inputs"):
        trainer = make_trainer(
            tmp_path, [NTKDrift(probe_size=4)], limit_val_batches=0, num_sanity_val_steps=0
        )
        trainer.fit(module, datamodule=data)
    assert module.training


class Poison(Callback):
    """Puts a NaN into the first weight before training, or after a given step."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def _poison(self, pl_module) -> None:
        with torch.no_grad():
            next(pl_module.parameters()).view(-1)[0] = math.nan

    def on_train_start(self, trainer, pl_module) -> None:
        if self.step is None:
            self._poison(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._poison(pl_module)


@pytest.mark.parametrize("poisoned_after", [4, None], ids=["mid-training", "from-the-start"])
def test_nan_kernel_is_logged_as_nan_with_one_warning_and_training_goes_on(poisoned_after, tmp_path):
    module, data = make_module_and_data(seed=0)
    drift = NTKDrift(every_n_steps=EVERY, probe_size=4)
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [Poison(poisoned_after), drift], logger=logger)
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 12  # training went on to the end
    ours = [str(w.message) for w in caught if str(w.message).startswith("NTKDrift:")]
    first_nan = 0 if poisoned_after is None else 6
    nonfinite = [m for m in ours if "not finite" in m]
    assert len(nonfinite) == 1, ours
    assert f"not finite at step {first_nan}" in nonfinite[0] and "training goes on" in nonfinite[0]
    assert len(ours) == 2 and "TensorBoardLogger" in (set(ours) - set(nonfinite)).pop()  # CSVLogger only
    series = logged(logger)
    for quantity in TAGS:
        for step in range(0, 13, EVERY):
            if quantity == "velocity" and step == 0:
                assert step not in series[quantity]  # no velocity with one kernel
            elif step < first_nan:
                assert math.isfinite(series[quantity][step]), (quantity, step)
            else:
                assert math.isnan(series[quantity][step]), (quantity, step)
    assert "Verdict: undetermined" in drift.verdict()
    assert f"not measurable since step {first_nan}" in drift.verdict()
