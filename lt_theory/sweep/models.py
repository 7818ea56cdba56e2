"""The networks of a sweep: importing a class path, naming a ``model.net`` spec, counting parameters."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn


def import_object(class_path: str, name: str) -> Callable:
    """The class or function a dotted path names.

    Args:
        class_path: e.g. ``"lt_theory.models.MLP"``.
        name: the config key it came from, for the message.

    Returns:
        The class or function.

    Raises:
        ValueError: naming ``name``, when the path cannot be imported or is not callable.
    """
    module_name, _, attribute = class_path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"`{name}` must be an importable class or function path, got {class_path!r}: {error}"
        ) from None
    if not callable(factory):
        raise ValueError(f"`{name}` must name a class or function, got {class_path!r}")
    return factory


def net_name(spec: Any) -> str:
    """The class path of a ``model.net`` spec, with those of the networks it wraps in parentheses.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``.

    Returns:
        The name.

    Example:
        >>> net_name({"class_path": "lt_theory.models.PooledInput",
        ...           "init_args": {"pool": 8, "net": {"class_path": "lt_theory.models.MLP"}}})
        'lt_theory.models.PooledInput(lt_theory.models.MLP)'
    """
    if not isinstance(spec, Mapping):
        return str(spec)
    inner = [
        net_name(v)
        for v in (spec.get("init_args") or {}).values()
        if isinstance(v, Mapping) and "class_path" in v
    ]
    return str(spec.get("class_path")) + (f"({', '.join(inner)})" if inner else "")


def num_parameters(model: nn.Module) -> int:
    """The number of entries of the model's parameters.

    Args:
        model: the network.

    Returns:
        The count.
    """
    return sum(p.numel() for p in model.parameters())
