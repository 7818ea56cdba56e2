"""LossLandscapeMonitor in real training runs: every logged number against an independent recomputation at the
weights recorded at that step, the running minimum and the observed rate across a resume, the learning rate of
the scheduler, and bad input.

The main run trains, in float64, ``Linear(8, 6) -> BatchNorm1d -> tanh -> Linear(6, 3)`` (87 parameters, so the
dense Hessian is cheap) for 12 steps with a cosine learning rate, measured every 3 steps on a given probe. The
references are written out by hand here: the network's eval-mode forward from the recorded weights and running
statistics, its loss, gradient and dense Hessian by torch.autograd / torch.func.hessian, eigenvalues by
torch.linalg.eigvalsh, covariances by torch.cov and torch.linalg.cond. Logged values are read back from a
CSVLogger's ``metrics.csv``.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from recorders import StatesAtSteps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_theory import loggers
from lt_theory.callbacks import landscape as landscape_callback
from lt_theory.callbacks.landscape import LossLandscapeMonitor
from lt_theory.module import ClassificationModule

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

EVERY = 3
STEPS = 12
LR = 0.5
REL = 1e-8  # float64 run against float64 references
LAYERS = ("net.0", "net.1", "net.3")



def small_module(seed: int = 0) -> ClassificationModule:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    return ClassificationModule(net, num_classes=3, lr=LR, schedule="cosine", weight_decay=0.0)


def small_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g, dtype=torch.float64) * torch.linspace(
        0.2, 3.0, 8, dtype=torch.float64
    )
    return x + 1.0, torch.randint(0, 3, (96,), generator=g)


def fit_small(tmp_path, monitor, *extra, logger=None, ckpt_path=None, max_steps=-1, module=None):
    x, y = small_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    module = small_module() if module is None else module
    trainer = make_trainer(
        tmp_path, [monitor, *extra], logger=logger, precision="64-true", max_steps=max_steps, max_epochs=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def small_monitor(**overrides) -> LossLandscapeMonitor:
    x, y = small_data()
    settings = dict(
        every_n_steps=EVERY, probe_inputs=x[:24], probe_targets=y[:24], sharpness_iters=87, sharpness_tol=0.0
    )
    settings.update(overrides)
    return LossLandscapeMonitor(**settings)


def logged(logger, prefix: str = "landscape/") -> dict[str, dict[int, float]]:
    """``{quantity: {step: value}}`` of the tags under ``prefix`` in the logger's metrics.csv."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if key.startswith(prefix) and value != "":
                    series[key.removeprefix(prefix)][int(row["step"])] = float(value)
    return series


# --------------------------------------------------------------------------------------------------
# The network written out by hand, at recorded weights
# --------------------------------------------------------------------------------------------------

SHAPES = {
    "net.0.weight": (6, 8),
    "net.0.bias": (6,),
    "net.1.weight": (6,),
    "net.1.bias": (6,),
    "net.3.weight": (3, 6),
    "net.3.bias": (3,),
}


