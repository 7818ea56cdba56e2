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

The clean/noisy split needs the label-noise records of an lt_theory data module; on any other
``LightningDataModule`` the probe measures the train error (on the labels the dataset yields), the test error
and the test loss, and says once that the noisy-label metrics are off. The model-wise curve (over widths)
is drawn by :mod:`lt_theory.sweep` from one such probe per run.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.evaluation_sets import EvaluationSets, evaluation_sets
from lt_theory.checks import check_fraction, check_positive_int
from lt_theory.figures import epochwise_figure
from lt_theory.measures.evaluation import loss_and_error_of_outputs
from lt_theory.measures.risk import (
    evaluate_classifier,
    find_peaks,
    interpolation_threshold,
    noisy_label_errors,
)

__all__ = ["DoubleDescentProbe"]

_NOISE_RECORDS = ("images", "labels", "clean_labels", "noisy_indices")
_NOISY_TAGS = "`dd/train_error_clean`, `dd/train_error_noisy` and `dd/memorized_fraction`"


def _has_noise_records(datamodule) -> bool:
    """Whether ``datamodule`` is an lt_theory data module: in-memory splits with label-noise records."""
    train = getattr(datamodule, "train_dataset", None)
    test = getattr(datamodule, "test_dataset", None)
    return (
        callable(getattr(datamodule, "preprocess", None))
        and all(hasattr(train, name) for name in _NOISE_RECORDS)
        and hasattr(test, "images")
        and hasattr(test, "labels")
    )


