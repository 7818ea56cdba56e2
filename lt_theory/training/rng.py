"""The global random number generators' states, read and restored through their public APIs.

The states are those of ``torch`` (CPU), ``torch.cuda`` (every device, when CUDA is available), ``numpy``'s
legacy global generator and Python's ``random``, under the keys Lightning's own checkpoints use (``"torch"``,
``"torch.cuda"``, ``"numpy"``, ``"python"``), so a state written by either can be restored by the other. They
hold only tensors and Python numbers (numpy's key as an int64 tensor), so a checkpoint holding them still loads
with ``torch.load(weights_only=True)``, as a requeued ``fit(ckpt_path=None)`` loads it.
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
        ``{"torch": ByteTensor, "numpy": tuple, "python": tuple[, "torch.cuda": list]}``, numpy's tuple with its
        key as a tensor.

    Example:
        >>> states = rng_states()
        >>> first = torch.rand(1)
        >>> set_rng_states(states)
        >>> bool(torch.rand(1) == first)
        True
    """
    kind, key, *rest = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), *(_plain(value) for value in rest)),
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
        kind, key, *rest = states["numpy"]
        key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        np.random.set_state((kind, key.astype(np.uint32), *rest))
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds."""
    return value.item() if isinstance(value, np.generic) else value
