"""DoubleDescentProbe: logged numbers equal the measures on the final model, on lt_theory and generic data
modules; warnings when noisy-label metrics are off; the measurement at train end; reporting."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import LightningDataModule
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.measures.risk import evaluate_classifier, noisy_label_errors
from lt_theory.models import MLP
from lt_theory.module import ClassificationModule


def _rows(csv_dir) -> list[dict]:
    return list(csv.DictReader(open(next(csv_dir.glob("version_*")) / "metrics.csv")))


def _last_logged(csv_dir, tag: str) -> float:
    return float([row[tag] for row in _rows(csv_dir) if row.get(tag)][-1])


def _probe_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("DoubleDescentProbe")]


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
    """A generic data module: tensors in TensorDatasets, a shuffled training loader with its own generator."""

    def __init__(self, num_train: int = 40, num_test: int = 24):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.train = TensorDataset(
            torch.randn(num_train, 3, 32, 32, generator=generator), torch.arange(num_train) % 10
        )
        self.test = TensorDataset(
            torch.randn(num_test, 3, 32, 32, generator=generator), torch.arange(num_test) % 7
        )
        self.shuffle = torch.Generator().manual_seed(0)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8, shuffle=True, generator=self.shuffle)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=8)


class _PlainDataWithoutTest(LightningDataModule):
    def __init__(self):
        super().__init__()
        self.train = TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8, shuffle=True)


def _fit_plain(tmp_path, probe=None, datamodule=None, **overrides):
    module, _ = make_module_and_data()
    datamodule = _PlainData() if datamodule is None else datamodule
    callbacks = [] if probe is None else [probe]
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks, logger=logger, **overrides).fit(module, datamodule=datamodule)
    return module, datamodule, _probe_warnings(caught)


def test_a_generic_data_module_gives_the_clean_metrics_and_says_once_that_the_noisy_ones_are_off(tmp_path):
    probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=None, eval_batch_size=16)
    module, data, messages = _fit_plain(tmp_path, probe, max_epochs=3)
    train = evaluate_classifier(module, DataLoader(data.train, batch_size=16))  # batched as the probe does
    test = evaluate_classifier(module, DataLoader(data.test, batch_size=16))
    assert _last_logged(tmp_path / "csv", "dd/train_error") == pytest.approx(train.error, abs=1e-12)
    assert _last_logged(tmp_path / "csv", "dd/test_error") == pytest.approx(test.error, abs=1e-12)
    assert _last_logged(tmp_path / "csv", "dd/test_loss") == pytest.approx(test.loss, rel=1e-6)
    assert torch.equal(probe.last_test_labels, data.test.tensors[1])
    assert torch.allclose(probe.last_test_logits, test.logits, atol=1e-6)
    header = _rows(tmp_path / "csv")[0].keys()
    assert not {"dd/train_error_clean", "dd/train_error_noisy", "dd/memorized_fraction"} & set(header)
    noisy = [m for m in messages if "noisy" in m]
    assert len(noisy) == 1 and "_PlainData" in noisy[0] and "clean_labels" in noisy[0], messages
    assert [h["epoch"] for h in probe.history] == [1, 2, 3]


def test_a_generic_subset_is_the_seeded_subset_of_the_training_dataset(tmp_path):
    probe = DoubleDescentProbe(every_n_epochs=2, train_subset_size=12, eval_batch_size=5, seed=7)
    module, data, _ = _fit_plain(tmp_path, probe, max_epochs=2)
    subset = probe._train_subset(len(data.train))
    inputs, labels = data.train.tensors
    expected = evaluate_classifier(
        module, DataLoader(TensorDataset(inputs[subset], labels[subset]), batch_size=5)
    )
    assert probe.history[-1]["train_error"] == pytest.approx(expected.error, abs=1e-12)


def test_a_generic_data_module_trains_bit_identically_with_the_probe(tmp_path):
    without, _, _ = _fit_plain(tmp_path / "without", max_epochs=2)
    probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=10, eval_batch_size=7)
    with_probe, _, _ = _fit_plain(tmp_path / "with", probe, max_epochs=2)
    for key, value in without.state_dict().items():
        assert torch.equal(value, with_probe.state_dict()[key]), key


def test_without_a_test_set_only_the_train_error_is_logged_with_one_warning(tmp_path):
    probe = DoubleDescentProbe(every_n_epochs=1)
    _, _, messages = _fit_plain(tmp_path, probe, datamodule=_PlainDataWithoutTest(), max_epochs=2)
    assert [m for m in messages if "test_dataloader" in m] == [m for m in messages if "test_error" in m]
    assert len([m for m in messages if "test_dataloader" in m]) == 1, messages
    assert set(probe.history[-1]) == {"epoch", "step", "train_error"}
    assert "test error nan" in probe.summary()


def test_an_lt_theory_data_module_without_label_noise_warns_once(tmp_path):
    module, _ = make_module_and_data()
    data = SyntheticCIFARDataModule(num_train=48, num_test=16, batch_size=16, label_noise=0.0)
    probe = DoubleDescentProbe(every_n_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [probe], max_epochs=2).fit(module, datamodule=data)
    messages = [m for m in _probe_warnings(caught) if "label_noise=0" in m]
    assert len(messages) == 1, _probe_warnings(caught)
    assert set(probe.history[-1]) == {
        "epoch",
        "step",
        "train_error",
        "train_error_clean",
        "test_error",
        "test_loss",
    }
    assert probe.history[-1]["train_error"] == probe.history[-1]["train_error_clean"]


def test_without_a_data_module_the_probe_is_refused_at_setup(tmp_path):
    module, data = make_module_and_data()
    data.setup()
    loader = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.arange(16) % 10), batch_size=8)
    with pytest.raises(ValueError, match="needs a data module"):
        make_trainer(tmp_path, [DoubleDescentProbe()], max_epochs=1).fit(module, train_dataloaders=loader)


@pytest.mark.parametrize(
    "overrides, epochs, measured_steps",
    [
        (dict(max_epochs=3), [2, 3], [12, 18]),  # 3 is not a multiple of 2: measured at train end
        (dict(max_epochs=4), [2, 4], [12, 24]),  # already measured: nothing added
        (dict(max_epochs=5, max_steps=9), [1, 2], [6, 9]),  # stopped in mid-epoch 2
    ],
)
def test_measure_on_train_end_measures_the_final_model_once(tmp_path, overrides, epochs, measured_steps):
    every = 1 if "max_steps" in overrides else 2
    probe = DoubleDescentProbe(every_n_epochs=every, measure_on_train_end=True, train_subset_size=None)
    module, data = make_module_and_data()
    make_trainer(tmp_path, [probe], **overrides).fit(module, datamodule=data)
    assert [h["epoch"] for h in probe.history] == epochs
    assert [h["step"] for h in probe.history] == measured_steps
    train = data.train_dataset
    final = evaluate_classifier(module, [(train.images, train.labels)], transform=data.preprocess)
    assert probe.history[-1]["train_error"] == pytest.approx(final.error, abs=1e-12)
    with pytest.raises(ValueError, match="measure_on_train_end"):
        DoubleDescentProbe(measure_on_train_end="yes")


_DDP_SCRIPT = """
import sys, torch
sys.path[:0] = [{tests!r}, {root!r}]  # this working tree's lt_theory, not an installed one
from contract_setup import make_trainer
from test_double_descent_callback import _PlainData, _mlp_module
import lt_theory
from lt_theory.callbacks.double_descent import DoubleDescentProbe
assert lt_theory.__file__.startswith({root!r}), lt_theory.__file__

