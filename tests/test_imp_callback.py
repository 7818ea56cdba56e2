"""IMPPruner in real (tiny) IMP runs, its results checked against references.

The runs are the contract suite's ResNet-8 on synthetic CIFAR-shaped data (6 steps an epoch), trained with
SGD (momentum 0.9, weight decay 5e-3) and a cosine schedule stepped every step, so that the learning rate
differs at every step (the main run evaluates its levels on 256 synthetic test images, the contract suite's
32 giving several levels the same accuracy). References:

* the pruning: the masks after each level equal ``magnitude_masks`` of the weights at that level's end (read
  by a recorder placed *before* the pruner), and the kept counts follow ``remaining_counts`` exactly;
* the rewind: the weights, all buffers, the learning rate and the scheduler state right after each rewind
  (read by a recorder placed *after* the pruner) equal, bit for bit, those the recorder saved at step k;
* the enforcement: pruned weights are exactly 0.0 after every step, and their gradients are masked before it
  (no momentum at pruned positions; with gradient clipping, bit for bit the run masked by ``mask_gradients``);
  also while a diverged fit winds down;
* resuming: a fit interrupted in the middle of a level (at an epoch's end, and in mid-epoch by a simulated
  preemption) and resumed from its checkpoint ends with the same masks and weights, bit for bit, as an
  uninterrupted fit;
* the ticket file: loaded into a fresh module, it gives exactly the masks and the state the last level
  started from;
* the controls follow the IMP run's tickets: random pruning keeps each layer's count of the IMP's masks of
  the level; random reinitialisation trains exactly those masks from the model's own init (CIFARResNet's
  He-normal convolutions), equal to a fresh init drawn with the callback's generator;
* what the callback computes and logs, never against its own attributes: the logged accuracy and loss of
  each level, the tickets' accuracy and ``curve()``, against a plain evaluation loop over the validation split
  (the test split with ``eval_split="test"``) of the weights and buffers read at each level's end by a
  recorder placed *before* the pruner; the logged remaining fraction, the tickets' and the basis-point steps
  of ``imp/accuracy_by_remaining_bp`` (TensorBoard only) against the counts R_(l+1) = R_l - round(p R_l)
  written out in the test; ``imp/sparsity/<layer>`` against the zeros counted in each layer right after the
  rewind; ``imp/level``, the figure's points (as logged), ``accuracy_vs_remaining_figure`` on a hand-made
  curve, the summary table and the level-end message against the same references; ``imp/diverged_level``
  and the step counts of the warning for a fit cut short against closed forms;
* DDP: two gloo processes, levels in epochs and a ModelCheckpoint, end every level with identical masks and
  the fit with identical weights;
* bad input: ValueError naming the argument; a resume from a checkpoint without IMPPruner state or with other
  settings, and a ticket loaded into the bare network, refused with what to do; no prunable parameter and a
  too-late rewind step in epochs refused; a diverging level stops the IMP with the tickets of the completed
  levels kept.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F

from lt_theory import loggers as lt_loggers
from lt_theory.callbacks.imp import IMPPruner, accuracy_vs_remaining_figure, load_ticket
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.measures.pruning import (
    apply_masks,
    magnitude_masks,
    mask_gradients,
    prunable_parameters,
    remaining_counts,
)
from lt_theory.models import CIFARResNet
from lt_theory.module import ClassificationModule
from lt_theory.training.state import reinitialize

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:.*TensorBoardLogger.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

OUTPUT_LAYER = "net.fc.weight"


def _module(seed: int = 0, optimizer: str = "sgd") -> tuple[ClassificationModule, SyntheticCIFARDataModule]:
    module, data = make_module_and_data(seed)
    seed_everything(seed, verbose=False)
    module = ClassificationModule(
        CIFARResNet(depth=8), lr=0.05, momentum=0.9, weight_decay=5e-3, schedule="cosine", optimizer=optimizer
    )
    return module, data


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def _momentum(pl_module: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    return {
        name: optimizer.state[param]["momentum_buffer"].clone()
        for name, param in pl_module.named_parameters()
        if "momentum_buffer" in optimizer.state.get(param, {})
    }


class Recorder(Callback):
    """Reads the training state at every batch end; placed before or after the pruner in the callbacks."""

    def __init__(self, pruner: IMPPruner, reads_level_ends: bool = False) -> None:
        self.pruner, self.reads_level_ends = pruner, reads_level_ends
        self.step_k = None
        self.after_rewind: list[dict] = []
        self.level_end_weights: list[dict] = []
        self.previous_masks: list = []
        self.pruned_nonzero: list[int] = []
        self.pruned_momentum_nonzero = 0
        self._level = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, optimizer = trainer.global_step, trainer.optimizers[0]
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        if step == self.pruner.rewind_step and self.step_k is None:
            self.step_k = {
                "momentum": _momentum(pl_module, optimizer),
                "state": _clone_state(pl_module),
                "lr": optimizer.param_groups[0]["lr"],
                "scheduler": dict(scheduler.state_dict()),
            }
        if self.pruner.level != self._level:  # after the pruner: the rewind just happened
            self._level = self.pruner.level
            self.after_rewind.append(
                {
                    "state": _clone_state(pl_module),
                    "lr": optimizer.param_groups[0]["lr"],
                    "scheduler": dict(scheduler.state_dict()),
                    "optimizer_state_size": len(optimizer.state),
                    "momentum": _momentum(pl_module, optimizer),
                    "masks": {n: m.clone() for n, m in self.pruner.masks.items()},
                }
            )
        if self.pruner.masks is not None:
            params = dict(pl_module.named_parameters())
            nonzero = sum(int((params[n][~m] != 0).sum()) for n, m in self.pruner.masks.items())
            self.pruned_nonzero.append(nonzero)
            for name, mask in self.pruner.masks.items():
                momentum = optimizer.state.get(params[name], {}).get("momentum_buffer")
                if momentum is not None:
                    self.pruned_momentum_nonzero += int((momentum[~mask] != 0).sum())
        if self.reads_level_ends and step == self.pruner.level_end(self.pruner.level):
            # placed before the pruner: the level's final weights, and the masks they were trained with
            params = dict(pl_module.named_parameters())
            self.level_end_weights.append({n: params[n].detach().clone() for n in self.pruner.pruned_names})
            self.previous_masks.append(None if self.pruner.masks is None else dict(self.pruner.masks))


def _fit(root, pruner, callbacks=(), module_data=None, **trainer_args):
    module, data = module_data or _module()
    trainer_args.setdefault("max_epochs", -1)
    trainer = make_trainer(root, [*callbacks], **trainer_args)
    trainer.fit(module, datamodule=data)
    return module, trainer


class LevelEndStates(Callback):
    """Placed before the pruner: the whole state (weights and buffers) at the given steps, before any pruning."""

    def __init__(self, steps) -> None:
        self.steps, self.states = set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and trainer.global_step not in self.states:
            self.states[trainer.global_step] = _clone_state(pl_module)


def _plain_evaluation(state: dict, loader, preprocess) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a ResNet-8 module holding ``state``, in a plain loop over ``loader``."""
    module = ClassificationModule(CIFARResNet(depth=8))
    module.load_state_dict(state)
    module.eval()
    correct, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for batch in loader:
            images, labels = batch[0], batch[1]
            logits = module(preprocess(images))
            correct += int((logits.argmax(dim=1) == labels).sum())
            loss += float(F.cross_entropy(logits.double(), labels, reduction="sum"))
            count += len(labels)
    return correct / count, loss / count


