r"""The loss landscape around the current weights: sharpness, the Polyak-Łojasiewicz ratio, gradient-to-weight
ratios per layer, and the conditioning of the features each layer sees.

The loss is the mean over every example of the given batches,

.. math::
    L(\theta) = \frac{1}{N} \sum_b n_b\, L_b(\theta), \qquad N = \sum_b n_b,

with :math:`L_b` the batch mean the caller's ``loss_fn(outputs, targets)`` returns and :math:`\theta` the
trainable parameters (``requires_grad``; frozen parameters and buffers are constants). The model is evaluated
with dropout off and no buffer updated (:func:`~lt_theory.measures.modes.measurement_mode`); BatchNorm layers
normalise with each batch's own statistics, as in a training step (``bn_statistics="batch"``, the default: the
loss the optimizer descends; at initialisation, ResNet-20's running statistics are those of no data and its
eval-mode loss has a Hessian two orders of magnitude sharper), or with their running statistics
(``"running"``, the network at test time). The loss runs through ``torch.func.functional_call`` on detached
copies of the parameters, under a forked RNG: nothing is written to ``.grad``, to a buffer or to the global RNG.

**Sharpness** :math:`\lambda_{\max}(\nabla^2 L(\theta))`, the largest *algebraic* eigenvalue of the Hessian,
i.e. the top of its spectrum (a Hessian away from a minimum has negative eigenvalues, possibly larger in
magnitude than the top one: they are not what is reported). Gradient descent with step :math:`\eta` is stable
on a quadratic only while :math:`\lambda_{\max} < 2/\eta`; full-batch training rises to that edge and stays
there (Cohen, Kaur, Li, Kolter & Talwalkar, ICLR 2021, "Gradient Descent on Neural Networks Typically Occurs at
the Edge of Stability"); flat and sharp minima: Keskar et al., ICLR 2017. Hessian-vector products
:math:`Hv` are exact, forward-over-reverse (Pearlmutter, 1994: ``torch.func.jvp`` of ``torch.func.grad``), and
the top eigenvalue comes from Lanczos (:func:`~lt_theory.measures.operators.symmetric_lanczos`; Ghorbani,
Krishnan & Xiao, ICML 2019, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density").

**Polyak-Łojasiewicz ratio**

.. math::
    \hat\mu(\theta) = \frac{\|\nabla L(\theta)\|^2}{2\,(L(\theta) - L^*)} .

:math:`L` satisfies the PL inequality with constant :math:`\mu` on a region where :math:`\hat\mu \ge \mu`
(Polyak, 1963; Karimi, Nutini & Schmidt, ECML-PKDD 2016, "Linear Convergence of Gradient and Proximal-Gradient
Methods Under the Polyak-Łojasiewicz Condition"; for wide networks the PL* condition of Liu, Zhu & Belkin,
ACHA 2022). With curvature at most :math:`\beta` along the step, one gradient step of size :math:`\eta` gives,
by the descent lemma and the PL inequality,

.. math::
    L_{t+1} - L^* \le \big(1 - \mu\,\eta\,(2 - \beta\eta)\big)\,(L_t - L^*),

which at :math:`\eta = 1/\beta` is Karimi et al.'s Theorem 1, :math:`1 - \mu/\beta`; :math:`\beta/\mu` is the
condition number of the landscape. :func:`predicted_rate` is the guaranteed per-step fraction
:math:`\mu\eta(2 - \beta\eta)` with :math:`\mu = \hat\mu` and :math:`\beta` the sharpness; :func:`observed_rate`
is the per-step fraction :math:`1 - ((L_t - L^*)/(L_s - L^*))^{1/(t-s)}` seen between two measurements.

**Gradient-to-weight ratio** of a layer, :math:`\|\nabla_{W} L\| / \|W\|` over all of its own parameters
(weight and bias together): vanishing (tiny) or exploding (large) updates per layer, the ratio LARS uses as its
trust ratio (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks").

**Activation conditioning**: the condition number :math:`\lambda_{\max}(\Sigma)/\lambda_{\min}(\Sigma)` of the
centred covariance :math:`\Sigma` of a layer's input (and output) features. For a linear layer the Hessian of a
squared loss with respect to its weights is :math:`\mathbb E[x x^\top] \otimes I`, so badly scaled or
correlated inputs make it ill-conditioned and gradient descent slow (LeCun, Bottou, Orr & Müller, 1998,
"Efficient BackProp"); BatchNorm rescales each channel (Ioffe & Szegedy, ICML 2015; Santurkar, Tsipras, Ilyas
& Madry, NeurIPS 2018, "How Does Batch Normalization Help Optimization?"), and its output's condition number
against its input's is that effect, measured. A condition number is blind to a common scale; the **input RMS**
:math:`\sqrt{\mathbb E[x^2]}` of a layer is that scale (for the first layer, the scale of the data: about 1 for
standardised inputs, about 130 for raw 0-255 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp

from lt_theory.checks import check_finite_real, check_nonnegative, check_positive_int
from lt_theory.measures.evaluation import _inputs_and_targets, model_device
from lt_theory.measures.layers import named_layers
from lt_theory.measures.modes import forked_rng, measurement_mode
from lt_theory.measures.operators import start_vector, symmetric_lanczos

__all__ = [
    "CONDITIONED_LAYERS",
    "DEFAULT_CONDITION_FLOOR",
    "GradientToWeight",
    "LayerConditioning",
    "PLRatio",
    "Sharpness",
    "activation_conditioning",
    "conditioned_layers",
    "gradient_to_weight_ratios",
    "observed_rate",
    "pl_ratio",
    "predicted_rate",
    "sharpness",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: The layers :func:`activation_conditioning` measures by default.
CONDITIONED_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
#: Covariance eigenvalues below this fraction of the largest count as rank deficiency: they are raised to it,
#: so a condition number is at most 1e12, and the numerical rank counts the eigenvalues above it. Float32
#: features carry relative rounding errors of about 6e-8, whose covariance is of order 4e-15 of the largest
#: eigenvalue: far below the floor.
DEFAULT_CONDITION_FLOOR = 1e-12


class Sharpness(NamedTuple):
    """Result of :func:`sharpness`.

    Attributes:
        value: the largest Ritz value, a lower bound of the Hessian's largest algebraic eigenvalue (NaN when the
            loss or its Hessian is not finite).
        vector: its unit Ritz vector, flattened over the trainable parameters in ``named_parameters`` order
            (pass it back as ``init`` to warm-start the next measurement).
        iterations: Hessian-vector products computed (Lanczos steps).
    """

    value: float
    vector: Tensor
    iterations: int


class PLRatio(NamedTuple):
    """Result of :func:`pl_ratio`.

    Attributes:
        loss: the mean loss ``L``.
        grad_norm: ``||grad L||_2`` over the trainable parameters.
        ratio: ``grad_norm**2 / (2 (L - L*))``, NaN where it is not defined.
        reason: why ``ratio`` is NaN (``""`` when it is defined).
    """

    loss: float
    grad_norm: float
    ratio: float
    reason: str


class GradientToWeight(NamedTuple):
    """Result of :func:`gradient_to_weight_ratios`, keyed by layer (the name of the module owning the parameters).

    Attributes:
        ratios: ``grad_norms[layer] / weight_norms[layer]`` (Inf for a zero layer with a gradient, NaN for 0/0).
        grad_norms: the l2 norm of the loss gradient over the layer's own trainable parameters.
        weight_norms: the l2 norm of those parameters.
    """

    ratios: dict[str, float]
    grad_norms: dict[str, float]
    weight_norms: dict[str, float]


class LayerConditioning(NamedTuple):
    """The conditioning of one layer's input and output features (a value of :func:`activation_conditioning`).

    Attributes:
        input_condition: ``lambda_max / max(lambda_min, floor * lambda_max)`` of the input features' centred
            covariance; NaN when the covariance is zero (constant features) or not finite.
        input_rank: eigenvalues of that covariance above ``floor * lambda_max`` (0 when zero or not finite).
        output_condition: the same for the output features.
        output_rank: the same for the output features.
        input_rms: the root mean square of every value of the layer's input, ``sqrt(mean(x ** 2))`` over the
            batch, the features and the spatial positions (not centred: an offset counts); NaN when not finite.
            For the first layer it is the scale of the data the network sees: unit-variance inputs give about 1.
    """

    input_condition: float
    input_rank: int
    output_condition: float
    output_rank: int
    input_rms: float = math.nan


# --------------------------------------------------------------------------------------------------
# The loss as a function of the trainable parameters
# --------------------------------------------------------------------------------------------------


def _split_parameters(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached trainable parameters, and the constants (frozen parameters and buffers) of ``model``."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    trainable, constants = {}, {}
    for name, parameter in model.named_parameters():
        (trainable if parameter.requires_grad else constants)[name] = parameter.detach()
    constants.update({name: buffer.detach() for name, buffer in model.named_buffers()})
    if not trainable:
        raise ValueError(f"`model` ({type(model).__name__}) has no trainable parameter (requires_grad=True)")
    return trainable, constants


def _weighted_batches(batches: Iterable, device: torch.device) -> list[tuple[Tensor, Tensor, float]]:
    """``(inputs, targets, n_b / N)`` on ``device`` for every batch."""
    pairs = [_inputs_and_targets(batch) for batch in batches]
    total = sum(inputs.shape[0] for inputs, _ in pairs)
    if total == 0:
        raise ValueError("`batches` must hold at least one (inputs, targets) pair with an example")
    return [(x.to(device), y.to(device), x.shape[0] / total) for x, y in pairs if x.shape[0] > 0]


def _batch_loss(model: nn.Module, loss_fn: LossFn, constants: dict, inputs: Tensor, targets: Tensor):
    """``params -> L_b(params)``, the batch mean ``loss_fn`` returns, as a function torch.func can transform."""

    def loss(params: dict[str, Tensor]) -> Tensor:
        value = loss_fn(functional_call(model, (params, constants), (inputs,)), targets)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"`loss_fn` must return the batch mean as a scalar tensor (reduction='mean'), got {shape}"
            )
        return value.reshape(())

    return loss


def _check_loss_fn(loss_fn: object) -> LossFn:
    if not callable(loss_fn):
        raise ValueError(
            f"`loss_fn` must be a callable loss_fn(outputs, targets), got {type(loss_fn).__name__}"
        )
    return loss_fn


def _loss_and_gradient(
    model: nn.Module, loss_fn: LossFn, batches: Iterable, bn_statistics: str
) -> tuple[float, dict[str, Tensor]]:
    """The mean loss over the batches and its gradient with respect to the trainable parameters."""
    loss_fn = _check_loss_fn(loss_fn)
    trainable, constants = _split_parameters(model)
    device = model_device(model)
    gradient = {name: torch.zeros_like(p) for name, p in trainable.items()}
    total = torch.zeros((), dtype=torch.float64, device=device)
    with measurement_mode(model, bn_statistics), forked_rng(device):
        for inputs, targets, weight in _weighted_batches(batches, device):
            batch_gradient, value = grad_and_value(_batch_loss(model, loss_fn, constants, inputs, targets))(
                trainable
            )
            total += weight * value.detach().double()
            for name, g in batch_gradient.items():
                gradient[name] += weight * g
    return float(total), gradient


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable,
    iters: int = 20,
    tol: float = 1e-3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    bn_statistics: str = "batch",
) -> Sharpness:
    """The largest eigenvalue of the Hessian of the mean loss over ``batches`` (the sharpness), by Lanczos.

    Each Lanczos step is one exact Hessian-vector product per batch, forward-over-reverse (``torch.func.jvp`` of
    ``torch.func.grad`` of the loss through ``functional_call``). The value is the largest Ritz
    value, the top of the spectrum (largest algebraic, not largest magnitude: negative curvature is not
    reported), a lower bound of ``lambda_max`` that is exact once the Krylov space is invariant (at most as many
    steps as parameters) and otherwise stops when its residual is at most ``tol * |value|`` (checked after every
    step), so that an eigenvalue lies within ``tol * |value|`` of it. Memory: ``iters + 1`` vectors of the
    number of trainable parameters, plus a forward-over-reverse pass over the largest batch.

    Args:
        model: the network; its trainable parameters (``requires_grad``) are the Hessian's variables.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean as a scalar tensor.
        batches: ``(inputs, targets, ...)`` pairs (a list, a DataLoader); the loss is their mean weighted by
            example count.
        iters: at most this many Lanczos steps (Hessian-vector products over all batches).
        tol: relative residual at which Lanczos stops early (0: run ``iters`` steps).
        init: a start vector (the previous measurement's ``vector``, to warm-start); None, or one that is not
            finite or zero, starts from a Gaussian draw of ``generator``.
        generator: the generator of that draw; None uses a fresh one seeded 0 (never the global RNG).

        bn_statistics: how BatchNorm layers normalise: ``"batch"`` (default) with each batch's own statistics,
            as in a training step, so the loss is the one the optimizer descends; ``"running"`` with their
            running statistics, the network at test time. Running statistics are never updated.
    Returns:
        :class:`Sharpness` ``(value, vector, iterations)``.

    Raises:
        ValueError: for a model without trainable parameters, a ``loss_fn`` that does not return a scalar,
            a batch that is not an ``(inputs, targets)`` pair, no example, bad ``iters`` / ``tol``, or an
            ``init`` of the wrong size.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.zeros(2)
        >>> half_mse = lambda outputs, targets: 0.5 * (outputs.squeeze(1) - targets).pow(2).mean()
        >>> result = sharpness(model, half_mse, [(x, y)])  # the Hessian X^T X / n is diag(2, 0.5)
        >>> round(result.value, 6), result.vector.abs().round(decimals=6).tolist(), result.iterations
        (2.0, [1.0, 0.0], 2)
    """
    loss_fn = _check_loss_fn(loss_fn)
    check_positive_int("iters", iters)
    tol = check_nonnegative("tol", tol)
    trainable, constants = _split_parameters(model)
    device = model_device(model)
    dtype = next(iter(trainable.values())).dtype
    shapes = [(name, p.shape, p.numel(), p.dtype) for name, p in trainable.items()]
    size = sum(numel for _, _, numel, _ in shapes)
    with measurement_mode(model, bn_statistics), forked_rng(device):
        weighted = _weighted_batches(batches, device)
        gradients = [
            (grad(_batch_loss(model, loss_fn, constants, inputs, targets)), weight)
            for inputs, targets, weight in weighted
        ]

        def hessian_vector_product(vector: Tensor) -> Tensor:
            tangent, offset = {}, 0
            for name, shape, numel, p_dtype in shapes:
                tangent[name] = vector[offset : offset + numel].reshape(shape).to(p_dtype)
                offset += numel
            product = torch.zeros(size, dtype=dtype, device=device)
            for gradient, weight in gradients:
                _, hv = jvp(gradient, (trainable,), (tangent,))
                product += weight * torch.cat([hv[name].reshape(-1).to(dtype) for name, *_ in shapes])
            return product

        start = start_vector(init, size, dtype, device, generator, "the trainable parameters")
        values, vector, steps = symmetric_lanczos(hessian_vector_product, start, iters, tol, check_every=1)
    return Sharpness(float(values[-1]), vector.detach(), steps)


def pl_ratio(
    model: nn.Module, loss_fn: LossFn, batches: Iterable, loss_star: float = 0.0, bn_statistics: str = "batch"
) -> PLRatio:
    """The Polyak-Łojasiewicz ratio ``||grad L||^2 / (2 (L - L*))`` at the current weights.

    Args:
        model: the network; the gradient is over its trainable parameters.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean as a scalar tensor.
        batches: ``(inputs, targets, ...)`` pairs; the loss is their mean weighted by example count.
        loss_star: the infimum ``L*`` of the loss (0 for cross-entropy and squared error, which an
            over-parameterised network can approach).

        bn_statistics: how BatchNorm layers normalise: ``"batch"`` (default) with each batch's own statistics,
            as in a training step, so the loss is the one the optimizer descends; ``"running"`` with their
            running statistics, the network at test time. Running statistics are never updated.
    Returns:
        :class:`PLRatio` ``(loss, grad_norm, ratio, reason)``; ``ratio`` is NaN, with the reason, when the loss
        or gradient is not finite or ``L <= L*``.

    Raises:
        ValueError: for a ``loss_star`` that is not a finite real number, and as :func:`sharpness` for the rest.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> x, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.zeros(2)
        >>> half_mse = lambda outputs, targets: 0.5 * (outputs.squeeze(1) - targets).pow(2).mean()
        >>> pl_ratio(model, half_mse, [(x, y)])  # w - w* along the eigenvector of eigenvalue 2
        PLRatio(loss=1.0, grad_norm=2.0, ratio=2.0, reason='')
    """
    loss_star = check_finite_real("loss_star", loss_star)
    loss, gradient = _loss_and_gradient(model, loss_fn, batches, bn_statistics)
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in gradient.values()))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return PLRatio(loss, grad_norm, math.nan, "the loss or its gradient is not finite (NaN or Inf)")
    if loss <= loss_star:
        reason = (
            f"the loss {loss:.6g} is not above loss_star={loss_star:g}: the ratio is defined where L > L*"
        )
        return PLRatio(loss, grad_norm, math.nan, reason)
    return PLRatio(loss, grad_norm, grad_norm**2 / (2.0 * (loss - loss_star)), "")


def gradient_to_weight_ratios(
    model: nn.Module, loss_fn: LossFn, batches: Iterable, bn_statistics: str = "batch"
) -> GradientToWeight:
    """``||grad_W L|| / ||W||`` for every layer, ``W`` all the layer's own trainable parameters together.

    A layer is the module that owns the parameters (``"net.conv1"`` for ``"net.conv1.weight"`` and its bias;
    ``""``, as in ``named_modules``, for the root module's own parameters). Weight and bias together keep the
    ratio finite for a BatchNorm layer, whose bias starts at zero. The gradient is taken with ``torch.func``, as in
    :func:`pl_ratio`: no ``.grad`` is written.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean as a scalar tensor.
        batches: ``(inputs, targets, ...)`` pairs; the loss is their mean weighted by example count.

        bn_statistics: how BatchNorm layers normalise: ``"batch"`` (default) with each batch's own statistics,
            as in a training step, so the loss is the one the optimizer descends; ``"running"`` with their
            running statistics, the network at test time. Running statistics are never updated.
    Returns:
        :class:`GradientToWeight` ``(ratios, grad_norms, weight_norms)``, dictionaries keyed by layer in
        ``named_parameters`` order.

    Raises:
        ValueError: as :func:`sharpness`.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[3.0, 0.0]])), model.bias.copy_(torch.tensor([4.0]))
        >>> x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])
        >>> half_se = lambda outputs, targets: 0.5 * (outputs.squeeze(1) - targets).pow(2).mean()
        >>> gradient_to_weight_ratios(model, half_se, [(x, y)]).ratios  # ||(7, 0, 7)|| / ||(3, 0, 4)||
        {'': 1.9798989873223332}
    """
    _, gradient = _loss_and_gradient(model, loss_fn, batches, bn_statistics)
    parameters = dict(model.named_parameters())
    grad_squares: dict[str, float] = {}
    weight_squares: dict[str, float] = {}
    for name, g in gradient.items():
        layer = name.rpartition(".")[0]
        weight = parameters[name].detach()
        grad_squares[layer] = grad_squares.get(layer, 0.0) + float(g.double().square().sum())
        weight_squares[layer] = weight_squares.get(layer, 0.0) + float(weight.double().square().sum())
    grad_norms = {layer: math.sqrt(v) for layer, v in grad_squares.items()}
    weight_norms = {layer: math.sqrt(v) for layer, v in weight_squares.items()}
    ratios = {layer: _ratio(grad_norms[layer], weight_norms[layer]) for layer in grad_norms}
    return GradientToWeight(ratios, grad_norms, weight_norms)


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


def activation_conditioning(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str] | None = None,
    floor: float = DEFAULT_CONDITION_FLOOR,
    bn_statistics: str = "batch",
) -> dict[str, LayerConditioning]:
    """The condition numbers of the centred covariances of each layer's input and output features, and the scale
    (root mean square) of its input.

    Features are the last dimension for ``nn.Linear`` and the channels (dimension 1) for convolutions and
    BatchNorm, pooled over the batch and every spatial position: a ``(N, C, H, W)`` activation gives
    ``N H W`` samples of ``C`` features. The covariance ``Sigma = (F - mean)^T (F - mean) / m`` is taken in
    float64; eigenvalues below ``floor * lambda_max`` count as rank deficiency: the condition number is
    ``lambda_max / max(lambda_min, floor * lambda_max)`` (at most ``1 / floor``) and the rank counts the
    eigenvalues above ``floor * lambda_max``. The model runs once on ``inputs`` in eval mode under
    ``torch.no_grad`` and a forked RNG, with forward hooks (removed afterwards); a layer called several times
    is measured at its first call. Cost: one forward pass, and an eigendecomposition of a ``d x d`` matrix
    per measured feature space (``d`` channels or features). A condition number does not change when every
    feature is multiplied by the same factor; ``input_rms``, ``sqrt(mean(x ** 2))`` over every value of the
    layer's input, is that factor: inputs multiplied by 1000 raise the first layer's input RMS 1000 times and
    leave its condition number as it was.

    Args:
        model: the network.
        inputs: a batch of model inputs.
        layers: names of the layers to measure (``named_modules`` names); None for every Linear, Conv and
            BatchNorm layer that the forward pass calls.
        floor: the relative eigenvalue floor, in (0, 1).
        bn_statistics: how BatchNorm layers normalise: ``"batch"`` (default) with each batch's own statistics,
            as in a training step, so the loss is the one the optimizer descends; ``"running"`` with their
            running statistics, the network at test time. Running statistics are never updated.

    Returns:
        ``{layer: LayerConditioning(input_condition, input_rank, output_condition, output_rank, input_rms)}`` in
        ``named_modules`` order.

    Raises:
        ValueError: for a model without Linear/Conv/BatchNorm layers, a name in ``layers`` that is not one of
            them or is not called by the forward pass, a non-tensor ``inputs``, or a bad ``floor``.

    Example:
        >>> batchnorm = nn.BatchNorm1d(2).eval()
        >>> with torch.no_grad():
        ...     _ = batchnorm.running_var.copy_(torch.tensor([1.0, 100.0]))
        >>> inputs = torch.tensor([[1.0, 10.0], [-1.0, 10.0], [1.0, -10.0], [-1.0, -10.0]])
        >>> result = activation_conditioning(batchnorm, inputs)[""]  # variances 1 and 100, uncorrelated
        >>> round(result.input_condition, 4), round(result.output_condition, 4), result.output_rank  # eps 1e-5
        (100.0, 1.0, 2)
        >>> round(result.input_rms, 4)  # sqrt((1 + 100) / 2): the scale of the values, not centred
        7.1063
    """
    if not isinstance(inputs, Tensor):
        raise ValueError(f"`inputs` must be a torch.Tensor, got {type(inputs).__name__}")
    if not (isinstance(floor, float | int) and 0 < floor < 1):
        raise ValueError(f"`floor` must be a number in (0, 1), got {floor!r}")
    chosen = conditioned_layers(model, layers)
    covariances: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def record(name: str, layer: nn.Module):
        def hook(module, args, output) -> None:
            if name not in covariances:
                rms = args[0].detach().double().pow(2).mean().sqrt()
                covariances[name] = (_covariance(args[0], layer), _covariance(output, layer), rms)

        return hook

    device = model_device(model)
    handles = [layer.register_forward_hook(record(name, layer)) for name, layer in chosen.items()]
    try:
        with measurement_mode(model, bn_statistics), torch.no_grad(), forked_rng(device):
            model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
    if layers is not None:
        missing = [name for name in chosen if name not in covariances]
        if missing:
            raise ValueError(
                f"`layers` {missing} are not called in the model's forward; they cannot be measured"
            )
    result = {}
    for name in chosen:
        if name in covariances:
            input_cov, output_cov, rms = covariances[name]
            rms = float(rms) if bool(torch.isfinite(rms)) else math.nan
            result[name] = LayerConditioning(
                *_condition(input_cov, floor), *_condition(output_cov, floor), rms
            )
    return result


def conditioned_layers(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The layers :func:`activation_conditioning` measures: ``layers`` by name, or every Linear/Conv/BatchNorm.

    Args:
        model: the network.
        layers: ``named_modules`` names, or None for every layer of :data:`CONDITIONED_LAYERS`.

    Returns:
        ``{name: layer}`` in ``named_modules`` order (in the order of ``layers`` when given).

    Raises:
        ValueError: for a model without such layers, or ``layers`` not a list of their names (the message
            lists the names that exist).

    Example:
        >>> list(conditioned_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.BatchNorm1d(3))))
        ['0', '2']
    """
    purpose = "activation conditioning measures the features those layers take and give"
    return named_layers(model, CONDITIONED_LAYERS, layers, "Linear, Conv or BatchNorm", purpose)


