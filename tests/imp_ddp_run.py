"""IMPPruner under strategy="ddp" on 2 CPU processes (gloo): each rank saves the masks of every level.

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
    pruner = IMPPruner(levels=2, fraction=0.3, rewind_step=1, steps_per_level=3)
    recorder = MasksByLevel(pruner)
    trainer = make_trainer(
        out, [pruner, recorder], strategy="ddp", devices=2, deterministic=False, max_epochs=-1
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    torch.save({"level": pruner.level, "masks_by_level": recorder.masks_by_level}, out / f"rank{rank}.pt")
    if rank == 0:
        tickets = sorted(p.name for p in (out / "imp").glob("ticket_level*.pt"))
        (out / "report.json").write_text(json.dumps({"tickets": tickets}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
