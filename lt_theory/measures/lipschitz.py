r"""Lipschitz constant of a whole network: a certified upper bound that follows the graph, the naive
product of layer norms, and an empirical lower bound from input Jacobians.

All constants are for the l2 -> l2 norm of ONE example (the model in eval mode, traced and evaluated
with a batch of one): ``||f(x) - f(x')||_2 <= L ||x - x'||_2``.

Upper bound along the graph
---------------------------
The model is traced with ``torch.fx.symbolic_trace`` and its shapes propagated with
``torch.fx.passes.shape_prop.ShapeProp``. For every node ``v`` a constant ``L(v)`` is propagated such
that the map ``input -> v`` is ``L(v)``-Lipschitz (Fazlyab et al. 2019, Virmaux & Scaman 2018 and
Gouk et al. 2021 describe such compositional bounds):

* input: 1; parameters, buffers and values of the shape only: 0 (constants);
* ``nn.Linear`` / ``nn.ConvNd`` (module or ``F.linear``/``F.convNd`` with a parameter as weight):
  ``L(x) * ||A||_2`` with a CERTIFIED operator norm (Gram iteration, or the exact SVD/FFT where it
  applies, see :mod:`lt_theory.measures.spectral`; never power iteration, which bounds from below);
* eval-mode batch normalisation: ``L(x) * max |gamma| / sqrt(var + eps)``;
* elementwise maps with derivative bounded by ``c``: ``c L(x)`` (ReLU, ReLU6, Hardtanh, Tanh, clamp,
  Softplus, Softsign, abs: 1; LeakyReLU/ELU: ``max(1, |slope|)``/``max(1, alpha)``; Sigmoid: 1/4;
  SiLU: 1.1; GELU: 1.13; Hardswish: 1.5);
* reshaping, permuting, basic slicing/indexing, dropout in eval mode, constant padding (any value):
  ``L(x)``; circular/reflect/replicate padding: ``L(x) * sqrt(max copies of an entry)``;
* max pooling: ``L(x) * sqrt(max number of windows holding one input entry)`` (1 when windows do not
  overlap; ``|max a - max b| <= ||a - b||_2`` per window);
* average pooling (plain and adaptive), ``mean`` and ``sum`` over dimensions: ``L(x)`` times the exact
  norm of the averaging operator (separable, computed from the 1-d averaging matrices; ``1/k`` for
  non-overlapping ``k x k`` windows, ``1/sqrt(HW)`` for global average pooling);
* ``a + b``, ``a - b``: ``L(a) + L(b)`` (a constant operand adds 0); ``torch.add(a, b, alpha=c)``:
  ``L(a) + |c| L(b)``; ``c * a``, ``a / c`` with a constant ``c``: ``max|c| L(a)``, ``L(a) / min|c|``;
* ``torch.cat``/``torch.stack`` and tuple outputs: ``sqrt(sum_i L_i^2)`` (the parts are disjoint
  coordinates, so squared distances add).

Anything else (``x * y`` of two input-dependent tensors, normalisation with batch or instance
statistics, attention, ...) raises :class:`UnsupportedModelError` naming the node and its target.

Naive product
-------------
``prod_i ||A_i||_2 * prod_j Lip(BN_j)`` over every call of every Linear/Conv/BatchNorm module: a bound only
for a plain chain with 1-Lipschitz activations; it ignores skip connections (``||I + W||`` may exceed
``||W||``) and pooling, so it is reported as not graph-aware.

Empirical lower bound
---------------------
``max_i ||J_f(x_i)||_2`` over probe inputs, each spectral norm by power iteration on ``J^T J`` with
``torch.func.jvp`` / ``torch.func.vjp``, vmapped over the batch. Every iterate ``||J v||`` with
``||v|| = 1`` is at most ``||J||_2 <= Lip(f)``.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from lt_theory.measures.modes import eval_mode
from lt_theory.measures.operators import (
    CONV_TYPES,
    DEFAULT_ITERATIONS,
    DEFAULT_TOLERANCE,
    LinearMap,
    conv_map,
    frequency_plan,
    gram_upper_bound,
    is_finite,
    layer_input_shapes,
    linear_map,
    ntuple,
    pad_operator_norm,
    random_unit,
)
from lt_theory.measures.spectral import batchnorm_lipschitz

__all__ = [
    "JacobianNormResult",
    "LipschitzBound",
    "UnsupportedModelError",
    "jacobian_lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "naive_lipschitz_product",
]

_CERTIFIED_METHODS = ("gram", "auto")
_FALLBACKS = ("error", "naive")


class UnsupportedModelError(ValueError):
    """The model cannot be traced, or its graph holds an operation the Lipschitz bound does not know."""


class LipschitzBound(NamedTuple):
    """Result of :func:`lipschitz_upper_bound` and :func:`naive_lipschitz_product`.

    Attributes:
        value: the bound (NaN if a weight is non-finite).
        layer_norms: certified norm used per module name (Linear/Conv operator norms, BatchNorm
            constants; for a module called several times, the largest). Pass it back as
            ``layer_norms`` to reuse it.
        graph_aware: True when the bound followed the traced graph, False for the naive product.
    """

    value: float
    layer_norms: dict[str, float]
    graph_aware: bool


class JacobianNormResult(NamedTuple):
    """Result of :func:`jacobian_lipschitz_lower_bound`.

    Attributes:
        value: ``max_i ||J_f(x_i)||_2`` estimate (a lower bound of the Lipschitz constant).
        per_example: ``(n,)`` estimates of ``||J_f(x_i)||_2``.
        vectors: ``(n, *input_shape)`` final unit right singular vectors (``init`` of a warm start).
        iterations: power iterations done.
    """

    value: float
    per_example: Tensor
    vectors: Tensor
    iterations: int


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _reference_tensor(model: nn.Module) -> Tensor | None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def _is_torch_layer(model: nn.Module) -> bool:
    """A layer of torch.nn itself (a leaf for fx), rather than a container or a user model."""
    return type(model).__module__.startswith("torch.nn.modules") and not isinstance(
        model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


def _traceable(model: nn.Module) -> nn.Module:
    """fx traces the root's forward, so a bare torch.nn layer would be inlined into functional calls
    (a circular Conv2d into F.pad + F.conv2d); wrapping it keeps it a leaf module named "0"."""
    return nn.Sequential(model) if _is_torch_layer(model) else model


def _certified_norm(op: LinearMap, method: str, n_iter: int | None, tol: float | None) -> float:
    """Certified upper bound of ``||A||_2``: Gram iteration, or the exact value where ``method="auto"``
    and the layer is exactly block-diagonalisable (SVD / FFT in float64)."""
    if not is_finite(op):
        return math.nan
    plan = frequency_plan(op)
    if method == "auto" and plan.exact:
        return float(torch.linalg.svdvals(plan.blocks).max())
    n_iter = DEFAULT_ITERATIONS["gram"] if n_iter is None else n_iter
    tol = DEFAULT_TOLERANCE["gram"] if tol is None else tol
    bound, _ = gram_upper_bound(plan.blocks, n_iter, tol)
    return bound * plan.factor


def _check_common(method: str, fallback: str | None = None) -> None:
    if method not in _CERTIFIED_METHODS:
        hint = (
            " Power iteration gives a lower bound of each norm, not a certified upper bound; pass norms"
            " certified elsewhere through `layer_norms`."
            if method == "power"
            else ""
        )
        raise ValueError(f"method={method!r}: expected one of {_CERTIFIED_METHODS}.{hint}")
    if fallback is not None and fallback not in _FALLBACKS:
        raise ValueError(f"fallback={fallback!r}: expected one of {_FALLBACKS}")


def _pool_overlap(windows: Tensor, size: int) -> int:
    """Largest number of windows that hold one input index (``windows``: (out, k), out of range ignored)."""
    valid = windows[(windows >= 0) & (windows < size)]
    return int(torch.bincount(valid, minlength=size).max()) if valid.numel() else 0


def _strided_windows(size: int, out: int, k: int, s: int, p: int, d: int) -> Tensor:
    return torch.arange(out)[:, None] * s - p + torch.arange(k)[None, :] * d


def _adaptive_windows(size: int, out: int) -> Tensor:
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    width = max(e - b for b, e in zip(starts, ends))
    rows = [[b + a if b + a < e else -1 for a in range(width)] for b, e in zip(starts, ends)]
    return torch.tensor(rows)


def _max_pool_factor(in_sizes, out_sizes, kernel, stride, padding, dilation) -> float:
    copies = 1
    for n, o, k, s, p, d in zip(in_sizes, out_sizes, kernel, stride, padding, dilation):
        copies *= _pool_overlap(_strided_windows(n, o, k, s, p, d), n)
    return math.sqrt(copies)


def _adaptive_max_pool_factor(in_sizes, out_sizes) -> float:
    copies = 1
    for n, o in zip(in_sizes, out_sizes):
        copies *= _pool_overlap(_adaptive_windows(n, o), n)
    return math.sqrt(copies)


def _matrix_norm(m: Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2))


def _avg_pool_factor(
    in_sizes, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override
) -> float:
    """Exact norm of (non-adaptive) average pooling: the operator is a Kronecker product over the spatial
    dimensions of 1-d averaging matrices (PyTorch's divisor is a product of per-dimension counts)."""
    norm = 1.0
    for n, k, s, p in zip(in_sizes, kernel, stride, padding):
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n)
        mat = F.avg_pool1d(eye, k, s, p, ceil_mode, count_include_pad).reshape(n, -1).T
        if divisor_override:
            mat = (mat != 0).to(torch.float64)
        norm *= _matrix_norm(mat)
    if divisor_override:
        norm /= divisor_override
    return norm


