"""The tiny training run the contract suite (and other callback tests) use: ResNet-8 on synthetic data."""

from __future__ import annotations

from lightning.pytorch import Trainer, seed_everything

from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.models import CIFARResNet
from lt_theory.module import ClassificationModule

STEPS_PER_EPOCH = 6


def make_module_and_data(seed: int = 0) -> tuple[ClassificationModule, SyntheticCIFARDataModule]:
    seed_everything(seed, verbose=False)
    module = ClassificationModule(CIFARResNet(depth=8), lr=0.05, schedule="constant")
    data = SyntheticCIFARDataModule(
        num_train=16 * STEPS_PER_EPOCH, num_test=32, batch_size=16, seed=seed, label_noise=0.25
    )
    return module, data


def make_trainer(root, callbacks=(), logger=False, **overrides) -> Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=logger,
        callbacks=list(callbacks),
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        log_every_n_steps=1,
    )
    settings.update(overrides)
    return Trainer(**settings)
