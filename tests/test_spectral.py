"""Tests of lt_theory.measures.spectral and lt_theory.measures.lipschitz against exact references.

References: the SVD of the explicit operator matrix built in float64 with the layer's own forward
(``dense_operator``), ``torch.autograd.functional.jacobian``, and closed forms written out by hand.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lt_theory.measures import (
    UnsupportedModelError,
    batchnorm_lipschitz,
    dense_operator,
    jacobian_lipschitz_lower_bound,
    lipschitz_upper_bound,
    naive_lipschitz_product,
    normalized_margins,
    operator_norm,
    operator_spectrum,
    spectral_complexity,
)
from lt_theory.measures.operators import adjoint_map, linear_map
from lt_theory.models import resnet20

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths"),  # PyTorch's own note
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),  # torch.func's first jvp
]



# --------------------------------------------------------------------------------------------------
# Layers: (constructor, input shape); weights drawn from a local generator, float64.
# --------------------------------------------------------------------------------------------------

_CASES = {
    "linear": (lambda: nn.Linear(5, 4), (5,)),
    "linear-seq": (lambda: nn.Linear(5, 4), (3, 5)),
}
for _nd, _conv in ((1, nn.Conv1d), (2, nn.Conv2d)):
    _variants = {
        "s1-p0": (dict(kernel_size=3), 6),
        "s2-p0": (dict(kernel_size=3, stride=2), 7),
        "s1-p1": (dict(kernel_size=3, padding=1), 6),
        "s2-p1": (dict(kernel_size=3, stride=2, padding=1), 7),
        # even sizes, the CIFAR ResNet shapes: the last input row is read by no window's last tap, so the
        # transposed convolution of the adjoint needs output_padding 1 (0 on the odd sizes above)
        "s2-p1-even": (dict(kernel_size=3, stride=2, padding=1), 8),
        "s2-p0-even": (dict(kernel_size=3, stride=2), 8),
        "dilation2-s2-even": (dict(kernel_size=3, stride=2, padding=2, dilation=2), 8),
        "same": (dict(kernel_size=3, padding="same"), 7),
        "same-even": (dict(kernel_size=2, padding="same"), 6),
        "circular": (dict(kernel_size=3, padding=1, padding_mode="circular"), 7),
        "circular-s2": (dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"), 6),
        "circular-s2-odd": (dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"), 7),
        "dilation2": (dict(kernel_size=3, padding=2, dilation=2), 7),
        "dilation2-circular": (dict(kernel_size=3, padding=2, dilation=2, padding_mode="circular"), 6),
        "groups2": (dict(kernel_size=3, padding=1, groups=2), 6),
        "groups2-circular": (dict(kernel_size=3, padding=1, groups=2, padding_mode="circular"), 6),
        "reflect": (dict(kernel_size=3, padding=1, padding_mode="reflect"), 6),
        "replicate": (dict(kernel_size=3, padding=1, padding_mode="replicate"), 6),
        "pointwise-s2": (dict(kernel_size=1, stride=2), 7),
        "pointwise-s2-even": (dict(kernel_size=1, stride=2), 8),  # the option-B shortcut of a ResNet
    }
    for _name, (_kwargs, _size) in _variants.items():
        _cin = 4 if "groups" in _name else 3
        _cout = 6 if "groups" in _name else 4
        _CASES[f"conv{_nd}d-{_name}"] = (
            lambda conv=_conv, cin=_cin, cout=_cout, kw=_kwargs: conv(cin, cout, **kw),
            (_cin,) + (_size,) * _nd,
        )
# one even and one odd dimension: output_padding 1 along the first only
_CASES["conv2d-s2-p1-8x7"] = (lambda: nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1), (3, 8, 7))

EXACT_CASES = [
    k for k in _CASES if k.startswith("linear") or ("circular" in k and "odd" not in k) or "pointwise" in k
]
ZERO_PADDED = [
    k
    for k in _CASES
    if k.startswith("conv")
    and not any(mode in k for mode in ("circular", "reflect", "replicate", "pointwise"))
]


def make(name: str, seed: int = 0, dtype=torch.float64):
    factory, shape = _CASES[name]
    layer = factory().to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype))
    return layer, shape


def dense_svd(layer, shape) -> torch.Tensor:
    return torch.linalg.svdvals(dense_operator(layer, shape))


# --------------------------------------------------------------------------------------------------
# operator_norm
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_CASES))
def test_power_iteration_matches_dense_svd(name):
    layer, shape = make(name)
    true = dense_svd(layer, shape)[0].item()
    result = operator_norm(layer, shape, method="power", n_iter=6000, tol=1e-13)
    assert result.guarantee == "lower"
    assert result.sigma_max == pytest.approx(true, rel=1e-4)
    assert result.sigma_max <= true * (1 + 1e-12)  # every iterate is a lower bound
    assert result.vector.shape == shape
    assert result.vector.norm().item() == pytest.approx(1.0, rel=1e-12)
    applied = dense_operator(layer, shape) @ result.vector.reshape(-1)
    assert applied.norm().item() == pytest.approx(result.sigma_max, rel=1e-12)


@pytest.mark.parametrize("name", ["conv2d-s1-p1", "conv2d-circular", "conv1d-s2-p1", "linear"])
def test_power_iteration_float32(name):
    layer, shape = make(name)
    true = dense_svd(layer, shape)[0].item()
    result = operator_norm(layer.float(), shape, n_iter=6000, tol=0.0)  # tol=0: all iterations
    assert result.vector.dtype == torch.float32
    assert result.sigma_max == pytest.approx(true, rel=1e-4)


def test_power_iteration_uses_only_its_generator():
    layer, shape = make("conv2d-s1-p1")
    state = torch.get_rng_state()
    a = operator_norm(layer, shape, n_iter=5, generator=torch.Generator().manual_seed(3))
    b = operator_norm(layer, shape, n_iter=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.vector, b.vector)


def test_power_iteration_warm_start_converges_in_a_few_iterations():
    layer, shape = make("conv2d-s1-p1")  # sigma_2 / sigma_1 = 0.9995: slow from a random start
    previous = operator_norm(layer, shape, n_iter=6000, tol=0.0)
    generator = torch.Generator().manual_seed(7)
    step = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():  # a training step changing the weights by 0.1%
        layer.weight.add_(1e-3 * layer.weight.norm() * step / step.norm())
    true = dense_svd(layer, shape)[0].item()
    warm = operator_norm(layer, shape, n_iter=1000, tol=1e-6, init=previous.vector)
    cold = operator_norm(layer, shape, n_iter=1000, tol=1e-6)
    assert warm.iterations <= 3 and cold.iterations > 30
    assert warm.sigma_max == pytest.approx(true, rel=1e-5)
    assert abs(warm.sigma_max - true) < abs(cold.sigma_max - true)
    one_step = operator_norm(layer, shape, n_iter=1, init=previous.vector)
    assert one_step.sigma_max == pytest.approx(true, rel=1e-5)


@pytest.mark.parametrize("name", list(_CASES))
def test_adjoint_is_the_transpose_of_the_dense_operator(name):
    """The adjoint the iterations use (``adjoint_map``): one transposed convolution for zero padding and Linear,
    the forward's VJP for circular/reflect/replicate padding; both against the explicit matrix."""
    layer, shape = make(name)
    op = linear_map(layer, shape)
    dense = dense_operator(layer, shape)
    assert op.output_shape == layer(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((3, *shape), dtype=torch.float64, generator=generator)
    y = torch.randn((3, *op.output_shape), dtype=torch.float64, generator=generator)
    expected = (dense.T @ y.reshape(3, -1).T).T.reshape(3, *shape)
    adjoint = adjoint_map(op, op.weight)
    for i in range(3):  # the VJP pull-back takes batches of one
        got = adjoint(y[i : i + 1])
        assert got.shape == (1, *shape)
        torch.testing.assert_close(got[0], expected[i], rtol=0, atol=1e-12)
        # <A x, y> = <x, A^T y>, with A x by the layer's own forward
        ax = layer(x[i : i + 1]) - (0 if layer.bias is None else layer(torch.zeros_like(x[i : i + 1])))
        assert torch.vdot(ax.reshape(-1), y[i].reshape(-1)).item() == pytest.approx(
            torch.vdot(x[i].reshape(-1), got.reshape(-1)).item(), rel=1e-12, abs=1e-12
        )
    if op.has_direct_adjoint:
        torch.testing.assert_close(op.apply_adjoint(y, op.weight), expected, rtol=0, atol=1e-12)
    else:  # a padded border folds back: no single transposed convolution, the VJP above is what is used
        assert layer.padding_mode in ("circular", "reflect", "replicate")
        with pytest.raises(NotImplementedError, match="VJP"):
            op.apply_adjoint(y, op.weight)


def _explicit_matrix(conv: nn.Module, shape) -> torch.Tensor:
    """The conv's matrix in float64, column j its response to the j-th basis input (no library code)."""
    conv = conv.double()
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        return conv(basis).reshape(n, -1).T


@pytest.mark.parametrize(
    "cin, cout, shape", [(3, 4, (3, 8, 8)), (2, 3, (2, 16, 16)), (1, 2, (1, 32, 32)), (3, 4, (3, 8, 7))]
)
def test_stride_2_convolution_on_even_inputs_matches_the_explicit_matrix(cin, cout, shape):
    """Every stride-2 layer of a CIFAR ResNet: 3x3, stride 2, padding 1 on 32x32, 16x16, 8x8 inputs.

    With the adjoint's output_padding forced to 0 the adjoint drops the last input row and column: on
    (3, 8, 8) below ``operator_norm`` then returns 0.9287 instead of 0.9473, and its vector is 3x7x7.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)  # PyTorch's default initialisation, as in a real model
        conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
    matrix = _explicit_matrix(copy.deepcopy(conv), shape)
    true = torch.linalg.matrix_norm(matrix, ord=2).item()
    if shape == (3, 8, 8):
        assert true == pytest.approx(0.94733, abs=1e-5)  # the number of issue 17
    exact = operator_norm(conv.double(), shape, method="lanczos", n_iter=min(300, matrix.shape[1]), tol=0.0)
    assert exact.sigma_max == pytest.approx(true, rel=1e-10)
    assert exact.vector.shape == shape
    default = operator_norm(conv, shape)  # float32, "auto" = 100 power iterations: a lower bound
    assert default.vector.shape == shape
    assert true * (1 - 5e-3) <= default.sigma_max <= true * (1 + 1e-6)
    op = linear_map(conv.double(), shape)
    y = torch.randn((1, *op.output_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        op.apply_adjoint(y, op.weight).reshape(-1), matrix.T @ y.reshape(-1), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", list(_CASES))
def test_lanczos_matches_dense_svd(name):
    layer, shape = make(name)
    true = dense_svd(layer, shape)[0].item()
    result = operator_norm(layer, shape, method="lanczos", n_iter=400, tol=0.0)  # Krylov space = all
    assert result.guarantee == "lower"
    assert result.sigma_max == pytest.approx(true, rel=1e-10)
    assert result.sigma_max <= true * (1 + 1e-12)
    assert result.vector.shape == shape
    applied = dense_operator(layer, shape) @ result.vector.reshape(-1)
    assert applied.norm().item() == pytest.approx(result.sigma_max, rel=1e-12)


def test_lanczos_converges_faster_than_power_iteration_and_warm_starts_it():
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False).double()  # zero padding: clustered top values
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3)))
    shape = (8, 10, 10)  # 800 unknowns, more than the steps below
    true = dense_svd(layer, shape)[0].item()
    lanczos = operator_norm(layer, shape, method="lanczos", n_iter=60, tol=0.0)
    power = operator_norm(layer, shape, method="power", n_iter=60, tol=0.0)  # the same 60 products
    assert lanczos.sigma_max <= true * (1 + 1e-12) and power.sigma_max <= true * (1 + 1e-12)
    assert true - lanczos.sigma_max < 0.01 * (true - power.sigma_max)
    assert lanczos.sigma_max == pytest.approx(true, rel=1e-6)
    warm = operator_norm(layer, shape, method="power", n_iter=1, init=lanczos.vector)
    assert warm.sigma_max == pytest.approx(true, rel=1e-6)
    lanczos32 = operator_norm(layer.float(), shape, method="lanczos")  # default: 100 steps, tol 1e-7
    assert lanczos32.vector.dtype == torch.float32
    assert lanczos32.sigma_max == pytest.approx(true, rel=1e-5)


def test_reshaped_kernel_norm_warm_start():
    layer, shape = make("conv2d-s1-p1")
    exact = operator_norm(layer, shape, method="reshape")
    matrix = layer.weight.detach().reshape(layer.out_channels, -1)
    assert exact.vector.shape == (matrix.shape[1],)
    assert (matrix @ exact.vector).norm().item() == pytest.approx(exact.sigma_max, rel=1e-12)
    with torch.no_grad():
        layer.weight.mul_(1.5)
    warm = operator_norm(layer, shape, method="reshape", init=exact.vector, n_iter=1)
    assert warm.iterations == 1
    assert warm.sigma_max == pytest.approx(1.5 * exact.sigma_max, rel=1e-12)  # same singular vector
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(4)))
    true = torch.linalg.matrix_norm(layer.weight.reshape(layer.out_channels, -1), ord=2).item()
    warm = operator_norm(layer, shape, method="reshape", init=exact.vector, n_iter=200, tol=0.0)
    assert warm.sigma_max == pytest.approx(true, rel=1e-10) and warm.sigma_max <= true * (1 + 1e-12)


@pytest.mark.parametrize("name", EXACT_CASES)
def test_fft_gives_every_singular_value(name):
    layer, shape = make(name)
    reference = dense_svd(layer, shape)
    result = operator_norm(layer, shape, method="fft")
    assert result.guarantee == "exact"
    assert result.sigma_max == pytest.approx(reference[0].item(), rel=1e-12)
    spectrum = operator_spectrum(layer, shape, method="fft")
    torch.testing.assert_close(spectrum.singular_values, reference, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    "name", ["conv2d-s1-p1", "conv1d-same", "conv2d-s1-p0", "conv2d-circular-s2-odd", "conv2d-reflect"]
)
def test_fft_refuses_non_circulant_layers(name):
    layer, shape = make(name)
    with pytest.raises(ValueError, match="circular"):
        operator_norm(layer, shape, method="fft")


@pytest.mark.parametrize("name", list(_CASES))
def test_gram_iteration_is_a_certified_upper_bound(name):
    layer, shape = make(name)
    true = dense_svd(layer, shape)[0].item()
    bounds = [operator_norm(layer, shape, method="gram", n_iter=t, tol=0.0).sigma_max for t in range(8)]
    assert all(b >= true * (1 - 1e-12) for b in bounds)  # never below, at every iterate
    assert all(b1 <= b0 * (1 + 1e-12) for b0, b1 in zip(bounds, bounds[1:]))  # non-increasing
    default = operator_norm(layer, shape, method="gram")
    assert default.guarantee == "upper" and default.sigma_max >= true * (1 - 1e-12)
    if name in EXACT_CASES:  # the blocks are exactly those of A: the bound converges to the norm
        assert default.sigma_max == pytest.approx(true, rel=1e-6)


class _Periodised(nn.Module):
    """``S_N C_N``: the stride-s circular convolution on N points that the Gram bound of a zero-padded
    convolution bounds (N = the padded size rounded up to a multiple of the stride)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        wrap = [v for d, k in zip(reversed(c.dilation), reversed(c.kernel_size)) for v in (0, d * (k - 1))]
        conv = getattr(F, f"conv{x.dim() - 2}d")
        return conv(F.pad(x, wrap, mode="circular"), c.weight, None, c.stride, 0, c.dilation, c.groups)


@pytest.mark.parametrize("name", ZERO_PADDED)
def test_gram_iteration_on_zero_padding_converges_to_the_periodised_operator(name):
    layer, shape = make(name)
    nd = len(shape) - 1
    if isinstance(layer.padding, str):
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    else:
        totals = [2 * p for p in layer.padding]
    periods = [-(-(n + t) // s) * s for n, t, s in zip(shape[1:], totals, layer.stride)]
    periodised = dense_svd(_Periodised(layer), (shape[0], *periods))[0].item()
    bound = operator_norm(layer, shape, method="gram", n_iter=40, tol=0.0).sigma_max
    assert len(periods) == nd
    assert bound == pytest.approx(periodised, rel=1e-6)


@pytest.mark.parametrize("name", [k for k in _CASES if k.startswith("conv")])
def test_reshaped_kernel_norm_brackets_the_operator_norm(name):
    layer, shape = make(name)
    true = dense_svd(layer, shape)[0].item()
    reshaped = operator_norm(layer, shape, method="reshape")
    assert reshaped.guarantee == "none"
    expected = torch.linalg.matrix_norm(layer.weight.reshape(layer.out_channels, -1), ord=2).item()
    assert reshaped.sigma_max == pytest.approx(expected, rel=1e-12)
    taps = math.prod(layer.kernel_size)
    # upper side: always (||A|| <= ||S_N C_N|| <= sqrt(taps) * reshape); lower side: every case has an
    # output reading a full in-bounds window, which gives reshape <= ||A|| when groups == 1
    assert true <= math.sqrt(taps) * reshaped.sigma_max * (1 + 1e-12)
    if layer.groups == 1:
        assert reshaped.sigma_max <= true * (1 + 1e-12)


def test_reshaped_kernel_norm_of_a_grouped_convolution_can_exceed_the_operator_norm():
    conv = nn.Conv1d(2, 2, 1, groups=2, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)  # two groups, each the identity: A = I, reshape = [[1], [1]]
    assert operator_norm(conv, (2, 4), method="fft").sigma_max == pytest.approx(1.0)
    assert operator_norm(conv, (2, 4), method="reshape").sigma_max == pytest.approx(math.sqrt(2))


def test_linear_methods_agree_with_the_svd():
    layer, shape = make("linear")
    true = torch.linalg.matrix_norm(layer.weight, ord=2).item()
    for method in ("power", "fft", "gram", "reshape", "auto"):
        assert operator_norm(layer, shape, method=method, n_iter=200, tol=0.0).sigma_max == pytest.approx(
            true, rel=1e-9
        )


def test_operator_norm_rejects_bad_arguments():
    layer, shape = make("conv2d-s1-p1")
    with pytest.raises(ValueError, match="method"):
        operator_norm(layer, shape, method="arnoldi")
    with pytest.raises(ValueError, match="input_shape"):
        operator_norm(layer, (3, 6))
    with pytest.raises(ValueError, match="channels"):
        operator_norm(layer, (5, 6, 6))
    with pytest.raises(ValueError, match="n_iter"):
        operator_norm(layer, shape, n_iter=0)
    with pytest.raises(ValueError, match="init"):
        operator_norm(layer, shape, init=torch.ones(3))
    with pytest.raises(TypeError, match="Linear"):
        operator_norm(nn.ConvTranspose2d(3, 4, 3), shape)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_give_nan(value):
    layer, shape = make("conv2d-s1-p1")
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = value
    for method in ("power", "gram", "reshape", "auto"):
        assert math.isnan(operator_norm(layer, shape, method=method).sigma_max)
    spectrum = operator_spectrum(layer, shape)
    assert all(math.isnan(v) for v in spectrum[:5])
    circular, cshape = make("conv2d-circular")
    with torch.no_grad():
        circular.weight[0, 0, 0, 0] = value
    assert math.isnan(operator_norm(circular, cshape, method="fft").sigma_max)


# --------------------------------------------------------------------------------------------------
# operator_spectrum, dense_operator
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_CASES))
def test_frobenius_norm_and_stable_rank_match_the_dense_operator(name):
    layer, shape = make(name)
    dense = dense_operator(layer, shape)
    values = torch.linalg.svdvals(dense)
    spectrum = operator_spectrum(layer, shape)
    assert spectrum.frobenius_norm == pytest.approx(dense.norm().item(), rel=1e-12)
    assert spectrum.sigma_max == pytest.approx(values[0].item(), rel=1e-10)
    assert spectrum.stable_rank == pytest.approx((dense.norm() ** 2 / values[0] ** 2).item(), rel=1e-10)
    injective = dense.shape[0] >= dense.shape[1]
    if injective:
        assert spectrum.sigma_min == pytest.approx(values[-1].item(), rel=1e-8, abs=1e-12)
        assert spectrum.condition_number == pytest.approx((values[0] / values[-1]).item(), rel=1e-8)
    else:  # fewer outputs than inputs: not injective
        assert spectrum.sigma_min == 0.0 and spectrum.condition_number == math.inf


def test_frobenius_norm_of_circular_convolution_is_sqrt_hw_times_kernel_norm():
    layer, shape = make("conv2d-circular")
    spectrum = operator_spectrum(layer, shape)
    assert spectrum.method == "fft"
    assert spectrum.frobenius_norm == pytest.approx(7 * layer.weight.norm().item(), rel=1e-12)


def test_spectrum_by_power_iteration_matches_dense():
    layer, shape = make("conv2d-s1-p1")  # 3 -> 4 channels, zero padding: 144 x 108, injective
    values = dense_svd(layer, shape)
    spectrum = operator_spectrum(layer, shape, method="power", n_iter=20000, tol=1e-13)
    assert spectrum.method == "power"
    assert spectrum.sigma_max == pytest.approx(values[0].item(), rel=1e-6)
    assert spectrum.sigma_min >= values[-1].item() * (1 - 1e-9)  # ||A v|| >= sigma_min for every v
    assert spectrum.sigma_min == pytest.approx(values[-1].item(), rel=1e-3)
    wide, wide_shape = make("conv2d-s2-p1")  # stride 2: fewer outputs than inputs
    assert operator_spectrum(wide, wide_shape, method="power").condition_number == math.inf


@pytest.mark.parametrize("name", ["conv2d-s1-p1", "conv1d-same-even", "conv2d-reflect", "conv2d-groups2"])
def test_spectrum_by_lanczos_matches_dense(name):
    layer, shape = make(name)
    values = dense_svd(layer, shape)
    spectrum = operator_spectrum(layer, shape, method="lanczos", n_iter=400, tol=0.0)  # whole space
    assert spectrum.method == "lanczos"
    assert spectrum.sigma_max == pytest.approx(values[0].item(), rel=1e-10)
    assert spectrum.sigma_min == pytest.approx(values[-1].item(), rel=1e-6)


def test_spectrum_by_lanczos_brackets_and_beats_power_iteration():
    layer = nn.Conv2d(8, 8, 3, padding=1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(3)))
    shape = (8, 10, 10)
    values = dense_svd(layer, shape)
    lanczos = operator_spectrum(layer, shape, method="lanczos", n_iter=150)
    power = operator_spectrum(layer, shape, method="power", n_iter=150)
    assert lanczos.sigma_max <= values[0].item() * (1 + 1e-12)
    assert lanczos.sigma_min >= values[-1].item() * (1 - 1e-9)  # Cauchy interlacing: from above
    assert lanczos.sigma_min - values[-1].item() < 0.5 * (power.sigma_min - values[-1].item())
    big = nn.Conv2d(16, 16, 3, padding=1)  # 16384 x 16384: too big for the dense SVD
    assert operator_spectrum(big, (16, 32, 32), n_iter=20).method == "lanczos"