def _adaptive_avg_pool_factor(in_sizes, out_sizes) -> float:
    norm = 1.0
    for n, o in zip(in_sizes, out_sizes):
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n)
        norm *= _matrix_norm(F.adaptive_avg_pool1d(eye, o).reshape(n, -1).T)
    return norm


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: Mapping[str, object]) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _pool_arguments(args: tuple, kwargs: dict, nd: int, defaults: Mapping[str, object]) -> dict:
    """A functional pooling call's arguments after its input, by name: ``kernel_size``, ``stride`` (the kernel
    size when None or empty, as in ``torch.nn.functional``) and ``padding`` as ``nd``-tuples, then the names of
    ``defaults`` in their order, with those defaults."""
    names = ["kernel_size", "stride", "padding", *defaults]
    bound = _bind(args[1:], kwargs, names, {"stride": None, "padding": 0, **defaults})
    if bound["stride"] in (None, [], ()):
        bound["stride"] = bound["kernel_size"]
    for name in ("kernel_size", "stride", "padding"):
        bound[name] = ntuple(bound[name], nd, name)
    return bound


def _is_basic_index(index) -> bool:
    if isinstance(index, tuple):
        return all(_is_basic_index(i) for i in index)
    return index is None or index is Ellipsis or isinstance(index, (int, slice))


