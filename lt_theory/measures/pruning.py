r"""Magnitude pruning masks for lottery-ticket experiments: which weights to keep, and keeping the rest at zero.

**The lottery ticket hypothesis** (Frankle & Carbin, ICLR 2019, "The Lottery Ticket Hypothesis: Finding
Sparse, Trainable Neural Networks"): a dense network contains sparse subnetworks that, trained in isolation
from the right starting weights, match its accuracy. Iterative magnitude pruning (IMP) finds them: train,
prune the weights of smallest magnitude, rewind the survivors, repeat. For deeper networks the survivors are
rewound to an early step :math:`k` rather than to initialisation (Frankle, Dziugaite, Roy & Carbin,
ICML 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"). This module holds the pure-PyTorch
part: which parameters are pruned, the masks of one pruning level, the random control, and applying and
enforcing masks. Rewinding, levels and logging belong to the ``IMPPruner`` callback.

**Prunable parameters** (:func:`prunable_parameters`). By default the ``weight`` of every ``nn.Linear``
and ``nn.Conv1d/2d/3d`` (subclasses included), output layer included, as in Frankle's ``open_lth``; biases
and normalisation layers never. ``include`` restricts that set, ``exclude`` removes from it (``open_lth``'s
``pruning_layers_to_ignore``).

**One level of magnitude pruning** (:func:`magnitude_masks`). With the current mask :math:`m` (all ones
before the first level) and :math:`R = \sum m` the number of remaining weights, a level prunes

.. math::
    n = \operatorname{round}(p \cdot R)

of the remaining weights, those of smallest :math:`|w|`, where :math:`p \in (0, 1)` is ``fraction``:

- ``scope="global"`` (Frankle et al. 2020; ``open_lth``'s ``sparse_global``): one ranking over the remaining
  entries of all the tensors, :math:`R` their total;
- ``scope="layerwise"`` (Frankle & Carbin 2019 for the small networks): each tensor separately, :math:`n_\ell
  = \operatorname{round}(p R_\ell)`.

``round`` is Python's ``round``, half to even, the rule of ``torch.nn.utils.prune`` for a float ``amount``
(``open_lth`` uses ``ceil``; the two differ by at most one weight per level and scope). The count is exact:
among entries of equal magnitude, the one with the smaller index is pruned first, indices running over the
tensors in the order of the mapping (the model's order for :func:`prunable_parameters`) and within a tensor
in row-major order. Already-pruned entries stay pruned whatever their current value. After :math:`L`
levels of global pruning of :math:`N` weights the remaining count :math:`R_L` follows
:math:`R_{l+1} = R_l - \operatorname{round}(p R_l)` (:func:`remaining_counts`), within :math:`L/2` weights
of the closed form :math:`N (1 - p)^L` (:func:`remaining_fraction_after`): 1000 weights at 20% keep 800, 640,
512, 410, 328, 262, ... The masks depend only on the weights, so ranks of a DDP run holding the same weights
compute the same masks.

**The random control** (:func:`random_masks_like`; Frankle & Carbin 2019, "random pruning"): masks with
exactly the kept count of the given masks in each tensor, positions drawn uniformly from a
``torch.Generator``, never from the global RNG.

**Masks are plain boolean tensors applied in place**, keyed by parameter name (``True`` = kept), not the
``weight_orig`` / ``weight_mask`` reparametrisation of ``torch.nn.utils.prune``. That reparametrisation
replaces the parameter ``weight`` by a new parameter ``weight_orig``, a buffer ``weight_mask`` and a forward
pre-hook: the ``state_dict`` keys change (a step-:math:`k` snapshot of the dense network no longer loads
into the pruned one, and vice versa), an optimizer built before pruning holds a parameter that is no longer
the model's, and the masked weight is recomputed at every forward. A callback that rewinds to a dense
snapshot, checkpoints, and hands the model back unchanged in structure is simpler with masks kept beside the
model and written into the weights: :func:`apply_masks` sets pruned entries to exactly ``0.0``. What is
reused from ``torch.nn.utils.prune`` is its counting rule (above), and its results are the reference of the
tests; ``torch.nn.utils.prune.custom_from_mask`` turns these masks into its reparametrisation where wanted.

**Enforcing masks during training.** An optimizer step moves pruned weights off zero: the gradient of a
zero weight is in general not zero, momentum carries earlier gradients, and weight decay is harmless only
while the weight is zero. Three tools, to be combined as needed:

- :func:`apply_masks` after every optimizer step: pruned weights are exactly zero at every forward, whatever
  the optimizer did. With it alone, the trajectory of the surviving weights of an element-wise optimizer
  (SGD with momentum and weight decay, Adam, AdamW) is the same as if the pruned weights did not exist.
- :func:`mask_gradients` after the backward pass (before gradient clipping and the step): pruned entries
  get zero gradient, so they do not count in a global gradient norm used for clipping, and momentum never
  builds up at pruned positions.
- :func:`mask_optimizer_state`: zeroes the optimizer's per-parameter state (momentum buffers, Adam moments)
  at pruned positions, e.g. right after pruning when the optimizer is kept.

:class:`MaskEnforcer` is :func:`apply_masks` for every step: the masks checked once, then one fused
multi-tensor multiply and addition per call (what the ``IMPPruner`` callback runs after each optimizer step);
its :meth:`~MaskEnforcer.mask_gradients` is :func:`mask_gradients` in the same fused form (what the callback
runs before gradient clipping and each optimizer step).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from numbers import Integral
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lt_theory.checks import check_fraction, check_int, check_names

__all__ = [
    "PRUNABLE_MODULES",
    "PRUNING_SCOPES",
    "MaskEnforcer",
    "SparsityReport",
    "apply_masks",
    "magnitude_masks",
    "mask_gradients",
    "mask_optimizer_state",
    "masks_from_state",
    "masks_to_state",
    "prunable_parameters",
    "random_masks_like",
    "remaining_counts",
    "remaining_fraction_after",
    "sparsity_report",
]

PRUNABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose ``weight`` :func:`prunable_parameters` selects by default."""

