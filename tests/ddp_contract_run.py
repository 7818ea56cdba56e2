"""Run every registered callback under strategy="ddp" on 2 CPU processes (gloo); each rank reports its writes.

Launched by test_contract.py as a script, because Lightning's DDP launcher re-runs the script for rank 1.
Usage: python tests/ddp_contract_run.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from contract_registry import REGISTRY
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lt_theory import loggers


def main(out: Path) -> None:
    module, data = make_module_and_data()
    logs = [
        CSVLogger(out / "logs", name="ddp", version=0),
        TensorBoardLogger(out / "tb", name="ddp", version=0),
    ]
    trainer = make_trainer(
        out,
        [case.make_callback() for case in REGISTRY],
        logger=logs,
        strategy="ddp",
        devices=2,
        deterministic=False,
    )
    trainer.fit(module, datamodule=data)
    report = {"rank": trainer.global_rank, "emitted_writes": loggers.emitted_writes}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
