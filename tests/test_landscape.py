"""Tests of lt_theory.measures.landscape against independent references.

References: least squares ``L(w) = ||Xw - y||^2 / 2n`` (Hessian ``X^T X / n`` in closed form, gradient
``H (w - w*)``), the dense float64 Hessian of a two-layer tanh network written out by hand
(``torch.func.hessian``, eigenvalues by ``torch.linalg.eigvalsh``), and covariances built explicitly from the
activations (``torch.cov``, ``torch.linalg.cond``).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lt_theory.measures.landscape import (
    DEFAULT_CONDITION_FLOOR,
    activation_conditioning,
    gradient_to_weight_ratios,
    observed_rate,
    pl_ratio,
    predicted_rate,
    sharpness,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func's first jvp


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``||f(x) - y||^2 / 2n`` over a batch: with f(x) = x^T w, the least-squares loss."""
    return 0.5 * (outputs.squeeze(1) - targets).pow(2).mean()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Least squares: H = X^T X / n, L* = 0 when y = X w*
# --------------------------------------------------------------------------------------------------


class LeastSquares:
    """``n = 40`` examples of ``d = 6`` features of rank 4 (so H has two zero eigenvalues), y = X w*, split into
    two batches of unequal sizes (a plain mean of batch means, or a sum, is then wrong)."""

    def __init__(self, rank: int = 4, d: int = 6, n: int = 40, seed: int = 0) -> None:
        g = generator(seed)
        scales = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1, 0.05][:rank], dtype=torch.float64)
        self.x = (torch.randn(n, rank, generator=g, dtype=torch.float64) * scales) @ torch.randn(
            rank, d, generator=g, dtype=torch.float64
        ) + 0.0
        self.w_star = torch.randn(d, generator=g, dtype=torch.float64)
        self.y = self.x @ self.w_star
        self.hessian = self.x.T @ self.x / n
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.hessian)
        self.model = nn.Linear(d, 1, bias=False).double()
        self.batches = [(self.x[:13], self.y[:13]), (self.x[13:], self.y[13:])]

    def set_weights(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.model.weight.copy_(w.reshape(1, -1))

    @property
    def nonzero_eigenvalues(self) -> torch.Tensor:
        return self.eigenvalues[self.eigenvalues > 1e-10 * self.eigenvalues[-1]]


@pytest.fixture
def least_squares() -> LeastSquares:
    return LeastSquares()


def test_sharpness_of_least_squares_is_the_top_eigenvalue_of_the_gram_matrix(least_squares):
    ls = least_squares
    ls.set_weights(torch.randn(6, generator=generator(1), dtype=torch.float64))
    result = sharpness(ls.model, half_mse, ls.batches, iters=20, tol=0.0)
    top = float(ls.eigenvalues[-1])
    assert result.value == pytest.approx(top, rel=1e-8)
    assert result.iterations <= 6  # the Krylov space of a 6-parameter Hessian is invariant after 6 steps
    assert torch.allclose(ls.hessian @ result.vector, top * result.vector, atol=1e-8 * top)
    assert float(result.vector.norm()) == pytest.approx(1.0, rel=1e-12)


def test_sharpness_is_the_same_at_every_point_for_a_quadratic(least_squares):
    ls = least_squares
    values = []
    for seed in range(3):
        ls.set_weights(torch.randn(6, generator=generator(seed), dtype=torch.float64) * 10)
        values.append(sharpness(ls.model, half_mse, ls.batches, tol=0.0).value)
    assert values == pytest.approx([float(ls.eigenvalues[-1])] * 3, rel=1e-8)


def test_sharpness_warm_started_at_the_top_eigenvector_takes_one_step(least_squares):
    ls = least_squares
    top_vector = ls.eigenvectors[:, -1]
    result = sharpness(ls.model, half_mse, ls.batches, init=top_vector)
    assert result.iterations == 1  # H v = lambda v: the Krylov space is invariant at once
    assert result.value == pytest.approx(float(ls.eigenvalues[-1]), rel=1e-10)
    cold = sharpness(
        ls.model, half_mse, ls.batches, init=torch.full((6,), math.nan)
    )  # unusable: random start
    assert cold.iterations > 1 and cold.value == pytest.approx(float(ls.eigenvalues[-1]), rel=1e-8)


def test_sharpness_reports_the_top_of_the_spectrum_not_the_largest_magnitude():
    """H = X^T diag(s) X / n with signed example weights s: eigenvalues 1, 0.5 and -3."""
    x = torch.eye(3, dtype=torch.float64)
    signs = torch.tensor([1.0, 0.5, -3.0], dtype=torch.float64) * 3  # the mean divides by n = 3

    def weighted_half_square(outputs, weights):
        return 0.5 * (outputs.squeeze(1).pow(2) * weights).mean()

    model = nn.Linear(3, 1, bias=False).double()
    result = sharpness(model, weighted_half_square, [(x, signs)], tol=0.0)
    assert result.value == pytest.approx(1.0, rel=1e-10)
    assert result.vector.abs().tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-8)


