r"""Linear interpolation between two networks: loss and error along the path, barriers, BatchNorm statistics.

**The path.** Two networks of one architecture with weights :math:`\theta_a, \theta_b` are joined by the
straight line

.. math::
    \theta(\alpha) = (1 - \alpha)\, \theta_a + \alpha\, \theta_b, \qquad \alpha \in [0, 1],

applied to every floating entry of the state dicts (parameters, and floating buffers where asked), computed
exactly as written, in the entries' dtype (at least float32), so :math:`\theta(0) = \theta_a` and
:math:`\theta(1) = \theta_b` bit for bit. Integer entries (BatchNorm's ``num_batches_tracked``) cannot be
interpolated: they are taken from the nearer endpoint (``state_a`` for :math:`\alpha \le 1/2`, ``state_b``
above), which keeps both endpoints exact. :func:`linear_path` evaluates the mean loss and the error (fraction
misclassified) at each :math:`\alpha` of a grid, endpoints included (30 points by default, as Frankle et al.
use). Between two networks trained from one starting point it is the instability analysis of Frankle,
Dziugaite, Roy & Carbin (ICML 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"); between
the initial and the current weights, the 1-D section of Goodfellow, Vinyals & Saxe (ICLR 2015,
"Qualitatively characterizing neural network optimization problems").

**Barrier.** Frankle et al.'s error barrier (the height of the linear path above its ends) is

.. math::
    B = \max_\alpha E(\alpha) - \tfrac12 \big(E(0) + E(1)\big),

:func:`error_barrier`, applied alike to the error and to the loss. Since the maximum includes the endpoints,
:math:`B \ge |E(0) - E(1)| / 2 \ge 0`, with equality when the path never rises above its higher end (e.g. a
loss convex in :math:`\alpha`, as cross-entropy is for a linear classifier). It is not the barrier of
Entezari, Sedghi, Saukh & Neyshabur (ICLR 2022, "The Role of Permutation Invariance in Linear Mode
Connectivity of Neural Networks"), :math:`\max_\alpha [E(\alpha) - (1-\alpha)E(0) - \alpha E(1)]`, which is
at most 0 for a convex path. Frankle et al. call a network *stable* at the step :math:`k` where two copies
were spawned when the error barrier of their trained results is under 2% (within the noise of the error);
:func:`stable_point` returns the first such :math:`k`.

**BatchNorm.** The running statistics of the interpolated network are not the interpolated running
statistics: the activations of :math:`\theta(\alpha)` have their own mean and variance (their variance
collapses in the middle of the path between independently trained networks; Jordan, Sedghi, Saukh, Entezari
& Neyshabur, ICLR 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair"). With
``bn="reset"`` (the default), :func:`linear_path` re-estimates them at each :math:`\alpha` by
:func:`reset_batchnorm_statistics`: one pass over batches (training batches, as the statistics of a trained
network are), with every ``_BatchNorm`` module normalising by the batch statistics (train mode) and every
other module in eval mode (dropout off), the statistics then replacing the running ones. Two estimators:

- ``method="exact"``: the statistics of the BatchNorm input over all the examples of all the batches,
  :math:`\mu_c = \frac1n \sum_i x_{ic}` and the unbiased :math:`\sigma_c^2 = \frac{1}{n-1}\sum_i (x_{ic} -
  \mu_c)^2` (what torch keeps in ``running_var``), with :math:`i` over examples and spatial positions;
  each batch's mean and unbiased variance, which the BatchNorm forward computes anyway (read with
  ``momentum=1``; a ``SyncBatchNorm``'s input goes through ``torch.var_mean`` instead), are merged in
  float64 by the pairwise formula of Chan, Golub & LeVeque (1979),
  :math:`M_{AB} = M_A + M_B + \delta^2 n_A n_B / (n_A + n_B)`.
- ``method="cumulative"``: torch's cumulative moving average (``momentum=None``), what
  ``torch.optim.swa_utils.update_bn`` and REPAIR's code do: the mean over batches of the batch means and of
  the batch unbiased variances. The mean is exact when all batches have one size; the variance misses the
  spread of the batch means, :math:`\sigma^2 = \frac{1}{n-1} \sum_b [(n_b - 1)s_b^2 + n_b (m_b - \mu)^2]`.
  (``update_bn`` itself is not reused: it puts the whole model in train mode, so dropout draws from the
  global RNG and changes the activations, and it restores only the top module's flag.)

With ``bn="reset"`` the endpoints are model_a and model_b *with re-estimated statistics*, not the models as
they are; with ``bn="interpolate"`` the floating buffers are interpolated like the parameters and the
endpoints reproduce model_a's and model_b's own evaluations exactly.

**Not perturbing the models.** :func:`linear_path` and :func:`loss_and_error` evaluate in eval mode under
``torch.no_grad`` and ``torch.random.fork_rng``; :func:`linear_path` works on a scratch copy, so the two
models' parameters, buffers, ``.grad``, train/eval flags and the global RNG state are left as they were. A
``DataLoader`` without a ``generator`` draws its seeds from the global RNG each time it is iterated; inside
the fork that draw is undone, so such a loader that shuffles yields the same order at every :math:`\alpha`
(and the caller's global RNG does not move). A row of outputs with a NaN or an Inf counts as misclassified
and makes the loss NaN or Inf (:mod:`lt_theory.measures.evaluation`'s rule for a diverged network); NaN
values give a NaN barrier, never an exception.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_theory.checks import check_finite_real, check_positive_int
from lt_theory.measures.evaluation import evaluate, model_device
from lt_theory.measures.modes import eval_mode, forked_rng

__all__ = [
    "BN_MODES",
    "LinearPath",
    "LossAndError",
    "error_barrier",
    "interpolate_state",
    "linear_path",
    "linear_paths",
    "loss_and_error",
    "paths_record",
    "reset_batchnorm_statistics",
    "stable_point",
]

BN_MODES = ("reset", "interpolate")
"""How :func:`linear_path` sets the BatchNorm running statistics at each point of the path."""

_BUFFER_MODES = ("interpolate", "a", "b")
_RESET_METHODS = ("exact", "cumulative")
DEFAULT_NUM_ALPHAS = 30
"""Points of the default grid of :func:`linear_path`, endpoints included (Frankle et al., 2020)."""

State = Mapping[str, Tensor]


class LossAndError(NamedTuple):
    """Result of :func:`loss_and_error`.

    Attributes:
        loss: mean loss over the examples (NaN or Inf if an output was not finite).
        error: fraction of the examples misclassified, in [0, 1] (a row with a non-finite output is wrong).
        num_examples: examples evaluated.
    """

    loss: float
    error: float
    num_examples: int


class LinearPath(NamedTuple):
    """Result of :func:`linear_path`.

    Attributes:
        alphas: ``(n,)`` float64 interpolation coefficients, ``alphas[0] = 0`` (model_a), ``alphas[-1] = 1``.
        loss: ``(n,)`` float64 mean loss over the examples at each alpha.
        error: ``(n,)`` float64 fraction misclassified at each alpha.
        bn: the BatchNorm mode used, ``"reset"`` or ``"interpolate"``.
        num_examples: examples evaluated at each alpha.
    """

    alphas: Tensor
    loss: Tensor
    error: Tensor
    bn: str
    num_examples: int


# ------------------------------------------------------------------------------------------------------------
# Argument checks and small helpers.


def _is_interpolable(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _state(source: object, name: str) -> dict[str, Tensor]:
    """The detached state dict of a module, or the mapping itself checked to hold only tensors."""
    if isinstance(source, nn.Module):
        return {key: value.detach() for key, value in source.state_dict().items()}
    if not isinstance(source, Mapping):
        raise ValueError(f"`{name}` must be a torch.nn.Module or a state dict, got {type(source).__name__}")
    for key, value in source.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"`{name}` must map names to tensors; entry {key!r} is a {type(value).__name__}")
    return {key: value.detach() for key, value in source.items()}


def _check_compatible(state_a: State, state_b: State, name_a: str, name_b: str) -> None:
    """``ValueError`` naming ``name_b`` unless the two state dicts have the same keys, shapes and dtypes."""
    missing = [key for key in state_a if key not in state_b]
    extra = [key for key in state_b if key not in state_a]
    if missing or extra:
        raise ValueError(
            f"`{name_b}` must have the entries of `{name_a}`: missing {missing[:5]}, unexpected {extra[:5]}"
            + (" (first 5 shown)" if len(missing) > 5 or len(extra) > 5 else "")
        )
    for key, a in state_a.items():
        b = state_b[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"`{name_b}` must match `{name_a}` entry by entry: {key!r} is {tuple(b.shape)} {b.dtype} in "
                f"`{name_b}` but {tuple(a.shape)} {a.dtype} in `{name_a}`"
            )


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules (any dimension, SyncBatchNorm included) that keep running statistics."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and isinstance(module.running_mean, Tensor)
        and not isinstance(module.running_mean, nn.parameter.UninitializedBuffer)
    ]


def _inputs(batch: object, name: str) -> Tensor:
    """The inputs of a batch: the batch itself if a tensor, else its first element."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(
        f"`{name}` must yield tensors of inputs or (inputs, ...) tuples/lists, got a {type(batch).__name__}"
    )