PRUNING_SCOPES = ("global", "layerwise")
"""The rankings :func:`magnitude_masks` accepts."""


# ------------------------------------------------------------------------------------------------------------
# Argument checks.


def _check_masks(masks: object, name: str = "masks") -> Mapping[str, Tensor]:
    """``ValueError`` naming ``name`` unless ``masks`` maps names to boolean tensors."""
    if not isinstance(masks, Mapping):
        raise ValueError(
            f"`{name}` must be a mapping of parameter names to bool tensors, got {type(masks).__name__}"
        )
    for key, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"`{name}[{key!r}]` must be a bool tensor, got {got}")
    return masks


def _masked_parameters(
    model: nn.Module, masks: Mapping[str, Tensor], argument: str = "masks"
) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, mask)`` pairs, or ``ValueError`` if a mask names no parameter or has another shape."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    _check_masks(masks, argument)
    params = dict(model.named_parameters())
    pairs = []
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"`{argument}` has {name!r}, which is not a parameter of `model`")
        if mask.shape != params[name].shape:
            raise ValueError(
                f"`{argument}[{name!r}]` has shape {tuple(mask.shape)}, "
                f"the parameter {tuple(params[name].shape)}"
            )
        pairs.append((params[name], mask))
    return pairs


# ------------------------------------------------------------------------------------------------------------
# Which parameters are pruned.


