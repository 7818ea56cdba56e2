"""Test-suite settings: one intra-op thread per process.

The suite runs tiny models, where a second thread gains little, and it starts subprocesses (two DDP ranks,
the recipe, TensorBoard) that would otherwise oversubscribe a 2-core machine: torch threads waiting for a
descheduled peer slowed tests 10-100 times there. Subprocesses inherit the limit through the environment.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