# Elementwise maps: Lipschitz constant of the scalar function (a callable of the module/kwargs).
_ELEMENTWISE_MODULES = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.Hardtanh: 1.0,
    nn.Tanh: 1.0,
    nn.Softsign: 1.0,
    nn.Softplus: 1.0,
    nn.Identity: 1.0,
    nn.Sigmoid: 0.25,
    nn.SiLU: 1.1,
    nn.GELU: 1.13,
    nn.Hardswish: 1.5,
    nn.Dropout: 1.0,
    nn.Dropout1d: 1.0,
    nn.Dropout2d: 1.0,
    nn.Dropout3d: 1.0,  # eval mode: identity
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
    nn.ZeroPad1d: 1.0,
    nn.ZeroPad2d: 1.0,
    nn.ZeroPad3d: 1.0,
    nn.ConstantPad1d: 1.0,
    nn.ConstantPad2d: 1.0,
    nn.ConstantPad3d: 1.0,
}
_ELEMENTWISE_FUNCTIONS = {
    F.relu: 1.0,
    torch.relu: 1.0,
    F.relu_: 1.0,
    torch.relu_: 1.0,
    F.relu6: 1.0,
    F.hardtanh: 1.0,
    torch.tanh: 1.0,
    F.tanh: 1.0,
    torch.clamp: 1.0,
    torch.clip: 1.0,
    F.softplus: 1.0,
    F.softsign: 1.0,
    torch.abs: 1.0,
    torch.neg: 1.0,
    operator.neg: 1.0,
    operator.pos: 1.0,
    torch.sigmoid: 0.25,
    F.sigmoid: 0.25,
    F.silu: 1.1,
    F.gelu: 1.13,
    F.hardswish: 1.5,
    # shape only
    torch.flatten: 1.0,
    torch.reshape: 1.0,
    torch.squeeze: 1.0,
    torch.unsqueeze: 1.0,
    torch.transpose: 1.0,
    torch.permute: 1.0,
    torch.t: 1.0,
    torch.movedim: 1.0,
    torch.narrow: 1.0,
    torch.clone: 1.0,
    torch.detach: 1.0,
    torch.swapaxes: 1.0,
    torch.ravel: 1.0,
}
_ELEMENTWISE_METHODS = {
    "relu": 1.0,
    "relu_": 1.0,
    "tanh": 1.0,
    "tanh_": 1.0,
    "clamp": 1.0,
    "clamp_": 1.0,
    "clip": 1.0,
    "abs": 1.0,
    "neg": 1.0,
    "sigmoid": 0.25,
    "sigmoid_": 0.25,
    "view": 1.0,
    "reshape": 1.0,
    "flatten": 1.0,
    "squeeze": 1.0,
    "unsqueeze": 1.0,
    "transpose": 1.0,
    "permute": 1.0,
    "contiguous": 1.0,
    "clone": 1.0,
    "detach": 1.0,
    "t": 1.0,
    "movedim": 1.0,
    "narrow": 1.0,
    "float": 1.0,
    "double": 1.0,
    "to": 1.0,
    "swapaxes": 1.0,
    "ravel": 1.0,
    "view_as": 1.0,
    "reshape_as": 1.0,
    "type_as": 1.0,
}
_SECOND_ARG_SHAPE_ONLY = {"view_as", "reshape_as", "type_as"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
_SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split"}
_ADD = {operator.add, torch.add, operator.iadd, "add", "add_"}
_SUB = {operator.sub, torch.sub, operator.isub, "sub", "sub_"}
_MUL = {operator.mul, torch.mul, operator.imul, "mul", "mul_"}
_DIV = {operator.truediv, torch.div, operator.itruediv, "div", "div_"}
_CAT = {torch.cat, torch.concat, torch.stack}
_MEAN = {torch.mean, "mean"}
_SUM = {torch.sum, "sum"}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_MAX_POOL = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_AVG = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_PAD_MODULES = (
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)
_CIRCULAR_PADS = tuple(getattr(nn, f"CircularPad{d}d") for d in (1, 2, 3) if hasattr(nn, f"CircularPad{d}d"))


class _Constant:
    """A node value that does not depend on the input (``value`` is None when unknown)."""

    def __init__(self, value=None) -> None:
        self.value = value


# --------------------------------------------------------------------------------------------------
# Graph propagation
# --------------------------------------------------------------------------------------------------


class _GraphBound:
    def __init__(
        self,
        gm: torch.fx.GraphModule,
        method: str,
        layer_norms: Mapping[str, float] | None,
        n_iter: int | None,
        tol: float | None,
    ) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.method, self.n_iter, self.tol = method, n_iter, tol
        self.given = dict(layer_norms or {})
        self.used: dict[str, float] = {}
        self.cache: dict[tuple, float] = {}
        self.values: dict[torch.fx.Node, object] = {}

    # -- values of arguments -------------------------------------------------------------------------
    def lip(self, arg) -> float:
        """Lipschitz constant of an argument (0 for constants), summed over nested containers."""
        if isinstance(arg, torch.fx.Node):
            value = self.values[arg]
            return 0.0 if isinstance(value, _Constant) else value
        if isinstance(arg, (tuple, list)):
            return math.sqrt(sum(self.lip(a) ** 2 for a in arg))
        if isinstance(arg, dict):
            return math.sqrt(sum(self.lip(a) ** 2 for a in arg.values()))
        return 0.0

    def dependent(self, arg) -> bool:
        found = []
        torch.fx.node.map_arg(arg, lambda n: found.append(not isinstance(self.values[n], _Constant)))
        return any(found)

    def constant(self, arg):
        """The value of a constant argument (a literal, or a parameter/buffer), else raise."""
        if isinstance(arg, torch.fx.Node):
            value = self.values[arg]
            if isinstance(value, _Constant) and value.value is not None:
                return value.value
            return None
        return arg

    @staticmethod
    def shape(arg) -> tuple[int, ...]:
        meta = arg.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise UnsupportedModelError(f"node {arg.name!r} is not a tensor")
        return tuple(meta.shape)

    def fail(self, node: torch.fx.Node, why: str = "") -> UnsupportedModelError:
        target = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__qualname__", getattr(node.target, "__name__", repr(node.target)))
        )
        if node.op == "call_module":
            target = f"{node.target} ({type(self.modules[node.target]).__name__})"
        detail = f": {why}" if why else ""
        return UnsupportedModelError(
            f"lipschitz_upper_bound does not know how to bound node {node.name!r} ({node.op} {target})"
            f"{detail}. "
            "Use fallback='naive' for the (not graph-aware) product of layer norms."
        )

    def single_input(self, node: torch.fx.Node, first=None) -> float:
        """L of the one input-dependent argument, which must be the first one."""
        args = list(node.args) + list(node.kwargs.values())
        first = node.args[0] if first is None and node.args else first
        if first is None or any(self.dependent(a) for a in args if a is not first):
            raise self.fail(node, "expected exactly one input-dependent tensor, as first argument")
        return self.lip(first)

    # -- norms of weighted layers -----------------------------------------------------------------------
    def layer_norm(self, name: str, op: LinearMap) -> float:
        if name in self.given:
            norm = float(self.given[name])
        else:
            key = (name, op.input_shape)
            if key not in self.cache:
                self.cache[key] = _certified_norm(op, self.method, self.n_iter, self.tol)
            norm = self.cache[key]
        self.used[name] = max(self.used.get(name, -math.inf), norm) if not math.isnan(norm) else norm
        return norm

    # -- nodes --------------------------------------------------------------------------------------------
    def run(self) -> float:
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
                if placeholders > 1:
                    raise UnsupportedModelError(
                        "lipschitz_upper_bound needs a model with a single input tensor"
                    )
                self.values[node] = 1.0
            elif node.op == "get_attr":
                value = self.gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                self.values[node] = _Constant(value)
            elif node.op == "output":
                return self.lip(node.args[0])
            elif not self.dependent((node.args, node.kwargs)):
                self.values[node] = _Constant()
            elif node.op == "call_module":
                self.values[node] = self.call_module(node, self.modules[node.target])
            else:
                self.values[node] = self.call(node)
        raise UnsupportedModelError("the traced graph has no output")

    def call_module(self, node: torch.fx.Node, module: nn.Module) -> float:
        lin = self.single_input(node)
        if isinstance(module, (nn.Linear, *CONV_TYPES)):
            return lin * self.layer_norm(node.target, linear_map(module, self.shape(node.args[0])[1:]))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_var is None:
                raise self.fail(node, "batch normalisation without running statistics is not affine")
            if node.target not in self.given:
                norm = batchnorm_lipschitz(module)
            else:
                norm = float(self.given[node.target])
            self.used[node.target] = norm
            return lin * norm
        for kind, c in _ELEMENTWISE_MODULES.items():
            if type(module) is kind:
                return lin * c
        functional = _as_function(module)
        if functional is None:
            raise self.fail(node)
        function, kwargs = functional
        return getattr(self, _FUNCTION_RULES[function])(node, function, node.args[:1], kwargs)

    @staticmethod
    def pad_factor(shape: Sequence[int], pad, mode: str) -> float:
        pad = list(pad) if not isinstance(pad, int) else None
        if pad is None:
            raise ValueError("padding must be a sequence")
        pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]
        sizes = [shape[-1 - i] for i in range(len(pairs))]
        if any(left < 0 or right < 0 for left, right in pairs):
            raise ValueError("negative padding")
        return pad_operator_norm(sizes, pairs, mode)

    def reduced_count(self, node: torch.fx.Node, x, dim) -> int:
        shape = self.shape(x)
        if dim is None:
            return math.prod(shape)
        dims = [dim] if isinstance(dim, int) else list(dim)
        if not dims:
            return math.prod(shape)
        return math.prod(shape[d] for d in dims)

    def call(self, node: torch.fx.Node) -> object:
        target, args, kwargs = node.target, node.args, node.kwargs
        is_method = node.op == "call_method"
        if is_method and target in _SHAPE_METHODS:
            return _Constant()
        if not is_method and target is getattr and args[1] in ("shape", "ndim", "dtype", "device", "is_cuda"):
            return _Constant()
        if is_method and target in _ELEMENTWISE_METHODS:
            if target in _SECOND_ARG_SHAPE_ONLY:  # the other tensor only gives a shape or a dtype
                return self.lip(args[0])
            return self.single_input(node) * _ELEMENTWISE_METHODS[target]
        if not is_method and target in _ELEMENTWISE_FUNCTIONS:
            return self.single_input(node) * _ELEMENTWISE_FUNCTIONS[target]
        rule = _FUNCTION_RULES.get(target) if is_method == isinstance(target, str) else None
        if rule is None:
            raise self.fail(node)
        return getattr(self, rule)(node, target, args, kwargs)

    # -- one rule per operation: (node, target, args, kwargs) -> Lipschitz constant of the output -----------
    def rule_leaky_relu(self, node, target, args, kwargs) -> float:
        slope = _bind(args[1:], kwargs, ["negative_slope"], {"negative_slope": 0.01})["negative_slope"]
        return self.single_input(node) * max(1.0, abs(slope))

    def rule_elu(self, node, target, args, kwargs) -> float:
        alpha = _bind(args[1:], kwargs, ["alpha"], {"alpha": 1.0})["alpha"]
        return self.single_input(node) * max(1.0, abs(alpha))

    def rule_getitem(self, node, target, args, kwargs) -> float:
        lin = self.single_input(node)
        if not hasattr(args[0].meta.get("tensor_meta"), "shape"):
            return lin  # an element of a tuple output (split/chunk)
        if not _is_basic_index(args[1]):
            raise self.fail(node, f"only basic indexing (ints, slices, None) is supported: {args[1]!r}")
        return lin

    def rule_split(self, node, target, args, kwargs) -> float:
        return self.single_input(node)

    def rule_add(self, node, target, args, kwargs) -> float:
        if target in ("add", "add_", torch.add, "sub", "sub_", torch.sub):
            alpha = kwargs.get("alpha", 1)
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        else:
            alpha, (a, b) = 1, args
        if self.dependent(alpha):
            raise self.fail(node)
        return self.lip(a) + abs(alpha) * self.lip(b)

    def rule_mul(self, node, target, args, kwargs) -> float:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if self.dependent(a) and self.dependent(b):
            raise self.fail(node, "product of two input-dependent tensors")
        x, c = (a, b) if self.dependent(a) else (b, a)
        c = self.constant(c)
        if c is None:
            raise self.fail(node, "multiplication by a value whose magnitude the bound cannot see")
        scale = float(c.detach().abs().max()) if isinstance(c, Tensor) else abs(float(c))
        return self.lip(x) * scale

    def rule_div(self, node, target, args, kwargs) -> float:
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if self.dependent(b) or kwargs.get("rounding_mode") is not None:
            raise self.fail(node, "division by an input-dependent value, or rounding division")
        c = self.constant(b)
        if c is None:
            raise self.fail(node, "division by a value whose magnitude the bound cannot see")
        scale = 1.0 / (float(c.detach().abs().min()) if isinstance(c, Tensor) else abs(float(c)))
        return self.lip(a) * scale

    def rule_cat(self, node, target, args, kwargs) -> float:
        tensors = args[0] if args else kwargs["tensors"]
        others = tuple(v for k, v in kwargs.items() if k != "tensors")
        if self.dependent(args[1:]) or self.dependent(others):
            raise self.fail(node)
        return self.lip(tuple(tensors))

    def rule_reduce(self, node, target, args, kwargs) -> float:
        x = args[0]
        self.single_input(node)
        n = self.reduced_count(node, x, _bind(args[1:], kwargs, ["dim"], {"dim": None})["dim"])
        return self.lip(x) * (1.0 / math.sqrt(n) if target in _MEAN else math.sqrt(n))

    def rule_dropout(self, node, target, args, kwargs) -> float:
        bound = _bind(args[1:], kwargs, ["p", "training"], {"p": 0.5, "training": True})
        lin = self.single_input(node)
        if bound["training"] and bound["p"] > 0:
            return 0.0 if bound["p"] >= 1 else lin / (1.0 - bound["p"])
        return lin

    def rule_pad(self, node, target, args, kwargs) -> float:
        bound = _bind(args[1:], kwargs, ["pad", "mode", "value"], {"mode": "constant", "value": None})
        lin = self.single_input(node)
        if bound["mode"] == "constant":
            return lin
        return lin * self.pad_factor(self.shape(args[0]), bound["pad"], bound["mode"])

    def rule_max_pool(self, node, target, args, kwargs) -> float:
        nd = _MAX_POOL[target]
        b = _pool_arguments(args, kwargs, nd, {"dilation": 1, "ceil_mode": False, "return_indices": False})
        lin = self.single_input(node)
        if b["return_indices"]:
            raise self.fail(node, "return_indices=True")
        window = (b["kernel_size"], b["stride"], b["padding"], ntuple(b["dilation"], nd, "dilation"))
        return lin * _max_pool_factor(self.shape(args[0])[2:], self.shape(node)[2:], *window)

    def rule_avg_pool(self, node, target, args, kwargs) -> float:
        counting = {"ceil_mode": False, "count_include_pad": True, "divisor_override": None}
        b = _pool_arguments(args, kwargs, _AVG_POOL[target], counting)
        lin = self.single_input(node)
        window = [b[name] for name in ("kernel_size", "stride", "padding", *counting)]
        return lin * _avg_pool_factor(self.shape(args[0])[2:], *window)

    def rule_adaptive_avg_pool(self, node, target, args, kwargs) -> float:
        lin = self.single_input(node)
        return lin * _adaptive_avg_pool_factor(self.shape(args[0])[2:], self.shape(node)[2:])

    def rule_adaptive_max_pool(self, node, target, args, kwargs) -> float:
        b = _bind(args[1:], kwargs, ["output_size", "return_indices"], {"return_indices": False})
        if b["return_indices"]:
            raise self.fail(node, "return_indices=True")
        lin = self.single_input(node)
        return lin * _adaptive_max_pool_factor(self.shape(args[0])[2:], self.shape(node)[2:])

    def rule_linear(self, node, target, args, kwargs) -> float:
        names = (
            ["weight", "bias"]
            if target is F.linear
            else ["weight", "bias", "stride", "padding", "dilation", "groups"]
        )
        b = _bind(
            args[1:], kwargs, names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        )
        lin = self.single_input(node)
        weight = self.constant(b["weight"])
        if not isinstance(weight, Tensor):
            raise self.fail(node, "the weight must be a parameter or buffer of the model")
        name = b["weight"].target if isinstance(b["weight"], torch.fx.Node) else node.name
        in_shape = self.shape(args[0])[1:]
        if target is F.linear:
            op = LinearMap(weight.detach(), in_shape)
        else:
            op = conv_map(weight, in_shape, b["stride"], b["padding"], b["dilation"], b["groups"])
        return lin * self.layer_norm(name, op)


