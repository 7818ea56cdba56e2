"""The layers of a model that a measure looks at: every module of some types, or those a user names.

One rule for every measure and callback that takes a ``layers`` argument (SpectralNormMonitor's operator norms,
activation conditioning): the modules of the given types in ``named_modules`` order, or the named ones in the
order given; a model with none, or a name that is not such a layer, is refused with the names that exist.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lt_theory.checks import check_names

__all__ = ["named_layers"]


def named_layers(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    names: Sequence[str] | None = None,
    kind: str = "Linear/Conv",
    purpose: str = "",
) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model``'s modules of ``types``, or of those among them named in ``names``.

    Args:
        model: the network.
        types: the module types that count as layers here.
        names: ``named_modules`` names (kept in the order given), or None for every such layer.
        kind: how the messages call such a layer (e.g. ``"Linear/Conv/BatchNorm"``).
        purpose: what the caller does with them, said when the model has none.

    Returns:
        ``{name: layer}``, in ``named_modules`` order when ``names`` is None.

    Raises:
        ValueError: if ``model`` is not a module, has no such layer, or ``names`` is not a list of their names
            (the message lists the names that exist).

    Example:
        >>> list(named_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), (nn.Linear,)))
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    available = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    if not available:
        raise ValueError(f"found no {kind} layer in {type(model).__name__}; {purpose}".rstrip("; "))
    if names is None:
        return available
    names = check_names("layers", names, "layer names")
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"`layers` names {unknown} that are not {kind} layers; the model has: {list(available)}")
    return {name: available[name] for name in names}
