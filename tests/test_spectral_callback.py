"""SpectralNormMonitor during real (tiny) training runs, its logged numbers checked against references.

The run is the contract suite's ResNet-8 on synthetic CIFAR-shaped data (12 SGD steps, lr 0.05), with the
monitor measuring the layer norms every 2 steps and the bounds every 4. References are computed afterwards
on the final weights with the measures themselves, run to convergence or in closed form:

* operator norms: the exact SVD for the Linear head; for the convolutions 300 Lanczos steps in float64
  (a lower bound, checked against the dense SVD in tests/test_spectral.py and bracketed here from above
  by the certified Gram bound);
* the certified and naive bounds, the spectral complexity and the normalised margins: the same functions
  called on the final model (the complexity against the initial weights of a model re-created from the
  same seed, the margins on ``datamodule.probe(...)``).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from torch import nn

from lt_theory.callbacks.spectral import SpectralNormMonitor
from lt_theory.measures import (
    lipschitz_upper_bound,
    naive_lipschitz_product,
    normalized_margins,
    operator_norm,
    operator_spectrum,
    spectral_complexity,
)
from lt_theory.module import ClassificationModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),  # Lightning on this torch version
    pytest.mark.filterwarnings("ignore:.*TensorBoardLogger.*:UserWarning"),  # the recorder is not TensorBoard
]

INPUT_SHAPE = (3, 32, 32)
STEPS = 12  # make_trainer: 2 epochs of 6 steps
PROBE = 16

# Warm power iteration: from a start whose squared sine to the top singular vector is s, k iterations leave
# a relative error of at most s / (e (2k + 1)) (lt_theory.measures.spectral); k = 3 gives s / 19, so 1e-3
# allows the top singular vector to turn by s = 0.019 (8 degrees) between two measurements (here 2 SGD
# steps at lr 0.05, early training, where weights move fastest). Observed: at most 2.4e-4 (sigma_max) and
# 6e-5 (reshaped), most layers below 2e-5; the first measurement (Lanczos) is within 1e-6.
WARM_RTOL = 1e-3
# Every estimate of sigma_max here is a lower bound; float32 rounding may put it a hair above the float64
# reference.
ROUNDING = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the runs are tiny, and two threads on a shared 2-core machine can stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def history(self, tag: str) -> dict[int, float]:
        """step -> value of ``tag`` (the last one logged at that step)."""
        return {step: m[tag] for step, m in self.rows if tag in m}

    def last(self, tag: str) -> tuple[int, float]:
        return max(self.history(tag).items())

    def tags(self, prefix: str) -> set[str]:
        return {tag for _, m in self.rows for tag in m if tag.startswith(prefix)}


def _fit(tmp_path, monitor: SpectralNormMonitor, extra_callbacks=()) -> SimpleNamespace:
    module, data = make_module_and_data(seed=0)
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, [*extra_callbacks, monitor], logger=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    ours = [str(w.message) for w in caught if str(w.message).startswith("SpectralNormMonitor")]
    return SimpleNamespace(module=module, data=data, logger=logger, trainer=trainer, warnings=ours)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    monitor = SpectralNormMonitor(every_n_steps=2, bound_every_n_steps=4, probe_size=PROBE)
    result = _fit(tmp_path_factory.mktemp("spectral"), monitor)
    result.monitor = monitor
    assert result.trainer.global_step == STEPS
    return result


@pytest.fixture(scope="module")
def spectra(run) -> dict:
    """Per layer, on the final weights: 300 Lanczos steps in float64 (sigma_max to about 1e-9, checked
    under the certified Gram bound) and the exact Frobenius norm."""
    result = {}
    for name, layer in run.monitor.layers.items():
        shape = run.monitor.input_shapes[name]
        spectrum = operator_spectrum(layer, shape, method="lanczos", n_iter=300, tol=0.0)
        assert spectrum.sigma_max <= operator_norm(layer, shape, method="gram").sigma_max * (1 + 1e-9)
        result[name] = spectrum
    return result


# --------------------------------------------------------------------------------------------------
# Layer norms
# --------------------------------------------------------------------------------------------------


def test_layer_norms_are_measured_on_the_cadence(run):
    for name in run.monitor.layers:
        assert sorted(run.logger.history(f"spectral/sigma_max/{name}")) == list(range(0, STEPS + 1, 2))
    assert sorted(run.logger.history("spectral/lipschitz_upper")) == list(range(0, STEPS + 1, 4))


def test_sigma_max_is_the_operator_norm_of_the_final_weights(run, spectra):
    for name, layer in run.monitor.layers.items():
        step, logged = run.logger.last(f"spectral/sigma_max/{name}")
        assert step == STEPS
        if isinstance(layer, nn.Linear):  # the head: the exact SVD at every measurement
            exact = torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()
            assert logged == pytest.approx(exact, rel=1e-12)
            continue
        reference = spectra[name].sigma_max
        assert reference * (1 - WARM_RTOL) <= logged <= reference * (1 + ROUNDING), name


def test_sigma_max_reshaped_is_the_reshaped_kernel_norm(run):
    for name, layer in run.monitor.layers.items():
        _, logged = run.logger.last(f"spectral/sigma_max_reshaped/{name}")
        matrix = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        exact = torch.linalg.matrix_norm(matrix, ord=2).item()
        if isinstance(layer, nn.Linear):
            assert logged == pytest.approx(exact, rel=1e-12)
        else:
            assert exact * (1 - WARM_RTOL) <= logged <= exact * (1 + ROUNDING), name
    # the first measurement is exact (float64 eigen-decomposition of the kernel's Gram matrix)
    initial, _ = make_module_and_data(seed=0)
    conv = initial.net.conv1.weight.detach().double().reshape(16, -1)
    first = run.logger.history("spectral/sigma_max_reshaped/net.conv1")[0]
    assert first == pytest.approx(torch.linalg.matrix_norm(conv, ord=2).item(), rel=1e-12)


def test_stable_rank_and_condition_number(run, spectra):
    for name, layer in run.monitor.layers.items():
        shape = run.monitor.input_shapes[name]
        _, stable_rank = run.logger.last(f"spectral/stable_rank/{name}")
        spectrum = spectra[name]
        assert stable_rank == pytest.approx(spectrum.frobenius_norm**2 / spectrum.sigma_max**2, rel=1e-6)
        with torch.no_grad():
            injective = layer(torch.zeros(1, *shape)).numel() >= math.prod(shape)
        has_condition = f"spectral/condition/{name}" in run.logger.tags("spectral/condition/")
        assert has_condition == injective, name  # sigma_min = 0 for a map to fewer dimensions: no tag
        if injective:  # sigma_max / (sigma_min from above): finite, at least 1 (accuracy: test_spectral.py)
            _, condition = run.logger.last(f"spectral/condition/{name}")
            assert 1.0 <= condition < math.inf


# --------------------------------------------------------------------------------------------------
# Network bounds, complexity, margins
# --------------------------------------------------------------------------------------------------


def test_lipschitz_bracket(run):
    upper = run.logger.history("spectral/lipschitz_upper")
    lower = run.logger.history("spectral/lipschitz_lower")
    naive = run.logger.history("spectral/lipschitz_naive_product")
    assert upper.keys() == lower.keys() == naive.keys() == {0, 4, 8, 12}
    for step in upper:
        assert math.isfinite(upper[step]) and 0 < lower[step] <= upper[step], step
    module = run.module
    expected = lipschitz_upper_bound(module, INPUT_SHAPE, method="gram")
    assert expected.graph_aware
    assert upper[STEPS] == pytest.approx(expected.value, rel=1e-6)
    assert naive[STEPS] == pytest.approx(naive_lipschitz_product(module, INPUT_SHAPE).value, rel=1e-6)
    # the lower bound max_x ||J_f(x)||_2 on the probe, against the explicit Jacobians (10 x 3072 each)
    probe, _, _ = run.data.probe(PROBE, split="train", seed=0)
    module.eval()
    jacobians = torch.func.vmap(torch.func.jacrev(lambda x: module(x[None])[0]))(probe)
    exact = torch.linalg.matrix_norm(jacobians.reshape(PROBE, 10, -1).double(), ord=2).max().item()
    # 5 power iterations warm-started from the previous bound step (4 SGD steps earlier): observed 2e-4
    assert exact * (1 - 1e-3) <= lower[STEPS] <= exact * (1 + ROUNDING)


def test_complexity_uses_the_initial_weights(run):
    initial, _ = make_module_and_data(seed=0)  # the same seed: the run's initial weights
    for key, weight in run.monitor.initial_weights.items():
        assert torch.equal(weight, initial.state_dict()[key]), key
    expected = spectral_complexity(run.module, initial.state_dict(), INPUT_SHAPE)
    step, logged = run.logger.last("spectral/complexity")
    assert step == STEPS
    assert logged == pytest.approx(expected.value, rel=1e-9)
    assert run.logger.history("spectral/complexity")[0] == 0.0  # R_A = 0 at the reference weights


def test_normalized_margin_percentiles(run):
    inputs, targets, _ = run.data.probe(PROBE, split="train", seed=0)
    module = run.module.eval()
    with torch.no_grad():
        logits = module(inputs)
    complexity = spectral_complexity(module, run.monitor.initial_weights, INPUT_SHAPE)
    margins = normalized_margins(logits, targets, complexity, inputs).double()
    expected = torch.quantile(margins, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    for q, value in zip((10, 50, 90), expected.tolist()):
        step, logged = run.logger.last(f"spectral/margin_normalized/p{q}")
        assert step == STEPS
        assert logged == pytest.approx(value, rel=1e-6)
    # none at step 0, where R_A = 0 makes them undefined
    assert 0 not in run.logger.history("spectral/margin_normalized/p50")


# --------------------------------------------------------------------------------------------------
# Options and bad input
# --------------------------------------------------------------------------------------------------


def test_layers_option_measures_only_those_layers(run, tmp_path):
    chosen = ["net.conv1", "net.fc"]
    monitor = SpectralNormMonitor(every_n_steps=2, bound_every_n_steps=4, probe_size=PROBE, layers=chosen)
    result = _fit(tmp_path, monitor)
    for quantity in ("sigma_max", "sigma_max_reshaped", "stable_rank"):
        assert result.logger.tags(f"spectral/{quantity}/") == {f"spectral/{quantity}/{n}" for n in chosen}
    # training is not perturbed, and the first layer's random start is the generator's first draw in both
    # runs, so its (deterministic) warm iterations give the same numbers as with every layer measured
    for name in chosen:
        assert result.logger.history(f"spectral/sigma_max/{name}") == run.logger.history(
            f"spectral/sigma_max/{name}"
        )
    # the network-level quantities still cover the whole network
    for tag in ("lipschitz_upper", "lipschitz_naive_product", "complexity", "margin_normalized/p50"):
        assert result.logger.last(f"spectral/{tag}") == pytest.approx(run.logger.last(f"spectral/{tag}"))


def test_model_without_linear_or_conv_layers_is_refused_at_setup(tmp_path):
    _, data = make_module_and_data(seed=0)
    module = ClassificationModule(
        nn.Sequential(nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d((2, 5)), nn.Flatten())
    )
    trainer = make_trainer(tmp_path, [SpectralNormMonitor()])
    with pytest.raises(ValueError, match=r"no nn\.Linear, nn\.Conv1d or nn\.Conv2d layer"):
        trainer.fit(module, datamodule=data)


def test_unknown_layer_name_lists_the_layers_that_exist(tmp_path):
    module, data = make_module_and_data(seed=0)
    trainer = make_trainer(tmp_path, [SpectralNormMonitor(layers=["net.conv1", "net.conv9"])])
    with pytest.raises(ValueError, match=r"\['net\.conv9'\]") as error:
        trainer.fit(module, datamodule=data)
    assert "net.layer1.0.conv1" in str(error.value) and "net.fc" in str(error.value)


class _PoisonWeight(Callback):
    """Writes a NaN into one weight at the end of one step (before the monitor's measurement)."""

    def __init__(self, layer: str, step: int) -> None:
        self.layer, self.step = layer, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.get_submodule(self.layer).weight[0, 0, 0, 0] = math.nan


def test_nan_weight_gives_nan_numbers_one_warning_per_tag_and_training_goes_on(tmp_path):
    poisoned, step = "net.layer3.0.conv2", 4
    monitor = SpectralNormMonitor(every_n_steps=2, bound_every_n_steps=4, probe_size=PROBE)
    result = _fit(tmp_path, monitor, extra_callbacks=[_PoisonWeight(poisoned, step)])
    assert result.trainer.global_step == STEPS  # training went on to the end
    sigma = result.logger.history(f"spectral/sigma_max/{poisoned}")
    assert all(math.isfinite(sigma[s]) for s in (0, 2)) and math.isnan(sigma[step])
    assert math.isnan(result.logger.history(f"spectral/sigma_max_reshaped/{poisoned}")[step])
    assert math.isnan(result.logger.history(f"spectral/stable_rank/{poisoned}")[step])
    for name in monitor.layers:  # the other layers are still finite at that step
        if name != poisoned:
            assert math.isfinite(result.logger.history(f"spectral/sigma_max/{name}")[step]), name
    for tag in ("lipschitz_upper", "lipschitz_naive_product", "lipschitz_lower", "complexity"):
        assert math.isnan(result.logger.history(f"spectral/{tag}")[step]), tag
    # NaN weights give NaN activations, so later SGD steps spread NaN to every weight: each tag is then
    # NaN at every later measurement, and still warned about once
    nonfinite = [w for w in result.warnings if "is not finite" in w]
    counts = Counter(w.split("`")[1] for w in nonfinite)
    assert counts[f"spectral/sigma_max/{poisoned}"] == 1
    assert counts["spectral/lipschitz_upper"] == 1
    assert max(counts.values()) == 1