def test_linear_spectrum_is_the_svd_of_the_weight():
    tall = nn.Linear(3, 5).double()
    values = torch.linalg.svdvals(tall.weight.detach())
    spectrum = operator_spectrum(tall, (3,))
    assert spectrum.method == "fft"
    torch.testing.assert_close(spectrum.singular_values, values, atol=1e-12, rtol=0)
    assert spectrum.condition_number == pytest.approx((values[0] / values[-1]).item(), rel=1e-12)
    wide = nn.Linear(5, 3).double()
    assert operator_spectrum(wide, (5,)).condition_number == math.inf


def test_dense_operator_uses_the_forward_and_leaves_the_layer_alone():
    layer, shape = make("conv2d-s2-p1")
    layer.train()
    bias = layer.bias.detach().clone()
    dense = dense_operator(layer, shape)
    x = torch.randn((2, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = (layer(x) - layer.bias[:, None, None]).reshape(2, -1)
    torch.testing.assert_close(x.reshape(2, -1) @ dense.T, expected, atol=1e-12, rtol=0)
    assert layer.training and torch.equal(layer.bias, bias)


# --------------------------------------------------------------------------------------------------
# Batch normalisation
# --------------------------------------------------------------------------------------------------


def _random_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=generator) * 2)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator))
    return bn


