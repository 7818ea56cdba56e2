"""A sweep's configuration, validated, and the settings a stored run is reused under."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule

from lt_theory.sweep.models import build_model, import_object
from lt_theory.sweep.tasks import SweepTask, check_splits, check_widths, sweep_tasks
from lt_theory.training.stored import comparable


@dataclass
class SweepConfig:
    """A validated ``run`` configuration."""

    widths: tuple[int, ...]
    splits: int | None
    model_class_path: str
    model_width_arg: str
    model_init_args: dict
    model_input_pool: int
    data_class_path: str
    data_init_args: dict
    module_args: dict
    trainer_args: dict
    probe_args: dict
    seed: int
    directory: Path
    task_index: int | None
    aggregate: bool
    epsilon: float
    rerun: bool
    tasks: list[SweepTask] = field(default_factory=list)


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, Namespace):
        return value.as_dict()
    return dict(value)


def validate_config(cfg: Namespace) -> SweepConfig:
    widths = check_widths(list(cfg.widths) if cfg.widths is not None else None)
    splits = check_splits(cfg.splits)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {cfg.seed!r}")
    if not (isinstance(cfg.epsilon, (int, float)) and 0 <= cfg.epsilon < 1):
        raise ValueError(f"`epsilon` must be a number in [0, 1), got {cfg.epsilon!r}")
    task_index = cfg.task_index
    from_slurm = os.environ.get("SLURM_ARRAY_TASK_ID", "").strip()
    if task_index is None and from_slurm:
        if not from_slurm.isdigit():
            raise ValueError(
                f"`task_index` comes from $SLURM_ARRAY_TASK_ID, which is not an int: {from_slurm!r}"
            )
        task_index = int(from_slurm)
    tasks = sweep_tasks(widths, splits)
    if task_index is not None and not 0 <= task_index < len(tasks):
        raise ValueError(
            f"`task_index` must be in [0, {len(tasks)}) for {len(widths)} widths"
            + (f" x {splits} splits" if splits else "")
            + f", got {task_index}"
        )
    data = cfg.data
    data_class_path = data.class_path if isinstance(data, Namespace) else data["class_path"]
    data_init_args = _as_dict(data.init_args if isinstance(data, Namespace) else data.get("init_args"))
    data_seed = data_init_args.pop("seed", None)  # jsonargparse fills in the class default
    default_seed = inspect.signature(import_object(data_class_path, "data.class_path")).parameters.get("seed")
    if data_seed not in (None, cfg.seed, getattr(default_seed, "default", None)):
        raise ValueError(
            "`data.init_args.seed` is set by the sweep's `--seed` (initialisation, label noise, order and "
            "splits together): give `--seed` instead"
        )
    if splits is not None:
        data_class = import_object(data_class_path, "data.class_path")
        if "train_split" not in inspect.signature(data_class).parameters:
            raise ValueError(
                f"`splits` needs a data module that takes `train_split=(i, m)` (the lt_theory data modules do); "
                f"{data_class_path} does not"
            )
    model_init_args = _as_dict(cfg.model.init_args)
    build_model(
        cfg.model.class_path, cfg.model.width_arg, widths[0], model_init_args, 2, cfg.model.input_pool
    )
    sweep = SweepConfig(
        widths=widths,
        splits=splits,
        model_class_path=cfg.model.class_path,
        model_width_arg=cfg.model.width_arg,
        model_init_args=model_init_args,
        model_input_pool=cfg.model.input_pool,
        data_class_path=data_class_path,
        data_init_args=data_init_args,
        module_args=_as_dict(cfg.module),
        trainer_args=_as_dict(cfg.trainer),
        probe_args=_as_dict(cfg.probe),
        seed=cfg.seed,
        directory=Path(cfg.logdir) / cfg.name,
        task_index=task_index,
        aggregate=bool(cfg.aggregate),
        epsilon=float(cfg.epsilon),
        rerun=bool(cfg.rerun),
    )
    sweep.tasks = tasks if task_index is None else [tasks[task_index]]
    return sweep


def build_datamodule(sweep: SweepConfig, split: int | None) -> LightningDataModule:
    data_class = import_object(sweep.data_class_path, "data.class_path")
    init_args = dict(sweep.data_init_args)
    if "seed" in inspect.signature(data_class).parameters:
        init_args["seed"] = sweep.seed  # one seed: initialisation, label noise, order, augmentation, splits
    if split is not None:
        init_args["train_split"] = (split, sweep.splits)
    return data_class(**init_args)


def run_settings(sweep: SweepConfig) -> dict:
    """What a run's result depends on besides its width and split: a result is reused only under the same."""
    return comparable(
        {
            "model": [sweep.model_class_path, sweep.model_width_arg, sweep.model_init_args],
            "input_pool": sweep.model_input_pool,
            "data": [sweep.data_class_path, sweep.data_init_args],
            "module": sweep.module_args,
            "trainer": sweep.trainer_args,
            "probe": sweep.probe_args,
            "seed": sweep.seed,
            "splits": sweep.splits,
        }
    )