def test_sharpness_with_fewer_steps_than_parameters_is_a_lower_bound():
    g = generator(3)
    x = torch.randn(200, 60, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 2.0, 60, dtype=torch.float64
    )
    y = torch.randn(200, generator=g, dtype=torch.float64)
    top = float(torch.linalg.eigvalsh(x.T @ x / 200)[-1])
    model = nn.Linear(60, 1, bias=False).double()
    few = sharpness(model, half_mse, [(x, y)], iters=5, tol=0.0)
    many = sharpness(model, half_mse, [(x, y)], iters=30, tol=0.0)
    assert few.iterations == 5 and few.value <= top * (1 + 1e-12)
    assert few.value <= many.value <= top * (1 + 1e-12)
    assert many.value == pytest.approx(top, rel=1e-6)


def test_pl_ratio_at_random_points_lies_between_the_smallest_nonzero_and_the_largest_eigenvalue(
    least_squares,
):
    ls = least_squares
    low, high = float(ls.nonzero_eigenvalues[0]), float(ls.eigenvalues[-1])
    assert low > 1e-4 and ls.nonzero_eigenvalues.numel() == 4  # rank 4: two zero eigenvalues excluded
    for seed in range(5):
        ls.set_weights(ls.w_star + torch.randn(6, generator=generator(10 + seed), dtype=torch.float64))
        result = pl_ratio(ls.model, half_mse, ls.batches)
        assert low * (1 - 1e-10) <= result.ratio <= high * (1 + 1e-10), result
        assert result.reason == ""


@pytest.mark.parametrize("index", [-1, -2, -4])
def test_pl_ratio_along_an_eigenvector_is_exactly_its_eigenvalue(least_squares, index):
    ls = least_squares
    eigenvalue, direction, c = float(ls.eigenvalues[index]), ls.eigenvectors[:, index], 0.7
    ls.set_weights(ls.w_star + c * direction)
    result = pl_ratio(ls.model, half_mse, ls.batches)
    assert result.loss == pytest.approx(0.5 * c**2 * eigenvalue, rel=1e-10)  # (w - w*)^T H (w - w*) / 2
    assert result.grad_norm == pytest.approx(c * eigenvalue, rel=1e-10)  # ||H (w - w*)||
    assert result.ratio == pytest.approx(eigenvalue, rel=1e-10)


def test_pl_ratio_subtracts_loss_star(least_squares):
    ls = least_squares
    ls.set_weights(ls.w_star + ls.eigenvectors[:, -1])
    plain = pl_ratio(ls.model, half_mse, ls.batches)
    shifted = pl_ratio(ls.model, half_mse, ls.batches, loss_star=0.75 * plain.loss)
    assert shifted.ratio == pytest.approx(4 * plain.ratio, rel=1e-12)
    assert (shifted.loss, shifted.grad_norm) == (plain.loss, plain.grad_norm)


def test_pl_ratio_is_nan_with_a_reason_where_the_loss_is_not_above_loss_star(least_squares):
    ls = least_squares
    ls.set_weights(torch.zeros(6, dtype=torch.float64))
    at_minimum = pl_ratio(ls.model, half_mse, [(x, 0 * y) for x, y in ls.batches])  # exactly L = 0 = L*
    assert at_minimum.loss == 0 and math.isnan(at_minimum.ratio) and "loss_star" in at_minimum.reason
    ls.set_weights(ls.w_star + ls.eigenvectors[:, -1])
    below = pl_ratio(ls.model, half_mse, ls.batches, loss_star=100.0)
    assert below.loss < 100 and math.isnan(below.ratio) and "not above loss_star=100" in below.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0", True, None])