@pytest.mark.parametrize(
    "bn, shape",
    [
        (nn.BatchNorm2d(3), (3, 4, 4)),
        (nn.BatchNorm1d(5), (5,)),
        (nn.BatchNorm1d(4, affine=False), (4, 3)),
    ],
)
def test_batchnorm_lipschitz_matches_the_dense_jacobian(bn, shape):
    bn = _random_bn(bn).eval()
    true = dense_svd(bn, shape)[0].item()
    assert batchnorm_lipschitz(bn) == pytest.approx(true, rel=1e-12)
    gamma = bn.weight.detach().double().abs() if bn.affine else torch.ones(shape[0], dtype=torch.float64)
    expected = (gamma / torch.sqrt(bn.running_var.double() + bn.eps)).max().item()
    assert batchnorm_lipschitz(bn) == pytest.approx(expected, rel=1e-15)


def test_batchnorm_without_running_statistics_is_refused():
    with pytest.raises(ValueError, match="track_running_stats"):
        batchnorm_lipschitz(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(TypeError):
        batchnorm_lipschitz(nn.LayerNorm(3))


# --------------------------------------------------------------------------------------------------
# Lipschitz bound of a network
# --------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """CIFAR-style basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.kind, self.stride, self.extra = shortcut, stride, cout - cin
        if shortcut == "conv":
            self.short_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.short_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.kind == "identity":
            short = x
        elif self.kind == "conv":
            short = self.short_bn(self.short_conv(x))
        else:  # option A: subsample and zero-pad the new channels
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + short)


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block1 = _Block(4, 4, 1, "identity")
        self.block2 = _Block(4, 6, 2, "conv")
        self.block3 = _Block(6, 8, 2, "pad")
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out = F.relu(self.bn(self.stem(x)))
        out = self.block3(self.block2(self.block1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    for i, module in enumerate(model.modules()):
        if isinstance(module, nn.BatchNorm2d):
            _random_bn(module, seed + i)
    return model.double()


def _exact_jacobian_norms(model, inputs):
    norms = []
    for x in inputs:
        jac = torch.autograd.functional.jacobian(lambda t: model(t[None])[0], x)
        norms.append(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2).item())
    return norms


def test_resnet_bound_is_above_the_empirical_lower_bound_and_follows_the_graph():
    torch.manual_seed(0)
    model = _prepared(_ResNet()).eval()
    shape = (3, 8, 8)
    bound = lipschitz_upper_bound(model, shape)
    assert bound.graph_aware
    inputs = torch.randn((6, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lower = jacobian_lipschitz_lower_bound(model, inputs, n_iter=100)
    exact = _exact_jacobian_norms(model, inputs)
    assert bound.value >= max(exact) >= lower.value * (1 - 1e-9)
    # the propagation, written out: every block is L -> L * (1 + bn2 conv2 bn1 conv1 ... shortcut)
    n = bound.layer_norms
    pre = n["bn"] * n["stem"]

    def block(name, shortcut):
        return n[f"{name}.bn2"] * n[f"{name}.conv2"] * n[f"{name}.bn1"] * n[f"{name}.conv1"] + shortcut

    expected = pre * block("block1", 1.0) * block("block2", n["block2.short_bn"] * n["block2.short_conv"])
    expected *= block("block3", 1.0) * (1 / 2) * n["fc"]  # 2x2 global average: 1/sqrt(4)
    assert bound.value == pytest.approx(expected, rel=1e-12)
    assert n["block1.bn1"] == pytest.approx(batchnorm_lipschitz(model.block1.bn1), rel=1e-15)
    for name in ("stem", "block2.conv1", "block3.conv2", "block2.short_conv", "fc"):
        module = model.get_submodule(name)
        assert n[name] >= dense_svd(module, _input_shape(model, name, shape))[0].item() * (1 - 1e-12)


def test_resnet20_bound_is_above_the_empirical_lower_bound():
    torch.manual_seed(0)
    model = _prepared(resnet20()).eval()  # BatchNorm statistics away from the identity, float64
    shape = (3, 16, 16)  # the CIFAR architecture on smaller images: a quarter of the Gram work of 32 x 32
    bound = lipschitz_upper_bound(model, shape)
    assert bound.graph_aware
    inputs = torch.randn((4, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    jacobians = torch.func.vmap(torch.func.jacrev(lambda x: model(x[None])[0]))(inputs)  # (4, 10, *shape)
    exact = torch.linalg.matrix_norm(jacobians.reshape(4, 10, -1), ord=2).max().item()
    lower = jacobian_lipschitz_lower_bound(model, inputs, n_iter=3)
    assert lower.value <= exact * (1 + 1e-9)
    assert exact <= bound.value


def _input_shape(model, name, shape):
    seen = {}

    def hook(module, args):
        seen["s"] = args[0].shape

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.zeros((1, *shape), dtype=torch.float64))
    handle.remove()
    return tuple(seen["s"][1:])


def test_bound_leaves_the_model_untouched():
    model = _prepared(_ResNet()).train()
    model.block2.eval()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    lipschitz_upper_bound(model, (3, 8, 8))
    naive_lipschitz_product(model, (3, 8, 8))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_bound_of_linear_networks():
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    w2 = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    single = nn.Linear(5, 6).double()
    with torch.no_grad():
        single.weight.copy_(w1)
    exact = torch.linalg.matrix_norm(w1, ord=2).item()
    assert lipschitz_upper_bound(single, (5,)).value == pytest.approx(exact, rel=1e-5)
    assert lipschitz_upper_bound(single, (5,), method="auto").value == pytest.approx(exact, rel=1e-12)

    chain = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        chain[0].weight.copy_(w1)
        chain[1].weight.copy_(w2)
    product = exact * torch.linalg.matrix_norm(w2, ord=2).item()
    composed = torch.linalg.matrix_norm(w2 @ w1, ord=2).item()
    bound = lipschitz_upper_bound(chain, (5,)).value
    assert bound == pytest.approx(product, rel=1e-5)
    assert bound >= composed
    assert naive_lipschitz_product(chain, (5,)).value == pytest.approx(product, rel=1e-5)

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 6, bias=False)

        def forward(self, x):
            return x + self.linear(x)

    residual = Residual().double()
    square = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        residual.linear.weight.copy_(square)
    bound = lipschitz_upper_bound(residual, (6,)).value
    assert bound >= torch.linalg.matrix_norm(torch.eye(6, dtype=torch.float64) + square, ord=2).item()
    assert bound == pytest.approx(1 + torch.linalg.matrix_norm(square, ord=2).item(), rel=1e-5)


def test_bound_of_a_circular_convolution_is_its_exact_norm():
    layer, shape = make("conv2d-circular")
    exact = dense_svd(layer, shape)[0].item()
    assert lipschitz_upper_bound(layer, shape, method="auto").value == pytest.approx(exact, rel=1e-12)
    assert lipschitz_upper_bound(layer, shape).value == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize(
    "pool, shape",
    [
        (nn.AvgPool2d(2), (1, 6, 6)),
        (nn.AvgPool2d(3, stride=2, padding=1), (1, 7, 6)),
        (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (1, 6, 7)),
        (nn.AvgPool2d(2, divisor_override=3), (1, 6, 6)),
        (nn.AdaptiveAvgPool2d(3), (1, 7, 7)),
        (nn.AdaptiveAvgPool2d(1), (1, 5, 4)),
        (nn.AvgPool1d(3, stride=1), (1, 6)),
    ],
)
def test_average_pooling_factor_is_the_exact_operator_norm(pool, shape):
    exact = dense_svd(pool, shape)[0].item()
    assert lipschitz_upper_bound(pool, shape).value == pytest.approx(exact, rel=1e-12)


def test_non_overlapping_average_pooling_is_one_over_k():
    assert lipschitz_upper_bound(nn.AvgPool2d(2), (3, 8, 8)).value == pytest.approx(0.5, rel=1e-14)
    assert lipschitz_upper_bound(nn.AvgPool2d(4), (3, 8, 8)).value == pytest.approx(0.25, rel=1e-14)


@pytest.mark.parametrize(
    "pool, expected",
    [
        (nn.MaxPool2d(2), 1.0),  # windows do not overlap
        (nn.MaxPool2d(3, stride=2, padding=1), 2.0),  # an entry can sit in 2 x 2 windows
        (nn.AdaptiveMaxPool2d(3), math.sqrt(4)),  # 7 -> 3: windows [0,3), [2,5), [4,7) overlap
    ],
)
def test_max_pooling_factor(pool, expected):
    assert lipschitz_upper_bound(pool, (1, 7, 7)).value == pytest.approx(expected, rel=1e-14)


def test_max_pooling_factor_is_attained():
    # two overlapping windows share the maximal entry: moving it by t moves two outputs by t
    pool = nn.MaxPool1d(3, stride=2)
    x = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0]]])
    dx = torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0]]])
    ratio = ((pool(x + dx) - pool(x)).norm() / dx.norm()).item()
    assert ratio == pytest.approx(math.sqrt(2))
    assert lipschitz_upper_bound(pool, (1, 5)).value == pytest.approx(math.sqrt(2))


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.b = nn.Conv2d(2, 2, 1, bias=False)

    def forward(self, x):
        y = torch.cat([self.a(x), torch.tanh(self.b(x))], dim=1)
        return 3 * y / 2 - 0.5


