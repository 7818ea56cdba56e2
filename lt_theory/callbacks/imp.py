r"""IMPPruner: iterative magnitude pruning with rewinding to step k, inside one ``trainer.fit``.

**The lottery ticket hypothesis** (Frankle & Carbin, ICLR 2019, "The Lottery Ticket Hypothesis: Finding
Sparse, Trainable Neural Networks"): a dense network contains sparse subnetworks that, trained in isolation
from the right starting weights, reach its accuracy. Iterative magnitude pruning (IMP) finds them. With
:math:`\theta_k` the full training state after :math:`k` optimizer steps of the dense network, a level
:math:`\ell` trains the masked network :math:`m_\ell \odot \theta` from :math:`\theta_k` to the end of the
schedule :math:`T`, and the next mask keeps all but the fraction :math:`p` of the remaining weights of
smallest magnitude:

.. math::
    m_{\ell+1} = \operatorname{top}_{(1-p) R_\ell}\bigl(|m_\ell \odot \theta^{(\ell)}_T|\bigr),
    \qquad R_\ell = \textstyle\sum m_\ell \approx N (1 - p)^\ell .

Rewinding to an early step :math:`k > 0` instead of to initialisation is what makes IMP work for deep
networks (Frankle, Dziugaite, Roy & Carbin, ICML 2020, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis"): ResNet-20 on CIFAR-10 with :math:`k = 2000` keeps the dense accuracy down to about 13% of the
weights. The masks, their counting rule and their enforcement are in :mod:`lt_theory.measures.pruning`; the
levels as steps, the rewind point and the tickets in :mod:`lt_theory.training` (``levels``, ``sparse``,
``tickets``); the long form of the callback's documentation in ``docs/callbacks.md`` (IMPPruner).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.evaluation_sets import split_loader
from lt_theory.callbacks.siblings import PathSettings
from lt_theory.callbacks.ticket_stability import LevelSiblings
from lt_theory.checks import check_bool, check_choice, check_fraction, check_int, check_names
from lt_theory.figures import accuracy_vs_remaining_figure
from lt_theory.loggers import log_tensorboard_scalars
from lt_theory.measures.evaluation import evaluate
from lt_theory.measures.pruning import (
    PRUNING_SCOPES,
    MaskEnforcer,
    apply_masks,
    magnitude_masks,
    masks_from_state,
    masks_to_state,
    sparsity_report,
)
from lt_theory.training.levels import (
    LevelSchedule,
    LossWatch,
    check_state_restored,
    diverged_note,
    level_charts,
    level_end_note,
    level_record,
    level_scalars,
    levels_table,
    remaining_bp,
)
from lt_theory.training.sparse import RewindPoint
from lt_theory.training.state import OPTIMIZER_STATES
from lt_theory.training.stored import check_resume_settings
from lt_theory.training.tickets import (
    IMP_CONTROLS,
    LevelTickets,
    check_control,
    dense_masks,
    load_ticket,
    pruned_names,
    pruned_weights,
)

__all__ = ["IMP_CONTROLS", "IMPPruner", "accuracy_vs_remaining_figure", "load_ticket"]


_EVAL_SPLITS = ("val", "test")
# the arguments a resumed fit must share with the checkpointed one (``levels`` may grow)
_RESUME_SETTINGS = "levels fraction rewind_step scope control include exclude prune_output_layer optimizer_state"


class IMPPruner(TheoryCallback):
    r"""Find lottery tickets by iterative magnitude pruning with rewinding to step k, in one ``trainer.fit``.

    Level 0 trains the dense network for ``T`` optimizer steps and keeps the full training state of step
    ``rewind_step`` (weights, buffers, optimizer state and hyper-parameters, LR schedulers). At the end of
    each level the callback evaluates the network on the ``eval_split`` of the data module, saves the
    level's ticket, prunes ``fraction`` of the *remaining* prunable weights by magnitude (one global ranking
    by default; biases and normalisation layers never), sets the surviving weights and *all* buffers back to
    their step-``k`` values, empties the optimizer state, puts the optimizer's hyper-parameters and the LR
    schedulers back at step ``k``, and trains the next level for ``T - k`` steps. After ``levels`` prunings
    about ``(1 - fraction) ** levels`` of the weights remain (exact counts:
    :func:`lt_theory.measures.pruning.remaining_counts`). The gradients of pruned weights are set to zero in
    ``on_before_optimizer_step`` (after AMP's unscaling, before gradient clipping, so they do not count in the
    clipping norm) and pruned weights to ``+0.0`` after every optimizer step, so they stay exactly zero under
    momentum and weight decay. The fit stops when the last level ends: give the Trainer ``max_epochs=-1``.
    How levels map to the trainer's steps, why Lightning's validation at a level's end measures the rewound
    network, the controls, the files, resuming, divergence, DDP and the cost: ``docs/callbacks.md`` (IMPPruner).

    ``stability=True`` (Frankle et al. 2020's instability analysis of the sparse networks): after the fit, each
    completed level gets a *sibling*, trained from the step-``k`` snapshot as the level was (its start weights,
    its masks enforced, the optimizer as at the rewind) but with another data order, and the error barrier of the
    linear path between the level's final weights and the sibling's is logged
    (:mod:`lt_theory.callbacks.ticket_stability`).

    Logged tags: ``imp/level``, ``imp/remaining_fraction`` and ``imp/sparsity/<layer>`` (the fraction of
    the layer's weights pruned; ``<layer>`` the module name) at each level's start; ``imp/accuracy`` and
    ``imp/loss`` on ``eval_split`` at each level's end (at the global step of the boundary);
    ``imp/accuracy_by_remaining_bp``, to TensorBoard only: the same accuracy with the remaining weights in basis
    points (``round(10000 * remaining_fraction)``, :func:`~lt_theory.training.levels.remaining_bp`) as its
    step, which draws it against the remaining weights; ``imp/diverged_level`` when a level diverges; the image
    ``imp/accuracy_vs_remaining`` (log x axis, dense accuracy as a line) and the text ``imp/summary`` at each
    level's end; a custom-scalars panel ``imp``. With ``stability=True``, after the fit:
    ``imp/test_error_barrier``, ``imp/train_error_barrier``, ``imp/test_loss_barrier``, ``imp/train_loss_barrier``
    and the image ``imp/error_along_path`` at each level's end step; ``imp/test_error_barrier_by_remaining_bp``
    (TensorBoard only, as ``imp/accuracy_by_remaining_bp``); the figure (a second panel: the barriers) and the
    summary (barrier columns) again.

    Args:
        levels: the number of pruning levels L (>= 1); the fit trains L + 1 times (dense, then L sparse levels).
        fraction: the fraction of the remaining prunable weights pruned at each level, in (0, 1).
        rewind_step: k, the optimizer step whose state every pruned level restarts from (0 rewinds to
            initialisation, as Frankle & Carbin 2019); must be smaller than the level's length.
        steps_per_level: T in optimizer steps; give this or ``epochs_per_level``.
        epochs_per_level: T as a number of epochs (times the optimizer steps of one epoch).
        scope: ``"global"`` (one ranking over all prunable weights, as Frankle et al. 2020) or ``"layerwise"``.
        prune_output_layer: also prune the last prunable layer in the model's order (the classifier), as
            ``open_lth`` does.
        include: names of prunable parameters or modules to restrict pruning to (default: the ``weight`` of
            every Linear and Conv layer).
        exclude: names of prunable parameters or modules never pruned.
        control: None (IMP), ``"random_reinit"`` or ``"random_prune"``.
        optimizer_state: ``"reset"`` (empty, ``open_lth``'s fresh optimizer) or ``"rewind"`` (the step-k
            state, with the pruned entries zeroed) at each rewind.
        eval_split: ``"val"`` or ``"test"``: the data module's loader evaluated at each level's end.
        ticket_dir: where tickets are written; None for ``<trainer.log_dir>/imp``.
        seed: seed of the random controls (the callback's own generator; the global RNG is left alone).
        reference_tickets: the ticket directory of the IMP run a control follows (required with ``control``,
            refused without); level ``l`` reads its ``ticket_level<l>.pt``.
        init_fn: ``random_reinit`` only: a function ``init_fn(pl_module)`` that re-initialises the model in
            place from the global random generator (seeded by the callback), for a model whose init is not in
            its modules' ``reset_parameters``; None uses ``reset_parameters``.
        stability: also measure each level's stability to SGD noise (a sibling per level, after the fit).
        num_alphas, coarse_every, bn, train_subset_size, test_subset_size, eval_batch_size: the evaluation of the
            path, as in :class:`~lt_theory.callbacks.lmc.LinearModeConnectivity` (the subset drawn from ``seed``).
        sibling_seed: the siblings' data-order seed; None derives one per level from the data module's.

    Attributes:
        level: the level being trained (0 = dense).
        masks: parameter name -> bool mask of the level being trained (None at level 0).
        history: one dict per completed level: ``level``, ``remaining_fraction``, ``accuracy``, ``loss``,
            ``step``.
        ticket_paths: the ticket files written by this fit (a resumed fit lists those it wrote; the files of
            earlier levels stay where the interrupted fit wrote them).
        stopped: the reason the IMP stopped early (divergence), else None.
        stability_results: ``stability=True``: level -> its sibling's result (barriers, path, files).

    Raises:
        ValueError: for a bad argument, naming it (``fraction`` outside (0, 1), ``levels`` < 1,
            ``rewind_step`` not smaller than the level's length, a control without ``reference_tickets``,
            ...); at setup, for a sharded strategy, ``epochs_per_level`` with a train loader of unknown length,
            a ``reference_tickets`` that is not a directory, or with ``stability=True`` a strategy other than one
            device or DDP, or no data module; at fit start, for a model without a prunable
            parameter (naming the layer types it looked for); at a resume, for a checkpoint without IMPPruner
            state or with other settings, or when the step-k snapshot written next to the checkpoints is
            missing or was overwritten by another run; in a control, when the IMP's ticket of the next level
            is missing or prunes other parameters.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> pruner = IMPPruner(levels=10, fraction=0.2, rewind_step=2000, epochs_per_level=160)
        >>> trainer = Trainer(max_epochs=-1, callbacks=[pruner])
        >>> pruner.remaining_fraction()  # level 0 trains the dense network
        1.0
        >>> # trainer.fit(module, datamodule=CIFAR10DataModule(...)); then load_ticket(pruner.ticket_paths[-1], module)
        >>> # pruner.history then holds one dict per completed level, e.g. the first three (391 steps an epoch):
        >>> pruner.history = [
        ...     {"level": 0, "remaining_fraction": 1.0, "accuracy": 0.9123, "loss": 0.31, "step": 62560},
        ...     {"level": 1, "remaining_fraction": 0.8, "accuracy": 0.9141, "loss": 0.30, "step": 123120},
        ...     {"level": 2, "remaining_fraction": 0.64, "accuracy": 0.9087, "loss": 0.32, "step": 183680},
        ... ]
        >>> print(pruner.summary())
        | level | weights remaining | accuracy |
        |---|---|---|
        | 0 | 100.00% | 91.23% |
        | 1 | 80.00% | 91.41% |
        | 2 | 64.00% | 90.87% |
    """

    prefix = "imp"

    def __init__(
        self,
        levels: int,
        fraction: float = 0.2,
        rewind_step: int = 0,
        steps_per_level: int | None = None,
        epochs_per_level: int | None = None,
        scope: str = "global",
        prune_output_layer: bool = True,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        control: str | None = None,
        optimizer_state: str = "reset",
        eval_split: str = "val",
        ticket_dir: str | None = None,
        seed: int = 0,
        reference_tickets: str | os.PathLike | None = None,
        init_fn: Callable[[nn.Module], None] | None = None,
        stability: bool = False,
        num_alphas: int = 30,
        coarse_every: int | None = 5,
        bn: str = "reset",
        train_subset_size: int | None = 1000,
        test_subset_size: int | None = None,
        eval_batch_size: int = 256,
        sibling_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.schedule = LevelSchedule(levels, rewind_step, steps_per_level, epochs_per_level)
        check_choice("scope", scope, PRUNING_SCOPES)
        check_control(control, reference_tickets, init_fn)
        check_choice("optimizer_state", optimizer_state, OPTIMIZER_STATES)
        check_choice("eval_split", eval_split, _EVAL_SPLITS)
        self.prune_output_layer = check_bool("prune_output_layer", prune_output_layer)
        self.stability, self.sibling_seed = check_bool("stability", stability), sibling_seed
        paths = (num_alphas, coarse_every, bn, None, train_subset_size, test_subset_size, eval_batch_size, seed)
        check_int("sibling_seed", sibling_seed, minimum=0, allow_none=True)
        self._siblings = LevelSiblings(PathSettings(*paths), sibling_seed, self.warn_once) if stability else None
        self.include = check_names("include", include, "parameter or module names")
        self.exclude = check_names("exclude", exclude, "parameter or module names")
        self.seed = check_int("seed", seed, minimum=0)
        self.levels, self.rewind_step = self.schedule.levels, self.schedule.rewind_step
        self.fraction = check_fraction("fraction", fraction, low_open=True, high_open=True)
        self.steps_per_level, self.epochs_per_level = steps_per_level, epochs_per_level
        self.scope, self.control = scope, control
        self.optimizer_state, self.eval_split, self.ticket_dir = optimizer_state, eval_split, ticket_dir
        self.reference_tickets = None if reference_tickets is None else str(reference_tickets)
        self.init_fn = init_fn
        settings = {name: getattr(self, name) for name in ("rewind_step", "fraction", "scope", "control")}
        self._tickets = LevelTickets(ticket_dir, settings, self.reference_tickets)  # files, a control's masks
        self.level = 0
        self.masks: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.ticket_paths: list[str] = []
        self.stopped: str | None = None
        self.pruned_names: list[str] = []
        self._rewind = RewindPoint(self.rewind_step, optimizer_state)  # the state of step k, and restarts
        self._generator = torch.Generator().manual_seed(self.seed)
        self._enforce: MaskEnforcer | None = None
        self._loss = LossWatch()
        self._eval_loader = None
        self._state_loaded = False  # whether this fit restored the callback's state from a checkpoint

    # -- schedule ---------------------------------------------------------------------------------

    @property
    def level_steps(self) -> int | None:
        """T, the length of level 0 in optimizer steps (None until setup)."""
        return self.schedule.level_steps

    def level_end(self, level: int) -> int:
        """The global step at which ``level`` ends: ``T + level * (T - k)``."""
        return self.schedule.end(level)

    # -- setup ------------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._state_loaded = False
        self._tickets.check_reference()
        self.schedule.setup(trainer)  # T in steps, and the Trainer's max_steps = T until fit start
        if self._siblings is not None:
            self._siblings.setup(trainer, self, self._tickets.directory(trainer) / "stability")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.schedule.give_back_max_steps(trainer)  # the optimizers are configured
        # after configure_model, so that its layers count
        self.pruned_names = pruned_names(pl_module, self.include, self.exclude, self.prune_output_layer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_state_restored(trainer.global_step, self._state_loaded)
        if self._siblings is not None and trainer.global_step == self.rewind_step > 0:  # resumed at k, before
            self._siblings.snapshot(trainer, self.rewind_step)  # its snapshot was written (LMC's case)
        cut = self.schedule.cut_warning(trainer)
        if cut is not None:
            self.warn_once("cut", cut)
        if self.masks is not None:
            self.masks = {name: mask.to(pl_module.device) for name, mask in self.masks.items()}
            self._enforce = MaskEnforcer(pl_module, self.masks)
            self._enforce()
        if self.stopped is not None or len(self.history) == self.levels + 1:
            if self.stopped is not None:
                rank_zero_warn(f"IMPPruner: {self.stopped} Not training further.", category=UserWarning)
            trainer.should_stop = True
            return
        if trainer.global_step == 0 and self.level == 0:
            self.add_charts(trainer, level_charts(self._siblings is not None))
            self.log_scalars(trainer, level_scalars(self.level, self.masks, self.pruned_names))
        if self.level == 0 and self._rewind.state is None and self.rewind_step == 0:
            self._rewind.capture(trainer, pl_module)

    # -- per step ---------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # the siblings' snapshot of k = 0 once the first batch is fetched (the data module then holds its order)
        if self._siblings is not None and trainer.global_step == 0 == self.rewind_step:
            self._siblings.snapshot(trainer, 0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # after the backward pass and AMP's unscaling, before gradient clipping: pruned entries get zero
        # gradient, so they neither count in a clipping norm nor shrink the surviving weights' gradients
        if self._enforce is not None:
            self._enforce.mask_gradients()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.stopped is not None:
            if self.masks is not None:  # the trainer winds down: pruned weights stay zero (NaN cleared too)
                apply_masks(pl_module, self.masks)
            return
        if self._enforce is not None:
            self._enforce()
        self._loss.add(outputs)
        step = trainer.global_step
        if self.level == 0 and self._rewind.state is None and step == self.rewind_step:
            self._rewind.capture(trainer, pl_module)
        if self._siblings is not None and step == self.rewind_step > 0:
            self._siblings.snapshot(trainer, step)  # once
        if step == self.level_end(self.level) and len(self.history) == self.level:  # once per level, also
            self._end_level(trainer, pl_module)  # when gradient accumulation keeps the step for a few batches

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stopped is None and self._loss.diverged(trainer):
            self._stop_diverged(trainer, "a non-finite training loss")

    # -- level boundary ---------------------------------------------------------------------------

    def _end_level(self, trainer: Trainer, pl_module: LightningModule) -> None:
        diverged = self._loss.diverged(trainer)
        accuracy, loss = self._evaluate(trainer, pl_module)
        evaluated = not math.isnan(accuracy)  # NaN only without an evaluation set
        if diverged or (evaluated and not math.isfinite(loss)):
            if evaluated:  # the diverged network's numbers, by the rule every callback shares
                self.log_scalars(trainer, {"accuracy": accuracy, "loss": loss}, warn_nonfinite=False)
            what = "a non-finite training loss" if diverged else "a non-finite eval loss"
            self._stop_diverged(trainer, what)
            return
        record = level_record(self.level, self.remaining_fraction(), accuracy, loss, trainer.global_step)
        self.history.append(record)
        self._save_ticket(trainer, pl_module)
        if self._siblings is not None:
            self._siblings.keep_level(trainer, pl_module, self.level, self.ticket_paths[-1])
        scalars = {"accuracy": accuracy, "loss": loss}
        if self.level < self.levels:
            self._prune(trainer, pl_module)
            # weights and buffers to step k (or a fresh init), optimizer emptied, schedulers back at step k
            reinit = (self._generator, self.init_fn) if self.control == "random_reinit" else None
            self._enforce = self._rewind.restart(trainer, pl_module, self.masks, reinit)
            self.level += 1
            scalars.update(level_scalars(self.level, self.masks, self.pruned_names))
        else:
            trainer.should_stop = True  # the IMP is complete
        self.log_scalars(trainer, scalars)
        bp = remaining_bp(record["remaining_fraction"])  # a step for TensorBoard only (see remaining_bp)
        log_tensorboard_scalars(trainer, {self._tag("accuracy_by_remaining_bp"): accuracy}, step=bp)
        self._log_level_report(trainer)
        rank_zero_info(f"IMPPruner: {level_end_note(record)}")

    # -- stability ---------------------------------------------------------------------------------

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after the fit (also when a finished fit is resumed, so a preempted sibling phase goes on), as LMC's
        if self._siblings is not None and self._siblings.levels and self._rewind.state is not None:
            k, final_step = self.rewind_step, self.level_steps
            self._siblings.run(trainer, pl_module, self._rewind.state, self.optimizer_state, k, final_step)
            self._siblings.log(self, trainer, self.history)
            self._log_level_report(trainer)

    @property
    def stability_results(self) -> dict[int, dict]:
        """Level -> its sibling's result (``stability=True``; empty until the siblings are measured)."""
        return {} if self._siblings is None else self._siblings.results

    def barrier_curves(self) -> dict[str, list[tuple[float, float]]]:
        """``{"test": [(remaining_fraction, error_barrier), ...], "train": ...}`` of the levels measured."""
        return {} if self._siblings is None else self._siblings.curves(self.history)

    def remaining_fraction(self) -> float:
        """The fraction of the prunable weights kept by the masks of the level being trained."""
        return 1.0 if self.masks is None else sparsity_report(self.masks).remaining_fraction

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.control is None:
            weights = pruned_weights(pl_module, self.pruned_names)
            masks = magnitude_masks(weights, self.fraction, self.masks, self.scope)
        else:  # the controls follow the IMP run: its masks of the level about to start (or their counts)
            masks = self._tickets.control_masks(self.level + 1, self.pruned_names, self._generator)
        masks = trainer.strategy.broadcast(masks_to_state(masks), src=0)  # identical on every rank
        self.masks = masks_from_state(masks, pl_module)

    def _reference_masks(self, level: int) -> dict[str, Tensor]:
        """The masks of ``ticket_level<level>.pt`` in ``reference_tickets``, checked against this run."""
        return self._tickets.reference_masks(level, self.pruned_names)

    # -- evaluation, tickets, reports -------------------------------------------------------------

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> tuple[float, float]:
        """Accuracy and mean cross-entropy on ``eval_split``; NaN for both without an evaluation set."""
        if self._eval_loader is None:
            self._eval_loader = split_loader(trainer, self.eval_split)
        if self._eval_loader is None:
            self.warn_once(
                "no-eval-set",
                f"no `{self.eval_split}_dataloader` (no data module with one), so `imp/accuracy` is NaN; "
                "fit with a data module to measure the tickets.",
            )
            return math.nan, math.nan
        transform = getattr(trainer.datamodule, "preprocess", None)
        result = evaluate(pl_module, self._eval_loader, transform=transform if callable(transform) else None)
        return 1.0 - result.error, result.loss

    def _save_ticket(self, trainer: Trainer, pl_module: LightningModule) -> None:
        masks = self.masks or dense_masks(pruned_weights(pl_module, self.pruned_names))
        start = self._rewind.start_state(pl_module, self.level)
        self.ticket_paths.append(self._tickets.save(trainer, self.level, masks, start, self.history))

    def _stop_diverged(self, trainer: Trainer, what: str) -> None:
        self.stopped = diverged_note(self.level, what, len(self.history), self.ticket_paths)
        self.log_scalars(trainer, {"diverged_level": self.level})
        self.log_text(trainer, "summary", self.stopped)
        rank_zero_warn(f"IMPPruner: {self.stopped} Lower the learning rate or the pruning fraction.")
        trainer.should_stop = True

    def curve(self) -> list[tuple[float, float]]:
        """``[(remaining_fraction, accuracy), ...]`` of the completed levels (:func:`accuracy_vs_remaining_figure`)."""
        return [(h["remaining_fraction"], h["accuracy"]) for h in self.history]

    def summary(self) -> str:
        """A markdown table of the completed levels: remaining weights, accuracy (and barriers, stability=True)."""
        return levels_table(self.history, self.stability_results if self.stability else None)

    def _log_level_report(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        label = "IMP" if self.control is None else f"IMP, control: {self.control}"
        dense = self.history[0]["accuracy"] if self.history else None
        figure = accuracy_vs_remaining_figure({label: self.curve()}, dense, self.barrier_curves())
        self.log_figure(trainer, "accuracy_vs_remaining", figure)
        self.log_text(trainer, "summary", self.summary())

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "level": self.level,
            "masks": None if self.masks is None else masks_to_state(self.masks),
            "history": [dict(h) for h in self.history],
            "stopped": self.stopped,
            "level_steps": self.level_steps,
            "generator": self._generator.get_state(),
            **self._rewind.state_dict(),  # rewind (unless in a file next to the checkpoints), rewind_file, ...
            "settings": self._settings(),
            "stability": None if self._siblings is None else self._siblings.state_dict(),
        }

    def _settings(self) -> dict:
        """The arguments a resumed fit must share with the checkpointed one (``levels`` may grow)."""
        return {name: getattr(self, name) for name in _RESUME_SETTINGS.split()}

    def load_state_dict(self, state_dict: dict) -> None:
        check_resume_settings("IMPPruner", state_dict.get("settings"), self._settings(), may_grow=("levels",))
        self._state_loaded = True
        self.level = state_dict["level"]
        self.masks = state_dict["masks"]
        self.history = [dict(h) for h in state_dict["history"]]
        self.stopped = state_dict["stopped"]
        self.schedule.check_resumed_length(state_dict["level_steps"])
        self._generator.set_state(state_dict["generator"])
        self._rewind.load_state_dict(state_dict)
        if self._siblings is not None and state_dict.get("stability") is not None:
            self._siblings.load_state_dict(state_dict["stability"])

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self._siblings is not None:  # the RNG states of step k, also in a checkpoint before k's snapshot
            self._siblings.snapshots.on_save_checkpoint(trainer, checkpoint, (self.rewind_step,))

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self._siblings is not None:
            self._siblings.snapshots.on_load_checkpoint(checkpoint)