def _prunable_layers(module: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Name -> weight count of every Conv2d and Linear module not in ``exclude``."""
    return {
        name: m.weight.numel()
        for name, m in module.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in exclude
    }


def _round_by_round_counts(total: int, levels: int, fraction: float) -> list[int]:
    """R_0 = N, R_(l+1) = R_l - round(p R_l): the kept counts, level by level."""
    counts = [total]
    for _ in range(levels):
        counts.append(counts[-1] - round(fraction * counts[-1]))
    return counts


def _csv_values(path: Path) -> dict[tuple[int, str], float]:
    rows = list(csv.DictReader(open(path)))
    return {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("imp/") and v}


def _by_step(values: dict[tuple[int, str], float], tag: str) -> dict[int, float]:
    return {step: v for (step, key), v in values.items() if key == tag}


def _figure_data(figure) -> dict:
    (axis,) = figure.axes
    return {
        "lines": {line.get_label(): ([*line.get_xdata()], [*line.get_ydata()]) for line in axis.lines},
        "xscale": axis.get_xscale(),
        "x_inverted": axis.xaxis_inverted(),
    }


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


# the run of the `imp_observed` fixture: levels end at T + l (T - k)
LEVELS, FRACTION, K, T = 3, 0.2, 2, 6
LEVEL_ENDS = [T + level * (T - K) for level in range(LEVELS + 1)]  # 6, 10, 14, 18


@pytest.fixture(scope="module")
def imp_observed(tmp_path_factory):
    """3 levels of 20% global pruning, rewinding to step 2 of 6-step levels, output layer kept; every output
    kept: the recorders, the TensorBoard and CSV logs, each figure's data and the info messages."""
    from lightning.pytorch.loggers import TensorBoardLogger

    root = tmp_path_factory.mktemp("imp")
    pruner = IMPPruner(
        levels=LEVELS, fraction=FRACTION, rewind_step=K, steps_per_level=T, prune_output_layer=False
    )
    states, before, after = (
        LevelEndStates(LEVEL_ENDS),
        Recorder(pruner, reads_level_ends=True),
        Recorder(pruner),
    )
    module = _module()[0]
    # 256 evaluation examples (the contract suite's 32 give several levels the same accuracy)
    data = SyntheticCIFARDataModule(num_train=96, num_test=256, batch_size=16, seed=0, label_noise=0.25)
    loggers = [TensorBoardLogger(root, name="tb", version=0), CSVLogger(root, name="csv", version=0)]
    figures, log_figure = [], lt_loggers.log_figure

    def recording_log_figure(trainer, tag, figure, step=None, close=True):
        figures.append((trainer.global_step if step is None else step, tag, _figure_data(figure)))
        log_figure(trainer, tag, figure, step, close)

    messages, info_logger = _Messages(), logging.getLogger("lightning.pytorch")
    info_logger.addHandler(messages)
    level = info_logger.level
    info_logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(lt_loggers, "log_figure", recording_log_figure)
            _, trainer = _fit(
                root, pruner, [states, before, pruner, after], module_data=(module, data), logger=loggers
            )
    finally:
        info_logger.removeHandler(messages)
        info_logger.setLevel(level)
    return SimpleNamespace(
        pruner=pruner,
        before=before,
        after=after,
        states=states.states,
        module=module,
        data=data,
        trainer=trainer,
        root=root,
        figures=figures,
        messages=[m for m in messages.messages if m.startswith("IMPPruner: level")],
    )


@pytest.fixture(scope="module")
def imp_run(imp_observed):
    o = imp_observed
    return o.pruner, o.before, o.after, o.module, o.trainer


@pytest.fixture(scope="module")
def references(imp_observed):
    """Independent of the callback: the kept counts in closed form, and a plain evaluation of each level's
    final weights and buffers (read before the pruner) on the validation split."""
    o = imp_observed
    layers = _prunable_layers(_module()[0], exclude=("net.fc",))
    total = sum(layers.values())
    counts = _round_by_round_counts(total, LEVELS, FRACTION)
    evaluations = [
        _plain_evaluation(o.states[step], o.data.val_dataloader(), o.data.preprocess) for step in LEVEL_ENDS
    ]
    return SimpleNamespace(
        layers=layers,
        total=total,
        counts=counts,
        remaining=[c / total for c in counts],
        accuracy=[a for a, _ in evaluations],
        loss=[loss for _, loss in evaluations],
    )


def test_levels_and_schedule(imp_run):
    pruner, _, _, _, trainer = imp_run
    assert trainer.global_step == 6 + 3 * (6 - 2) == pruner.level_end(3)
    assert [h["level"] for h in pruner.history] == [0, 1, 2, 3]
    assert [h["step"] for h in pruner.history] == [6, 10, 14, 18]
    # the cosine schedule spans one level, not the whole IMP
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 6


def test_remaining_fraction_follows_round_by_round_counts(imp_run):
    pruner, *_ = imp_run
    module = _module()[0]
    total = sum(p.numel() for n, p in prunable_parameters(module).items() if n != OUTPUT_LAYER)
    counts = remaining_counts(total, 3, 0.2)
    assert [h["remaining_fraction"] for h in pruner.history] == [c / total for c in counts]
    assert sum(int(m.sum()) for m in pruner.masks.values()) == counts[-1]
    assert abs(counts[-1] - total * 0.8**3) <= 3 * 0.5  # (1 - p)^L up to half a weight per level


def test_masks_are_magnitude_masks_of_level_end_weights(imp_run):
    pruner, before, after, _, _ = imp_run
    for level, (weights, previous) in enumerate(zip(before.level_end_weights[:3], before.previous_masks)):
        expected = magnitude_masks(weights, 0.2, previous, "global")
        for name, mask in after.after_rewind[level]["masks"].items():
            assert torch.equal(mask, expected[name]), (level, name)


def test_excluded_parameters_are_never_pruned(imp_run):
    pruner, _, after, module, _ = imp_run
    prunable = [n for n in prunable_parameters(module) if n != OUTPUT_LAYER]
    assert list(pruner.masks) == prunable  # no bias, no BatchNorm, not the output layer
    for name, param in module.named_parameters():
        if name not in pruner.masks and not name.endswith("bn1.bias") and not name.endswith("bn2.bias"):
            assert int((param == 0).sum()) == 0, name
    snapshot = after.step_k["state"]
    for name, value in after.after_rewind[-1]["state"].items():
        if name not in pruner.masks:  # excluded weights, biases and every buffer: back to step k, unmasked
            assert torch.equal(value, snapshot[name]), name


def test_rewind_restores_step_k_exactly(imp_run):
    pruner, _, after, _, _ = imp_run
    step_k = after.step_k
    assert len(after.after_rewind) == 3
    for rewound in after.after_rewind:
        for name, value in rewound["state"].items():
            reference = step_k["state"][name]
            if name in rewound["masks"]:
                mask = rewound["masks"][name]
                assert torch.equal(value[mask], reference[mask]), name
                assert torch.equal(value[~mask], torch.zeros_like(value[~mask])), name
            else:
                assert torch.equal(value, reference), name
        assert any("running_mean" in n for n in rewound["state"])  # buffers are compared too
        assert rewound["optimizer_state_size"] == 0
        assert rewound["lr"] == step_k["lr"]
        assert rewound["scheduler"] == step_k["scheduler"]


def test_optimizer_state_rewind_restores_step_k_momentum_masked(tmp_path):
    pruner = IMPPruner(levels=1, fraction=0.5, rewind_step=2, steps_per_level=4, optimizer_state="rewind")
    after = Recorder(pruner)
    _fit(tmp_path, pruner, [pruner, after])
    momentum, reference = after.after_rewind[0]["momentum"], after.step_k["momentum"]
    assert momentum.keys() == reference.keys() and len(momentum) > 0
    for name, value in momentum.items():
        mask = pruner.masks.get(name)
        expected = reference[name] if mask is None else torch.where(mask, reference[name], 0.0)
        assert torch.equal(value, expected), name
    assert after.after_rewind[0]["lr"] == after.step_k["lr"]


def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay(imp_run):
    _, _, after, _, _ = imp_run
    assert len(after.pruned_nonzero) == 1 + 12  # right after the first pruning, then every step of levels 1-3
    assert after.pruned_nonzero == [0] * 13
    # the gradients of pruned entries are masked before each step: no momentum builds up there (with weight
    # decay on a zero weight, their SGD update is exactly zero)
    assert after.pruned_momentum_nonzero == 0


def test_ticket_file_reproduces_the_sparse_network(imp_run, references):
    pruner, _, after, _, _ = imp_run
    assert [Path(p).name for p in pruner.ticket_paths] == [f"ticket_level0{i}.pt" for i in range(4)]
    fresh = _module(seed=1)[0]
    masks = load_ticket(pruner.ticket_paths[-1], fresh)
    for name, mask in pruner.masks.items():
        assert torch.equal(masks[name], mask.cpu())
    for name, value in fresh.state_dict().items():  # the state the last level started from
        assert torch.equal(value, after.after_rewind[-1]["state"][name]), name
    ticket = torch.load(pruner.ticket_paths[-1], weights_only=False)
    assert ticket["accuracy"] == pytest.approx(references.accuracy[-1], abs=1e-9) and ticket["level"] == 3
    with pytest.raises(
        ValueError, match=r"'net\.conv1\.weight' \(prefix 'net\.'\).*'conv1\.weight'.*LightningModule"
    ):
        load_ticket(pruner.ticket_paths[-1], CIFARResNet(depth=8))  # the bare network, not the module


# ------------------------------------------------------------------------------------------------------------
# What the callback computes and logs, against independent references (the `references` fixture).


def test_logged_accuracy_and_loss_are_a_plain_evaluation_of_each_level_end(imp_observed, references):
    values = _csv_values(imp_observed.root / "csv" / "version_0" / "metrics.csv")
    accuracy, loss = _by_step(values, "imp/accuracy"), _by_step(values, "imp/loss")
    assert list(accuracy) == list(loss) == LEVEL_ENDS
    for level, step in enumerate(LEVEL_ENDS):
        assert accuracy[step] == pytest.approx(references.accuracy[level], abs=1e-9), level
        assert loss[step] == pytest.approx(references.loss[level], rel=1e-5), level
    # the references tell the trained network from the pruned and rewound one, and accuracy from error
    rewound = [
        _plain_evaluation(r["state"], imp_observed.data.val_dataloader(), imp_observed.data.preprocess)
        for r in imp_observed.after.after_rewind
    ]
    assert all(abs(r_loss - references.loss[level]) > 1e-3 for level, (_, r_loss) in enumerate(rewound))
    assert len(set(references.accuracy)) == len(LEVEL_ENDS) and 0.5 not in references.accuracy


def test_logged_remaining_fraction_follows_the_exact_counts(imp_observed, references):
    values = _csv_values(imp_observed.root / "csv" / "version_0" / "metrics.csv")
    level_starts = [0, *LEVEL_ENDS[:-1]]  # no level starts at the last level's end
    assert _by_step(values, "imp/remaining_fraction") == {
        step: references.remaining[level] for level, step in enumerate(level_starts)
    }
    # the weights right after each rewind hold exactly that many non-zero prunable entries
    for level, rewound in enumerate(imp_observed.after.after_rewind, start=1):
        nonzero = sum(int((rewound["state"][f"{n}.weight"] != 0).sum()) for n in references.layers)
        assert nonzero == references.counts[level]
    assert imp_observed.pruner.remaining_fraction() == references.counts[-1] / references.total


def test_logged_sparsity_is_the_pruned_fraction_of_each_layer(imp_observed, references):
    values = _csv_values(imp_observed.root / "csv" / "version_0" / "metrics.csv")
    tags = {key for _, key in values if key.startswith("imp/sparsity/")}
    assert tags == {f"imp/sparsity/{name}" for name in references.layers}  # module names, not net.fc
    for name, size in references.layers.items():
        expected = {0: 0.0}
        for rewound, step in zip(imp_observed.after.after_rewind, LEVEL_ENDS):
            expected[step] = int((rewound["state"][f"{name}.weight"] == 0).sum()) / size
        assert _by_step(values, f"imp/sparsity/{name}") == pytest.approx(expected, abs=1e-12), name
    for level, step in enumerate(LEVEL_ENDS[:-1], start=1):  # the pruned weights of all layers add up
        pruned = sum(values[(step, f"imp/sparsity/{n}")] * size for n, size in references.layers.items())
        assert pruned == pytest.approx(references.total - references.counts[level], abs=1e-6)


def test_logged_level_counts_the_levels_started(imp_observed):
    values = _csv_values(imp_observed.root / "csv" / "version_0" / "metrics.csv")
    assert _by_step(values, "imp/level") == {0: 0, 6: 1, 10: 2, 14: 3}


def test_accuracy_by_remaining_basis_points_goes_to_tensorboard_only(imp_observed, references):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(imp_observed.root / "tb" / "version_0"))
    events.Reload()
    by_remaining = [(e.step, e.value) for e in events.Scalars("imp/accuracy_by_remaining_bp")]
    # basis points of R_l / N: N = 74160, R_l = 74160, 59328, 47462, 37970
    assert (
        [step for step, _ in by_remaining]
        == [10_000, 8000, 6400, 5120]
        == [round(10_000 * r) for r in references.remaining]
    )
    assert [v for _, v in by_remaining] == pytest.approx(references.accuracy, abs=1e-6)  # float32 events
    values = _csv_values(imp_observed.root / "csv" / "version_0" / "metrics.csv")
    # its step is not a global step: TensorBoard only
    assert not any(key == "imp/accuracy_by_remaining_bp" for _, key in values)
    tags = events.Tags()
    assert [e.step for e in events.Images("imp/accuracy_vs_remaining")] == LEVEL_ENDS
    assert any(tag.startswith("imp/summary") for tag in tags["tensors"])