def test_concatenation_and_scalar_rules():
    model = _prepared(_Branches())
    shape = (2, 5, 5)
    bound = lipschitz_upper_bound(model, shape)
    a, b = bound.layer_norms["a"], bound.layer_norms["b"]
    assert bound.value == pytest.approx(1.5 * math.sqrt(a * a + b * b), rel=1e-12)
    stacked = torch.cat([dense_operator(model.a, shape), dense_operator(model.b, shape)])
    assert bound.value >= 1.5 * torch.linalg.matrix_norm(stacked, ord=2).item()


class _Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * x


class _Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize("model, match", [(_Product(), "mul"), (_Branching(), "symbolic_trace")])
def test_unsupported_models(model, match):
    model = model.double()
    with pytest.raises(UnsupportedModelError, match=match):
        lipschitz_upper_bound(model, (4,))
    with pytest.warns(UserWarning, match="not graph-aware"):
        fallback = lipschitz_upper_bound(model, (4,), fallback="naive")
    naive = naive_lipschitz_product(model, (4,))
    assert not fallback.graph_aware
    assert fallback.value == pytest.approx(naive.value, rel=1e-12)
    assert naive.value == pytest.approx(torch.linalg.matrix_norm(model.fc.weight, ord=2).item(), rel=1e-5)