module = _mlp_module()
probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=None, eval_batch_size=3)
trainer = make_trainer({out!r}, [probe], strategy="ddp", devices=2, deterministic=False, max_epochs=1)
trainer.fit(module, datamodule=_PlainData(num_train=41, num_test=23))
if trainer.global_rank == 0:
    torch.save({{"state": module.state_dict(), "history": probe.history, "logits": probe.last_test_logits,
                "labels": probe.last_test_labels}}, {out!r} + "/result.pt")
"""


def _mlp_module() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule(MLP((3, 32, 32), hidden=(16,)), lr=0.05, schedule="constant")


def test_a_generic_data_module_under_ddp_gathers_every_example_in_order(tmp_path):
    """Two CPU processes evaluate interleaved shards of odd-sized sets; the gathered rows are in order.

    The model has no BatchNorm: under DDP each rank keeps its own running statistics, so a BatchNorm model's
    shards would be evaluated with slightly different buffers (see the callback's docstring)."""
    script = tmp_path / "ddp_generic.py"
    tests = str(Path(__file__).parent)
    root = str(Path(tests).parent)
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(tests=tests, root=root, out=str(tmp_path))))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tests
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    module = _mlp_module()
    module.load_state_dict(result["state"])
    data = _PlainData(num_train=41, num_test=23)
    train = evaluate_classifier(module, [data.train.tensors])
    test = evaluate_classifier(module, [data.test.tensors])
    assert torch.equal(result["labels"], data.test.tensors[1])
    assert torch.allclose(result["logits"], test.logits, atol=1e-5)
    assert result["history"][-1]["train_error"] == pytest.approx(train.error, abs=1e-12)
    assert result["history"][-1]["test_error"] == pytest.approx(test.error, abs=1e-12)


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