def test_figure_draws_each_level_accuracy_against_the_remaining_weights(imp_observed, references):
    figures = imp_observed.figures
    assert [(step, tag) for step, tag, _ in figures] == [(s, "imp/accuracy_vs_remaining") for s in LEVEL_ENDS]
    for level, (_, _, data) in enumerate(figures):
        x, y = data["lines"]["IMP"]
        assert x == pytest.approx([100 * r for r in references.remaining[: level + 1]], rel=1e-12)
        assert y == pytest.approx([100 * a for a in references.accuracy[: level + 1]], abs=1e-7)
        _, dense = data["lines"]["dense"]
        assert dense == pytest.approx([100 * references.accuracy[0]] * 2, abs=1e-7)
        assert data["xscale"] == "log" and data["x_inverted"]


def test_accuracy_vs_remaining_figure_plots_percentages():
    curves = {"IMP": [(1.0, 0.9), (0.8, 0.91), (0.0, 0.1)], "control": [(1.0, 0.9), (0.5, 0.7)]}
    data = _figure_data(accuracy_vs_remaining_figure(curves, dense_accuracy=0.85))
    assert data["lines"]["IMP"] == ([100.0, 80.0], [90.0, pytest.approx(91.0)])  # no point at 0% (log axis)
    assert data["lines"]["control"] == ([100.0, 50.0], [90.0, 70.0])
    assert data["lines"]["dense"][1] == [85.0, 85.0]
    assert data["xscale"] == "log" and data["x_inverted"]
    assert "dense" not in _figure_data(accuracy_vs_remaining_figure(curves, None))["lines"]
    assert "dense" not in _figure_data(accuracy_vs_remaining_figure(curves, math.nan))["lines"]