def _covariance(activation: Tensor, layer: nn.Module) -> Tensor:
    """The centred covariance (float64) of the features of ``activation`` as ``layer`` sees them."""
    if isinstance(layer, nn.Linear) or activation.dim() < 2:
        features = activation.reshape(-1, activation.shape[-1])
    else:  # channels in dimension 1, every batch entry and spatial position a sample
        features = activation.movedim(1, -1).reshape(-1, activation.shape[1])
    features = features.detach().double()
    centred = features - features.mean(dim=0)
    return centred.T @ centred / features.shape[0]


def _condition(covariance: Tensor, floor: float) -> tuple[float, int]:
    """``(lambda_max / max(lambda_min, floor lambda_max), rank above the floor)``; ``(nan, 0)`` if undefined."""
    if not bool(torch.isfinite(covariance).all()):
        return math.nan, 0
    eigenvalues = torch.linalg.eigvalsh(covariance)
    largest = float(eigenvalues[-1])
    if largest <= 0:  # constant features: no direction has variance
        return math.nan, 0
    threshold = floor * largest
    rank = int((eigenvalues > threshold).sum())
    return largest / max(float(eigenvalues[0]), threshold), rank


def predicted_rate(pl_ratio: float, sharpness: float, lr: float) -> float:
    """The per-step fraction of ``L - L*`` one gradient-descent step is guaranteed to remove: ``mu lr (2 - beta lr)``.

    With ``mu`` the PL ratio at the current point and curvature at most ``beta`` along the step, the descent
    lemma ``L_{t+1} <= L_t - lr (1 - beta lr / 2) ||grad L||^2`` and ``||grad L||^2 = 2 mu (L_t - L*)`` give
    ``L_{t+1} - L* <= (1 - mu lr (2 - beta lr)) (L_t - L*)`` (Karimi, Nutini & Schmidt 2016, Theorem 1, is the
    case ``lr = 1/beta``: ``mu / beta``). Positive for ``0 < lr < 2 / beta``; at or past the edge of stability
    ``lr >= 2 / beta`` it is <= 0: no decrease is guaranteed. Here ``beta`` is the sharpness at the current
    point, a local curvature, and the step is plain gradient descent (no momentum, no weight decay).

    Args:
        pl_ratio: ``mu``, from :func:`pl_ratio`.
        sharpness: ``beta``, from :func:`sharpness`.
        lr: the step size (a finite number >= 0).

    Returns:
        ``pl_ratio * lr * (2 - sharpness * lr)`` (NaN when an input is NaN).

    Raises:
        ValueError: for an ``lr`` that is not a finite number >= 0.

    Example:
        >>> predicted_rate(pl_ratio=1.0, sharpness=4.0, lr=0.25)  # lr = 1 / beta: mu / beta
        0.25
    """
    lr = check_nonnegative("lr", lr)
    return float(pl_ratio) * lr * (2.0 - float(sharpness) * lr)


