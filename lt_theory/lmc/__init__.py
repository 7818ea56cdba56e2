"""Deferred siblings of LinearModeConnectivity, from the command line: ``python -m lt_theory.lmc``.

A run with ``LinearModeConnectivity(mode="spawn", siblings="deferred")`` ends its fit with a task list in the
callback's folder (``<log_dir>/lmc/sibling_tasks.json``, :mod:`lt_theory.training.deferred`). Then::

    python -m lt_theory.lmc train-sibling --dir <lmc dir> --task-index i   # one sibling (default $SLURM_ARRAY_TASK_ID)
    python -m lt_theory.lmc aggregate --dir <lmc dir>                      # paths and barriers, into the parent's run
    python -m lt_theory.lmc status --dir <lmc dir>                         # which tasks are done

On SLURM: ``sbatch --array=0-<n-1> recipes/slurm/lmc_siblings_array.sbatch <lmc dir>``, then the aggregation
with ``--dependency=afterany`` on the array.

- :func:`~lt_theory.lmc.aggregate.aggregate`: the path between the parent and each trained sibling, evaluated as
  in the parent's job, logged with the same ``lmc/*`` tags at the same steps into the parent's TensorBoard run.
- :func:`~lt_theory.training.deferred.train_task`: one task.
"""

from lt_theory.lmc.aggregate import aggregate
from lt_theory.training.deferred import train_task

__all__ = ["aggregate", "train_task"]
