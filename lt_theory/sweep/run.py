"""Training the runs of a sweep: one per task, sequentially or as a SLURM array task, reused when done.

Each task's recipe config (:func:`lt_theory.sweep.config.task_config`) is written to ``config.yaml`` in its
folder, seeded with ``seed_everything`` as a recipe is, instantiated by the recipe parser and trained; one
data module per distinct ``data`` config is reused, restored to its initial state before each run (so a run
sees the data order it would see alone). The result record ``result.json`` holds the axis values, the final
errors of the DoubleDescentProbe, the last value of every scalar the other callbacks logged (tags under
``spectral/``, ``ntk/``, ``lmc/``, ``imp/``, ``landscape/``, ``report/``, read from the run's event files), and
the settings it was made with.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.sweep.config import (
    SweepConfig,
    instantiate,
    parse_config,
    recipe_yaml,
    run_settings,
    task_config,
)
from lt_theory.sweep.models import net_name, num_parameters
from lt_theory.sweep.progress import Progress
from lt_theory.sweep.tasks import SweepTask, short_names
from lt_theory.training.stored import changed_settings, read_json, write_json

PREDICTIONS_FILE = "test_predictions.pt"


SETTINGS_FILE = "settings.json"


RESULT_FILE = "result.json"


CONFIG_FILE = "config.yaml"


CALLBACK_PREFIXES = ("spectral", "ntk", "lmc", "imp", "landscape", "report")
"""Tag prefixes whose scalars a run records as its final scalars (``dd/`` is the record's ``metrics``)."""


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _reuse(sweep: SweepConfig, run_dir: Path, settings: dict) -> dict | None:
    """The stored record of a finished run made with the same settings, None to train; refuse other settings."""
    result_path = run_dir / RESULT_FILE
    if not result_path.exists() or sweep.rerun:
        return None
    done = read_json(result_path)
    changed = changed_settings(done.get("settings", {}), settings)
    if changed:
        raise ValueError(
            f"{run_dir} holds a run made with other settings ({', '.join(changed)} differ): give this sweep "
            "another `--sweep.name`, or `--sweep.rerun true` to train it again with the new settings"
        )
    return done


def _prepare_folder(sweep: SweepConfig, run_dir: Path, settings: dict) -> None:
    same = (run_dir / SETTINGS_FILE).exists() and not changed_settings(
        read_json(run_dir / SETTINGS_FILE), settings
    )
    if run_dir.exists() and (sweep.rerun or not same):
        shutil.rmtree(run_dir)  # events, checkpoints (a SLURM requeue resumes from them) and results
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / SETTINGS_FILE, settings)


def _shared_datamodule(data: LightningDataModule, spec: Mapping, cache: dict) -> LightningDataModule:
    """The data module of this ``data`` config made first, restored to its initial state (else ``data``)."""
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = (data, data.state_dict())
    datamodule, state = cache[key]
    datamodule.load_state_dict(state)  # the same data order and augmentation as a lone run
    return datamodule


def _train(sweep: SweepConfig, task: SweepTask, config: dict, settings: dict, cache: dict) -> dict | None:
    """Train one task from its recipe config: its record (None off global rank zero)."""
    run_dir = sweep.directory / task.name
    _prepare_folder(sweep, run_dir, settings)
    (run_dir / CONFIG_FILE).write_text(recipe_yaml(config, task))
    cfg = parse_config(sweep.parser, config)
    seed_everything(config["seed_everything"], workers=True, verbose=False)
    init = instantiate(sweep.parser, cfg)
    module = init.model
    datamodule = _shared_datamodule(init.data, config["data"], cache)
    trainer_args = {**init.trainer}
    callbacks = list(trainer_args.get("callbacks") or [])
    probe = next(c for c in callbacks if isinstance(c, DoubleDescentProbe))
    params = _hyperparameters(sweep, task, config, module, datamodule)
    trainer_args["callbacks"] = [*callbacks, _FinalHyperparameters(probe, params)]
    trainer = Trainer(**trainer_args)
    trainer.fit(module, datamodule=datamodule)
    if not probe.history:
        raise RuntimeError(
            f"{task.name}: training ended before any step, so there is no final model to measure"
        )
    if not trainer.is_global_zero:
        return None
    record = {
        "task_index": task.index,
        **{k: v for k, v in params.items() if k not in short_names(list(task.values)).values()},
        "axes": dict(task.values),
        "label_noise": params.get("label_noise"),
        "train_size": _train_size(datamodule),
        "split": task.split,
        "num_splits": sweep.splits,
        "epochs": probe.history[-1]["epoch"],
        "global_step": trainer.global_step,
        "metrics": _final_metrics(probe),
        "final_scalars": final_scalars(run_dir),
        "num_test": None if probe.last_test_labels is None else len(probe.last_test_labels),
        "test_predictions": None,
        "settings": settings,
    }
    if task.split is not None and probe.last_test_logits is not None:
        torch.save(
            {"logits": probe.last_test_logits, "labels": probe.last_test_labels}, run_dir / PREDICTIONS_FILE
        )
        record["test_predictions"] = PREDICTIONS_FILE
    write_json(run_dir / RESULT_FILE, record)
    return record