def test_summary_table_lists_each_level_remaining_weights_and_accuracy(imp_observed, references):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(imp_observed.root / "tb" / "version_0"))
    events.Reload()
    texts = events.Tensors("imp/summary/text_summary")
    assert [e.step for e in texts] == LEVEL_ENDS
    table = texts[-1].tensor_proto.string_val[0].decode()
    rows = [line.strip("|").split("|") for line in table.splitlines()[2:]]
    assert [int(level) for level, _, _ in rows] == [0, 1, 2, 3]
    for (_, remaining, accuracy), r, a in zip(rows, references.remaining, references.accuracy):
        assert float(remaining.strip().removesuffix("%")) == pytest.approx(100 * r, abs=0.005 + 1e-9)
        assert float(accuracy.strip().removesuffix("%")) == pytest.approx(100 * a, abs=0.005 + 1e-9)


def test_level_end_messages_give_remaining_weights_and_accuracy(imp_observed, references):
    assert imp_observed.messages == [
        f"IMPPruner: level {level} ended at step {step}: {100 * references.remaining[level]:.2f}% of the "
        f"weights, accuracy {100 * references.accuracy[level]:.2f}%"
        for level, step in enumerate(LEVEL_ENDS)
    ]


def test_curve_pairs_remaining_fraction_with_accuracy(imp_observed, references):
    curve = imp_observed.pruner.curve()
    assert [r for r, _ in curve] == references.remaining
    assert [a for _, a in curve] == pytest.approx(references.accuracy, abs=1e-9)


