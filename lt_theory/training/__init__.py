"""Training state shared by every callback that rewinds or forks a run (Lightning glue, no mathematics).

- :mod:`~lt_theory.training.state`: a whole training state (weights, buffers, optimizers, LR schedulers)
  captured at a step and put back, atomic files, fingerprints (IMPPruner's rewind).
- :mod:`~lt_theory.training.rng`: the global RNG states through their public APIs.
- :mod:`~lt_theory.training.child`: a child run trained from a snapshot of its parent in a Trainer of its own
  (LinearModeConnectivity's siblings, IMPPruner's with ``stability=True``).
- :mod:`~lt_theory.training.siblings`: spawn steps, a sibling's seed, the folder of finished siblings.
- :mod:`~lt_theory.training.preemption`: SLURM's requeue signal while children train after ``fit``; atomic
  checkpoint files.
- :mod:`~lt_theory.training.levels`: IMP's levels as global optimizer steps, a level's divergence, its table.
- :mod:`~lt_theory.training.sparse`: IMP's rewind point, a sparse level restarted from it (in the run, and in a
  child run: the siblings of ``IMPPruner(stability=True)``).
- :mod:`~lt_theory.training.tickets`, :mod:`~lt_theory.training.stored`: ticket files; results and checkpoints
  reused only under the same settings.

The Lightning internals this needs are in :mod:`lt_theory.compat`.
"""

from lt_theory.training.child import (
    SNAPSHOT_RNG_KEY,
    TRAINING_CALLBACKS,
    ChildRun,
    check_child_strategy,
    train_from_snapshot,
)
from lt_theory.training.rng import rng_states, set_rng_states
from lt_theory.training.state import (
    OPTIMIZER_STATES,
    capture_training_state,
    cpu_copy,
    file_sha256,
    restore_training_state,
    save_atomically,
    state_fingerprint,
)

__all__ = [
    "ChildRun",
    "OPTIMIZER_STATES",
    "SNAPSHOT_RNG_KEY",
    "TRAINING_CALLBACKS",
    "capture_training_state",
    "check_child_strategy",
    "cpu_copy",
    "file_sha256",
    "restore_training_state",
    "rng_states",
    "save_atomically",
    "set_rng_states",
    "state_fingerprint",
    "train_from_snapshot",
]
