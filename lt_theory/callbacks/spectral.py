"""SpectralNormMonitor: operator norms of every layer, certified Lipschitz bounds, conditioning, margins.

A layer's operator norm sigma_max(A) is its l2 Lipschitz constant (for a convolution, the norm of the
convolution as a map on its real input shape, not of the reshaped kernel that spectral normalisation uses);
the graph-aware product of layer norms bounds the network's Lipschitz constant from above, the largest
input-Jacobian norm on probe inputs bounds it from below; sigma_max / sigma_min is the layer's
conditioning; and Bartlett, Foster & Telgarsky (NeurIPS 2017) normalise margins by the spectral complexity
R_A = prod_i ||A_i|| (sum_i ||A_i^T - M_i^T||_{2,1}^{2/3} / ||A_i||^{2/3})^{3/2} (M_i the initial weights):

    margin_normalized(x, y) = (f(x)_y - max_{j != y} f(x)_j) / (R_A ||X||_F / n).

All mathematics is in :mod:`lt_theory.measures.spectral` and :mod:`lt_theory.measures.lipschitz`.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.probe import Probe
from lt_theory.checks import check_positive_int
from lt_theory.figures import FONT_SIZE, new_figure
from lt_theory.measures.layers import named_layers
from lt_theory.measures.lipschitz import (
    UnsupportedModelError,
    jacobian_lipschitz_lower_bound,
    lipschitz_upper_bound,
    naive_lipschitz_product,
)
from lt_theory.measures.modes import eval_mode
from lt_theory.measures.spectral import (
    normalized_margins,
    operator_norm,
    operator_spectrum,
    spectral_complexity,
)

__all__ = ["SpectralNormMonitor"]

_EXACT_SPECTRA = ("fft", "dense")
"""Spectrum methods of :func:`operator_spectrum` whose smallest singular value is exact."""

MEASURED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# the layers spectral_complexity sums over (all of the model's, whatever `layers` selects)
COMPLEXITY_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the first (Lanczos) measurement of a layer keeps at most this many numbers (256 MiB in float32)
LANCZOS_ENTRIES = 1 << 26
# Linear layers up to this many weights get the exact SVD at every measurement (256 x 256: about 5 ms).
EXACT_LINEAR_ENTRIES = 1 << 16


def _find_layers(model: nn.Module, names: list[str] | None) -> dict[str, nn.Module]:
    purpose = "SpectralNormMonitor measures the operator norms of those layers"
    return named_layers(model, MEASURED_LAYERS, names, "nn.Linear, nn.Conv1d or nn.Conv2d", purpose)


def _input_shapes(
    model: nn.Module, layers: dict[str, nn.Module], example: Tensor
) -> dict[str, tuple[int, ...]]:
    """The shape (without batch) of each layer's input when the model runs, in eval mode, on one example."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in layers if name not in shapes]
    if missing:
        raise ValueError(f"`layers` {missing} are not called in the model's forward; they cannot be measured")
    return shapes


