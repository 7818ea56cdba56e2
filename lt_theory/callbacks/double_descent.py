"""DoubleDescentProbe: epoch-wise double descent and the memorisation of noisy labels, inside one run.

Nakkiran et al. (ICLR 2020, "Deep Double Descent") find the test error of a network trained long enough
on noisy labels rise and fall again over epochs, peaking near the time the training set is first
interpolated (train error ~ 0), and explain it by the memorisation of the noisy examples (Zhang et al.,
ICLR 2017, "Understanding deep learning requires rethinking generalization"). Every ``every_n_epochs``
epochs this callback evaluates, without augmentation and in eval mode, a fixed subset of the training set
and the whole test set, and logs

    train_error        = mean[argmax f(x_i) != y_i]                   (y_i the labels in use, noisy or not)
    train_error_clean  = the same over clean examples,  train_error_noisy over noisy ones
    memorized_fraction = mean over noisy i of [argmax f(x_i) == y_i]  (the noisy label, not the true one)

with the interpolation epoch (first epoch with train error <= epsilon) and the peaks of the test error
found by :func:`lt_theory.measures.risk.find_peaks`. The mathematics is in :mod:`lt_theory.measures.risk`.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from torch import Tensor  # noqa: E402

from lt_theory.callbacks.base import TheoryCallback, check_fraction, check_positive_int  # noqa: E402
from lt_theory.measures.risk import (  # noqa: E402
    evaluate_classifier,
    find_peaks,
    interpolation_threshold,
    noisy_label_errors,
)

__all__ = ["DoubleDescentProbe"]

_REQUIRED = (
    "`train_dataset` (with `images`, `labels`, `clean_labels`, `noisy_indices`), `test_dataset` and `preprocess`"
)


class DoubleDescentProbe(TheoryCallback):
    """Watch epoch-wise double descent: clean/noisy train error, memorisation, test error and its peaks.

    Needs an lt_theory data module (:class:`lt_theory.data.CIFARDataModule` and its subclasses), whose
    training set records the clean labels and the noisy indices (``label_noise=p``). Under DDP each rank
    evaluates an interleaved shard and the predictions are gathered, so the work is done once.

    Cost: an evaluation pass (forward only) over ``train_subset_size`` training and all test examples; with
    the defaults on CIFAR-10 (10,000 + 10,000 examples every 5 epochs) about 3% of training time.

    Logged tags: ``dd/train_error``, ``dd/train_error_clean``, ``dd/train_error_noisy``,
    ``dd/memorized_fraction``, ``dd/test_error``, ``dd/test_loss`` (at the step ending the epoch);
    ``dd/interpolation_epoch`` once, when the train error first reaches ``interpolation_epsilon``;
    ``dd/peak_epoch`` and ``dd/peak_test_error`` for each test-error peak found (at fit end); the text
    ``dd/summary`` and the image ``dd/curves`` at fit end; a custom-scalars panel ``dd``.

    Args:
        every_n_epochs: evaluate every this many epochs.
        train_subset_size: training examples evaluated (a fixed subset drawn from ``seed``); None for all.
        eval_batch_size: batch size of the evaluation passes.
        interpolation_epsilon: the train error at or below which the training set counts as interpolated.
        seed: seed of the training subset.

    Raises:
        ValueError: for a bad argument, naming it; at setup, for a data module without what it needs.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lt_theory.data import SyntheticCIFARDataModule
        >>> trainer = Trainer(callbacks=[DoubleDescentProbe(every_n_epochs=1)])
        >>> # trainer.fit(module, datamodule=SyntheticCIFARDataModule(label_noise=0.15))
    """

    prefix = "dd"

    def __init__(
        self,
        every_n_epochs: int = 5,
        train_subset_size: int | None = 10_000,
        eval_batch_size: int = 512,
        interpolation_epsilon: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("train_subset_size", train_subset_size, allow_none=True)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_fraction("interpolation_epsilon", interpolation_epsilon, high_open=True)
        self.every_n_epochs, self.train_subset_size = every_n_epochs, train_subset_size
        self.eval_batch_size, self.interpolation_epsilon, self.seed = (
            eval_batch_size,
            interpolation_epsilon,
            seed,
        )
        self.history: list[dict[str, float]] = []
        self.interpolation_epoch: int | None = None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        train = getattr(datamodule, "train_dataset", None)
        needed = ("images", "labels", "clean_labels", "noisy_indices")
        if (
            datamodule is None
            or not callable(getattr(datamodule, "preprocess", None))
            or getattr(datamodule, "test_dataset", None) is None
            or not all(hasattr(train, name) for name in needed)
        ):
            raise ValueError(
                f"DoubleDescentProbe needs a data module with {_REQUIRED}, as the lt_theory data modules have "
                f"(e.g. `SyntheticCIFARDataModule(label_noise=0.15)`); got {type(datamodule).__name__}."
            )

    def _train_subset(self, size: int) -> Tensor:
        if self.train_subset_size is None or self.train_subset_size >= size:
            return torch.arange(size)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(size, generator=generator)[: self.train_subset_size].sort().values

    # -- evaluation -------------------------------------------------------------------------------

    def _batches(self, images: Tensor, labels: Tensor):
        for start in range(0, len(labels), self.eval_batch_size):
            yield images[start : start + self.eval_batch_size], labels[start : start + self.eval_batch_size]

    def _logits_everywhere(
        self, trainer: Trainer, pl_module: LightningModule, images: Tensor, labels: Tensor
    ):
        """Logits of every example, each rank evaluating ``rank::world_size`` and all of them gathered."""
        world, rank, n = trainer.world_size, trainer.global_rank, len(labels)
        shard = torch.arange(rank, n, world)
        result = evaluate_classifier(
            pl_module, self._batches(images[shard], labels[shard]), transform=trainer.datamodule.preprocess
        )
        if world == 1:
            return result.logits
        per_rank = math.ceil(n / world)
        padded = torch.full((per_rank, result.logits.shape[1]), math.nan, device=result.logits.device)
        padded[: len(shard)] = result.logits
        gathered = trainer.strategy.all_gather(padded)  # (world, per_rank, C)
        logits = torch.empty((n, padded.shape[1]), device=padded.device)
        for r in range(world):
            count = len(range(r, n, world))
            logits[r::world] = gathered[r, :count]
        return logits

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        train, test = trainer.datamodule.train_dataset, trainer.datamodule.test_dataset
        subset = self._train_subset(len(train.labels))
        logits = self._logits_everywhere(trainer, pl_module, train.images[subset], train.labels[subset])
        is_noisy = torch.zeros(len(train.labels), dtype=torch.bool)
        is_noisy[train.noisy_indices] = True
        device = logits.device
        errors = noisy_label_errors(
            logits,
            train.labels[subset].to(device),
            train.clean_labels[subset].to(device),
            is_noisy[subset].to(device),
        )
        test_logits = self._logits_everywhere(trainer, pl_module, test.images, test.labels)
        test_labels = test.labels.to(test_logits.device)
        record = {"train_error": errors.train_error, "train_error_clean": errors.train_error_clean}
        if errors.num_noisy > 0:  # undefined without label noise: not logged rather than NaN
            record["train_error_noisy"] = errors.train_error_noisy
            record["memorized_fraction"] = errors.memorized_fraction
        record["test_error"] = float((test_logits.argmax(1) != test_labels).double().mean())
        record["test_loss"] = float(torch.nn.functional.cross_entropy(test_logits, test_labels))
        return record

    # -- hooks ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.add_charts(
            trainer,
            {
                "Train error: clean vs noisy": ["train_error", "train_error_clean", "train_error_noisy"],
                "Memorised noisy labels": ["memorized_fraction"],
                "Test error and loss": ["test_error", "test_loss"],
            },
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs completed
        if epoch % self.every_n_epochs != 0 or (self.history and self.history[-1]["epoch"] == epoch):
            return
        record = self._measure(trainer, pl_module)
        self.history.append({"epoch": epoch, "step": trainer.global_step, **record})
        scalars = dict(record)
        if self.interpolation_epoch is None:
            self.interpolation_epoch = interpolation_threshold(
                [h["epoch"] for h in self.history],
                [h["train_error"] for h in self.history],
                self.interpolation_epsilon,
            )
            if self.interpolation_epoch is not None:
                scalars["interpolation_epoch"] = self.interpolation_epoch
        self.log_scalars(trainer, scalars)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        peaks = self.peaks()
        for peak in peaks:
            step = next(h["step"] for h in self.history if h["epoch"] == peak.position)
            self.log_scalars(trainer, {"peak_epoch": peak.position, "peak_test_error": peak.value}, step=step)
        text = self.summary()
        self.log_text(trainer, "summary", text)
        self._log_curves(trainer, peaks)
        rank_zero_info(f"DoubleDescentProbe: {text}")

    # -- reporting --------------------------------------------------------------------------------

    def peaks(self):
        """Peaks of the test error over the epochs measured (see :func:`lt_theory.measures.risk.find_peaks`)."""
        return find_peaks([h["test_error"] for h in self.history], [h["epoch"] for h in self.history])

    def summary(self) -> str:
        """A short reading of the curves: interpolation, memorisation and test-error peaks."""
        last = self.history[-1]
        parts = [f"After {last['epoch']} epochs: train error {last['train_error']:.3g}"]
        if "memorized_fraction" in last:
            parts[0] += (
                f" (clean {last['train_error_clean']:.3g}, noisy {last['train_error_noisy']:.3g}), "
                f"{last['memorized_fraction']:.3g} of the noisy labels memorised,"
            )
        parts[0] += f" test error {last['test_error']:.3g}."
        if self.interpolation_epoch is None:
            parts.append(
                f"The training set is not interpolated yet (train error > {self.interpolation_epsilon:g})."
            )
        else:
            parts.append(f"The training set was interpolated at epoch {self.interpolation_epoch}.")
        peaks = self.peaks()
        if peaks:
            listed = ", ".join(f"epoch {p.position} (test error {p.value:.3g})" for p in peaks)
            parts.append(f"Test-error peak(s): {listed}: epoch-wise double descent.")
        else:
            parts.append("No test-error peak: no epoch-wise double descent seen.")
        return " ".join(parts)

    def _log_curves(self, trainer: Trainer, peaks) -> None:
        epochs = [h["epoch"] for h in self.history]
        figure, axis = plt.subplots(figsize=(6, 4))
        for key, style in (("train_error", "-"), ("train_error_clean", "--"), ("train_error_noisy", ":")):
            axis.plot(epochs, [h.get(key, math.nan) for h in self.history], style, label=key)
        axis.plot(epochs, [h["test_error"] for h in self.history], "o-", label="test_error")
        if self.interpolation_epoch is not None:
            axis.axvline(self.interpolation_epoch, color="grey", linestyle="--", label="interpolation")
        for peak in peaks:
            axis.annotate("peak", (peak.position, peak.value), textcoords="offset points", xytext=(0, 8))
        axis.set_xlabel("epoch")
        axis.set_ylabel("error")
        axis.legend(fontsize=7)
        figure.tight_layout()
        self.log_figure(trainer, "curves", figure)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "interpolation_epoch": self.interpolation_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict["history"]]
        self.interpolation_epoch = state_dict["interpolation_epoch"]
