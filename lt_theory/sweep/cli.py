"""The command line: ``python -m lt_theory.sweep run|aggregate``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.measures.risk import (
    SMOOTHING_METHODS,
)
from lt_theory.module import ClassificationModule
from lt_theory.sweep.config import SweepConfig, validate_config
from lt_theory.sweep.curve import ModelWiseCurve
from lt_theory.sweep.models import build_model, num_parameters
from lt_theory.sweep.report import aggregate
from lt_theory.sweep.run import run_sweep
from lt_theory.sweep.tasks import DEFAULT_WIDTHS, sweep_tasks


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lt_theory.sweep",
        description="Model-wise double descent: a width sweep (`run`) and its curve (`aggregate`).",
    )
    commands = parser.add_subcommands(required=True, dest="command")

    run = ArgumentParser(description="Train a family of models over a width grid (see lt_theory.sweep).")
    run.add_argument("--config", action=ActionConfigFile, help="a YAML file of these keys")
    run.add_argument("--widths", type=list[int], default=list(DEFAULT_WIDTHS), help="the width grid")
    run.add_argument(
        "--splits", type=int | None, default=None, help="bias-variance mode: m >= 2 disjoint training splits"
    )
    run.add_argument("--seed", type=int, default=0, help="initialisation and data-module seed")
    run.add_argument("--model.class_path", type=str, default="lt_theory.models.PreActResNet18")
    run.add_argument("--model.width_arg", type=str, default="k", help="the factory's width argument")
    run.add_argument("--model.init_args", type=dict, default={}, help="the factory's other arguments")
    run.add_argument("--model.input_pool", type=int, default=1, help="average-pool the inputs by this factor")
    run.add_subclass_arguments(LightningDataModule, "data", instantiate=False, required=False)
    run.set_defaults(
        data={"class_path": "lt_theory.data.CIFAR10DataModule", "init_args": {"label_noise": 0.15}}
    )
    run.add_class_arguments(
        ClassificationModule, "module", skip={"net", "num_classes"}, instantiate=False, sub_configs=True
    )
    run.add_class_arguments(
        Trainer,
        "trainer",
        skip={"logger", "callbacks", "default_root_dir"},
        instantiate=False,
        sub_configs=True,
    )
    run.add_class_arguments(
        DoubleDescentProbe, "probe", skip={"measure_on_train_end"}, instantiate=False, sub_configs=True
    )
    run.set_defaults({"probe.train_subset_size": None})
    run.add_argument("--logdir", type=str, default="runs", help="TensorBoard root folder")
    run.add_argument("--name", type=str, default="dd_sweep", help="the sweep's folder under --logdir")
    run.add_argument(
        "--task_index", type=int | None, default=None, help="run one task (default $SLURM_ARRAY_TASK_ID)"
    )
    run.add_argument(
        "--aggregate", type=bool, default=True, help="aggregate at the end of a sequential sweep"
    )
    run.add_argument("--epsilon", type=float, default=0.01, help="train error counted as interpolation")
    run.add_argument("--rerun", type=bool, default=False, help="retrain runs that have a result.json")
    run.add_argument("--print_tasks", type=bool, default=False, help="print the task list and exit")
    commands.add_subcommand("run", run, help="train the sweep (sequentially, or one task of a job array)")

    agg = ArgumentParser(description="Draw the model-wise curve of a finished (or partial) sweep.")
    agg.add_argument(
        "--logdir", type=str, required=True, help="the sweep folder: <run --logdir>/<run --name>"
    )
    agg.add_argument("--epsilon", type=float, default=0.01, help="train error counted as interpolation")
    agg.add_argument("--smoothing", type=str | None, default=None, help=f"one of {SMOOTHING_METHODS}")
    agg.add_argument("--window", type=int, default=3, help="smoothing window, in widths (odd)")
    commands.add_subcommand("aggregate", agg, help="read the runs, draw the curve, find peak and threshold")
    return parser


def _print_tasks(sweep: SweepConfig) -> None:
    tasks = sweep_tasks(sweep.widths, sweep.splits)
    print(f"{len(tasks)} tasks; as a SLURM array: sbatch --array=0-{len(tasks) - 1} ...")
    for index, task in enumerate(tasks):
        net = build_model(
            sweep.model_class_path, sweep.model_width_arg, task.width, sweep.model_init_args, 10
        )
        print(f"  task {index:3d}: {task.name}  ({num_parameters(net):,} parameters)")


def main(args: Sequence[str] | None = None) -> ModelWiseCurve | list[dict] | None:
    """The command line: ``run`` a sweep or ``aggregate`` one (module docstring); ``args`` default to argv.

    Returns:
        ``run``: the curve when it aggregated, else the run records; ``aggregate``: the curve.
    """
    parser = _parser()
    cfg = parser.parse_args(sys.argv[1:] if args is None else list(args))
    if cfg.command == "aggregate":
        options = cfg.aggregate
        try:
            return aggregate(options.logdir, options.epsilon, options.smoothing, options.window)
        except ValueError as error:
            parser.error(f"aggregate: {error}")
    try:
        sweep = validate_config(cfg.run)
    except ValueError as error:
        parser.error(f"run: {error}")
    if cfg.run.print_tasks:
        _print_tasks(sweep)
        return None
    try:
        results = run_sweep(sweep)
    except ValueError as error:
        parser.error(f"run: {error}")
    if sweep.task_index is None and sweep.aggregate and rank_zero_only.rank == 0:  # once under DDP
        return aggregate(sweep.directory, sweep.epsilon)
    return results
