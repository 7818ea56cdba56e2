"""The operator machinery shared by the spectral and Lipschitz measures: a layer as a linear map on its input.

A convolution (or ``nn.Linear``) applied to inputs of a given shape is the linear map :math:`A` of
:class:`LinearMap` (its forward and adjoint as the convolution and its transpose with the matching
``output_padding``). On it: power iteration and Lanczos on :math:`A^\top A` (lower bounds converging to
:math:`\\|A\\|_2`), the block-diagonalisation of a circular convolution by the DFT (Sedghi, Gupta & Long,
ICLR 2019, "The Singular Values of Convolutional Layers") and the Gram iteration upper bound on its blocks
(Delattre, Barthelemy, Araujo & Allauzen, ICML 2023, "Efficient Bound of Lipschitz Constant for
Convolutional Layers by Gram Iteration"), the operator norm of a padding, the Frobenius norm, and the input
shapes a model gives its layers. :mod:`lt_theory.measures.spectral` and :mod:`lt_theory.measures.lipschitz`
build their public functions on these. The Lanczos iteration itself (:func:`symmetric_lanczos`) takes any
symmetric operator given as a function: :mod:`lt_theory.measures.landscape` runs it on the loss Hessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_theory.measures.modes import eval_mode

__all__ = [
    "CONV_TYPES",
    "DEFAULT_ITERATIONS",
    "DEFAULT_TOLERANCE",
    "LinearMap",
    "adjoint_map",
    "block_singular_values",
    "compute_dtype",
    "conv_map",
    "frequency_plan",
    "frobenius_sq",
    "gram_upper_bound",
    "is_finite",
    "lanczos",
    "layer_input_shapes",
    "linear_map",
    "ntuple",
    "pad_operator_norm",
    "power_iteration",
    "random_unit",
    "start_vector",
    "symmetric_lanczos",
    "top_singular_pair",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
DEFAULT_ITERATIONS = {"power": 100, "gram": 20, "lanczos": 100}
DEFAULT_TOLERANCE = {"power": 1e-6, "gram": 1e-7, "lanczos": 1e-7}


@dataclass(frozen=True)
class LinearMap:
    """The linear part of a Linear/Conv layer on inputs of one shape (batch dimension excluded)."""

    weight: Tensor  # detached
    input_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    pads: tuple[tuple[int, int], ...] = ()  # (left, right) per spatial dimension
    padding_mode: str = "zeros"

    @property
    def is_linear(self) -> bool:
        return self.weight.dim() == 2

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.is_linear:
            return (*self.input_shape[:-1], self.weight.shape[0])
        sizes = []
        for n, (left, right), k, s, d in zip(
            self.input_shape[1:], self.pads, self.kernel_size, self.stride, self.dilation
        ):
            sizes.append((n + left + right - d * (k - 1) - 1) // s + 1)
        return (self.weight.shape[0], *sizes)

    @property
    def in_numel(self) -> int:
        return math.prod(self.input_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.output_shape)

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """``A x`` for a batch ``x`` of shape ``(B, *input_shape)``."""
        if self.is_linear:
            return F.linear(x, weight)
        conv = _CONV_FUNCTIONS[self.nd]
        if all(left == right for left, right in self.pads) and self.padding_mode == "zeros":
            return conv(x, weight, None, self.stride, [p[0] for p in self.pads], self.dilation, self.groups)
        if any(left or right for left, right in self.pads):
            flat = [v for pair in reversed(self.pads) for v in pair]
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, flat, mode=mode)
        return conv(x, weight, None, self.stride, 0, self.dilation, self.groups)

    @property
    def has_direct_adjoint(self) -> bool:
        return self.is_linear or self.padding_mode == "zeros"

    def apply_adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        """``A^T y`` for a batch ``y`` of shape ``(B, *output_shape)`` by one transposed convolution (or
        matrix product). Only where :attr:`has_direct_adjoint`: the adjoint of circular/reflect/replicate
        padding folds the padded border back, for which the VJP of :meth:`apply` is used instead."""
        if self.is_linear:
            return torch.matmul(y, weight)
        if self.padding_mode != "zeros":
            raise NotImplementedError("the adjoint of a non-zero padding is taken by VJP")
        symmetric = all(left == right for left, right in self.pads)
        pads = [left if symmetric else 0 for left, _ in self.pads]
        sizes = [
            n if symmetric else n + left + right for n, (left, right) in zip(self.input_shape[1:], self.pads)
        ]
        extra = [
            n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, o, s, p, d, k in zip(
                sizes, self.output_shape[1:], self.stride, pads, self.dilation, self.kernel_size
            )
        ]  # input entries past the last window: transposed-convolution output_padding
        transpose = _CONV_TRANSPOSE_FUNCTIONS[self.nd]
        x = transpose(y, weight, None, self.stride, pads, extra, self.groups, self.dilation)
        if not symmetric:
            crop = [slice(None), slice(None)]
            crop += [slice(left, left + n) for n, (left, _) in zip(self.input_shape[1:], self.pads)]
            x = x[tuple(crop)]
        return x


def ntuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"{name}={value} does not have {n} entries")
    return value


def conv_map(
    weight: Tensor,
    input_shape: Sequence[int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> LinearMap:
    nd = weight.dim() - 2
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != nd + 1:
        raise ValueError(
            f"input_shape={input_shape} must be (channels, *spatial) with {nd} spatial dimension(s) for a "
            f"{nd}-d convolution (no batch dimension)"
        )
    if input_shape[0] != weight.shape[1] * groups:
        raise ValueError(
            f"input_shape={input_shape} has {input_shape[0]} channels, the layer expects "
            f"{weight.shape[1] * groups}"
        )
    kernel = tuple(weight.shape[2:])
    stride = ntuple(stride, nd, "stride")
    dilation = ntuple(dilation, nd, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            raise ValueError(f"padding={padding!r}: expected an int, a tuple, 'same' or 'valid'")
    else:
        pads = tuple((p, p) for p in ntuple(padding, nd, "padding"))
    op = LinearMap(weight.detach(), input_shape, stride, dilation, int(groups), pads, padding_mode)
    if any(s < 1 for s in op.output_shape):
        raise ValueError(f"input_shape={input_shape} is too small for this convolution")
    return op


def linear_map(layer: nn.Module, input_shape: Sequence[int]) -> LinearMap:
    input_shape = tuple(int(s) for s in input_shape)
    if isinstance(layer, nn.Linear):
        if len(input_shape) < 1 or input_shape[-1] != layer.in_features:
            raise ValueError(
                f"input_shape={input_shape} must end with in_features={layer.in_features} for {layer}"
            )
        return LinearMap(layer.weight.detach(), input_shape)
    if isinstance(layer, CONV_TYPES):
        return conv_map(
            layer.weight,
            input_shape,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.padding_mode,
        )
    raise TypeError(f"expected nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(layer).__name__}")


def compute_dtype(weight: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


def random_unit(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Gaussian draw from ``generator`` (a fresh seeded one if None, never the global RNG)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device)
    return v.to(device)


# --------------------------------------------------------------------------------------------------
# Padding, Frobenius norm
# --------------------------------------------------------------------------------------------------


def _pad_source_index(n: int, left: int, right: int, mode: str) -> Tensor:
    """For each position of the padded axis, the input index it copies (-1 for a constant)."""
    index = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
    if left or right:
        if mode in ("zeros", "constant"):
            index = F.pad(index, (left, right), value=-1.0)
        else:
            index = F.pad(index, (left, right), mode=mode)
    return index.reshape(-1).long()


def pad_operator_norm(sizes: Sequence[int], pads: Sequence[tuple[int, int]], mode: str) -> float:
    """Exact ``||Pad||_2`` of a padding: the padding matrix is a Kronecker product of 0/1 matrices with
    one 1 per row, so its norm is ``prod_j sqrt(max copies of an entry along j)``."""
    if mode in ("zeros", "constant"):
        return 1.0
    copies = 1
    for n, (left, right) in zip(sizes, pads):
        source = _pad_source_index(n, left, right, mode)
        copies *= int(torch.bincount(source[source >= 0], minlength=n).max())
    return math.sqrt(copies)


def frobenius_sq(op: LinearMap) -> float:
    w = op.weight.to(torch.float64)
    if op.is_linear:
        return math.prod(op.input_shape[:-1]) * float(w.square().sum())
    channels = w.reshape(w.shape[0] * w.shape[1], *op.kernel_size)
    t = channels
    for j in range(op.nd):
        n, (left, right) = op.input_shape[1 + j], op.pads[j]
        source = _pad_source_index(n, left, right, op.padding_mode).to(w.device)
        out, k, s, d = op.output_shape[1 + j], op.kernel_size[j], op.stride[j], op.dilation[j]
        positions = torch.arange(out, device=w.device)[:, None] * s + torch.arange(k, device=w.device) * d
        read = source[positions]  # (out, k): input index read by tap a at output i, -1 for zero padding
        same = (read[:, :, None] == read[:, None, :]) & (read[:, :, None] >= 0)
        q = same.sum(0).to(torch.float64)
        t = torch.tensordot(t, q, dims=([1], [0]))  # contracts the current first spatial axis
    return float((channels * t).sum())


# --------------------------------------------------------------------------------------------------
# Frequency blocks (Sedghi et al.) and Gram iteration (Delattre et al.)
# --------------------------------------------------------------------------------------------------


class _FrequencyPlan(NamedTuple):
    blocks: Tensor  # (groups, frequencies, m, n), float64 or complex128
    factor: float  # ||A|| <= factor * max_block ||block|| (1 when exact)
    exact: bool  # the blocks are exactly a unitary block-diagonalisation of A
    copies: int  # each block appears this many times in A (pointwise convs and Linear on (..., f))
    reason: str  # why the plan is not exact


def _circulant_blocks(
    w: Tensor,
    groups: int,
    stride: Sequence[int],
    dilation: Sequence[int],
    sizes: Sequence[int],
    offsets: Sequence[int],
) -> Tensor:
    """Polyphase frequency blocks of ``S_N C_N`` (stride subsampling of an N-point circular conv)."""
    cout, cin_g = w.shape[:2]
    kernel = w.shape[2:]
    nd = len(kernel)
    h = w
    for j in range(nd):
        place = torch.zeros(kernel[j], sizes[j], dtype=w.dtype, device=w.device)
        taps = torch.arange(kernel[j], device=w.device)
        columns = (taps * dilation[j] - offsets[j]) % sizes[j]
        ones = torch.ones(kernel[j], dtype=w.dtype, device=w.device)
        place.index_put_((taps, columns), ones, accumulate=True)  # taps alias if the kernel wraps
        h = torch.tensordot(h, place, dims=([2], [0]))  # the spatial axes rotate into place
    khat = torch.fft.fftn(h, dim=tuple(range(2, 2 + nd)))
    folded = [sizes[j] // stride[j] for j in range(nd)]
    split = [cout, cin_g]
    for j in range(nd):
        split += [stride[j], folded[j]]  # frequency u = t * (N/s) + u'
    khat = khat.reshape(split)
    perm = [3 + 2 * j for j in range(nd)] + [0, 1] + [2 + 2 * j for j in range(nd)]
    khat = khat.permute(perm)
    n_freq, phases = math.prod(folded), math.prod(stride)
    khat = khat.reshape(n_freq, groups, cout // groups, cin_g * phases).transpose(0, 1)
    return khat / math.sqrt(phases)


def frequency_plan(op: LinearMap) -> _FrequencyPlan:
    w = op.weight.to(torch.float64)
    if op.is_linear:
        return _FrequencyPlan(w[None, None], 1.0, True, math.prod(op.input_shape[:-1]), "")
    groups, nd = op.groups, op.nd
    sizes = op.input_shape[1:]
    kernel, stride, dilation, pads = op.kernel_size, op.stride, op.dilation, op.pads
    cout, cin_g = w.shape[:2]
    if all(k == 1 for k in kernel) and all(p == (0, 0) for p in pads):
        blocks = w.reshape(groups, 1, cout // groups, cin_g)
        return _FrequencyPlan(blocks, 1.0, True, math.prod(op.output_shape[1:]), "")
    preserving = all(left + right == d * (k - 1) for (left, right), d, k in zip(pads, dilation, kernel))
    if op.padding_mode == "circular" and preserving:
        offsets = [left for left, _ in pads]
        if all(n % s == 0 for n, s in zip(sizes, stride)):
            blocks = _circulant_blocks(w, groups, stride, dilation, sizes, offsets)
            return _FrequencyPlan(blocks, 1.0, True, 1, "")
        blocks = _circulant_blocks(w, groups, (1,) * nd, dilation, sizes, offsets)
        reason = f"the stride {stride} does not divide the input size {tuple(sizes)}"
        return _FrequencyPlan(blocks, 1.0, False, 1, reason)
    padded = [n + left + right for n, (left, right) in zip(sizes, pads)]
    periods = [-(-p // s) * s for p, s in zip(padded, stride)]
    blocks = _circulant_blocks(w, groups, stride, dilation, periods, [0] * nd)
    factor = pad_operator_norm(sizes, pads, op.padding_mode)
    if op.padding_mode == "circular":
        needed = [d * (k - 1) for d, k in zip(dilation, kernel)]
        reason = (
            f"the circular padding {pads} does not keep the input size (it would need a total of "
            f"dilation*(kernel_size-1) = {needed} per dimension)"
        )
    else:
        reason = f"padding_mode={op.padding_mode!r} with padding {pads} and kernel {kernel} is not circulant"
    return _FrequencyPlan(blocks, factor, False, 1, reason)


def gram_upper_bound(blocks: Tensor, n_iter: int, tol: float) -> tuple[float, int]:
    """Certified ``max_b sigma_max(block_b)`` bound by rescaled Gram iteration; returns (bound, steps)."""
    m, n = blocks.shape[-2:]
    g = blocks.reshape(-1, m, n)
    log_scale = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    best, previous, steps = math.inf, math.inf, 0
    for t in range(n_iter + 1):
        r = torch.linalg.matrix_norm(g).to(torch.float64)  # Frobenius
        bound = float(torch.exp(log_scale + torch.log(r) / 2.0**t).max())
        best = min(best, bound)
        steps = t
        if t == n_iter or not math.isfinite(bound) or bound == 0.0:
            break
        if previous - bound <= tol * bound:
            break
        previous = bound
        safe = torch.where(r > 0, r, torch.ones_like(r))
        log_scale = log_scale + torch.log(safe) / 2.0**t
        g = g / safe.to(g.dtype)[:, None, None]
        if t == 0 and g.shape[-2] < g.shape[-1]:
            g = g @ g.mH  # the smaller Gram matrix: same non-zero spectrum
        else:
            g = g.mH @ g
    return best, steps


def block_singular_values(plan: _FrequencyPlan, op: LinearMap) -> Tensor:
    """All ``min(out, in)`` singular values of an exactly block-diagonalised operator, descending."""
    values = torch.linalg.svdvals(plan.blocks).reshape(-1)
    if plan.copies > 1:
        values = values.repeat(plan.copies)
    missing = min(op.out_numel, op.in_numel) - values.numel()
    if missing > 0:  # input positions no output reads (strided 1x1 convolution)
        values = torch.cat([values, values.new_zeros(missing)])
    return values.sort(descending=True).values


# --------------------------------------------------------------------------------------------------
# Power iterations
# --------------------------------------------------------------------------------------------------


def adjoint_map(op: LinearMap, weight: Tensor) -> Callable[[Tensor], Tensor]:
    """``y -> A^T y`` for batches of one: a transposed convolution (zero padding, Linear), else the
    pull-back of the forward's VJP, taken once at 0 (``A`` is linear, so it is ``A^T`` everywhere)."""
    if op.has_direct_adjoint:
        return lambda y: op.apply_adjoint(y, weight)
    zero = torch.zeros((1, *op.input_shape), dtype=weight.dtype, device=weight.device)
    with torch.no_grad():  # the pull-back then records no graph of its own
        _, pullback = torch.func.vjp(lambda x: op.apply(x, weight), zero)
    return lambda y: pullback(y)[0]