def _rules() -> dict[object, str]:
    """Operation (function, or method name) -> the :class:`_GraphBound` method that bounds it."""
    table: dict[object, str] = {F.leaky_relu: "rule_leaky_relu", F.elu: "rule_elu", F.pad: "rule_pad"}
    table[operator.getitem] = "rule_getitem"
    groups = (
        (_SPLIT_FUNCTIONS | _SPLIT_METHODS, "rule_split"),
        (_ADD | _SUB, "rule_add"),
        (_MUL, "rule_mul"),
        (_DIV, "rule_div"),
        (_CAT, "rule_cat"),
        (_MEAN | _SUM, "rule_reduce"),
        (_DROPOUT, "rule_dropout"),
        (set(_MAX_POOL), "rule_max_pool"),
        (set(_AVG_POOL), "rule_avg_pool"),
        (_ADAPTIVE_AVG, "rule_adaptive_avg_pool"),
        (_ADAPTIVE_MAX, "rule_adaptive_max_pool"),
        ({F.linear, F.conv1d, F.conv2d, F.conv3d}, "rule_linear"),
    )
    for targets, rule in groups:
        table.update(dict.fromkeys(targets, rule))
    return table


_FUNCTION_RULES = _rules()


def _by_dimension(functions, module: nn.Module):
    """The function of ``functions`` (1d, 2d, 3d) matching a module whose class name ends in ``Nd``."""
    nd = int(type(module).__name__[-2])
    return [f for f in functions if f.__name__.endswith(f"{nd}d")][0]


