r"""The empirical neural tangent kernel of a model on probe inputs, and how to compare kernels over training.

**Empirical NTK.** For a network :math:`f(\cdot;\theta): \mathbb{R}^d \to \mathbb{R}^O` with trainable
parameters :math:`\theta \in \mathbb{R}^P`, the empirical NTK (Jacot, Gabriel & Hongler, NeurIPS 2018,
"Neural Tangent Kernel: Convergence and Generalization in Neural Networks") on inputs :math:`x_i, x_j` is

.. math::
    K_{ij}^{ab} = \Big\langle \frac{\partial f_a(x_i)}{\partial\theta},
                             \frac{\partial f_b(x_j)}{\partial\theta} \Big\rangle
                = \sum_{p=1}^{P} J_{ia,p}\, J_{jb,p},

with :math:`J` the Jacobian of the outputs with respect to every parameter with ``requires_grad=True``.
:func:`empirical_ntk` returns one of three kernels:

- ``kind="full"``: :math:`K \in \mathbb{R}^{N_1 \times N_2 \times O \times O}`, the whole kernel. Its
  :math:`(N_1 O) \times (N_2 O)` matrix form (:func:`flatten_kernel`) is :math:`J_1 J_2^\top`.
- ``kind="trace"``: :math:`\bar K_{ij} = \frac1O \sum_a K_{ij}^{aa}`, the mean of the diagonal of each
  :math:`O \times O` block (the kernel of the outputs treated as independent tasks).
- ``kind="pntk"``: the pseudo-NTK or "sum of logits" kernel of Mohamadi, Bae & Sutherland (ICML 2023,
  "A Fast, Well-Founded Approximation to the Empirical Neural Tangent Kernel"), the NTK of the scalar
  function :math:`g = \frac{1}{\sqrt O} \sum_a f_a`:

  .. math::
      \mathrm{pNTK}_{ij} = \Big\langle \nabla_\theta \tfrac{1}{\sqrt O}\textstyle\sum_a f_a(x_i),\,
                                       \nabla_\theta \tfrac{1}{\sqrt O}\textstyle\sum_b f_b(x_j) \Big\rangle
                         = \frac1O \sum_{a,b} K_{ij}^{ab}.

  It is the mean over the :math:`O` rows of each block of that row's sum, i.e. the sum of all
  :math:`O^2` entries divided by :math:`O` (not by :math:`O^2`). With this normalisation, where the
  off-diagonal entries of the blocks vanish and the diagonal ones are equal (what the paper proves at
  initialisation for a wide readout layer, :math:`K \approx \mathrm{pNTK} \otimes I_O`), the pNTK equals
  the trace kernel. It costs one backward pass per example instead of :math:`O`.

**Computation.** Jacobians come from :mod:`torch.func` (``vmap`` over examples of ``jacrev``, or of
``grad`` of the summed outputs for the pNTK) through ``functional_call`` on detached parameters, with the
model in eval mode: BatchNorm uses its running statistics, so that the kernel of an example does not depend
on the other examples of the batch (the training-mode kernel does, through the batch statistics), and dropout
is off. The modules' train/eval flags are restored afterwards, ``.grad`` is never written, BatchNorm
statistics are not updated and the global RNG state is left as it was (``torch.random.fork_rng``).

Memory is bounded by a budget of :math:`H` per-example Jacobians alive at once (``memory_budget`` bytes
divided by :math:`O' P b`, with :math:`O' = O` for the full and trace kernels and 1 for the pNTK, :math:`P`
the number of trainable parameters and :math:`b = 4` or 8 bytes in float32 or float64). Jacobians are
computed ``c`` examples per vectorised call (``chunk_size``). The kernel is filled block by block,
:math:`K[r, s] = \sum_{\text{parameters}} J_r J_s^\top` (accumulated in place, parameter by parameter): a
*panel* of :math:`H - c` examples of one side is computed once and kept while the other side's examples
stream past it ``c`` at a time, so that

.. math::
    \text{memory} \approx H\, O' P\, b \le \texttt{memory\_budget} \text{ bytes}
    \quad (\text{at least } 2\, c\, O' P\, b),

plus the activations of :math:`c\,O'` backward passes and the kernel itself (:math:`N_1 N_2 O^2` or
:math:`N_1 N_2` numbers). With panels of :math:`w = H - c` examples, a symmetric kernel costs about
:math:`N/2 + N^2 / (2 w)` per-example Jacobians, and only :math:`N` when :math:`N \le w` (only blocks on and
above the diagonal are computed, the others are their transposes); a cross kernel costs
:math:`N_1 + \lceil N_1 / w \rceil N_2` with panels of :math:`x_1`, or the same with the roles swapped,
whichever is fewer. The contraction itself costs :math:`N_1 N_2 P` multiply-adds times :math:`O^2` (full),
:math:`O` (trace) or 1 (pNTK), about half of it for a symmetric kernel. ResNet-20 (0.27M parameters) with
:math:`O = 10` in float32 needs 10.8 MB per example for the full kernel, so the default budget of 256 MiB
keeps 24 examples; ResNet-18 (11M parameters) needs 440 MB per example for the full kernel and 44 MB for the
pNTK (raise ``memory_budget`` on a large GPU: below two examples' worth, each block recomputes Jacobians).

**Comparing kernels.**

- :func:`kernel_distance` (Fort, Dziugaite, Paul, Kharaghani, Roy & Ganguli, NeurIPS 2020, "Deep learning
  versus kernel learning: an empirical study of loss landscape geometry and the time evolution of the Neural
  Tangent Kernel"): :math:`S(K_1, K_2) = 1 - \langle K_1, K_2\rangle_F / (\|K_1\|_F \|K_2\|_F)`.
- :func:`relative_change` (Lee, Xiao, Schoenholz, Bahri, Novak, Sohl-Dickstein & Pennington, NeurIPS 2019,
  "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent"):
  :math:`\|K_t - K_0\|_F / \|K_0\|_F`; it goes to zero with the width in the lazy (kernel) regime.
- :func:`kernel_alignment`: kernel-target alignment (Cristianini, Shawe-Taylor, Elisseeff & Kandola,
  NIPS 2001, proceedings 2002, "On Kernel-Target Alignment") with the target kernel :math:`YY^\top` of one-hot
  labels, centred as in Cortes, Mohri & Rostamizadeh (JMLR 2012, "Algorithms for Learning Kernels Based on
  Centered Alignment"): :math:`A = \langle HKH, HYY^\top H\rangle_F / (\|HKH\|_F \|HYY^\top H\|_F)` with
  :math:`H = I - \frac1N \mathbf{1}\mathbf{1}^\top`.
- :func:`kernel_spectrum`: top eigenvalues, trace, the entropy effective rank of Roy & Vetterli (EUSIPCO
  2007, "The effective rank: a measure of effective dimensionality"), and the condition number.

Metrics take an :math:`N_1 \times N_2` kernel or a 4-D full kernel, which they read as its
:math:`(N_1 O) \times (N_2 O)` matrix (:func:`flatten_kernel`), except :func:`kernel_alignment`, which
reduces a full kernel to its trace kernel (labels index examples, not outputs). NaN or Inf in a kernel gives
NaN results, and a zero kernel, for which the quantities are undefined, gives NaN, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from lt_theory.checks import check_positive_int, check_tensor
from lt_theory.measures.modes import eval_mode, forked_rng

__all__ = [
    "KERNEL_KINDS",
    "KernelSpectrum",
    "empirical_ntk",
    "flatten_kernel",
    "kernel_alignment",
    "kernel_distance",
    "kernel_spectrum",
    "relative_change",
]

KERNEL_KINDS = ("full", "trace", "pntk")
"""The kernels :func:`empirical_ntk` computes."""

DEFAULT_MEMORY_BUDGET = 1 << 28
"""Bytes of per-example Jacobians that :func:`empirical_ntk` keeps alive at once by default (256 MiB)."""

BACKWARD_PASSES_PER_CHUNK = 64
"""Backward passes (examples times Jacobian rows) that one vectorised Jacobian call makes by default: enough
to keep the arithmetic efficient, few enough that the activations stay small (measured on ResNet-20 on a CPU:
the time per example is flat from 32 to 128 passes and grows beyond)."""


# ------------------------------------------------------------------------------------------------------------
# Argument checks.


def _float(kernel: Tensor) -> Tensor:
    """The kernel in a floating dtype of at least float32 (half precision is promoted)."""
    if kernel.dtype in (torch.float32, torch.float64):
        return kernel
    return kernel.to(torch.float32)


def _matrix(kernel: object, name: str) -> Tensor:
    """A 2-D kernel as is, a 4-D full kernel as its flattened matrix; anything else raises ``ValueError``."""
    kernel = check_tensor(name, kernel)
    if kernel.ndim == 4:
        return _float(flatten_kernel(kernel))
    if kernel.ndim != 2:
        raise ValueError(
            f"`{name}` must be a kernel of shape (N1, N2) or (N1, N2, O, O), got shape {tuple(kernel.shape)}"
        )
    return _float(kernel)


def _matrix_pair(first: object, second: object, first_name: str, second_name: str) -> tuple[Tensor, Tensor]:
    """Two kernels of the same shape as matrices (:func:`_matrix`) of their common dtype."""
    first, second = check_tensor(first_name, first), check_tensor(second_name, second)
    if first.shape != second.shape:
        raise ValueError(
            f"`{second_name}` must have the shape of `{first_name}`, {tuple(first.shape)}, got {tuple(second.shape)}"
        )
    a, b = _matrix(first, first_name), _matrix(second, second_name)
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _nan(like: Tensor, *shape: int) -> Tensor:
    return torch.full(shape, math.nan, dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------------------------------------------------
# The empirical NTK.


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    kind: str = "pntk",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    r"""Empirical NTK of ``model`` between ``x1`` and ``x2``, over all parameters with ``requires_grad=True``.

    ``K[i, j, a, b] = <d f_a(x1[i]) / d theta, d f_b(x2[j]) / d theta>``; ``"trace"`` is
    ``mean_a K[i, j, a, a]`` and ``"pntk"`` is ``sum_{a, b} K[i, j, a, b] / O`` (see the module docstring).
    The model is evaluated in eval mode, one example at a time, and left exactly as it was: train/eval
    flags (restored even on error), parameters, ``.grad``, buffers (BatchNorm running statistics) and the
    global RNG state are untouched. The model must map ``n`` inputs to an output of shape ``(n, O)``, or
    ``(n,)`` for a single output (``O = 1``).

    Memory: the per-example Jacobians alive at once, ``O' * P * bytes_per_element`` each (``O' = O`` for
    ``"full"`` and ``"trace"``, ``O' = 1`` for ``"pntk"``, ``P`` the number of trainable parameters), stay
    within ``memory_budget`` bytes, or two chunks of ``chunk_size`` examples if that is more. Jacobians
    that do not fit are recomputed (module docstring).

    Args:
        model: the network; its parameters and buffers determine the device and dtype. Inputs are moved to
            that device; they must have a dtype the model accepts (float64 inputs for a float64 model).
        x1: inputs of shape ``(N1, *input_shape)``.
        x2: inputs of shape ``(N2, *input_shape)``, or None (or ``x1`` itself) for the symmetric kernel of
            ``x1`` with itself, of which only the blocks on and above the diagonal are computed.
        kind: ``"full"``, ``"trace"`` or ``"pntk"``.
        chunk_size: examples whose Jacobians one vectorised call computes; None picks about
            ``64 / O'`` (64 backward passes per call, at most a fourth of ``memory_budget``).
        memory_budget: bytes of Jacobian kept alive at once (default 256 MiB).

    Returns:
        The kernel in the parameters' dtype and device: shape ``(N1, N2, O, O)`` for ``"full"``,
        ``(N1, N2)`` for ``"trace"`` and ``"pntk"``, with ``N2 = N1`` when ``x2`` is None.

    Raises:
        ValueError: if ``kind`` is not one of ``"full"``, ``"trace"``, ``"pntk"``; ``chunk_size`` or
            ``memory_budget`` is not a positive int; ``x1`` or ``x2`` is not a tensor with a batch dimension
            of at least one example; the shapes of ``x1`` and ``x2`` differ past the first dimension; the
            model has no trainable parameter; or its output is not a tensor of shape ``(n, O)`` or ``(n,)``
            for ``n`` inputs (the message gives the shape it got).
        RuntimeError: from ``torch.func.vmap`` if the model draws random numbers in eval mode (its NTK is
            not defined); the global RNG state is still left as it was.

    Example:
        >>> import torch
        >>> from lt_theory.models import MLP
        >>> model = MLP((4,), hidden=(8,), num_classes=3)
        >>> x = torch.randn(5, 4)
        >>> empirical_ntk(model, x).shape
        torch.Size([5, 5])
        >>> empirical_ntk(model, x, x[:2], kind="full", chunk_size=2).shape
        torch.Size([5, 2, 3, 3])
    """
    if kind not in KERNEL_KINDS:
        raise ValueError(f"`kind` must be one of {KERNEL_KINDS}, got {kind!r}")
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_positive_int("memory_budget", memory_budget)
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    symmetric = x2 is None or x2 is x1
    x1 = check_tensor("x1", x1)
    if x1.ndim < 1 or x1.shape[0] < 1:
        raise ValueError(f"`x1` must have a batch dimension with at least one example, got {tuple(x1.shape)}")
    if not symmetric:
        x2 = check_tensor("x2", x2)
        if x2.ndim != x1.ndim or x2.shape[1:] != x1.shape[1:] or x2.shape[0] < 1:
            raise ValueError(
                f"`x2` must hold at least one example of the shape of `x1`'s, {tuple(x1.shape[1:])}, "
                f"got {tuple(x2.shape)}"
            )

    named = list(model.named_parameters())
    params = {name: p.detach() for name, p in named if p.requires_grad}
    if not params:
        raise ValueError("`model` has no parameter with requires_grad=True: its NTK is empty")
    constants = {name: p.detach() for name, p in named if not p.requires_grad}
    constants.update({name: b.detach() for name, b in model.named_buffers()})
    first = next(iter(params.values()))
    device = first.device
    x1 = x1.detach().to(device)
    x2 = x1 if symmetric else x2.detach().to(device)

    def output(p: dict[str, Tensor], x: Tensor) -> Tensor:
        """The output of the model on one example, as a vector of its ``O`` numbers."""
        return functional_call(model, (p, constants), (x.unsqueeze(0),)).reshape(-1)

    with eval_mode(model), forked_rng(device):
        num_outputs = _num_outputs(model, params, constants, x1[:2])
        rows = 1 if kind == "pntk" else num_outputs
        per_example = rows * sum(p.numel() for p in params.values()) * first.element_size()
        chunk, held = _plan(per_example, memory_budget, chunk_size, rows, max(x1.shape[0], x2.shape[0]))

        if kind == "pntk":
            per_example_jacobian = vmap(grad(lambda p, x: output(p, x).sum()), in_dims=(None, 0))
        else:
            per_example_jacobian = vmap(jacrev(output), in_dims=(None, 0))

        def jacobian(x: Tensor) -> list[Tensor]:
            """Per-parameter Jacobians of a chunk, each of shape (c, rows, numel of the parameter)."""
            jac = per_example_jacobian(params, x)
            return [j.reshape(x.shape[0], rows, -1) for j in jac.values()]

        kernel = _blockwise_kernel(jacobian, x1, x2, symmetric, kind, num_outputs, chunk, held)
    if kind == "pntk":
        kernel = kernel / num_outputs
    return kernel


def _num_outputs(model: nn.Module, params: dict, constants: dict, x: Tensor) -> int:
    """``O`` for a model whose output on ``n`` inputs has shape ``(n, O)`` or ``(n,)``; else ``ValueError``."""
    with torch.no_grad():
        out = functional_call(model, (params, constants), (x,))
    n = x.shape[0]
    if not isinstance(out, Tensor) or out.ndim not in (1, 2) or out.shape[0] != n:
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise ValueError(
            f"`model` must return a tensor of shape (n, O) (or (n,) for one output) for n inputs, got {got} "
            f"for {n} input{'s' if n > 1 else ''} of shape {tuple(x.shape[1:])}"
        )
    return 1 if out.ndim == 1 else out.shape[1]


def _plan(per_example: int, budget: int, chunk_size: int | None, rows: int, n: int) -> tuple[int, int]:
    """``(chunk, held)``: examples per vectorised Jacobian call, and per-example Jacobians kept at once.

    ``held`` is what fits in ``budget`` bytes, and at least two chunks; ``chunk`` is ``chunk_size`` or, when
    None, about ``BACKWARD_PASSES_PER_CHUNK / rows`` examples, at most a fourth of ``held``.
    """
    fit = budget // max(per_example, 1)
    if chunk_size is None:
        chunk_size = max(1, min(BACKWARD_PASSES_PER_CHUNK // rows, fit // 4))
    chunk = min(chunk_size, n)
    return chunk, max(2 * chunk, fit)


def _contract(left: list[Tensor], right: list[Tensor], kind: str) -> Tensor:
    """Sum over parameters of the products of two Jacobian blocks, as a (c1, c2[, O, O]) kernel block.

    Each list holds per-parameter tensors of shape (c, rows, numel); products are accumulated in place in
    one matrix (``addmm_``), so the only allocation is the block itself.
    """
    c1, rows = left[0].shape[:2]
    c2 = right[0].shape[0]
    if kind == "full":
        block = left[0].new_zeros(c1 * rows, c2 * rows)
        for a, b in zip(left, right):
            block.addmm_(a.reshape(c1 * rows, -1), b.reshape(c2 * rows, -1).T)
        return block.reshape(c1, rows, c2, rows).permute(0, 2, 1, 3)
    block = left[0].new_zeros(c1, c2)
    for a, b in zip(left, right):
        for o in range(rows):  # the diagonal blocks only: "trace" needs K[i, j, o, o]; pntk has one row
            block.addmm_(a[:, o], b[:, o].T)
    return block / rows if kind == "trace" else block


def _transpose(block: Tensor) -> Tensor:
    """The block of the (j, i) pair from that of (i, j): K[j, i, b, a] = K[i, j, a, b]."""
    return block.permute(1, 0, 3, 2) if block.ndim == 4 else block.T


def _slices(start: int, stop: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, stop)) for s in range(start, stop, size)]


def _panel(jacobian: Callable[[Tensor], list[Tensor]], x: Tensor, chunk: int) -> list[Tensor]:
    """Jacobians of all of ``x``, computed ``chunk`` examples at a time into preallocated tensors."""
    panel = None
    for part in _slices(0, x.shape[0], chunk):
        jac = jacobian(x[part])
        if panel is None:
            panel = [j.new_empty((x.shape[0], *j.shape[1:])) for j in jac]
        for k in range(len(jac)):
            panel[k][part] = jac[k]
        del jac  # no reference to a chunk survives its copy into the panel
    return panel


def _blockwise_kernel(
    jacobian: Callable[[Tensor], list[Tensor]],
    x1: Tensor,
    x2: Tensor,
    symmetric: bool,
    kind: str,
    num_outputs: int,
    chunk: int,
    held: int,
) -> Tensor:
    """Fill the kernel with at most ``held`` per-example Jacobians alive: panels and streamed chunks.

    A panel of ``held - chunk`` examples of one side is computed once and kept; the other side's examples
    are streamed past it ``chunk`` at a time. Symmetric kernels compute the blocks on and above the diagonal
    only (within a panel in blocks of about a quarter of it) and mirror them. If one side fits whole
    (together with a chunk of the other), every Jacobian is computed once.
    """
    n1, n2 = x1.shape[0], x2.shape[0]
    shape = (n1, n2, num_outputs, num_outputs) if kind == "full" else (n1, n2)
    kernel = None

    def put(rows: slice, cols: slice, block: Tensor, mirror: bool) -> None:
        nonlocal kernel
        if kernel is None:
            kernel = block.new_empty(shape)
        if mirror:
            kernel[cols, rows] = _transpose(block)
        else:
            kernel[rows, cols] = block

    if symmetric:
        width = max(1, held - chunk)
        for panel_rows in _slices(0, n1, width):
            panel = _panel(jacobian, x1[panel_rows], chunk)
            start = panel_rows.start
            # blocks within the panel, upper triangle, in about four parts per side
            part = max(chunk, -(-(panel_rows.stop - start) // 4))
            parts = _slices(0, panel_rows.stop - start, part)
            for u, r in enumerate(parts):
                for c in parts[u:]:
                    block = _contract([p[r] for p in panel], [p[c] for p in panel], kind)
                    rows, cols = (
                        slice(start + r.start, start + r.stop),
                        slice(start + c.start, start + c.stop),
                    )
                    if r == c:
                        put(rows, cols, (block + _transpose(block)) / 2, mirror=False)
                    else:
                        put(rows, cols, block, mirror=False)
                        put(rows, cols, block, mirror=True)
            for cols in _slices(panel_rows.stop, n1, chunk):
                block = _contract(panel, jacobian(x1[cols]), kind)
                put(panel_rows, cols, block, mirror=False)
                put(panel_rows, cols, block, mirror=True)
            del panel
        return kernel

    # Cross kernel: keep panels of the side that needs fewer Jacobian evaluations, stream the other.
    width = max(1, held - chunk)
    cost_1 = n1 + -(-n1 // width) * n2  # panels of x1, x2 streamed
    cost_2 = n2 + -(-n2 // width) * n1
    swap = cost_2 < cost_1
    panel_x, stream_x = (x2, x1) if swap else (x1, x2)
    for panel_rows in _slices(0, panel_x.shape[0], width):
        panel = _panel(jacobian, panel_x[panel_rows], chunk)
        for cols in _slices(0, stream_x.shape[0], chunk):
            block = _contract(panel, jacobian(stream_x[cols]), kind)
            if swap:  # block = K(x2[panel_rows], x1[cols])
                put(panel_rows, cols, block, mirror=True)
            else:
                put(panel_rows, cols, block, mirror=False)
        del panel
    return kernel


# ------------------------------------------------------------------------------------------------------------
# Metrics.


def flatten_kernel(kernel: Tensor) -> Tensor:
    """The ``(N1 * O, N2 * O)`` matrix of a full ``(N1, N2, O, O)`` kernel: row ``i * O + a``, column
    ``j * O + b`` holds ``K[i, j, a, b]`` (example-major, the order of the flattened Jacobian ``J``).

    Args:
        kernel: a 4-D kernel as returned by ``empirical_ntk(..., kind="full")``.

    Returns:
        ``kernel.permute(0, 2, 1, 3).reshape(N1 * O, N2 * O)``.

    Raises:
        ValueError: if ``kernel`` is not a 4-D tensor.

    Example:
        >>> flatten_kernel(torch.zeros(5, 3, 2, 2)).shape
        torch.Size([10, 6])
    """
    kernel = check_tensor("kernel", kernel)
    if kernel.ndim != 4:
        raise ValueError(f"`kernel` must have shape (N1, N2, O1, O2), got {tuple(kernel.shape)}")
    n1, n2, o1, o2 = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)


def _unit(kernel: Tensor) -> Tensor:
    """The kernel divided by its Frobenius norm: NaN when the norm is zero, NaN or infinite."""
    norm = torch.linalg.vector_norm(kernel)
    return kernel / torch.where(torch.isfinite(norm) & (norm > 0), norm, math.nan)


def kernel_distance(K1: Tensor, K2: Tensor) -> Tensor:
    r"""Kernel distance of Fort et al. (2020): ``1 - <K1, K2>_F / (||K1||_F ||K2||_F)``.

    Computed as :math:`\frac12 \| K_1/\|K_1\|_F - K_2/\|K_2\|_F \|_F^2`, which equals it and keeps its
    precision when the kernels are close. It lies in [0, 2] ([0, 1] for entrywise non-negative kernels), is 0
    for ``K2 = c * K1`` with ``c > 0`` and ignores the kernels' scale.

    Args:
        K1: a kernel, ``(N1, N2)`` or ``(N1, N2, O, O)``.
        K2: a kernel of the same shape.

    Returns:
        A 0-d tensor; NaN if a kernel is zero or holds NaN or Inf.

    Raises:
        ValueError: if the shapes differ or are not those of a kernel.

    Example:
        >>> K = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> kernel_distance(K, 3 * K).abs() < 1e-7
        tensor(True)
        >>> kernel_distance(torch.eye(2), torch.ones(2, 2))  # 1 - 2 / (sqrt(2) * 2)
        tensor(0.2929)
    """
    a, b = _matrix_pair(K1, K2, "K1", "K2")
    return 0.5 * torch.linalg.vector_norm(_unit(a) - _unit(b)) ** 2


def relative_change(K_t: Tensor, K_0: Tensor) -> Tensor:
    """Relative change of the kernel from ``K_0`` (Lee et al., 2019): ``||K_t - K_0||_F / ||K_0||_F``.

    Args:
        K_t: the kernel now, ``(N1, N2)`` or ``(N1, N2, O, O)``.
        K_0: the reference kernel (at initialisation), of the same shape.

    Returns:
        A 0-d tensor; NaN if ``K_0`` is zero or either kernel holds NaN or Inf.

    Raises:
        ValueError: if the shapes differ or are not those of a kernel.

    Example:
        >>> K_0 = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> relative_change(K_0 + torch.eye(2), K_0)  # sqrt(2) / sqrt(10)
        tensor(0.4472)
    """
    ref, now = _matrix_pair(K_0, K_t, "K_0", "K_t")
    change = torch.linalg.vector_norm(now - ref)
    norm = torch.linalg.vector_norm(ref)
    ok = torch.isfinite(norm) & (norm > 0) & torch.isfinite(change)
    return torch.where(ok, change / torch.where(ok, norm, 1.0), math.nan)


def _targets(y: Tensor, n: int, num_classes: int | None, dtype: torch.dtype) -> Tensor:
    """The ``(N, C)`` target matrix: one-hot rows for integer labels, ``y`` itself for a 2-D float target."""
    if y.ndim == 2 and y.is_floating_point():
        if y.shape[0] != n:
            raise ValueError(f"`y` must have one row per example of `K` ({n}), got shape {tuple(y.shape)}")
        return y.to(dtype)
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"`y` must be integer labels of shape (N,) or a float target matrix of shape (N, C), "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}"
        )
    if y.shape[0] != n:
        raise ValueError(f"`y` must have one label per example of `K` ({n}), got {y.shape[0]}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"`y` must hold labels >= 0, got {int(y.min())}")
    largest = int(y.max()) if y.numel() else -1
    if num_classes is None:
        num_classes = largest + 1
    else:
        check_positive_int("num_classes", num_classes, allow_none=True)
        if largest >= num_classes:
            raise ValueError(f"`num_classes` must exceed the largest label, {largest}, got {num_classes}")
    return torch.nn.functional.one_hot(y.long(), num_classes).to(dtype)


def kernel_alignment(
    K: Tensor,
    y: Tensor,
    num_classes: int | None = None,
    centered: bool = True,
) -> Tensor:
    r"""Kernel-target alignment of ``K`` with the labels: ``<HKH, HYY^TH>_F / (||HKH||_F ||HYY^TH||_F)``.

    ``Y`` is the ``(N, C)`` one-hot matrix of the labels (or the given target matrix) and
    ``H = I - 11^T / N`` centres both kernels (Cortes et al., 2012); ``centered=False`` gives the original
    alignment of Cristianini et al. (2002), ``<K, YY^T>_F / (||K||_F ||YY^T||_F)``. A full
    ``(N, N, O, O)`` kernel is reduced to its trace kernel ``mean_a K[:, :, a, a]`` first. The alignment
    is invariant to scaling ``K`` by ``c > 0``, is 1 when ``K`` is a positive multiple of ``YY^T`` and lies in
    [-1, 1] (in [0, 1] for positive semi-definite ``K``).

    Args:
        K: a square kernel ``(N, N)`` or ``(N, N, O, O)``.
        y: integer labels ``(N,)`` in ``[0, num_classes)``, or a float target matrix ``(N, C)``.
        num_classes: number of classes for integer labels; None uses ``y.max() + 1`` (classes absent from
            ``y`` do not change the alignment).
        centered: centre both kernels with ``H``.

    Returns:
        A 0-d tensor; NaN if a (centred) kernel is zero, e.g. when every label is the same with
        ``centered=True``, or ``K`` holds NaN or Inf.

    Raises:
        ValueError: if ``K`` is not square, ``y`` does not have one label per example, labels are negative or
            not below ``num_classes``, or ``num_classes`` is not a positive int.

    Example:
        >>> y = torch.tensor([0, 0, 1])
        >>> K = torch.nn.functional.one_hot(y).double() @ torch.nn.functional.one_hot(y).double().T
        >>> round(kernel_alignment(2 * K, y).item(), 12)
        1.0
        >>> kernel_alignment(torch.eye(3), y)  # 1 / sqrt(2)
        tensor(0.7071)
    """
    K = check_tensor("K", K)
    y = check_tensor("y", y)
    if not isinstance(centered, bool):
        raise ValueError(f"`centered` must be a bool, got {centered!r}")
    if K.ndim == 4:
        if K.shape[2] != K.shape[3]:
            raise ValueError(f"`K` must have square output blocks (N, N, O, O), got {tuple(K.shape)}")
        K = K.diagonal(dim1=2, dim2=3).mean(-1)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"`K` must be a square kernel (N, N) or (N, N, O, O), got shape {tuple(K.shape)}")
    K = _float(K)
    targets = _targets(y.to(K.device), K.shape[0], num_classes, K.dtype)
    if centered:
        K = K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()
        targets = targets - targets.mean(dim=0, keepdim=True)
    target = targets @ targets.T
    return (_unit(K) * _unit(target)).sum()


class KernelSpectrum(NamedTuple):
    """Eigen-summary of a symmetric kernel matrix (see :func:`kernel_spectrum`)."""

    eigenvalues: Tensor
    """The ``top_k`` largest eigenvalues, in descending order."""
    trace: Tensor
    """Sum of the diagonal (= sum of all eigenvalues)."""
    effective_rank: Tensor
    """Entropy effective rank ``exp(-sum_i p_i log p_i)``, ``p = max(lambda, 0) / sum(max(lambda, 0))``."""
    condition_number: Tensor
    """``lambda_max / lambda_min``; ``inf`` when ``lambda_min <= n * eps * lambda_max``."""


def kernel_spectrum(K: Tensor, top_k: int | None = None) -> KernelSpectrum:
    r"""Eigenvalues, trace, effective rank and condition number of a symmetric kernel matrix.

    The eigenvalues are those of the symmetric part ``(K + K^T) / 2`` (``torch.linalg.eigvalsh``); a full
    ``(N, N, O, O)`` kernel is read as its ``(N O) x (N O)`` matrix (:func:`flatten_kernel`).

    - Effective rank (Roy & Vetterli, 2007): :math:`\exp(-\sum_i p_i \log p_i)` with
      :math:`p_i = \lambda_i^+ / \sum_j \lambda_j^+` over the eigenvalues clamped at zero
      (:math:`0 \log 0 = 0`): ``n`` for a multiple of the identity, 1 for a rank-one kernel, and between
      1 and the rank otherwise.
    - Condition number :math:`\lambda_{max} / \lambda_{min}`: ``inf`` when :math:`\lambda_{min}` is not
      numerically positive, :math:`\lambda_{min} \le n \varepsilon \lambda_{max}` with :math:`\varepsilon`
      the machine epsilon of the dtype (the tolerance of ``numpy.linalg.matrix_rank``), so that a singular
      kernel, whose smallest eigenvalue comes out as rounding noise of either sign, reads ``inf``.

    Args:
        K: a square kernel, ``(N, N)`` or ``(N, N, O, O)``.
        top_k: how many of the largest eigenvalues to return; None for all ``n``.

    Returns:
        :class:`KernelSpectrum` of tensors: ``eigenvalues`` of shape ``(top_k,)`` (descending), and 0-d
        ``trace``, ``effective_rank`` and ``condition_number``. All NaN if ``K`` holds NaN or Inf (or the
        eigensolver fails); ``effective_rank`` and ``condition_number`` are NaN when no eigenvalue is
        positive (a zero kernel).

    Raises:
        ValueError: if ``K`` is not square or ``top_k`` is not an int in ``[1, n]``.

    Example:
        >>> spectrum = kernel_spectrum(torch.diag(torch.tensor([4.0, 1.0, 1.0])), top_k=2)
        >>> spectrum.eigenvalues, spectrum.trace, spectrum.condition_number
        (tensor([4., 1.]), tensor(6.), tensor(4.))
    """
    matrix = _matrix(K, "K")
    n = matrix.shape[0]
    if matrix.shape[1] != n:
        raise ValueError(f"`K` must be a square kernel, got shape {tuple(K.shape)}")
    check_positive_int("top_k", top_k, allow_none=True)
    if top_k is not None and top_k > n:
        raise ValueError(f"`top_k` must be at most the size of the kernel matrix, {n}, got {top_k}")
    k = n if top_k is None else int(top_k)
    nan = _nan(matrix)
    if not bool(torch.isfinite(matrix).all()):
        return KernelSpectrum(_nan(matrix, k), nan, nan, nan)
    try:
        eigenvalues = torch.linalg.eigvalsh((matrix + matrix.T) / 2).flip(0)
    except torch.linalg.LinAlgError:
        return KernelSpectrum(_nan(matrix, k), nan, nan, nan)
    trace = matrix.diagonal().sum()
    largest, smallest = eigenvalues[0], eigenvalues[-1]
    positive = eigenvalues.clamp(min=0)
    total = positive.sum()
    if total > 0:
        p = positive / total
        effective_rank = torch.exp(-torch.special.xlogy(p, p).sum())
    else:
        effective_rank = nan
    if largest > 0:
        tolerance = n * torch.finfo(matrix.dtype).eps * largest
        condition = largest / smallest if smallest > tolerance else torch.full_like(largest, math.inf)
    else:
        condition = nan
    return KernelSpectrum(eigenvalues[:k], trace, effective_rank, condition)
