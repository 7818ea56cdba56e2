"""Child runs: a copy of a module trained from a snapshot of its parent's run, in a Trainer of its own.

A snapshot is a Lightning checkpoint written by ``trainer.save_checkpoint`` at step :math:`k` (weights,
buffers, optimizers, LR schedulers, loop position, data-module state) with the global RNG states under
:data:`SNAPSHOT_RNG_KEY`. :func:`train_from_snapshot` trains a copy of the parent's module and data module from
it to a given step, in a child Trainer with the parent's accelerator, strategy (one device or DDP), devices,
precision plugin, cluster environment, gradient accumulation and clipping. Only the data order and the
augmentation differ, through ``order_seed``: a data module with ``reseed_order(seed)`` (the lt_theory ones) is
re-seeded and the global RNG continues from the snapshot's, so a child with the parent's own seed reproduces
the parent exactly; any other data module gets the global RNG seeded instead. A preempted child resumes from
its own progress checkpoint; under a :class:`~lt_theory.training.preemption.RequeueGuard`, from one written at
the step the requeue signal came.

:func:`train_detached` is the same child run outside the parent's process (a deferred sibling, one SLURM array
task each: :mod:`lt_theory.training.deferred`): the module and the data module rebuilt from the run's
configuration, the child Trainer from the parent's settings recorded as JSON (:func:`child_trainer_arguments`).
Both go through one implementation, so on one CPU device they train bit-identical children. A child Trainer
shows no progress bar of its own: pass :meth:`~lt_theory.training.progress.SiblingsProgress.callback`'s.
Used by :class:`~lt_theory.callbacks.lmc.LinearModeConnectivity` for its siblings, and by
:class:`~lt_theory.callbacks.imp.IMPPruner` (``stability=True``) for the siblings of its sparse levels.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.utils.data import DataLoader

from lt_theory.compat import cluster_environment, ddp_options, uses_distributed_sampler
from lt_theory.training.preemption import RequeueGuard
from lt_theory.training.progress import info, is_rank_zero
from lt_theory.training.rng import rng_states, set_rng_states
from lt_theory.training.state import save_atomically
from lt_theory.training.stored import read_json, write_json

__all__ = [
    "ChildRun",
    "ChildStoppedShort",
    "SNAPSHOT_RNG_KEY",
    "TRAINING_CALLBACKS",
    "check_child_strategy",
    "child_trainer_arguments",
    "detached_copy",
    "train_detached",
    "train_from_snapshot",
    "warn_about_training_callbacks",
    "warn_if_loader_has_generator",
]

SNAPSHOT_RNG_KEY = "lt_theory_lmc_rng_states"
"""Where a snapshot (and a child's progress checkpoint) keeps the global RNG states."""

TRAINING_CALLBACKS = frozenset(
    {
        "IMPPruner",
        "StochasticWeightAveraging",
        "WeightAveraging",
        "EMAWeightAveraging",
        "GradientAccumulationScheduler",
        "BackboneFinetuning",
        "BaseFinetuning",
    }
)
"""Callbacks that change training: a child trained without them is not the parent's procedure."""

# a snapshot holds RNG states and optimizer objects, not only tensors (the argument is Lightning >= 2.6)
_FULL_CHECKPOINT_LOAD = (
    {"weights_only": False} if "weights_only" in inspect.signature(Trainer.fit).parameters else {}
)


def check_child_strategy(
    trainer: Trainer, who: str = "A child run", hint: str = "Use strategy='ddp' or one device."
) -> str | DDPStrategy:
    """The ``strategy=`` of a child Trainer equivalent to the parent's (DDP with the parent's options).

    Args:
        trainer: the parent's trainer.
        who: the start of the error message: what trains in a child Trainer.
        hint: the end of the error message: what to do instead.

    Raises:
        ValueError: for a strategy other than one device or DDP started by ``popen``, naming it.
    """
    strategy = trainer.strategy
    if isinstance(strategy, SingleDeviceStrategy):
        return "auto"
    if type(strategy) is DDPStrategy:
        options = ddp_options(strategy)
        if options.start_method == "popen":
            return DDPStrategy(
                process_group_backend=strategy.process_group_backend,
                timeout=options.timeout,
                **options.ddp_kwargs,  # find_unused_parameters, static_graph, ...
            )
    name = type(strategy).__name__
    method = f" (start method {ddp_options(strategy).start_method!r})" if type(strategy) is DDPStrategy else ""
    raise ValueError(
        f"{who} in a child Trainer and supports a single device or strategy='ddp', but the trainer uses "
        f"{name}{method}. {hint}"
    )


def warn_about_training_callbacks(
    trainer: Trainer, forking: Callback, children: str, warn: Callable[[str, str], None]
) -> None:
    """Children train without the parent's other callbacks: say so for those that change training."""
    changing = [
        type(c).__name__ for c in trainer.callbacks if c is not forking and type(c).__name__ in TRAINING_CALLBACKS
    ]
    if changing:
        sparse = (
            " For the stability of IMP's sparse networks (siblings trained with the masks), use "
            "IMPPruner(stability=True) instead."
            if "IMPPruner" in changing
            else ""
        )
        warn(
            "training-callbacks",
            f"the {children} train without the parent's other callbacks, and {changing} change training: "
            f"the parent's and the {children}' final weights then come from different procedures, so the "
            "barriers do not measure SGD noise alone. Run the instability analysis without them." + sparse,
        )


def detached_copy(obj, trainer: Trainer | None, shared: Sequence[object] = ()):
    """A deep copy of a module or data module without its trainer, sharing (not copying) ``shared``.

    Args:
        obj: the module or data module.
        trainer: the trainer it is attached to (not copied; the copy refers to None), or None.
        shared: objects the copy refers to without copying them (e.g. the datasets).
    """
    memo: dict[int, object] = {id(item): item for item in shared if item is not None}
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(obj, memo)


def _validation_flags(trainer: Trainer) -> dict:
    """No validation in a child, unless a scheduler steps on a validation metric (ReduceLROnPlateau)."""
    if not any(config.reduce_on_plateau for config in trainer.lr_scheduler_configs):
        return {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    return {
        "limit_val_batches": trainer.limit_val_batches,
        "val_check_interval": trainer.val_check_interval,
        "check_val_every_n_epoch": trainer.check_val_every_n_epoch,
        "num_sanity_val_steps": 0,
    }


def _accelerator_flag(trainer: Trainer) -> str:
    return {"CPUAccelerator": "cpu", "CUDAAccelerator": "gpu", "MPSAccelerator": "mps"}.get(
        type(trainer.accelerator).__name__, "auto"
    )


def _child_plugins(trainer: Trainer) -> list:
    """The parent's cluster environment (how the job was launched and is requeued; it holds no state of the
    run) and a copy of its precision plugin (a custom one included; its state, such as a GradScaler's, is
    restored from the snapshot). The checkpoint IO is Lightning's default: a child's files must be on disk when
    ``save_checkpoint`` returns, which an asynchronous IO does not promise."""
    return [cluster_environment(trainer), copy.deepcopy(trainer.precision_plugin)]


def child_trainer_arguments(trainer: Trainer) -> dict:
    """The arguments a child Trainer takes from its parent's, as JSON values (a deferred sibling's task list keeps
    them): accelerator, devices, nodes, precision, the training and validation limits, gradient accumulation and
    clipping, ``reload_dataloaders_every_n_epochs``, ``use_distributed_sampler``; and ``strategy`` (``"ddp"``,
    with ``ddp``: the DDP options, or ``"auto"``), ``deterministic`` and ``benchmark`` (torch's flags as the
    parent's Trainer set them) and ``bars`` (whether the parent shows a progress bar), which a child in the
    parent's process takes from the process instead.

    Args:
        trainer: the parent's trainer.

    Returns:
        The dict (every value JSON-serialisable).

    Raises:
        ValueError: for a strategy a child cannot reproduce (:func:`check_child_strategy`), or DDP options that
            are not JSON values.

    Example:
        >>> child_trainer_arguments(Trainer(accelerator="cpu", devices=1, logger=False))["strategy"]
        'auto'
    """
    accelerator = _accelerator_flag(trainer)
    strategy = check_child_strategy(trainer)
    ddp = None
    if isinstance(strategy, DDPStrategy):
        options = ddp_options(trainer.strategy)
        try:
            ddp_kwargs = json.loads(json.dumps(options.ddp_kwargs))
        except TypeError as error:
            raise ValueError(
                f"the DDP options {sorted(options.ddp_kwargs)} cannot be written for a deferred sibling's task "
                f"({error}): give DDPStrategy only plain values (numbers, strings, booleans), or use "
                "siblings='in_job'."
            ) from None
        ddp = {
            "process_group_backend": strategy.process_group_backend,
            "timeout_s": options.timeout.total_seconds(),
            "ddp_kwargs": ddp_kwargs,
        }
    if torch.are_deterministic_algorithms_enabled():
        deterministic = "warn" if torch.is_deterministic_algorithms_warn_only_enabled() else True
    else:
        deterministic = False
    return {
        "accelerator": accelerator,
        "devices": trainer.num_devices,  # a count: a task elsewhere has its own device ids
        "num_nodes": trainer.num_nodes,
        "precision": str(trainer.precision),
        "limit_train_batches": trainer.limit_train_batches,
        **_validation_flags(trainer),
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "gradient_clip_val": trainer.gradient_clip_val,
        "gradient_clip_algorithm": None if trainer.gradient_clip_algorithm is None else str(
            trainer.gradient_clip_algorithm.value
        ),
        "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs,
        "use_distributed_sampler": uses_distributed_sampler(trainer),
        "strategy": "auto" if ddp is None else "ddp",
        "ddp": ddp,
        "deterministic": deterministic,
        "benchmark": bool(torch.backends.cudnn.benchmark),
        "bars": trainer.progress_bar_callback is not None,
    }


_FROM_PROCESS = ("precision", "strategy", "ddp", "deterministic", "benchmark", "bars")
"""What :func:`child_trainer_arguments` records that a child in the parent's process takes from the process."""


def _own_arguments(max_steps: int, callbacks: list[Callback], root_dir: Path) -> dict:
    """What every child Trainer has of its own: no logger, no bar (the caller's), its progress checkpoints."""
    return {
        "max_steps": max_steps,
        "max_epochs": -1,
        "logger": False,
        "enable_checkpointing": True,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "callbacks": callbacks,
        "default_root_dir": str(root_dir),
    }


def _child_trainer(trainer: Trainer, max_steps: int, callbacks: list[Callback], root_dir: Path) -> Trainer:
    shared = {k: v for k, v in child_trainer_arguments(trainer).items() if k not in _FROM_PROCESS}
    if shared["accelerator"] != "cpu":
        shared["devices"] = trainer.device_ids
    return Trainer(
        **shared,
        strategy=check_child_strategy(trainer),
        plugins=_child_plugins(trainer),
        deterministic=None,  # keeps torch's flags as the parent's Trainer set them
        **_own_arguments(max_steps, callbacks, root_dir),
    )


def _detached_trainer(arguments: dict, max_steps: int, callbacks: list[Callback], root_dir: Path) -> Trainer:
    """A child Trainer from :func:`child_trainer_arguments` recorded in another process."""
    shared = {k: v for k, v in arguments.items() if k not in ("strategy", "ddp", "bars")}
    ddp = arguments.get("ddp") or {}
    strategy = "auto"
    if _world_size(arguments) > 1:
        strategy = DDPStrategy(
            process_group_backend=ddp.get("process_group_backend"),
            timeout=timedelta(seconds=ddp.get("timeout_s", 1800)),
            **ddp.get("ddp_kwargs", {}),
        )
    return Trainer(**shared, strategy=strategy, **_own_arguments(max_steps, callbacks, root_dir))


def _world_size(arguments: dict) -> int:
    devices = arguments["devices"]
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return count * int(arguments.get("num_nodes", 1))


class ChildStart(Callback):
    """In a child's Trainer: put the global RNG where the parent's was at the snapshot, or re-seed it; when
    the child resumes from its own progress checkpoint, where the child's was."""

    def __init__(self, global_seed: int | None, from_progress: bool = False) -> None:
        self.global_seed, self.from_progress = global_seed, from_progress
        self.rng_states: dict | None = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.rng_states = checkpoint.get(SNAPSHOT_RNG_KEY)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[SNAPSHOT_RNG_KEY] = rng_states(include_cuda=torch.cuda.is_available())

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.from_progress and self.rng_states is not None:
            set_rng_states(self.rng_states)
        elif self.global_seed is not None:
            torch.manual_seed(self.global_seed)
            torch.cuda.manual_seed_all(self.global_seed)
            random.seed(self.global_seed)
            np.random.seed(self.global_seed % 2**32)
        elif self.rng_states is not None:
            set_rng_states(self.rng_states)


class _Ranks(NamedTuple):
    """Where a child runs: rank zero or not, how many ranks, and how rank zero's answer reaches the others."""

    is_global_zero: bool
    world_size: int
    broadcast: Callable[[Any], Any] | None
    """Rank zero's value to every rank; None when there is no process group yet: every rank reads the files."""


def _parent_ranks(trainer: Trainer) -> _Ranks:
    return _Ranks(trainer.is_global_zero, trainer.world_size, lambda value: trainer.strategy.broadcast(value, src=0))


def _progress(ranks: _Ranks, snapshot: Path, directory: Path, start_step: int, max_steps: int) -> dict:
    """Where a child checkpoints its progress (about every tenth of its steps), and whether a preempted child
    of the same snapshot left a checkpoint to resume from."""
    path, source_file = directory / "last.ckpt", directory / "source.json"
    resume = False
    if ranks.is_global_zero or ranks.broadcast is None:  # rank zero decides; the others only read
        source = {"snapshot": str(snapshot), "size": snapshot.stat().st_size}
        source["mtime_ns"] = snapshot.stat().st_mtime_ns
        resume = path.exists() and _recorded_source(source_file) == source
        if ranks.is_global_zero and not resume:
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)
            write_json(source_file, source)  # whole or absent: ranks of a detached task read it meanwhile
    if ranks.world_size > 1 and ranks.broadcast is not None:
        resume = ranks.broadcast(resume)
    checkpoint = ModelCheckpoint(
        dirpath=directory,
        filename="progress",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=max(1, (max_steps - start_step) // 10),
    )
    return {"path": str(path), "resume": resume, "checkpoint": checkpoint}


def _recorded_source(source_file: Path) -> dict | None:
    """The snapshot a progress checkpoint came from, or None (no file, or one being replaced)."""
    try:
        return read_json(source_file)
    except (OSError, ValueError):
        return None


def warn_if_loader_has_generator(trainer: Trainer, warn: Callable[[str, str], None]) -> None:
    """Warn when the data module cannot re-seed its order and its training loader shuffles with its own
    generator: the children then see the parent's order."""
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader) and loader.generator is not None:
        warn(
            "own-generator",
            f"the training loader of {type(trainer.datamodule).__name__} shuffles with its own generator "
            "and the data module has no `reseed_order(seed)` method, so the siblings see the parent's "
            "data order (only the global RNG is re-seeded). Give the data module `reseed_order(seed)`.",
        )


class ChildStoppedShort(RuntimeError):
    """A child run ended before its ``max_steps``: nothing of it is kept as finished."""


class ChildRun(NamedTuple):
    """One child run: the snapshot it starts from, how far it trains, its data order, where its files go.

    Attributes:
        snapshot: the Lightning checkpoint of the parent at ``start_step``, with :data:`SNAPSHOT_RNG_KEY`.
        start_step: the step the snapshot was written at.
        max_steps: the step the child trains to.
        order_seed: the seed of the child's data order and augmentation.
        progress_dir: the child's progress checkpoints, removed once it is done.
        root_dir: the child Trainer's ``default_root_dir``.
        warn: ``warn(key, message)``, called once per problem the caller should hear about.
        final_weights: where rank zero writes the child's final state dict (atomically) before the progress
            checkpoints are removed, so that no moment exists when a kill loses the trained child; None for
            nowhere.
        guard: the requeue guard of the phase (:func:`~lt_theory.training.preemption.requeue_guard`): on its
            signal the child writes its progress checkpoint at its next step boundary.
        callbacks: more callbacks of the child Trainer, after the one that sets its RNG and before its progress
            checkpoints (e.g. :class:`~lt_theory.training.sparse.MaskedStart`, which restarts a sparse level).

    Example:
        >>> run = ChildRun("lmc/snapshot_step=100.ckpt", 100, 500, 7, "lmc/progress", "lmc/k=100", print)
        >>> run.max_steps - run.start_step
        400
    """

    snapshot: str | os.PathLike
    start_step: int
    max_steps: int
    order_seed: int
    progress_dir: str | os.PathLike
    root_dir: str | os.PathLike
    warn: Callable[[str, str], None]
    final_weights: str | os.PathLike | None = None
    guard: RequeueGuard | None = None
    callbacks: Sequence[Callback] = ()


def train_from_snapshot(trainer: Trainer, pl_module: LightningModule, run: ChildRun) -> dict[str, Tensor]:
    """Train a copy of ``pl_module`` from ``run.snapshot`` (written at ``run.start_step``) to ``run.max_steps``.

    Every rank enters (the child uses the parent's devices). The parent's module and data module are not
    changed: the child trains deep copies (the data module's datasets are shared, not copied).

    Args:
        trainer: the parent's trainer (its fit may have ended).
        pl_module: the parent's module.
        run: the child run.

    Returns:
        The child's final state dict, on the CPU.
    """
    parent_data = trainer.datamodule
    shared = [getattr(parent_data, name, None) for name in ("train_dataset", "val_dataset", "test_dataset")]
    datamodule = detached_copy(parent_data, trainer, shared)
    if not callable(getattr(datamodule, "reseed_order", None)):
        warn_if_loader_has_generator(trainer, run.warn)
    module = detached_copy(pl_module, trainer)
    if hasattr(module, "_metric_attributes"):
        module._metric_attributes = None  # Lightning's cache of metric names, keyed by the parent's ids

    def make_trainer(callbacks: list[Callback]) -> Trainer:
        return _child_trainer(trainer, run.max_steps, callbacks, Path(run.root_dir))

    return _train_child(_parent_ranks(trainer), make_trainer, module, datamodule, run)


def train_detached(module: LightningModule, datamodule, arguments: dict, run: ChildRun) -> dict[str, Tensor]:
    """:func:`train_from_snapshot` outside the parent's process: ``module`` and ``datamodule`` rebuilt as the
    parent's were (not yet trained or set up), the child Trainer from the parent's recorded settings.

    Every rank of the child's launch enters. With the parent's module, data module and settings, the child is
    the one :func:`train_from_snapshot` trains (bit-identical on one CPU device).

    Args:
        module: the parent's module, rebuilt (its weights are the snapshot's once the child starts).
        datamodule: the parent's data module, rebuilt.
        arguments: :func:`child_trainer_arguments` of the parent's trainer (``devices`` and ``num_nodes`` may be
            changed to the resources of this process; a data module with ``global_batch_size`` then keeps the
            parent's batch).
        run: the child run.

    Returns:
        The child's final state dict, on the CPU.

    Example:
        >>> # state = train_detached(module, datamodule, task_list["trainer"],
        >>> #                        ChildRun("lmc/snapshot_step=100.ckpt", 100, 500, 7, ..., warn=print))
    """
    ranks = _Ranks(is_rank_zero(), _world_size(arguments), None)

    def make_trainer(callbacks: list[Callback]) -> Trainer:
        return _detached_trainer(arguments, run.max_steps, callbacks, Path(run.root_dir))

    return _train_child(ranks, make_trainer, module, datamodule, run)


def _train_child(
    ranks: _Ranks,
    make_trainer: Callable[[list[Callback]], Trainer],
    module: LightningModule,
    datamodule,
    run: ChildRun,
) -> dict[str, Tensor]:
    """The child run both entry points share: re-seed, resume or start, train, write the final weights."""
    snapshot, progress_dir = Path(run.snapshot), Path(run.progress_dir)
    info(
        f"lt_theory: training a child from step {run.start_step} to step {run.max_steps} (data-order seed "
        f"{run.order_seed}) from {snapshot}",
        "lt_theory.training",
    )
    reseed = getattr(datamodule, "reseed_order", None)
    if callable(reseed):
        reseed(run.order_seed)
    progress = _progress(ranks, snapshot, progress_dir, run.start_step, run.max_steps)
    start = ChildStart(None if callable(reseed) else run.order_seed, from_progress=progress["resume"])
    watch = nullcontext() if run.guard is None else run.guard.watch_child(progress["path"])
    with watch as on_signal:
        own = [start, *run.callbacks, progress["checkpoint"]] + ([] if on_signal is None else [on_signal])
        child = make_trainer(own)
        ckpt_path = progress["path"] if progress["resume"] else str(snapshot)
        _fit_child(ranks.world_size, child, module, datamodule, ckpt_path, run.order_seed)
        state = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
        finished = child.global_step == run.max_steps
        if finished and run.final_weights is not None and ranks.is_global_zero:
            save_atomically(state, run.final_weights)
    if not finished:  # no final weights (they would mark it done), no result; its progress stays
        raise ChildStoppedShort(
            f"the child of step {run.start_step} stopped at step {child.global_step}, not {run.max_steps} (a "
            "callback set trainer.should_stop?): it is not kept as trained; running again trains it on from its "
            f"progress checkpoint in {progress_dir}."
        )
    if ranks.is_global_zero:
        shutil.rmtree(progress_dir, ignore_errors=True)
    return state


def _fit_child(world_size: int, child: Trainer, module, datamodule, ckpt_path: str, order_seed: int) -> None:
    previous_seed = os.environ.get("PL_GLOBAL_SEED")
    if world_size > 1:
        os.environ["PL_GLOBAL_SEED"] = str(order_seed)  # DistributedSampler's seed
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before.*")
            child.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, **_FULL_CHECKPOINT_LOAD)
    finally:
        if previous_seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = previous_seed
