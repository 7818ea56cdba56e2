"""DoubleDescentProbe: every number it logs against an independent computation. A plain evaluation loop on
the weights recorded at each epoch's end (the seeded training subset, the data module's noisy indices); a
scripted classifier whose curves, interpolation epoch, test-error peak, summary and figure are known in
advance; generic data modules (with and without a test set, under DDP); the warnings when the noisy-label
metrics are off; the measurement at train end."""

from __future__ import annotations

import copy
import csv
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lt_theory import loggers
from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.callbacks.evaluation_sets import fixed_subset
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.models import MLP
from lt_theory.module import ClassificationModule


def _rows(csv_dir) -> list[dict]:
    return list(csv.DictReader(open(next(csv_dir.glob("version_*")) / "metrics.csv")))


def _last_logged(csv_dir, tag: str) -> float:
    return float([row[tag] for row in _rows(csv_dir) if row.get(tag)][-1])


def _probe_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("DoubleDescentProbe")]


class _WeightsAtEpochEnd(Callback):
    """Keeps a copy of the weights and the global step at the end of every epoch, counted by itself."""

    def __init__(self) -> None:
        self.epochs: dict[int, tuple[int, dict]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs[len(self.epochs) + 1] = (trainer.global_step, copy.deepcopy(pl_module.state_dict()))


def _seeded_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """The documented training subset: the first ``size`` of a permutation drawn from ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def _plain_evaluation(module, state, data, subset) -> dict[str, float]:
    """The six dd/ numbers of one set of weights, by a plain loop: eval mode, one batch, no measure used."""
    model = copy.deepcopy(module)
    model.load_state_dict(state)
    model.eval()
    train, test = data.train_dataset, data.test_dataset
    with torch.no_grad():
        predicted = model(data.preprocess(train.images[subset])).argmax(dim=1)
        test_logits = model(data.preprocess(test.images)).double()
    labels = train.labels[subset]
    noisy = torch.tensor([int(i) in set(train.noisy_indices.tolist()) for i in subset])
    right = (predicted == labels).double()
    return {
        "train_error": 1 - float(right.mean()),
        "train_error_clean": 1 - float(right[~noisy].mean()),
        "train_error_noisy": 1 - float(right[noisy].mean()),
        "memorized_fraction": float(right[noisy].mean()),  # predicted == the noisy label in use
        "test_error": float((test_logits.argmax(dim=1) != test.labels).double().mean()),
        "test_loss": float(torch.nn.functional.cross_entropy(test_logits, test.labels)),
    }


def test_every_logged_number_equals_a_plain_evaluation_of_the_weights_of_its_epoch(tmp_path):
    """ResNet-8, 3 epochs, a 40-example subset of the 96 (25% noisy): at each epoch's last step, each dd/ number
    equals the plain loop on the weights recorded at that epoch's end, over the same subset."""
    probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=40, eval_batch_size=16, seed=4)
    recorder = _WeightsAtEpochEnd()
    module, data = make_module_and_data()
    trainer = make_trainer(tmp_path, [recorder, probe], logger=CSVLogger(tmp_path, name="csv"), max_epochs=3)
    trainer.fit(module, datamodule=data)

    train = data.train_dataset
    assert len(train.noisy_indices) == 24  # 25% of 96
    assert bool((train.labels[train.noisy_indices] != train.clean_labels[train.noisy_indices]).all())
    subset = _seeded_subset(96, 40, seed=4)
    assert torch.equal(fixed_subset(96, probe.train_subset_size, probe.seed), subset.sort().values)
    assert 0 < int(torch.isin(subset, train.noisy_indices).sum()) < 40
    rows = _rows(tmp_path / "csv")
    assert sorted(recorder.epochs) == [1, 2, 3]
    for epoch, (step, state) in recorder.epochs.items():
        expected = _plain_evaluation(module, state, data, subset)
        logged = {
            tag[3:]: float(row[tag])
            for row in rows
            if int(row["step"]) == step
            for tag in row
            if tag.startswith("dd/") and row[tag]
        }
        assert set(logged) == set(expected), (epoch, logged)
        for name, value in expected.items():
            tolerance = 1e-5 if name == "test_loss" else 1e-12  # float32 logits in the probe
            assert logged[name] == pytest.approx(value, rel=tolerance, abs=1e-12), (epoch, name)
    assert [(h["epoch"], h["step"]) for h in probe.history] == [
        (e, s) for e, (s, _) in recorder.epochs.items()
    ]


