"""LinearModeConnectivity against exact references.

References: the parent's own final weights (a sibling trained with the parent's seed from a snapshot must end
bit-identical to them, at k = 0, in mid-epoch and at an epoch boundary: the snapshot is complete); the
barriers recomputed by :func:`~lt_theory.measures.interpolation.linear_paths` from the saved weights; an
uninterrupted run for the resumed ones. The tiny run is the contract suite's: ResNet-8 on synthetic CIFAR,
6 steps per epoch, 2 epochs.

Every number the callback computes itself (the barriers it logs and at which step, the stable point, the
summary table, the figures' data, init-mode barriers, reused results) is checked against an evaluation of
the path written out here as a plain loop (:func:`_plain_path`), or against results whose answer is set in
advance, never only against the callback's own ``results``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re
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
    settings = dict(num_alphas=5, every_n_epochs=1, train_subset_size=48, eval_batch_size=16)
    settings["directory"] = root / "lmc"
    settings.update(kwargs)
    return LinearModeConnectivity(**settings)


def _fit(root, callbacks, module_and_data=None, ckpt_path=None, **trainer_args):
    module, data = module_and_data or make_module_and_data()
    trainer = make_trainer(root, callbacks, **trainer_args)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, data, trainer


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _plain_path(net, state_a: dict, state_b: dict, data, seed=0, train_subset_size=48, num_alphas=5) -> dict:
    """Error and loss along ``(1 - alpha) a + alpha b`` by hand, as Frankle et al. define them: at each alpha
    the interpolated weights, BatchNorm statistics re-estimated by one train-mode forward of the whole
    training subset (``randperm(seed)[:size]``, sorted, as documented), then an eval-mode forward of the
    subset and of the whole test set; barrier = max over alpha minus the mean of the two ends.

    The reset is one batch, so the callback is run with ``eval_batch_size`` at least the subset's size: with
    several batches, the BatchNorms after the first see inputs normalised by each batch's own statistics,
    and the estimate depends on the batching."""
    net = copy.deepcopy(net)
    strip = lambda state: {key.removeprefix("net."): value for key, value in state.items()}  # noqa: E731
    state_a, state_b = strip(state_a), strip(state_b)
    train, test = data.train_dataset, data.test_dataset
    subset = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))
    subset = subset[:train_subset_size].sort().values
    sets = {
        "train": (data.preprocess(train.images[subset]), train.labels[subset]),
        "test": (data.preprocess(test.images), test.labels),
    }
    alphas = [i / (num_alphas - 1) for i in range(num_alphas)]
    path: dict = {"alphas": alphas}
    for split in sets:
        path[f"{split}_error"], path[f"{split}_loss"] = [], []
    for alpha in alphas:
        net.load_state_dict(
            {
                key: (1 - alpha) * value + alpha * state_b[key] if value.is_floating_point() else value
                for key, value in state_a.items()
            }
        )
        with torch.no_grad():
            net.train()
            for module in net.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
                    module.momentum = None
            net(sets["train"][0])  # one batch: its mean and unbiased variance become the running statistics
            net.eval()
            for split, (x, y) in sets.items():
                logits = net(x)
                path[f"{split}_loss"].append(torch.nn.functional.cross_entropy(logits, y).item())
                path[f"{split}_error"].append((logits.argmax(1) != y).double().mean().item())
    for split in sets:
        for kind in ("error", "loss"):
            values = path[f"{split}_{kind}"]
            path[f"{split}_{kind}_barrier"] = max(values) - (values[0] + values[-1]) / 2
    return path


def _sibling_weights(root, k: int) -> dict:
    """The sibling of step ``k``'s final weights, found on disk by name (not through ``lmc.results``)."""
    (path,) = (root / "lmc").glob(f"sibling_step={k}_to=*.pt")
    return torch.load(path)


def _logged(root, tag: str) -> dict[int, float]:
    """``{step: value}`` of a tag in the CSV logger's file under ``root/logs/csv``."""
    rows = list(csv.DictReader(open(root / "logs" / "csv" / "version_0" / "metrics.csv")))
    return {int(row["step"]): float(row[tag]) for row in rows if row.get(tag)}


class _FigureRecorder:
    """Records the data of every figure the callbacks log (line label -> (x, y)), then logs it as usual."""

    def __init__(self, monkeypatch) -> None:
        from lt_theory import loggers

        self.figures: list[tuple[str, int | None, dict]] = []
        original = loggers.log_figure

        def recording(trainer, tag, figure, step=None, **kwargs):
            lines = {
                line.get_label(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
                for axis in figure.axes
                for line in axis.get_lines()
            }
            self.figures.append((tag, trainer.global_step if step is None else step, lines))
            return original(trainer, tag, figure, step, **kwargs)

        monkeypatch.setattr(loggers, "log_figure", recording)

    def __call__(self, tag: str) -> dict[int, dict]:
        return {step: lines for name, step, lines in self.figures if name == tag}


def _summary_rows(text: str) -> dict[int, list[float]]:
    """``{k: [test error, train error, test loss barrier]}`` from the ``lmc/summary`` markdown table."""
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.MULTILINE)
    return {int(k): [float(cell) for cell in cells.split(" | ")] for k, cells in rows}


# ------------------------------------------------------------------------------------------------------------
# The snapshot is complete.


def test_sibling_with_the_parents_seed_reproduces_the_parent_exactly(tmp_path):
    """k = 0 (before the first step), 3 (mid-epoch) and 6 (epoch boundary): bit-identical final weights.

    So the answer is known in advance: every barrier is 0, logged at its k, and the stable point is the
    first spawn step, 0 (not the last stable one)."""
    lmc = _lmc(tmp_path, spawn_steps=[0, 3, STEPS_PER_EPOCH], sibling_seed=0)  # the data module's own seed
    module, _, _ = _fit(tmp_path, [lmc], logger=CSVLogger(tmp_path / "logs", name="csv"))
    final = module.state_dict()
    assert sorted(lmc.results) == [0, 3, STEPS_PER_EPOCH]
    for k, result in lmc.results.items():
        assert result["final_step"] == FINAL_STEP and result["sibling_seed"] == 0
        assert _equal_states(_sibling_weights(tmp_path, k), final), f"sibling of step {k} differs"
        assert result["test_error_barrier"] == 0.0 and result["train_error_barrier"] == 0.0
        assert result["test_loss_barrier"] == pytest.approx(0.0, abs=1e-6)
    for split in ("train", "test"):
        assert _logged(tmp_path, f"lmc/{split}_error_barrier") == {0: 0.0, 3: 0.0, STEPS_PER_EPOCH: 0.0}
    assert _logged(tmp_path, "lmc/stable_point") == {FINAL_STEP: 0}
    assert lmc.stable_point() == 0
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


