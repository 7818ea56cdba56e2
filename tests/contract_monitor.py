"""A small monitor that lives in the tests, so the contract suite has a subject before and beside the real ones.

It measures the global l2 norm of the parameters at fit start (the baseline) and every ``every_n_steps``, logs
``testmon/param_norm`` and ``testmon/param_norm_ratio`` (to the baseline), a histogram, a figure and a text,
and contributes a custom-scalars chart; its state (baseline and history) must survive a checkpoint.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402

from lt_theory.callbacks.base import TheoryCallback  # noqa: E402


class ParameterNormMonitor(TheoryCallback):
    prefix = "testmon"

    def __init__(self, every_n_steps: int = 2) -> None:
        super().__init__(every_n_steps=every_n_steps)
        if every_n_steps is None:
            raise ValueError("`every_n_steps` must be a positive integer, got None")
        self.baseline: float | None = None
        self.history: list[tuple[int, float]] = []

    @staticmethod
    def _norm(pl_module: LightningModule) -> float:
        with torch.no_grad():
            return float(torch.sqrt(sum(p.double().pow(2).sum() for p in pl_module.parameters())))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.add_charts(trainer, {"Parameter norm": ["param_norm", "param_norm_ratio"]})
        if self.baseline is None:
            self.baseline = self._norm(pl_module)
            self.history.append((trainer.global_step, self.baseline))
            self.log_scalars(trainer, {"param_norm": self.baseline, "param_norm_ratio": 1.0})

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not self.is_step_due(trainer):
            return
        norm = self._norm(pl_module)
        self.history.append((trainer.global_step, norm))
        self.log_scalars(trainer, {"param_norm": norm, "param_norm_ratio": norm / self.baseline})
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.log_histogram(trainer, "parameters", flat)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        figure, axis = plt.subplots(figsize=(4, 3))
        steps, norms = zip(*self.history)
        axis.plot(steps, norms, marker="o")
        axis.set_xlabel("step")
        axis.set_ylabel("parameter norm")
        self.log_figure(trainer, "param_norm_curve", figure)
        self.log_text(trainer, "summary", f"parameter norm went from {self.baseline:.4f} to {norms[-1]:.4f}")

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.baseline = state_dict["baseline"]
        self.history = [tuple(item) for item in state_dict["history"]]
