"""IMPPruner under strategy="ddp" on 2 CPU processes (gloo): each rank saves the masks of every level and
its final weights; levels given in epochs, with a ModelCheckpoint (the step-k snapshot goes beside it).

Launched by test_imp_callback.py as a script, because Lightning's DDP launcher re-runs the script for rank 1.
Usage: python tests/imp_ddp_run.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from lt_theory.callbacks.imp import IMPPruner


class MasksByLevel(Callback):
    """Copies the pruner's masks each time a new level starts (placed after the pruner)."""

    def __init__(self, pruner: IMPPruner) -> None:
        self.pruner, self.masks_by_level = pruner, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.pruner.level > len(self.masks_by_level):
            self.masks_by_level.append({n: m.detach().cpu().clone() for n, m in self.pruner.masks.items()})


def main(out: Path) -> None:
    module, data = make_module_and_data()
    pruner = IMPPruner(levels=2, fraction=0.3, rewind_step=1, epochs_per_level=1)  # 3 steps a rank-epoch
    recorder = MasksByLevel(pruner)
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    trainer = make_trainer(
        out,
        [pruner, recorder, checkpoints],
        strategy="ddp",
        devices=2,
        deterministic=False,
        max_epochs=-1,
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    torch.save(
        {
            "level": pruner.level,
            "level_steps": pruner.level_steps,
            "global_step": trainer.global_step,
            "masks_by_level": recorder.masks_by_level,
            "state": {name: value.detach().cpu() for name, value in module.state_dict().items()},
            "rewind_file": pruner._rewind.file,
        },
        out / f"rank{rank}.pt",
    )
    if rank == 0:
        tickets = sorted(p.name for p in (out / "imp").glob("ticket_level*.pt"))
        (out / "report.json").write_text(json.dumps({"tickets": tickets}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
