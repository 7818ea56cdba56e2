"""LinearModeConnectivity against exact references.

References: the parent's own final weights (a sibling trained with the parent's seed from a snapshot must end
bit-identical to them, at k = 0, in mid-epoch and at an epoch boundary: the snapshot is complete); the
barriers recomputed by :func:`~lt_theory.measures.interpolation.linear_paths` from the saved weights; an
uninterrupted run for the resumed ones. The tiny run is the contract suite's: ResNet-8 on synthetic CIFAR,
6 steps per epoch, 2 epochs.
"""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch
from contract_setup import STEPS_PER_EPOCH, make_module_and_data, make_trainer
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Subset, TensorDataset

from lt_theory.callbacks import LinearModeConnectivity
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.measures.interpolation import error_barrier, linear_paths
from lt_theory.models import MLP
from lt_theory.module import ClassificationModule

FINAL_STEP = 2 * STEPS_PER_EPOCH


def _lmc(root, **kwargs) -> LinearModeConnectivity:
    settings = dict(num_alphas=5, train_subset_size=48, eval_batch_size=16, directory=root / "lmc")
    settings.update(kwargs)
    return LinearModeConnectivity(**settings)


def _fit(root, callbacks, module_and_data=None, ckpt_path=None, **trainer_args):
    module, data = module_and_data or make_module_and_data()
    trainer = make_trainer(root, callbacks, **trainer_args)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, data, trainer


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------------------------------------------------
# The snapshot is complete.


def test_sibling_with_the_parents_seed_reproduces_the_parent_exactly(tmp_path):
    """k = 0 (before the first step), 3 (mid-epoch) and 6 (epoch boundary): bit-identical final weights."""
    lmc = _lmc(tmp_path, spawn_steps=[0, 3, STEPS_PER_EPOCH], sibling_seed=0)  # the data module's own seed
    module, _, _ = _fit(tmp_path, [lmc])
    final = module.state_dict()
    assert sorted(lmc.results) == [0, 3, STEPS_PER_EPOCH]
    for k, result in lmc.results.items():
        assert result["final_step"] == FINAL_STEP and result["sibling_seed"] == 0
        assert _equal_states(torch.load(result["weights"]), final), f"sibling of step {k} differs"
        assert result["test_error_barrier"] == 0.0 and result["train_error_barrier"] == 0.0
        assert result["test_loss_barrier"] == pytest.approx(0.0, abs=1e-6)
    # and a sibling with another seed does not end there
    other = _lmc(tmp_path / "other", spawn_steps=[3])
    module, _, _ = _fit(tmp_path / "other", [other])
    assert other.results[3]["sibling_seed"] != 0
    assert not _equal_states(torch.load(other.results[3]["weights"]), module.state_dict())


# ------------------------------------------------------------------------------------------------------------
# Logged numbers equal the measures, at step k.


def _reference_paths(lmc, data, parent, sibling_state, alphas):
    """The paths recomputed from the measures, on the subset the callback documents (randperm(seed))."""
    train, test = data.train_dataset, data.test_dataset
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(lmc.seed))[
        : lmc.train_subset_size
    ]
    subset = subset.sort().values
    size = lmc.eval_batch_size
    batches = lambda x, y: [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]  # noqa: E731
    loaders = {
        "train": batches(train.images[subset], train.labels[subset]),
        "test": batches(test.images, test.labels),
    }
    return linear_paths(
        parent, sibling_state, loaders, alphas=alphas, bn_loader=loaders["train"], transform=data.preprocess
    )