def test_bad_loss_star_raises_value_error_naming_it(least_squares, bad):
    with pytest.raises(ValueError, match="loss_star"):
        pl_ratio(least_squares.model, half_mse, least_squares.batches, loss_star=bad)


def gradient_descent(ls: LeastSquares, lr: float, steps: int) -> None:
    """``steps`` steps of w <- w - lr H (w - w*), the gradient of least squares, by hand."""
    w = ls.model.weight.detach().reshape(-1)
    for _ in range(steps):
        w = w - lr * ls.hessian @ (w - ls.w_star)
    ls.set_weights(w)


def test_predicted_rate_is_the_observed_rate_of_gradient_descent_along_the_top_eigenvector(least_squares):
    """With w - w* = c u_max, a step multiplies the error by 1 - lr lambda and L - L* by (1 - lr lambda)^2:
    the per-step fraction removed is lr lambda (2 - lr lambda), with mu = beta = lambda_max."""
    ls = least_squares
    top = float(ls.eigenvalues[-1])
    for lr in (0.3 / top, 1.0 / top, 1.7 / top):
        ls.set_weights(ls.w_star + 0.5 * ls.eigenvectors[:, -1])
        before = pl_ratio(ls.model, half_mse, ls.batches)
        beta = sharpness(ls.model, half_mse, ls.batches, tol=0.0).value
        predicted = predicted_rate(before.ratio, beta, lr)
        assert predicted == pytest.approx(lr * top * (2 - lr * top), rel=1e-8)
        gradient_descent(ls, lr, steps=3)
        after = pl_ratio(ls.model, half_mse, ls.batches).loss
        assert observed_rate(before.loss, after, steps=3) == pytest.approx(predicted, rel=1e-8)


def test_predicted_rate_is_a_guarantee_for_one_gradient_descent_step(least_squares):
    ls = least_squares
    beta = float(ls.eigenvalues[-1])
    for seed in range(5):
        ls.set_weights(ls.w_star + torch.randn(6, generator=generator(20 + seed), dtype=torch.float64))
        before = pl_ratio(ls.model, half_mse, ls.batches)
        lr = (0.2 + 0.35 * seed) / beta
        gradient_descent(ls, lr, steps=1)
        observed = observed_rate(before.loss, pl_ratio(ls.model, half_mse, ls.batches).loss, steps=1)
        assert observed >= predicted_rate(before.ratio, beta, lr) - 1e-12


def test_rates_closed_forms_and_undefined_cases():
    assert predicted_rate(2.0, 10.0, 0.2) == 0.0  # lr = 2 / beta: the edge of stability, nothing guaranteed
    assert predicted_rate(2.0, 10.0, 0.3) < 0
    assert predicted_rate(0.5, 4.0, 0.1) == pytest.approx(0.5 * 0.1 * 1.6)
    assert math.isnan(predicted_rate(math.nan, 4.0, 0.1))
    assert observed_rate(1.0, 0.125, steps=3) == pytest.approx(0.5)
    assert observed_rate(1.5, 1.0, steps=1, loss_star=0.5) == pytest.approx(0.5)
    assert observed_rate(1.0, 4.0, steps=2) == pytest.approx(-1.0)  # the loss rose: doubled per step
    for previous, loss in ((1.0, 0.0), (0.0, 1.0), (math.nan, 1.0), (1.0, math.inf)):
        assert math.isnan(observed_rate(previous, loss, steps=1))
    with pytest.raises(ValueError, match="steps"):
        observed_rate(1.0, 0.5, steps=0)
    with pytest.raises(ValueError, match="lr"):
        predicted_rate(1.0, 1.0, -0.1)
    with pytest.raises(ValueError, match="loss_star"):
        observed_rate(1.0, 0.5, steps=1, loss_star=math.nan)


# --------------------------------------------------------------------------------------------------
# A two-layer tanh network against its dense Hessian, written out by hand
# --------------------------------------------------------------------------------------------------

SIZES = {"0.weight": (5, 3), "0.bias": (5,), "2.weight": (2, 5), "2.bias": (2,)}