def _plain_logits(module, tensors, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's logits over ``(inputs, labels)`` in eval mode, batched as the probe does, and the labels."""
    inputs, labels = tensors
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    module.train()
    return logits, labels


def test_train_subset_is_fixed_by_the_seed():
    first, second = fixed_subset(100, 10, seed=3), fixed_subset(100, 10, seed=3)
    assert torch.equal(first, second) and len(first) == 10 and len(set(first.tolist())) == 10
    assert torch.equal(first, _seeded_subset(100, 10, seed=3).sort().values)
    assert torch.equal(fixed_subset(7, None, seed=3), torch.arange(7))


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
    train_logits, train_labels = _plain_logits(module, data.train.tensors)
    test_logits, test_labels = _plain_logits(module, data.test.tensors)
    assert _last_logged(tmp_path / "csv", "dd/train_error") == pytest.approx(
        float((train_logits.argmax(dim=1) != train_labels).double().mean()), abs=1e-12
    )
    assert _last_logged(tmp_path / "csv", "dd/test_error") == pytest.approx(
        float((test_logits.argmax(dim=1) != test_labels).double().mean()), abs=1e-12
    )
    assert _last_logged(tmp_path / "csv", "dd/test_loss") == pytest.approx(
        float(torch.nn.functional.cross_entropy(test_logits.double(), test_labels)), rel=1e-6
    )
    assert torch.equal(probe.last_test_labels, data.test.tensors[1])
    assert torch.allclose(probe.last_test_logits, test_logits, atol=1e-6)
    header = _rows(tmp_path / "csv")[0].keys()
    assert not {"dd/train_error_clean", "dd/train_error_noisy", "dd/memorized_fraction"} & set(header)
    noisy = [m for m in messages if "noisy" in m]
    assert len(noisy) == 1 and "_PlainData" in noisy[0] and "clean_labels" in noisy[0], messages
    assert [h["epoch"] for h in probe.history] == [1, 2, 3]


def test_a_generic_subset_is_the_seeded_subset_of_the_training_dataset(tmp_path):
    probe = DoubleDescentProbe(every_n_epochs=2, train_subset_size=12, eval_batch_size=5, seed=7)
    module, data, _ = _fit_plain(tmp_path, probe, max_epochs=2)
    subset = _seeded_subset(len(data.train), 12, seed=7)
    inputs, labels = data.train.tensors
    logits, labels = _plain_logits(module, (inputs[subset], labels[subset]))
    expected = float((logits.argmax(dim=1) != labels).double().mean())
    assert _last_logged(tmp_path / "csv", "dd/train_error") == pytest.approx(expected, abs=1e-12)


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
    logits, labels = _plain_logits(module, (data.preprocess(train.images), train.labels))
    assert probe.history[-1]["train_error"] == pytest.approx(
        float((logits.argmax(dim=1) != labels).double().mean()), abs=1e-12
    )
    with pytest.raises(ValueError, match="measure_on_train_end"):
        DoubleDescentProbe(measure_on_train_end="yes")


_DDP_SCRIPT = """
import sys, torch
sys.path[:0] = [{tests!r}, {root!r}]  # this working tree's lt_theory, not an installed one
from contract_setup import make_trainer
from test_double_descent_callback import _PlainData, _mlp_module
import lt_theory
from lt_theory import loggers
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
    train_logits, train_labels = _plain_logits(module, data.train.tensors)
    test_logits, test_labels = _plain_logits(module, data.test.tensors)
    assert torch.equal(result["labels"], test_labels)
    assert torch.allclose(result["logits"], test_logits, atol=1e-5)
    assert result["history"][-1]["train_error"] == pytest.approx(
        float((train_logits.argmax(dim=1) != train_labels).double().mean()), abs=1e-12
    )
    assert result["history"][-1]["test_error"] == pytest.approx(
        float((test_logits.argmax(dim=1) != test_labels).double().mean()), abs=1e-12
    )


# --------------------------------------------------------------------------------------------------------
# A scripted classifier: curves known in advance, fed through the probe's own code path
# --------------------------------------------------------------------------------------------------------


class _ScriptedClassifier(LightningModule):
    """Predicts by script, not by learning: after its e-th epoch its prediction on example i is ``script[e - 1, i]``.

    Examples (training set first, then the test set, preprocessed) are recognised by their nearest neighbour;
    the logits are ``scale`` on the predicted class and 0 elsewhere. Training only moves a dummy parameter.
    """

    def __init__(self, keys: torch.Tensor, script: torch.Tensor, num_classes: int, scale: float) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.keys, self.script = keys.flatten(1).double(), script
        self.num_classes, self.scale = num_classes, scale
        self.epochs_started = 0

    def on_train_epoch_start(self) -> None:
        self.epochs_started += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(x.flatten(1).double(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        assert bool((distances.min(dim=1).values == 0).all())  # every input is one of the scripted examples
        predicted = self.script[self.epochs_started - 1, distances.argmin(dim=1)]
        return self.scale * torch.nn.functional.one_hot(predicted, self.num_classes).float()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return (self.dummy - 1).pow(2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# Per epoch: clean training examples predicted wrong (of 72), noisy ones predicted with their noisy label (of
# 24; the others with their clean label), test examples predicted wrong (of 32). Train errors 40, 20, 3, 2, 1,
# 0, ... of 96: with epsilon = 2/96 the training set is interpolated at epoch 4 exactly (at epoch 5 under a
# strict inequality). The test error rises from 8/32 at epoch 4 to its one peak, 14/32 at epoch 7.
_WRONG_CLEAN = [30, 12, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
_MEMORISED = [14, 16, 21, 22, 24, 24, 24, 24, 24, 24, 24, 24, 23]
_WRONG_TEST = [16, 13, 10, 8, 10, 12, 14, 11, 9, 8, 7, 6, 7]
_SCALE = 2.0


def _scripted_run(tmp_path, monkeypatch):
    data = SyntheticCIFARDataModule(num_train=96, num_test=32, batch_size=48, label_noise=0.25, augment=False)
    data.setup()
    train, test = data.train_dataset, data.test_dataset
    noisy = torch.zeros(96, dtype=torch.bool)
    noisy[train.noisy_indices] = True
    clean_positions, noisy_positions = torch.nonzero(~noisy).flatten(), torch.nonzero(noisy).flatten()
    assert len(noisy_positions) == 24 and bool((train.labels[noisy] != train.clean_labels[noisy]).all())
    script = []
    for wrong_clean, memorised, wrong_test in zip(_WRONG_CLEAN, _MEMORISED, _WRONG_TEST):
        on_train, on_test = train.labels.clone(), test.labels.clone()
        wrong = clean_positions[:wrong_clean]
        on_train[wrong] = (train.labels[wrong] + 1) % 10
        corrected = noisy_positions[memorised:]
        on_train[corrected] = train.clean_labels[corrected]
        on_test[:wrong_test] = (test.labels[:wrong_test] + 1) % 10
        script.append(torch.cat([on_train, on_test]))
    keys = data.preprocess(torch.cat([train.images, test.images]))
    module = _ScriptedClassifier(keys, torch.stack(script), 10, _SCALE)
    figures = []
    original = loggers.log_figure

    def keep_figure(trainer, tag, figure, *args, **kwargs):
        figures.append((tag, figure))
        return original(trainer, tag, figure, *args, **kwargs)

    monkeypatch.setattr(loggers, "log_figure", keep_figure)
    probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=None, interpolation_epsilon=2 / 96)
    logger = [
        CSVLogger(tmp_path, name="csv"),
        TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
    ]
    make_trainer(tmp_path, [probe], logger=logger, max_epochs=len(_WRONG_TEST)).fit(module, datamodule=data)
    return probe, figures


def _expected_curves() -> dict[str, list[float]]:
    """The six numbers of every epoch, from the script by hand."""
    wrong_loss, right_loss = math.log(math.exp(_SCALE) + 9), math.log(1 + 9 * math.exp(-_SCALE))
    return {
        "train_error": [(c + 24 - m) / 96 for c, m in zip(_WRONG_CLEAN, _MEMORISED)],
        "train_error_clean": [c / 72 for c in _WRONG_CLEAN],
        "train_error_noisy": [(24 - m) / 24 for m in _MEMORISED],
        "memorized_fraction": [m / 24 for m in _MEMORISED],
        "test_error": [t / 32 for t in _WRONG_TEST],
        "test_loss": [(t * wrong_loss + (32 - t) * right_loss) / 32 for t in _WRONG_TEST],
    }


def test_a_scripted_classifier_logs_its_known_curves_interpolation_epoch_and_peak(tmp_path, monkeypatch):
    """Two steps per epoch: epoch e ends at step 2e. Every dd/ scalar is read back from the CSV logger."""
    _scripted_run(tmp_path, monkeypatch)
    rows = _rows(tmp_path / "csv")
    logged: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for tag, value in row.items():
            if tag.startswith("dd/") and value:
                logged.setdefault(tag[3:], []).append((int(row["step"]), float(value)))
    epochs = range(1, len(_WRONG_TEST) + 1)
    for name, values in _expected_curves().items():
        assert [s for s, _ in logged[name]] == [2 * e for e in epochs], name
        tolerance = 1e-6 if name == "test_loss" else 1e-12  # float32 logits
        assert [v for _, v in logged[name]] == pytest.approx(values, rel=tolerance, abs=1e-12), name
    assert logged["interpolation_epoch"] == [(8, 4.0)]  # once, at the end of epoch 4
    assert logged["peak_epoch"] == [(14, 7.0)]  # at the end of epoch 7
    assert logged["peak_test_error"] == [(14, 14 / 32)]  # the raw test error, not the smoothed one


def test_a_scripted_classifier_gets_the_known_summary_and_figure(tmp_path, monkeypatch):
    probe, figures = _scripted_run(tmp_path, monkeypatch)
    events = EventAccumulator(str(next((tmp_path / "tb").glob("version_*"))), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("dd/summary/text_summary")
    # last epoch: 2 of 96 wrong (1 of 72 clean, 1 of 24 noisy), 23 of 24 memorised, 7 of 32 test errors
    assert text.tensor_proto.string_val[0].decode() == (
        "After 13 epochs: train error 0.0208 (clean 0.0139, noisy 0.0417), 95.8% of the noisy labels "
        "memorised, test error 0.219. The training set was interpolated at epoch 4. Test-error peak(s): "
        "epoch 7 (test error 0.438): epoch-wise double descent."
    )
    assert probe.interpolation_epoch == 4
    [(tag, figure)] = figures
    assert tag == "dd/curves"
    (axis,) = figure.axes
    epochs = list(range(1, len(_WRONG_TEST) + 1))
    lines = {line.get_label(): line for line in axis.get_lines()}
    for name, values in _expected_curves().items():
        if name in lines:
            assert list(lines[name].get_xdata()) == epochs, name
            assert list(lines[name].get_ydata()) == pytest.approx(values, abs=1e-12), name
    assert set(lines) == {
        "train_error",
        "train_error_clean",
        "train_error_noisy",
        "test_error",
        "interpolation",
    }
    assert list(lines["interpolation"].get_xdata()) == [4, 4]
    [annotation] = [child for child in axis.texts if child.get_text() == "peak"]
    assert tuple(annotation.xy) == (7, 14 / 32)
