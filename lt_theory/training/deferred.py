"""Deferred siblings: the instability analysis's siblings trained as separate jobs (a SLURM array), not in the
parent's job.

``LinearModeConnectivity(mode="spawn", siblings="deferred")`` trains the parent and writes its snapshots as
usual; when the fit ends it writes, instead of training the siblings one after another,

- the parent's final weights (``parent_step=<T>_<fingerprint>.pt``),
- the run's LightningCLI configuration when the run came from the recipe CLI (``parent_config.yaml``),
- the task list ``sibling_tasks.json`` (:func:`write_task_list`): one task per spawn step ``k`` (its snapshot,
  the sibling's data-order seed, the files it writes), what rebuilds the module and the data module, the child
  Trainer's settings (:func:`~lt_theory.training.child.child_trainer_arguments`), the path's evaluation settings
  and the parent's TensorBoard run,

and says what to run. :func:`train_task` trains the sibling of one task (``python -m lt_theory.lmc
train-sibling``) with the code that trains in-job siblings
(:func:`~lt_theory.training.child.train_detached`): on one CPU device the two are bit-identical. A task whose
sibling's weights are written is done and returns at once, so a resubmitted array trains only what is missing;
a task preempted on SLURM resumes from its progress checkpoint. :func:`lt_theory.lmc.aggregate` then evaluates
the paths and logs the barriers into the parent's run.

**Rebuilding the parent's module and data module** in another process (:func:`rebuild`), checked at the parent's
setup (:func:`check_rebuildable`):

- a run of the recipe CLI (``python recipes/resnet_cifar.py fit --config ...``: a ``ClassificationModule`` and
  an lt_theory data module, LightningCLI's ``SaveConfigCallback`` present): its configuration is saved and
  instantiated again by the same CLI (``run=False``), so links such as ``data.num_classes -> model.num_classes``
  apply as in the parent;
- any other module and data module: ``type(module).load_from_checkpoint(snapshot)`` and
  ``type(datamodule).load_from_checkpoint(snapshot)``, which need every argument of their ``__init__`` in their
  hyperparameters (``self.save_hyperparameters()`` in ``__init__``, nothing ignored that has no default) and the
  classes importable (defined in a module, not in the script run as ``__main__``).

Paths in the task list are absolute; a relative path in the run's own configuration (a data ``root``) is read
from the folder the command runs in, so run the tasks from the folder the parent ran in.
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lt_theory.training.child import (
    ChildRun,
    child_trainer_arguments,
    train_detached,
    warn_if_loader_has_generator,
)
from lt_theory.training.preemption import detached_requeue_guard
from lt_theory.training.progress import SiblingsProgress, info
from lt_theory.training.siblings import SiblingStore
from lt_theory.training.state import save_atomically, state_fingerprint
from lt_theory.training.stored import read_json, write_json

__all__ = [
    "TASKS_FILE",
    "RebuildError",
    "TaskListError",
    "check_rebuildable",
    "read_task_list",
    "rebuild",
    "task_index",
    "train_task",
    "write_task_list",
]

TASKS_FILE = "sibling_tasks.json"
"""The task list's name, in the callback's ``directory``."""
CONFIG_FILE = "parent_config.yaml"
FORMAT = 1
_LOGGER = "lt_theory.lmc"
# a snapshot holds optimizer objects and RNG states, not only tensors (the argument is Lightning >= 2.6)
_LOAD = (
    {"weights_only": False}
    if "weights_only" in inspect.signature(LightningModule.load_from_checkpoint).parameters
    else {}
)


class TaskListError(ValueError):
    """A task list that is missing or does not hold the task asked for; the message says what to do."""


class RebuildError(RuntimeError):
    """The parent's module or data module cannot be rebuilt in this process; the message says how to fix it."""


# -- the parent's side ---------------------------------------------------------------------------------------


def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _recipe_config(trainer: Trainer, pl_module: LightningModule):
    """The SaveConfigCallback of a run of the recipe CLI (``lt_theory.cli``), or None."""
    from lightning.pytorch.cli import SaveConfigCallback

    from lt_theory.data import CIFARDataModule
    from lt_theory.module import ClassificationModule

    if type(pl_module) is not ClassificationModule or not isinstance(trainer.datamodule, CIFARDataModule):
        return None
    saving = [c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)]
    return saving[0] if saving and "model" in saving[0].config and "data" in saving[0].config else None