def power_iteration(
    op: LinearMap,
    n_iter: int,
    tol: float,
    init: Tensor | None,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    smallest_shift: float | None = None,
) -> tuple[float, Tensor, int]:
    """Power iteration on ``A^T A`` (or on ``c I - A^T A`` when ``smallest_shift=c``).

    Returns ``(||A v||, v, iterations)`` for the final unit vector ``v``.
    """
    cdtype = compute_dtype(op.weight, dtype)
    weight = op.weight.to(cdtype)
    device = weight.device

    def forward(x: Tensor) -> Tensor:
        return op.apply(x, weight)

    adjoint = adjoint_map(op, weight)

    with torch.no_grad():
        if init is not None:
            if init.numel() != op.in_numel:
                raise ValueError(
                    f"init has {init.numel()} entries, input_shape={op.input_shape} has {op.in_numel}"
                )
            v = init.detach().to(device=device, dtype=cdtype).reshape(1, *op.input_shape).clone()
            if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
                v = None
        else:
            v = None
        if v is None:
            v = random_unit((1, *op.input_shape), cdtype, device, generator)
        v = v / v.norm()
        previous = None
        it = 0
        for it in range(1, n_iter + 1):
            u = forward(v)
            sigma = float(u.norm())
            if not math.isfinite(sigma):
                return math.nan, v[0], it
            if sigma == 0.0:  # A = 0, or (smallest) v spans part of the kernel of A
                return 0.0, v[0], it
            if it == n_iter or (tol > 0 and previous is not None and abs(sigma - previous) <= tol * sigma):
                break
            previous = sigma
            if smallest_shift is None:
                w = adjoint(u / sigma)
            else:
                w = smallest_shift * smallest_shift * v - adjoint(u)
            norm = float(w.norm())
            if norm == 0.0 or not math.isfinite(norm):
                break
            v = w / norm
        return sigma, v[0], it


