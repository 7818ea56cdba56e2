r"""Spectral measures of linear layers: operator norms, singular values, spectral complexity.

A ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` layer is an affine map ``x -> A x + b`` of
its input. Everything here is about its linear part ``A``: the operator on inputs of one fixed shape,
with the layer's stride, padding (``int``, tuple, ``"same"``, ``"valid"``; every ``padding_mode``),
dilation and groups. The bias is ignored: an affine map has the Lipschitz constant of its linear part.

Quantities
----------
* Operator (spectral) norm ``||A||_2 = sigma_max(A) = max_{||x||_2 = 1} ||A x||_2``, the l2 -> l2
  Lipschitz constant of the layer; ``sigma_min(A) = min_{||x||_2 = 1} ||A x||_2`` (zero when ``A`` has
  fewer rows than columns, i.e. is not injective); condition number ``sigma_max / sigma_min``; Frobenius
  norm ``||A||_F``; stable rank ``||A||_F^2 / ||A||_2^2``.

Methods for ``sigma_max``
-------------------------
* ``"power"``: power iteration on ``A^T A``, with ``A`` applied by the layer's own convolution and
  ``A^T`` by the transposed convolution (zero padding, Linear) or the vector-Jacobian product of the
  forward (circular/reflect/replicate padding). Every iterate ``sigma = ||A v||`` (``||v|| = 1``) is a
  LOWER bound of ``||A||_2``; it converges to it at the rate ``(sigma_2 / sigma_1)^(2k)``. The final
  right singular vector is returned to warm-start the next call. From a warm start ``v`` whose squared
  sine to the top singular vector is ``s``, ``k`` iterations leave a relative error of at most about
  ``s * max_x (1 - x) x^(2k) <= s / (e (2k + 1))`` (``x = (sigma_i / sigma_1)^2``): components along
  nearly-equal singular values do not decay, but cost nearly nothing.
* ``"lanczos"``: Lanczos on ``A^T A`` with full reorthogonalisation (the same products as ``"power"``).
  ``||A y||`` for the Ritz vector ``y`` of the largest Ritz value is a LOWER bound too, and converges
  much faster where the top singular values cluster (zero-padded convolutions: 50 steps reach 1e-5 where
  100 power iterations leave 1e-3); it keeps ``n_iter + 1`` vectors of the input size. The Ritz vector is
  returned to warm-start ``"power"``.
* ``"fft"`` (Sedghi, Gupta & Long, ICLR 2019, "The singular values of convolutional layers"): a
  convolution with circular padding that keeps the input size (total padding ``dilation*(k-1)`` per
  dimension) and stride 1 is block-circulant, so it is unitarily equivalent to the block-diagonal matrix
  of the ``c_out x c_in`` matrices ``P(u) = sum_a K[:, :, a] exp(-2 pi i <u, dilation*a / n>)``, one per
  frequency ``u`` of the ``n_1 x ... x n_d`` grid: the singular values of ``A`` are those of the ``P(u)``.
  A stride ``s`` that divides ``n`` is exact too: subsampling folds the ``s`` frequencies
  ``u' + t n/s`` onto the output frequency ``u'`` (polyphase form), so the blocks become the
  ``c_out x (c_in prod s)`` matrices ``[P(u' + t n/s)]_t / sqrt(prod s)``. A 1x1 convolution without
  padding is exact for every stride (the blocks are the kernel matrix itself). Groups make each block
  block-diagonal. A ``ValueError`` says when none of these holds.
* ``"gram"`` (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023, "Efficient bound of Lipschitz
  constant for convolutional layers by Gram iteration"): for a matrix ``M``, ``G_0 = M``,
  ``G_{t+1} = G_t^H G_t`` gives ``sigma_max(M) <= ||G_t||_F^(1/2^t)`` at every ``t``, non-increasing in ``t``
  and converging to ``sigma_max(M)``. Each ``G_t`` is divided by its Frobenius norm before squaring and
  the logarithms of the scales are accumulated (``log bound = sum_{k<t} log r_k / 2^k + log||G_t||_F/2^t``),
  so nothing overflows. It is applied to every frequency block and the largest bound is returned:
  a CERTIFIED upper bound of ``||A||_2``:

  - circular padding that keeps the size (and stride dividing the size, or a padding-free 1x1 kernel):
    the blocks are exactly those of ``A``, the bound converges to ``||A||_2``;
  - circular padding with a stride that does not divide the size: ``A = S C`` with ``C`` the stride-1
    circular convolution and ``S`` a coordinate selection, so ``||A|| <= ||C||``, which is bounded;
  - any other padding: ``A = R (S_N C_N) E Pad``, where ``Pad`` is the padding operator, ``E`` embeds the
    padded input (length ``n + p``) into zeros of length ``N`` = the smallest multiple of the stride
    ``>= n + p``, ``C_N`` is the circular convolution on ``N`` points (no wrap-around reaches the outputs
    kept, since every window of the padded input fits in it), ``S_N`` the stride subsampling (exact,
    polyphase) and ``R`` keeps the outputs of the real layer. ``E`` is an isometry and ``||R|| <= 1``,
    so ``||A|| <= ||S_N C_N|| * ||Pad||``; ``||Pad|| = 1`` for zero padding, and
    ``sqrt(max number of copies of an input entry)`` per dimension for circular/reflect/replicate
    padding. The bound then converges to ``||S_N C_N|| * ||Pad||`` (the norm of the periodised
    operator, the Toeplitz/circulant relationship), which is ``>= ||A||_2``, not to ``||A||_2`` itself.

* ``"reshape"``: ``||K.reshape(c_out, -1)||_2``, what ``torch.nn.utils.parametrizations.spectral_norm``
  normalises, reported for comparison. It is NOT the operator norm: always
  ``||A||_2 <= sqrt(prod k) * reshape`` (every frequency block is the reshaped kernel times a matrix of
  unit-modulus phases), and ``reshape <= ||A||_2`` when ``groups == 1`` and some output reads a full
  in-bounds window of distinct input entries (apply ``A^T`` to one output position). With groups the
  reshaped matrix stacks the groups' filters on the same columns and may exceed ``||A||_2``.
  Computed exactly (float64, from the top eigenpair of the smaller Gram matrix of the reshaped kernel),
  or, when ``init`` is given, by power iteration on the reshaped kernel warm-started from ``init`` (a
  lower bound of it; what a monitor uses between two measurements). Both return the right singular
  vector, of shape ``(c_in / groups * prod k,)``.
* ``"auto"``: the exact SVD for ``nn.Linear``, ``"fft"`` where it is exact, else ``"power"``.

Frobenius norm (exact, any padding):
``||A||_F^2 = sum_{o,c} sum_{a,b} K[o,c,a] K[o,c,b] prod_j Q_j[a_j, b_j]``
with ``Q_j[a, b]`` the number of output positions along dimension ``j`` where taps ``a`` and ``b`` read the
same (non-zero-padded) input entry; for circular padding that keeps the size this is
``||A||_F = sqrt(prod n) * ||K||_F`` (when the dilated kernel fits in the input).

Batch normalisation in eval mode, ``y = gamma (x - mu) / sqrt(var + eps) + beta``, is the diagonal affine
map with Lipschitz constant ``max_c |gamma_c| / sqrt(var_c + eps)``.

Spectral complexity (Bartlett, Foster & Telgarsky, NeurIPS 2017, "Spectrally-normalized margin bounds for
neural networks"):
``R_A = (prod_i ||A_i||_sigma) (sum_i ||A_i^T - M_i^T||_{2,1}^{2/3} / ||A_i||_sigma^{2/3})^{3/2}``
with ``M_i`` reference (initial) weights, and the normalised margin
``(f(x)_y - max_{j != y} f(x)_j) / (R_A ||X||_F / n)``.

Non-finite weights give NaN results, never an exception or a long loop.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lt_theory.measures.operators import (
    CONV_TYPES,
    DEFAULT_ITERATIONS,
    DEFAULT_TOLERANCE,
    LinearMap,
    block_singular_values,
    compute_dtype,
    frequency_plan,
    frobenius_sq,
    gram_upper_bound,
    is_finite,
    lanczos,
    layer_input_shapes,
    linear_map,
    power_iteration,
    top_singular_pair,
)

__all__ = [
    "OperatorNormResult",
    "OperatorSpectrum",
    "SpectralComplexity",
    "batchnorm_lipschitz",
    "dense_operator",
    "normalized_margins",
    "operator_norm",
    "operator_spectrum",
    "spectral_complexity",
]

_NORM_METHODS = ("power", "lanczos", "fft", "gram", "reshape", "auto")
# what each method's value is: a lower bound, the exact norm, an upper bound, or neither
_NORM_GUARANTEES = {"power": "lower", "lanczos": "lower", "fft": "exact", "gram": "upper", "reshape": "none"}
_SPECTRUM_METHODS = ("auto", "fft", "dense", "lanczos", "power")
# "auto" in operator_spectrum builds the dense matrix below this many entries (32 MiB in float64).
_DENSE_LIMIT = 1 << 22


class OperatorNormResult(NamedTuple):
    """Result of :func:`operator_norm`.

    Attributes:
        sigma_max: the norm (or its bound or estimate) as a Python float; NaN for non-finite weights.
        vector: for ``"power"`` and ``"lanczos"``, the final unit right singular (Ritz) vector, of shape
            ``input_shape`` (pass it as ``init`` to the next call); for ``"reshape"``, that of the
            reshaped kernel, of shape ``(c_in / groups * prod(kernel_size),)`` (``None`` for a zero
            kernel); ``None`` for the other methods.
        iterations: power, Lanczos or Gram iterations done (0 for the closed forms).
        guarantee: ``"lower"`` (power iteration, Lanczos: never above the norm), ``"exact"`` (SVD / FFT),
            ``"upper"`` (Gram iteration: certified, never below) or ``"none"`` (``"reshape"``).
    """

    sigma_max: float
    vector: Tensor | None
    iterations: int
    guarantee: str


class OperatorSpectrum(NamedTuple):
    """Result of :func:`operator_spectrum`.

    Attributes:
        sigma_max: largest singular value.
        sigma_min: ``min_{||x||=1} ||A x||``, the smallest singular value of ``A`` as a map on its
            whole input space; exactly 0 when the output has fewer entries than the input (then ``A``
            is not injective). With ``"lanczos"`` and ``"power"`` it is an estimate from above.
        condition_number: ``sigma_max / sigma_min``; ``inf`` when ``sigma_min == 0`` (not injective),
            NaN when ``A == 0``.
        frobenius_norm: ``||A||_F`` of the operator, exact for every method and padding.
        stable_rank: ``||A||_F^2 / sigma_max^2`` (NaN when ``A == 0``).
        singular_values: all ``min(out, in)`` singular values, descending, float64 (``"fft"`` and
            ``"dense"``), else ``None``.
        method: the method used (``"fft"`` also for ``nn.Linear``, whose single block is the weight).
    """

    sigma_max: float
    sigma_min: float
    condition_number: float
    frobenius_norm: float
    stable_rank: float
    singular_values: Tensor | None
    method: str


class SpectralComplexity(NamedTuple):
    """Result of :func:`spectral_complexity`.

    Attributes:
        value: ``R_A``.
        spectral_norms: ``||A_i||_sigma`` per layer name.
        l21_distances: ``||A_i^T - M_i^T||_{2,1}`` per layer name.
    """

    value: float
    spectral_norms: dict[str, float]
    l21_distances: dict[str, float]


# --------------------------------------------------------------------------------------------------
# The linear map of a layer
# --------------------------------------------------------------------------------------------------


def _checked_norm_method(
    op: LinearMap, method: str, n_iter: int | None, tol: float | None
) -> tuple[str, object]:
    """:func:`operator_norm`'s ``method`` checked (``"auto"`` resolved), and the frequency plan of ``"fft"``."""
    if method not in _NORM_METHODS:
        raise ValueError(f"method={method!r}: expected one of {_NORM_METHODS}")
    if tol is not None and tol < 0:
        raise ValueError(f"tol={tol}: expected a non-negative float")
    if method == "auto":
        if op.is_linear or frequency_plan(op).exact:
            method = "fft"
        else:
            method = "power"
    if n_iter is not None and n_iter < (0 if method == "gram" else 1):
        raise ValueError(f"n_iter={n_iter}: expected a positive integer (or 0 Gram steps for 'gram')")
    plan = frequency_plan(op) if method == "fft" else None
    if plan is not None:
        _check_fft_exact(plan)
    return method, plan