def _missing_arguments(obj) -> list[str]:
    """The arguments of ``type(obj).__init__`` without a default that its hyperparameters do not hold."""
    given = set(getattr(obj, "hparams", {}) or {})
    required = [
        name
        for name, p in inspect.signature(type(obj).__init__).parameters.items()
        if name != "self"
        and p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return [name for name in required if name not in given]


def check_rebuildable(trainer: Trainer, pl_module: LightningModule) -> None:
    """Refuse, at the parent's setup, a module or data module a deferred sibling's task could not rebuild.

    Args:
        trainer: the parent's trainer (in ``setup``).
        pl_module: the parent's module.

    Raises:
        ValueError: naming the class and what to change (see the module's docstring).
    """
    child_trainer_arguments(trainer)  # DDP options a task cannot be given (not JSON) are refused now
    datamodule = trainer.datamodule
    if datamodule is None or _recipe_config(trainer, pl_module) is not None:
        return  # no data module is refused by the callback itself; the recipe CLI's config is saved
    for role, obj in (("module", pl_module), ("data module", datamodule)):
        where = type(obj).__module__
        if where == "__main__" or "<locals>" in type(obj).__qualname__:
            raise ValueError(
                f"LinearModeConnectivity(siblings='deferred') rebuilds the {role} {type(obj).__name__} in each "
                f"sibling's task (another process), so its class must be importable: define it in a module, not in "
                f"{'the script run as __main__' if where == '__main__' else 'a function'}. Or use siblings='in_job'."
            )
        missing = _missing_arguments(obj)
        if missing:
            raise ValueError(
                f"LinearModeConnectivity(siblings='deferred') rebuilds the {role} in each sibling's task with "
                f"`{type(obj).__name__}.load_from_checkpoint(snapshot)`, which needs every argument of its __init__ "
                f"in its hyperparameters, but {missing} are not. Call `self.save_hyperparameters()` in __init__ "
                "without ignoring them (or give them defaults), or run the recipe CLI (`python "
                "recipes/resnet_cifar.py fit --config ...`), whose configuration is saved and instantiated again; "
                "or use siblings='in_job'."
            )


def _tensorboard_run(trainer: Trainer) -> str | None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return str(Path(logger.log_dir).resolve())
    return None


def write_task_list(
    trainer: Trainer,
    pl_module: LightningModule,
    store: SiblingStore,
    snapshots: dict[int, str],
    seeds: dict[int, int],
    settings,
    threshold: float,
    warn,
) -> Path | None:
    """Write the parent's final weights, its configuration and the task list (rank zero); say what to run.

    Every rank enters (a barrier at the end). Called by ``LinearModeConnectivity(siblings="deferred")`` when
    the parent's fit ends, at step ``T = trainer.global_step``.

    Args:
        trainer: the parent's trainer.
        pl_module: the parent's module (its final weights).
        store: the folder of snapshots and siblings.
        snapshots: spawn step ``k`` -> its snapshot, for every sibling to train.
        seeds: ``k`` -> the sibling's data-order seed.
        settings: the path's :class:`~lt_theory.callbacks.siblings.PathSettings`.
        threshold: the callback's stability threshold.
        warn: ``warn(key, message)``, called once per problem.

    Returns:
        The task list's path (rank zero), None elsewhere or when there is no sibling to train.

    Example:
        >>> # LinearModeConnectivity(spawn_steps=[0, 100], siblings="deferred") calls it in on_fit_end
    """
    final_step = trainer.global_step
    if not trainer.is_global_zero or not snapshots:
        trainer.strategy.barrier()
        return None
    directory = store.directory.resolve()
    state = {key: value.detach().cpu().clone() for key, value in pl_module.state_dict().items()}
    fingerprint = state_fingerprint(state)
    weights = directory / f"parent_step={final_step}_{fingerprint[:12]}.pt"
    save_atomically(state, weights)
    saving = _recipe_config(trainer, pl_module)
    config = None
    if saving is not None:
        config = directory / CONFIG_FILE
        config.write_text(saving.parser.dump(saving.config, skip_none=False))
    if not callable(getattr(trainer.datamodule, "reseed_order", None)):
        warn_if_loader_has_generator(trainer, warn)
    tasks = []
    for index, (k, snapshot) in enumerate(sorted(snapshots.items())):
        seed = seeds[k]
        tasks.append(
            {
                "index": index,
                "k": k,
                "snapshot": str(Path(snapshot).resolve()),
                "sibling_seed": seed,
                "weights": str(store.file(k, final_step, seed, fingerprint, ".pt").resolve()),
                "result": str(store.file(k, final_step, seed, fingerprint, ".json").resolve()),
                "progress_dir": str(store.progress(k, final_step, seed).resolve()),
                "root_dir": str(store.root(k).resolve()),
            }
        )
    path = directory / TASKS_FILE
    write_json(
        path,
        {
            "format": FORMAT,
            "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            "directory": str(directory),
            "parent": {
                "final_step": final_step,
                "fingerprint": fingerprint,
                "weights": str(weights),
                "module_class": _class_path(pl_module),
                "datamodule_class": _class_path(trainer.datamodule),
                "config": None if config is None else str(config),
                "tensorboard": _tensorboard_run(trainer),
                "cwd": os.getcwd(),
            },
            "trainer": child_trainer_arguments(trainer),
            "path_settings": {**settings.stored(), "eval_batch_size": settings.eval_batch_size},
            "threshold": threshold,
            "tasks": tasks,
        },
    )
    info(_what_to_run(path, len(tasks)), _LOGGER)
    trainer.strategy.barrier()
    return path


def _what_to_run(path: Path, count: int) -> str:
    directory = path.parent
    return (
        f"LinearModeConnectivity: {count} sibling(s) deferred; task list {path}. Train them with\n"
        f"  python -m lt_theory.lmc train-sibling --dir {directory} --task-index i    (i = 0 .. {count - 1})\n"
        f"or as a SLURM array:\n"
        f"  JOB=$(sbatch --parsable --array=0-{count - 1} recipes/slurm/lmc_siblings_array.sbatch {directory})\n"
        f"then log their barriers into this run with\n"
        f"  python -m lt_theory.lmc aggregate --dir {directory}\n"
        f"(on SLURM, once the array ends: sbatch --dependency=afterany:$JOB --wrap "
        f"\"python -m lt_theory.lmc aggregate --dir {directory}\")"
    )


# -- reading the task list -----------------------------------------------------------------------------------


def read_task_list(directory: str | os.PathLike) -> dict:
    """The task list in ``directory`` (or the file itself).

    Raises:
        TaskListError: when there is none or it cannot be read, saying what to run first.
    """
    path = Path(directory)
    path = path if path.name == TASKS_FILE or path.is_file() else path / TASKS_FILE
    if not path.is_file():
        raise TaskListError(
            f"no task list at {path}. It is written when a run with LinearModeConnectivity(mode='spawn', "
            "siblings='deferred') ends its fit, in the callback's directory (default <log_dir>/lmc; the run's last "
            "lines name it). Give --dir that folder, or run the parent first."
        )
    try:
        tasks = read_json(path)
    except (OSError, ValueError) as error:
        message = f"cannot read the task list {path} ({error}); run the parent again to rewrite it."
        raise TaskListError(message) from None
    if tasks.get("format") != FORMAT or "tasks" not in tasks:
        raise TaskListError(
            f"{path} is not a task list of this lt_theory version (format {tasks.get('format')!r}, "
            f"expected {FORMAT}); run the parent again with this version to rewrite it."
        )
    return _relocated(tasks, str(path.parent.resolve()))


def _moved_roots(written: str, directory: str) -> tuple[str, str]:
    """The folders that moved: ``written`` and ``directory`` less the trailing parts they share (the run's
    ``version_0/lmc`` when the whole run folder was moved, so that its TensorBoard run moves with it)."""
    old, new = Path(written).parts, Path(directory).parts
    shared = 0
    while shared < min(len(old), len(new)) - 1 and old[-1 - shared] == new[-1 - shared]:
        shared += 1
    return str(Path(*old[: len(old) - shared])), str(Path(*new[: len(new) - shared]))


def _relocated(tasks: dict, directory: str) -> dict:
    """The task list with its files under ``directory`` when its folder was moved (or mounted elsewhere), and
    the parent's TensorBoard run moved with it when it moved too (else where it was)."""
    written = tasks["directory"]
    if written == directory:
        return tasks
    old_root, new_root = _moved_roots(written, directory)

    def moved(value):
        if isinstance(value, str) and (value == old_root or value.startswith(old_root + os.sep)):
            return new_root + value[len(old_root) :]
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, list):
            return [moved(item) for item in value]
        return value

    relocated = {**moved(tasks), "directory": directory}
    run = tasks["parent"].get("tensorboard")
    if run is not None and not Path(relocated["parent"]["tensorboard"]).is_dir() and Path(run).is_dir():
        relocated["parent"]["tensorboard"] = run  # only the lmc folder was moved: the run stayed
    return relocated


