"""The command line of the recipes: LightningCLI over :class:`ClassificationModule` and the CIFAR data modules.

Run ``python recipes/resnet_cifar.py fit --config recipes/configs/quickstart.yaml`` (or ``python -m
lt_theory.cli ...``). Every LightningCLI feature works: ``--print_config``, overriding any key
(``--trainer.max_epochs 3``), ``--ckpt_path last`` to resume. Unknown keys and wrong types are reported
by LightningCLI's argument parser. After ``fit`` the CLI prints where the TensorBoard logs are and the
command that shows them.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lt_theory.data import CIFARDataModule
from lt_theory.module import ClassificationModule

__all__ = ["TheoryCLI", "main"]


class TheoryCLI(LightningCLI):
    """LightningCLI with the data's class count linked into the model and a summary after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    @rank_zero_only
    def after_fit(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("train/acc_epoch", "val/acc") if k in metrics)
        if shown:
            print(f"\nFinished at step {self.trainer.global_step}: {shown}")
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                print(f"TensorBoard logs: {logger.log_dir}")
                print(f"View them with:   tensorboard --logdir {logger.save_dir}")


def main(args=None) -> TheoryCLI:
    """Run the recipe CLI on ``args`` (default: ``sys.argv[1:]``)."""
    return TheoryCLI(
        ClassificationModule,
        CIFARDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