def tanh_network(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def tanh_data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = generator(seed)
    x = torch.randn(17, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (17,), generator=g)
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def unflatten(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    parts, offset = {}, 0
    for name, shape in SIZES.items():
        numel = math.prod(shape)
        parts[name] = theta[offset : offset + numel].reshape(shape)
        offset += numel
    return parts


def dense_loss(theta: torch.Tensor, batches) -> torch.Tensor:
    """The mean cross-entropy over every example of the batches, ``W2 tanh(W1 x + b1) + b2`` by hand."""
    p = unflatten(theta)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    logits = torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]
    return -torch.log_softmax(logits, dim=1).gather(1, y[:, None]).mean()


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_sharpness_of_a_tanh_network_matches_the_dense_hessian():
    model, batches = tanh_network(), tanh_data()
    theta = flat_parameters(model)
    hessian = torch.func.hessian(dense_loss)(theta, batches)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    exact = sharpness(model, F.cross_entropy, batches, iters=theta.numel(), tol=0.0)
    assert exact.value == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    residual = hessian @ exact.vector - exact.value * exact.vector
    assert float(residual.norm()) < 1e-7 * abs(exact.value)
    default = sharpness(model, F.cross_entropy, batches)  # 20 steps, tol 1e-3
    assert default.value <= float(eigenvalues[-1]) * (1 + 1e-12)
    assert default.value == pytest.approx(float(eigenvalues[-1]), rel=1e-3)


BN_SIZES = {"0.weight": (4, 3), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,), "3.weight": (2, 4), "3.bias": (2,)}


def dense_batchnorm_loss(theta: torch.Tensor, batches) -> torch.Tensor:
    """``W3 tanh(BN(W0 x + b0)) + b3`` by hand, each batch normalised by its own mean and biased variance (as in
    a training step), the cross-entropy averaged over every example."""
    p, offset = {}, 0
    for name, shape in BN_SIZES.items():
        p[name] = theta[offset : offset + math.prod(shape)].reshape(shape)
        offset += math.prod(shape)
    total, count = 0.0, 0
    for x, y in batches:
        h = x @ p["0.weight"].T + p["0.bias"]
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * p["1.weight"] + p["1.bias"]
        logits = torch.tanh(h) @ p["3.weight"].T + p["3.bias"]
        total = total + (-torch.log_softmax(logits, dim=1).gather(1, y[:, None])).sum()
        count += len(y)
    return total / count