class HandNetwork:
    """The forward of a training step (BatchNorm on the probe's own mean and biased variance), its loss, gradient
    and Hessian, of the small network at one recorded state."""

    def __init__(self, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
        self.state, self.x, self.y = state, x, y
        self.theta = torch.cat([state[name].reshape(-1) for name in SHAPES]).double()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts, offset = {}, 0
        for name, shape in SHAPES.items():
            parts[name] = theta[offset : offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
        return parts

    def activations(self, theta: torch.Tensor) -> list[torch.Tensor]:
        p = self.unflatten(theta)
        h1 = self.x @ p["net.0.weight"].T + p["net.0.bias"]
        normalised = (h1 - h1.mean(0)) / torch.sqrt(h1.var(0, unbiased=False) + 1e-5)
        h2 = normalised * p["net.1.weight"] + p["net.1.bias"]
        h3 = torch.tanh(h2)
        return [self.x, h1, h2, h3, h3 @ p["net.3.weight"].T + p["net.3.bias"]]

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        logits = self.activations(theta)[-1]
        return -torch.log_softmax(logits, dim=1).gather(1, self.y[:, None]).mean()

    def gradient(self) -> torch.Tensor:
        theta = self.theta.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(self.loss(theta), theta)
        return gradient

    def top_hessian_eigenvalue(self) -> float:
        return float(torch.linalg.eigvalsh(torch.func.hessian(self.loss)(self.theta))[-1])

    def layer_conditions(self) -> dict[str, tuple[float, float]]:
        a = self.activations(self.theta)
        pairs = {"net.0": (a[0], a[1]), "net.1": (a[1], a[2]), "net.3": (a[3], a[4])}
        cond = lambda f: float(torch.linalg.cond(torch.cov(f.T, correction=0)))  # noqa: E731
        return {name: (cond(i), cond(o)) for name, (i, o) in pairs.items()}

    def input_rms(self) -> dict[str, float]:
        a = self.activations(self.theta)
        return {name: float(torch.sqrt(torch.mean(f * f))) for name, f in zip(LAYERS, (a[0], a[1], a[3]))}


def cosine_lr(step: int) -> float:
    """The rate of the next step after ``step`` steps of CosineAnnealingLR(T_max=STEPS), eta_min 0."""
    return LR * (1 + math.cos(math.pi * step / STEPS)) / 2


# --------------------------------------------------------------------------------------------------
# Logged numbers against the references
# --------------------------------------------------------------------------------------------------


def test_every_logged_number_against_an_independent_recomputation(tmp_path):
    monitor = small_monitor()
    states = StatesAtSteps(lambda step: step % EVERY == 0)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = fit_small(tmp_path, monitor, states, logger=logger)
    series = logged(logger)
    steps = list(range(0, STEPS + 1, EVERY))
    assert trainer.global_step == STEPS and sorted(series["loss"]) == steps
    x, y = small_data()
    references = {step: HandNetwork(states.states[step], x[:24], y[:24]) for step in steps}
    pl_ratios, losses = {}, {}
    for step in steps:
        net = references[step]
        loss = float(net.loss(net.theta))
        gradient = net.gradient()
        grad_norm = float(gradient.norm())
        pl = grad_norm**2 / (2 * loss)
        beta = net.top_hessian_eigenvalue()
        lr = cosine_lr(step)
        pl_ratios[step], losses[step] = pl, loss
        expected = {
            "loss": loss,
            "grad_norm": grad_norm,
            "pl_ratio": pl,
            "pl_ratio_min": min(pl_ratios.values()),
            "sharpness": beta,
            "sharpness_x_lr": beta * lr,
            "condition": beta / pl,
            "predicted_rate": pl * lr * (2 - beta * lr),
        }
        if step > 0:  # from the logged losses, by hand
            previous = series["loss"][step - EVERY]
            expected["observed_rate"] = 1 - (series["loss"][step] / previous) ** (1 / EVERY)
        grads, weights = net.unflatten(gradient), net.unflatten(net.theta)
        for layer in LAYERS:
            g = torch.cat([grads[f"{layer}.weight"].reshape(-1), grads[f"{layer}.bias"]])
            w = torch.cat([weights[f"{layer}.weight"].reshape(-1), weights[f"{layer}.bias"]])
            expected[f"grad_to_weight/{layer}"] = float(g.norm() / w.norm())
        for layer, (input_condition, output_condition) in net.layer_conditions().items():
            expected[f"input_condition/{layer}"] = input_condition
            expected[f"output_condition/{layer}"] = output_condition
        for layer, rms in net.input_rms().items():
            expected[f"input_rms/{layer}"] = rms
        for quantity, value in expected.items():
            assert series[quantity][step] == pytest.approx(value, rel=REL, abs=1e-14), f"{quantity} at {step}"
        assert set(series) - {"observed_rate"} == set(expected) - {"observed_rate"}
        if step == 0:
            assert step not in series["observed_rate"]
    assert series["sharpness_x_lr"][STEPS] == 0.0  # the cosine schedule's last rate
    assert min(pl_ratios.values()) < pl_ratios[0]  # the running minimum is not the first value
    assert monitor.history[-1]["pl_ratio_min"] == monitor.pl_ratio_min == series["pl_ratio_min"][STEPS]


def test_the_learning_rate_is_the_schedulers_at_the_measurement(tmp_path):
    """A piecewise-constant schedule by step (0.5, then 0.05 from step 4): sharpness_x_lr / sharpness is the
    rate the optimizer holds after the step, the one of the next step."""
    module = ClassificationModule(
        small_module().net, num_classes=3, lr=LR, schedule="step", milestones=(4,), schedule_interval="step"
    )
    logger = CSVLogger(tmp_path, name="csv")
    fit_small(tmp_path, small_monitor(every_n_steps=2, sharpness_iters=20), logger=logger, module=module)
    series = logged(logger)
    rates = {step: series["sharpness_x_lr"][step] / series["sharpness"][step] for step in series["sharpness"]}
    expected = {step: (LR if step < 4 else LR * 0.1) for step in range(0, STEPS + 1, 2)}
    assert rates == pytest.approx(expected, rel=1e-12)


def test_observed_rate_and_running_minimum_across_a_resume_with_another_cadence(tmp_path):
    """Measured at 0, 3, 6 (every 3), stopped at step 6 and resumed every 4: 8, 12. The gaps are 3, 3, 2, 4: the
    observed rate must use the steps since the previous measurement, also across the checkpoint, and the
    running minimum must go on from the first part's."""
    first_logger, second_logger = CSVLogger(tmp_path, name="first"), CSVLogger(tmp_path, name="second")
    trainer = fit_small(tmp_path, small_monitor(every_n_steps=3), logger=first_logger, max_steps=6)
    checkpoint = tmp_path / "step6.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = small_monitor(every_n_steps=4)
    fit_small(tmp_path, resumed, logger=second_logger, ckpt_path=checkpoint)
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for part in (logged(first_logger), logged(second_logger)):
        for quantity, values in part.items():
            series[quantity].update(values)
    assert sorted(series["loss"]) == [0, 3, 6, 8, 12]
    loss = series["loss"]
    for step, previous in ((3, 0), (6, 3), (8, 6), (12, 8)):
        expected = 1 - (loss[step] / loss[previous]) ** (1 / (step - previous))
        assert series["observed_rate"][step] == pytest.approx(expected, rel=1e-12), step
    for step in (8, 12):
        so_far = [value for s, value in series["pl_ratio"].items() if s <= step]
        assert series["pl_ratio_min"][step] == min(so_far)
    assert [h["step"] for h in resumed.history] == [0, 3, 6, 8, 12]


def test_the_sharpness_vector_warm_starts_the_next_measurement_and_is_the_top_eigenvector(
    tmp_path, monkeypatch
):
    calls = []
    original = landscape_callback.sharpness

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args[5], result))  # (init, result)
        return result

    monkeypatch.setattr(landscape_callback, "sharpness", spy)
    monitor = small_monitor()
    states = StatesAtSteps(lambda step: step == STEPS)
    fit_small(tmp_path, monitor, states)
    assert len(calls) == 5 and calls[0][0] is None
    for (_, previous), (init, _) in zip(calls, calls[1:]):
        assert torch.equal(init, previous.vector)
    x, y = small_data()
    net = HandNetwork(states.states[STEPS], x[:24], y[:24])
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.func.hessian(net.loss)(net.theta))
    kept = monitor.state_dict()["sharpness_vector"]
    assert abs(float(kept @ eigenvectors[:, -1])) == pytest.approx(1.0, rel=1e-8)


