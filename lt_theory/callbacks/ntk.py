"""NTKDrift: the empirical neural tangent kernel on a fixed probe, tracked through training.

In the infinite-width limit the NTK stays at its initial value and training is kernel regression (Jacot,
Gabriel & Hongler, NeurIPS 2018; Lee et al., NeurIPS 2019); real networks move their kernel, fastest in the
first epochs (Fort et al., NeurIPS 2020), and towards the task (kernel-target alignment grows). This callback
computes K_0 on a fixed probe batch at the start of training and, every ``every_n_steps`` steps, K_t with
:func:`lt_theory.measures.ntk.empirical_ntk`, and logs how far, how fast and towards what it moved:

    relative_change   = ||K_t - K_0||_F / ||K_0||_F                      (Lee et al. 2019)
    distance_from_init = 1 - <K_t, K_0>_F / (||K_t||_F ||K_0||_F)        (Fort et al. 2020)
    velocity          = distance(K_t, K_prev) / (steps since K_prev)
    alignment         = centred kernel-target alignment with one-hot labels (Cortes et al. 2012)
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.probe import Probe
from lt_theory.checks import check_fraction, check_positive_int
from lt_theory.figures import new_figure
from lt_theory.measures.ntk import (
    KERNEL_KINDS,
    empirical_ntk,
    kernel_alignment,
    kernel_distance,
    kernel_spectrum,
    relative_change,
)

__all__ = ["NTKDrift"]


class NTKDrift(TheoryCallback):
    """Track the empirical NTK on a fixed probe: drift from initialisation, velocity, alignment, spectrum.

    The probe is ``probe_size`` examples chosen once (the data module's seeded ``probe`` when it has one,
    otherwise the first examples of the first training batch, or ``probe_inputs`` / ``probe_targets`` if
    given) and kept in the checkpoint. Only global rank zero computes; other ranks do not wait for it.

    Cost: one measurement (pNTK on 32 probes, metrics, spectrum figure, logging) on ResNet-20 takes about
    0.9 training steps at batch 128 (CPU, one thread; ``benchmarks/bench_ntk.py``); at the default
    ``every_n_steps=200`` that is about 0.5% of training. ``kind="full"`` and ``"trace"`` cost O times more
    (and ``"full"`` O^2 times more kernel memory).

    Logged tags: ``ntk/relative_change``, ``ntk/distance_from_init``, ``ntk/velocity``, ``ntk/alignment``
    (when labels are known), ``ntk/trace``, ``ntk/eig_max``, ``ntk/effective_rank``; the image
    ``ntk/eigenspectrum`` (top eigenvalues at initialisation and now); the text ``ntk/verdict`` at fit end
    (also printed); a custom-scalars panel ``ntk``.

    Args:
        every_n_steps: measure every this many optimizer steps (K_0 is always measured before the first).
        probe_size: number of probe examples.
        probe_split: the data module split the probe comes from (``"train"``, ``"val"``, ``"test"``).
        probe_seed: seed of the probe choice.
        probe_inputs: a probe given directly (overrides the three above).
        probe_targets: integer labels of ``probe_inputs`` (for the alignment).
        kind: ``"pntk"`` (default), ``"trace"`` or ``"full"`` (see :func:`~lt_theory.measures.ntk.empirical_ntk`).
        top_k: number of eigenvalues drawn in the figure.
        lazy_threshold: the verdict calls a run lazy when the final relative change is below this.
        chunk_size: examples per vectorised Jacobian call (None: the default of
            :func:`~lt_theory.measures.ntk.empirical_ntk`, which keeps the Jacobians within 256 MiB).

    Raises:
        ValueError: for a bad argument, naming it.

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> ntk = NTKDrift(every_n_steps=100, probe_inputs=torch.zeros(32, 3, 32, 32))
        >>> trainer = Trainer(callbacks=[ntk])
        >>> # trainer.fit(module, datamodule=...) fills ntk.history, one dict per measurement, e.g.:
        >>> ntk.history = [
        ...     {"step": 0, "relative_change": 0.0, "distance_from_init": 0.0},
        ...     {"step": 100, "relative_change": 0.12, "distance_from_init": 0.08},
        ...     {"step": 200, "relative_change": 0.15, "distance_from_init": 0.12},
        ... ]
        >>> print(ntk.verdict())  # the last relative change against lazy_threshold=0.1
        Over 200 steps the pntk kernel on 32 probe examples moved by a relative change of 0.15 (threshold 0.1)
        and a kernel distance of 0.12 from initialisation; half of that distance was reached by step 100.
        Verdict: feature learning (rich regime): the tangent kernel, and so the features, changed.
    """

    prefix = "ntk"

    def __init__(
        self,
        every_n_steps: int = 200,
        probe_size: int = 32,
        probe_split: str = "train",
        probe_seed: int = 0,
        probe_inputs: Tensor | None = None,
        probe_targets: Tensor | None = None,
        kind: str = "pntk",
        top_k: int = 20,
        lazy_threshold: float = 0.1,
        chunk_size: int | None = None,
    ) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        super().__init__(every_n_steps=every_n_steps)
        if kind not in KERNEL_KINDS:
            raise ValueError(f"`kind` must be one of {KERNEL_KINDS}, got {kind!r}")
        check_positive_int("top_k", top_k)
        check_fraction("lazy_threshold", lazy_threshold, low_open=True)
        check_positive_int("chunk_size", chunk_size, allow_none=True)
        self.probe = Probe(probe_size, probe_split, probe_seed, probe_inputs, probe_targets)
        self.kind, self.top_k, self.lazy_threshold, self.chunk_size = kind, top_k, lazy_threshold, chunk_size
        self.initial_kernel: Tensor | None = None
        self.previous_kernel: Tensor | None = None
        self.previous_step = 0
        self.history: list[dict[str, float]] = []

    # -- measuring --------------------------------------------------------------------------------

    def _kernel(self, pl_module: LightningModule) -> Tensor:
        inputs, _ = self.probe.on(pl_module.device)
        return empirical_ntk(pl_module, inputs, kind=self.kind, chunk_size=self.chunk_size).detach()

    def _measure_initial(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.initial_kernel = self._kernel(pl_module)
        self.previous_kernel, self.previous_step = self.initial_kernel, trainer.global_step
        self.add_charts(
            trainer,
            {
                "Kernel movement": ["relative_change", "distance_from_init"],
                "Velocity": ["velocity"],
                "Alignment with labels": ["alignment"],
                "Spectrum": ["trace", "eig_max", "effective_rank"],
            },
        )
        self._log(trainer, self.initial_kernel, velocity=None)

    def _log(self, trainer: Trainer, kernel: Tensor, velocity: float | None) -> None:
        spectrum = kernel_spectrum(kernel)
        record = {
            "relative_change": float(relative_change(kernel, self.initial_kernel)),
            "distance_from_init": float(kernel_distance(kernel, self.initial_kernel)),
            "trace": float(spectrum.trace),
            "eig_max": float(spectrum.eigenvalues[0]),
            "effective_rank": float(spectrum.effective_rank),
        }
        if self.probe.targets is not None:
            record["alignment"] = float(kernel_alignment(kernel, self.probe.targets.to(kernel.device)))
        scalars = dict(record)
        if velocity is not None:
            scalars["velocity"] = velocity
        finite = bool(torch.isfinite(kernel).all())
        if not finite:
            self.warn_once(
                "nonfinite:kernel",
                f"the {self.kind} kernel on the probe is not finite at step {trainer.global_step} (NaN or Inf in "
                "the weights or activations): the ntk/ measurements are logged as NaN and training goes on.",
            )
        self.log_scalars(trainer, scalars, warn_nonfinite=finite)
        self.history.append({"step": trainer.global_step, **record})

    def _ready(self, trainer: Trainer, pl_module: LightningModule, batch=None) -> bool:
        if not trainer.is_global_zero:
            return False
        if not self.probe.resolve(trainer) and batch is not None:
            self.probe.capture(batch)
        if self.probe.ready and self.initial_kernel is None:
            self._measure_initial(trainer, pl_module)
        return self.initial_kernel is not None

    # -- hooks ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.initial_kernel is not None:  # restored from a checkpoint, on the CPU
            self.initial_kernel = self.initial_kernel.to(pl_module.device)
            self.previous_kernel = self.previous_kernel.to(pl_module.device)
        self._ready(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.initial_kernel is None:
            self._ready(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.is_step_due(trainer) or not self._ready(trainer, pl_module):
            return
        kernel = self._kernel(pl_module)
        elapsed = trainer.global_step - self.previous_step
        velocity = float(kernel_distance(kernel, self.previous_kernel)) / elapsed if elapsed > 0 else None
        self._log(trainer, kernel, velocity)
        self._log_eigenspectrum(trainer, kernel)
        self.previous_kernel, self.previous_step = kernel, trainer.global_step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        text = self.verdict()
        self.log_text(trainer, "verdict", text)
        rank_zero_info(f"NTKDrift: {text}")

    # -- reporting --------------------------------------------------------------------------------

    def _log_eigenspectrum(self, trainer: Trainer, kernel: Tensor) -> None:
        top_k = min(self.top_k, self.probe.inputs.shape[0])
        initial = kernel_spectrum(self.initial_kernel, top_k).eigenvalues.cpu()
        now = kernel_spectrum(kernel, top_k).eigenvalues.cpu()
        figure, axis = new_figure(5, 3.5)
        ranks = range(1, len(initial) + 1)
        axis.semilogy(ranks, initial.clamp_min(1e-30), "o-", label="initialisation")
        axis.semilogy(ranks, now.clamp_min(1e-30), "s-", label=f"step {trainer.global_step}")
        axis.set_xlabel("eigenvalue rank")
        axis.set_ylabel(f"eigenvalue of the {self.kind} kernel")
        axis.legend()
        self.log_figure(trainer, "eigenspectrum", figure)

    def verdict(self) -> str:
        """A one-paragraph reading of the run: how far the kernel moved and whether it looks lazy.

        The regime is read from the last measurement: "lazy" when its relative change from initialisation is
        below ``lazy_threshold``, "feature learning" otherwise, "undetermined" when it is not defined (a kernel
        that is not finite, or zero at initialisation), with the last defined measurement quoted.
        """
        last = self.history[-1]
        change, distance = last["relative_change"], last["distance_from_init"]
        probes = f"the {self.kind} kernel on {self.probe.inputs.shape[0]} probe examples"
        if math.isnan(change):
            defined = [h for h in self.history if not math.isnan(h["relative_change"])]
            text = (
                f"Over {last['step']} steps {probes} is not measurable since step "
                f"{next(h['step'] for h in self.history if math.isnan(h['relative_change']))}"
                " (not finite: NaN or Inf in the weights or activations; or zero at initialisation)."
            )
            if defined:
                text += (
                    f" The last defined measurement, at step {defined[-1]['step']}, had moved by a relative change "
                    f"of {defined[-1]['relative_change']:.3g} (threshold {self.lazy_threshold:g})."
                )
            return text + " Verdict: undetermined."
        if change < self.lazy_threshold:
            regime = "lazy (kernel regime): the network trains close to its linearisation at initialisation"
        else:
            regime = "feature learning (rich regime): the tangent kernel, and so the features, changed"
        if distance > 0:
            half_step = next(h["step"] for h in self.history if h["distance_from_init"] >= 0.5 * distance)
            when = f"; half of that distance was reached by step {half_step}"
        else:
            when = ""
        lines = [
            f"Over {last['step']} steps {probes} moved by a relative change of {change:.3g} (threshold "
            f"{self.lazy_threshold:g}) and a kernel distance of {distance:.3g} from initialisation{when}. "
            f"Verdict: {regime}.",
        ]
        if "alignment" in last:
            lines.append(
                f"Kernel-target alignment went from {self.history[0]['alignment']:.3g} to {last['alignment']:.3g}."
            )
        return " ".join(lines)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        to_cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return {
            "probe": self.probe.state_dict(),
            "initial_kernel": to_cpu(self.initial_kernel),
            "previous_kernel": to_cpu(self.previous_kernel),
            "previous_step": self.previous_step,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe.load_state_dict(state_dict["probe"])
        self.initial_kernel = state_dict["initial_kernel"]
        self.previous_kernel = state_dict["previous_kernel"]
        self.previous_step = state_dict["previous_step"]
        self.history = [dict(h) for h in state_dict["history"]]