def start_vector(
    init: Tensor | None,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    space: str,
) -> Tensor:
    """The flat start of an iteration on a space of ``n`` entries: ``init`` when it is usable (finite, nonzero),
    else a Gaussian draw from ``generator`` (:func:`random_unit`); ``space`` names the space in the error of an
    ``init`` of another size."""
    start = None if init is None else init.detach().to(device=device, dtype=dtype).reshape(-1)
    if start is not None and start.numel() != n:
        raise ValueError(f"init has {start.numel()} entries, {space} has {n}")
    if start is None or not bool(torch.isfinite(start).all()) or float(start.norm()) == 0.0:
        start = random_unit((n,), dtype, device, generator)
    return start


def symmetric_lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    n_iter: int,
    tol: float,
    smallest: bool = False,
    check_every: int = 10,
) -> tuple[Tensor, Tensor, int]:
    """Ritz values of a symmetric operator ``S`` by Lanczos with full reorthogonalisation.

    ``matvec`` maps a flat vector of ``start``'s size and dtype to ``S x``; ``start`` is a nonzero flat vector
    (normalised here). Returns ``(values, vector, steps)``: the Ritz values in ascending order (float64), the
    unit Ritz vector of the largest one, and the steps taken. Cauchy interlacing puts every Ritz value in
    ``[lambda_min, lambda_max]`` of ``S``: the largest is a lower bound of the largest (algebraic) eigenvalue,
    the smallest an upper bound of the smallest. Stops after ``min(n_iter, size)`` steps, at an invariant
    subspace (the Ritz values are then eigenvalues), or when the residual ``||S y - theta y||`` of the largest
    (and, with ``smallest``, the smallest) Ritz pair is at most ``tol * |theta|`` (checked every ``check_every``
    steps, an eigendecomposition of the small tridiagonal matrix: 10 suits cheap products, 1 expensive ones; an
    eigenvalue of ``S`` then lies within ``tol * |theta|`` of ``theta``). A step that is not finite ends it
    with NaN values and the (normalised) start as the vector. Keeps ``steps + 1`` vectors of ``start``'s size.
    """
    n = start.numel()
    steps = min(n_iter, n)
    basis = torch.empty(steps + 1, n, dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()

    def tridiagonal() -> Tensor:
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if len(alphas) > 1:
            off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        return t

    alphas: list[float] = []
    betas: list[float] = []
    with torch.no_grad():
        for j in range(steps):
            w = matvec(basis[j])
            alpha = float(w @ basis[j])
            alphas.append(alpha)
            w = w - alpha * basis[j]
            if j > 0:
                w = w - betas[-1] * basis[j - 1]
            before = float(w.norm())
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)  # full reorthogonalisation
            beta = float(w.norm())
            if beta < 0.7 * before:  # cancellation: a second pass ("twice is enough", Kahan/Parlett)
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
                beta = float(w.norm())
            if not (math.isfinite(alpha) and math.isfinite(beta)):
                return torch.full((j + 1,), math.nan, dtype=torch.float64), basis[0], j + 1
            if j + 1 == steps or beta <= 1e-13 * max(abs(a) for a in alphas):  # breakdown: exact
                break
            if (j + 1) % check_every == 0:
                # the residual ||S y - theta y|| of a Ritz pair is beta * |last entry of its
                # eigenvector of T|, and some eigenvalue lies within it of theta
                values, vectors = torch.linalg.eigh(tridiagonal())
                ends = (-1, 0) if smallest else (-1,)
                if all(beta * abs(float(vectors[-1, i])) <= tol * abs(float(values[i])) for i in ends):
                    break
            betas.append(beta)
            basis[j + 1] = w / beta
        values, vectors = torch.linalg.eigh(tridiagonal())
        k = len(alphas)
        ritz = basis[:k].T @ vectors[:, -1].to(dtype=start.dtype, device=start.device)
        ritz = ritz / ritz.norm()
    return values, ritz, k