@pytest.mark.parametrize("bn_statistics", ["batch", "running"])
def test_sharpness_of_a_batchnorm_network_is_that_of_the_loss_its_batchnorm_mode_gives(bn_statistics):
    """With ``"batch"``, the Hessian of the training-step loss (per-batch statistics, stale running statistics
    ignored); with ``"running"``, the test-time network's, which the stale statistics make another function."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(0.01)
    batches = tanh_data(4)
    theta = flat_parameters(model)
    batch_top = float(torch.linalg.eigvalsh(torch.func.hessian(dense_batchnorm_loss)(theta, batches))[-1])
    exact = sharpness(model, F.cross_entropy, batches, iters=theta.numel(), tol=0.0, bn_statistics=bn_statistics)
    if bn_statistics == "batch":
        assert exact.value == pytest.approx(batch_top, rel=1e-8)
    else:
        assert exact.value != pytest.approx(batch_top, rel=1e-2)
        assert float(model[1].running_var[0]) == 0.01  # the running statistics were used, not updated


def test_gradient_quantities_of_a_tanh_network_match_the_dense_gradient():
    model, batches = tanh_network(1), tanh_data(1)
    theta = flat_parameters(model).requires_grad_(True)
    loss = dense_loss(theta, batches)
    (gradient,) = torch.autograd.grad(loss, theta)
    loss = loss.detach()
    pl = pl_ratio(model, F.cross_entropy, batches, loss_star=0.1)
    assert pl.loss == pytest.approx(float(loss), rel=1e-12)
    assert pl.grad_norm == pytest.approx(float(gradient.norm()), rel=1e-10)
    assert pl.ratio == pytest.approx(float(gradient.norm()) ** 2 / (2 * (float(loss) - 0.1)), rel=1e-10)
    ratios = gradient_to_weight_ratios(model, F.cross_entropy, batches)
    grads, weights = unflatten(gradient), unflatten(theta.detach())
    for layer in ("0", "2"):
        g = torch.cat([grads[f"{layer}.weight"].reshape(-1), grads[f"{layer}.bias"]])
        w = torch.cat([weights[f"{layer}.weight"].reshape(-1), weights[f"{layer}.bias"]])
        assert ratios.grad_norms[layer] == pytest.approx(float(g.norm()), rel=1e-10)
        assert ratios.weight_norms[layer] == pytest.approx(float(w.norm()), rel=1e-12)
        assert ratios.ratios[layer] == pytest.approx(float(g.norm() / w.norm()), rel=1e-10)
    assert list(ratios.ratios) == ["0", "2"]


def test_frozen_parameters_are_constants_of_the_hessian():
    model, batches = tanh_network(2), tanh_data(2)
    model[0].requires_grad_(False)
    theta = flat_parameters(model)
    first = theta[:20]  # layer 0's weight and bias, frozen

    def loss_of_last_layer(last):
        return dense_loss(torch.cat([first, last]), batches)

    eigenvalues = torch.linalg.eigvalsh(torch.func.hessian(loss_of_last_layer)(theta[20:]))
    result = sharpness(model, F.cross_entropy, batches, iters=12, tol=0.0)
    assert result.vector.numel() == 12
    assert result.value == pytest.approx(float(eigenvalues[-1]), rel=1e-8)
    assert list(gradient_to_weight_ratios(model, F.cross_entropy, batches).ratios) == ["2"]


def test_gradient_to_weight_ratio_of_a_zero_layer_is_inf_or_nan():
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    x, y = torch.ones(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert gradient_to_weight_ratios(model, half_mse, [(x, y)]).ratios == {"": math.inf}
    assert math.isnan(gradient_to_weight_ratios(model, half_mse, [(x, 0 * y)]).ratios[""])  # 0 / 0


# --------------------------------------------------------------------------------------------------
# Activation conditioning against explicit covariances
# --------------------------------------------------------------------------------------------------


def explicit_condition(features: torch.Tensor) -> float:
    """``cond`` of the centred covariance of ``(samples, features)``, built and inverted explicitly."""
    return float(torch.linalg.cond(torch.cov(features.T.double(), correction=0)))


def channels(activation: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` as ``(N * spatial, C)``."""
    return activation.transpose(0, 1).reshape(activation.shape[1], -1).T


def conv_network() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
    ).double()


def conv_inputs() -> torch.Tensor:
    """Offset (so that centring matters) and unevenly scaled channels."""
    g = generator(5)
    scale = torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64).reshape(1, 3, 1, 1)
    return torch.randn(50, 3, 6, 6, generator=g, dtype=torch.float64) * scale + 2.0


@pytest.mark.parametrize("bn_statistics", ["batch", "running"])
def test_activation_conditioning_matches_explicit_covariances(bn_statistics):
    model, x = conv_network(), conv_inputs()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5, generator=generator(6))
        model[1].running_var.uniform_(0.5, 2.0, generator=generator(7))
        model[1].weight.uniform_(0.5, 2.0, generator=generator(8))
        model.eval()
        conv_out = model[0](x)
        if bn_statistics == "running":
            bn_out = model[1](conv_out)
        else:  # standardised by the batch's own per-channel mean and biased variance, then the affine map
            mean = conv_out.mean(dim=(0, 2, 3), keepdim=True)
            variance = conv_out.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            scale, shift = (t.reshape(1, -1, 1, 1) for t in (model[1].weight, model[1].bias))
            bn_out = (conv_out - mean) / torch.sqrt(variance + model[1].eps) * scale + shift
        hidden_in = model[3](model[2](bn_out))
        hidden_out = model[4](hidden_in)
        last_in = model[5](hidden_out)
        last_out = model[6](last_in)
    model.train()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    result = activation_conditioning(model, x, bn_statistics=bn_statistics)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())  # running statistics kept
    assert list(result) == ["0", "1", "4", "6"]
    expected = {
        "0": (channels(x), channels(conv_out)),
        "1": (channels(conv_out), channels(bn_out)),
        "6": (last_in, last_out),
    }
    for name, (inputs, outputs) in expected.items():
        assert result[name].input_condition == pytest.approx(explicit_condition(inputs), rel=1e-8), name
        assert result[name].output_condition == pytest.approx(explicit_condition(outputs), rel=1e-8), name
        assert (result[name].input_rank, result[name].output_rank) == (inputs.shape[1], outputs.shape[1])
    raw_inputs = {"0": x, "1": conv_out, "4": hidden_in, "6": last_in}  # the tensors as the layers take them
    for name, tensor in raw_inputs.items():  # the scale of every value, not centred
        assert result[name].input_rms == pytest.approx(
            float(tensor.double().square().mean().sqrt()), rel=1e-10
        )
    # layer 4 sees 64 features of 50 examples: the centred covariance has rank 49, the condition is capped
    assert result["4"].input_rank == 49 == int(torch.linalg.matrix_rank(torch.cov(hidden_in.T, correction=0)))
    assert result["4"].input_condition == pytest.approx(1 / DEFAULT_CONDITION_FLOOR, rel=1e-6)
    assert result["4"].output_condition == pytest.approx(explicit_condition(hidden_out), rel=1e-8)
    capped = activation_conditioning(model, x, layers=["4"], floor=1e-3)
    assert list(capped) == ["4"] and capped["4"].input_condition <= 1e3 * (1 + 1e-12)


