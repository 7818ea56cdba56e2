"""The global random number generators' states, read and restored through their public APIs.

The states are those of ``torch`` (CPU), ``torch.cuda`` (every device, when CUDA is available), ``numpy``'s
legacy global generator and Python's ``random``, under the keys Lightning's own checkpoints use (``"torch"``,
``"torch.cuda"``, ``"numpy"``, ``"python"``), so a state written by either can be restored by the other.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states"]


def rng_states(include_cuda: bool = True) -> dict[str, Any]:
    """The global RNG states of this process.

    Args:
        include_cuda: also the CUDA generators' states (an empty list without CUDA).

    Returns:
        ``{"torch": ByteTensor, "numpy": tuple, "python": tuple[, "torch.cuda": list]}``.

    Example:
        >>> states = rng_states()
        >>> first = torch.rand(1)
        >>> set_rng_states(states)
        >>> bool(torch.rand(1) == first)
        True
    """
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if include_cuda:
        states["torch.cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states returned by :func:`rng_states` (or stored by Lightning); missing keys are left alone.

    Args:
        states: the states, as :func:`rng_states` returns them.
    """
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda"):
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))