def task_index(tasks: dict, index: int | None) -> int:
    """The task to run: ``index``, else ``$SLURM_ARRAY_TASK_ID``.

    Raises:
        TaskListError: when neither is given or the index is not one of the task list's.
    """
    count = len(tasks["tasks"])
    if index is None:
        value = os.environ.get("SLURM_ARRAY_TASK_ID")
        if value is None:
            raise TaskListError(
                f"which task? Give --task-index i (i = 0 .. {count - 1}), or run it as a SLURM array task "
                f"(sbatch --array=0-{count - 1} ...), which sets SLURM_ARRAY_TASK_ID."
            )
        index = int(value)
    if not 0 <= index < count:
        raise TaskListError(
            f"task index {index} is out of range: the task list {tasks['directory']}/{TASKS_FILE} has {count} "
            f"task(s), 0 .. {count - 1}; submit the array with --array=0-{count - 1}."
        )
    return index


# -- rebuilding the parent ----------------------------------------------------------------------------------


def _import(path: str):
    module, _, name = path.rpartition(".")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def rebuild(tasks: dict) -> tuple[LightningModule, LightningDataModule]:
    """The parent's module and data module, built again as the parent built them (not set up or trained).

    Args:
        tasks: the task list (:func:`read_task_list`).

    Returns:
        ``(module, datamodule)``: the recipe configuration instantiated again, or both classes'
        ``load_from_checkpoint`` of the first snapshot.

    Raises:
        RebuildError: saying what is missing and how to fix it.
    """
    parent = tasks["parent"]
    if parent.get("config"):
        return _from_recipe_config(parent["config"], parent.get("cwd"))
    snapshot = tasks["tasks"][0]["snapshot"]
    try:
        module_class, data_class = _import(parent["module_class"]), _import(parent["datamodule_class"])
        module = module_class.load_from_checkpoint(snapshot, map_location="cpu", **_LOAD)
        datamodule = data_class.load_from_checkpoint(snapshot, **_LOAD)
    except Exception as error:  # noqa: BLE001 - the message says what to do whatever went wrong
        raise RebuildError(
            f"cannot rebuild the parent's {parent['module_class']} and {parent['datamodule_class']} from the "
            f"hyperparameters in {snapshot} ({type(error).__name__}: {error}). Deferred siblings need both classes "
            "importable here and every argument of their __init__ saved by `self.save_hyperparameters()` (so that "
            "`load_from_checkpoint` works), or the run started from the recipe CLI; else train the siblings with "
            "siblings='in_job'."
        ) from error
    return module, datamodule