# --------------------------------------------------------------------------------------------------
# A convolutional network with BatchNorm: the contract suite's run
# --------------------------------------------------------------------------------------------------


def recorder(captured: dict, name: str):
    """A forward hook keeping the first (input, output) of a layer under ``name``."""

    def hook(module, args, output) -> None:
        captured.setdefault(name, (args[0], output))

    return hook


def test_resnet_run_logs_loss_and_batchnorm_conditioning_at_the_recorded_weights(tmp_path):
    module, data = make_module_and_data(seed=0)
    monitor = LossLandscapeMonitor(every_n_steps=6, probe_size=8, sharpness_iters=3)
    states = StatesAtSteps(lambda step: step % 6 == 0)
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [monitor, states], logger=logger).fit(module, datamodule=data)
    series = logged(logger)
    x, y = monitor.probe.inputs, monitor.probe.targets
    reference, _ = make_module_and_data(seed=0)
    for step in (0, 6, 12):
        reference.load_state_dict(states.states[step])
        reference.train()  # BatchNorm on the probe's own statistics, as the monitor's default; a throwaway copy
        captured = {}
        hooks = [
            m.register_forward_hook(recorder(captured, name))
            for name, m in reference.named_modules()
            if isinstance(m, nn.BatchNorm2d)
        ]
        with torch.no_grad():
            loss = float(F.cross_entropy(reference(x), y))
        for hook in hooks:
            hook.remove()
        assert series["loss"][step] == pytest.approx(loss, rel=1e-6)
        for name, (inputs, outputs) in captured.items():
            for kind, features in (("input", inputs), ("output", outputs)):
                flat = features.transpose(0, 1).reshape(features.shape[1], -1).double()
                expected = float(torch.linalg.cond(torch.cov(flat, correction=0)))
                assert series[f"{kind}_condition/{name}"][step] == pytest.approx(expected, rel=1e-6), name
        assert series["sharpness"][step] > 0 and math.isfinite(series["pl_ratio"][step])
    assert len(captured) == 7 and all(f"grad_to_weight/{name}" in series for name in captured)