def _as_function(module: nn.Module) -> tuple[object, dict] | None:
    """The functional form ``(function, keyword arguments)`` of a module that has a rule, else None: the
    module and functional forms of an operation share one rule."""
    attributes = lambda *names: {n: getattr(module, n, None) for n in names}  # noqa: E731
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        return _by_dimension(_MAX_POOL, module), attributes(*names)
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        return _by_dimension(_AVG_POOL, module), attributes(*names)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return _by_dimension(_ADAPTIVE_AVG, module), attributes("output_size")
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return _by_dimension(_ADAPTIVE_MAX, module), attributes("output_size", "return_indices")
    if isinstance(module, nn.LeakyReLU):
        return F.leaky_relu, attributes("negative_slope")
    if isinstance(module, nn.ELU):
        return F.elu, attributes("alpha")
    if isinstance(module, _PAD_MODULES + _CIRCULAR_PADS):
        name = type(module).__name__
        mode = "reflect" if "Reflection" in name else "replicate" if "Replication" in name else "circular"
        return F.pad, {"pad": module.padding, "mode": mode}
    return None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def naive_lipschitz_product(
    model: nn.Module,
    input_shape: Sequence[int],
    method: str = "gram",
    layer_norms: Mapping[str, float] | None = None,
    n_iter: int | None = None,
    tol: float | None = None,
) -> LipschitzBound:
    """Flat product of the certified norms of every Linear/Conv/BatchNorm call (not graph-aware).

    ``prod_i ||A_i||_2 * prod_j max|gamma_j| / sqrt(var_j + eps)`` over every call of every such
    module during one eval-mode forward pass on ``input_shape`` (modules never called are skipped).
    It bounds the Lipschitz constant of a plain chain with 1-Lipschitz activations and non-expansive
    pooling only: it ignores skip connections and the structure of the graph.

    Args:
        model: the network (its train/eval flags are restored; no running statistics are updated).
        input_shape: one input without batch dimension.
        method: ``"gram"`` (certified Gram iteration) or ``"auto"`` (exact SVD/FFT where it applies,
            Gram iteration elsewhere).
        layer_norms: certified norms by module name, used instead of computing them.
        n_iter: Gram steps (default 20); tol: relative tolerance of the Gram bound (default 1e-7).

    Returns:
        :class:`LipschitzBound` with ``graph_aware=False``.

    Raises:
        ValueError: bad ``method``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> bound = naive_lipschitz_product(net, (4,))
        >>> bound.graph_aware
        False
    """
    _check_common(method)
    given = dict(layer_norms or {})
    types = (nn.Linear, *CONV_TYPES, nn.modules.batchnorm._BatchNorm)
    shapes = layer_input_shapes(model, input_shape, types)
    value, used = 1.0, {}
    for name, module in model.named_modules():
        for shape in shapes.get(name, []):
            if name in given:
                norm = float(given[name])
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                norm = batchnorm_lipschitz(module)
            else:
                norm = _certified_norm(linear_map(module, shape), method, n_iter, tol)
            used[name] = max(used.get(name, -math.inf), norm) if not math.isnan(norm) else norm
            value *= norm
    return LipschitzBound(value, used, False)


