r"""LossLandscapeMonitor: sharpness, the Polyak-Łojasiewicz ratio and the rates they predict, per-layer gradient
to weight ratios and activation conditioning, on a fixed probe batch during training.

On the probe's mean loss :math:`L` (dropout off; BatchNorm with the probe's own statistics, as in a training
step, its running statistics untouched), every ``every_n_steps`` steps:

    sharpness       = lambda_max(Hessian of L)                       (Cohen et al., ICLR 2021)
    pl_ratio        = ||grad L||^2 / (2 (L - L*))                     (Polyak 1963; Karimi et al. 2016)
    condition       = sharpness / pl_ratio
    predicted_rate  = pl_ratio lr (2 - sharpness lr)                  (descent lemma + PL, per step)
    observed_rate   = 1 - ((L_t - L*) / (L_s - L*)) ** (1 / (t - s))  (between measurements s < t)

with ``lr`` the learning rate of the next optimizer step; ``sharpness * lr`` above 2 is past the edge of
stability of gradient descent. The mathematics is in :mod:`lt_theory.measures.landscape`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.probe import Probe
from lt_theory.checks import check_choice, check_finite_real, check_nonnegative, check_positive_int
from lt_theory.measures.landscape import (
    DEFAULT_CONDITION_FLOOR,
    activation_conditioning,
    conditioned_layers,
    gradient_to_weight_ratios,
    observed_rate,
    pl_ratio,
    predicted_rate,
    sharpness,
)
from lt_theory.measures.modes import BN_STATISTICS

__all__ = ["LossLandscapeMonitor"]

CHARTS = {
    "Probe loss and gradient norm": ["loss", "grad_norm"],
    "PL ratio and its running minimum": ["pl_ratio", "pl_ratio_min"],
    "Sharpness": ["sharpness"],
    "Sharpness x lr (edge of stability at 2)": ["sharpness_x_lr"],
    "Condition number sharpness / PL ratio": ["condition"],
    "Per-step loss decrease: predicted by PL vs observed": ["predicted_rate", "observed_rate"],
    "Gradient / weight norm per layer": ["grad_to_weight/.*"],
    "Input feature conditioning per layer": ["input_condition/.*"],
    "Output feature conditioning per layer": ["output_condition/.*"],
    "Input scale (RMS) per layer": ["input_rms/.*"],
}


class LossLandscapeMonitor(TheoryCallback):
    """Watch the local geometry of the loss: sharpness, PL ratio, predicted vs observed rates, conditioning.

    At fit start and every ``every_n_steps`` steps, on a fixed probe (``probe_size`` examples chosen once, as in
    :class:`~lt_theory.callbacks.NTKDrift`, and kept in the checkpoint), dropout off and BatchNorm as
    ``bn_statistics`` says:

    - the probe loss ``L`` with ``loss_fn``, its gradient norm and the PL ratio ``||grad L||^2 / (2 (L - L*))``;
    - the sharpness (largest Hessian eigenvalue, by Lanczos on exact Hessian-vector products), warm-started
      from the previous measurement's eigenvector (kept in the checkpoint);
    - ``predicted_rate = pl_ratio * lr * (2 - sharpness * lr)``, the fraction of ``L - L*`` one step of gradient
      descent with the next step's learning rate is guaranteed to remove (see
      :func:`~lt_theory.measures.landscape.predicted_rate`), and ``observed_rate``, the per-step fraction removed
      since the previous measurement;
    - per layer, ``||grad W|| / ||W||`` and the condition numbers of the centred covariances of its input and
      output features (BatchNorm's input against its output is how much it improves the conditioning), and the
      root mean square of its input, the scale a condition number cannot see (the first layer's: the scale of
      the data, about 1 when the inputs are standardised).

    Only global rank zero computes; other ranks do not wait for it. The optimizer is SGD with momentum and weight
    decay in the recipes: the predicted rate is the plain gradient-descent idealisation of a step.

    Cost (CPU, one thread, against a training step of ResNet-20 at batch 128; ``benchmarks/bench_landscape.py``):
    one measurement on ResNet-20 with the defaults (64 probe examples, Lanczos warm-started, 5 to 6 steps to
    the 1e-3 tolerance) takes about 12 training steps, and about 16 when Lanczos takes all its 8 steps
    (``--sharpness-tol 0``): at the default ``every_n_steps=1000``, 1.2 to 1.6% of training. Hessian-vector
    products are most of it; the cost grows linearly with ``probe_size`` and ``sharpness_iters``.

    Logged tags: ``landscape/loss``, ``landscape/grad_norm``, ``landscape/pl_ratio``, ``landscape/pl_ratio_min``
    (running minimum over the run), ``landscape/sharpness``, ``landscape/sharpness_x_lr``, ``landscape/condition``,
    ``landscape/predicted_rate``, ``landscape/observed_rate`` (from the second measurement),
    ``landscape/grad_to_weight/<layer>``, ``landscape/input_condition/<layer>``,
    ``landscape/output_condition/<layer>``, ``landscape/input_rms/<layer>``; a custom-scalars panel
    ``landscape``. ``pl_ratio``, ``condition`` and ``predicted_rate`` are left out (with one warning) where
    ``L <= L*``; the loss-based tags need probe labels (without them only the conditioning and the input RMS are
    logged, with one warning).

    Args:
        every_n_steps: measure every this many optimizer steps (and once at fit start).
        probe_size: number of probe examples.
        probe_split: the data module split the probe comes from (``"train"``, ``"val"``, ``"test"``).
        probe_seed: seed of the probe choice.
        probe_inputs: a probe given directly (overrides the three above).
        probe_targets: integer labels of ``probe_inputs``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; default ``F.cross_entropy``, the loss of
            :class:`~lt_theory.module.ClassificationModule`. Give your module's criterion if it trains another.
        loss_star: the infimum ``L*`` of the loss (0 for cross-entropy).
        sharpness_iters: at most this many Lanczos steps (Hessian-vector products) per measurement.
        sharpness_tol: relative residual at which Lanczos stops early.
        layers: names of the layers whose activation conditioning is logged (default: every Linear, Conv and
            BatchNorm layer); ``grad_to_weight`` covers every layer with trainable parameters.
        condition_floor: covariance eigenvalues below this fraction of the largest count as rank deficiency
            (condition numbers are at most ``1 / condition_floor``).
        seed: seed of the first Lanczos start (its own generator, not the global RNG).
        bn_statistics: ``"batch"`` (default): BatchNorm layers normalise the probe with its own statistics, as in
            a training step, so the landscape is the one the optimizer descends (early in training the running
            statistics describe almost no data: ResNet-20's eval-mode sharpness at initialisation is 200 times
            its training-mode one); ``"running"``: with their running statistics, the network at test time.
            The running statistics are not updated in either.

    Raises:
        ValueError: for a bad argument, naming it; at setup, for a model without Linear/Conv/BatchNorm layers or
            an unknown layer name (listing the names that exist).

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lt_theory.models import MLP
        >>> from lt_theory.module import ClassificationModule
        >>> g = torch.Generator().manual_seed(0)
        >>> data = TensorDataset(torch.randn(64, 2, generator=g), torch.randint(0, 2, (64,), generator=g))
        >>> module = ClassificationModule(MLP((2,), hidden=(8,), num_classes=2), num_classes=2, schedule="constant")
        >>> monitor = LossLandscapeMonitor(every_n_steps=2, probe_size=16)
        >>> trainer = Trainer(max_steps=4, callbacks=[monitor], logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(module, DataLoader(data, batch_size=16))
        >>> [record["step"] for record in monitor.history]  # fit start, then every 2 steps
        [0, 2, 4]
        >>> sorted(name for name in monitor.history[-1] if "/" not in name)
        ['condition', 'grad_norm', 'loss', 'observed_rate', 'pl_ratio', 'pl_ratio_min', 'predicted_rate',
         'sharpness', 'sharpness_x_lr', 'step']
        >>> LossLandscapeMonitor(loss_star=float("nan"))
        Traceback (most recent call last):
            ...
        ValueError: `loss_star` must be a finite real number, got nan
    """

    prefix = "landscape"

    def __init__(
        self,
        every_n_steps: int = 1000,
        probe_size: int = 64,
        probe_split: str = "train",
        probe_seed: int = 0,
        probe_inputs: Tensor | None = None,
        probe_targets: Tensor | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        loss_star: float = 0.0,
        sharpness_iters: int = 8,
        sharpness_tol: float = 1e-3,
        layers: list[str] | None = None,
        condition_floor: float = DEFAULT_CONDITION_FLOOR,
        seed: int = 0,
        bn_statistics: str = "batch",
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        super().__init__(every_n_steps=every_n_steps)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"`loss_fn` must be a callable loss_fn(outputs, targets) or None, got {loss_fn!r}"
            )
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f"`layers` must be a list of layer names or None, got {layers!r}")
        if isinstance(condition_floor, bool) or not (
            isinstance(condition_floor, float | int) and 0 < condition_floor < 1
        ):
            raise ValueError(f"`condition_floor` must be a number in (0, 1), got {condition_floor!r}")
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        self.loss_star = check_finite_real("loss_star", loss_star)
        self.sharpness_iters = check_positive_int("sharpness_iters", sharpness_iters)
        self.sharpness_tol = check_nonnegative("sharpness_tol", sharpness_tol)
        self.layer_names = None if layers is None else list(layers)
        self.condition_floor = float(condition_floor)
        self.probe = Probe(probe_size, probe_split, probe_seed, probe_inputs, probe_targets)
        self.seed = seed
        self.bn_statistics = check_choice("bn_statistics", bn_statistics, BN_STATISTICS)
        self.sharpness_vector: Tensor | None = None
        self.previous: tuple[int, float] | None = None  # (step, probe loss) of the last measurement
        self.pl_ratio_min = math.inf
        self.last_step: int | None = None
        self.history: list[dict[str, float]] = []

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        conditioned_layers(pl_module, self.layer_names)  # refuses a model without them, or unknown names

    def _ready(self, trainer: Trainer, batch=None) -> bool:
        if not self.probe.resolve(trainer) and batch is not None:
            self.probe.capture(batch)
        return self.probe.ready

    # -- measuring --------------------------------------------------------------------------------

    @staticmethod
    def _learning_rate(trainer: Trainer) -> float | None:
        """The learning rate of the first parameter group of the first optimizer: at ``on_train_batch_end``,
        after Lightning has stepped the schedulers, the rate of the next optimizer step."""
        optimizers = trainer.optimizers
        return float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def _loss_landscape(
        self, trainer: Trainer, pl_module: LightningModule, batches: list
    ) -> dict[str, float]:
        step = trainer.global_step
        pl = pl_ratio(pl_module, self.loss_fn, batches, self.loss_star, self.bn_statistics)
        if self.sharpness_vector is None:  # the first measurement: a random start from the callback's seed
            init, generator = None, torch.Generator(pl_module.device).manual_seed(self.seed)
        else:  # warm: the previous top eigenvector (never random again: Lanczos returns a finite vector)
            init, generator = self.sharpness_vector.to(pl_module.device), None
        top = sharpness(
            pl_module,
            self.loss_fn,
            batches,
            self.sharpness_iters,
            self.sharpness_tol,
            init,
            generator,
            self.bn_statistics,
        )
        self.sharpness_vector = top.vector
        scalars = {"loss": pl.loss, "grad_norm": pl.grad_norm, "sharpness": top.value}
        lr = self._learning_rate(trainer)
        if lr is not None:
            scalars["sharpness_x_lr"] = top.value * lr
        if math.isfinite(pl.ratio) or not math.isfinite(pl.loss):  # NaN with NaN data: logged as NaN
            if math.isfinite(pl.ratio):
                self.pl_ratio_min = min(self.pl_ratio_min, pl.ratio)
            scalars["pl_ratio"] = pl.ratio
            scalars["condition"] = top.value / pl.ratio if pl.ratio != 0 else math.inf
            if lr is not None:
                scalars["predicted_rate"] = predicted_rate(pl.ratio, top.value, lr)
        else:
            self.warn_once(
                "pl-undefined",
                f"the PL ratio is not defined at step {step}: {pl.reason}. `landscape/pl_ratio`, `condition` and "
                "`predicted_rate` are left out where it is not; set `loss_star` to the loss's infimum.",
            )
        if math.isfinite(self.pl_ratio_min):
            scalars["pl_ratio_min"] = self.pl_ratio_min
        if self.previous is not None and step > self.previous[0]:
            observed = observed_rate(self.previous[1], pl.loss, step - self.previous[0], self.loss_star)
            if math.isfinite(observed) or not math.isfinite(pl.loss):
                scalars["observed_rate"] = observed
        self.previous = (step, pl.loss)
        ratios = gradient_to_weight_ratios(pl_module, self.loss_fn, batches, self.bn_statistics).ratios
        scalars.update({f"grad_to_weight/{layer or 'root'}": ratio for layer, ratio in ratios.items()})
        return scalars

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        inputs, targets = self.probe.on(pl_module.device)
        scalars: dict[str, float] = {}
        if targets is not None:
            scalars.update(self._loss_landscape(trainer, pl_module, [(inputs, targets)]))
        else:
            self.warn_once(
                "no-targets",
                "the probe has no labels, so the loss, sharpness, PL ratio and gradient tags are skipped; only the "
                "activation conditioning and the input RMS are logged. Give `probe_targets` (or a data module with "
                "labels).",
            )
        conditioning = activation_conditioning(
            pl_module, inputs, self.layer_names, self.condition_floor, self.bn_statistics
        )
        for name, layer in conditioning.items():
            scalars[f"input_condition/{name}"] = layer.input_condition
            scalars[f"output_condition/{name}"] = layer.output_condition
            scalars[f"input_rms/{name}"] = layer.input_rms
        bad = [name for name, value in scalars.items() if not math.isfinite(value)]
        if bad:
            self.warn_once(
                "nonfinite",
                f"{len(bad)} measurement(s) on the probe are not finite at step {trainer.global_step} (NaN or Inf "
                f"in the weights, activations or loss), e.g. `{self._tag(bad[0])}`: they are logged as NaN and "
                "training goes on.",
            )
        self.log_scalars(trainer, scalars, warn_nonfinite=False)
        self.history.append({"step": trainer.global_step, **scalars})
        self.last_step = trainer.global_step

    # -- hooks ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.last_step is None:
            self.add_charts(trainer, CHARTS)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        """The baseline, before the first step: on the data module's probe, or on the first batch's examples."""
        if trainer.is_global_zero and self.last_step is None and self._ready(trainer, batch):
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        due = self.is_step_due(trainer) and self.last_step != trainer.global_step
        if due and trainer.is_global_zero and self._ready(trainer):
            self._measure(trainer, pl_module)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "probe": self.probe.state_dict(),
            "sharpness_vector": None if self.sharpness_vector is None else self.sharpness_vector.cpu(),
            "previous": self.previous,
            "pl_ratio_min": self.pl_ratio_min,
            "last_step": self.last_step,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe.load_state_dict(state_dict["probe"])
        self.sharpness_vector = state_dict["sharpness_vector"]
        self.previous = None if state_dict["previous"] is None else tuple(state_dict["previous"])
        self.pl_ratio_min = state_dict["pl_ratio_min"]
        self.last_step = state_dict["last_step"]
        self.history = [dict(h) for h in state_dict["history"]]