def lanczos(
    op: LinearMap,
    n_iter: int,
    tol: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    smallest: bool = False,
    init: Tensor | None = None,
) -> tuple[float, float, Tensor, int]:
    """Extreme Ritz values of ``A^T A`` by :func:`symmetric_lanczos`.

    Returns ``(sigma_max, sigma_min, vector, steps)``: ``sigma_max = ||A y||`` for the unit Ritz vector
    ``y`` (shape ``input_shape``) of the largest Ritz value, a lower bound of ``||A||_2``;
    ``sigma_min = sqrt(theta_min)``, an upper bound of ``min_{||x||=1} ||A x||`` (Cauchy interlacing puts
    every Ritz value in ``[lambda_min, lambda_max]`` of ``A^T A``); both converge much faster than power
    iterations (on ``A^T A`` and on ``c I - A^T A``) do. Stops after ``n_iter`` steps, at an invariant
    subspace, or when the residual ``||A^T A y - theta y||`` of the largest (and, with ``smallest``, the
    smallest) Ritz pair is at most ``tol * theta`` (checked every 10 steps; an eigenvalue of ``A^T A`` then
    lies within ``tol * theta`` of ``theta``). Starts from ``init`` when it is given and usable, else from
    a random vector. Keeps ``n_iter + 1`` vectors of the input's size.
    """
    weight = op.weight.to(dtype)
    start = start_vector(init, op.in_numel, dtype, weight.device, generator, f"input_shape={op.input_shape}")
    adjoint = adjoint_map(op, weight)

    def forward(x: Tensor) -> Tensor:
        return op.apply(x.reshape(1, *op.input_shape), weight)

    def gram(x: Tensor) -> Tensor:  # A^T A x
        return adjoint(forward(x)).reshape(-1)

    values, ritz, steps = symmetric_lanczos(gram, start, n_iter, tol, smallest)
    if not bool(torch.isfinite(values).all()):
        return math.nan, math.nan, ritz.reshape(op.input_shape), steps
    with torch.no_grad():
        sigma_max = float(forward(ritz).norm())
    sigma_min = math.sqrt(max(float(values[0]), 0.0))
    return sigma_max, sigma_min, ritz.reshape(op.input_shape), steps


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def top_singular_pair(matrix: Tensor) -> tuple[float, Tensor | None]:
    """Exact ``sigma_max`` of a float64 matrix and its unit right singular vector (None when the matrix is
    0), from the top eigenpair of the smaller Gram matrix: several times faster than an SVD of a wide
    kernel matrix (512 x 4608: 70 ms against 540 ms on one CPU thread), and as accurate for ``sigma_max``."""
    rows, columns = matrix.shape
    if rows < columns:
        values, vectors = torch.linalg.eigh(matrix @ matrix.T)
        right = matrix.T @ vectors[:, -1]
    else:
        values, vectors = torch.linalg.eigh(matrix.T @ matrix)
        right = vectors[:, -1]
    sigma = math.sqrt(max(float(values[-1]), 0.0))
    norm = float(right.norm())
    return sigma, (right / norm if norm > 0 else None)


def is_finite(op: LinearMap) -> bool:
    """No NaN/Inf in the weight: NaN propagates through min/max and an Inf is the min or max. One pass,
    about ten times faster than ``torch.isfinite(w).all()`` (which checks twice and allocates)."""
    if op.weight.numel() == 0:
        return True
    low, high = torch.aminmax(op.weight)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def layer_input_shapes(model: nn.Module, input_shape: Sequence[int], types: tuple) -> dict[str, list]:
    """Input shapes (batch dimension dropped) of every call of the modules of ``types`` in one eval
    forward pass on zeros of shape ``(1, *input_shape)``; train flags are restored afterwards."""
    shapes: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, types):

            def hook(mod, args, name=name):
                shapes.setdefault(name, []).append(tuple(args[0].shape[1:]))

            handles.append(module.register_forward_pre_hook(hook))
    reference = next(iter(list(model.parameters()) + list(model.buffers())), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes
