"""IMPPruner(stability=True): the stability of each IMP level's sparse network to SGD noise, against references.

The run is a tiny IMP (ResNet-8 on synthetic CIFAR-shaped data, 6 steps an epoch, SGD with momentum 0.9 and
weight decay, a cosine schedule stepped every step): 2 levels of 30% global pruning, rewinding to step 2 of
6-step levels (levels end at steps 6, 10, 14). A module that records what training sees, in the IMP run and
in every child Trainer (the siblings), gives the references, never the callback's own attributes:

* the sibling of level l starts at step k from exactly the level's start: the IMP run's own weights and
  buffers of step k (recorded in the run) with the level's masks applied, and an empty optimizer (the IMP's
  ``optimizer_state="reset"``); the dense level 0's sibling goes on from step k with its momentum;
* it keeps the pruned weights at exactly 0 after every step, their gradients 0 before every optimizer step, and
  no momentum at pruned positions; it trains the T - k steps k, ..., T - 1, on other batches than the level
  did (another data order, a seed per level);
* the logged barriers (CSV, at each level's end step; TensorBoard, and against the weights remaining in basis
  points), the summary table and the figure's second panel equal a plain evaluation by hand of the path between
  the level's final weights (recorded in the run before the pruning) and the sibling's (recorded in the child);
* with a fixed data order (a data module without shuffling, levels starting on epoch boundaries), each
  sibling reproduces its level's training bit for bit: the barriers are 0 (the restart, the masks and the
  optimizer state are those of the level, and nothing else differs);
* a run killed in the stability phase and resumed trains only the siblings not finished, with the results of
  an uninterrupted run; a control run's siblings start from the control's own start state;
* bad arguments raise ValueError naming them.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback, LightningDataModule, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_lmc_callback import _plain_path
from torch.utils.data import DataLoader, TensorDataset

import lt_theory.callbacks.siblings as siblings_module
import lt_theory.callbacks.ticket_stability as stability_module
from lt_theory import loggers as lt_loggers
from lt_theory.callbacks.imp import IMPPruner
from lt_theory.cli import main
from lt_theory.models import CIFARResNet
from lt_theory.module import ClassificationModule
from lt_theory.training.tickets import read_ticket

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:.*TensorBoardLogger.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

LEVELS, FRACTION, K, T = 2, 0.3, 2, 6
LEVEL_ENDS = [T + level * (T - K) for level in range(LEVELS + 1)]  # 6, 10, 14
BARRIERS = [f"{split}_{kind}_barrier" for split in ("train", "test") for kind in ("error", "loss")]

_RECORDS: dict[int, dict] = {}  # trainer's key -> what the module saw in it, in the order the trainers started
_KEYS = itertools.count()


def _key(trainer) -> int:
    """A key of the trainer for the whole session (an ``id`` can be reused once a child trainer is freed)."""
    if not hasattr(trainer, "_recording_key"):
        trainer._recording_key = next(_KEYS)
    return trainer._recording_key


def _clone(module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


class _Recording(ClassificationModule):
    """Records in the IMP run and in every child Trainer (the module is copied into each): the state at the
    start of training, each batch, the gradients before each optimizer step (after the callbacks' hooks), the
    weights and momentum after each batch (after the callbacks' hooks), and the final state."""

    def _record(self) -> dict:
        return _RECORDS.setdefault(_key(self.trainer), {"steps": [], "batches": [], "grads": [], "after": []})

    def on_train_start(self) -> None:
        self._record()["start"] = {
            "step": self.trainer.global_step,
            "state": _clone(self),
            "optimizer_entries": len(self.trainer.optimizers[0].state),
            "order_seed": getattr(self.trainer.datamodule, "order_seed", None),
        }

    def on_train_batch_start(self, batch, batch_idx) -> None:
        images, labels = batch[0], batch[1]
        self._record()["steps"].append(self.trainer.global_step)
        self._record()["batches"].append((tuple(labels.tolist()), float(images.float().sum())))

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        self._record()["grads"].append(grads)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        optimizer = self.trainer.optimizers[0]
        momentum = {
            n: optimizer.state[p]["momentum_buffer"].clone()
            for n, p in self.named_parameters()
            if "momentum_buffer" in optimizer.state.get(p, {})
        }
        self._record()["after"].append({"state": _clone(self), "momentum": momentum})

    def on_train_end(self) -> None:
        self._record()["final"] = _clone(self)


def _module(seed: int = 0):
    data = make_module_and_data(seed)[1]
    seed_everything(seed, verbose=False)
    module = _Recording(CIFARResNet(depth=8), lr=0.05, momentum=0.9, weight_decay=5e-3, schedule="cosine")
    return module, data


class _States(Callback):
    """Placed before the pruner: the whole state at the given steps (the level ends before any pruning)."""

    def __init__(self, steps) -> None:
        self.steps, self.states = set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and trainer.global_step not in self.states:
            self.states[trainer.global_step] = _clone(pl_module)


def _pruner(root, **kwargs) -> IMPPruner:
    settings = dict(
        levels=LEVELS,
        fraction=FRACTION,
        rewind_step=K,
        steps_per_level=T,
        stability=True,
        num_alphas=5,
        coarse_every=None,
        train_subset_size=48,
        eval_batch_size=48,  # one batch: the hand-made path's BatchNorm reset is one forward of the subset
        ticket_dir=root / "imp",
    )
    settings.update(kwargs)
    return IMPPruner(**settings)


def _fit(root, callbacks, module_and_data=None, ckpt_path=None, **trainer_args):
    module, data = module_and_data or _module()
    _RECORDS.clear()
    trainer_args.setdefault("max_epochs", -1)
    trainer = make_trainer(root, callbacks, **trainer_args)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    parent = _RECORDS.get(_key(trainer))
    children = [record for key, record in _RECORDS.items() if key != _key(trainer)]
    return SimpleNamespace(module=module, data=data, trainer=trainer, parent=parent, children=children)


def _masked(state: dict, masks: dict) -> dict:
    return {n: v.masked_fill(~masks[n], 0.0) if n in masks else v for n, v in state.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _logged(path: Path, tag: str) -> dict[int, float]:
    rows = list(csv.DictReader(open(path)))
    return {int(row["step"]): float(row[tag]) for row in rows if row.get(tag)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The stability run, with the weights of step k and of each level's end, the tickets, the figures."""
    root = tmp_path_factory.mktemp("stability")
    pruner, states = _pruner(root), _States([K, *LEVEL_ENDS])
    loggers = [CSVLogger(root, name="csv", version=0), TensorBoardLogger(root, name="tb", version=0)]
    figures, log_figure = [], lt_loggers.log_figure

    def recording(trainer, tag, figure, step=None, close=True):
        lines = [
            [([*map(float, ln.get_xdata())], [*map(float, ln.get_ydata())]) for ln in a.lines]
            for a in figure.axes
        ]
        figures.append((tag, trainer.global_step if step is None else step, lines))
        log_figure(trainer, tag, figure, step, close)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lt_loggers, "log_figure", recording)
        fitted = _fit(root, [states, pruner], logger=loggers)
    tickets = [read_ticket(root / "imp" / f"ticket_level{level:02d}.pt") for level in range(LEVELS + 1)]
    plain = [
        _plain_path(fitted.module.net, states.states[end], child["final"], fitted.data)
        for end, child in zip(LEVEL_ENDS, fitted.children)
    ]
    return SimpleNamespace(
        root=root,
        pruner=pruner,
        states=states.states,
        tickets=tickets,
        plain=plain,
        figures=figures,
        **vars(fitted),
    )


def test_each_level_gets_one_sibling_from_step_k_to_T(run):
    assert len(run.children) == LEVELS + 1  # the dense level and each pruned one
    for child in run.children:
        assert child["start"]["step"] == K
        assert child["steps"] == list(range(K, T))  # T - k optimizer steps
        assert len(child["grads"]) == T - K


def test_sibling_starts_from_the_levels_start_state_with_its_masks(run):
    step_k = run.states[K]  # the IMP run's weights and buffers at step k, recorded in the run
    dense = run.children[0]["start"]
    assert _equal(dense["state"], step_k) and dense["optimizer_entries"] > 0  # goes on, momentum and all
    for level in range(1, LEVELS + 1):
        start, masks = run.children[level]["start"], run.tickets[level]["masks"]
        assert sum(int((~m).sum()) for m in masks.values()) > 0
        assert _equal(start["state"], _masked(step_k, masks)), level
        assert start["optimizer_entries"] == 0  # optimizer_state="reset", as the IMP's rewind


def test_sibling_keeps_pruned_weights_zero_and_masks_their_gradients(run):
    for level in range(1, LEVELS + 1):
        child, masks = run.children[level], run.tickets[level]["masks"]
        assert len(child["after"]) == T - K
        for grads, after in zip(child["grads"], child["after"]):
            for name, mask in masks.items():
                assert torch.all(grads[name][~mask] == 0), (level, name)
                assert torch.all(after["state"][name][~mask] == 0), (level, name)
                assert torch.all(after["momentum"][name][~mask] == 0), (level, name)
                assert torch.any(after["state"][name][mask] != 0), (level, name)
        for name, mask in masks.items():  # and the sibling did train its kept weights
            assert not torch.equal(child["final"][name][mask], child["start"]["state"][name][mask])


def test_sibling_sees_another_data_order_than_its_level(run):
    parent_steps = run.parent["steps"]
    seeds = [child["start"]["order_seed"] for child in run.children]
    assert len(set(seeds)) == LEVELS + 1 and run.data.seed not in seeds  # a seed per level, not the run's
    starts = [K] + LEVEL_ENDS[:-1]  # level 0 from step k on (shared before), level l from the previous end
    for level, child in enumerate(run.children):
        first = parent_steps.index(starts[level])
        level_batches = run.parent["batches"][first : first + T - K]
        assert len(level_batches) == T - K
        assert child["batches"] != level_batches, level


def test_logged_barriers_equal_a_plain_evaluation_of_the_path(run):
    metrics = run.root / "csv" / "version_0" / "metrics.csv"
    assert any(p["test_error_barrier"] > 0 for p in run.plain)  # another data order: not all 0
    for name in BARRIERS:
        logged = _logged(metrics, f"imp/{name}")
        assert sorted(logged) == LEVEL_ENDS, name  # at each level's end step
        for level, end in enumerate(LEVEL_ENDS):
            assert logged[end] == pytest.approx(run.plain[level][name], abs=1e-5), (level, name)
    for level, child in enumerate(run.children):  # pruned weights are 0 at both ends, so on the whole path
        if level:
            for name, mask in run.tickets[level]["masks"].items():
                assert torch.all(run.states[LEVEL_ENDS[level]][name][~mask] == 0)
                assert torch.all(child["final"][name][~mask] == 0)

    events = EventAccumulator(str(run.root / "tb" / "version_0"), size_guidance={"tensors": 0}).Reload()
    remaining = [h["remaining_fraction"] for h in run.pruner.history]
    by_bp = events.Scalars("imp/test_error_barrier_by_remaining_bp")
    assert [e.step for e in by_bp] == [round(10_000 * r) for r in remaining]
    assert [e.value for e in by_bp] == pytest.approx([p["test_error_barrier"] for p in run.plain], abs=1e-6)
    assert [e.step for e in events.Scalars("imp/test_error_barrier")] == LEVEL_ENDS
    text = events.Tensors("imp/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    for level, plain in enumerate(run.plain):
        test, train = (f"{100 * plain[f'{s}_error_barrier']:.2f}%" for s in ("test", "train"))
        assert f"| {level} | {100 * remaining[level]:.2f}% | " in text and f"| {test} | {train} |" in text


def test_figure_draws_the_barriers_against_the_remaining_weights(run):
    final = [lines for tag, step, lines in run.figures if tag == "imp/accuracy_vs_remaining"][-1]
    assert len(final) == 2  # accuracy, and the barriers beside it
    (test_x, test_y), (train_x, train_y), _zero = final[1]
    remaining = [100 * h["remaining_fraction"] for h in run.pruner.history]
    assert test_x == pytest.approx(remaining) and train_x == pytest.approx(remaining)
    assert test_y == pytest.approx([100 * p["test_error_barrier"] for p in run.plain], abs=1e-4)
    assert train_y == pytest.approx([100 * p["train_error_barrier"] for p in run.plain], abs=1e-4)
    paths = {step: lines for tag, step, lines in run.figures if tag == "imp/error_along_path"}
    assert sorted(paths) == LEVEL_ENDS
    for level, end in enumerate(LEVEL_ENDS):
        (train_alphas, train_errors), (_, test_errors) = paths[end][0]
        assert train_alphas == pytest.approx(run.plain[level]["alphas"])
        assert test_errors == pytest.approx(run.plain[level]["test_error"], abs=1e-6)


class _FixedOrder(LightningDataModule):
    """Tensors read in a fixed order (no shuffling, no augmentation): every epoch sees the same batches."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(96, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (96,), generator=generator)
        self.train, self.test = (
            TensorDataset(images[:64], labels[:64]),
            TensorDataset(images[64:], labels[64:]),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=16, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=16)


def test_a_sibling_with_the_levels_data_order_reproduces_the_level_exactly(tmp_path):
    """4 steps an epoch, k = 4 and T = 8: every level starts on an epoch boundary, as its sibling does at k, so
    with a fixed order the sibling sees the level's batches: it must end bit-identical to the level."""
    seed_everything(0, verbose=False)
    module = _Recording(CIFARResNet(depth=8), lr=0.05, momentum=0.9, weight_decay=5e-3, schedule="cosine")
    ends = [8, 12, 16]
    pruner = _pruner(
        tmp_path,
        rewind_step=4,
        steps_per_level=8,
        train_subset_size=32,
        eval_batch_size=16,
        eval_split="test",
    )
    states = _States(ends)
    fitted = _fit(
        tmp_path, [states, pruner], (module, _FixedOrder()), logger=CSVLogger(tmp_path, name="csv", version=0)
    )
    assert len(fitted.children) == 3
    for level, (end, child) in enumerate(zip(ends, fitted.children)):
        assert child["steps"] == [4, 5, 6, 7]
        assert _equal(child["final"], states.states[end]), level
    metrics = tmp_path / "csv" / "version_0" / "metrics.csv"
    for name in BARRIERS:
        logged = _logged(metrics, f"imp/{name}")
        assert sorted(logged) == ends
        assert all(logged[end] == pytest.approx(0.0, abs=1e-6) for end in ends), name
    assert all(_logged(metrics, "imp/test_error_barrier")[end] == 0.0 for end in ends)


def test_rewinding_to_initialisation_the_dense_sibling_with_the_runs_seed_reproduces_level_0(tmp_path):
    """k = 0: the snapshot is written once the first batch is fetched (the data module then holds the epoch's
    order), so a level-0 sibling with the run's own data-order seed ends bit-identical to level 0; the level-1
    sibling starts from the initial weights with the level's masks."""
    states = _States([6])
    pruner = _pruner(tmp_path, levels=1, rewind_step=0, sibling_seed=0)  # the data module's own seed
    fitted = _fit(tmp_path, [states, pruner])
    dense, sparse = fitted.children
    assert dense["start"]["step"] == sparse["start"]["step"] == 0
    assert _equal(dense["final"], states.states[6])
    assert pruner.stability_results[0]["test_error_barrier"] == 0.0
    initial = fitted.parent["start"]["state"]
    assert _equal(
        sparse["start"]["state"],
        _masked(initial, read_ticket(tmp_path / "imp" / "ticket_level01.pt")["masks"]),
    )


class _Killed(BaseException):
    """A preemption in the stability phase (not an error of a sibling, so it is not caught)."""


class _CheckpointAtTrainEnd(Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)


def test_resume_after_kills_in_the_stability_phase_redoes_only_what_is_unfinished(tmp_path, run, monkeypatch):
    """Killed while level 1's sibling trains, then (resumed) while level 2's path is evaluated, then resumed
    again: each sibling is trained once and each path evaluated once to its end, with the results of the
    uninterrupted run."""
    trained, evaluated, original_train, original_paths = [], [], stability_module.train_from_snapshot, None

    def counting_training(trainer, pl_module, run):
        level = int(Path(run.progress_dir).parent.name.removeprefix("level"))
        trained.append(level)
        if trained == [0, 1]:
            raise _Killed("preempted while the sibling of level 1 trains")
        return original_train(trainer, pl_module, run)

    def counting_paths(*args, **kwargs):
        evaluated.append(len(evaluated))
        if len(evaluated) == 3:  # level 0's path, level 1's, and now level 2's
            raise _Killed("preempted while the path of level 2 is evaluated")
        return original_paths(*args, **kwargs)

    original_paths = siblings_module.linear_paths
    monkeypatch.setattr(stability_module, "train_from_snapshot", counting_training)
    monkeypatch.setattr(siblings_module, "linear_paths", counting_paths)
    checkpoint = tmp_path / "end.ckpt"
    with pytest.raises(_Killed, match="level 1 trains"):
        _fit(tmp_path, [_pruner(tmp_path), _CheckpointAtTrainEnd(checkpoint)])
    assert (trained, len(evaluated)) == ([0, 1], 1)
    with pytest.raises(_Killed, match="path of level 2"):
        _fit(tmp_path / "again", [_pruner(tmp_path)], ckpt_path=checkpoint)
    assert (trained, len(evaluated)) == ([0, 1, 1, 2], 3)  # level 0's result reused, not evaluated again
    resumed = _pruner(tmp_path)
    fitted = _fit(tmp_path / "again", [resumed], ckpt_path=checkpoint)
    assert (trained, len(evaluated)) == ([0, 1, 1, 2], 4)  # level 2's stored sibling evaluated, not trained
    assert fitted.parent["steps"] == [] and fitted.children == []  # nor the IMP
    for level in range(LEVELS + 1):
        for name in BARRIERS:
            assert resumed.stability_results[level][name] == run.pruner.stability_results[level][name]
    assert resumed.summary() == run.pruner.summary()


def test_a_control_runs_siblings_start_from_the_controls_own_start(tmp_path, run):
    control = _pruner(tmp_path, levels=1, control="random_reinit", reference_tickets=run.root / "imp")
    fitted = _fit(tmp_path, [control])
    ticket = read_ticket(tmp_path / "imp" / "ticket_level01.pt")
    start = fitted.children[1]["start"]["state"]
    assert _equal(start, _masked(ticket["start_state"], ticket["masks"]))
    assert not _equal(start, _masked(run.states[K], ticket["masks"]))  # a fresh init, not step k's weights
    assert torch.equal(ticket["masks"]["net.conv1.weight"], run.tickets[1]["masks"]["net.conv1.weight"])
    assert all(math.isfinite(control.stability_results[1][name]) for name in BARRIERS)


def test_stability_without_a_data_module_is_refused_at_setup(tmp_path):
    module, data = _module()
    data.setup("fit")
    trainer = make_trainer(tmp_path, [_pruner(tmp_path)], max_epochs=-1)
    with pytest.raises(ValueError, match="needs a data module"):
        trainer.fit(module, train_dataloaders=data.train_dataloader())


def test_the_gpu_overlay_is_the_imp_recipe_with_stability(capsys):
    """resnet20_cifar10_imp_stability.yaml replaces the callbacks list of resnet20_cifar10_imp.yaml: the IMP's
    settings must be the recipe's, with stability on."""
    configs = Path(__file__).parents[1] / "recipes" / "configs"
    base = yaml.safe_load((configs / "resnet20_cifar10_imp.yaml").read_text())
    layered = ["--config", str(configs / "resnet20_cifar10_imp.yaml")]
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                *layered,
                "--config",
                str(configs / "resnet20_cifar10_imp_stability.yaml"),
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    names = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert names == [c["class_path"] for c in base["trainer"]["callbacks"]]
    imp = printed["trainer"]["callbacks"][-1]["init_args"]
    assert base["trainer"]["callbacks"][-1]["init_args"].items() <= imp.items()
    assert imp["stability"] is True and imp["num_alphas"] == 30
    assert (
        printed["model"] == yaml.safe_load(yaml.safe_dump(printed["model"])) and printed["model"]["lr"] == 0.1
    )


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (dict(stability="yes"), "stability"),
        (dict(num_alphas=1), "num_alphas"),
        (dict(coarse_every=0), "coarse_every"),
        (dict(bn="swap"), "bn"),
        (dict(train_subset_size=0), "train_subset_size"),
        (dict(test_subset_size=-1), "test_subset_size"),
        (dict(eval_batch_size=0), "eval_batch_size"),
        (dict(sibling_seed=-1), "sibling_seed"),
    ],
)
def test_bad_stability_arguments_raise_value_error_naming_them(arguments, named):
    with pytest.raises(ValueError, match=named):
        IMPPruner(levels=1, steps_per_level=4, **({"stability": True} | arguments))
