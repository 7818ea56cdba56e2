"""TheoryReport: the diagnosis of a run at the end of its fit, printed and written next to its logs."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lt_theory import loggers
from lt_theory.report.diagnosis import REPORT_TAG, Report, diagnose, log_directory

__all__ = ["TheoryReport"]


class TheoryReport(Callback):
    """At the end of ``fit``, diagnose the run from what the lt_theory callbacks logged and report it.

    Reads the trainer's TensorBoard run back (:func:`~lt_theory.report.diagnose`), logs the verdict table as the
    text ``report/diagnosis``, writes ``report.md`` and ``report.html`` into the run's ``log_dir`` and prints the
    table. Put it after the other callbacks: NTKDrift, DoubleDescentProbe and LinearModeConnectivity log their
    summaries (and LinearModeConnectivity trains its siblings) in their own ``on_fit_end``, which Lightning calls
    in the order of the callbacks list. Only global rank zero reports. Without a TensorBoardLogger it warns once
    and does nothing.

    Args:
        write: write ``report/diagnosis``, ``report.md`` and ``report.html``.
        print_table: print the verdict table (Markdown) when the fit ends.
        num_classes: for the chance-level check; None takes the module's ``num_classes``.

    Attributes:
        report: the last :class:`~lt_theory.report.Report` (None before the first fit ends).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lt_theory import NTKDrift, SpectralNormMonitor
        >>> trainer = Trainer(callbacks=[SpectralNormMonitor(), NTKDrift(), TheoryReport()])
        >>> # trainer.fit(module, datamodule=...) then prints the verdict table and writes report.html
    """

    def __init__(self, write: bool = True, print_table: bool = True, num_classes: int | None = None) -> None:
        for name, value in (("write", write), ("print_table", print_table)):
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None, got {num_classes!r}")
        self.write, self.print_table, self.num_classes = write, print_table, num_classes
        self.report: Report | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not loggers.has_tensorboard(trainer):
            rank_zero_warn(
                "TheoryReport: the trainer has no TensorBoardLogger, so there is nothing to read back "
                "and no report. Add `TensorBoardLogger(save_dir=...)` to its loggers."
            )
            return
        try:
            self.report = diagnose(trainer, num_classes=self.num_classes)
        except ValueError as error:  # nothing lt_theory logged: say so and let the fit end normally
            rank_zero_warn(f"TheoryReport: no report: {error}")
            return
        if self.write:
            loggers.log_text(trainer, REPORT_TAG, self.report.to_markdown())
            self.report.write(log_directory(trainer), tensorboard=False)
        if self.print_table:
            print(self.report.to_markdown(details=False))
