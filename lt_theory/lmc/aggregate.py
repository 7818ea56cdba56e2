"""The aggregation of deferred siblings: their paths to the parent, logged into the parent's TensorBoard run.

:func:`aggregate` reads a task list (:mod:`lt_theory.training.deferred`), rebuilds the parent's module (with its
final weights) and data module, and for each task whose sibling is trained evaluates the train and test paths
exactly as the parent's job evaluates in-job siblings (:class:`~lt_theory.callbacks.siblings.SiblingMeasurement`,
the same evaluation sets and settings): on the CPU the barriers are bit-identical. It then logs what
``LinearModeConnectivity`` logs, with the same tags at the same steps (``lmc/*_barrier`` and
``lmc/error_along_path`` at step ``k``; ``lmc/stable_point``, ``lmc/stability`` and ``lmc/summary`` at the
parent's last step) into the parent's TensorBoard run, through a :class:`~lt_theory.loggers.LoggerTarget` (no
Trainer). A sibling not trained yet (or whose task failed) is named with the command that trains it, and the
others' barriers are logged; the stable point, figure and summary wait until every sibling is trained.
Results are stored next to the siblings (reused on the next aggregation), and what was logged is recorded in
``aggregated.json``, so aggregating again logs only what is new (``relog=True`` logs all again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lt_theory.callbacks.lmc import LinearModeConnectivity
from lt_theory.callbacks.siblings import PathSettings, Sibling, SiblingMeasurement, log_path_result
from lt_theory.loggers import LoggerTarget
from lt_theory.training.deferred import read_task_list, rebuild
from lt_theory.training.progress import get_logger, info
from lt_theory.training.siblings import SiblingStore
from lt_theory.training.stored import read_json, write_json

__all__ = ["LEDGER_FILE", "aggregate"]

LEDGER_FILE = "aggregated.json"
"""What an aggregation logged, in the task list's folder."""
_LOGGER = "lt_theory.lmc"


class _DataSource(NamedTuple):
    """What the evaluation sets are read from, in place of a Trainer."""

    datamodule: Any
    train_dataloader: Any = None


def _identity(result: dict) -> str:
    return f"{result['final_step']}:{result['parent']}:{result['sibling_seed']}:{sorted(result['settings'].items())}"


