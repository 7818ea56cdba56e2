"""The command line: ``python -m lt_theory.sweep run|aggregate``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser
from lightning.pytorch.utilities import rank_zero_only

from lt_theory.measures.risk import SMOOTHING_METHODS
from lt_theory.sweep.axis_curves import SweepAggregate
from lt_theory.sweep.config import (
    SweepConfig,
    build_net,
    grid_summary,
    parse_arguments,
    task_config,
    validate_config,
)
from lt_theory.sweep.models import num_parameters
from lt_theory.sweep.progress import SWEEP_LOGGER
from lt_theory.sweep.report import aggregate
from lt_theory.sweep.run import run_sweep
from lt_theory.sweep.tasks import describe_grid
from lt_theory.training.progress import info

USAGE = """python -m lt_theory.sweep run --config RECIPE.yaml [--config SWEEP.yaml] [--KEY VALUE ...]
       python -m lt_theory.sweep aggregate --logdir SWEEP_FOLDER [--epsilon E]

run: train a recipe over a grid of config values (a recipe config plus a `sweep:` section; every key with
     `python -m lt_theory.sweep run --help`). aggregate: draw the curves of a finished or partial sweep."""


def _aggregate_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lt_theory.sweep aggregate",
        description="Draw the curves of a finished (or partial) sweep.",
    )
    parser.add_argument(
        "--logdir", type=str, required=True, help="the sweep folder: <sweep.logdir>/<sweep.name>"
    )
    parser.add_argument("--epsilon", type=float, default=0.01, help="train error counted as interpolation")
    parser.add_argument("--smoothing", type=str | None, default=None, help=f"one of {SMOOTHING_METHODS}")
    parser.add_argument("--window", type=int, default=3, help="smoothing window, in points (odd)")
    return parser


def _net_parameters(spec: dict) -> str:
    """The parameter count of a ``model.net`` spec, built alone."""
    try:
        return f"{num_parameters(build_net(spec)):,} parameters"
    except ValueError as error:
        return f"parameters unknown: {error}"


@rank_zero_only
def _print_tasks(sweep: SweepConfig) -> None:
    """The task list (stdout: the listing asked for), with each task's parameter count."""
    count, grid = len(sweep.tasks), describe_grid(sweep.axes, sweep.splits)
    print(f"{count} tasks; as a SLURM array: sbatch --array=0-{count - 1} ...  ({grid})")
    for task in sweep.tasks:
        size = _net_parameters(task_config(sweep, task)["model"]["net"])
        print(f"  task {task.index:3d}: {task.name}  ({task.label()}; {size})")


def _fail(command: str, message: str) -> None:
    """Exit with status 2 and ``message``, as a usage error."""
    prog = "python -m lt_theory.sweep" + (f" {command}" if command else "")
    argparse.ArgumentParser(prog=prog, usage=USAGE).error(message)


def _run(args: Sequence[str]) -> SweepAggregate | list[dict] | None:
    try:
        parser, cfg = parse_arguments(args)
        sweep = validate_config(parser, cfg)
    except ValueError as error:
        _fail("run", str(error))
    if sweep.print_tasks:
        _print_tasks(sweep)
        return None
    info(f"[sweep] {grid_summary(sweep)}", SWEEP_LOGGER)
    try:
        results = run_sweep(sweep)
    except ValueError as error:
        _fail("run", str(error))
    if sweep.task_index is None and sweep.aggregate and rank_zero_only.rank == 0:  # once under DDP
        return aggregate(sweep.directory, sweep.epsilon)
    return results


def main(args: Sequence[str] | None = None) -> SweepAggregate | list[dict] | None:
    """The command line: ``run`` a sweep or ``aggregate`` one (module docstring of :mod:`lt_theory.sweep`).

    Args:
        args: the arguments after ``python -m lt_theory.sweep``; default ``sys.argv[1:]``.

    Returns:
        ``run``: the aggregate when it aggregated (a sequential sweep), else the run records, or None after
        ``--sweep.print_tasks true``; ``aggregate``: the aggregate.

    Raises:
        SystemExit: with status 2 and a message, for a usage error (old format, unknown key, bad axis, ...).
    """
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] not in ("run", "aggregate"):
        if args and args[0] in ("-h", "--help"):
            print("usage: " + USAGE)
            raise SystemExit(0)
        _fail("", f"the first argument must be `run` or `aggregate`, got {args[:1]}")
    if args[0] == "run":
        return _run(args[1:])
    parser = _aggregate_parser()
    options = parser.parse_args(args[1:])
    try:
        return aggregate(options.logdir, options.epsilon, options.smoothing, options.window)
    except ValueError as error:
        _fail("aggregate", str(error))