def lipschitz_upper_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    method: str = "gram",
    layer_norms: Mapping[str, float] | None = None,
    fallback: str = "error",
    n_iter: int | None = None,
    tol: float | None = None,
) -> LipschitzBound:
    """Certified upper bound of the l2 Lipschitz constant of an eval-mode network, along its fx graph.

    See the module docstring for the rule of every operation. The bound is certified as long as the
    norms in ``layer_norms`` are (up to float64 rounding of the SVD/FFT/Gram computations).

    Args:
        model: the network, traceable by ``torch.fx.symbolic_trace``, with one tensor input. It is traced
            and shape-propagated in eval mode under ``torch.no_grad`` on zeros; its train/eval flags are
            restored and no running statistics change.
        input_shape: one input without batch dimension, e.g. ``(3, 32, 32)``.
        method: ``"gram"`` (Gram iteration on every Linear/Conv: certified) or ``"auto"`` (exact
            SVD/FFT for Linear, circular and 1x1 convolutions, Gram iteration elsewhere).
        layer_norms: certified norms by module name (``named_modules`` names; for ``F.linear`` /
            ``F.convNd`` the weight's attribute path), e.g. ``layer_norms`` of a previous result.
        fallback: ``"error"`` raises :class:`UnsupportedModelError` for an untraceable model or an
            unknown operation; ``"naive"`` warns and returns :func:`naive_lipschitz_product`.
        n_iter: Gram steps (default 20); tol: relative tolerance of the Gram bounds (default 1e-7).

    Returns:
        :class:`LipschitzBound` ``(value, layer_norms, graph_aware)``; NaN when a weight is non-finite.

    Raises:
        UnsupportedModelError: the model cannot be traced or holds an operation not listed above (only
            with ``fallback="error"``).
        ValueError: bad ``method`` or ``fallback``, or the model does not run on ``input_shape``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> bound = lipschitz_upper_bound(net, (3, 16, 16))
        >>> bound.graph_aware, sorted(bound.layer_norms)
        (True, ['0', '1', '5'])
    """
    _check_common(method, fallback)
    try:
        with eval_mode(model), torch.no_grad():
            try:
                gm = torch.fx.symbolic_trace(_traceable(model))
            except Exception as error:  # any tracing failure is reported the same way
                raise UnsupportedModelError(
                    f"torch.fx.symbolic_trace cannot trace {type(model).__name__} ({type(error).__name__}: "
                    f"{error}); use fallback='naive' for the (not graph-aware) product of layer norms"
                ) from error
            reference = _reference_tensor(model)
            dtype = reference.dtype if reference is not None else torch.float32
            device = reference.device if reference is not None else torch.device("cpu")
            try:
                ShapeProp(gm).propagate(torch.zeros((1, *input_shape), dtype=dtype, device=device))
            except Exception as error:
                raise ValueError(
                    f"the model does not run on a batch of one input of shape {tuple(input_shape)}: "
                    f"{error.__cause__ or error}"
                ) from error
            wrapped = _is_torch_layer(model)  # its names gain a "0." prefix in the wrapper
            given = dict(layer_norms or {})
            if wrapped:
                given = {("0." + k).rstrip("."): v for k, v in given.items()}
            graph = _GraphBound(gm, method, given, n_iter, tol)
            value = graph.run()
            used = (
                {k[2:] if k.startswith("0.") else "": v for k, v in graph.used.items()}
                if wrapped
                else graph.used
            )
            return LipschitzBound(value, used, True)
    except UnsupportedModelError as error:
        if fallback != "naive":
            raise
        warnings.warn(
            f"{error} -- falling back to the naive product of layer norms, which is NOT graph-aware: it "
            "ignores skip connections and is not a certified bound for such models.",
            stacklevel=2,
        )
        return naive_lipschitz_product(model, input_shape, method, layer_norms, n_iter, tol)