def test_tickets_store_their_level_remaining_fraction_and_accuracy(imp_observed, references):
    for level, path in enumerate(imp_observed.pruner.ticket_paths):
        ticket = torch.load(path, weights_only=False)
        assert ticket["level"] == level
        assert ticket["remaining_fraction"] == references.remaining[level]
        assert ticket["accuracy"] == pytest.approx(references.accuracy[level], abs=1e-9)
        assert [h["step"] for h in ticket["history"]] == LEVEL_ENDS[: level + 1]
        assert [h["accuracy"] for h in ticket["history"]] == pytest.approx(
            references.accuracy[: level + 1], abs=1e-9
        )
        assert [h["loss"] for h in ticket["history"]] == pytest.approx(references.loss[: level + 1], rel=1e-5)


def test_evaluates_the_test_split_when_asked(tmp_path):
    data = SyntheticCIFARDataModule(
        num_train=96, num_test=32, batch_size=16, seed=0, label_noise=0.25, val_size=16
    )  # a validation split of its own: 80 training examples, 5 steps an epoch
    module = _module()[0]
    pruner = IMPPruner(levels=1, fraction=0.5, rewind_step=1, steps_per_level=3, eval_split="test")
    states = LevelEndStates([3, 5])
    _fit(
        tmp_path,
        pruner,
        [states, pruner],
        module_data=(module, data),
        logger=CSVLogger(tmp_path, name="csv", version=0),
    )
    values = _csv_values(tmp_path / "csv" / "version_0" / "metrics.csv")
    for step in (3, 5):
        accuracy, loss = _plain_evaluation(states.states[step], data.test_dataloader(), data.preprocess)
        _, val_loss = _plain_evaluation(states.states[step], data.val_dataloader(), data.preprocess)
        assert values[(step, "imp/accuracy")] == pytest.approx(accuracy, abs=1e-9)
        assert values[(step, "imp/loss")] == pytest.approx(loss, rel=1e-5)
        assert abs(val_loss - loss) > 1e-3  # the splits differ