@pytest.mark.parametrize("dims", [1, 2])
def test_batchnorm_lowers_the_condition_number_of_badly_scaled_inputs(dims):
    """Channels scaled by 1 to 1000 (condition ~1e6); BatchNorm with the data's statistics: ~1."""
    g = generator(8)
    scale = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
    shape = (400, 4) if dims == 1 else (100, 4, 3, 3)
    x = (
        torch.randn(*shape, generator=g, dtype=torch.float64)
        * scale.reshape((1, 4) if dims == 1 else (1, 4, 1, 1))
        + 5.0
    )
    batchnorm = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(4, momentum=None).double()
    with torch.no_grad():
        batchnorm(x)  # momentum=None: the running statistics are the data's (variance unbiased)
        batchnorm.eval()
        output = batchnorm(x)
    result = activation_conditioning(batchnorm, x)[""]
    features = x if dims == 1 else channels(x)
    assert result.input_condition == pytest.approx(explicit_condition(features), rel=1e-8)
    assert result.input_condition > 1e5
    assert result.output_condition == pytest.approx(
        explicit_condition(output if dims == 1 else channels(output))
    )
    assert result.output_condition < 1.5


def test_a_layer_called_twice_is_measured_at_its_first_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2).double()

        def forward(self, x):
            return self.layer(torch.tanh(self.layer(x)))

    model = Twice()
    x = torch.randn(20, 2, generator=generator(11), dtype=torch.float64) * torch.tensor([1.0, 30.0]) + 1.0
    with torch.no_grad():
        first_output = model.layer(x)
    result = activation_conditioning(model, x)["layer"]
    assert result.input_condition == pytest.approx(explicit_condition(x), rel=1e-8)
    assert result.output_condition == pytest.approx(explicit_condition(first_output), rel=1e-8)


def test_activation_conditioning_bad_arguments():
    model, x = conv_network(), conv_inputs()
    with pytest.raises(ValueError, match="found no Linear, Conv or BatchNorm layer in Sequential"):
        activation_conditioning(nn.Sequential(nn.Tanh()), x)
    with pytest.raises(ValueError, match="not Linear, Conv or BatchNorm layers"):
        activation_conditioning(model, x, layers=["2"])
    with pytest.raises(ValueError, match="layers"):
        activation_conditioning(model, x, layers="0")
    with pytest.raises(ValueError, match="floor"):
        activation_conditioning(model, x, floor=0.0)
    with pytest.raises(ValueError, match="inputs"):
        activation_conditioning(model, x.numpy())
    unused = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    unused.forward = lambda inputs: unused[0](inputs)
    with pytest.raises(ValueError, match="not called"):
        activation_conditioning(unused, torch.ones(3, 2), layers=["1"])
    assert list(activation_conditioning(unused, torch.ones(3, 2))) == ["0"]  # by default: the called ones


# --------------------------------------------------------------------------------------------------
# Nothing is perturbed; bad input
# --------------------------------------------------------------------------------------------------


def batchnorm_dropout_network() -> nn.Sequential:
    torch.manual_seed(9)
    return nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)
    ).double()


