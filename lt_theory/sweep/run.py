"""Training the runs of a sweep: one per task, sequentially or as a SLURM array task, reused when done."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.data.datamodule import derived_seed
from lt_theory.module import ClassificationModule
from lt_theory.sweep.config import SweepConfig, build_datamodule, run_settings
from lt_theory.sweep.models import build_model, num_parameters
from lt_theory.sweep.tasks import SweepTask
from lt_theory.training.stored import changed_settings, read_json, write_json

PREDICTIONS_FILE = "test_predictions.pt"


SETTINGS_FILE = "settings.json"


RESULT_FILE = "result.json"


def _run_seed(sweep: SweepConfig, task: SweepTask) -> int:
    """The initialisation seed: ``seed`` itself, or one derived from it per split in the bias-variance mode."""
    if task.split is None:
        return sweep.seed
    return derived_seed("sweep-init", sweep.seed, task.split) % 2**31


def _train(sweep: SweepConfig, task: SweepTask, datamodule: LightningDataModule, data_state: dict) -> dict | None:
    """Train one task and return its result record (on global rank zero; None elsewhere)."""
    run_dir = sweep.directory / task.name
    result_path = run_dir / RESULT_FILE
    settings = run_settings(sweep)
    if result_path.exists() and not sweep.rerun:
        done = read_json(result_path)
        changed = changed_settings(done.get("settings", {}), settings)
        if changed:
            raise ValueError(
                f"{run_dir} holds a run made with other settings ({', '.join(changed)} differ): give this sweep "
                "another `--name`, or `--rerun true` to train it again with the new settings"
            )
        print(f"[sweep] {task.name}: done already ({result_path}); `--rerun true` trains it again")
        return done
    if run_dir.exists() and (sweep.rerun or not _same_settings_in_progress(run_dir, settings)):
        shutil.rmtree(run_dir)  # events, checkpoints (a SLURM requeue would resume them) and results
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / SETTINGS_FILE, settings)
    datamodule.load_state_dict(data_state)  # the same data order and augmentation as a lone run
    seed = _run_seed(sweep, task)
    seed_everything(seed, workers=True, verbose=False)
    num_classes = getattr(datamodule, "num_classes", None) or sweep.model_init_args.get("num_classes")
    if num_classes is None:
        raise ValueError("the data module has no `num_classes`: give `model.init_args.num_classes`")
    net = build_model(
        sweep.model_class_path,
        sweep.model_width_arg,
        task.width,
        sweep.model_init_args,
        num_classes=num_classes,
        input_pool=sweep.model_input_pool,
    )
    module = ClassificationModule(net, num_classes=num_classes, **sweep.module_args)
    probe = DoubleDescentProbe(**sweep.probe_args, measure_on_train_end=True)
    params: dict[str, Any] = {
        "width": task.width,
        "seed": sweep.seed,
        "num_parameters": num_parameters(net),
        "model": sweep.model_class_path,
    }
    label_noise = getattr(datamodule, "label_noise", None)
    if label_noise is not None:
        params["label_noise"] = float(label_noise)
    if task.split is not None:
        params.update(split=task.split, num_splits=sweep.splits)
    logger = TensorBoardLogger(
        save_dir=str(sweep.directory), name="", version=task.name, default_hp_metric=False
    )
    trainer = Trainer(
        **sweep.trainer_args,
        logger=logger,
        callbacks=[probe, _FinalHyperparameters(probe, params)],
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    if not probe.history:
        raise RuntimeError(
            f"{task.name}: training ended before any step, so there is no final model to measure"
        )
    final = _final_metrics(probe)
    if not trainer.is_global_zero:
        return None
    record = {
        **params,
        "label_noise": params.get("label_noise"),
        "split": task.split,
        "num_splits": sweep.splits,
        "epochs": probe.history[-1]["epoch"],
        "global_step": trainer.global_step,
        "metrics": final,
        "num_test": None if probe.last_test_labels is None else len(probe.last_test_labels),
        "test_predictions": None,
        "settings": settings,
    }
    if task.split is not None and probe.last_test_logits is not None:
        torch.save(
            {"logits": probe.last_test_logits, "labels": probe.last_test_labels}, run_dir / PREDICTIONS_FILE
        )
        record["test_predictions"] = PREDICTIONS_FILE
    write_json(result_path, record)
    print(
        f"[sweep] {task.name}: {record['num_parameters']:,} parameters, train error "
        f"{final.get('train_error', math.nan):.4f}, test error {final.get('test_error', math.nan):.4f}"
    )
    return record


def _same_settings_in_progress(run_dir: Path, settings: Mapping[str, Any]) -> bool:
    """Whether an unfinished run in ``run_dir`` (a preempted SLURM task) was started with these settings, so
    that its checkpoint may be resumed."""
    path = run_dir / SETTINGS_FILE
    return path.exists() and not changed_settings(read_json(path), settings)


def _final_metrics(probe: DoubleDescentProbe) -> dict[str, float]:
    return {k: float(v) for k, v in probe.history[-1].items() if k not in ("epoch", "step")}


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
        metrics = {f"dd/final_{k}": v for k, v in _final_metrics(self.probe).items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(self.params, metrics, step=trainer.global_step)


def run_sweep(sweep: SweepConfig) -> list[dict]:
    """Train the tasks of a validated sweep, one data module per split reused across its widths.

    Returns:
        The result records of the tasks run (or found done), on global rank zero.
    """
    results = []
    for split in sorted({task.split for task in sweep.tasks}, key=lambda s: -1 if s is None else s):
        datamodule = build_datamodule(sweep, split)
        data_state = datamodule.state_dict()
        for task in (t for t in sweep.tasks if t.split == split):
            record = _train(sweep, task, datamodule, data_state)
            if record is not None:
                results.append(record)
    return results
