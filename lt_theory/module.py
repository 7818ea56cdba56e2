"""Image classification as a LightningModule: the model every recipe trains.

Cross-entropy loss, SGD (with momentum, optional Nesterov) or Adam, and a learning-rate schedule that is
either piecewise constant ("step": multiply by ``gamma`` at each milestone, He et al. 2016's CIFAR schedule;
``milestones`` in epochs, or in optimizer steps with ``schedule_interval="step"`` as ``open_lth`` counts
them), cosine annealing over the whole run, stepped every optimizer step (Loshchilov & Hutter,
ICLR 2017), or constant. Accuracy is torchmetrics' multiclass accuracy. Logged tags: ``train/loss``,
``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``, ``lr``, and a custom-scalars
panel "training" that draws train against validation loss and accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lt_theory import loggers

__all__ = ["ClassificationModule"]

_OPTIMIZERS = ("sgd", "adam")
_SCHEDULES = ("step", "cosine", "constant")
_INTERVALS = ("epoch", "step")


class ClassificationModule(LightningModule):
    """Train a classifier ``net`` with cross-entropy.

    Args:
        net: any ``nn.Module`` mapping images to ``num_classes`` logits (see :mod:`lt_theory.models`).
        num_classes: number of classes; the recipes link it to the data module's.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: the base learning rate.
        momentum: SGD momentum (ignored by Adam).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 weight decay (coupled, as in torch.optim.SGD / Adam).
        betas: Adam's coefficients.
        schedule: ``"step"``, ``"cosine"`` or ``"constant"``.
        milestones: when ``"step"`` multiplies the learning rate by ``gamma``: epochs, or optimizer steps with
            ``schedule_interval="step"``.
        gamma: the factor of ``"step"``.
        schedule_interval: the unit of ``milestones``: ``"epoch"`` (the scheduler is stepped at each epoch's
            end; the learning rate of epoch ``e`` is ``lr * gamma ** (number of milestones <= e)``) or
            ``"step"`` (stepped after every optimizer step; the learning rate of the optimizer step that
            follows ``t`` completed steps is ``lr * gamma ** (number of milestones <= t)``, e.g. milestones
            31280 and 46920 for epochs 80 and 120 of 391 steps). Step milestones stay exact when epochs and
            the schedule do not line up, e.g. in the rewound levels of :class:`~lt_theory.callbacks.IMPPruner`.
            Only the ``"step"`` schedule uses it (cosine is always stepped per step).

    Raises:
        ValueError: for an unknown optimizer, schedule or schedule_interval, a non-positive lr, or unsorted
            milestones.

    Example:
        >>> import torch
        >>> from lt_theory.models import resnet20
        >>> module = ClassificationModule(resnet20(), lr=0.1, schedule="step", milestones=(80, 120))
        >>> module(torch.zeros(2, 3, 32, 32)).shape  # class logits
        torch.Size([2, 10])
        >>> config = module.configure_optimizers()
        >>> optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
        >>> type(optimizer).__name__, optimizer.defaults["lr"], optimizer.defaults["momentum"]
        ('SGD', 0.1, 0.9)
        >>> sorted(scheduler.milestones), scheduler.gamma, config["lr_scheduler"]["interval"]
        ([80, 120], 0.1, 'epoch')
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        schedule: str = "step",
        milestones: Sequence[int] = (80, 120),
        gamma: float = 0.1,
        schedule_interval: str = "epoch",
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}")
        if not lr > 0:
            raise ValueError(f"`lr` must be a positive number, got {lr!r}")
        if schedule_interval not in _INTERVALS:
            raise ValueError(f"`schedule_interval` must be one of {_INTERVALS}, got {schedule_interval!r}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"`milestones` must be increasing {schedule_interval}s, got {list(milestones)}")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes!r}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def on_fit_start(self) -> None:
        loggers.add_custom_scalar_charts(
            self.trainer,
            "training",
            {
                "Loss: train vs val": ["train/loss_epoch", "val/loss"],
                "Accuracy: train vs val": ["train/acc_epoch", "val/acc"],
            },
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch, stage: str, accuracy: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"the net outputs {logits.shape[-1]} logits but `num_classes` is {self.num_classes}: "
                "give the net the data's number of classes (e.g. `num_classes: 100` for CIFAR-100)."
            )
        loss = F.cross_entropy(logits, y)
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train", self.train_acc)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        else:
            optimizer = torch.optim.Adam(
                self.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay
            )
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "step":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones), gamma=hp.gamma)
            interval = hp.get("schedule_interval", "epoch")
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