def _check_fft_exact(plan) -> None:
    """Raise the ``ValueError`` that says where ``method="fft"`` is exact, unless ``plan`` is."""
    if not plan.exact:
        raise ValueError(
            "method='fft' is exact only for circular padding that keeps the input size "
            "(padding_mode='circular', total padding dilation*(kernel_size-1) per dimension) with a "
            "stride dividing the input size, for 1x1 convolutions without padding, and for "
            f"nn.Linear; here {plan.reason}. Use method='power' (estimate, a lower bound) or "
            "'gram' (certified upper bound)."
        )


def operator_norm(
    layer: nn.Module,
    input_shape: Sequence[int],
    method: str = "power",
    n_iter: int | None = None,
    tol: float | None = None,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> OperatorNormResult:
    """Largest singular value of the linear part of a Linear/Conv layer on inputs of ``input_shape``.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (any stride, padding, padding_mode, dilation, groups).
        input_shape: one input without the batch dimension: ``(features,)`` (or ``(..., features)``) for
            Linear, ``(C, L)``, ``(C, H, W)``, ``(C, D, H, W)`` for convolutions.
        method: ``"power"`` (lower bound converging to the norm, warm-startable), ``"lanczos"`` (lower
            bound, converging faster, memory ``n_iter`` input vectors), ``"fft"`` (exact, Sedghi et
            al.; circular size-keeping padding or padding-free 1x1 kernels), ``"gram"``
            (certified upper bound, Delattre et al.), ``"reshape"`` (norm of the reshaped kernel, for
            comparison) or ``"auto"`` (exact where possible, else power). See the module docstring.
        n_iter: maximum iterations (power: 100 by default, at least 1; lanczos: 100 steps; gram: 20 Gram
            steps by default, 0 gives the Frobenius norm).
        tol: stop when the relative change between two iterates is at most ``tol`` (power: 1e-6, gram:
            1e-7), or the relative Ritz residual is (lanczos: 1e-7); ``0`` runs all ``n_iter``
            iterations. For power iteration this bounds the change, not the error: with clustered top
            singular values (zero-padded convolutions: ratios ``sigma_2 / sigma_1`` of 0.999 are common)
            the error can be a hundred times ``tol``.
        init: power iteration (or Lanczos) start (e.g. ``vector`` of the previous result); random if
            None. With ``"reshape"``, a given ``init`` switches from the exact value to power iteration
            on the reshaped kernel from ``init`` (``n_iter``, ``tol`` as for ``"power"``).
        generator: source of the random start; a fresh ``torch.Generator`` seeded 0 when None. The
            global RNG is never used.
        dtype: power-iteration and Lanczos dtype (default: the weight's, float32 for half types). The
            closed forms and the Gram iteration always compute in float64.

    Returns:
        :class:`OperatorNormResult` ``(sigma_max, vector, iterations, guarantee)``; ``sigma_max`` is NaN
        when the weight holds NaN or Inf.

    Raises:
        TypeError: for a layer that is not Linear/Conv.
        ValueError: bad ``input_shape``/``method``/``n_iter``/``tol``/``init``, or ``"fft"`` where it
            is not exact.

    Example:
        >>> _ = torch.manual_seed(0)  # the layer's initialisation
        >>> conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")
        >>> exact = operator_norm(conv, (3, 16, 16), method="fft").sigma_max
        >>> first = operator_norm(conv, (3, 16, 16), n_iter=500, tol=1e-10)
        >>> later = operator_norm(conv, (3, 16, 16), init=first.vector)  # warm start after a step
        >>> abs(first.sigma_max - exact) < 1e-4 * exact
        True
    """
    op = linear_map(layer, input_shape)
    method, plan = _checked_norm_method(op, method, n_iter, tol)
    guarantee = _NORM_GUARANTEES[method]
    if not is_finite(op):
        return OperatorNormResult(math.nan, None, 0, guarantee)
    if method == "fft":
        value = float(torch.linalg.svdvals(plan.blocks).max())
        return OperatorNormResult(value, None, 0, guarantee)
    if method == "reshape":
        matrix = op.weight.reshape(op.weight.shape[0], -1)
        if init is None:
            value, vector = top_singular_pair(matrix.to(torch.float64))
            return OperatorNormResult(value, vector, 0, guarantee)
        method, op = "power", LinearMap(matrix, (matrix.shape[1],))  # power iteration from init on the matrix
    n_iter = DEFAULT_ITERATIONS[method] if n_iter is None else n_iter
    tol = DEFAULT_TOLERANCE[method] if tol is None else tol
    if method == "gram":
        plan = frequency_plan(op)
        bound, steps = gram_upper_bound(plan.blocks, n_iter, tol)
        return OperatorNormResult(bound * plan.factor, None, steps, guarantee)
    if method == "lanczos":
        cdtype = compute_dtype(op.weight, dtype)
        sigma, _, vector, steps = lanczos(op, n_iter, tol, generator, cdtype, init=init)
        return OperatorNormResult(sigma, vector, steps, guarantee)
    sigma, vector, iterations = power_iteration(op, n_iter, tol, init, generator, dtype)
    return OperatorNormResult(sigma, vector, iterations, guarantee)


def dense_operator(module: nn.Module, input_shape: Sequence[int], chunk_size: int = 1024) -> Tensor:
    """The explicit float64 matrix of an affine module's linear part, built with the module's forward.

    A float64 copy of the module in eval mode (with a Linear/Conv bias set to zero) is applied to the
    standard basis vectors; for other affine modules (e.g. eval-mode BatchNorm) ``f(0)`` is subtracted.
    The module itself is not modified. Meant for tests and tiny layers: the matrix has
    ``prod(output_shape) x prod(input_shape)`` entries.

    Args:
        module: a module whose eval-mode forward is affine in its input.
        input_shape: one input without the batch dimension.
        chunk_size: basis vectors per forward call.

    Returns:
        Tensor of shape ``(out_numel, in_numel)``, float64, on the module's device; column ``j`` is the
        flattened response to the ``j``-th basis input (row-major order of ``input_shape``).

    Example:
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> dense_operator(conv, (2, 5, 5)).shape
        torch.Size([75, 50])
    """
    copied = copy.deepcopy(module).to(torch.float64).eval()
    params = list(copied.parameters()) + list(copied.buffers())
    device = params[0].device if params else torch.device("cpu")
    if isinstance(copied, (nn.Linear, nn.modules.conv._ConvNd)) and copied.bias is not None:
        with torch.no_grad():
            copied.bias.zero_()
    n = math.prod(input_shape)
    columns = []
    with torch.no_grad():
        offset = copied(torch.zeros((1, *input_shape), dtype=torch.float64, device=device))
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            basis = torch.zeros(stop - start, n, dtype=torch.float64, device=device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out = copied(basis.reshape(stop - start, *input_shape)) - offset
            columns.append(out.reshape(stop - start, -1))
    return torch.cat(columns).T.contiguous()


def operator_spectrum(
    layer: nn.Module,
    input_shape: Sequence[int],
    method: str = "auto",
    n_iter: int | None = None,
    tol: float | None = None,
    generator: torch.Generator | None = None,
) -> OperatorSpectrum:
    """Extreme singular values, condition number, Frobenius norm and stable rank of a layer's operator.

    Methods: ``"fft"`` (all singular values, exact where :func:`operator_norm`'s ``"fft"`` is, and for
    ``nn.Linear`` the SVD of the weight), ``"dense"`` (SVD of the explicit matrix, float64),
    ``"lanczos"`` (both from the extreme Ritz values of ``A^T A`` after Lanczos steps with full
    reorthogonalisation, float64: ``sigma_max`` from below, ``sigma_min`` from above (Cauchy
    interlacing); it stores ``n_iter`` vectors of the input size), ``"power"`` (``sigma_max`` by power
    iteration; ``sigma_min = ||A v||`` for ``v`` from power iteration on ``sigma_max^2 I - A^T A``, an
    estimate from above that converges far more slowly than Lanczos when the smallest singular values
    cluster), ``"auto"``: fft where exact, else dense up to 2^22 matrix entries, else lanczos.

    ``sigma_min`` is ``min_{||x||=1} ||A x||``: 0 when the output has fewer entries than the input
    (``A`` is not injective), and then the condition number is ``inf``. The Frobenius norm is exact for
    every method and padding (module docstring); the stable rank is ``||A||_F^2 / sigma_max^2``.

    Args:
        layer: ``nn.Linear`` or ``nn.Conv1d/2d/3d``.
        input_shape: one input without the batch dimension.
        method: ``"auto"``, ``"fft"``, ``"dense"``, ``"lanczos"`` or ``"power"``.
        n_iter: Lanczos steps (default 200), or power iterations for each of ``sigma_max`` and
            ``sigma_min`` (default 100 and 1000).
        tol: relative tolerance of the Lanczos Ritz residuals (default 1e-9), or of the power
            iterations (default 1e-6 and 1e-9).
        generator: random starts of the iterations (a fresh seeded one when None).

    Returns:
        :class:`OperatorSpectrum`; every field NaN (``singular_values`` None) for non-finite weights.

    Raises:
        ValueError: bad arguments, or ``"fft"`` where it is not exact.

    Example:
        >>> spec = operator_spectrum(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), (4, 8, 8))
        >>> spec.method, spec.singular_values.numel()
        ('fft', 256)
    """
    if method not in _SPECTRUM_METHODS:
        raise ValueError(f"method={method!r}: expected one of {_SPECTRUM_METHODS}")
    op = linear_map(layer, input_shape)
    plan = None
    if method in ("auto", "fft"):
        plan = frequency_plan(op)
        if method == "fft":
            _check_fft_exact(plan)
        if method == "auto":
            if plan.exact:
                method = "fft"
            elif op.in_numel * op.out_numel <= _DENSE_LIMIT:
                method = "dense"
            else:
                method = "lanczos"
    if not is_finite(op):
        nan = math.nan
        return OperatorSpectrum(nan, nan, nan, nan, nan, None, method)
    frobenius = math.sqrt(max(frobenius_sq(op), 0.0))
    injective_possible = op.out_numel >= op.in_numel
    values = None
    if method in ("fft", "dense"):
        if method == "fft":
            values = block_singular_values(plan, op)
        else:
            eye = torch.eye(op.in_numel, dtype=torch.float64, device=op.weight.device)
            dense = op.apply(eye.reshape(op.in_numel, *op.input_shape), op.weight.to(torch.float64))
            values = torch.linalg.svdvals(dense.reshape(op.in_numel, -1).T)
        sigma_max = float(values[0])
        sigma_min = float(values[-1]) if injective_possible else 0.0
    elif method == "lanczos":
        steps = 200 if n_iter is None else n_iter
        tol_lanczos = 1e-9 if tol is None else tol
        sigma_max, sigma_min, _, _ = lanczos(op, steps, tol_lanczos, generator, torch.float64, smallest=True)
        if not injective_possible:
            sigma_min = 0.0
    else:
        n_max = 100 if n_iter is None else n_iter
        tol_max = 1e-6 if tol is None else tol
        sigma_max, _, _ = power_iteration(op, n_max, tol_max, None, generator, torch.float64)
        if injective_possible:
            n_min = 1000 if n_iter is None else n_iter
            tol_min = 1e-9 if tol is None else tol
            sigma_min, _, _ = power_iteration(
                op, n_min, tol_min, None, generator, torch.float64, smallest_shift=sigma_max
            )
        else:
            sigma_min = 0.0
    if sigma_max == 0.0:
        condition, stable_rank = math.nan, math.nan
    else:
        condition = math.inf if sigma_min == 0.0 else sigma_max / sigma_min
        stable_rank = frobenius**2 / sigma_max**2
    return OperatorSpectrum(sigma_max, sigma_min, condition, frobenius, stable_rank, values, method)


def batchnorm_lipschitz(bn: nn.Module) -> float:
    """Lipschitz constant of an eval-mode batch normalisation: ``max_c |gamma_c| / sqrt(var_c + eps)``.

    In eval mode ``y = gamma (x - running_mean) / sqrt(running_var + eps) + beta`` is a diagonal affine
    map; ``gamma = 1`` when ``affine=False``.

    Args:
        bn: ``nn.BatchNorm1d/2d/3d`` or ``nn.SyncBatchNorm``.

    Returns:
        The constant as a float (NaN if a statistic or gamma is NaN).

    Raises:
        TypeError: ``bn`` is not a batch normalisation layer.
        ValueError: ``track_running_stats=False``: eval mode then normalises with batch statistics,
            which is not an affine map of one example.

    Example:
        >>> bn = nn.BatchNorm2d(3).eval()
        >>> round(batchnorm_lipschitz(bn), 6)  # 1 / sqrt(1 + 1e-5)
        0.999995
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a batch normalisation layer, got {type(bn).__name__}")
    if bn.running_var is None:
        raise ValueError(
            f"{bn} has track_running_stats=False: in eval mode it normalises with batch statistics, "
            "which is not an affine map and has no Lipschitz constant of this form"
        )
    scale = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().to(torch.float64).abs() * scale
    return float(scale.max())


def spectral_complexity(
    model: nn.Module,
    reference: nn.Module | Mapping[str, Tensor],
    input_shape: Sequence[int] | None = None,
    method: str = "auto",
) -> SpectralComplexity:
    """Spectral complexity ``R_A`` of Bartlett, Foster & Telgarsky (NeurIPS 2017).

    ``R_A = (prod_i ||A_i||_sigma) * (sum_i ||A_i^T - M_i^T||_{2,1}^{2/3} / ||A_i||_sigma^{2/3})^{3/2}``
    over every ``nn.Linear`` / ``nn.ConvNd`` module ``i`` of ``model`` (``named_modules`` order; biases,
    batch normalisation and activations are not counted, activations are taken 1-Lipschitz).
    ``M_i`` is the same layer's weight in ``reference`` (usually the initial weights).

    * ``||A_i||_sigma``: for Linear the largest singular value of the weight; for a convolution the
      operator norm of the layer on the input shape it receives when the model runs on ``input_shape``
      (:func:`operator_norm` with ``method``; ``"auto"`` = exact FFT where it applies, else power
      iteration).
    * ``||A^T - M^T||_{2,1}`` is the sum over the columns of ``(A - M)^T``, i.e. over the rows of
      ``A - M`` (one per output unit), of their l2 norms. For a convolution ``A`` and ``M`` are the
      kernels reshaped to ``(c_out, c_in/groups * prod(kernel_size))``: the sum over output channels of
      the l2 norm of the filter change. (This is the kernel matrix, not the full operator; for circular
      padding the operator's (2,1) norm is the number of output positions times this.)

    Args:
        model: the network.
        reference: a model of the same architecture or a state dict holding ``"<layer>.weight"``.
        input_shape: one input without batch dimension; required when the model has convolutions.
        method: passed to :func:`operator_norm` for convolutions.

    Returns:
        :class:`SpectralComplexity` ``(value, spectral_norms, l21_distances)``; NaN where a weight is
        non-finite or a spectral norm is 0.

    Raises:
        ValueError: no Linear/Conv layer, missing or mis-shaped reference weight, no ``input_shape`` for
            a convolutional model, or a convolution not called on ``input_shape``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> init = {k: v.clone() for k, v in net.state_dict().items()}
        >>> spectral_complexity(net, init).value  # at initialisation the distances vanish
        0.0
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, *CONV_TYPES))]
    if not layers:
        raise ValueError("spectral_complexity found no nn.Linear or nn.Conv1d/2d/3d layer in the model")
    state = reference.state_dict() if isinstance(reference, nn.Module) else reference
    has_conv = any(isinstance(m, CONV_TYPES) for _, m in layers)
    if has_conv and input_shape is None:
        raise ValueError("input_shape is required for the operator norms of convolutional layers")
    shapes = layer_input_shapes(model, input_shape, CONV_TYPES) if has_conv else {}
    norms: dict[str, float] = {}
    distances: dict[str, float] = {}
    for name, module in layers:
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"reference has no entry {key!r}")
        a = module.weight.detach().to(torch.float64)
        m = state[key].detach().to(device=a.device, dtype=torch.float64)
        if m.shape != a.shape:
            raise ValueError(f"reference {key!r} has shape {tuple(m.shape)}, the model {tuple(a.shape)}")
        diff = (a - m).reshape(a.shape[0], -1)
        distances[name] = float(diff.norm(dim=1).sum())
        if isinstance(module, nn.Linear):
            norms[name] = float(torch.linalg.matrix_norm(a, ord=2)) if torch.isfinite(a).all() else math.nan
        else:
            if name not in shapes:
                raise ValueError(f"convolution {name!r} is not called when the model runs on {input_shape}")
            norms[name] = max(operator_norm(module, s, method=method).sigma_max for s in shapes[name])
    product = math.prod(norms.values())
    try:
        total = sum((distances[n] / norms[n]) ** (2.0 / 3.0) for n in norms)
        value = product * total**1.5
    except ZeroDivisionError:
        value = math.nan
    return SpectralComplexity(value, norms, distances)