def _from_recipe_config(config_file: str, parent_cwd: str | None) -> tuple[LightningModule, LightningDataModule]:
    import yaml

    from lt_theory.cli import instantiate

    config = yaml.safe_load(Path(config_file).read_text())
    for name in set(inspect.signature(Trainer.fit).parameters) - {"model"}:  # fit's own (ckpt_path, ...)
        config.pop(name, None)
    config["trainer"] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    try:
        return instantiate(config)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - jsonargparse exits on a bad config
        raise RebuildError(
            f"cannot instantiate the parent's recipe configuration {config_file} again ({error}); run the task "
            f"with the lt_theory version the parent ran with, from the folder it ran in (cd {parent_cwd})."
        ) from None


# -- one task -----------------------------------------------------------------------------------------------


def train_task(
    directory: str | os.PathLike,
    index: int | None = None,
    devices: int | None = None,
    num_nodes: int | None = None,
    bars: bool | None = None,
) -> dict:
    """Train the sibling of one task of a task list (``python -m lt_theory.lmc train-sibling``).

    A task whose sibling's weights are on disk is done: it returns at once. Under SLURM the training is
    requeue-safe (:func:`~lt_theory.training.preemption.detached_requeue_guard`): a preempted task resumes from
    the sibling's progress checkpoint.

    Args:
        directory: the task list's folder (the callback's ``directory``).
        index: the task; None for ``$SLURM_ARRAY_TASK_ID``.
        devices: devices for the sibling (default: the parent's number, at most the GPUs visible here); a data
            module with ``global_batch_size`` keeps
            the parent's batch on any number.
        num_nodes: nodes for the sibling (default: ``$SLURM_JOB_NUM_NODES`` under SLURM, else 1).
        bars: show a bar over the sibling's steps (default: as the parent did).

    Returns:
        ``{"index", "k", "weights", "trained"}``: ``trained`` False when the task was done already.

    Raises:
        TaskListError: for a missing task list or a task index it does not hold.
        RebuildError: when the parent's module or data module cannot be rebuilt here.

    Example:
        >>> # train_task("runs/lmc_deferred_quick/version_0/lmc", index=0)
        >>> # {'index': 0, 'k': 12, 'weights': '.../sibling_step=12_to=48_seed=..._parent=....pt', 'trained': True}
    """
    tasks = read_task_list(directory)
    index = task_index(tasks, index)
    task, parent = tasks["tasks"][index], tasks["parent"]
    k, final_step = task["k"], parent["final_step"]
    progress = SiblingsProgress(
        {t["k"]: final_step - t["k"] for t in tasks["tasks"]},
        bars=tasks["trainer"]["bars"] if bars is None else bars,
        logger=_LOGGER,
        here=[k],
    )
    outcome = {"index": index, "k": k, "weights": task["weights"], "trained": False}
    if Path(task["weights"]).is_file():
        progress.skipped(k, f"trained already ({task['weights']}); nothing to do")
        return outcome
    for needed in (task["snapshot"], tasks["parent"]["weights"]):
        if not Path(needed).is_file():
            raise TaskListError(
                f"task {index} needs {needed}, which is missing (deleted, or only part of the run folder copied "
                "here?); copy the whole lmc folder, or run the parent again to write it."
            )
    module, datamodule = rebuild(tasks)
    arguments = dict(tasks["trainer"])
    arguments.update(_resources_here(arguments, devices, num_nodes))
    warned: set[str] = set()

    def warn(key: str, message: str) -> None:
        if key not in warned:
            warned.add(key)
            info(f"LinearModeConnectivity: {message}", _LOGGER)

    with detached_requeue_guard() as guard:
        run = ChildRun(
            task["snapshot"],
            start_step=k,
            max_steps=final_step,
            order_seed=task["sibling_seed"],
            progress_dir=task["progress_dir"],
            root_dir=task["root_dir"],
            warn=warn,
            final_weights=task["weights"],
            guard=guard,
            callbacks=[progress.callback(k, k, final_step)],
        )
        train_detached(module, datamodule, arguments, run)
    outcome["trained"] = Path(task["weights"]).is_file()  # not when a requeue signal stopped it
    return outcome


def _resources_here(arguments: dict, devices: int | None, num_nodes: int | None) -> dict:
    """The devices and nodes of a task: as given, else the parent's device count capped at the GPUs visible
    here, on the nodes of this SLURM job (one outside SLURM), so that a task run by hand on a smaller machine
    than the parent's does not wait for processes that never start."""
    if devices is None:
        devices = arguments["devices"]
        if arguments["accelerator"] in ("gpu", "cuda") and torch.cuda.is_available():
            devices = max(1, min(devices, torch.cuda.device_count()))
    if num_nodes is None:
        num_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", 1))
    return {"devices": devices, "num_nodes": num_nodes}