def test_resume_mid_level_equals_uninterrupted(tmp_path):
    def pruner():
        return IMPPruner(levels=2, fraction=0.3, rewind_step=2, steps_per_level=8)  # levels end at 8, 14, 20

    uninterrupted = pruner()
    expected, _ = _fit(tmp_path / "full", uninterrupted, [uninterrupted])

    first = pruner()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(
        UserWarning, match="after about 12 optimizer steps, before the 20 steps"
    ):  # 2 x 6 < 8 + 2 x 6
        _, trainer = _fit(
            tmp_path / "a", first, [first, checkpoints], max_epochs=2, enable_checkpointing=True
        )
    assert trainer.global_step == 12 and first.level == 1  # stopped in the middle of level 1
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("IMPPruner"))
    assert state["rewind"] is None and Path(state["rewind_file"]["path"]).is_file()  # snapshot beside it

    resumed = pruner()
    module, data = _module()
    make_trainer(tmp_path / "b", [resumed], max_epochs=-1).fit(
        module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed.level == uninterrupted.level == 2
    for name, mask in uninterrupted.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for name, value in expected.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name
    assert resumed.history == uninterrupted.history

    for changed in (dict(fraction=0.5), dict(rewind_step=1), dict(scope="layerwise"), dict(levels=1)):
        arguments = dict(levels=2, fraction=0.3, rewind_step=2, steps_per_level=8) | changed
        name, value = next(iter(changed.items()))
        with pytest.raises(
            ValueError,
            match=f"other settings.*{name}={state['settings'][name]!r} in the checkpoint, {value!r} here",
        ):
            IMPPruner(**arguments).load_state_dict(state)
    for changed in (
        dict(prune_output_layer=False),
        dict(exclude=["net.conv1"]),
        dict(include=["net.layer1"]),
    ):
        with pytest.raises(ValueError, match=f"other settings.*{next(iter(changed))}="):
            IMPPruner(levels=2, fraction=0.3, rewind_step=2, steps_per_level=8, **changed).load_state_dict(
                state
            )
    more = IMPPruner(levels=5, fraction=0.3, rewind_step=2, steps_per_level=8)  # more levels: allowed
    more.load_state_dict(state)
    assert more.level == 1 and more.levels == 5

    Path(state["rewind_file"]["path"]).unlink()  # the snapshot beside the checkpoint lost: a clear refusal
    with pytest.raises(ValueError, match="snapshot .* is missing"):
        module, data = _module()
        make_trainer(tmp_path / "c", [pruner()], max_epochs=-1).fit(
            module, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )


@pytest.mark.parametrize("steps", [1, 3])  # before and after step k
def test_resume_from_a_checkpoint_without_imp_state_is_refused(tmp_path, steps):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "dense", save_last=True)
    _fit(
        tmp_path / "a", None, [checkpoints], max_steps=steps, enable_checkpointing=True
    )  # dense, no IMPPruner
    pruner = IMPPruner(levels=1, fraction=0.5, rewind_step=2, steps_per_level=4)
    module, data = _module()
    trainer = make_trainer(tmp_path / "b", [pruner], max_epochs=-1)
    with pytest.raises(
        ValueError, match=f"starts at global step {steps}, from a checkpoint without IMPPruner state"
    ):
        trainer.fit(module, datamodule=data, ckpt_path=tmp_path / "dense" / "last.ckpt")
    assert pruner.history == [] and trainer.global_step == steps  # refused before any training


class _MaskGradientsReference(Callback):
    """The reference: ``mask_gradients`` of pruning.py on the pruner's masks, before clipping."""

    def __init__(self, pruner: IMPPruner) -> None:
        self.pruner = pruner

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.pruner.masks is not None:
            mask_gradients(pl_module, self.pruner.masks)


def test_pruned_gradients_do_not_change_clipping(tmp_path, monkeypatch):
    def run(root, with_reference):
        pruner = IMPPruner(levels=2, fraction=0.5, rewind_step=2, steps_per_level=6)
        reference = [_MaskGradientsReference(pruner)] if with_reference else []
        module, _ = _fit(root, pruner, [*reference, pruner], gradient_clip_val=0.05)
        return pruner, module.state_dict()

    pruner, state = run(tmp_path / "a", False)
    reference_pruner, reference = run(tmp_path / "b", True)
    for name, value in reference.items():  # bit for bit the run whose gradients are masked before clipping
        assert torch.equal(state[name], value), name
    assert all(torch.equal(pruner.masks[n], reference_pruner.masks[n]) for n in pruner.masks)
    # and without the masking the clipping norm counts the pruned gradients: other surviving weights
    from lt_theory.measures.pruning import MaskEnforcer

    monkeypatch.setattr(MaskEnforcer, "mask_gradients", lambda self: None)
    _, unmasked = run(tmp_path / "c", False)
    kept = pruner.masks["net.layer1.0.conv1.weight"]
    assert not torch.equal(
        unmasked["net.layer1.0.conv1.weight"][kept], state["net.layer1.0.conv1.weight"][kept]
    )


class _Preempted(Exception):
    pass