def normalized_margins(
    logits: Tensor, targets: Tensor, complexity: float | SpectralComplexity, inputs: Tensor
) -> Tensor:
    """Margins normalised by the spectral complexity (Bartlett, Foster & Telgarsky, 2017).

    ``margin(x, y) = f(x)_y - max_{j != y} f(x)_j``, divided by ``R_A * ||X||_F / n`` where ``X`` is the
    ``n x d`` matrix of the flattened inputs.

    Args:
        logits: ``(n, classes)`` network outputs, ``classes >= 2``.
        targets: ``(n,)`` integer labels.
        complexity: ``R_A`` as a float or a :class:`SpectralComplexity`.
        inputs: the ``n`` inputs (any shape with ``n`` first).

    Returns:
        ``(n,)`` tensor of normalised margins (negative for misclassified examples).

    Raises:
        ValueError: mismatched sizes or fewer than two classes.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> normalized_margins(logits, torch.tensor([0, 0]), 1.0, torch.ones(2, 2))  # R ||X||_F / n = 1
        tensor([ 2., -1.])
    """
    if isinstance(complexity, SpectralComplexity):
        complexity = complexity.value
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (n, classes >= 2), got {tuple(logits.shape)}")
    n = logits.shape[0]
    if targets.shape != (n,) or inputs.shape[0] != n:
        raise ValueError("logits, targets and inputs must hold the same number of examples")
    targets = targets.long().to(logits.device)
    true = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    margin = true - others.max(dim=1).values
    scale = float(complexity) * float(inputs.reshape(n, -1).to(torch.float64).norm()) / n
    return margin / scale