class SpectralNormMonitor(TheoryCallback):
    """Watch the operator norms of every Linear/Conv layer, the network's Lipschitz bracket and its margins.

    Every ``every_n_steps`` steps (and at fit start and end), each layer's largest singular value as an
    operator on its real input shape and the reshaped-kernel norm for comparison: the first time by Lanczos
    (converged to about 1e-7) and exactly, afterwards by ``power_iterations`` power iterations warm-started
    from the previous call's singular vectors. A warm estimate is a lower bound whose relative error is at
    most about ``s / (e (2k + 1))`` for ``k`` iterations, ``s`` the squared sine between the previous and
    the current top singular vector (1e-5 to 3e-4 in the tests, measuring every 2 steps). Linear layers with
    at most 65536 weights (classifier heads, whose top vector turns fastest) get the exact SVD every
    time. Every ``bound_every_n_steps`` steps (and at
    fit start and end): the certified graph-aware upper bound of the network's Lipschitz constant (Gram
    iteration per layer, Delattre et al. 2023), the naive product of layer norms, the lower bound
    max_x ||d f(x)/dx||_2 on the probe, each layer's condition number and stable rank, the spectral
    complexity and the normalised margins on the probe. Only global rank zero computes.

    Cost (CPU, one thread, against a training step at batch 128; ``benchmarks/bench_spectral.py``): a warm
    measurement of all layers of ResNet-20 0.045 steps, of PreAct ResNet-18 (k=64) 0.026 steps; a bound
    measurement of ResNet-20 about 21 steps (spectra by Lanczos 51%, Gram norms 21%, Jacobian bound 20%),
    of ResNet-18 about 40 steps (Gram norms of the 256- and 512-channel layers 63%). At the defaults
    (100 / 2000) that is 1.1% of training time for ResNet-20 and 2.0% for ResNet-18.

    Logged tags: ``spectral/sigma_max/<layer>``, ``spectral/sigma_max_reshaped/<layer>``,
    ``spectral/condition/<layer>`` (only for injective layers: a map to fewer dimensions has sigma_min = 0;
    exact, from the FFT blocks or the explicit matrix) or ``spectral/condition_lower/<layer>`` (a lower bound,
    where the layer is too large for those and Lanczos gives sigma_min from above: tight on small inputs, up to
    several times too low on 16x32x32 inputs),
    ``spectral/stable_rank/<layer>``, ``spectral/lipschitz_upper``,
    ``spectral/lipschitz_lower``, ``spectral/lipschitz_naive_product``, ``spectral/complexity``,
    ``spectral/margin_normalized/{p10,p50,p90}`` (from the first step where R_A > 0); the histogram
    ``spectral/margins_normalized``; the image ``spectral/sigma_max_by_depth``; a custom-scalars panel
    ``spectral``.

    Args:
        every_n_steps: warm power-iteration measurement of all layers every this many steps.
        bound_every_n_steps: certified bounds, conditioning, complexity and margins every this many steps.
        layers: names of the layers to measure (default: every Linear, Conv1d and Conv2d).
        power_iterations: power iterations per layer in a warm measurement (the first one is Lanczos).
        lower_bound_iterations: power iterations of the Jacobian lower bound (warm-started too).
        probe_size: probe examples for the lower bound and the margins.
        probe_split: the data module split the probe comes from.
        probe_seed: seed of the probe choice.
        probe_inputs: a probe given directly; ``probe_targets`` its labels (for the margins).
        probe_targets: integer labels of ``probe_inputs``.
        seed: seed of the power iterations' random start (their own generator, not the global RNG).

    Raises:
        ValueError: for a bad argument, naming it; at setup, for a model without Linear/Conv layers or an
            unknown layer name (listing the names that exist).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SpectralNormMonitor(every_n_steps=100, bound_every_n_steps=2000)])
        >>> SpectralNormMonitor(every_n_steps=100, bound_every_n_steps=0)  # a bad argument, named
        Traceback (most recent call last):
            ...
        ValueError: `bound_every_n_steps` must be a positive integer, got 0
    """

    prefix = "spectral"

    def __init__(
        self,
        every_n_steps: int = 100,
        bound_every_n_steps: int = 2000,
        layers: list[str] | None = None,
        power_iterations: int = 3,
        lower_bound_iterations: int = 5,
        probe_size: int = 64,
        probe_split: str = "train",
        probe_seed: int = 0,
        probe_inputs: Tensor | None = None,
        probe_targets: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        super().__init__(every_n_steps=every_n_steps)
        check_positive_int("bound_every_n_steps", bound_every_n_steps)
        check_positive_int("power_iterations", power_iterations)
        check_positive_int("lower_bound_iterations", lower_bound_iterations)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"`layers` must be a list of layer names or None, got {layers!r}")
        self.bound_every_n_steps = bound_every_n_steps
        self.layer_names = None if layers is None else list(layers)
        self.power_iterations, self.lower_bound_iterations = power_iterations, lower_bound_iterations
        self.probe = Probe(probe_size, probe_split, probe_seed, probe_inputs, probe_targets)
        self.seed = seed
        self.layers: dict[str, nn.Module] = {}
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.power_vectors: dict[str, Tensor] = {}
        self.reshape_vectors: dict[str, Tensor] = {}
        self.jacobian_vectors: Tensor | None = None
        self.initial_weights: dict[str, Tensor] | None = None
        self.last_step: int | None = None
        self.last_bound_step: int | None = None
        self._generator: torch.Generator | None = None
        self._restored_generator_state: Tensor | None = None
        self._last_sigmas: list[float] = []
        self._traceable = True

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.layers = _find_layers(pl_module, self.layer_names)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule, batch=None) -> bool:
        """Fix the probe, the layers' input shapes and the initial weights; True once measurable."""
        if not self.probe.resolve(trainer) and batch is not None:
            self.probe.capture(batch)
        if not self.probe.ready:
            return False
        if not self.input_shapes:
            self.input_shapes = _input_shapes(pl_module, self.layers, self.probe.inputs.to(pl_module.device))
        if self.initial_weights is None:  # the spectral complexity sums over every layer, not only `layers`
            self.initial_weights = {
                f"{n}.weight": m.weight.detach().clone()
                for n, m in pl_module.named_modules()
                if isinstance(m, COMPLEXITY_LAYERS)
            }
        if self._generator is None:
            self._generator = torch.Generator(pl_module.device).manual_seed(self.seed)
            if self._restored_generator_state is not None:
                self._generator.set_state(self._restored_generator_state)
        return True

    # -- measurements -----------------------------------------------------------------------------

    def _layer_norms(self) -> dict[str, float]:
        """Each layer's operator norm and reshaped-kernel norm.

        The first time: the operator norm by Lanczos (converged to about 1e-7 where 100 power iterations
        leave 1e-3 on zero-padded convolutions) and the reshaped norm exactly; afterwards
        ``power_iterations`` power iterations from the previous call's singular vectors. Small Linear
        layers (classifier heads, whose top singular vector turns fastest) get the exact SVD every time.
        """
        scalars = {}
        for name, layer in self.layers.items():
            shape = self.input_shapes[name]
            if isinstance(layer, nn.Linear) and layer.weight.numel() <= EXACT_LINEAR_ENTRIES:
                sigma = operator_norm(layer, shape, method="fft").sigma_max
                scalars[f"sigma_max/{name}"] = scalars[f"sigma_max_reshaped/{name}"] = sigma
                continue
            # Lanczos keeps its n_iter + 1 vectors of the input's size: at most LANCZOS_ENTRIES entries
            lanczos_steps = max(10, min(100, LANCZOS_ENTRIES // math.prod(shape) - 1))
            for tag, vectors, cold, cold_steps, warm_method in (
                ("sigma_max", self.power_vectors, "lanczos", lanczos_steps, "power"),
                ("sigma_max_reshaped", self.reshape_vectors, "reshape", None, "reshape"),  # cold: exact
            ):
                warm = vectors.get(name)
                result = operator_norm(
                    layer,
                    shape,
                    method=cold if warm is None else warm_method,
                    generator=self._generator,
                    init=None if warm is None else warm.to(layer.weight.device),
                    n_iter=cold_steps if warm is None else self.power_iterations,
                    tol=None if warm is None else 0.0,
                )
                if result.vector is not None:
                    vectors[name] = result.vector.detach()
                scalars[f"{tag}/{name}"] = result.sigma_max
        return scalars

    def _bounds(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        input_shape = tuple(self.probe.inputs.shape[1:])
        certified = {
            name: operator_norm(m, self.input_shapes[name], method="gram").sigma_max
            for name, m in self.layers.items()
        }
        scalars: dict[str, float] = {}
        if self._traceable:
            try:
                scalars["lipschitz_upper"] = lipschitz_upper_bound(
                    pl_module, input_shape, layer_norms=certified
                ).value
            except UnsupportedModelError as error:
                self._traceable = False
                self.warn_once(
                    "untraceable",
                    f"no certified Lipschitz bound for this model ({error}); "
                    "only the naive product of layer norms is logged, which ignores residual sums.",
                )
        scalars["lipschitz_naive_product"] = naive_lipschitz_product(
            pl_module, input_shape, layer_norms=certified
        ).value
        inputs, targets = self.probe.on(pl_module.device)
        lower = jacobian_lipschitz_lower_bound(
            pl_module,
            inputs,
            n_iter=self.lower_bound_iterations,
            generator=self._generator,
            init=None if self.jacobian_vectors is None else self.jacobian_vectors.to(inputs.device),
        )
        self.jacobian_vectors = lower.vectors.detach()
        scalars["lipschitz_lower"] = lower.value
        for name, layer in self.layers.items():
            spectrum = operator_spectrum(layer, self.input_shapes[name], generator=self._generator)
            scalars[f"stable_rank/{name}"] = spectrum.stable_rank
            if not (spectrum.sigma_min == 0 and math.isinf(spectrum.condition_number)):  # else undefined
                exact = spectrum.method in _EXACT_SPECTRA  # Lanczos: sigma_min from above, a lower bound
                scalars[f"{'condition' if exact else 'condition_lower'}/{name}"] = spectrum.condition_number
        complexity = spectral_complexity(pl_module, self.initial_weights, input_shape)
        scalars["complexity"] = complexity.value
        if targets is not None and complexity.value > 0:  # R_A = 0 at the reference weights
            margins = normalized_margins(self._logits(pl_module, inputs), targets, complexity, inputs)
            scalars.update(self._percentiles(margins))
            self.log_histogram(trainer, "margins_normalized", margins)
        return scalars

    @staticmethod
    def _logits(pl_module: LightningModule, inputs: Tensor) -> Tensor:
        with eval_mode(pl_module), torch.no_grad():
            return pl_module(inputs)

    @staticmethod
    def _percentiles(margins: Tensor) -> dict[str, float]:
        finite = margins[torch.isfinite(margins)].double()
        if finite.numel() == 0:
            return {f"margin_normalized/p{q}": math.nan for q in (10, 50, 90)}
        quantiles = torch.quantile(
            finite, torch.tensor([0.1, 0.5, 0.9], dtype=finite.dtype, device=finite.device)
        )
        return {f"margin_normalized/p{q}": float(v) for q, v in zip((10, 50, 90), quantiles)}

    def _log_depth_figure(self, trainer: Trainer, sigmas: list[float]) -> None:
        figure, axis = new_figure(max(5.0, 0.3 * len(sigmas)), 4.0)
        axis.plot(range(len(sigmas)), sigmas, "o-")
        axis.set_xticks(range(len(sigmas)), list(self.layers), rotation=90, fontsize=FONT_SIZE)
        axis.set_ylabel("operator norm sigma_max")
        axis.set_title(f"step {trainer.global_step}")
        self.log_figure(trainer, "sigma_max_by_depth", figure)

    # -- hooks ------------------------------------------------------------------------------------

    def _maybe_measure(
        self, trainer: Trainer, pl_module: LightningModule, force: bool = False, batch=None
    ) -> None:
        """Measure what is due at this step: layer norms on their cadence, bounds on theirs, both first and last."""
        if not trainer.is_global_zero or not self._prepare(trainer, pl_module, batch):
            return
        step, first = trainer.global_step, self.last_step is None
        norms_due = (first or force or self.is_step_due(trainer)) and self.last_step != step
        bounds_due = first or force or (step > 0 and step % self.bound_every_n_steps == 0)
        bounds_due = bounds_due and self.last_bound_step != step
        scalars: dict[str, float] = {}
        if norms_due:
            scalars.update(self._layer_norms())
            self._last_sigmas = [scalars[f"sigma_max/{name}"] for name in self.layers]
            self.last_step = step
        if bounds_due:
            scalars.update(self._bounds(trainer, pl_module))
            self.last_bound_step = step
            self._log_depth_figure(trainer, self._last_sigmas)
        self.log_scalars(trainer, scalars)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.last_step is None:
            self.add_charts(
                trainer,
                {
                    "Lipschitz bracket": ["lipschitz_upper", "lipschitz_naive_product", "lipschitz_lower"],
                    "sigma_max per layer": ["sigma_max/.*"],
                    "Condition number per layer": ["condition/.*", "condition_lower/.*"],
                    "Normalised margins": [
                        "margin_normalized/p10",
                        "margin_normalized/p50",
                        "margin_normalized/p90",
                    ],
                    "Spectral complexity": ["complexity"],
                },
            )
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.last_step is None:
            self._maybe_measure(trainer, pl_module, batch=batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._maybe_measure(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.last_bound_step != trainer.global_step:
            self._maybe_measure(trainer, pl_module, force=True)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "probe": self.probe.state_dict(),
            "power_vectors": {name: v.cpu() for name, v in self.power_vectors.items()},
            "reshape_vectors": {name: v.cpu() for name, v in self.reshape_vectors.items()},
            "jacobian_vectors": None if self.jacobian_vectors is None else self.jacobian_vectors.cpu(),
            "initial_weights": None
            if self.initial_weights is None
            else {name: w.cpu() for name, w in self.initial_weights.items()},
            "last_step": self.last_step,
            "last_bound_step": self.last_bound_step,
            "generator": None if self._generator is None else self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe.load_state_dict(state_dict["probe"])
        self.power_vectors = dict(state_dict["power_vectors"])
        self.reshape_vectors = dict(state_dict.get("reshape_vectors", {}))
        self.jacobian_vectors = state_dict["jacobian_vectors"]
        self.initial_weights = state_dict["initial_weights"]
        self.last_step, self.last_bound_step = state_dict["last_step"], state_dict["last_bound_step"]
        self._restored_generator_state = state_dict["generator"]