def aggregate(
    directory: str | os.PathLike, device: str | None = None, bars: bool = True, relog: bool = False
) -> dict:
    """Evaluate the paths to every trained deferred sibling and log them into the parent's TensorBoard run.

    Args:
        directory: the task list's folder (the callback's ``directory``, default ``<log_dir>/lmc``).
        device: where to evaluate; None for CUDA when available, else the CPU.
        bars: show each path's alphas as a bar (else one line per alpha).
        relog: log every result again, also those an earlier aggregation logged.

    Returns:
        ``{"results": {k: result}, "missing": [task indices not trained], "logged": [k logged now],
        "stable_point": k or None, "summary": the markdown table}``.

    Raises:
        TaskListError: for a missing task list (:func:`~lt_theory.training.deferred.read_task_list`).
        RebuildError: when the parent's module or data module cannot be rebuilt here.

    Example:
        >>> # aggregate("runs/lmc_deferred_quick/version_0/lmc")["stable_point"]
    """
    tasks = read_task_list(directory)
    parent, folder = tasks["parent"], Path(tasks["directory"])
    final_step, fingerprint = parent["final_step"], parent["fingerprint"]
    settings = PathSettings(**tasks["path_settings"])
    lmc = LinearModeConnectivity(mode="spawn", threshold=tasks["threshold"], **tasks["path_settings"])
    measurement = SiblingMeasurement(settings, "LinearModeConnectivity", lmc.warn_once)
    store = SiblingStore(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluation = None  # (parent module, data source), built once a sibling needs evaluating
    missing = []
    count = len(tasks["tasks"])
    for task in tasks["tasks"]:
        k, seed = task["k"], task["sibling_seed"]
        head = f"sibling {task['index'] + 1} of {count} (k = {k})"
        result = store.stored_result(k, final_step, fingerprint, seed, settings.stored())
        if result is None:
            if not Path(task["weights"]).is_file():
                missing.append(task["index"])
                get_logger(_LOGGER).warning(
                    f"{head} is not trained (no {task['weights']}): its barriers are not logged. Train it with "
                    f"`python -m lt_theory.lmc train-sibling --dir {folder} --task-index {task['index']}` "
                    "(or resubmit the array: finished tasks return at once), then aggregate again."
                )
                continue
            state = store.trained_weights(k, final_step, seed, fingerprint)  # a kill's progress folder removed
            if evaluation is None:
                evaluation = _parent_and_data(tasks, device)
            sibling = Sibling(store, k, final_step, fingerprint, seed, f"spawned at step {k}", f"path k={k}")
            result = measurement.evaluated_outside_fit(evaluation[1], evaluation[0], sibling, state, device, bars)
        else:
            info(f"{head}: its stored result is reused", _LOGGER)
        lmc.results[k] = result
    logged = _log(lmc, parent, folder, final_step, relog, complete=not missing)
    point, summary = (lmc.stable_point(), lmc.summary()) if lmc.results else (None, "")
    if missing:
        info(f"{len(missing)} of {count} siblings not trained yet (tasks {missing}); the others are logged.", _LOGGER)
    return {"results": lmc.results, "missing": missing, "logged": logged, "stable_point": point, "summary": summary}


def _parent_and_data(tasks: dict, device: torch.device) -> tuple[torch.nn.Module, _DataSource]:
    module, datamodule = rebuild(tasks)
    state = torch.load(tasks["parent"]["weights"], map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    module.to(device)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return module, _DataSource(datamodule)


def _log(
    lmc: LinearModeConnectivity, parent: dict, folder: Path, final_step: int, relog: bool, complete: bool
) -> list[int]:
    """Log what is new (everything with ``relog``) into the parent's TensorBoard run; the ks logged.

    The stable point, the stability figure and the summary are logged once, when every sibling is trained: a
    stable point of some of the ks would stay in the (append-only) event file next to the right one.
    """
    run = parent.get("tensorboard")
    if run is None:
        info("the parent had no TensorBoardLogger: the results are in the JSON files next to the siblings.", _LOGGER)
        return []
    ledger_file = folder / LEDGER_FILE
    ledger = {} if relog or not ledger_file.is_file() else read_json(ledger_file)
    done = ledger.get("results", {})
    new = [k for k in sorted(lmc.results) if done.get(str(k)) != _identity(lmc.results[k])]
    identities = {str(k): _identity(r) for k, r in sorted(lmc.results.items())}
    stability_due = complete and bool(identities) and ledger.get("stability") != identities
    if not new and not stability_due:
        info(f"nothing new to log into {run} (aggregated already; --relog logs it again).", _LOGGER)
        return []
    if not Path(run).is_dir():
        get_logger(_LOGGER).warning(
            f"the parent's TensorBoard run {run} does not exist (moved or deleted?): a new one is made there."
        )
    path = Path(run)
    logger = TensorBoardLogger(save_dir=str(path.parent), name="", version=path.name, default_hp_metric=False)
    target = LoggerTarget([logger], True, final_step)
    for k in new:
        log_path_result(lmc, target, lmc.results[k], k, f"parent vs sibling spawned at {k}")
    if stability_due:
        lmc.log_stability(target)
    logger.experiment.flush()
    logger.finalize("success")
    stability = identities if complete else ledger.get("stability")
    write_json(ledger_file, {"results": identities, "stability": stability, "tensorboard": run})
    what = "and the stable point and summary " if stability_due else "(the stable point once every sibling is) "
    info(f"logged the barriers of k = {new} {what}into {run}", _LOGGER)
    return new
