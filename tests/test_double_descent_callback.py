"""DoubleDescentProbe: logged numbers equal the measures on the final model; refusal; reporting."""

from __future__ import annotations

import csv

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import LightningDataModule
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.measures.risk import evaluate_classifier, noisy_label_errors


def _last_logged(csv_dir, tag: str) -> float:
    rows = list(csv.DictReader(open(next(csv_dir.glob("version_*")) / "metrics.csv")))
    return float([row[tag] for row in rows if row.get(tag)][-1])


def test_logged_errors_equal_the_measures_on_the_final_model(tmp_path):
    probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=None, eval_batch_size=32)
    module, data = make_module_and_data()
    trainer = make_trainer(tmp_path, [probe], logger=CSVLogger(tmp_path, name="csv"), max_epochs=2)
    trainer.fit(module, datamodule=data)

    train, test = data.train_dataset, data.test_dataset
    assert len(train.noisy_indices) == 24  # 25% of 96
    evaluation = evaluate_classifier(module, [(train.images, train.labels)], transform=data.preprocess)
    expected = noisy_label_errors(evaluation.logits, train.labels, train.clean_labels, train.noisy_indices)
    test_evaluation = evaluate_classifier(module, [(test.images, test.labels)], transform=data.preprocess)
    logged = {
        tag: _last_logged(tmp_path / "csv", f"dd/{tag}")
        for tag in (
            "train_error",
            "train_error_clean",
            "train_error_noisy",
            "memorized_fraction",
            "test_error",
            "test_loss",
        )
    }
    assert logged["train_error"] == pytest.approx(expected.train_error, abs=1e-12)
    assert logged["train_error_clean"] == pytest.approx(expected.train_error_clean, abs=1e-12)
    assert logged["train_error_noisy"] == pytest.approx(expected.train_error_noisy, abs=1e-12)
    assert logged["memorized_fraction"] == pytest.approx(expected.memorized_fraction, abs=1e-12)
    assert logged["test_error"] == pytest.approx(test_evaluation.error, abs=1e-12)
    assert logged["test_loss"] == pytest.approx(test_evaluation.loss, rel=1e-6)
    assert [h["epoch"] for h in probe.history] == [1, 2]


def test_train_subset_is_fixed_by_the_seed():
    probe = DoubleDescentProbe(train_subset_size=10, seed=3)
    first, second = (
        probe._train_subset(100),
        DoubleDescentProbe(train_subset_size=10, seed=3)._train_subset(100),
    )
    assert torch.equal(first, second) and len(first) == 10 and len(set(first.tolist())) == 10
    assert torch.equal(DoubleDescentProbe(train_subset_size=None)._train_subset(7), torch.arange(7))


class _PlainData(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(
            TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), batch_size=16
        )


def test_a_data_module_without_noise_records_is_refused_at_setup(tmp_path):
    module, _ = make_module_and_data()
    with pytest.raises(ValueError, match="clean_labels"):
        make_trainer(tmp_path, [DoubleDescentProbe()], max_epochs=1).fit(module, datamodule=_PlainData())


def test_summary_reports_interpolation_and_the_peak():
    probe = DoubleDescentProbe(every_n_epochs=1)
    test_errors = [0.50, 0.40, 0.30, 0.25, 0.30, 0.38, 0.42, 0.36, 0.30, 0.26, 0.23, 0.21, 0.20]
    for epoch, test_error in enumerate(test_errors, start=1):
        train_error = max(0.0, 0.6 - 0.1 * epoch)
        probe.history.append(
            {
                "epoch": epoch,
                "step": 10 * epoch,
                "train_error": train_error,
                "train_error_clean": train_error,
                "train_error_noisy": 1.0,
                "memorized_fraction": 0.5,
                "test_error": test_error,
                "test_loss": 1.0,
            }
        )
    probe.interpolation_epoch = 6
    peaks = probe.peaks()
    assert [p.position for p in peaks] == [7]
    text = probe.summary()
    assert "interpolated at epoch 6" in text and "epoch 7 (test error 0.42)" in text