def test_bound_arguments_and_reuse_of_layer_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="lower bound"):
        lipschitz_upper_bound(model, (3,), method="power")
    with pytest.raises(ValueError, match="fallback"):
        lipschitz_upper_bound(model, (3,), fallback="ignore")
    assert lipschitz_upper_bound(model, (3,), layer_norms={"0": 2.0, "2": 3.0}).value == 6.0
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    assert math.isnan(lipschitz_upper_bound(model, (3,)).value)


# --------------------------------------------------------------------------------------------------
# Jacobian lower bound
# --------------------------------------------------------------------------------------------------


class _SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.bn(self.conv(x)))).flatten(1))


def test_jacobian_lower_bound_matches_the_explicit_jacobian():
    model = _prepared(_SmallNet()).eval()
    inputs = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = jacobian_lipschitz_lower_bound(model, inputs, n_iter=500, tol=1e-13)
    exact = torch.tensor(_exact_jacobian_norms(model, inputs), dtype=torch.float64)
    torch.testing.assert_close(result.per_example, exact, rtol=1e-6, atol=0)
    assert result.value == pytest.approx(exact.max().item(), rel=1e-6)
    assert bool((result.per_example <= exact * (1 + 1e-12)).all())
    assert result.vectors.shape == inputs.shape
    warm = jacobian_lipschitz_lower_bound(model, inputs, n_iter=500, tol=1e-8, init=result.vectors)
    assert warm.iterations <= 3