class _PreemptAt(Callback):
    """Raises at the start of the batch after ``step``, as a preemption after the step's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise _Preempted


def test_resume_mid_epoch_and_mid_level_equals_uninterrupted(tmp_path):
    def pruner():
        return IMPPruner(levels=2, fraction=0.3, rewind_step=2, steps_per_level=8)  # levels end at 8, 14, 20

    uninterrupted = pruner()
    expected, _ = _fit(tmp_path / "full", uninterrupted, [uninterrupted])

    first = pruner()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    with pytest.raises(_Preempted):
        _fit(tmp_path / "a", first, [first, checkpoints, _PreemptAt(10)], enable_checkpointing=True)
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=10.ckpt")  # step 10: epoch 2, batch 4; level 1

    resumed = pruner()
    module, data = _module()
    make_trainer(tmp_path / "b", [resumed], max_epochs=-1).fit(module, datamodule=data, ckpt_path=checkpoint)
    for name, mask in uninterrupted.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for name, value in expected.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


def _control_run(tmp_path, imp_run, control: str):
    """2 levels of a control following the 3-level IMP of ``imp_run`` (same settings), through its tickets."""
    reference = Path(imp_run[0].ticket_paths[0]).parent
    pruner = IMPPruner(
        levels=2,
        fraction=0.2,
        rewind_step=2,
        steps_per_level=6,
        prune_output_layer=False,
        control=control,
        reference_tickets=reference,
    )
    before, after = Recorder(pruner, reads_level_ends=True), Recorder(pruner)
    module, _ = _fit(tmp_path, pruner, [before, pruner, after])
    tickets = [torch.load(reference / f"ticket_level0{level}.pt", weights_only=False) for level in (1, 2)]
    return pruner, before, after, module, tickets


def test_random_prune_control_follows_the_imp_layer_counts(tmp_path, imp_run, references):
    pruner, before, after, _, tickets = _control_run(tmp_path, imp_run, "random_prune")
    assert [h["level"] for h in pruner.history] == [0, 1, 2]
    for level, ticket in zip((1, 2), tickets):
        masks = after.after_rewind[level - 1]["masks"]
        assert list(masks) == list(ticket["masks"])
        for name, mask in masks.items():  # the IMP level's count in every layer, at random positions
            assert int(mask.sum()) == int(ticket["masks"][name].sum()), (level, name)
        assert sum(int((masks[n].cpu() != ticket["masks"][n]).sum()) for n in masks) > 0
        if level == 2:  # not the counts of the control's own magnitude pruning of its level-1 network
            own = magnitude_masks(before.level_end_weights[1], 0.2, before.previous_masks[1])
            assert any(int(own[n].sum()) != int(ticket["masks"][n].sum()) for n in own)
        assert pruner.history[level]["remaining_fraction"] == references.remaining[level]


def test_random_reinit_control_uses_the_imp_masks_and_the_model_init(tmp_path, imp_run):
    pruner, _, after, _, tickets = _control_run(tmp_path, imp_run, "random_reinit")
    generator = torch.Generator().manual_seed(0)  # the callback's generator (seed=0)
    for level, ticket in zip((1, 2), tickets):
        rewound = after.after_rewind[level - 1]
        for name, mask in rewound["masks"].items():  # exactly the IMP's masks of that level
            assert torch.equal(mask.cpu(), ticket["masks"][name]), (level, name)
        # the reference fresh start: seed drawn from the callback's generator, every module's
        # reset_parameters children first, so CIFARResNet's He-normal init wins; then the masks
        reference = _module(seed=5)[0]
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            for module in reversed(list(reference.modules())):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        apply_masks(reference, ticket["masks"])
        for name, value in reference.state_dict().items():
            assert torch.equal(rewound["state"][name], value), (level, name)
        assert rewound["lr"] == after.step_k["lr"]
    start = after.after_rewind[0]["state"]
    weight, mask = "net.layer1.0.conv1.weight", after.after_rewind[0]["masks"]["net.layer1.0.conv1.weight"]
    assert float(start[weight][mask].std()) == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.1)  # He normal
    assert float(start["net.bn1.running_var"].sum()) == start["net.bn1.running_var"].numel()  # reset to 1
    ticket = torch.load(pruner.ticket_paths[1], weights_only=False)  # the control's ticket: its fresh start
    for name, value in ticket["start_state"].items():
        assert torch.equal(value, start[name]), name


def test_random_reinit_leaves_the_global_random_state_alone():
    """The control's re-initialisation (lt_theory.training.state.reinitialize) draws from its own generator."""
    module = _module()[0]
    state = torch.random.get_rng_state()
    reinitialize(module, torch.Generator().manual_seed(0), None)
    assert torch.equal(torch.random.get_rng_state(), state)
    calls = []
    reinitialize(module, torch.Generator().manual_seed(0), calls.append)
    assert calls == [module] and torch.equal(torch.random.get_rng_state(), state)


def test_control_without_reference_tickets_says_how_to_get_them(tmp_path, imp_run):
    for control in ("random_reinit", "random_prune"):
        with pytest.raises(ValueError, match="needs `reference_tickets`.*ticket_dir.*<trainer.log_dir>/imp"):
            IMPPruner(levels=2, steps_per_level=4, control=control)
    with pytest.raises(ValueError, match="only used by a control run"):
        IMPPruner(levels=2, steps_per_level=4, reference_tickets=tmp_path)
    pruner = IMPPruner(
        levels=9,
        steps_per_level=6,
        control="random_prune",
        reference_tickets=Path(imp_run[0].ticket_paths[0]).parent,
    )
    pruner.pruned_names = list(imp_run[0].masks)
    with pytest.raises(ValueError, match="level-4 ticket .* does not exist"):  # the IMP ran 3 levels
        pruner._reference_masks(4)
    pruner.pruned_names = pruner.pruned_names[1:]
    with pytest.raises(ValueError, match="include / exclude / prune_output_layer"):
        pruner._reference_masks(1)


