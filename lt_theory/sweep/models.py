"""The model family of a sweep: a class or function with a width argument, built at one width."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn


def import_object(class_path: str, name: str) -> Callable:
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


def build_model(
    class_path: str,
    width_arg: str,
    width: int,
    init_args: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    input_pool: int = 1,
) -> nn.Module:
    """A model of the family at one width: ``factory(**init_args, <width_arg>=width)``.

    A sequence-valued width argument (the ``hidden`` of :class:`lt_theory.models.MLP`) gets every entry set
    to the width, keeping the length of ``init_args[width_arg]`` if given, else of the factory's default:
    ``MLP`` with ``hidden`` becomes ``MLP(hidden=(w,))``, and with ``init_args={"hidden": [0, 0]}``,
    ``MLP(hidden=[w, w])``. ``num_classes`` is passed when the factory takes it and ``init_args`` does not
    set it.

    Args:
        class_path: the model class or factory function, e.g. ``"lt_theory.models.PreActResNet18"``.
        width_arg: the name of its width argument, e.g. ``"k"``.
        width: the width, an int >= 1.
        init_args: the other arguments.
        num_classes: the number of classes of the data.
        input_pool: average-pool the input images by this factor (``nn.AvgPool2d``) before the model, a
            CPU-sized stand-in for full resolution (no parameters: the counts are unchanged); 1 for none.

    Returns:
        The model (``nn.Sequential(nn.AvgPool2d(input_pool), model)`` when ``input_pool > 1``).

    Raises:
        ValueError: if ``class_path`` cannot be imported, the factory has no argument ``width_arg``,
            ``init_args`` sets a scalar ``width_arg``, the factory does not return an ``nn.Module``, or
            ``input_pool`` is not an int >= 1.

    Example:
        >>> build_model("lt_theory.models.MLP", "hidden", 3, {"in_shape": [4]}, num_classes=2)
        MLP(...)
    """
    if isinstance(input_pool, bool) or not isinstance(input_pool, int) or input_pool < 1:
        raise ValueError(f"`model.input_pool` must be an int >= 1, got {input_pool!r}")
    factory = import_object(class_path, "model.class_path")
    init_args = dict(init_args or {})
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if width_arg not in parameters and not takes_kwargs:
        raise ValueError(
            f"`model.width_arg` must name an argument of {class_path}, got {width_arg!r}; "
            f"it takes {sorted(parameters)}"
        )
    template = init_args.get(width_arg)
    if template is None and width_arg in parameters:
        template = parameters[width_arg].default
    if isinstance(template, (list, tuple)):
        init_args[width_arg] = type(template)([width] * max(1, len(template)))
    elif width_arg in init_args:
        raise ValueError(
            f"`model.init_args` must not set the swept width argument {width_arg!r} (got {template!r}); "
            "the sweep sets it (a list value is kept as a template of its length)"
        )
    else:
        init_args[width_arg] = width
    if num_classes is not None and "num_classes" in parameters and "num_classes" not in init_args:
        init_args["num_classes"] = num_classes
    model = factory(**init_args)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"`model.class_path` must build a torch.nn.Module, {class_path} gave {type(model).__name__}"
        )
    return model if input_pool == 1 else nn.Sequential(nn.AvgPool2d(input_pool), model)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
