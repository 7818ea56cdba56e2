"""IMPPruner in real (tiny) IMP runs, its results checked against references.

The runs are the contract suite's ResNet-8 on synthetic CIFAR-shaped data (6 steps an epoch), trained with
SGD (momentum 0.9, weight decay 5e-3) and a cosine schedule stepped every step, so that the learning rate
differs at every step. References:

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
* logging: the CSV values and the TensorBoard figure, text and accuracy-by-remaining scalars against the
  callback's history;
* DDP: two gloo processes, levels in epochs and a ModelCheckpoint, end every level with identical masks and
  the fit with identical weights;
* bad input: ValueError naming the argument; a resume from a checkpoint without IMPPruner state or with other
  settings, and a ticket loaded into the bare network, refused with what to do; no prunable parameter and a
  too-late rewind step in epochs refused; a diverging level stops the IMP with the tickets of the completed
  levels kept.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback, LightningModule, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lt_theory.callbacks.imp import IMPPruner, load_ticket
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


@pytest.fixture(scope="module")
def imp_run(tmp_path_factory):
    """3 levels of 20% global pruning, rewinding to step 2 of 6-step levels, output layer kept."""
    pruner = IMPPruner(levels=3, fraction=0.2, rewind_step=2, steps_per_level=6, prune_output_layer=False)
    before, after = Recorder(pruner, reads_level_ends=True), Recorder(pruner)
    module, trainer = _fit(tmp_path_factory.mktemp("imp"), pruner, [before, pruner, after])
    return pruner, before, after, module, trainer


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


def test_ticket_file_reproduces_the_sparse_network(imp_run):
    pruner, _, after, _, _ = imp_run
    assert [Path(p).name for p in pruner.ticket_paths] == [f"ticket_level0{i}.pt" for i in range(4)]
    fresh = _module(seed=1)[0]
    masks = load_ticket(pruner.ticket_paths[-1], fresh)
    for name, mask in pruner.masks.items():
        assert torch.equal(masks[name], mask.cpu())
    for name, value in fresh.state_dict().items():  # the state the last level started from
        assert torch.equal(value, after.after_rewind[-1]["state"][name]), name
    ticket = torch.load(pruner.ticket_paths[-1], weights_only=False)
    assert ticket["accuracy"] == pruner.history[-1]["accuracy"] and ticket["level"] == 3
    with pytest.raises(
        ValueError, match=r"'net\.conv1\.weight' \(prefix 'net\.'\).*'conv1\.weight'.*LightningModule"
    ):
        load_ticket(pruner.ticket_paths[-1], CIFARResNet(depth=8))  # the bare network, not the module


def test_logged_tags(tmp_path):
    pruner = IMPPruner(levels=1, fraction=0.5, rewind_step=1, steps_per_level=3)
    _fit(tmp_path, pruner, [pruner], logger=CSVLogger(tmp_path, name="csv", version=0))
    import csv

    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    value = {(int(r["step"]), k): float(v) for r in rows for k, v in r.items() if k.startswith("imp/") and v}
    assert value[(0, "imp/level")] == 0 and value[(3, "imp/level")] == 1
    assert value[(3, "imp/remaining_fraction")] == pruner.history[1]["remaining_fraction"]
    assert abs(value[(3, "imp/remaining_fraction")] - 0.5) < 1e-3
    assert value[(3, "imp/accuracy")] == pytest.approx(pruner.history[0]["accuracy"])
    # its step is not the global step: TensorBoard only (test_tensorboard_gets_the_figure_and_the_summary)
    assert not any(key == "imp/accuracy_by_remaining_bp" for _, key in value)
    layer = "imp/sparsity/net.conv1"
    mask = pruner.masks["net.conv1.weight"]
    assert value[(0, layer)] == 0.0 and value[(3, layer)] == pytest.approx(
        1.0 - int(mask.sum()) / mask.numel()
    )


def test_resume_mid_level_equals_uninterrupted(tmp_path):
    def pruner():
        return IMPPruner(levels=2, fraction=0.3, rewind_step=2, steps_per_level=8)  # levels end at 8, 14, 20

    uninterrupted = pruner()
    expected, _ = _fit(tmp_path / "full", uninterrupted, [uninterrupted])

    first = pruner()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, trainer = _fit(tmp_path / "a", first, [first, checkpoints], max_epochs=2, enable_checkpointing=True)
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


def test_tensorboard_gets_the_figure_and_the_summary(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pruner = IMPPruner(levels=2, fraction=0.5, rewind_step=1, steps_per_level=3)
    _fit(tmp_path, pruner, [pruner], logger=TensorBoardLogger(tmp_path, name="tb", version=0))
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = events.Tags()
    assert "imp/accuracy_vs_remaining" in tags["images"]
    assert [e.step for e in events.Images("imp/accuracy_vs_remaining")] == [3, 5, 7]
    assert any(tag.startswith("imp/summary") for tag in tags["tensors"])
    by_remaining = {e.step: e.value for e in events.Scalars("imp/accuracy_by_remaining_bp")}
    assert by_remaining == pytest.approx(
        {round(10_000 * h["remaining_fraction"]): h["accuracy"] for h in pruner.history}
    )


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


def test_random_prune_control_follows_the_imp_layer_counts(tmp_path, imp_run):
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
        assert pruner.history[level]["remaining_fraction"] == ticket["remaining_fraction"]


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
    pruner = IMPPruner(levels=1, steps_per_level=4, control="random_reinit", reference_tickets=".")
    module = _module()[0]
    state = torch.random.get_rng_state()
    pruner._reinitialize(module)
    assert torch.equal(torch.random.get_rng_state(), state)
    calls = []
    custom = IMPPruner(
        levels=1, steps_per_level=4, control="random_reinit", reference_tickets=".", init_fn=calls.append
    )
    custom._reinitialize(module)
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
    header = open(tmp_path / "csv" / "version_0" / "metrics.csv").readline()
    assert "imp/diverged_level" in header