def test_two_process_ddp_ranks_end_levels_with_identical_masks(tmp_path):
    script = Path(__file__).with_name("imp_ddp_run.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["level"] == ranks[1]["level"] == 2
    assert ranks[0]["level_steps"] == ranks[1]["level_steps"] == 3  # epochs_per_level=1: 48 samples / 16
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 3 + 2 * (3 - 1)
    for name, value in ranks[0]["state"].items():  # identical weights and buffers on both ranks
        assert torch.equal(value, ranks[1]["state"][name]), name
    rewind_file = ranks[0]["rewind_file"]  # the step-k snapshot beside the checkpoints, written by rank 0
    assert (
        rewind_file == ranks[1]["rewind_file"]
        and Path(rewind_file["path"]).parent == tmp_path / "checkpoints"
    )
    snapshot = torch.load(rewind_file["path"], weights_only=False)
    assert snapshot["step"] == 1 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(ranks[0]["masks_by_level"]) == 2
    for level in range(2):
        masks0, masks1 = ranks[0]["masks_by_level"][level], ranks[1]["masks_by_level"][level]
        for name in masks0:
            assert torch.equal(masks0[name], masks1[name]), (level, name)
    total = sum(m.numel() for m in ranks[0]["masks_by_level"][0].values())
    assert (
        sum(int(m.sum()) for m in ranks[0]["masks_by_level"][1].values())
        == remaining_counts(total, 2, 0.3)[-1]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tickets"] == ["ticket_level00.pt", "ticket_level01.pt", "ticket_level02.pt"]


# ------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (dict(levels=2, fraction=0.0, steps_per_level=4), "fraction"),
        (dict(levels=2, fraction=1.0, steps_per_level=4), "fraction"),
        (dict(levels=2, fraction=-0.2, steps_per_level=4), "fraction"),
        (dict(levels=2, fraction=True, steps_per_level=4), "fraction"),
        (dict(levels=0, steps_per_level=4), "levels"),
        (dict(levels=-1, steps_per_level=4), "levels"),
        (dict(levels=2.5, steps_per_level=4), "levels"),
        (dict(levels=2, rewind_step=4, steps_per_level=4), "rewind_step"),
        (dict(levels=2, rewind_step=-1, steps_per_level=4), "rewind_step"),
        (dict(levels=2), "steps_per_level"),
        (dict(levels=2, steps_per_level=4, epochs_per_level=1), "epochs_per_level"),
        (dict(levels=2, steps_per_level=4, scope="local"), "scope"),
        (dict(levels=2, steps_per_level=4, control="shuffle"), "control"),
        (dict(levels=2, steps_per_level=4, optimizer_state="keep"), "optimizer_state"),
        (dict(levels=2, steps_per_level=4, eval_split="train"), "eval_split"),
        (dict(levels=2, steps_per_level=4, exclude="net.fc"), "exclude"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(arguments, named):
    with pytest.raises(ValueError, match=named):
        IMPPruner(**arguments)


def test_rewind_step_beyond_first_level_in_epochs_is_refused_at_setup(tmp_path):
    pruner = IMPPruner(levels=1, rewind_step=6, epochs_per_level=1)  # an epoch is 6 steps
    with pytest.raises(ValueError, match="rewind_step"):
        _fit(tmp_path, pruner, [pruner])


def test_epochs_per_level_is_turned_into_steps(tmp_path):
    pruner = IMPPruner(levels=1, fraction=0.5, rewind_step=4, epochs_per_level=1)
    _, trainer = _fit(tmp_path, pruner, [pruner])
    assert pruner.level_steps == 6 and trainer.global_step == 6 + (6 - 4)


class _BiasOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return x.flatten(1)[:, :10] * 0 + self.bias


def test_model_without_prunable_parameter_is_refused_at_setup(tmp_path):
    module = ClassificationModule(_BiasOnly(), schedule="constant")
    data = _module()[1]
    pruner = IMPPruner(levels=1, steps_per_level=3)
    with pytest.raises(ValueError, match="no prunable parameter.*nn.Linear"):
        _fit(tmp_path, pruner, [pruner], module_data=(module, data))


class _Diverge(Callback):
    """Puts a NaN into a weight after ``step``: the next losses are NaN, as in a diverging level."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.conv1.weight[0, 0, 0, 0] = math.nan


def test_masks_are_enforced_while_a_diverged_fit_winds_down(tmp_path):
    pruner = IMPPruner(levels=3, fraction=0.5, rewind_step=1, steps_per_level=4)
    module, trainer = _fit(tmp_path, pruner, [pruner, _Diverge(step=5)], min_steps=12)
    # stopped at step 6 (the epoch's end); min_steps makes the trainer go on, with NaN gradients
    assert pruner.stopped is not None and trainer.global_step == 12 and len(pruner.history) == 1
    params = dict(module.named_parameters())
    for name, mask in pruner.masks.items():  # exactly zero, neither NaN nor drifted
        assert torch.equal(params[name][~mask], torch.zeros_like(params[name][~mask])), name


def test_diverging_level_stops_the_imp_and_keeps_tickets(tmp_path):
    pruner = IMPPruner(levels=3, fraction=0.5, rewind_step=1, steps_per_level=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = _fit(
            tmp_path, pruner, [pruner, _Diverge(step=5)], logger=CSVLogger(tmp_path, name="csv", version=0)
        )
    messages = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert len(messages) == 1 and "level 1 diverged" in messages[0], messages
    assert pruner.stopped is not None and [h["level"] for h in pruner.history] == [0]
    assert trainer.global_step == 6  # stopped at the end of the first epoch of level 1, not at 4 + 3 * 3
    assert [Path(p).name for p in pruner.ticket_paths] == ["ticket_level00.pt"]
    masks = load_ticket(pruner.ticket_paths[0], _module()[0])
    assert all(bool(m.all()) for m in masks.values())  # level 0's ticket: dense
    # the NaN enters after step 5; levels end at 4 + l * (4 - 1), so step 5 belongs to level 1
    diverged = next(level for level in range(4) if 5 <= 4 + level * 3)
    values = _csv_values(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert _by_step(values, "imp/diverged_level") == {6: diverged}  # found at the epoch's end, step 6


def test_a_data_module_without_a_validation_loader_gives_nan_accuracy_and_one_warning(tmp_path):
    """eval_split='val' on a data module that defines no val_dataloader: the level ends, accuracy NaN, said once."""
    from lightning.pytorch import LightningDataModule
    from torch.utils.data import DataLoader, TensorDataset

    class TrainOnly(LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(
                torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
            )
            return DataLoader(data, batch_size=8)

    module = _module()[0]
    pruner = IMPPruner(
        levels=1, fraction=0.5, steps_per_level=4, eval_split="val", ticket_dir=tmp_path / "imp"
    )
    with pytest.warns(UserWarning, match="no `val_dataloader`"):
        Trainer(
            default_root_dir=tmp_path,
            max_epochs=-1,
            callbacks=[pruner],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(module, datamodule=TrainOnly())
    assert len(pruner.history) == 2 and all(math.isnan(h["accuracy"]) for h in pruner.history)
