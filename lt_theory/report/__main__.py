"""``python -m lt_theory.report LOGDIR``: diagnose a log directory, print the verdict table, write the report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lt_theory.report",
        description="Read what the lt_theory callbacks logged to TensorBoard and say, condition by condition, "
        "whether it holds, against which reference, and what to try.",
    )
    parser.add_argument("logdir", help="a run's log directory, or a folder of runs (versions, a sweep)")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="only print; write neither report.md, report.html nor the report/diagnosis text",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="number of classes for the chance-level check (default: from hparams.yaml)",
    )
    parser.add_argument(
        "--output", default=None, help="folder for report.md and report.html (default: LOGDIR)"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="print the verdict table without the evidence"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0, or 2 for a missing directory or one without lt_theory tags (the message goes to stderr).
    """
    args = _parser().parse_args(argv)
    from lt_theory.report.diagnosis import diagnose  # after parsing: --help stays fast

    try:
        report = diagnose(args.logdir, num_classes=args.num_classes)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.to_markdown(details=not args.table_only))
    if not args.no_write:
        paths = report.write(args.output)
        print(f"wrote {paths['markdown']}, {paths['html']} and the text report/diagnosis of each run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