def jacobian_lipschitz_lower_bound(
    model: nn.Module,
    inputs: Tensor,
    n_iter: int = 20,
    tol: float = 1e-6,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> JacobianNormResult:
    """Empirical lower bound of the Lipschitz constant: ``max_i ||d f(x_i) / d x_i||_2``.

    Per example, power iteration on ``J^T J`` with ``J v`` from ``torch.func.jvp`` and ``J^T u`` from
    ``torch.func.vjp`` of ``x -> model(x[None])[0]``, vmapped over the batch (a Python loop if the
    model cannot be vmapped). The model runs in eval mode; its train/eval flags are restored, no
    BatchNorm statistics change, no ``.grad`` is written and the global RNG is not used.

    Args:
        model: the network.
        inputs: ``(n, *input_shape)`` probe inputs.
        n_iter: maximum power iterations.
        tol: stop when every per-example estimate changes by at most ``tol`` relatively.
        init: ``(n, *input_shape)`` start vectors (e.g. ``vectors`` of a previous result).
        generator: source of random start vectors (a fresh one seeded 0 when None).

    Returns:
        :class:`JacobianNormResult` ``(value, per_example, vectors, iterations)``.

    Raises:
        ValueError: bad ``n_iter``/``tol``/``init`` or an empty batch.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        >>> result = jacobian_lipschitz_lower_bound(net, torch.randn(4, 3))
        >>> result.per_example.shape
        torch.Size([4])
    """
    if n_iter < 1:
        raise ValueError(f"n_iter={n_iter}: expected a positive integer")
    if tol < 0:
        raise ValueError(f"tol={tol}: expected a non-negative float")
    x = inputs.detach()
    n = x.shape[0]
    if n == 0:
        raise ValueError("inputs is an empty batch")

    def f(example: Tensor) -> Tensor:
        return model(example.unsqueeze(0)).squeeze(0)

    def normal_gram(example: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        _, jv = torch.func.jvp(f, (example,), (v,))
        _, pullback = torch.func.vjp(f, example)
        return jv, pullback(jv)[0]

    batched = torch.func.vmap(normal_gram)

    def step(v: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return batched(x, v)
        except RuntimeError:
            pairs = [normal_gram(x[i], v[i]) for i in range(n)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    with eval_mode(model), torch.no_grad():
        if init is not None:
            if init.shape != x.shape:
                raise ValueError(f"init has shape {tuple(init.shape)}, inputs {tuple(x.shape)}")
            v = init.detach().to(dtype=x.dtype, device=x.device).clone()
        else:
            v = random_unit(x.shape, x.dtype, x.device, generator)
        norms = v.reshape(n, -1).norm(dim=1)
        bad = ~(torch.isfinite(norms) & (norms > 0))
        if bool(bad.any()):
            v[bad] = random_unit(x.shape, x.dtype, x.device, generator)[bad]
            norms = v.reshape(n, -1).norm(dim=1)
        v = v / norms.reshape(n, *([1] * (x.dim() - 1)))
        previous = None
        iterations = 0
        for iterations in range(1, n_iter + 1):
            jv, gram_v = step(v)
            sigma = jv.reshape(n, -1).norm(dim=1)
            if not bool(torch.isfinite(sigma).all()):
                break
            if iterations == n_iter or (
                previous is not None and bool(((sigma - previous).abs() <= tol * sigma).all())
            ):
                break
            previous = sigma
            norm = gram_v.reshape(n, -1).norm(dim=1).reshape(n, *([1] * (x.dim() - 1)))
            v = torch.where(norm > 0, gram_v / torch.where(norm > 0, norm, torch.ones_like(norm)), v)
    return JacobianNormResult(float(sigma.max()), sigma, v, iterations)