def observed_rate(previous_loss: float, loss: float, steps: int, loss_star: float = 0.0) -> float:
    """The per-step fraction of ``L - L*`` removed between two measurements ``steps`` steps apart.

    ``1 - ((L_t - L*) / (L_prev - L*)) ** (1 / steps)``: the constant per-step rate that takes ``L_prev - L*`` to
    ``L_t - L*`` in ``steps`` steps, comparable with :func:`predicted_rate`; negative when the loss rose.

    Args:
        previous_loss: ``L_prev``.
        loss: ``L_t``.
        steps: the optimizer steps between them (a positive integer).
        loss_star: the infimum ``L*`` (a finite number).

    Returns:
        The rate; NaN when a loss is not finite or not above ``loss_star``.

    Raises:
        ValueError: for ``steps`` that is not a positive integer or a ``loss_star`` that is not finite.

    Example:
        >>> observed_rate(previous_loss=1.0, loss=0.25, steps=2)  # halved at each of the two steps
        0.5
    """
    steps = check_positive_int("steps", steps)
    loss_star = check_finite_real("loss_star", loss_star)
    before, after = float(previous_loss) - loss_star, float(loss) - loss_star
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0 or after <= 0:
        return math.nan
    return 1.0 - (after / before) ** (1.0 / steps)