class DoubleDescentProbe(TheoryCallback):
    """Watch epoch-wise double descent: clean/noisy train error, memorisation, test error and its peaks.

    The clean/noisy metrics need an lt_theory data module (:class:`lt_theory.data.CIFARDataModule` and its
    subclasses), whose training set records the clean labels and the noisy indices (``label_noise=p``). Any
    other ``LightningDataModule`` works too: the probe evaluates, with a sequential loader of its own (the
    training loader is never iterated, so its shuffling is not perturbed), ``train_subset_size`` examples of
    ``train_dataloader().dataset`` (a map-style dataset; note that transforms inside the dataset, e.g.
    augmentation, are applied as they are) and the whole test set (``test_dataloader()``, else
    ``val_dataloader()``), and logs the train error, the test error and the test loss; it warns once that
    the noisy-label metrics are off, as it does for an lt_theory data module with ``label_noise=0``. The
    data module's ``preprocess``, if it has one, is applied to the inputs on the device. Under DDP each rank
    evaluates an interleaved shard and the predictions are gathered, so the work is done once (each rank
    evaluates with its own BatchNorm running statistics, which under DDP differ from rank zero's by the last
    batch's update unless SyncBatchNorm is used).

    Cost: one evaluation pass (forward only) over ``train_subset_size`` training and all test examples; with
    the defaults on CIFAR-10 (10,000 + 10,000 examples every 5 epochs) about 3% of training time. The pass
    costs at most 1.1 times a bare forward pass over the same examples (``benchmarks/bench_double_descent.py``).

    Logged tags: ``dd/train_error``, ``dd/train_error_clean``, ``dd/train_error_noisy``,
    ``dd/memorized_fraction``, ``dd/test_error``, ``dd/test_loss`` (at the step ending the epoch);
    (``dd/train_error_clean`` and the next two need label-noise records; ``dd/test_*`` a test or
    validation set); ``dd/interpolation_epoch`` once, when the train error first reaches
    ``interpolation_epsilon``;
    ``dd/peak_epoch`` and ``dd/peak_test_error`` for each test-error peak found (at fit end); the text
    ``dd/summary`` and the image ``dd/curves`` at fit end; a custom-scalars panel ``dd``.

    Args:
        every_n_epochs: evaluate every this many epochs.
        train_subset_size: training examples evaluated (a fixed subset drawn from ``seed``); None for all.
        eval_batch_size: batch size of the evaluation passes.
        interpolation_epsilon: the train error at or below which the training set counts as interpolated.
        seed: seed of the training subset.
        measure_on_train_end: also measure when training ends, if the last epoch trained was not measured
            (``max_epochs`` not a multiple of ``every_n_epochs``, ``max_steps`` or a stop in mid-epoch), so
            that ``history[-1]`` describes the final model (the sweep of :mod:`lt_theory.sweep` uses it).

    Attributes:
        history: one dict per measurement: ``epoch``, ``step`` and the measured quantities.
        last_test_logits, last_test_labels: the test logits ``(N, C)`` and labels of the last measurement,
            on the CPU (None before the first one or without a test set); the bias-variance decomposition of
            :mod:`lt_theory.sweep` reads them.

    Raises:
        ValueError: for a bad argument, naming it; at setup, when the trainer has no data module.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lt_theory.data import SyntheticCIFARDataModule
        >>> probe = DoubleDescentProbe(every_n_epochs=1)
        >>> trainer = Trainer(callbacks=[probe])
        >>> # trainer.fit(module, datamodule=SyntheticCIFARDataModule(label_noise=0.15)) fills probe.history
        >>> # (also restored on a resume), e.g. ten epochs whose test error rises while the train error falls:
        >>> test = [0.50, 0.40, 0.33, 0.36, 0.44, 0.45, 0.38, 0.31, 0.28, 0.27]
        >>> train = [0.60, 0.45, 0.30, 0.18, 0.09, 0.03, 0.01, 0.0, 0.0, 0.0]
        >>> history = [
        ...     {"epoch": epoch, "train_error": a, "test_error": b}
        ...     for epoch, (a, b) in enumerate(zip(train, test), start=1)
        ... ]
        >>> probe.load_state_dict({"history": history, "interpolation_epoch": 7})
        >>> [(peak.position, peak.value) for peak in probe.peaks()]
        [(6, 0.45)]
        >>> print(probe.summary())
        After 10 epochs: train error 0 test error 0.27. The training set was interpolated at epoch 7.
        Test-error peak(s): epoch 6 (test error 0.45): epoch-wise double descent.
    """

    prefix = "dd"

    def __init__(
        self,
        every_n_epochs: int = 5,
        train_subset_size: int | None = 10_000,
        eval_batch_size: int = 512,
        interpolation_epsilon: float = 0.01,
        seed: int = 0,
        measure_on_train_end: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("train_subset_size", train_subset_size, allow_none=True)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_fraction("interpolation_epsilon", interpolation_epsilon, high_open=True)
        if not isinstance(measure_on_train_end, bool):
            raise ValueError(f"`measure_on_train_end` must be True or False, got {measure_on_train_end!r}")
        self.every_n_epochs, self.train_subset_size = every_n_epochs, train_subset_size
        self.eval_batch_size, self.interpolation_epsilon, self.seed = (
            eval_batch_size,
            interpolation_epsilon,
            seed,
        )
        self.measure_on_train_end = measure_on_train_end
        self.history: list[dict[str, float]] = []
        self.interpolation_epoch: int | None = None
        self.last_test_logits: Tensor | None = None
        self.last_test_labels: Tensor | None = None
        self._sets: EvaluationSets | None = None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "DoubleDescentProbe needs a data module (`trainer.fit(module, datamodule=...)`): it evaluates "
                "the training set and the test set of `trainer.datamodule`, and found none. Any "
                "LightningDataModule works; an lt_theory one (e.g. `SyntheticCIFARDataModule(label_noise=0.15)`) "
                "also gives the clean/noisy split."
            )
        self._sets = None  # resolved at the first measurement, once the loaders exist
        if not _has_noise_records(datamodule):
            self.warn_once(
                "noisy-metrics-off",
                f"{type(datamodule).__name__} has no label-noise records (`train_dataset` with "
                f"{', '.join(f'`{name}`' for name in _NOISE_RECORDS)}, as the lt_theory data modules have), "
                f"so {_NOISY_TAGS} are off; the train error, test error and test loss are logged.",
            )
        elif len(datamodule.train_dataset.noisy_indices) == 0:
            self.warn_once(
                "noisy-metrics-off",
                f"{type(datamodule).__name__} has `label_noise=0`, so no label is noisy and "
                "`dd/train_error_noisy` and `dd/memorized_fraction` are off; give it `label_noise > 0` "
                "(e.g. 0.15, as Nakkiran et al.) to watch memorisation.",
            )

    # -- evaluation sets --------------------------------------------------------------------------

    def _evaluation_sets(self, trainer: Trainer) -> EvaluationSets:
        """The training subset (with its noise records) and the test set, resolved once."""
        if self._sets is None:
            self._sets = evaluation_sets(
                trainer, self.train_subset_size, None, self.seed, self.eval_batch_size, self.warn_once
            )
            if self._sets.test is None:
                self.warn_once(
                    "no-test-set",
                    f"{type(trainer.datamodule).__name__} has no `test_dataloader` or `val_dataloader`, so "
                    "`dd/test_error` and `dd/test_loss` are off.",
                )
        return self._sets

    # -- evaluation -------------------------------------------------------------------------------

    def _evaluate_everywhere(self, trainer: Trainer, pl_module: LightningModule, examples, transform):
        """Logits and labels of every example, each rank evaluating ``rank::world_size``, all gathered."""
        world, rank, n = trainer.world_size, trainer.global_rank, len(examples)
        result = evaluate_classifier(pl_module, examples.batches(rank, world), transform=transform)
        if world == 1:
            return result.logits, result.labels
        return _gather_rows(trainer, result.logits, n, math.nan), _gather_rows(trainer, result.labels, n, -1)

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        sets = self._evaluation_sets(trainer)
        record: dict[str, float] = {}
        if sets.train is not None:
            logits, labels = self._evaluate_everywhere(trainer, pl_module, sets.train, sets.transform)
            if sets.clean_labels is not None:
                device = logits.device
                errors = noisy_label_errors(
                    logits, labels, sets.clean_labels.to(device), sets.is_noisy.to(device)
                )
                record["train_error"] = errors.train_error
                record["train_error_clean"] = errors.train_error_clean
                if errors.num_noisy > 0:  # undefined without label noise: not logged rather than NaN
                    record["train_error_noisy"] = errors.train_error_noisy
                    record["memorized_fraction"] = errors.memorized_fraction
            else:
                record["train_error"] = loss_and_error_of_outputs(logits, labels)[1]
        if sets.test is not None:
            test_logits, test_labels = self._evaluate_everywhere(trainer, pl_module, sets.test, sets.transform)
            record["test_loss"], record["test_error"] = loss_and_error_of_outputs(test_logits, test_labels)
            self.last_test_logits, self.last_test_labels = test_logits.cpu(), test_labels.cpu()
        return record

    def _record(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        record = self._measure(trainer, pl_module)
        self.history.append({"epoch": epoch, "step": trainer.global_step, **record})
        scalars = dict(record)
        if self.interpolation_epoch is None and "train_error" in record:
            self.interpolation_epoch = interpolation_threshold(
                [h["epoch"] for h in self.history],
                [h.get("train_error", math.nan) for h in self.history],
                self.interpolation_epsilon,
            )
            if self.interpolation_epoch is not None:
                scalars["interpolation_epoch"] = self.interpolation_epoch
        self.log_scalars(trainer, scalars)

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
        self._record(trainer, pl_module, epoch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.measure_on_train_end or trainer.global_step == 0:
            return
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return  # the final model was measured at the end of its epoch
        epochs = trainer.fit_loop.epoch_progress.current
        partial = epochs.processed > epochs.completed  # stopped in mid-epoch: count the epoch begun
        self._record(trainer, pl_module, epochs.completed + int(partial))

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
        return find_peaks(
            [h.get("test_error", math.nan) for h in self.history], [h["epoch"] for h in self.history]
        )

    def summary(self) -> str:
        """A short reading of the curves: interpolation, memorisation and test-error peaks."""
        last = self.history[-1]
        parts = [f"After {last['epoch']} epochs: train error {last.get('train_error', math.nan):.3g}"]
        if "memorized_fraction" in last:
            parts[0] += (
                f" (clean {last['train_error_clean']:.3g}, noisy {last['train_error_noisy']:.3g}), "
                f"{last['memorized_fraction']:.1%} of the noisy labels memorised,"
            )
        parts[0] += f" test error {last.get('test_error', math.nan):.3g}."
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
        figure = epochwise_figure(self.history, self.interpolation_epoch, peaks)
        self.log_figure(trainer, "curves", figure)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "interpolation_epoch": self.interpolation_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(h) for h in state_dict["history"]]
        self.interpolation_epoch = state_dict["interpolation_epoch"]


def _gather_rows(trainer: Trainer, rows: Tensor, n: int, fill: float) -> Tensor:
    """All ranks' rows, rank ``r`` holding rows ``r::world_size`` of ``n``, back in their order."""
    world = trainer.world_size
    per_rank = math.ceil(n / world)
    padded = torch.full((per_rank, *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
    padded[: len(rows)] = rows
    gathered = trainer.strategy.all_gather(padded)  # (world, per_rank, ...)
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype, device=padded.device)
    for r in range(world):
        out[r::world] = gathered[r, : len(range(r, n, world))]
    return out
