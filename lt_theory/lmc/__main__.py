"""``python -m lt_theory.lmc {train-sibling,aggregate,status} --dir <lmc dir>``: deferred siblings.

See :mod:`lt_theory.lmc`. A bad input (no task list, a task index it does not hold, a module that cannot be
rebuilt) exits with status 2 and a message saying what to do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lt_theory.lmc.aggregate import aggregate
from lt_theory.training.child import ChildStoppedShort
from lt_theory.training.deferred import RebuildError, TaskListError, read_task_list, train_task
from lt_theory.training.progress import info

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lt_theory.lmc",
        description="Deferred siblings of LinearModeConnectivity(siblings='deferred'): train one per task, then "
        "log their barriers into the parent's TensorBoard run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-sibling", help="train the sibling of one task (done tasks return at once)")
    train.add_argument("--dir", required=True, help="the task list's folder (default of the callback: <log_dir>/lmc)")
    train.add_argument("--task-index", type=int, default=None, help="the task (default: $SLURM_ARRAY_TASK_ID)")
    train.add_argument("--devices", type=int, default=None, help="devices for the sibling (default: the parent's)")
    train.add_argument("--num-nodes", type=int, default=None, help="nodes for the sibling (default: the parent's)")
    train.add_argument("--no-progress-bar", action="store_true", help="no bar over the sibling's steps")
    agg = commands.add_parser("aggregate", help="evaluate the paths and log the barriers into the parent's run")
    agg.add_argument("--dir", required=True, help="the task list's folder")
    agg.add_argument("--device", default=None, help="where to evaluate (default: cuda if available, else cpu)")
    agg.add_argument("--relog", action="store_true", help="log every result again, not only the new ones")
    agg.add_argument("--no-progress-bar", action="store_true", help="one line per alpha instead of a bar")
    status = commands.add_parser("status", help="list the tasks and which are done")
    status.add_argument("--dir", required=True, help="the task list's folder")
    return parser


def _status(directory: str) -> None:
    tasks = read_task_list(directory)
    left = []
    for task in tasks["tasks"]:
        done = Path(task["weights"]).is_file()
        left += [] if done else [task["index"]]
        info(f"task {task['index']}: k = {task['k']}, {'trained' if done else 'not trained'}", "lt_theory.lmc")
    count = len(tasks["tasks"])
    info(f"{count - len(left)} of {count} trained; left: {left or 'none'}", "lt_theory.lmc")


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        0; 3 from ``aggregate`` when some siblings are not trained yet (the others are logged); a bad input
        exits with status 2 and its message.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train-sibling":
            train_task(
                args.dir,
                args.task_index,
                devices=args.devices,
                num_nodes=args.num_nodes,
                bars=False if args.no_progress_bar else None,
            )
        elif args.command == "aggregate":
            result = aggregate(args.dir, device=args.device, bars=not args.no_progress_bar, relog=args.relog)
            if result["summary"] and not result["logged"]:  # logging it said it already
                info(result["summary"], "lt_theory.lmc")
            if result["missing"]:
                return 3
        else:
            _status(args.dir)
    except (TaskListError, RebuildError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except ChildStoppedShort as error:
        parser.exit(1, f"{parser.prog} {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