def test_no_measure_perturbs_the_model_or_the_global_rng():
    model = batchnorm_dropout_network().train()
    frozen_bn = model[1].eval()  # a user's frozen BatchNorm keeps its own flag
    batches = tanh_data(3)
    before = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    results = [
        sharpness(model, F.cross_entropy, batches),
        pl_ratio(model, F.cross_entropy, batches),
        gradient_to_weight_ratios(model, F.cross_entropy, batches),
        activation_conditioning(model, batches[1][0]),
    ]
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # parameters, BatchNorm running statistics and counter
    assert all(m.training for m in model.modules() if m is not frozen_bn) and not frozen_bn.training
    # in eval mode: the same values as on the model put in eval mode by hand (dropout off, running statistics)
    eval_model = copy.deepcopy(model).eval()
    assert results[0].value == sharpness(eval_model, F.cross_entropy, batches).value
    assert results[1] == pl_ratio(eval_model, F.cross_entropy, batches)


def test_sharpness_draws_its_start_from_its_own_generator():
    model, batches = tanh_network(), tanh_data()
    first = sharpness(model, F.cross_entropy, batches, iters=3, tol=0.0, generator=generator(1))
    again = sharpness(model, F.cross_entropy, batches, iters=3, tol=0.0, generator=generator(1))
    other = sharpness(model, F.cross_entropy, batches, iters=3, tol=0.0, generator=generator(2))
    default = sharpness(model, F.cross_entropy, batches, iters=3, tol=0.0)
    assert torch.equal(first.vector, again.vector) and not torch.equal(first.vector, other.vector)
    assert torch.equal(default.vector, sharpness(model, F.cross_entropy, batches, iters=3, tol=0.0).vector)
    torch.manual_seed(123)  # the default start is a fresh seeded generator's, whatever the global state
    assert torch.equal(default.vector, sharpness(model, F.cross_entropy, batches, iters=3, tol=0.0).vector)


def per_example_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize(
    "measure",
    [
        lambda model, loss_fn, batches: sharpness(model, loss_fn, batches),
        lambda model, loss_fn, batches: pl_ratio(model, loss_fn, batches),
        lambda model, loss_fn, batches: gradient_to_weight_ratios(model, loss_fn, batches),
    ],
    ids=["sharpness", "pl_ratio", "gradient_to_weight_ratios"],
)
def test_bad_input_raises_value_error(measure):
    model, batches = tanh_network(), tanh_data()
    with pytest.raises(ValueError, match="scalar"):
        measure(model, per_example_cross_entropy, batches)
    with pytest.raises(ValueError, match="loss_fn"):
        measure(model, "cross_entropy", batches)
    with pytest.raises(ValueError, match="at least one"):
        measure(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match=r"\(inputs, targets"):
        measure(model, F.cross_entropy, [batches[0][0]])
    with pytest.raises(ValueError, match="no trainable parameter"):
        measure(copy.deepcopy(model).requires_grad_(False), F.cross_entropy, batches)


def test_bad_sharpness_arguments_raise_value_error_naming_them():
    model, batches = tanh_network(), tanh_data()
    for kwargs, name in (({"iters": 0}, "iters"), ({"tol": -1.0}, "tol"), ({"init": torch.ones(5)}, "init")):
        with pytest.raises(ValueError, match=name):
            sharpness(model, F.cross_entropy, batches, **kwargs)


def test_nan_in_the_probe_gives_nan_results_without_raising_or_warning():
    model, batches = tanh_network(), tanh_data()
    x, y = batches[1]
    x = x.clone()
    x[2, 1] = math.nan
    poisoned = [batches[0], (x, y)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the callbacks warn, once; the measures return NaN
        top = sharpness(model, F.cross_entropy, poisoned)
        pl = pl_ratio(model, F.cross_entropy, poisoned)
        ratios = gradient_to_weight_ratios(model, F.cross_entropy, poisoned)
        conditioning = activation_conditioning(model, x)
    assert (
        math.isnan(top.value) and math.isnan(pl.loss) and math.isnan(pl.ratio) and "not finite" in pl.reason
    )
    assert all(math.isnan(r) for r in ratios.ratios.values())
    assert all(math.isnan(c.input_condition) and c.input_rank == 0 for c in conditioning.values())
    assert all(math.isnan(c.input_rms) for c in conditioning.values())
