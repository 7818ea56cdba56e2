"""Empirical NTK and kernel metrics against exact references.

The kernels are checked in float64 against ``J1 J2^T`` with ``J`` built from plain autograd, one backward
pass per output entry of a batched eval-mode forward (no torch.func), on an MLP, a small CNN with BatchNorm
and LeNet-5; against the closed form of a linear model; and against the identities between the three kinds.
The metrics are checked against values worked out by hand and against ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
from torch import nn

from lt_theory.measures import ntk
from lt_theory.measures.ntk import (
    KERNEL_KINDS,
    empirical_ntk,
    flatten_kernel,
    kernel_alignment,
    kernel_distance,
    kernel_spectrum,
    relative_change,
)
from lt_theory.models import MLP, LeNet

TOL = 1e-9  # relative Frobenius error allowed in float64 (observed errors are ~1e-15)



# ------------------------------------------------------------------------------------------------------------
# Models and the reference.


class SmallBNCNN(nn.Module):
    """Two convolutions with BatchNorm, global average pooling and a linear classifier of 3 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP((5,), hidden=(7, 6), num_classes=3).double()


def make_cnn() -> nn.Module:
    """The CNN in train mode, with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(1)
    model = SmallBNCNN().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    return model


def make_inputs(model_name: str, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = {"mlp": (5,), "cnn": (2, 6, 6), "lenet": (3, 32, 32)}[model_name]
    return torch.randn(n, *shape, generator=generator, dtype=torch.float64)


MODELS = {"mlp": make_mlp, "cnn": make_cnn}


def reference_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``J`` of shape ``(N, O, P)`` over the trainable parameters, from plain autograd in eval mode."""
    model = copy.deepcopy(model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    rows = []
    for i in range(out.shape[0]):
        for a in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, a], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        torch.zeros_like(p).flatten() if g is None else g.flatten()
                        for g, p in zip(grads, params)
                    ]
                )
            )
    return torch.stack(rows).reshape(out.shape[0], out.shape[1], -1)


def reference_kernel(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, kind: str) -> torch.Tensor:
    j1, j2 = reference_jacobian(model, x1), reference_jacobian(model, x2)
    full = torch.einsum("iap,jbp->ijab", j1, j2)
    if kind == "full":
        return full
    if kind == "trace":
        return full.diagonal(dim1=2, dim2=3).mean(-1)
    return j1.sum(1) @ j2.sum(1).T / j1.shape[1]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)).item()


# ------------------------------------------------------------------------------------------------------------
# empirical_ntk against the explicit Jacobian.


@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_symmetric_kernel_matches_explicit_jacobian(model_name, kind):
    model = MODELS[model_name]()
    x = make_inputs(model_name, 6, seed=2)
    kernel = empirical_ntk(model, x, kind=kind)
    expected = reference_kernel(model, x, x, kind)
    assert kernel.dtype == torch.float64
    assert kernel.shape == expected.shape == ((6, 6, 3, 3) if kind == "full" else (6, 6))
    assert relative_error(kernel, expected) <= TOL


@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_cross_kernel_matches_explicit_jacobian(model_name, kind):
    model = MODELS[model_name]()
    x1, x2 = make_inputs(model_name, 5, seed=3), make_inputs(model_name, 3, seed=4)
    kernel = empirical_ntk(model, x1, x2, kind=kind, chunk_size=2)
    expected = reference_kernel(model, x1, x2, kind)
    assert kernel.shape == ((5, 3, 3, 3) if kind == "full" else (5, 3))
    assert relative_error(kernel, expected) <= TOL


def test_lenet_full_kernel_matches_explicit_jacobian():
    torch.manual_seed(5)
    model = LeNet().double()
    x1, x2 = make_inputs("lenet", 3, seed=6), make_inputs("lenet", 2, seed=7)
    assert (
        relative_error(empirical_ntk(model, x1, x2, kind="full"), reference_kernel(model, x1, x2, "full"))
        <= TOL
    )
    assert (
        relative_error(empirical_ntk(model, x1, kind="pntk"), reference_kernel(model, x1, x1, "pntk")) <= TOL
    )