# ------------------------------------------------------------------------------------------------------------
# Interpolation of weights.


def interpolate_state(
    state_a: nn.Module | State,
    state_b: nn.Module | State,
    alpha: float,
    buffers: str = "interpolate",
) -> dict[str, Tensor]:
    r"""The state dict ``theta(alpha) = (1 - alpha) * theta_a + alpha * theta_b`` of two compatible networks.

    Every floating (or complex) entry is interpolated by the formula as written, in its dtype (half
    precision is computed in float32 and cast back); ``alpha = 0`` and ``alpha = 1`` return exact copies of
    the endpoints. Integer and boolean entries (BatchNorm's ``num_batches_tracked``) are taken from the nearer
    endpoint: ``state_a`` for ``alpha <= 0.5``, ``state_b`` above. ``alpha`` outside [0, 1] extrapolates.

    Args:
        state_a: the network at ``alpha = 0``: a module or its state dict.
        state_b: the network at ``alpha = 1``: a module or a state dict with the same keys, shapes and dtypes.
            Its tensors are moved to the device of ``state_a``'s.
        alpha: the interpolation coefficient, a finite real number.
        buffers: ``"interpolate"`` (floating buffers are interpolated like the parameters), ``"a"`` or ``"b"``
            (every buffer is copied from that endpoint, as loss-landscapes does). ``"a"`` and ``"b"`` need to
            know which entries are buffers: ``state_a`` or ``state_b`` must then be a module.

    Returns:
        A new state dict in ``state_a``'s key order, on ``state_a``'s devices, sharing no memory with the
        inputs; load it with ``model.load_state_dict``.

    Raises:
        ValueError: if ``alpha`` is not a finite real number; ``buffers`` is not one of the three modes, or is
            ``"a"``/``"b"`` with two state dicts; an argument is neither a module nor a mapping to tensors; or
            the two have different keys, shapes or dtypes (the message names ``state_b``).

    Example:
        >>> import torch
        >>> a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
        >>> b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(5)}
        >>> interpolate_state(a, b, 0.25)
        {'w': tensor([1., 2.]), 'n': tensor(3)}
    """
    alpha = check_finite_real("alpha", alpha)
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"`buffers` must be one of {_BUFFER_MODES}, got {buffers!r}")
    buffer_names: set[str] = set()
    if buffers != "interpolate":
        modules = [source for source in (state_a, state_b) if isinstance(source, nn.Module)]
        if not modules:
            raise ValueError(
                f"`buffers={buffers!r}` needs to tell buffers from parameters: pass a module as `state_a` or "
                "`state_b`, not two state dicts"
            )
        buffer_names = {name for name, _ in modules[0].named_buffers()}
    a = _state(state_a, "state_a")
    b = _state(state_b, "state_b")
    _check_compatible(a, b, "state_a", "state_b")

    result: dict[str, Tensor] = {}
    for key, ta in a.items():
        tb = b[key].to(ta.device)
        if key in buffer_names:
            source = ta if buffers == "a" else tb
        elif not _is_interpolable(ta):
            source = ta if alpha <= 0.5 else tb
        elif alpha == 0.0:
            source = ta
        elif alpha == 1.0:
            source = tb
        else:
            low_precision = ta.dtype in (torch.float16, torch.bfloat16)
            work_a, work_b = (ta.float(), tb.float()) if low_precision else (ta, tb)
            result[key] = ((1.0 - alpha) * work_a + alpha * work_b).to(ta.dtype)
            continue
        result[key] = source.clone()
    return result