def prunable_parameters(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters that lottery-ticket pruning acts on: the ``weight`` of Linear and Conv layers.

    By default the ``weight`` of every module that is an instance of ``nn.Linear``, ``nn.Conv1d``,
    ``nn.Conv2d`` or ``nn.Conv3d`` (:data:`PRUNABLE_MODULES`), the output layer included; biases and
    normalisation layers are never prunable. A parameter shared by several modules appears once.

    Args:
        model: the network.
        include: names restricting the default set, each the name of a parameter (``"fc.weight"``) or of its
            module (``"fc"``); None keeps the whole default set.
        exclude: names, in the same form, removed from the set (e.g. the output layer); None removes none.

    Returns:
        Parameter name (as in ``model.named_parameters()``) -> parameter, in the model's order.

    Raises:
        ValueError: if ``model`` is not a module or has no prunable parameter; if a name in ``include`` or
            ``exclude`` is not a prunable parameter or module (the message lists the available ones); or if
            nothing is left to prune.

    Example:
        >>> from lt_theory.models import LeNet
        >>> list(prunable_parameters(LeNet()))
        ['features.0.weight', 'features.3.weight', 'classifier.1.weight', 'classifier.3.weight', 'classifier.5.weight']
        >>> list(prunable_parameters(LeNet(), exclude=["classifier.5"]))[-1]
        'classifier.3.weight'
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    found: dict[str, nn.Parameter] = {}
    module_of: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        weight = module._parameters.get("weight") if isinstance(module, PRUNABLE_MODULES) else None
        if isinstance(weight, nn.Parameter) and id(weight) not in seen:
            seen.add(id(weight))
            name = f"{module_name}.weight" if module_name else "weight"
            found[name] = weight
            module_of[name] = module_name
    if not found:
        raise ValueError(
            "`model` has no prunable parameter: it looked for the `weight` of "
            + ", ".join(f"nn.{t.__name__}" for t in PRUNABLE_MODULES)
        )

    def select(names: Iterable[str], argument: str) -> set[str]:
        names = check_names(argument, names, "parameter or module names")
        chosen = set()
        for wanted in names:
            matches = {name for name in found if wanted in (name, module_of[name])}
            if not matches:
                raise ValueError(
                    f"`{argument}` names {wanted!r}, which is not a prunable parameter or module of `model`; "
                    f"the prunable parameters are {sorted(found)}"
                )
            chosen |= matches
        return chosen

    keep = set(found) if include is None else select(include, "include")
    if exclude is not None:
        keep -= select(exclude, "exclude")
    if not keep:
        raise ValueError("`exclude` removes every prunable parameter left by `include`: nothing to prune")
    return {name: p for name, p in found.items() if name in keep}


# ------------------------------------------------------------------------------------------------------------
# Masks.


def _count_to_prune(fraction: float, remaining: int) -> int:
    """round(fraction * remaining), half to even, as ``torch.nn.utils.prune`` counts a float ``amount``."""
    return round(fraction * remaining)


def _smallest(scores: Tensor, count: int) -> Tensor:
    """Bool vector marking the ``count`` smallest entries of ``scores``, ties going to the smaller index."""
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count <= 0:
        return chosen
    if count >= scores.numel():
        return chosen.fill_(True)
    threshold = torch.kthvalue(scores, count).values
    chosen = scores < threshold
    ties = torch.nonzero(scores == threshold).flatten()  # in increasing index order
    chosen[ties[: count - int(chosen.sum())]] = True
    return chosen


def magnitude_masks(
    model: nn.Module | Mapping[str, Tensor],
    fraction: float,
    current_masks: Mapping[str, Tensor] | None = None,
    scope: str = "global",
) -> dict[str, Tensor]:
    r"""Masks after one level of magnitude pruning: ``fraction`` of the remaining weights, smallest :math:`|w|`.

    Prunes :math:`\operatorname{round}(p R)` of the :math:`R` entries still kept by ``current_masks``
    (Python's ``round``, half to even), over all the tensors at once (``"global"``) or per tensor with that
    tensor's :math:`R_\ell` (``"layerwise"``). Ties in magnitude go to the smaller index (module docstring);
    entries already pruned stay pruned, whatever their current value. Nothing is modified: apply the result
    with :func:`apply_masks`.

    Args:
        model: a module, whose :func:`prunable_parameters` are pruned, or a mapping of names to tensors
            (e.g. ``prunable_parameters(model, include=...)`` or weights taken from a state dict).
        fraction: :math:`p`, the fraction of the remaining weights to prune, in (0, 1).
        current_masks: the masks of the previous level (bool, ``True`` = kept), with exactly the keys and
            shapes of the pruned tensors; None for the first level (all kept).
        scope: ``"global"`` or ``"layerwise"``.

    Returns:
        Name -> new bool mask (``True`` = kept) on the tensor's device, in the order of the tensors. The
        input masks are not modified.

    Raises:
        ValueError: if ``fraction`` is not in (0, 1); ``scope`` is not ``"global"`` or ``"layerwise"``;
            ``model`` is neither a module nor a non-empty mapping of names to floating tensors;
            ``current_masks`` is not a mapping of bool tensors with the keys and shapes of the tensors; or a
            remaining (unpruned) entry is NaN or infinite (its magnitude has no rank).

    Example:
        >>> import torch
        >>> weights = {"a": torch.tensor([0.5, -0.1, 0.3]), "b": torch.tensor([0.05, -0.9])}
        >>> masks = magnitude_masks(weights, fraction=0.4)  # prunes round(0.4 * 5) = 2
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True], [False, True])
        >>> magnitude_masks(weights, 0.4, current_masks=masks)["a"].tolist()  # round(0.4 * 3) = 1 more
        [True, False, False]
    """
    fraction = check_fraction("fraction", fraction, low_open=True, high_open=True)
    if scope not in PRUNING_SCOPES:
        raise ValueError(f"`scope` must be one of {PRUNING_SCOPES}, got {scope!r}")
    if isinstance(model, nn.Module):
        tensors: Mapping[str, Tensor] = prunable_parameters(model)
    elif isinstance(model, Mapping) and model:
        tensors = model
        for name, t in tensors.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"`model[{name!r}]` must be a floating tensor, got {got}")
    else:
        raise ValueError(
            f"`model` must be a torch.nn.Module or a non-empty mapping of names to tensors, got {model!r}"
        )

    if current_masks is None:
        current = {
            name: torch.ones(t.shape, dtype=torch.bool, device=t.device) for name, t in tensors.items()
        }
    else:
        _check_masks(current_masks, "current_masks")
        if set(current_masks) != set(tensors):
            raise ValueError(
                "`current_masks` must have exactly the keys of the pruned tensors: missing "
                f"{sorted(set(tensors) - set(current_masks))}, unexpected {sorted(set(current_masks) - set(tensors))}"
            )
        current = {}
        for name, t in tensors.items():
            mask = current_masks[name]
            if mask.shape != t.shape:
                raise ValueError(
                    f"`current_masks[{name!r}]` has shape {tuple(mask.shape)}, the tensor {tuple(t.shape)}"
                )
            current[name] = mask.to(t.device)

    scores = {}  # |w| of the remaining entries, flattened in row-major order
    with torch.no_grad():
        for name, t in tensors.items():
            alive = t.detach()[current[name]]
            if not torch.isfinite(alive).all():
                raise ValueError(
                    f"`model` has NaN or infinite remaining weights in {name!r}: cannot rank them"
                )
            scores[name] = alive.abs()

        if scope == "layerwise":
            pruned = {name: _smallest(s, _count_to_prune(fraction, s.numel())) for name, s in scores.items()}
        else:
            dtype = functools.reduce(torch.promote_types, (s.dtype for s in scores.values()))
            device = next(iter(scores.values())).device
            flat = torch.cat([s.to(device=device, dtype=dtype) for s in scores.values()])
            chosen = _smallest(flat, _count_to_prune(fraction, flat.numel()))
            pruned = dict(zip(scores, torch.split(chosen, [s.numel() for s in scores.values()])))

        masks = {}
        for name, t in tensors.items():
            mask = current[name].clone()
            mask[current[name]] = ~pruned[name].to(t.device)
            masks[name] = mask
    return masks


