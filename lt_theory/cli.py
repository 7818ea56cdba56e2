"""The command line of the recipes: LightningCLI over :class:`ClassificationModule` and the CIFAR data modules.

Run ``python recipes/resnet_cifar.py fit --config recipes/configs/quickstart.yaml`` (or ``python -m
lt_theory.cli ...``). Every LightningCLI feature works: ``--print_config``, overriding any key
(``--trainer.max_epochs 3``). Unknown keys and wrong types are reported by LightningCLI's argument parser.
After ``fit`` the CLI prints where the TensorBoard logs are and the command that shows them.

**Resuming**: the same command with ``--ckpt_path last`` resumes the run from its own ``last.ckpt``. A
TensorBoardLogger opens a new ``version_N`` folder for every run, where Lightning would look for
``last.ckpt`` and find none; so when the logger's ``version`` is not given, the CLI takes the newest
``<save_dir>/<name>/version_*`` holding ``checkpoints/last.ckpt``, resumes from that file and logs into that
version, so the resumed run appends to the same TensorBoard run. With none, it says so and trains from the
start.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lt_theory.data import CIFARDataModule
from lt_theory.module import ClassificationModule

__all__ = ["TheoryCLI", "instantiate", "main"]


class TheoryCLI(LightningCLI):
    """LightningCLI with the data's class count linked into the model and a summary after ``fit``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            _resume_last_run(self.config.fit)

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


def _resume_last_run(config) -> None:
    """Point ``ckpt_path`` and the TensorBoardLogger's version at the newest run with a ``last.ckpt``."""
    logger = config.trainer.get("logger")
    class_path = str(getattr(logger, "class_path", "") or "")
    if not class_path.endswith("TensorBoardLogger") or logger.init_args.get("version") is not None:
        return  # Lightning's own lookup (a fixed version, or no TensorBoardLogger)
    root = Path(logger.init_args.get("save_dir") or ".") / (logger.init_args.get("name") or "lightning_logs")
    runs = [path.parents[1] for path in root.glob("version_*/checkpoints/last.ckpt")]
    if not runs:
        rank_zero_info(f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt, so training starts anew")
        config.ckpt_path = None
        return
    run = max(runs, key=lambda path: (path / "checkpoints" / "last.ckpt").stat().st_mtime)
    logger.init_args.version = run.name
    config.ckpt_path = str(run / "checkpoints" / "last.ckpt")
    rank_zero_info(f"--ckpt_path last: resuming {config.ckpt_path}, logging on into {run}")


def _recipe_cli(**kwargs) -> TheoryCLI:
    return TheoryCLI(ClassificationModule, CIFARDataModule, subclass_mode_data=True, **kwargs)


def main(args=None) -> TheoryCLI:
    """Run the recipe CLI on ``args`` (default: ``sys.argv[1:]``)."""
    return _recipe_cli(save_config_kwargs={"overwrite": True}, args=args)


def instantiate(config: dict) -> tuple[ClassificationModule, CIFARDataModule]:
    """The module and the data module of a recipe configuration (a run's saved ``config.yaml`` as a dict, with
    no subcommand), built as the CLI builds them (the class count linked), without running anything.

    Raises:
        SystemExit: from LightningCLI's parser, for a configuration it refuses.
    """
    command_line, sys.argv = sys.argv, sys.argv[:1]  # the calling command's arguments are not the recipe's
    try:
        cli = _recipe_cli(save_config_callback=None, run=False, args=config)
    finally:
        sys.argv = command_line
    return cli.model, cli.datamodule


if __name__ == "__main__":
    main(sys.argv[1:])