def test_jacobian_lower_bound_does_not_perturb_training():
    model = _prepared(_SmallNet()).train()
    model.bn.momentum = 0.5
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    inputs = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jacobian_lipschitz_lower_bound(model, inputs, n_iter=5)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------------------------------
# Spectral complexity and normalised margins (Bartlett, Foster & Telgarsky, 2017)
# --------------------------------------------------------------------------------------------------


def test_spectral_complexity_by_hand():
    # A1 = [[4, 4], [0, 1]], M1 = I:  A1 - M1 = [[3, 4], [0, 0]], rows have norms 5 and 0 -> (2,1) = 5
    #   (columns would give 3 + 4 = 7). A1^T A1 = [[16, 16], [16, 17]]: trace 33, det 16,
    #   ||A1||^2 = (33 + sqrt(1025)) / 2.
    # A2 = [[1, 2]], M2 = [[1, 0]]: A2 - M2 = [[0, 2]] -> (2,1) = 2; ||A2|| = sqrt(5).
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    reference = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, 4.0], [0.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 2.0]]))
        reference[0].weight.copy_(torch.eye(2))
        reference[2].weight.copy_(torch.tensor([[1.0, 0.0]]))
    s1 = math.sqrt((33 + math.sqrt(1025)) / 2)
    s2 = math.sqrt(5)
    expected = s1 * s2 * ((5 / s1) ** (2 / 3) + (2 / s2) ** (2 / 3)) ** 1.5
    result = spectral_complexity(model, reference)
    assert result.spectral_norms == {"0": pytest.approx(s1, rel=1e-6), "2": pytest.approx(s2, rel=1e-6)}
    assert result.l21_distances == {"0": pytest.approx(5.0), "2": pytest.approx(2.0)}
    assert result.value == pytest.approx(expected, rel=1e-6)
    from_state = spectral_complexity(model, reference.state_dict())
    assert from_state.value == pytest.approx(expected, rel=1e-6)

    # normalised margins: 3 examples, 3 classes; X is 3 x 2, ||X||_F = sqrt(1 + 4 + 4 + 0 + 1 + 1) = sqrt(11)
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 5.0], [1.0, 1.0, -1.0]])
    targets = torch.tensor([0, 1, 1])
    inputs = torch.tensor([[1.0, 2.0], [2.0, 0.0], [1.0, 1.0]])
    margins = torch.tensor([3.0 - 2.0, 2.0 - 5.0, 1.0 - 1.0])
    scale = expected * math.sqrt(11) / 3
    torch.testing.assert_close(
        normalized_margins(logits, targets, result, inputs), margins / scale, rtol=1e-6, atol=1e-12
    )
    torch.testing.assert_close(normalized_margins(logits, targets, result.value, inputs), margins / scale)


def test_spectral_complexity_of_a_convolution_uses_the_operator_norm():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 2, bias=False),
    ).double()
    reference = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    result = spectral_complexity(model, reference, input_shape=(2, 5, 5))
    conv_norm = dense_svd(model[0], (2, 5, 5))[0].item()
    fc_norm = torch.linalg.matrix_norm(model[3].weight, ord=2).item()
    conv_l21 = model[0].weight.reshape(3, -1).norm(dim=1).sum().item()
    fc_l21 = model[3].weight.norm(dim=1).sum().item()
    ratios = (conv_l21 / conv_norm) ** (2 / 3) + (fc_l21 / fc_norm) ** (2 / 3)
    expected = conv_norm * fc_norm * ratios**1.5
    assert result.value == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="input_shape"):
        spectral_complexity(model, reference)


def test_normalized_margins_validates_its_inputs():
    with pytest.raises(ValueError, match="classes"):
        normalized_margins(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 1.0, torch.ones(2, 3))
    with pytest.raises(ValueError, match="same number"):
        normalized_margins(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 1.0, torch.ones(2, 3))


def test_no_warning_for_supported_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lipschitz_upper_bound(_prepared(_ResNet()), (3, 8, 8))