def random_masks_like(masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Random masks with exactly the kept count of ``masks`` in every tensor: the random-pruning control.

    For each tensor with :math:`n` entries of which :math:`k` are kept, the kept positions are the first
    :math:`k` of a uniform random permutation of the :math:`n` positions (``torch.randperm``), drawn from
    ``generator`` for the tensors in the order of ``masks``; the global RNG is never used. The same
    generator state gives the same masks.

    Args:
        masks: name -> bool mask (``True`` = kept), e.g. the masks of an IMP level.
        generator: the source of randomness; a CPU or CUDA ``torch.Generator``.

    Returns:
        Name -> new bool mask with the shape, device and kept count of the given one.

    Raises:
        ValueError: if ``masks`` is not a mapping of bool tensors or ``generator`` is not a
            ``torch.Generator``.

    Example:
        >>> import torch
        >>> masks = {"w": torch.tensor([True, False, False, True, True])}
        >>> control = random_masks_like(masks, torch.Generator().manual_seed(0))
        >>> int(control["w"].sum())
        3
    """
    _check_masks(masks)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
    out = {}
    for name, mask in masks.items():
        kept = int(mask.sum())
        order = torch.randperm(mask.numel(), generator=generator, device=generator.device)
        flat = torch.zeros(mask.numel(), dtype=torch.bool, device=generator.device)
        flat[order[:kept]] = True
        out[name] = flat.view(mask.shape).to(mask.device)
    return out


# ------------------------------------------------------------------------------------------------------------
# Applying and enforcing masks.


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Set the pruned entries of the model's parameters to exactly ``0.0``, in place.

    ``param.masked_fill_(~mask, 0.0)`` under ``torch.no_grad()``: the parameter objects, their
    ``requires_grad`` and the ``state_dict`` keys are unchanged, so optimizers and snapshots stay valid.
    Unlike multiplying by the mask, it also clears NaN or infinite pruned entries and never leaves ``-0.0``.
    Call it after each optimizer step to keep pruned weights at zero (module docstring); its cost is one
    element-wise pass over the masked parameters.

    Args:
        model: the network.
        masks: parameter name -> bool mask of the parameter's shape (``True`` = kept).

    Raises:
        ValueError: if ``model`` is not a module, or ``masks`` is not a mapping of bool tensors naming
            parameters of ``model`` with their shapes.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> apply_masks(layer, {"weight": torch.tensor([[True, False, True]])})
        >>> layer.weight[0, 1].item()
        0.0
    """
    with torch.no_grad():
        for param, mask in _masked_parameters(model, masks):
            param.masked_fill_(~mask.to(param.device), 0.0)


class MaskEnforcer:
    """:func:`apply_masks` for every optimizer step: the masks are checked once, then one fused pass per call.

    :func:`apply_masks` looks the parameters up and checks the masks at every call and launches one kernel per
    tensor; on a GPU that costs more than the work itself for a small network. An enforcer checks the masks
    once, keeps them as ``0.0 / 1.0`` tensors of each parameter's dtype and device, and each call multiplies all
    the masked parameters in place with one ``torch._foreach_mul_`` (the multi-tensor kernel of the
    ``foreach`` optimizers), followed by one ``torch._foreach_add_(parameters, 0.0)``. Kept entries are
    multiplied by ``1.0`` and added ``0.0``, and so unchanged bit for bit; pruned entries become ``+0.0``
    (the multiply leaves ``-0.0`` where the weight was negative, and ``-0.0 + 0.0 = +0.0``), as with
    :func:`apply_masks`. Unlike :func:`apply_masks` it does not clear a NaN or infinite pruned entry
    (``nan * 0`` is NaN), which arises only when training diverges; use :func:`apply_masks` after pruning or
    rewinding. :meth:`mask_gradients` is :func:`mask_gradients` in the same fused form. It holds one mask per
    parameter in the parameter's dtype: as much memory as the masked weights.

    Args:
        model: the network; the enforcer keeps references to its parameter objects.
        masks: parameter name -> bool mask of the parameter's shape (``True`` = kept).

    Raises:
        ValueError: as :func:`apply_masks`.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> enforce = MaskEnforcer(layer, {"weight": torch.tensor([[True, False, True]])})
        >>> enforce()
        >>> layer.weight[0, 1].item() == 0.0
        True
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        pairs = _masked_parameters(model, masks)
        self.parameters = [param for param, _ in pairs]
        self.keep = [mask.to(device=param.device, dtype=param.dtype) for param, mask in pairs]

    def __call__(self) -> None:
        """Multiply every masked parameter by its mask, in place, then turn the pruned ``-0.0`` into ``+0.0``."""
        if self.parameters:
            with torch.no_grad():
                torch._foreach_mul_(self.parameters, self.keep)
                torch._foreach_add_(self.parameters, 0.0)

    def mask_gradients(self) -> None:
        """Multiply the gradient of every masked parameter by its mask, in place (one fused multiply).

        The fused form of :func:`mask_gradients`, for the point after the backward pass and before gradient
        clipping and the optimizer step; parameters without ``.grad`` are skipped. A pruned entry's gradient
        becomes ``0.0`` or ``-0.0``, which count as zero in a norm and in the optimizer's update.
        """
        pairs = [(p.grad, keep) for p, keep in zip(self.parameters, self.keep) if p.grad is not None]
        if pairs:
            with torch.no_grad():
                torch._foreach_mul_([g for g, _ in pairs], [keep for _, keep in pairs])


def mask_gradients(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Set the gradient of pruned entries to exactly ``0.0``, in place; parameters without ``.grad`` are skipped.

    Call it after the backward pass and before gradient clipping and the optimizer step: pruned entries then
    do not count in a gradient norm, and with SGD (momentum, weight decay), Adam or AdamW a pruned weight that
    is zero stays exactly zero through the step.

    Args:
        model: the network.
        masks: parameter name -> bool mask of the parameter's shape (``True`` = kept).

    Raises:
        ValueError: as :func:`apply_masks`.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> mask_gradients(layer, {"weight": torch.tensor([[True, False]])})
        >>> layer.weight.grad.tolist()
        [[1.0, 0.0]]
    """
    with torch.no_grad():
        for param, mask in _masked_parameters(model, masks):
            if param.grad is not None:
                param.grad.masked_fill_(~mask.to(param.grad.device), 0.0)


def mask_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, Tensor]
) -> int:
    """Zero the optimizer's per-parameter state at pruned positions, in place.

    Every tensor in ``optimizer.state[param]`` with the parameter's shape (SGD's ``momentum_buffer``, Adam's
    ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``, ...) gets ``0.0`` where the mask is ``False``; scalars
    such as ``step`` and tensors of other shapes are left alone, as are parameters the optimizer has no state
    for yet.

    Args:
        optimizer: the optimizer training ``model``.
        model: the network.
        masks: parameter name -> bool mask of the parameter's shape (``True`` = kept).

    Returns:
        The number of state tensors written.

    Raises:
        ValueError: if ``optimizer`` is not a ``torch.optim.Optimizer``, or as :func:`apply_masks`.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> opt.step()
        >>> mask_optimizer_state(opt, layer, {"weight": torch.tensor([[True, False]])})
        1
        >>> opt.state[layer.weight]["momentum_buffer"].tolist()
        [[1.0, 0.0]]
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    written = 0
    with torch.no_grad():
        for param, mask in _masked_parameters(model, masks):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.masked_fill_(~mask.to(value.device), 0)
                    written += 1
    return written


# ------------------------------------------------------------------------------------------------------------
# Counting, and checkpointing.


class SparsityReport(NamedTuple):
    """How much of each masked tensor, and of all of them, is kept (:func:`sparsity_report`)."""

    remaining_fraction: float
    """Kept entries over all entries of all the masks."""
    remaining: int
    """Kept entries, all masks together."""
    total: int
    """Entries, all masks together."""
    layer_remaining_fraction: dict[str, float]
    """Name -> kept fraction of that tensor (its sparsity is one minus it)."""
    layer_remaining: dict[str, int]
    """Name -> kept entries of that tensor."""
    layer_total: dict[str, int]
    """Name -> entries of that tensor."""


def sparsity_report(masks: Mapping[str, Tensor]) -> SparsityReport:
    """Kept counts and fractions of each mask and of all of them together.

    Args:
        masks: name -> bool mask (``True`` = kept).

    Returns:
        A :class:`SparsityReport`. An empty tensor has a kept fraction of NaN; an empty mapping gives NaN for
        the global fraction.

    Raises:
        ValueError: if ``masks`` is not a mapping of bool tensors.

    Example:
        >>> import torch
        >>> report = sparsity_report({"a": torch.tensor([True, False]), "b": torch.tensor([True, True])})
        >>> report.remaining_fraction, report.layer_remaining_fraction
        (0.75, {'a': 0.5, 'b': 1.0})
    """
    _check_masks(masks)
    kept = {name: int(mask.sum()) for name, mask in masks.items()}
    sizes = {name: mask.numel() for name, mask in masks.items()}
    fractions = {name: kept[name] / sizes[name] if sizes[name] else float("nan") for name in masks}
    remaining, total = sum(kept.values()), sum(sizes.values())
    return SparsityReport(
        remaining_fraction=remaining / total if total else float("nan"),
        remaining=remaining,
        total=total,
        layer_remaining_fraction=fractions,
        layer_remaining=kept,
        layer_total=sizes,
    )


def remaining_fraction_after(levels: int, fraction: float) -> float:
    """The closed form :math:`(1 - p)^L` of the fraction kept after ``levels`` levels of pruning ``fraction``.

    Exact counts differ by the rounding of each level (at most half a weight per level and per tensor
    ranked): see :func:`remaining_counts`.

    Args:
        levels: :math:`L`, the number of pruning levels, >= 0.
        fraction: :math:`p`, the fraction of the remaining weights pruned per level, in (0, 1).

    Returns:
        :math:`(1 - p)^L`.

    Raises:
        ValueError: if ``levels`` is not an int >= 0 or ``fraction`` is not in (0, 1).

    Example:
        >>> round(remaining_fraction_after(3, 0.2), 6)
        0.512
    """
    levels = check_int("levels", levels, 0)
    return (1.0 - check_fraction("fraction", fraction, low_open=True, high_open=True)) ** levels


def remaining_counts(total: int, levels: int, fraction: float) -> list[int]:
    r"""Exact kept counts, level by level, of :func:`magnitude_masks` ranking ``total`` entries together.

    :math:`R_0 = N`, :math:`R_{l+1} = R_l - \operatorname{round}(p R_l)` (half to even): the counts of
    global pruning, or of one tensor under layer-wise pruning.

    Args:
        total: :math:`N`, the number of prunable entries, >= 0.
        levels: :math:`L`, the number of pruning levels, >= 0.
        fraction: :math:`p`, in (0, 1).

    Returns:
        ``[R_0, R_1, ..., R_L]``.

    Raises:
        ValueError: if ``total`` or ``levels`` is not an int >= 0 or ``fraction`` is not in (0, 1).

    Example:
        >>> remaining_counts(1000, 5, 0.2)
        [1000, 800, 640, 512, 410, 328]
    """
    if isinstance(total, bool) or not isinstance(total, Integral) or total < 0:
        raise ValueError(f"`total` must be an int >= 0, got {total!r}")
    levels = check_int("levels", levels, 0)
    fraction = check_fraction("fraction", fraction, low_open=True, high_open=True)
    counts = [int(total)]
    for _ in range(levels):
        counts.append(counts[-1] - _count_to_prune(fraction, counts[-1]))
    return counts


def masks_to_state(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of the masks fit for a checkpoint: a plain dict of contiguous CPU bool tensors.

    Args:
        masks: name -> bool mask.

    Returns:
        Name -> CPU bool tensor (a copy), in the same order.

    Raises:
        ValueError: if ``masks`` is not a mapping of bool tensors.

    Example:
        >>> import torch
        >>> masks_to_state({"w": torch.tensor([True, False])})
        {'w': tensor([ True, False])}
    """
    _check_masks(masks)
    return {name: mask.detach().to("cpu", copy=True).contiguous() for name, mask in masks.items()}


def masks_from_state(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Masks read back from :func:`masks_to_state`, checked against ``model`` and moved to its parameters' devices.

    Args:
        state: name -> bool tensor, as saved.
        model: the network the masks belong to.

    Returns:
        Name -> bool mask on the device of the parameter of that name.

    Raises:
        ValueError: if ``state`` is not a mapping of bool tensors, or names something that is not a parameter
            of ``model`` or has another shape than it.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> masks_from_state({"weight": torch.tensor([[True, False]])}, layer)
        {'weight': tensor([[ True, False]])}
    """
    pairs = _masked_parameters(model, state, "state")
    return {name: mask.to(param.device) for name, (param, mask) in zip(state, pairs)}