def test_frozen_parameters_are_left_out():
    model = make_mlp()
    model.net[1].weight.requires_grad_(False)
    x = make_inputs("mlp", 4, seed=8)
    for kind in KERNEL_KINDS:
        assert relative_error(empirical_ntk(model, x, kind=kind), reference_kernel(model, x, x, kind)) <= TOL


def test_float32_model_gives_float32_kernel_close_to_float64():
    model = make_mlp()
    x = make_inputs("mlp", 4, seed=9)
    kernel = empirical_ntk(copy.deepcopy(model).float(), x.float(), kind="full")
    assert kernel.dtype == torch.float32
    assert relative_error(kernel.double(), reference_kernel(model, x, x, "full")) <= 1e-5


def test_scalar_output_model():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1), nn.Flatten(0)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    full = empirical_ntk(model, x, kind="full")
    assert full.shape == (5, 5, 1, 1)
    torch.testing.assert_close(empirical_ntk(model, x, kind="pntk"), full[:, :, 0, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(empirical_ntk(model, x, kind="trace"), full[:, :, 0, 0], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Chunking.


@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_chunking_does_not_change_the_kernel(kind):
    model = make_cnn()
    x1, x2 = make_inputs("cnn", 7, seed=11), make_inputs("cnn", 4, seed=12)
    whole_sym = empirical_ntk(model, x1, kind=kind, chunk_size=7)
    whole_cross = empirical_ntk(model, x1, x2, kind=kind, chunk_size=7)
    for chunk_size in (1, 2, 3, 5, 100):
        sym = empirical_ntk(model, x1, kind=kind, chunk_size=chunk_size)
        cross = empirical_ntk(model, x1, x2, kind=kind, chunk_size=chunk_size)
        assert relative_error(sym, whole_sym) <= 1e-12, chunk_size
        assert relative_error(cross, whole_cross) <= 1e-12, chunk_size


def track_jacobians(monkeypatch) -> tuple[list[int], dict[str, int]]:
    """Record the examples of every vectorised Jacobian call, and the most per-example Jacobians alive at once
    (a panel counts whole from the moment it is started, a chunk from its computation, both until freed)."""
    calls: list[int] = []
    alive = {"now": 0, "max": 0}

    def count(examples: int) -> None:
        alive["now"] += examples
        alive["max"] = max(alive["max"], alive["now"])

    def release_when_freed(tensor: torch.Tensor, examples: int) -> None:
        weakref.finalize(tensor, lambda: alive.__setitem__("now", alive["now"] - examples))

    blockwise, panel = ntk._blockwise_kernel, ntk._panel

    def blockwise_counting(jacobian, *args):
        def counted(x):
            jac = jacobian(x)
            calls.append(x.shape[0])
            count(x.shape[0])
            release_when_freed(jac[0], x.shape[0])
            return jac

        return blockwise(counted, *args)

    def panel_counting(jacobian, x, chunk):
        count(x.shape[0])
        result = panel(jacobian, x, chunk)
        release_when_freed(result[0], x.shape[0])
        return result

    monkeypatch.setattr(ntk, "_blockwise_kernel", blockwise_counting)
    monkeypatch.setattr(ntk, "_panel", panel_counting)
    return calls, alive


def test_jacobians_alive_stay_within_budget_and_chunk_size(monkeypatch):
    # make_mlp has P = 111 float64 parameters and O = 3: 3 * 111 * 8 bytes of Jacobian per example for "full"
    # and "trace", a third of it for "pntk"
    model = make_mlp()
    per_example = 3 * sum(p.numel() for p in model.parameters()) * 8
    budget = 5 * per_example
    calls, alive = track_jacobians(monkeypatch)
    x = make_inputs("mlp", 7, seed=13)
    kernel = empirical_ntk(model, x, kind="full", chunk_size=2, memory_budget=budget)
    assert relative_error(kernel, reference_kernel(model, x, x, "full")) <= TOL
    # 5 examples alive: panels of 3 (0:3, 3:6, 6:7), the examples after each streamed 2 at a time:
    # 3 + (3:5, 5:7) + 3 + (6:7) + 1 = 12 evaluations
    assert max(calls) == 2 and sum(calls) == 12, calls
    assert alive["max"] == 5 and alive["now"] == 0
    # cross kernels: panels of 3 of the side that needs fewer evaluations, the other side streamed past each;
    # "pntk" fits 15 examples, so that one side is computed whole and each Jacobian once
    for n1, n2, evaluations in [(5, 4, 5 + 2 * 4), (7, 2, 2 + 7), (2, 7, 2 + 7)]:
        x1, x2 = make_inputs("mlp", n1, seed=14), make_inputs("mlp", n2, seed=15)
        for kind in KERNEL_KINDS:
            calls.clear()
            alive["max"] = 0
            kernel = empirical_ntk(model, x1, x2, kind=kind, chunk_size=2, memory_budget=budget)
            assert relative_error(kernel, reference_kernel(model, x1, x2, kind)) <= TOL, (n1, n2, kind)
            expected = n1 + n2 if kind == "pntk" else evaluations
            assert max(calls) <= 2 and sum(calls) == expected, (n1, n2, kind, calls)
            assert alive["max"] <= (15 if kind == "pntk" else 5) and alive["now"] == 0, (n1, n2, kind)


def test_plan_of_chunk_and_budget():
    # (per-example bytes, budget, chunk_size, rows, examples) -> (chunk, examples alive)
    assert ntk._plan(100, 1000, None, rows=1, n=50) == (2, 10)  # a fourth of what fits
    assert ntk._plan(100, 10**6, None, rows=10, n=50) == (6, 10**4)  # 64 backward passes
    assert ntk._plan(100, 10**6, None, rows=1, n=20) == (20, 10**4)  # no more than the examples
    assert ntk._plan(100, 10, None, rows=1, n=20) == (1, 2)  # at least two chunks of one
    assert ntk._plan(100, 1000, 8, rows=1, n=20) == (8, 16)  # an explicit chunk_size wins over the budget
    model = make_mlp()
    x = make_inputs("mlp", 5, seed=16)
    tiny = empirical_ntk(model, x, kind="full", memory_budget=1)
    assert relative_error(tiny, reference_kernel(model, x, x, "full")) <= TOL


# ------------------------------------------------------------------------------------------------------------
# Structure: symmetry, positive semi-definiteness, the identities between kinds, a closed form.


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_symmetric_and_positive_semidefinite(model_name):
    model = MODELS[model_name]()
    x = make_inputs(model_name, 7, seed=17)
    for kind in KERNEL_KINDS:
        kernel = empirical_ntk(model, x, kind=kind, chunk_size=3)
        matrix = flatten_kernel(kernel) if kind == "full" else kernel
        assert torch.equal(matrix, matrix.T), kind
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert eigenvalues[0] >= -1e-10 * eigenvalues[-1], kind


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_trace_and_pntk_are_reductions_of_the_full_kernel(model_name):
    model = MODELS[model_name]()
    x1, x2 = make_inputs(model_name, 5, seed=18), make_inputs(model_name, 4, seed=19)
    for second in (None, x2):
        full = empirical_ntk(model, x1, second, kind="full")
        trace = empirical_ntk(model, x1, second, kind="trace")
        pntk = empirical_ntk(model, x1, second, kind="pntk")
        num_outputs = full.shape[-1]
        torch.testing.assert_close(trace, full.diagonal(dim1=2, dim2=3).mean(-1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pntk, full.sum(dim=(2, 3)) / num_outputs, rtol=1e-12, atol=1e-14)


def test_linear_model_closed_form():
    torch.manual_seed(20)
    model = nn.Linear(5, 3, bias=False).double()
    x1 = torch.randn(4, 5, dtype=torch.float64)
    x2 = torch.randn(6, 5, dtype=torch.float64)
    gram = x1 @ x2.T
    # f_a(x) = sum_k W_ak x_k, so d f_a / d W_ck = delta_ac x_k and K[i, j, a, b] = delta_ab <x_i, x_j>
    torch.testing.assert_close(
        empirical_ntk(model, x1, x2, kind="full"),
        torch.einsum("ij,ab->ijab", gram, torch.eye(3).double()),
        rtol=1e-13,
        atol=1e-13,
    )
    torch.testing.assert_close(empirical_ntk(model, x1, x2, kind="trace"), gram, rtol=1e-13, atol=1e-13)
    # pNTK = sum_ab delta_ab <x_i, x_j> / O = <x_i, x_j>
    torch.testing.assert_close(empirical_ntk(model, x1, x2, kind="pntk"), gram, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(empirical_ntk(model, x1, kind="trace"), x1 @ x1.T, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_cross_kernel_is_the_off_diagonal_block_of_the_concatenation(model_name, kind):
    model = MODELS[model_name]()
    x1, x2 = make_inputs(model_name, 5, seed=27), make_inputs(model_name, 3, seed=28)
    whole = empirical_ntk(model, torch.cat([x1, x2]), kind=kind)
    per_example = 3 * sum(p.numel() for p in model.parameters()) * 8
    # whole panels, and panels of 2 with chunks of 1 (x1 then x2 kept in panels: both orders of the blocks)
    for budget in (ntk.DEFAULT_MEMORY_BUDGET, 3 * per_example):
        cross = empirical_ntk(model, x1, x2, kind=kind, chunk_size=1, memory_budget=budget)
        assert relative_error(cross, whole[:5, 5:]) <= 1e-12, budget
        backwards = empirical_ntk(model, x2, x1, kind=kind, chunk_size=1, memory_budget=budget)
        assert relative_error(backwards, whole[5:, :5]) <= 1e-12, budget
        # the symmetric path on the concatenation, with the same small budget, gives the same kernel
        again = empirical_ntk(model, torch.cat([x1, x2]), kind=kind, chunk_size=1, memory_budget=budget)
        assert relative_error(again, whole) <= 1e-12, budget


# ------------------------------------------------------------------------------------------------------------
# Theory: the kernel of a wide two-layer network barely moves, less the wider it is.


class TwoLayerNTK(nn.Module):
    """``f(x) = v^T phi(W x / sqrt(d)) / sqrt(m)`` in the NTK parameterisation, ``W`` and ``v`` standard normal."""

    def __init__(self, d: int, m: int, activation, generator: torch.Generator) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(m, d, generator=generator, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(m, generator=generator, dtype=torch.float64))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, d = self.W.shape
        return (self.activation(x @ self.W.T / math.sqrt(d)) @ self.v / math.sqrt(m)).unsqueeze(1)


def kernel_change_after_training(activation, width: int, x, y, generator, lr=1.0, steps=50) -> float:
    """Relative change of the NTK on the training inputs after ``steps`` steps of full-batch gradient descent
    on the mean squared error."""
    model = TwoLayerNTK(x.shape[1], width, activation, generator)
    initial = empirical_ntk(model, x, kind="full")
    for _ in range(steps):
        loss = 0.5 * (model(x) - y).pow(2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for parameter, gradient in zip(model.parameters(), grads):
                parameter -= lr * gradient
    return relative_change(empirical_ntk(model, x, kind="full"), initial).item()


@pytest.mark.parametrize(
    "activation, low, high",
    [
        # smooth activation: the kernel moves by O(1/m) (Dyer & Gur-Ari, ICLR 2020; Huang & Yau, ICML 2020);
        # measured over 40 seeds of this set-up: slopes -0.90 to -1.04
        (torch.tanh, -1.15, -0.85),
        # ReLU: about m^(-3/4), between the two: the smooth part of the change is O(1/m), but ~m^(1/2) of
        # the m units have a pre-activation within O(m^(-1/2)) of the kink and may flip, each moving the kernel
        # by O(1/m) with a random sign; measured over 40 seeds: slopes -0.68 to -0.88
        (torch.relu, -0.95, -0.6),
    ],
    ids=["tanh", "relu"],
)
def test_kernel_change_falls_with_width(activation, low, high):
    # Lee et al. (NeurIPS 2019, Theorem 2.1) bound the change of the NTK of a network of width m in the NTK
    # parameterisation, trained by gradient descent with a fixed step, by O(m^(-1/2)): the log-log slope of
    # the relative change against the width is at most -1/2. It is steeper in fact, at a rate that depends on
    # the activation. A wrong kernel (one that does not depend on the weights, or the wrong parameterisation)
    # would give a slope near 0; squared norms in relative_change would double it.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(8)
    y = torch.randn(16, 1, generator=generator, dtype=torch.float64)
    widths = [64, 256, 1024, 4096]
    inits = 4  # relative changes averaged over initialisations, which halves the spread of the slope
    changes = [
        sum(kernel_change_after_training(activation, m, x, y, generator) for _ in range(inits)) / inits
        for m in widths
    ]
    assert all(0 < c < 0.2 for c in changes), changes
    log_width, log_change = torch.tensor(widths).double().log(), torch.tensor(changes).log()
    centred = log_width - log_width.mean()
    slope = ((centred * (log_change - log_change.mean())).sum() / centred.pow(2).sum()).item()
    assert low <= slope <= high, (slope, changes)
    assert slope < -0.5  # at least as fast as the bound of Lee et al.


# ------------------------------------------------------------------------------------------------------------
# The model is left as it was.


def make_train_mode_model() -> nn.Module:
    torch.manual_seed(21)
    return nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
    ).double()


def snapshot(model: nn.Module):
    return (
        {name: value.clone() for name, value in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, grads, flags = before
    after_state, after_grads, after_flags = snapshot(model)
    assert after_flags == flags
    assert state.keys() == after_state.keys()
    for name in state:
        assert torch.equal(state[name], after_state[name]), name
    for grad, after in zip(grads, after_grads):
        assert (grad is None and after is None) or torch.equal(grad, after)


@pytest.mark.parametrize("with_grads", [False, True])
def test_model_grads_buffers_modes_and_rng_are_untouched(with_grads):
    model = make_train_mode_model()
    x = torch.randn(6, 4, dtype=torch.float64)
    if with_grads:
        model(x).sum().backward()  # fills .grad and moves the BatchNorm statistics
    model[3].eval()  # a mixed configuration must come back exactly
    before = snapshot(model)
    rng = torch.get_rng_state()
    for kind in KERNEL_KINDS:
        kernel = empirical_ntk(model, x, kind=kind)
        assert not kernel.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    assert_unchanged(model, before)
    assert model.training and not model[3].training


def test_eval_mode_kernel_in_train_mode():
    # In train mode the dropout and batch statistics would make the kernel random and batch dependent; the
    # function uses eval mode, so the kernel equals the eval-mode reference and repeats exactly.
    model = make_train_mode_model()
    x = torch.randn(5, 4, dtype=torch.float64)
    model(x)  # non-trivial running statistics
    first = empirical_ntk(model, x, kind="full")
    assert torch.equal(first, empirical_ntk(model, x, kind="full"))
    assert relative_error(first, reference_kernel(model, x, x, "full")) <= TOL
    # the kernel of an example does not depend on its companions
    torch.testing.assert_close(
        empirical_ntk(model, x[:2], kind="full"), first[:2, :2], rtol=1e-12, atol=1e-14
    )


def test_flags_restored_when_the_model_fails():
    class TupleOutput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x), x

    model = TupleOutput()
    with pytest.raises(ValueError, match="`model` must return a tensor"):
        empirical_ntk(model, torch.randn(3, 4))
    assert model.training and model.linear.training


def test_output_that_is_not_n_by_o_is_refused_with_its_shape():
    class Reshaped(nn.Module):
        def __init__(self, shape) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 6)
            self.shape = shape

        def forward(self, x):
            return self.linear(x).reshape(self.shape(x.shape[0]))

    x = torch.randn(3, 4)
    cases = [
        (lambda n: (n, 2, 3), r"got shape \(2, 2, 3\) for 2 inputs of shape \(4,\)"),  # one more dimension
        (lambda n: (n * 6,), r"got shape \(12,\) for 2 inputs"),  # examples mixed into one vector
        (lambda n: (6, n), r"got shape \(6, 2\) for 2 inputs"),  # transposed
        (lambda n: (1, n * 6), r"got shape \(1, 12\) for 2 inputs"),  # one row for the batch
    ]
    for shape, message in cases:
        model = Reshaped(shape)
        for kind in KERNEL_KINDS:
            with pytest.raises(ValueError, match=r"shape \(n, O\) \(or \(n,\) for one output\)") as error:
                empirical_ntk(model, x, kind=kind)
            assert error.match(message)
        assert model.training
    assert empirical_ntk(Reshaped(lambda n: (n, 6)), x, kind="full").shape == (3, 3, 6, 6)
    # (n,) is one output per example (test_scalar_output_model); with one input, (6,) is refused too
    with pytest.raises(ValueError, match=r"got shape \(6,\) for 1 input of shape \(4,\)"):
        empirical_ntk(Reshaped(lambda n: (n * 6,)), x[:1])


def test_model_drawing_random_numbers_in_eval_mode_is_refused_without_touching_the_rng():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return self.linear(x) + 0 * torch.rand(x.shape[0], 2, dtype=x.dtype)

    model = Noisy()
    x = torch.randn(4, 3)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="random"):
        empirical_ntk(model, x)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe forward drew, inside fork_rng
    assert model.training


def test_called_under_no_grad_and_enable_grad():
    model = make_mlp()
    x = make_inputs("mlp", 4, seed=22)
    expected = reference_kernel(model, x, x, "pntk")
    with torch.no_grad():
        assert relative_error(empirical_ntk(model, x), expected) <= TOL
    with torch.enable_grad():
        kernel = empirical_ntk(model, x)
    assert not kernel.requires_grad and kernel.grad_fn is None


def test_non_finite_parameters_give_nan_kernel():
    model = make_mlp()
    with torch.no_grad():
        model.net[1].weight[0, 0] = math.nan
    kernel = empirical_ntk(model, make_inputs("mlp", 3, seed=23), kind="full")
    assert torch.isnan(kernel).any()
    assert torch.isnan(kernel_distance(kernel, kernel))
    assert torch.isnan(kernel_spectrum(kernel).effective_rank)


# ------------------------------------------------------------------------------------------------------------
# Argument checks.


def test_empirical_ntk_rejects_bad_arguments():
    model = make_mlp()
    x = make_inputs("mlp", 3, seed=24)
    with pytest.raises(ValueError, match="`kind`"):
        empirical_ntk(model, x, kind="diag")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`chunk_size`"):
            empirical_ntk(model, x, chunk_size=bad)
    with pytest.raises(ValueError, match="`memory_budget`"):
        empirical_ntk(model, x, memory_budget=0)
    with pytest.raises(ValueError, match="`x2`"):
        empirical_ntk(model, x, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="`x2`"):
        empirical_ntk(model, x, x[:0])
    with pytest.raises(ValueError, match="`x1`"):
        empirical_ntk(model, x[:0])
    with pytest.raises(ValueError, match="`x1`"):
        empirical_ntk(model, [[0.0] * 5])
    frozen = make_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="`model`"):
        empirical_ntk(frozen, x)


# ------------------------------------------------------------------------------------------------------------
# Metrics.


def test_flatten_kernel_layout():
    kernel = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    flat = flatten_kernel(kernel)
    assert flat.shape == (12, 8)
    for i, j, a, b in [(0, 0, 0, 0), (2, 1, 3, 0), (1, 0, 2, 3)]:
        assert flat[i * 4 + a, j * 4 + b] == kernel[i, j, a, b]
    with pytest.raises(ValueError, match="`kernel`"):
        flatten_kernel(torch.zeros(3, 3))


def test_kernel_distance_values():
    k = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert kernel_distance(k, 3.5 * k).abs() <= 1e-15
    # <I, 11^T> = 2, ||I|| = sqrt(2), ||11^T|| = 2
    eye, ones = torch.eye(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    assert kernel_distance(eye, ones).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-14)
    # <[[2,1],[1,2]], [[1,0],[0,3]]> = 8, both norms sqrt(10): 1 - 8/10
    other = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    assert kernel_distance(k, other).item() == pytest.approx(0.2, rel=1e-14)
    assert kernel_distance(k, -k).item() == pytest.approx(2.0, rel=1e-14)
    # full kernels: the same as their flattened matrices
    a, b = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    torch.testing.assert_close(kernel_distance(a, b), kernel_distance(flatten_kernel(a), flatten_kernel(b)))


def test_kernel_distance_is_precise_for_close_kernels():
    k = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float32)
    perturbed = k + torch.tensor([[1e-4, 0.0], [0.0, -1e-4]])
    # 1 - cos for a perturbation d orthogonal to K: ~ ||d||^2 / (2 ||K||^2) = 2e-8 / 20 = 1e-9, far below the
    # float32 rounding of cos itself
    assert kernel_distance(k, perturbed).item() == pytest.approx(1e-9, rel=1e-3)


def test_kernel_distance_undefined_cases_give_nan():
    k = torch.eye(3)
    assert torch.isnan(kernel_distance(k, torch.zeros(3, 3)))
    assert torch.isnan(kernel_distance(torch.zeros(3, 3), torch.zeros(3, 3)))
    assert torch.isnan(kernel_distance(k, torch.full((3, 3), math.nan)))
    assert torch.isnan(kernel_distance(k, torch.full((3, 3), math.inf)))
    with pytest.raises(ValueError, match="`K2`"):
        kernel_distance(k, torch.eye(2))
    with pytest.raises(ValueError, match="`K1`"):
        kernel_distance(torch.zeros(3), torch.zeros(3))


def test_relative_change_values():
    k0 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    kt = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    # ||diag(1, -1)|| / ||K_0|| = sqrt(2) / sqrt(10)
    assert relative_change(kt, k0).item() == pytest.approx(math.sqrt(0.2), rel=1e-14)
    assert relative_change(k0, k0).item() == 0.0
    assert torch.isnan(relative_change(kt, torch.zeros(2, 2, dtype=torch.float64)))
    assert torch.isnan(relative_change(torch.full((2, 2), math.nan), k0))
    assert torch.isnan(relative_change(k0, torch.full((2, 2), math.inf)))
    with pytest.raises(ValueError, match="`K_t`"):
        relative_change(torch.eye(3), k0)


def one_hot(labels, num_classes=None):
    return torch.nn.functional.one_hot(torch.tensor(labels), num_classes or -1).double()


def test_alignment_of_the_target_kernel_is_one():
    labels = [0, 2, 1, 2, 0, 0]
    y = one_hot(labels)
    for centered in (True, False):
        value = kernel_alignment(3.0 * (y @ y.T), torch.tensor(labels), centered=centered)
        assert value.item() == pytest.approx(1.0, abs=1e-14)


def test_alignment_hand_computed():
    labels = torch.tensor([0, 0, 1])
    eye = torch.eye(3, dtype=torch.float64)
    # uncentred: <I, YY^T> = trace(YY^T) = 3, ||I|| = sqrt(3), ||YY^T|| = sqrt(5)
    assert kernel_alignment(eye, labels, centered=False).item() == pytest.approx(math.sqrt(3 / 5), rel=1e-14)
    # centred: HIH = H (rank 2, norm sqrt 2); HY Y^T H = 2 a a^T with a = (1, 1, -2)/3, so that <H, 2aa^T> =
    # 2||a||^2 = 4/3 = ||2 a a^T||: the alignment is 1/sqrt(2)
    assert kernel_alignment(eye, labels).item() == pytest.approx(1 / math.sqrt(2), rel=1e-14)
    # a class absent from the labels changes nothing
    assert kernel_alignment(eye, labels, num_classes=5).item() == pytest.approx(1 / math.sqrt(2), rel=1e-14)


def test_alignment_scale_invariance_target_matrix_and_full_kernels():
    generator = torch.Generator().manual_seed(25)
    features = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    k = features @ features.T
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    value = kernel_alignment(k, labels)
    assert kernel_alignment(7.5 * k, labels).item() == pytest.approx(value.item(), rel=1e-13)
    assert kernel_alignment(k, one_hot(labels.tolist())).item() == pytest.approx(value.item(), rel=1e-13)
    # a full kernel is aligned through its trace kernel
    full = torch.randn(8, 8, 3, 3, generator=generator, dtype=torch.float64)
    full = full + full.permute(1, 0, 3, 2)
    expected = kernel_alignment(full.diagonal(dim1=2, dim2=3).mean(-1), labels)
    assert kernel_alignment(full, labels).item() == pytest.approx(expected.item(), rel=1e-13)


def test_alignment_undefined_cases_and_bad_arguments():
    k = torch.eye(3)
    assert torch.isnan(kernel_alignment(k, torch.tensor([1, 1, 1])))  # the centred target is zero
    assert torch.isnan(kernel_alignment(torch.ones(3, 3), torch.tensor([0, 1, 1])))  # HKH = 0
    assert torch.isnan(kernel_alignment(torch.full((3, 3), math.nan), torch.tensor([0, 1, 1])))
    with pytest.raises(ValueError, match="`y`"):
        kernel_alignment(k, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="`y`"):
        kernel_alignment(k, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="`y`"):
        kernel_alignment(k, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="`num_classes`"):
        kernel_alignment(k, torch.tensor([0, 1, 2]), num_classes=2)
    with pytest.raises(ValueError, match="`K`"):
        kernel_alignment(torch.zeros(3, 2), torch.tensor([0, 1, 2]))


def test_spectrum_against_eigvalsh():
    generator = torch.Generator().manual_seed(26)
    a = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    k = a @ a.T
    expected = torch.linalg.eigvalsh(k).flip(0)
    spectrum = kernel_spectrum(k, top_k=3)
    torch.testing.assert_close(spectrum.eigenvalues, expected[:3], rtol=1e-12, atol=0)
    assert spectrum.trace.item() == pytest.approx(torch.trace(k).item(), rel=1e-14)
    assert spectrum.condition_number.item() == pytest.approx((expected[0] / expected[-1]).item(), rel=1e-10)
    p = expected / expected.sum()
    assert spectrum.effective_rank.item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    assert kernel_spectrum(k).eigenvalues.shape == (6,)
    # a full kernel is read as its flattened matrix
    full = torch.randn(3, 3, 2, 2, generator=generator, dtype=torch.float64)
    full = torch.einsum("iakp,jbkp->ijab", full, full)
    torch.testing.assert_close(
        kernel_spectrum(full).eigenvalues,
        torch.linalg.eigvalsh(flatten_kernel(full)).flip(0),
        rtol=1e-12,
        atol=1e-12,
    )


def test_spectrum_effective_rank_and_condition_number():
    identity = kernel_spectrum(torch.eye(5, dtype=torch.float64))
    assert identity.effective_rank.item() == pytest.approx(5.0, rel=1e-14)
    assert identity.condition_number.item() == pytest.approx(1.0, rel=1e-14)
    v = torch.arange(1.0, 6.0, dtype=torch.float64)
    rank_one = kernel_spectrum(torch.outer(v, v))
    assert rank_one.effective_rank.item() == pytest.approx(1.0, abs=1e-10)
    assert rank_one.condition_number.item() == math.inf
    # diag(3, 1): p = (3/4, 1/4)
    two = kernel_spectrum(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert two.effective_rank.item() == pytest.approx(math.exp(entropy), rel=1e-14)
    assert two.condition_number.item() == pytest.approx(3.0, rel=1e-14)
    assert torch.equal(two.eigenvalues, torch.tensor([3.0, 1.0], dtype=torch.float64))
    # an indefinite matrix has no finite condition number
    assert kernel_spectrum(torch.diag(torch.tensor([2.0, -1.0]))).condition_number.item() == math.inf


def test_spectrum_undefined_cases_and_bad_arguments():
    zero = kernel_spectrum(torch.zeros(4, 4))
    assert zero.trace.item() == 0.0
    assert torch.isnan(zero.effective_rank) and torch.isnan(zero.condition_number)
    for bad in (math.nan, math.inf):
        k = torch.eye(4)
        k[1, 2] = bad
        spectrum = kernel_spectrum(k, top_k=2)
        assert spectrum.eigenvalues.shape == (2,)
        assert all(torch.isnan(t).all() for t in spectrum)
    with pytest.raises(ValueError, match="`top_k`"):
        kernel_spectrum(torch.eye(3), top_k=4)
    with pytest.raises(ValueError, match="`top_k`"):
        kernel_spectrum(torch.eye(3), top_k=0)
    with pytest.raises(ValueError, match="`K`"):
        kernel_spectrum(torch.zeros(3, 2))