def test_logged_barriers_equal_the_measures_at_the_spawn_steps(tmp_path):
    lmc = _lmc(tmp_path, spawn_steps=[0, 0.5])  # a fraction: half of the 12 steps
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    tb_logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    module, data, trainer = _fit(tmp_path, [lmc], logger=[csv_logger, tb_logger])
    assert lmc.resolved_steps == [0, 6]

    rows = list(csv.DictReader(open(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv")))
    logged = {int(row["step"]): row for row in rows if row.get("lmc/test_error_barrier")}
    assert sorted(logged) == [0, 6]
    for k in (0, 6):
        result = lmc.results[k]
        paths = _reference_paths(lmc, data, module, torch.load(result["weights"]), 5)
        for split in ("train", "test"):
            assert result[f"{split}_error"] == paths[split].error.tolist()
            for kind, values in (("error", paths[split].error), ("loss", paths[split].loss)):
                expected = error_barrier(values)
                assert result[f"{split}_{kind}_barrier"] == expected
                assert float(logged[k][f"lmc/{split}_{kind}_barrier"]) == pytest.approx(
                    expected, rel=1e-6, abs=1e-7
                )
        assert paths["train"].num_examples == 48 and paths["test"].num_examples == 32

    events = EventAccumulator(str(tb_logger.log_dir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [e.step for e in events.Images("lmc/error_along_path")] == [0, 6]
    assert [e.step for e in events.Scalars("lmc/test_error_barrier")] == [0, 6]
    assert "lmc/stability" in events.Tags()["images"]
    assert any(tag.startswith("lmc/summary") for tag in events.Tags()["tensors"])
    point = lmc.stable_point()
    barriers = {k: lmc.results[k]["test_error_barrier"] for k in (0, 6)}
    expected_point = next((k for k in (0, 6) if barriers[k] < 0.02), None)
    assert point == expected_point
    if point is not None:
        assert [e.value for e in events.Scalars("lmc/stable_point")] == [point]


# ------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"spawn_steps": [-1]}, "spawn_steps"),
        ({"spawn_steps": [0, 5, 5]}, "spawn_steps"),
        ({"spawn_steps": []}, "spawn_steps"),
        ({"spawn_steps": [1.5]}, "spawn_steps"),
        ({"spawn_steps": [True]}, "spawn_steps"),
        ({"spawn_steps": "0"}, "spawn_steps"),
        ({"spawn_steps": [math.nan]}, "spawn_steps"),
        ({"mode": "fork"}, "mode"),
        ({"bn": "swap"}, "bn"),
        ({"num_alphas": 1}, "num_alphas"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"threshold": 0}, "threshold"),
        ({"train_subset_size": 0}, "train_subset_size"),
        ({"sibling_seed": -2}, "sibling_seed"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LinearModeConnectivity(**kwargs)


@pytest.mark.parametrize("spawn_steps", [[3, FINAL_STEP], [FINAL_STEP + 5], [0.5, 6]])
def test_spawn_steps_beyond_the_end_or_colliding_raise_at_the_start(tmp_path, spawn_steps):
    lmc = _lmc(tmp_path, spawn_steps=spawn_steps)
    with pytest.raises(ValueError, match="spawn_steps"):
        _fit(tmp_path, [lmc])
    assert not (tmp_path / "lmc").exists()  # refused before any snapshot


def test_model_without_batchnorm_reset_is_a_no_op(tmp_path):
    """Init mode on an MLP: bn="reset" and bn="interpolate" give the same paths, and the endpoint at alpha = 0
    is the initial network's own evaluation."""
    histories = {}
    for bn in ("reset", "interpolate"):
        torch.manual_seed(0)
        module = ClassificationModule(MLP((3, 32, 32), hidden=(16,)), lr=0.05, schedule="constant")
        data = SyntheticCIFARDataModule(num_train=96, num_test=32, batch_size=16)
        initial = {key: value.clone() for key, value in module.state_dict().items()}
        lmc = _lmc(tmp_path / bn, mode="init", bn=bn)
        _fit(tmp_path / bn, [lmc], module_and_data=(module, data))
        histories[bn] = lmc.history
    assert [h["epoch"] for h in histories["reset"]] == [1, 2]
    for a, b in zip(histories["reset"], histories["interpolate"]):
        assert a["test_error"] == b["test_error"] and a["train_loss"] == b["train_loss"]
    module.load_state_dict(initial)
    with torch.no_grad():
        logits = module(data.preprocess(data.test_dataset.images))
    expected = torch.nn.functional.cross_entropy(logits, data.test_dataset.labels).item()
    assert histories["reset"][0]["test_loss"][0] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# A diverging sibling.


class _DivergingSibling(ClassificationModule):
    """Poisons its weights with NaN in the sibling spawned at ``poison_step`` (re-seeded data module)."""

    poison_step = STEPS_PER_EPOCH

    def on_train_start(self) -> None:
        if self.trainer.datamodule.order_seed is not None and self.trainer.global_step == self.poison_step:
            with torch.no_grad():
                self.net.fc.weight.fill_(math.nan)


def test_diverging_sibling_gives_nan_barriers_and_one_warning_and_the_others_go_on(tmp_path):
    from lt_theory.models import CIFARResNet

    torch.manual_seed(0)
    module = _DivergingSibling(CIFARResNet(depth=8), lr=0.05, schedule="constant")
    data = make_module_and_data()[1]
    lmc = _lmc(tmp_path, spawn_steps=[0, STEPS_PER_EPOCH])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [lmc], module_and_data=(module, data), logger=CSVLogger(tmp_path / "logs", name="csv"))
    ours = [str(w.message) for w in caught if str(w.message).startswith("LinearModeConnectivity")]
    diverged = [m for m in ours if "diverged" in m]
    assert len(diverged) == 1 and f"step {STEPS_PER_EPOCH}" in diverged[0], ours
    assert not any("not finite" in m for m in ours), ours
    bad, good = lmc.results[STEPS_PER_EPOCH], lmc.results[0]
    assert bad["diverged"] and all(math.isnan(bad[f"{s}_error_barrier"]) for s in ("train", "test"))
    assert not good["diverged"] and all(math.isfinite(good[f"{s}_error_barrier"]) for s in ("train", "test"))
    assert math.isnan(bad["test_error"][-1]) and bad["test_error"][0] == good["test_error"][0]  # same parent
    rows = list(csv.DictReader(open(tmp_path / "logs" / "csv" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): r["lmc/test_error_barrier"] for r in rows if r.get("lmc/test_error_barrier")}
    assert math.isnan(float(logged[STEPS_PER_EPOCH])) and math.isfinite(float(logged[0]))


# ------------------------------------------------------------------------------------------------------------
# Preemption.


class _Preempt(Callback):
    """Writes a checkpoint at ``step`` and kills the run, as a cluster preemption would."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("preempted")


class _Killed(BaseException):
    """A preemption in the middle of a sibling: not an error of the sibling, so it is not caught."""


def test_resume_finds_snapshots_and_does_not_retrain_finished_siblings(tmp_path, monkeypatch):
    steps = [3, 9]
    reference = _lmc(tmp_path / "reference", spawn_steps=steps)
    parent, _, _ = _fit(tmp_path / "reference", [reference])

    root = tmp_path / "preempted"
    trained = []
    original = LinearModeConnectivity._train_sibling

    def counting(self, trainer, pl_module, k, final_step, seed):
        trained.append(k)
        if k == 9 and trained.count(9) == 1:
            raise _Killed("preempted while training a sibling")
        return original(self, trainer, pl_module, k, final_step, seed)

    monkeypatch.setattr(LinearModeConnectivity, "_train_sibling", counting)
    with pytest.raises(RuntimeError, match="preempted"):  # killed at step 8: snapshot 3 on disk, 9 not yet
        _fit(root, [_lmc(root, spawn_steps=steps), _Preempt(8, root / "step8.ckpt")])
    last = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    second = _lmc(root, spawn_steps=steps)
    with pytest.raises(_Killed, match="while training a sibling"):  # killed after sibling 3
        _fit(root, [second, last], ckpt_path=root / "step8.ckpt", enable_checkpointing=True)
    assert sorted(second.snapshots) == steps
    assert second.snapshots[3] == str(root / "lmc" / "snapshot_step=3.ckpt")
    third = _lmc(root, spawn_steps=steps)
    last = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    module, _, _ = _fit(root, [third, last], ckpt_path=root / "ckpt" / "last.ckpt", enable_checkpointing=True)
    assert trained == [3, 9, 9]  # sibling 3 was not trained again
    assert _equal_states(module.state_dict(), parent.state_dict())
    for k in steps:
        for name in ("test_error_barrier", "train_error_barrier", "test_loss_barrier", "train_loss_barrier"):
            assert third.results[k][name] == reference.results[k][name], (k, name)


# ------------------------------------------------------------------------------------------------------------
# Init mode across a resume; a data module that is not lt_theory's.


def test_init_mode_resumes_with_the_initial_weights_from_disk(tmp_path):
    full = _lmc(tmp_path, mode="init")
    _fit(tmp_path / "full", [full])
    half = _lmc(tmp_path, mode="init")
    _, _, trainer = _fit(tmp_path / "half", [half], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _lmc(tmp_path, mode="init")
    _fit(tmp_path / "resumed", [resumed], ckpt_path=tmp_path / "half.ckpt")
    assert [h["step"] for h in full.history] == [STEPS_PER_EPOCH, FINAL_STEP]
    assert resumed.history == full.history  # the same initial weights, read back from disk
    assert resumed.init_weights == str(tmp_path / "lmc" / "init_weights.pt")
    assert full.history[0]["test_error"][0] == full.history[1]["test_error"][0]  # alpha = 0: the init


class _PlainData(LightningDataModule):
    """Tensors in TensorDatasets; the training loader shuffles from the global RNG or its own generator."""

    def __init__(self, own_generator: bool) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        images, labels = (
            torch.randn(96, 3, 32, 32, generator=generator),
            torch.randint(0, 10, (96,), generator=generator),
        )
        self.train, self.test = (
            TensorDataset(images[:64], labels[:64]),
            TensorDataset(images[64:], labels[64:]),
        )
        self.own_generator = own_generator

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(1) if self.own_generator else None
        return DataLoader(self.train, batch_size=16, shuffle=True, generator=generator)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=16)


@pytest.mark.parametrize("own_generator", [False, True])
def test_generic_data_module_reseeds_the_global_rng_and_evaluates_its_datasets(tmp_path, own_generator):
    torch.manual_seed(0)
    module = ClassificationModule(MLP((3, 32, 32), hidden=(16,)), lr=0.05, schedule="constant")
    data = _PlainData(own_generator)
    lmc = _lmc(tmp_path, spawn_steps=[2], train_subset_size=24, eval_batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parent, _, _ = _fit(
            tmp_path, [lmc], module_and_data=(module, data), max_epochs=2, limit_val_batches=0
        )
    ours = [str(w.message) for w in caught if str(w.message).startswith("LinearModeConnectivity")]
    assert sum("own generator" in m for m in ours) == int(own_generator), ours
    result = lmc.results[2]
    sibling = torch.load(result["weights"])
    assert not _equal_states(sibling, parent.state_dict())  # another order from step 2 on
    subset = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:24].sort().values
    train = DataLoader(Subset(data.train, subset.tolist()), batch_size=8)
    paths = linear_paths(
        parent, sibling, {"train": train, "test": DataLoader(data.test, batch_size=8)}, alphas=5
    )
    for split in ("train", "test"):
        assert result[f"{split}_error"] == paths[split].error.tolist()
        assert result[f"{split}_loss"] == paths[split].loss.tolist()
    assert paths["train"].num_examples == 24 and paths["test"].num_examples == 32


# ------------------------------------------------------------------------------------------------------------
# A real case: unstable at initialisation, stable late in training.


def test_resnet8_is_unstable_at_init_and_stable_late(tmp_path):
    """ResNet-8, lr 0.2 with cosine decay, 64 steps on 512 synthetic images: siblings spawned at step 0 end in
    different basins (measured: test / train error barrier 0.041 / 0.029, loss barrier 0.100), siblings
    spawned at step 48 in one (0.014 / 0.006, 0.0006). Both sides of the 0.02 threshold, by a factor of 2.
    The curve: ``benchmarks/lmc_stability_curve.py``."""
    import lightning.pytorch as pl

    from lt_theory.models import CIFARResNet

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(CIFARResNet(depth=8), lr=0.2, schedule="cosine", weight_decay=5e-4)
    data = SyntheticCIFARDataModule(num_train=512, num_test=256, batch_size=64)
    lmc = _lmc(tmp_path, spawn_steps=[0, 48], num_alphas=5, train_subset_size=256, eval_batch_size=256)
    _fit(tmp_path, [lmc], module_and_data=(module, data), max_epochs=8, limit_val_batches=0)
    unstable, stable = lmc.results[0], lmc.results[48]
    for split in ("test", "train"):
        assert unstable[f"{split}_error_barrier"] > max(0.02, 2 * stable[f"{split}_error_barrier"])
        assert stable[f"{split}_error_barrier"] < 0.02
    assert unstable["test_loss_barrier"] > 5 * stable["test_loss_barrier"]
    assert lmc.stable_point() == 48


# ------------------------------------------------------------------------------------------------------------
# A failing sibling, a reused instance, worker processes.


def test_a_sibling_that_raises_gives_nan_and_one_warning_and_the_others_go_on(tmp_path, monkeypatch):
    original = LinearModeConnectivity._train_sibling

    def failing_at_3(self, trainer, pl_module, k, final_step, seed):
        if k == 3:
            raise ValueError("the sibling's scheduler needs val/loss")
        return original(self, trainer, pl_module, k, final_step, seed)

    monkeypatch.setattr(LinearModeConnectivity, "_train_sibling", failing_at_3)
    lmc = _lmc(tmp_path, spawn_steps=[3, STEPS_PER_EPOCH])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [lmc], logger=CSVLogger(tmp_path / "logs", name="csv"))
    ours = [str(w.message) for w in caught if str(w.message).startswith("LinearModeConnectivity")]
    failed = [m for m in ours if "failed" in m]
    assert len(failed) == 1 and "step 3" in failed[0] and "val/loss" in failed[0], ours
    assert not any("not finite" in m for m in ours), ours
    assert all(math.isnan(lmc.results[3][f"{s}_error_barrier"]) for s in ("train", "test"))
    assert all(math.isfinite(lmc.results[STEPS_PER_EPOCH][f"{s}_error_barrier"]) for s in ("train", "test"))
    assert not list((tmp_path / "lmc").glob("sibling_step=3_*"))  # nothing stored: a resume trains it again


def test_a_reused_instance_measures_its_second_fit_not_the_first(tmp_path):
    lmc = LinearModeConnectivity(spawn_steps=[3], num_alphas=3, train_subset_size=48, eval_batch_size=16)
    _fit(tmp_path / "first", [lmc])
    first_snapshot, first_weights, first_parent = (
        lmc.snapshots[3],
        lmc.results[3]["weights"],
        lmc.results[3]["parent"],
    )
    module, data = make_module_and_data()
    data.reseed_order(5)  # another run: another data order
    _fit(tmp_path / "second", [lmc], module_and_data=(module, data))
    assert lmc.snapshots[3].startswith(str(tmp_path / "second")) and lmc.snapshots[3] != first_snapshot
    assert lmc.results[3]["weights"].startswith(str(tmp_path / "second"))
    assert lmc.results[3]["weights"] != first_weights
    assert lmc.results[3]["parent"] != first_parent


def test_with_worker_processes_the_epoch_boundary_snapshot_is_complete(tmp_path):
    """Persistent DataLoader workers draw their base seed once per iterator: it must not come from the
    generator of the order, or a sibling started at an epoch boundary sees another order."""
    module, data = make_module_and_data()
    data.num_workers = 1
    lmc = _lmc(tmp_path, spawn_steps=[STEPS_PER_EPOCH], sibling_seed=0)
    parent, _, _ = _fit(tmp_path, [lmc], module_and_data=(module, data))
    assert _equal_states(torch.load(lmc.results[STEPS_PER_EPOCH]["weights"]), parent.state_dict())
    assert lmc.results[STEPS_PER_EPOCH]["test_error_barrier"] == 0.0


def test_a_dropout_network_with_a_cosine_schedule_is_reproduced_from_the_rng_states_of_the_snapshot(tmp_path):
    """Dropout draws from the global RNG and the cosine schedule depends on the loop position: a sibling with
    the parent's seed ends bit-identical only if the snapshot restores both."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 32 * 32, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(32, 10),
    )
    module = ClassificationModule(net, lr=0.05, schedule="cosine")
    data = make_module_and_data()[1]
    lmc = _lmc(tmp_path, spawn_steps=[3, STEPS_PER_EPOCH], sibling_seed=0)
    parent, _, _ = _fit(tmp_path, [lmc], module_and_data=(module, data))
    for k in (3, STEPS_PER_EPOCH):
        assert _equal_states(torch.load(lmc.results[k]["weights"]), parent.state_dict()), k


def test_a_sibling_preempted_mid_training_resumes_from_its_own_progress_checkpoint(tmp_path, monkeypatch):
    from lt_theory.callbacks.lmc import _SiblingStart

    reference = _lmc(tmp_path / "reference", spawn_steps=[2])
    _fit(tmp_path / "reference", [reference])

    starts, killed = [], []

    def recording_start(self, trainer, pl_module):
        starts.append(trainer.global_step)

    def kill_once_at_step_8(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 8 and not killed:
            killed.append(True)
            raise _Killed("preempted while training a sibling")

    monkeypatch.setattr(_SiblingStart, "on_train_start", recording_start, raising=False)
    monkeypatch.setattr(_SiblingStart, "on_train_batch_end", kill_once_at_step_8, raising=False)
    root = tmp_path / "preempted"
    with pytest.raises(_Killed):
        last = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        _fit(root, [_lmc(root, spawn_steps=[2]), last], enable_checkpointing=True)
    resumed = _lmc(root, spawn_steps=[2])
    last = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    _fit(root, [resumed, last], ckpt_path=root / "ckpt" / "last.ckpt", enable_checkpointing=True)
    # the second attempt starts from the sibling's last progress checkpoint (step 7: the kill comes before
    # the checkpoint of step 8), not from the snapshot at step 2, and ends where an uninterrupted one does
    assert starts == [2, 7]
    final = torch.load(resumed.results[2]["weights"])
    assert _equal_states(final, torch.load(reference.results[2]["weights"]))
    assert resumed.results[2]["test_error_barrier"] == reference.results[2]["test_error_barrier"]
    assert not list((root / "lmc").glob("*_progress"))  # removed once the sibling is done