def test_custom_scalars_panel_is_added_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit_small(tmp_path, small_monitor(sharpness_iters=5), logger=logger, max_steps=3)
    layout = loggers.merged_layout(logger.experiment)["landscape"]
    assert layout["Per-step loss decrease: predicted by PL vs observed"] == [
        "Multiline",
        ["landscape/predicted_rate", "landscape/observed_rate"],
    ]
    assert layout["Gradient / weight norm per layer"] == ["Multiline", ["landscape/grad_to_weight/.*"]]


# --------------------------------------------------------------------------------------------------
# Bad data, missing labels, an undefined PL ratio, models it cannot measure
# --------------------------------------------------------------------------------------------------


def our_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("LossLandscapeMonitor")]


def fit_recording_warnings(tmp_path, monitor, logger):
    x, y = small_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    trainer = make_trainer(tmp_path, [monitor], logger=logger, precision="64-true", max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(small_module(), loader)
    return [m for m in our_warnings(caught) if "TensorBoardLogger" not in m], trainer


def test_nan_in_the_probe_is_logged_as_nan_with_one_warning_and_training_goes_on(tmp_path):
    x, y = small_data()
    poisoned = x[:24].clone()
    poisoned[3, 2] = math.nan
    logger = CSVLogger(tmp_path, name="csv")
    monitor = small_monitor(probe_inputs=poisoned, probe_targets=y[:24], sharpness_iters=5)
    messages, trainer = fit_recording_warnings(tmp_path, monitor, logger)
    assert trainer.global_step == 6
    assert len(messages) == 1 and "not finite" in messages[0], messages
    series = logged(logger)
    assert sorted(series["loss"]) == [0, 3, 6]
    for quantity in (
        "loss",
        "grad_norm",
        "pl_ratio",
        "sharpness",
        "condition",
        "input_condition/net.1",
        "input_rms/net.0",
    ):
        assert all(math.isnan(v) for v in series[quantity].values()), quantity


def test_a_probe_without_labels_logs_only_the_conditioning_with_one_warning(tmp_path):
    x, _ = small_data()
    logger = CSVLogger(tmp_path, name="csv")
    messages, _ = fit_recording_warnings(
        tmp_path, small_monitor(probe_targets=None, probe_inputs=x[:24]), logger
    )
    assert len(messages) == 1 and "no labels" in messages[0], messages
    series = logged(logger)
    assert {q.split("/")[0] for q in series} == {"input_condition", "output_condition", "input_rms"}


def test_an_undefined_pl_ratio_is_left_out_with_one_warning(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    messages, _ = fit_recording_warnings(tmp_path, small_monitor(loss_star=100.0, sharpness_iters=5), logger)
    assert len(messages) == 1 and "loss_star=100" in messages[0], messages
    series = logged(logger)
    assert not {"pl_ratio", "pl_ratio_min", "condition", "predicted_rate", "observed_rate"} & set(series)
    assert sorted(series["sharpness"]) == [0, 3, 6]


class OnlyAScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x[:, :3] * self.scale


def test_models_it_cannot_measure_are_refused_at_setup(tmp_path):
    module = ClassificationModule(OnlyAScale(), num_classes=3)
    with pytest.raises(ValueError, match="no Linear, Conv or BatchNorm"):
        fit_small(tmp_path, small_monitor(), module=module)
    with pytest.raises(ValueError, match=r"not Linear, Conv or BatchNorm layers; the model has: \['net.0'"):
        fit_small(tmp_path, small_monitor(layers=["net.2"]))