def test_logged_barriers_figures_and_summary_equal_a_plain_evaluation_of_the_path(tmp_path, monkeypatch):
    """The parent's and each sibling's final weights interpolated by hand (:func:`_plain_path`): the barriers
    logged at step k (CSV and TensorBoard), the error-along-path figure at step k, the stability figure, the
    summary table and the stable point all equal it; the stored path also equals ``linear_paths``."""
    figures = _FigureRecorder(monkeypatch)
    lmc = _lmc(tmp_path, spawn_steps=[0, 0.5], eval_batch_size=48)  # a fraction: half of the 12 steps
    csv_logger = CSVLogger(tmp_path / "logs", name="csv")
    tb_logger = TensorBoardLogger(tmp_path / "logs", name="tb")
    module, data, trainer = _fit(tmp_path, [lmc], logger=[csv_logger, tb_logger])
    assert lmc.resolved_steps == [0, 6]
    parent = module.state_dict()
    plain = {k: _plain_path(module.net, parent, _sibling_weights(tmp_path, k), data) for k in (0, 6)}

    names = [f"{split}_{kind}_barrier" for split in ("train", "test") for kind in ("error", "loss")]
    for name in names:
        logged = _logged(tmp_path, f"lmc/{name}")
        assert sorted(logged) == [0, 6], name  # at step k, not at the end of training
        for k in (0, 6):
            assert logged[k] == pytest.approx(plain[k][name], abs=1e-5), (k, name)  # float32 forwards
    assert any(plain[k]["test_error_barrier"] > 0 for k in (0, 6))  # a sibling with another seed: not 0

    # the error along the path against alpha, at step k
    path_figures = figures("lmc/error_along_path")
    assert sorted(path_figures) == [0, 6]
    for k in (0, 6):
        for split in ("train", "test"):
            alphas, errors = path_figures[k][f"{split} error"]
            assert alphas == pytest.approx(plain[k]["alphas"], abs=1e-12)
            assert errors == pytest.approx(plain[k][f"{split}_error"], abs=1e-6), (k, split)
    # the barriers against k, and the threshold
    (stability,) = figures("lmc/stability").values()
    for split in ("train", "test"):
        steps, barriers = stability[f"{split}_error_barrier"]
        assert steps == [0, 6]
        assert barriers == pytest.approx([plain[k][f"{split}_error_barrier"] for k in (0, 6)], abs=1e-6)
    assert stability["threshold 0.02"][1] == [0.02, 0.02]

    events = EventAccumulator(str(tb_logger.log_dir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [e.step for e in events.Images("lmc/error_along_path")] == [0, 6]
    assert [e.step for e in events.Scalars("lmc/test_error_barrier")] == [0, 6]
    assert [e.value for e in events.Scalars("lmc/test_error_barrier")] == pytest.approx(
        [plain[k]["test_error_barrier"] for k in (0, 6)], abs=1e-6
    )
    assert "lmc/stability" in events.Tags()["images"]
    (summary,) = events.Tensors("lmc/summary/text_summary")
    text = summary.tensor_proto.string_val[0].decode()
    rows = _summary_rows(text)
    assert sorted(rows) == [0, 6]
    for k in (0, 6):
        expected = [
            plain[k][name] for name in ("test_error_barrier", "train_error_barrier", "test_loss_barrier")
        ]
        assert rows[k] == pytest.approx(expected, abs=5e-5 + 1e-6), k  # printed with 4 decimals

    # the stable point: the first k whose (test) barrier is under 0.02, always asserted
    expected_point = next((k for k in (0, 6) if plain[k]["test_error_barrier"] < 0.02), None)
    assert lmc.stable_point() == expected_point
    if expected_point is None:
        assert "lmc/stable_point" not in events.Tags()["scalars"]
        assert "Not stable at any spawn step measured" in text
    else:
        assert _logged(tmp_path, "lmc/stable_point") == {FINAL_STEP: expected_point}
        assert f"Stable from spawn step {expected_point} " in text

    # the stored path is the measure's, on the subset the callback documents
    for k in (0, 6):
        result = lmc.results[k]
        paths = _reference_paths(lmc, data, module, _sibling_weights(tmp_path, k), 5)
        for split in ("train", "test"):
            assert result[f"{split}_error"] == paths[split].error.tolist()
            assert result[f"{split}_error_barrier"] == error_barrier(paths[split].error)
        assert paths["train"].num_examples == 48 and paths["test"].num_examples == 32


def test_reused_results_give_the_logged_barriers_stable_point_summary_and_figure_set_in_advance(
    tmp_path, monkeypatch
):
    """Results stored on disk are reused for a bit-identical parent under the same settings. Their barriers,
    set here by hand, are what the second run logs at each k, prints in the summary and draws in the
    stability figure, and its stable point is known in advance: 9, the first k whose *test* error barrier is
    strictly under the threshold (k = 8 sits at the threshold, and only its train barrier is under it; k = 10
    is stable too, later). Under other settings (``num_alphas``) nothing is reused."""
    steps = [8, 9, 10]  # late spawn steps: short siblings
    _fit(tmp_path, [_lmc(tmp_path, spawn_steps=steps)])
    names = ("test_error_barrier", "train_error_barrier", "test_loss_barrier", "train_loss_barrier")
    chosen = {8: (0.02, 0.0, 0.7, 0.8), 9: (0.015, 0.5, 0.9, 1.0), 10: (0.0, 0.25, 0.1, 0.2)}
    for k, values in chosen.items():
        (path,) = (tmp_path / "lmc").glob(f"sibling_step={k}_to=*.json")
        stored = json.loads(path.read_text())
        stored.update(zip(names, values))
        path.write_text(json.dumps(stored))

    figures = _FigureRecorder(monkeypatch)
    trained = []
    monkeypatch.setattr(LinearModeConnectivity, "_train_sibling", lambda self, *args: trained.append(args[2]))
    root = tmp_path / "again"
    lmc = _lmc(tmp_path, spawn_steps=steps)  # the same directory
    loggers = [CSVLogger(root / "logs", name="csv"), TensorBoardLogger(root / "logs", name="tb")]
    _fit(root, [lmc], logger=loggers)
    assert trained == []  # every sibling's result was reused
    for column, name in enumerate(names):
        assert _logged(root, f"lmc/{name}") == pytest.approx({k: chosen[k][column] for k in steps}), name
    assert _logged(root, "lmc/stable_point") == {FINAL_STEP: 9}
    events = EventAccumulator(str(loggers[1].log_dir), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("lmc/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert _summary_rows(text) == {k: list(chosen[k][:3]) for k in steps}
    assert "Stable from spawn step 9 (error barrier < 0.02)." in text
    (stability,) = figures("lmc/stability").values()
    assert stability["test_error_barrier"] == (steps, [0.02, 0.015, 0.0])
    assert stability["train_error_barrier"] == (steps, [0.0, 0.5, 0.25])
    assert stability["threshold 0.02"][1] == [0.02, 0.02]

    monkeypatch.undo()
    other = _lmc(tmp_path, spawn_steps=steps, num_alphas=3)
    _fit(
        tmp_path / "other_settings",
        [other],
        logger=CSVLogger(tmp_path / "other_settings" / "logs", name="csv"),
    )
    logged = _logged(tmp_path / "other_settings", "lmc/test_error_barrier")
    assert sorted(logged) == steps and logged != {k: chosen[k][0] for k in steps}  # evaluated afresh
    assert all(len(other.results[k]["alphas"]) == 3 for k in steps)


@pytest.mark.parametrize(
    "threshold, barriers, expected",
    [
        # {k: (test error barrier or None for no test set, train error barrier)}; the test barrier decides,
        # and a barrier at the threshold is not under it
        (0.02, {0: (0.3, 0.0), 5: (0.02, 0.0), 20: (0.019, 0.5), 40: (0.0, 0.0)}, 20),
        (0.02, {0: (None, 0.3), 5: (None, 0.01), 20: (None, 0.0)}, 5),  # no test set: the train barrier
        (0.02, {0: (math.nan, math.nan), 5: (0.01, 0.2)}, 5),  # a diverged sibling is never stable
        (0.02, {0: (0.5, 0.01), 5: (0.03, 0.0)}, None),
        (0.1, {0: (0.2, 0.0), 5: (0.05, 0.0), 20: (0.07, 0.0)}, 5),  # another threshold
    ],
)
def test_stable_point_and_summary_of_results_with_a_known_answer(threshold, barriers, expected):
    lmc = LinearModeConnectivity(spawn_steps=[0], threshold=threshold)
    for k in sorted(barriers, reverse=True):  # stored out of order
        test, train = barriers[k]
        lmc.results[k] = {"train_error_barrier": train, "train_loss_barrier": 1.0}
        if test is not None:
            lmc.results[k].update(test_error_barrier=test, test_loss_barrier=1.0)
    assert lmc.stable_point() == expected
    text = lmc.summary()
    assert sorted(_summary_rows(text)) == sorted(barriers)
    if expected is None:
        assert f"Not stable at any spawn step measured (no error barrier < {threshold:g})." in text
    else:
        assert f"Stable from spawn step {expected} (error barrier < {threshold:g})." in text


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
        ({"test_subset_size": "all"}, "test_subset_size"),
        ({"sibling_seed": -2}, "sibling_seed"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LinearModeConnectivity(**kwargs)


def test_auto_subsets_are_frankle_et_al_sets_for_spawns_and_small_ones_for_the_init_path():
    spawn, init = LinearModeConnectivity(), LinearModeConnectivity(mode="init")
    assert (spawn.train_subset_size, spawn.test_subset_size) == (1000, None)  # all test examples
    assert (init.train_subset_size, init.test_subset_size, init.every_n_epochs) == (512, 1024, 10)
    explicit = LinearModeConnectivity(mode="init", train_subset_size=None, test_subset_size=64)
    assert explicit.path_settings.stored()["train_subset_size"] is None
    assert explicit.path_settings.stored()["test_subset_size"] == 64


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
    # the diverged end misclassifies every example (evaluation's rule for NaN outputs); same parent at alpha 0
    assert bad["test_error"][-1] == 1.0 and bad["test_error"][0] == good["test_error"][0]
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

    def counting(self, trainer, pl_module, k, *rest):
        trained.append(k)
        if k == 9 and trained.count(9) == 1:
            raise _Killed("preempted while training a sibling")
        return original(self, trainer, pl_module, k, *rest)

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


class _EpochEndWeights(Callback):
    """Keeps a copy of the weights at the end of every training epoch, with the step."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_init_mode_barriers_equal_a_plain_evaluation_of_the_path_from_the_initial_weights(
    tmp_path, monkeypatch
):
    """Init mode, every epoch: the path from the weights before training to those at the epoch's end, by hand;
    the logged ``lmc/init_*`` barriers at the epoch's last step, and the ``lmc/init_path`` figure, equal it."""
    figures = _FigureRecorder(monkeypatch)
    module, data = make_module_and_data()
    initial = {key: value.clone() for key, value in module.state_dict().items()}
    recorder = _EpochEndWeights()
    lmc = _lmc(tmp_path, mode="init", eval_batch_size=48)  # one batch: see _plain_path
    loggers = [CSVLogger(tmp_path / "logs", name="csv"), TensorBoardLogger(tmp_path / "logs", name="tb")]
    _fit(tmp_path, [lmc, recorder], module_and_data=(module, data), logger=loggers)
    assert sorted(recorder.states) == [STEPS_PER_EPOCH, FINAL_STEP]
    plain = {step: _plain_path(module.net, initial, state, data) for step, state in recorder.states.items()}
    for split in ("train", "test"):
        for kind in ("error", "loss"):
            name = f"{split}_{kind}_barrier"
            logged = _logged(tmp_path, f"lmc/init_{name}")
            assert sorted(logged) == [STEPS_PER_EPOCH, FINAL_STEP], name
            for step in logged:
                assert logged[step] == pytest.approx(plain[step][name], abs=1e-5), (step, name)
    assert plain[FINAL_STEP]["test_error_barrier"] != plain[FINAL_STEP]["train_error_barrier"]  # told apart
    path_figures = figures("lmc/init_path")
    assert sorted(path_figures) == [STEPS_PER_EPOCH, FINAL_STEP]
    for step, lines in path_figures.items():
        for split in ("train", "test"):
            alphas, errors = lines[f"{split} error"]
            assert alphas == pytest.approx(plain[step]["alphas"], abs=1e-12)
            assert errors == pytest.approx(plain[step][f"{split}_error"], abs=1e-6), (step, split)


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
    logger = CSVLogger(tmp_path / "logs", name="csv")
    _fit(tmp_path, [lmc], module_and_data=(module, data), max_epochs=8, limit_val_batches=0, logger=logger)
    for split in ("test", "train"):
        logged = _logged(tmp_path, f"lmc/{split}_error_barrier")
        assert logged[0] > max(0.02, 2 * logged[48]) and logged[48] < 0.02, split
    loss = _logged(tmp_path, "lmc/test_loss_barrier")
    assert loss[0] > 5 * loss[48]
    assert _logged(tmp_path, "lmc/stable_point") == {64: 48}
    assert lmc.stable_point() == 48


# ------------------------------------------------------------------------------------------------------------
# A failing sibling, a reused instance, worker processes.


def test_a_sibling_that_raises_gives_nan_and_one_warning_and_the_others_go_on(tmp_path, monkeypatch):
    original = LinearModeConnectivity._train_sibling

    def failing_at_3(self, trainer, pl_module, k, *rest):
        if k == 3:
            raise ValueError("the sibling's scheduler needs val/loss")
        return original(self, trainer, pl_module, k, *rest)

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
    from lt_theory.training.child import ChildStart

    reference = _lmc(tmp_path / "reference", spawn_steps=[2])
    _fit(tmp_path / "reference", [reference])

    starts, killed = [], []

    def recording_start(self, trainer, pl_module):
        starts.append(trainer.global_step)

    def kill_once_at_step_8(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 8 and not killed:
            killed.append(True)
            raise _Killed("preempted while training a sibling")

    monkeypatch.setattr(ChildStart, "on_train_start", recording_start, raising=False)
    monkeypatch.setattr(ChildStart, "on_train_batch_end", kill_once_at_step_8, raising=False)
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