def _hyperparameters(sweep: SweepConfig, task: SweepTask, config: dict, module, datamodule) -> dict[str, Any]:
    """What TensorBoard's HPARAMS shows for a run: its axis values, seed, size, model, noise and split."""
    names = short_names(list(task.values))
    params: dict[str, Any] = {names[key]: _hparam(value) for key, value in task.values.items()}
    params.update(
        seed=config["data"]["init_args"].get("seed", config["seed_everything"]),
        num_parameters=num_parameters(module),
        model=net_name(config["model"]["net"]),
    )
    label_noise = getattr(datamodule, "label_noise", None)
    if label_noise is not None:
        params["label_noise"] = float(label_noise)
    if task.split is not None:
        params.update(split=task.split, num_splits=sweep.splits)
    return params


def _train_size(datamodule: LightningDataModule) -> int | None:
    dataset = getattr(datamodule, "train_dataset", None)
    return None if dataset is None else len(dataset)


def _final_metrics(probe: DoubleDescentProbe) -> dict[str, float]:
    return {k: float(v) for k, v in probe.history[-1].items() if k not in ("epoch", "step")}


def final_scalars(run_dir: str | Path) -> dict[str, float]:
    """The last value (largest step) of each scalar a callback logged in a run's event files.

    Args:
        run_dir: the run's folder (its TensorBoard version).

    Returns:
        ``{tag: value}`` for the tags under :data:`CALLBACK_PREFIXES` (empty without event files).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in sorted(events.Tags().get("scalars", [])):
        if tag.split("/", 1)[0] in CALLBACK_PREFIXES:
            last = max(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))
            out[tag] = float(last.value)
    return out


class _FinalHyperparameters(Callback):
    """Logs the run's hyperparameters with its final metrics, once the probe has measured the final model.

    At fit end, before Lightning finalises the loggers: ``log_hyperparams(params, {"dd/final_<metric>": ...})``
    writes TensorBoard's HPARAMS entry and the metrics as scalars at the last step.
    """

    def __init__(self, probe: DoubleDescentProbe, params: dict[str, Any]) -> None:
        self.probe, self.params = probe, params

    def on_fit_end(self, trainer: Trainer, pl_module) -> None:
        if not self.probe.history:
            return
        train_size = _train_size(trainer.datamodule) if trainer.datamodule is not None else None
        if train_size is not None:
            self.params["train_size"] = train_size
        metrics = {f"dd/final_{k}": v for k, v in _final_metrics(self.probe).items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(self.params, metrics, step=trainer.global_step)


def _summary(record: dict | None) -> str:
    if record is None:
        return "trained (the record is written by global rank zero)"
    metrics = record.get("metrics", {})
    return (
        f"{record['num_parameters']:,} parameters, train error {metrics.get('train_error', math.nan):.4f}, "
        f"test error {metrics.get('test_error', math.nan):.4f}"
    )


def run_sweep(sweep: SweepConfig) -> list[dict]:
    """Train the selected tasks of a validated sweep, saying how far it is and how long is left.

    Args:
        sweep: from :func:`lt_theory.sweep.config.validate_config`.

    Returns:
        The result records of the tasks run (or found done), on global rank zero.

    Raises:
        ValueError: for a run folder that holds a result made with other settings.
    """
    progress = Progress(sweep.selected, len(sweep.tasks))
    cache: dict = {}
    results = []
    for task in sweep.selected:
        config = task_config(sweep, task)
        settings = run_settings(config)
        record = _reuse(sweep, sweep.directory / task.name, settings)
        trained = record is None
        if trained:
            progress.started(task)
            record = _train(sweep, task, config, settings, cache)
        progress.done(task, _summary(record), trained)
        if record is not None:
            results.append(record)
    return results