# ------------------------------------------------------------------------------------------------------------
# BatchNorm statistics.


class _PooledStatistics:
    """Per-channel count, mean and sum of squared deviations of a BatchNorm's inputs, merged in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def from_running(self, module: nn.Module, args: tuple, output: object) -> None:
        """Forward hook of a BatchNorm with ``momentum=1``: its running statistics are this batch's own."""
        count = args[0].numel() // args[0].shape[1]
        mean = module.running_mean.to(torch.float64, copy=True)  # the buffer is overwritten by the next batch
        self.add(count, mean, module.running_var.to(torch.float64) * (count - 1))  # running_var is unbiased

    def from_input(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: the statistics of the input, in one fused pass in its precision (>= float32)."""
        x = args[0].detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.ndim)], correction=0)
        self.add(count, mean.to(torch.float64), var.to(torch.float64) * count)

    def add(self, count: int, mean: Tensor, m2: Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total


def reset_batchnorm_statistics(
    model: nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    method: str = "exact",
    transform: Callable[[Tensor], Tensor] | None = None,
) -> nn.Module:
    r"""Re-estimate the running statistics of every BatchNorm module of ``model`` in place, in one data pass.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` with ``track_running_stats=True`` (BatchNorm1d/2d/3d,
    SyncBatchNorm, the lazy ones once initialised) normalises by the batch statistics (train mode) while every
    other module is in eval mode (no dropout); the statistics of each BatchNorm's input over the batches then
    replace ``running_mean`` and ``running_var`` (unbiased), and ``num_batches_tracked`` becomes the number of
    batches. ``method="exact"`` pools all the examples; ``"cumulative"`` averages the per-batch statistics as
    torch's ``momentum=None`` does (see the module docstring for the difference). Afterwards every module's
    train/eval flag and every BatchNorm's ``momentum`` are as they were (also on error, when the running
    statistics are restored too); the forward runs under ``torch.no_grad`` and ``torch.random.fork_rng``, so
    ``.grad`` and the global RNG state are untouched. The order of the batches is the loader's: a loader that
    shuffles without its own ``generator`` gives an order drawn from (a fork of) the global RNG. A model
    without such BatchNorm modules is left as it is and ``loader`` is not iterated; a BatchNorm the forward
    never reaches keeps its statistics. A ``SyncBatchNorm`` in an initialised process group synchronises the
    batch statistics during the pass, so every rank must call this; the ``"exact"`` statistics are still
    pooled over the calling rank's batches only. A batch of a single example is left out when the model has
    a ``BatchNorm1d`` (batch statistics of one value per channel do not exist; a last, short batch of a
    loader can be one).

    Args:
        model: the network, modified in place.
        loader: an iterable of batches (a ``DataLoader``, a list): each batch a tensor of inputs or a tuple
            or list whose first element is the inputs. Inputs are moved to the device of ``model``'s first
            parameter or buffer.
        num_batches: use only the first ``num_batches`` batches (all of them, fewer if the loader runs out);
            None for the whole loader.
        method: ``"exact"`` or ``"cumulative"``.
        transform: applied to each batch of inputs once on the device (e.g. the data module's
            normalisation), or None.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: if ``model`` is not a module; ``num_batches`` is not a positive int or None; ``method`` is
            not ``"exact"`` or ``"cumulative"``; a batch has no tensor of inputs; or ``loader`` yields no
            batch while the model has BatchNorm modules (the statistics are then left as they were).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> batches = [torch.randn(8, 3) for _ in range(4)]
        >>> _ = reset_batchnorm_statistics(model, batches)
        >>> int(model[1].num_batches_tracked)
        4
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    check_positive_int("num_batches", num_batches, allow_none=True)
    if method not in _RESET_METHODS:
        raise ValueError(f"`method` must be one of {_RESET_METHODS}, got {method!r}")
    if transform is not None and not callable(transform):
        raise ValueError(f"`transform` must be callable or None, got {type(transform).__name__}")
    norms = _batchnorms(model)
    if not norms:
        return model
    device = model_device(model)
    saved = [
        (norm.momentum, norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
        for norm in norms
    ]
    pooled = [_PooledStatistics() for _ in norms]
    handles = []
    batches = 0
    success = False
    try:
        with eval_mode(model), torch.no_grad(), forked_rng(device):
            for norm, stats in zip(norms, pooled):
                norm.train()
                norm.reset_running_stats()
                norm.momentum = None  # the cumulative average
                if method == "exact" and isinstance(norm, nn.SyncBatchNorm):  # statistics synced over ranks
                    handles.append(norm.register_forward_pre_hook(stats.from_input))
                elif method == "exact":  # the batch's statistics, as the forward computes them, at no cost
                    norm.momentum = 1.0
                    handles.append(norm.register_forward_hook(stats.from_running))
            single_example_fails = any(isinstance(norm, nn.BatchNorm1d) for norm in norms)
            for batch in loader:
                if num_batches is not None and batches >= num_batches:
                    break
                x = _inputs(batch, "loader").to(device)
                if single_example_fails and x.shape[0] == 1:
                    continue
                model(transform(x) if transform is not None else x)
                batches += 1
        if batches == 0:
            raise ValueError("`loader` yielded no batch: the BatchNorm statistics cannot be re-estimated")
        for norm, (_, mean, var, tracked) in zip(norms, saved):
            if int(norm.num_batches_tracked) == 0:  # never reached by the forward: left as it was
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(tracked)
        if method == "exact":
            for norm, stats in zip(norms, pooled):
                if stats.mean is None:
                    continue
                var = stats.m2 / (stats.count - 1) if stats.count > 1 else torch.full_like(stats.m2, math.nan)
                norm.running_mean.copy_(stats.mean)
                norm.running_var.copy_(var)
        success = True
    finally:
        for handle in handles:
            handle.remove()
        for norm, (momentum, mean, var, tracked) in zip(norms, saved):
            norm.momentum = momentum
            if not success:
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(tracked)
    return model


# ------------------------------------------------------------------------------------------------------------
# Evaluation and the path.


def loss_and_error(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> LossAndError:
    r"""Mean loss and classification error of ``model`` over the batches of ``loader``, in eval mode.

    ``loss = sum_batches loss_fn(outputs, targets) * batch_size / n`` accumulated in float64, the mean over
    examples when ``loss_fn`` returns the batch mean (the default ``F.cross_entropy``) or a vector of
    per-example losses (summed instead). ``error`` is the fraction of examples whose ``argmax`` output differs
    from the target (from ``argmax`` of the target too when the targets are one-hot or soft labels of the
    output's shape). This is :func:`lt_theory.measures.evaluation.evaluate`, whose rule for a diverged network
    every callback shares: a row with a NaN or Inf output counts as misclassified, and the loss is then NaN or
    Inf. The model runs in eval mode under ``torch.no_grad`` and a forked RNG; its flags are restored (also on
    error), and nothing else about it or the global RNG changes.

    Args:
        model: a classifier mapping a batch of inputs to ``(batch, classes)`` outputs.
        loader: an iterable of ``(inputs, targets, ...)`` tuples or lists, moved to the model's device.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar batch mean or a per-example vector.
        transform: applied to each batch of inputs on the device, or None.

    Returns:
        :class:`LossAndError` ``(loss, error, num_examples)``.

    Raises:
        ValueError: if ``model`` is not a module, ``loss_fn`` or ``transform`` is not callable, a batch is not
            an ``(inputs, targets)`` pair, an output is not ``(batch, classes)``, ``loss_fn`` returns neither a
            scalar nor one loss per example, or ``loader`` yields no example.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> batches = [(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))]
        >>> loss_and_error(model, batches).num_examples
        4
    """
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    result = evaluate(model, loader, loss=loss_fn, transform=transform)
    return LossAndError(result.loss, result.error, result.num_examples)


def _alphas(alphas: object) -> Tensor:
    """The grid of ``linear_path``: ``ValueError`` naming ``alphas`` unless it rises from 0 to 1."""
    if isinstance(alphas, Integral) and not isinstance(alphas, bool):
        if alphas < 2:
            raise ValueError(f"`alphas` must be at least 2 points (both endpoints), got {alphas}")
        return torch.linspace(0.0, 1.0, int(alphas), dtype=torch.float64)
    if isinstance(alphas, Tensor):
        grid = alphas.detach().to("cpu", torch.float64)
    elif isinstance(alphas, Sequence) and not isinstance(alphas, str):
        try:
            grid = torch.tensor([check_finite_real("alphas", a) for a in alphas], dtype=torch.float64)
        except ValueError:
            raise ValueError(f"`alphas` must hold finite real numbers, got {alphas!r}") from None
    else:
        raise ValueError(f"`alphas` must be an int >= 2 or a sequence of numbers, got {alphas!r}")
    if (
        grid.ndim != 1
        or grid.numel() < 2
        or not bool(torch.isfinite(grid).all())
        or grid[0] != 0.0
        or grid[-1] != 1.0
        or not bool((grid[1:] > grid[:-1]).all())
    ):
        raise ValueError(
            "`alphas` must be a strictly increasing 1-D sequence from 0 to 1 (both endpoints included), "
            f"got {alphas!r}"
        )
    return grid


def linear_path(
    model_a: nn.Module | State,
    model_b: nn.Module | State,
    loader: Iterable,
    alphas: int | Sequence[float] | Tensor = DEFAULT_NUM_ALPHAS,
    bn: str = "reset",
    bn_loader: Iterable | None = None,
    bn_batches: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
) -> LinearPath:
    r"""Loss and error of ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` along a grid of ``alpha``.

    A scratch copy of the architecture (``model_a``, or ``model_b`` if ``model_a`` is a state dict) is loaded
    at each ``alpha`` with :func:`interpolate_state` (integer buffers from the nearer endpoint) and evaluated
    by :func:`loss_and_error`. With ``bn="reset"`` its BatchNorm statistics are first re-estimated on
    ``bn_loader`` by :func:`reset_batchnorm_statistics` (``method="exact"``), at the endpoints too: the ends of
    the path are then the two models with re-estimated statistics. With ``bn="interpolate"`` the floating
    buffers are interpolated and the ends reproduce the evaluation of ``model_a`` and ``model_b`` exactly. A
    model without BatchNorm gives the same path in both modes (``bn_loader`` is then never iterated).
    ``model_a`` and ``model_b`` are not modified: weights, buffers, ``.grad``, flags and the global RNG state
    are as they were. Pass the results to :func:`error_barrier`.

    Cost: ``len(alphas)`` evaluation passes over ``loader`` plus, with ``bn="reset"``, as many forward passes
    over ``bn_batches`` batches of ``bn_loader``; memory: one more copy of the model and the two state dicts on
    ``device``.

    Args:
        model_a: the network at ``alpha = 0``: a module, or a state dict when ``model_b`` is a module.
        model_b: the network at ``alpha = 1``, with the same state-dict keys, shapes and dtypes.
        loader: ``(inputs, targets, ...)`` batches to evaluate on, iterated once per alpha.
        alphas: the number of evenly spaced points in [0, 1] (at least 2), or a strictly increasing sequence
            from 0 to 1 inclusive.
        bn: ``"reset"`` or ``"interpolate"``.
        bn_loader: batches whose BatchNorm statistics are used with ``bn="reset"``, normally training batches;
            None uses ``loader``. Either inputs or ``(inputs, ...)`` batches.
        bn_batches: the number of batches of ``bn_loader`` used per reset; None for all.
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean or per-example losses (default cross-entropy).
        transform: applied to each batch of inputs on the device (evaluation and reset), or None.
        device: where the scratch model runs; None for the device of the first module given.

    Returns:
        :class:`LinearPath` with float64 ``alphas``, ``loss`` and ``error`` of the grid's length, on the CPU.

    Raises:
        ValueError: if ``alphas`` is not an int >= 2 or a strictly increasing sequence from 0 to 1; ``bn`` is
            not ``"reset"`` or ``"interpolate"``; ``bn_batches`` is not a positive int or None; ``loss_fn`` is
            not callable; neither model is a module; ``model_b`` does not match ``model_a`` (keys, shapes,
            dtypes); or a loader yields no batch (see :func:`loss_and_error`).

    Example:
        >>> import torch
        >>> from lt_theory.models import MLP
        >>> a, b = MLP((2,), hidden=(8,), num_classes=2), MLP((2,), hidden=(8,), num_classes=2)
        >>> data = [(torch.randn(16, 2), torch.randint(0, 2, (16,)))]
        >>> path = linear_path(a, b, data, alphas=5)
        >>> path.error.shape, float(error_barrier(path.error)) >= 0
        (torch.Size([5]), True)
    """
    paths = linear_paths(
        model_a, model_b, {"loader": loader}, alphas, bn, bn_loader, bn_batches, loss_fn, transform, device
    )
    return paths["loader"]


def linear_paths(
    model_a: nn.Module | State,
    model_b: nn.Module | State,
    loaders: Mapping[str, Iterable],
    alphas: int | Sequence[float] | Tensor = DEFAULT_NUM_ALPHAS,
    bn: str = "reset",
    bn_loader: Iterable | None = None,
    bn_batches: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    coarse_every: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, LinearPath]:
    r""":func:`linear_path` on several evaluation sets at once, sharing one BatchNorm reset per ``alpha``.

    At each ``alpha`` the interpolated network is loaded (and, with ``bn="reset"``, its statistics are
    re-estimated on ``bn_loader``) once, then evaluated on every loader of ``loaders`` in turn: the path on
    each set is exactly the :func:`linear_path` on it, for ``len(alphas)`` resets instead of one per set and
    alpha. Cost: ``len(alphas)`` passes over every loader plus ``len(alphas)`` reset passes.

    **Coarse to fine** (``coarse_every=c``): the grid is first evaluated at every ``c``-th point and at both
    ends, then at every grid point strictly between the coarse neighbours of each coarse maximum (of the error
    and of the loss, on every set). The returned paths hold the points evaluated, a subset of ``alphas``. The
    barrier is the full grid's whenever each maximum lies between the coarse neighbours of the coarse maximum,
    as for the single-peaked paths of trained networks: on the init path of a ResNet-20 trained 3 epochs (30
    points, ``c = 5``: 7 coarse points, 11 in all) the four barriers are the whole grid's to the last digit,
    in 0.55x its time (``python benchmarks/bench_lmc.py --trained-epochs 3``).

    Args:
        model_a, model_b, alphas, bn, bn_batches, loss_fn, transform, device: as in :func:`linear_path`.
        loaders: name -> ``(inputs, targets, ...)`` batches to evaluate on (e.g. ``{"train": ..., "test":
            ...}``), each iterated once per alpha.
        bn_loader: batches for the BatchNorm reset; None uses the first loader of ``loaders``.
        coarse_every: evaluate every ``coarse_every``-th grid point first, then refine around the maxima;
            None (or 1) evaluates the whole grid.
        progress: called as ``progress(j, m)`` after each alpha is evaluated: ``j`` points done of the ``m``
            known so far (the coarse points, then all once the refinement is chosen); None for no calls.

    Returns:
        name -> :class:`LinearPath`, in the order of ``loaders``.

    Raises:
        ValueError: as :func:`linear_path`, and if ``loaders`` is not a non-empty mapping.

    Example:
        >>> import torch
        >>> from lt_theory.models import MLP
        >>> a, b = MLP((2,), hidden=(8,), num_classes=2), MLP((2,), hidden=(8,), num_classes=2)
        >>> data = [(torch.randn(16, 2), torch.randint(0, 2, (16,)))]
        >>> paths = linear_paths(a, b, {"train": data, "test": data}, alphas=3)
        >>> bool(torch.equal(paths["train"].error, paths["test"].error))
        True
    """
    if not isinstance(loaders, Mapping) or not loaders:
        raise ValueError(f"`loaders` must be a non-empty mapping of names to loaders, got {loaders!r:.80}")
    grid = _alphas(alphas)
    if bn not in BN_MODES:
        raise ValueError(f"`bn` must be one of {BN_MODES}, got {bn!r}")
    check_positive_int("bn_batches", bn_batches, allow_none=True)
    check_positive_int("coarse_every", coarse_every, allow_none=True)
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    if transform is not None and not callable(transform):
        raise ValueError(f"`transform` must be callable or None, got {type(transform).__name__}")
    template = next((m for m in (model_a, model_b) if isinstance(m, nn.Module)), None)
    if template is None:
        raise ValueError("`model_a` or `model_b` must be a torch.nn.Module (the architecture to evaluate)")
    state_a = _state(model_a, "model_a")
    state_b = _state(model_b, "model_b")
    _check_compatible(state_a, state_b, "model_a", "model_b")
    device = torch.device(device) if device is not None else model_device(template)
    if bn_loader is None:
        bn_loader = next(iter(loaders.values()))

    evaluated: dict[int, dict[str, LossAndError]] = {}
    with forked_rng(device):
        scratch = copy.deepcopy(template).to(device)
        for p in scratch.parameters():
            p.grad = None
            p.requires_grad_(False)
        state_a = {key: value.to(device) for key, value in state_a.items()}
        state_b = {key: value.to(device) for key, value in state_b.items()}

        def evaluate_at(indices) -> None:
            planned = len(evaluated.keys() | set(indices))
            for index in indices:
                if index in evaluated:
                    continue
                scratch.load_state_dict(interpolate_state(state_a, state_b, float(grid[index])))
                if bn == "reset":
                    reset_batchnorm_statistics(scratch, bn_loader, num_batches=bn_batches, transform=transform)
                evaluated[index] = {
                    name: loss_and_error(scratch, loader, loss_fn=loss_fn, transform=transform)
                    for name, loader in loaders.items()
                }
                if progress is not None:
                    progress(len(evaluated), planned)

        last = len(grid) - 1
        step = coarse_every or 1
        evaluate_at(sorted({*range(0, last, step), last}))
        if step > 1:
            evaluate_at(_refinement(evaluated, loaders, last))
    indices = sorted(evaluated)
    return {
        name: LinearPath(
            alphas=grid[indices].clone(),
            loss=torch.tensor([evaluated[i][name].loss for i in indices], dtype=torch.float64),
            error=torch.tensor([evaluated[i][name].error for i in indices], dtype=torch.float64),
            bn=bn,
            num_examples=evaluated[indices[0]][name].num_examples,
        )
        for name in loaders
    }


def _refinement(evaluated: dict[int, dict[str, LossAndError]], loaders, last: int) -> list[int]:
    """The grid indices strictly between the coarse neighbours of each coarse maximum (error and loss, every
    set); a NaN value counts as a maximum, so a broken stretch of the path is refined too."""
    coarse = sorted(evaluated)
    refine: set[int] = set()
    for name in loaders:
        for field in ("error", "loss"):
            values = [getattr(evaluated[i][name], field) for i in coarse]
            position = max(range(len(coarse)), key=lambda j: math.inf if math.isnan(values[j]) else values[j])
            low = coarse[max(position - 1, 0)]
            high = coarse[min(position + 1, len(coarse) - 1)]
            refine.update(range(low + 1, high))
    return sorted(refine - set(coarse))


# ------------------------------------------------------------------------------------------------------------
# Barriers and stability.


def error_barrier(values: Sequence[float] | Tensor) -> float:
    r"""Frankle et al.'s barrier ``max_alpha E(alpha) - (E(0) + E(1)) / 2`` of values along a path.

    ``values[0]`` and ``values[-1]`` are the endpoints (as in :class:`LinearPath`); apply it to the error for
    the error barrier and to the loss for the loss barrier. The result is at least ``|E(0) - E(1)| / 2``
    (module docstring). Any NaN or Inf value gives NaN, never an exception.

    Args:
        values: a 1-D sequence or tensor of at least one real number, ordered along the path.

    Returns:
        The barrier as a Python float.

    Raises:
        ValueError: if ``values`` is not a non-empty 1-D sequence of real numbers.

    Example:
        >>> error_barrier([0.25, 0.75, 0.5])
        0.375
    """
    if isinstance(values, Tensor):
        tensor = values.detach()
    elif isinstance(values, Sequence) and not isinstance(values, str):
        if any(
            isinstance(v, bool) or not (isinstance(v, Real) or (isinstance(v, Tensor) and v.numel() == 1))
            for v in values
        ):
            raise ValueError(f"`values` must hold real numbers, got {values!r}")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    else:
        raise ValueError(f"`values` must be a 1-D sequence or tensor of numbers, got {type(values).__name__}")
    if tensor.ndim != 1 or tensor.numel() < 1 or tensor.is_complex():
        raise ValueError(
            f"`values` must be a non-empty 1-D sequence of real numbers, got shape {tuple(tensor.shape)}"
        )
    tensor = tensor.to("cpu", torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        return math.nan
    return float(tensor.max()) - (float(tensor[0]) + float(tensor[-1])) / 2


def paths_record(paths: Mapping[str, LinearPath]) -> dict:
    """Paths of :func:`linear_paths` and their barriers as plain Python numbers (JSON-able), one key per split.

    Returns:
        ``{"alphas": [...], "<split>_error": [...], "<split>_loss": [...], "<split>_error_barrier": b,
        "<split>_loss_barrier": b, ...}`` (the alphas of the first path; every path of one call shares them).

    Example:
        >>> path = LinearPath(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.5, 1.5, 0.25]),
        ...                   torch.tensor([0.0, 0.5, 0.25]), "reset", 4)
        >>> record = paths_record({"test": path})
        >>> record["test_error_barrier"], record["test_loss_barrier"]
        (0.375, 1.125)
    """
    record: dict = {"alphas": next(iter(paths.values())).alphas.tolist()}
    for split, path in paths.items():
        record[f"{split}_error"] = path.error.tolist()
        record[f"{split}_loss"] = path.loss.tolist()
        record[f"{split}_error_barrier"] = error_barrier(path.error)
        record[f"{split}_loss_barrier"] = error_barrier(path.loss)
    return record


def stable_point(
    spawn_steps: Sequence[int],
    barriers: Sequence[float] | Tensor,
    threshold: float = 0.02,
) -> int | None:
    r"""The first spawn step whose barrier is under ``threshold`` (Frankle et al.'s stable point), or None.

    Steps are taken in increasing order whatever the order given; a NaN barrier (a diverged sibling) never
    counts as stable. This is the earliest ``k`` with ``barrier(k) < threshold``; it does not require the
    later steps to be stable too.

    Args:
        spawn_steps: distinct spawn steps ``k`` (non-negative ints).
        barriers: the error barrier measured for each step, in the same order.
        threshold: a finite real number; 0.02 (2% error) as in Frankle et al.

    Returns:
        The step, or None if no barrier is under the threshold (or there is no step).

    Raises:
        ValueError: if ``spawn_steps`` holds something other than distinct non-negative ints, ``barriers``
            does not have one real number per step, or ``threshold`` is not a finite real number.

    Example:
        >>> stable_point([0, 100, 500, 2000], [0.3, 0.05, 0.01, 0.015])
        500
    """
    threshold = check_finite_real("threshold", threshold)
    if isinstance(spawn_steps, (str, bytes)) or not isinstance(spawn_steps, Sequence):
        raise ValueError(f"`spawn_steps` must be a sequence of ints, got {type(spawn_steps).__name__}")
    steps = list(spawn_steps)
    if any(isinstance(k, bool) or not isinstance(k, Integral) or k < 0 for k in steps) or len(
        set(steps)
    ) != len(steps):
        raise ValueError(f"`spawn_steps` must hold distinct non-negative ints, got {steps!r}")
    if isinstance(barriers, Tensor):
        values = barriers.detach().reshape(-1).tolist() if barriers.ndim <= 1 else None
    elif isinstance(barriers, Sequence) and not isinstance(barriers, str):
        values = list(barriers)
    else:
        values = None
    if values is None or len(values) != len(steps):
        raise ValueError(f"`barriers` must hold one number per spawn step ({len(steps)}), got {barriers!r}")
    values = [v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for v in values]
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in values):
        raise ValueError(f"`barriers` must hold real numbers, got {values!r}")
    for step, barrier in sorted(zip(steps, values), key=lambda pair: pair[0]):
        if barrier < threshold:  # False for NaN
            return int(step)
    return None
