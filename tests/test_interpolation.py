"""Linear interpolation, BatchNorm reset, the linear path and barriers against exact references.

References: the interpolation formula written out; BatchNorm inputs captured by hooks and reduced in float64
(exact pooled statistics) and ``torch.optim.swa_utils.update_bn`` (cumulative average); the evaluation of the
endpoint models themselves; a float64 linear classifier (convex path); and a one-hidden-layer net against its
hidden-unit permutation, whose path has the closed form ``f_alpha = (1 - 2 alpha)^2 f_0`` on the positive
quadrant.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_theory.measures.interpolation import (
    LinearPath,
    error_barrier,
    interpolate_state,
    linear_path,
    linear_paths,
    loss_and_error,
    reset_batchnorm_statistics,
    stable_point,
)
from lt_theory.models import MLP

REL = 1e-6  # float32 statistics against float64 references



# ------------------------------------------------------------------------------------------------------------
# Models, data and references.


class SmallBNCNN(nn.Module):
    """Convolutions with BatchNorm2d, a hidden layer with BatchNorm1d, dropout, and 3 outputs."""

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
        # dropout before a BatchNorm: were it on during a reset, it would change the statistics
        self.head = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_cnn(seed: int) -> SmallBNCNN:
    """The CNN with non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    model = SmallBNCNN()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(seed + 10)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    return model


def make_images(n: int = 37, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=generator) * 2 + 0.5
    y = torch.randint(0, 3, (n,), generator=generator)
    return TensorDataset(x, y)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def captured_bn_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per BatchNorm, its inputs over all the batches as ``(channels, values)`` float64, captured by hooks on a
    copy whose BatchNorms use batch statistics (train mode) while the rest is in eval mode."""
    model = copy.deepcopy(model).eval()
    norms = batchnorms(model)
    captured: list[list[torch.Tensor]] = [[] for _ in norms]
    for norm, store in zip(norms, captured):
        norm.train()
        norm.register_forward_pre_hook(
            lambda m, args, store=store: store.append(
                args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            )
        )
    with torch.no_grad():
        for x in batches:
            model(x)
    return [store for store in captured]


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error <= rel, f"relative error {float(error):.3g} > {rel}"


class NeverIterated:
    """An iterable that fails the test if anything iterates it."""

    def __iter__(self):
        raise AssertionError("this loader must not be iterated")


# ------------------------------------------------------------------------------------------------------------
# interpolate_state.


def test_interpolate_state_is_the_formula_exactly():
    a = {
        "w": torch.tensor([[0.3, -1.7], [2.5, 0.1]]),
        "d": torch.tensor([1.0, -3.0], dtype=torch.float64),
        "h": torch.tensor([0.5, 1.5], dtype=torch.float16),
        "n": torch.tensor(3),
    }
    b = {
        "w": torch.tensor([[1.1, 0.4], [-0.5, 7.0]]),
        "d": torch.tensor([0.2, 5.0], dtype=torch.float64),
        "h": torch.tensor([2.0, -1.0], dtype=torch.float16),
        "n": torch.tensor(8),
    }
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        out = interpolate_state(a, b, alpha)
        assert list(out) == list(a)
        for key in ("w", "d"):
            assert out[key].dtype == a[key].dtype
            assert torch.equal(out[key], (1 - alpha) * a[key] + alpha * b[key])
        assert torch.equal(out["h"], ((1 - alpha) * a["h"].float() + alpha * b["h"].float()).half())
        assert torch.equal(out["n"], a["n"] if alpha <= 0.5 else b["n"])  # the nearer endpoint
    for key in a:  # endpoints bit for bit, and copies rather than aliases
        assert torch.equal(interpolate_state(a, b, 0)[key], a[key])
        assert torch.equal(interpolate_state(a, b, 1)[key], b[key])
    out = interpolate_state(a, b, 0)
    out["w"].add_(1.0)
    assert torch.equal(a["w"], torch.tensor([[0.3, -1.7], [2.5, 0.1]]))
    # extrapolation and a 0-dim tensor alpha
    assert torch.equal(interpolate_state(a, b, torch.tensor(1.5))["d"], -0.5 * a["d"] + 1.5 * b["d"])


def test_interpolate_state_buffer_modes():
    model_a, model_b = make_cnn(0), make_cnn(1)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    buffer_names = {name for name, _ in model_a.named_buffers()}
    assert "features.1.running_mean" in buffer_names
    for mode in ("interpolate", "a", "b"):
        out = interpolate_state(model_a, sb, 0.25, buffers=mode)
        for key in sa:
            if key in buffer_names and mode != "interpolate":
                assert torch.equal(out[key], (sa if mode == "a" else sb)[key])
            elif sa[key].is_floating_point():
                assert torch.equal(out[key], 0.75 * sa[key] + 0.25 * sb[key])
            else:
                assert torch.equal(out[key], sa[key])
    with pytest.raises(ValueError, match="buffers"):
        interpolate_state(sa, sb, 0.5, buffers="a")
    with pytest.raises(ValueError, match="buffers"):
        interpolate_state(model_a, model_b, 0.5, buffers="running")


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("features.0.bias"),
        lambda s: s.__setitem__("extra", torch.zeros(1)),
        lambda s: s.__setitem__("head.1.weight", torch.zeros(5, 3)),
        lambda s: s.__setitem__("head.1.weight", s["head.1.weight"].double()),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_interpolate_state_mismatch(change):
    sa = make_cnn(0).state_dict()
    sb = copy.deepcopy(sa)
    change(sb)
    with pytest.raises(ValueError, match="state_b"):
        interpolate_state(sa, sb, 0.5)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "0.5", True, None, torch.ones(2)])
def test_interpolate_state_bad_alpha(alpha):
    s = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state(s, s, alpha)


def test_interpolate_state_bad_states():
    with pytest.raises(ValueError, match="state_a"):
        interpolate_state([torch.ones(1)], {"w": torch.ones(1)}, 0.5)
    with pytest.raises(ValueError, match="state_b"):
        interpolate_state({"w": torch.ones(1)}, {"w": 1.0}, 0.5)


# ------------------------------------------------------------------------------------------------------------
# reset_batchnorm_statistics.


def test_reset_exact_equals_pooled_statistics_and_leaves_the_rest():
    model = make_cnn(0)
    model.train()
    model.features.eval()  # a mixture of flags, to be restored module by module
    model.features[4].momentum = 0.3
    model.head[2].momentum = None
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    data = make_images()
    batches = [data.tensors[0][i : i + 8] for i in range(0, 37, 8)]  # sizes 8, 8, 8, 8, 5
    flags = [m.training for m in model.modules()]
    momenta = [m.momentum for m in batchnorms(model)]
    params = {k: v.clone() for k, v in model.named_parameters()}
    other_buffers = {k: v.clone() for k, v in model.named_buffers() if "running" not in k and "num" not in k}
    rng = torch.get_rng_state()

    for num_batches, used in ((None, 5), (2, 2), (100, 5)):
        reference = captured_bn_inputs(model, batches[:used])
        reset_batchnorm_statistics(model, batches, num_batches=num_batches)
        for norm, inputs in zip(batchnorms(model), reference):
            values = torch.cat(inputs, dim=1)
            assert_rel(norm.running_mean, values.mean(dim=1))
            assert_rel(norm.running_var, values.var(dim=1, unbiased=True))
            assert int(norm.num_batches_tracked) == used

    assert [m.training for m in model.modules()] == flags
    assert [m.momentum for m in batchnorms(model)] == momenta
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert state_equal(other_buffers, {k: v for k, v in model.named_buffers() if k in other_buffers})
    assert torch.equal(torch.get_rng_state(), rng)  # dropout stayed off, nothing drew


def test_reset_exact_of_sync_batchnorm_reads_the_inputs_and_agrees():
    """SyncBatchNorm's running statistics may be synced over ranks, so its inputs are reduced instead."""
    model = make_cnn(0)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model.features))
    data = make_images()
    batches = [data.tensors[0][i : i + 8] for i in range(0, 37, 8)]
    reset_batchnorm_statistics(model.features, batches)
    reset_batchnorm_statistics(sync, batches)
    for norm, synced in zip(batchnorms(model.features), batchnorms(sync)):
        assert isinstance(synced, nn.SyncBatchNorm)
        assert_rel(synced.running_mean, norm.running_mean)
        assert_rel(synced.running_var, norm.running_var)


def test_reset_accepts_loaders_of_pairs_and_a_transform():
    data = make_images()
    batches = [data.tensors[0][i : i + 8] for i in range(0, 37, 8)]
    from_list = reset_batchnorm_statistics(make_cnn(0), [x * 2 - 1 for x in batches])
    loader = DataLoader(data, batch_size=8, shuffle=False)
    from_loader = reset_batchnorm_statistics(make_cnn(0), loader, transform=lambda x: x * 2 - 1)
    assert state_equal(from_list.state_dict(), from_loader.state_dict())


def test_reset_cumulative_matches_update_bn_and_batch_averages():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))  # no dropout
    batches = [torch.randn(10, 4) * 3 + 1 for _ in range(4)]
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, reference)
    cumulative = reset_batchnorm_statistics(copy.deepcopy(model), batches, method="cumulative")
    assert_rel(cumulative[1].running_mean, reference[1].running_mean)
    assert_rel(cumulative[1].running_var, reference[1].running_var)
    assert cumulative[1].momentum == model[1].momentum == 0.1

    (inputs,) = captured_bn_inputs(model, batches)
    assert_rel(cumulative[1].running_mean, torch.stack([v.mean(1) for v in inputs]).mean(0))
    assert_rel(cumulative[1].running_var, torch.stack([v.var(1) for v in inputs]).mean(0))
    # With equal batch sizes the means agree with the exact ones; the variances do not (spread of batch means).
    exact = reset_batchnorm_statistics(copy.deepcopy(model), batches, method="exact")
    assert_rel(exact[1].running_mean, cumulative[1].running_mean)
    assert_rel(exact[1].running_var, torch.cat(inputs, 1).var(1))
    assert not torch.allclose(exact[1].running_var, cumulative[1].running_var, rtol=1e-3)


def test_reset_leaves_an_unreached_batchnorm_as_it_was():
    model = make_cnn(0)
    model.unused = nn.BatchNorm1d(2)
    model.unused.running_mean.fill_(3.0)
    state = {k: v.clone() for k, v in model.unused.state_dict().items()}
    reset_batchnorm_statistics(model, [torch.randn(4, 2, 6, 6)])
    assert state_equal(model.unused.state_dict(), state)
    assert int(model.features[1].num_batches_tracked) == 1


def test_reset_without_batchnorm_is_a_no_op():
    model = MLP((4,), hidden=(16,), num_classes=3)
    state = copy.deepcopy(model.state_dict())
    assert reset_batchnorm_statistics(model, NeverIterated()) is model
    assert state_equal(model.state_dict(), state)


def test_reset_empty_loader_raises_and_restores():
    model = make_cnn(0)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="loader"):
        reset_batchnorm_statistics(model, [])
    assert state_equal(model.state_dict(), state)
    assert all(m.momentum == 0.1 for m in batchnorms(model))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_batches": 0}, "num_batches"),
        ({"num_batches": 1.5}, "num_batches"),
        ({"num_batches": True}, "num_batches"),
        ({"method": "ema"}, "method"),
        ({"transform": 3}, "transform"),
    ],
)
def test_reset_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        reset_batchnorm_statistics(make_cnn(0), [torch.randn(4, 2, 6, 6)], **kwargs)
    with pytest.raises(ValueError, match="model"):
        reset_batchnorm_statistics({"w": torch.ones(1)}, [])


# ------------------------------------------------------------------------------------------------------------
# loss_and_error.


def test_loss_and_error_against_a_float64_reference():
    model = make_cnn(0)
    data = make_images()
    loader = DataLoader(data, batch_size=8)
    result = loss_and_error(model, loader)
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        out = reference(data.tensors[0].double())
    assert result.num_examples == 37
    assert result.loss == pytest.approx(float(F.cross_entropy(out, data.tensors[1])), rel=1e-5)
    assert result.error == float((out.argmax(1) != data.tensors[1]).double().mean())
    # per-example losses and one-hot targets give the same numbers
    per_example = loss_and_error(model, loader, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert per_example.loss == pytest.approx(result.loss, rel=1e-6)
    one_hot = [(x, F.one_hot(y, 3).float()) for x, y in loader]
    assert loss_and_error(model, one_hot).error == result.error


def test_shuffling_loaders_do_not_move_the_global_rng():
    model = make_cnn(0)
    model.train()
    loader = DataLoader(make_images(), batch_size=8, shuffle=True)  # no generator: draws from the global RNG
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    first = loss_and_error(model, loader)
    reset_batchnorm_statistics(model, loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert loss_and_error(model, loader).num_examples == first.num_examples == 37


def test_loss_and_error_non_finite_and_bad_input():
    model = make_cnn(0)
    with torch.no_grad():
        model.head[4].bias[0] = math.nan
    result = loss_and_error(model, DataLoader(make_images(), batch_size=8))
    # every row holds a NaN: all of them count as wrong, and the loss is NaN (evaluation's one rule)
    assert math.isnan(result.loss) and result.error == 1.0 and result.num_examples == 37
    with pytest.raises(ValueError, match="loader"):
        loss_and_error(model, [])
    with pytest.raises(ValueError, match="loader"):
        loss_and_error(model, [torch.randn(4, 2, 6, 6)])
    with pytest.raises(ValueError, match="loss_fn"):
        loss_and_error(model, [], loss_fn="ce")
    with pytest.raises(ValueError, match="loss_fn"):
        loss_and_error(
            model, [(torch.randn(4, 2, 6, 6), torch.zeros(4, dtype=torch.long))], loss_fn=lambda o, t: o
        )


# ------------------------------------------------------------------------------------------------------------
# linear_path.


def test_endpoints_with_interpolated_buffers_are_the_models_own_evaluations():
    model_a, model_b = make_cnn(0), make_cnn(1)
    loader = DataLoader(make_images(), batch_size=8)
    path = linear_path(model_a, model_b, loader, alphas=[0, 0.3, 1], bn="interpolate")
    assert isinstance(path, LinearPath) and path.bn == "interpolate" and path.num_examples == 37
    assert path.alphas.tolist() == [0.0, 0.3, 1.0]
    for index, model in ((0, model_a), (-1, model_b)):
        own = loss_and_error(model, loader)
        assert path.loss[index].item() == own.loss
        assert path.error[index].item() == own.error
    # the interior point is the model with the interpolated state dict
    middle = copy.deepcopy(model_a)
    middle.load_state_dict(interpolate_state(model_a, model_b, 0.3))
    assert path.loss[1].item() == loss_and_error(middle, loader).loss
    # a state dict for either model gives the same path
    same = linear_path(model_a.state_dict(), model_b, loader, alphas=[0, 0.3, 1], bn="interpolate")
    assert torch.equal(same.loss, path.loss) and torch.equal(same.error, path.error)


def test_endpoints_with_reset_statistics():
    model_a, model_b = make_cnn(0), make_cnn(1)
    data = make_images()
    loader = DataLoader(data, batch_size=8)
    train_batches = [x for x in make_images(24, seed=5).tensors[0].split(6)]
    path = linear_path(model_a, model_b, loader, alphas=4, bn_loader=train_batches, bn_batches=3)
    assert path.bn == "reset"
    assert torch.equal(path.alphas, torch.linspace(0, 1, 4, dtype=torch.float64))
    for index, model in ((0, model_a), (-1, model_b)):
        reset = reset_batchnorm_statistics(copy.deepcopy(model), train_batches, num_batches=3)
        own = loss_and_error(reset, loader)
        assert path.loss[index].item() == own.loss
        assert path.error[index].item() == own.error
        assert path.loss[index].item() != loss_and_error(model, loader).loss  # the statistics did change
    # default bn_loader: the evaluation loader itself
    default = linear_path(model_a, model_b, loader, alphas=2)
    reset = reset_batchnorm_statistics(copy.deepcopy(model_a), loader)
    assert default.loss[0].item() == loss_and_error(reset, loader).loss


@pytest.mark.parametrize("bn", ["reset", "interpolate"])
def test_linear_path_leaves_models_and_rng_untouched(bn):
    model_a, model_b = make_cnn(0), make_cnn(1)
    model_a.train()
    model_b.eval()
    model_b.head.train()
    model_a.features[1].momentum = None
    for p in model_a.parameters():
        p.grad = torch.full_like(p, 0.25)
    model_b.head[4].weight.requires_grad_(False)
    snapshot = [
        (
            copy.deepcopy(m.state_dict()),
            [x.training for x in m.modules()],
            [x.momentum for x in batchnorms(m)],
            [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in m.parameters()],
        )
        for m in (model_a, model_b)
    ]
    loader = DataLoader(make_images(), batch_size=8, shuffle=True)  # no generator: draws from the global RNG
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    linear_path(model_a, model_b, loader, alphas=3, bn=bn)
    assert torch.equal(torch.get_rng_state(), rng)
    for m, (state, flags, momenta, grads) in zip((model_a, model_b), snapshot):
        assert state_equal(m.state_dict(), state)
        assert [x.training for x in m.modules()] == flags
        assert [x.momentum for x in batchnorms(m)] == momenta
        for p, (requires_grad, grad) in zip(m.parameters(), grads):
            assert p.requires_grad == requires_grad
            assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)


def test_identical_models_have_zero_barrier():
    model = make_cnn(0)
    loader = DataLoader(make_images(), batch_size=8)
    for bn in ("reset", "interpolate"):
        path = linear_path(model, copy.deepcopy(model), loader, alphas=7, bn=bn)
        assert error_barrier(path.loss) == pytest.approx(0.0, abs=1e-6)
        assert error_barrier(path.error) == 0.0


def test_linear_classifier_path_is_convex():
    """Cross-entropy of a linear classifier is convex in the weights, hence in alpha: the path stays under the
    chord, its maximum is the higher endpoint and the barrier is exactly half the endpoints' difference."""
    torch.manual_seed(0)
    model_a = MLP((4,), hidden=(), num_classes=3).double()
    model_b = MLP((4,), hidden=(), num_classes=3).double()
    with torch.no_grad():
        model_b.net[1].weight.mul_(6.0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    path = linear_path(model_a, model_b, loader, alphas=21)

    wa, ba = model_a.net[1].weight.detach(), model_a.net[1].bias.detach()
    wb, bb = model_b.net[1].weight.detach(), model_b.net[1].bias.detach()
    for alpha, loss in zip(path.alphas.tolist(), path.loss.tolist()):
        logits = x @ ((1 - alpha) * wa + alpha * wb).T + ((1 - alpha) * ba + alpha * bb)
        assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)
    l0, l1 = path.loss[0].item(), path.loss[-1].item()
    chord = (1 - path.alphas) * l0 + path.alphas * l1
    assert bool((path.loss <= chord + 1e-12).all())
    assert l0 != pytest.approx(l1, abs=1e-3)
    assert error_barrier(path.loss) == pytest.approx(abs(l0 - l1) / 2, abs=1e-12)


def test_permuted_hidden_units_have_the_closed_form_barrier():
    """``f(x) = W2 relu(W1 x)`` with ``W1 = I``, ``W2 = [[1, -1], [-1, 1]]`` and its hidden-unit permutation
    compute the same function. On the positive quadrant the path is ``f_alpha = (1 - 2 alpha)^2 f_0``: the
    logits are ``c (x1 - x2) [1, -1]`` with ``c = (1 - 2 alpha)^2``, so the loss is
    ``mean log(1 + exp(-2 c |x1 - x2|))`` (labels from f_0), the error is 0 except at alpha = 1/2, where every
    output is 0 and argmax picks class 0, so the error is the fraction of label 1."""
    model_a = MLP((2,), hidden=(2,), num_classes=2).double()
    model_b = MLP((2,), hidden=(2,), num_classes=2).double()
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    w2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    with torch.no_grad():
        for model, perm in ((model_a, torch.eye(2, dtype=torch.float64)), (model_b, swap)):
            model.net[1].weight.copy_(perm)
            model.net[1].bias.zero_()
            model.net[3].weight.copy_(w2 @ perm.T)
            model.net[3].bias.zero_()
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(200, 2, generator=generator, dtype=torch.float64) * 2 + 0.1
    x = x[(x[:, 0] - x[:, 1]).abs() > 0.2][:40]
    y = (x[:, 1] > x[:, 0]).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with torch.no_grad():
        assert torch.equal(model_a(x), model_b(x))  # the same function

    alphas = [i / 10 for i in range(11)]
    path = linear_path(model_a, model_b, loader, alphas=alphas, bn="reset", bn_loader=NeverIterated())
    gap = (x[:, 0] - x[:, 1]).abs()
    for alpha, loss, error in zip(alphas, path.loss.tolist(), path.error.tolist()):
        c = (1 - 2 * alpha) ** 2
        assert loss == pytest.approx(float(F.softplus(-2 * c * gap).mean()), rel=1e-12)
        assert error == (float(y.double().mean()) if alpha == 0.5 else 0.0)
    assert error_barrier(path.loss) == pytest.approx(
        math.log(2) - float(F.softplus(-2 * gap).mean()), rel=1e-12
    )
    assert error_barrier(path.error) == float(y.double().mean()) > 0.3
    # no BatchNorm: both modes give the same path
    interpolated = linear_path(model_a, model_b, loader, alphas=alphas, bn="interpolate")
    assert torch.equal(interpolated.loss, path.loss) and torch.equal(interpolated.error, path.error)


class CountingBatches:
    """A list of batches that counts how often it is iterated."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.mark.parametrize("bn", ["reset", "interpolate"])
def test_linear_paths_equal_linear_path_on_each_set_with_one_reset_per_alpha(bn):
    model_a, model_b = make_cnn(0), make_cnn(1)
    train = DataLoader(make_images(24, seed=5), batch_size=8)
    test = DataLoader(make_images(), batch_size=8)
    bn_batches = CountingBatches([x for x, _ in train])
    paths = linear_paths(
        model_a, model_b, {"train": train, "test": test}, alphas=4, bn=bn, bn_loader=bn_batches
    )
    assert list(paths) == ["train", "test"]
    assert bn_batches.passes == (4 if bn == "reset" else 0)  # shared by the two sets
    for name, loader in (("train", train), ("test", test)):
        single = linear_path(model_a, model_b, loader, alphas=4, bn=bn, bn_loader=bn_batches.batches)
        assert torch.equal(paths[name].loss, single.loss) and torch.equal(paths[name].error, single.error)
        assert paths[name].num_examples == single.num_examples and paths[name].bn == bn
    # default bn_loader: the first set
    first = linear_paths(model_a, model_b, {"test": test, "train": train}, alphas=2)
    assert torch.equal(
        first["train"].loss, linear_path(model_a, model_b, train, alphas=2, bn_loader=test).loss
    )
    with pytest.raises(ValueError, match="loaders"):
        linear_paths(model_a, model_b, {}, alphas=2)
    with pytest.raises(ValueError, match="loaders"):
        linear_paths(model_a, model_b, [test], alphas=2)


@pytest.mark.parametrize(
    "alphas",
    [1, 0, True, [], [0.0], [0, 0.5], [0.5, 1], [0, 0.6, 0.4, 1], [0, 0.5, 0.5, 1], [0, math.nan, 1], [0, 1.5, 1],
     [-0.5, 0, 1], "01", torch.zeros(2, 2), [0, "a", 1]],
)  # fmt: skip
def test_linear_path_bad_alphas(alphas):
    model = MLP((4,), hidden=(16,), num_classes=3)
    with pytest.raises(ValueError, match="alphas"):
        linear_path(model, model, [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))], alphas=alphas)


def test_linear_path_bad_arguments():
    model = MLP((4,), hidden=(16,), num_classes=3)
    data = [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="bn"):
        linear_path(model, model, data, bn="swap")
    with pytest.raises(ValueError, match="bn_batches"):
        linear_path(model, model, data, bn_batches=0)
    with pytest.raises(ValueError, match="loss_fn"):
        linear_path(model, model, data, loss_fn=None)
    with pytest.raises(ValueError, match="model_b"):
        linear_path(model, MLP((4,), hidden=(8,), num_classes=3), data)
    with pytest.raises(ValueError, match="model_b"):
        linear_path(model, MLP((4,), hidden=(16, 16), num_classes=3), data)
    with pytest.raises(ValueError, match="model_a"):
        linear_path(model.state_dict(), model.state_dict(), data)
    with pytest.raises(ValueError, match="loader"):
        linear_path(model, model, [])


# ------------------------------------------------------------------------------------------------------------
# error_barrier and stable_point.


def test_error_barrier_values():
    assert error_barrier([0.1, 0.3, 0.2]) == pytest.approx(0.3 - 0.15, abs=1e-15)
    assert error_barrier([0.25, 0.75, 0.5]) == 0.375
    assert error_barrier(torch.tensor([0.25, 0.75, 0.5])) == 0.375
    assert error_barrier([torch.tensor(0.25), 0.75, torch.tensor(0.5)]) == 0.375
    assert error_barrier([0.5, 0.25, 0.75]) == 0.125  # monotone path: half the endpoints' difference
    assert error_barrier([0.25, 0.25]) == 0.0
    assert error_barrier([0.4]) == 0.0
    for bad in ([0.1, math.nan, 0.2], [math.nan, 0.1], torch.tensor([0.1, math.inf, 0.2])):
        assert math.isnan(error_barrier(bad))


@pytest.mark.parametrize(
    "values", [[], [[0.1, 0.2]], torch.zeros(2, 2), torch.zeros(0), "abc", [True, 0.1], 3.0, [torch.ones(2)]]
)
def test_error_barrier_bad_values(values):
    with pytest.raises(ValueError, match="values"):
        error_barrier(values)


def test_stable_point():
    assert stable_point([0, 100, 500, 2000], [0.3, 0.05, 0.01, 0.015]) == 500
    assert stable_point([2000, 0, 500, 100], [0.015, 0.3, 0.01, 0.05]) == 500  # order of the steps
    assert stable_point([0, 100, 500], [0.3, math.nan, 0.019]) == 500  # NaN never stable
    assert stable_point([0, 100], torch.tensor([0.3, 0.05]), threshold=0.1) == 100
    assert stable_point([0, 100], [torch.tensor(0.3), torch.tensor(0.01)]) == 100
    assert stable_point([0, 100], [0.3, 0.02]) is None  # strictly under the threshold
    assert stable_point([], []) is None


@pytest.mark.parametrize(
    "args, name",
    [
        (([0, 100], [0.1]), "barriers"),
        (([0, 0], [0.1, 0.2]), "spawn_steps"),
        (([-1, 5], [0.1, 0.2]), "spawn_steps"),
        (([0.5, 5], [0.1, 0.2]), "spawn_steps"),
        (([0, 5], [0.1, 0.2], math.nan), "threshold"),
        (([0, 5], ["a", 0.2]), "barriers"),
    ],
)
def test_stable_point_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        stable_point(*args)


def test_reset_leaves_out_a_single_example_batch_with_batchnorm1d_and_pools_float64_batches_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = torch.randn(17, 3, dtype=torch.float64)
    model = model.double()
    with_single = [data[:8], data[8:16], data[16:]]  # a last batch of one example
    reference = reset_batchnorm_statistics(copy.deepcopy(model), with_single[:2])
    reset = reset_batchnorm_statistics(model, with_single)
    assert int(reset[1].num_batches_tracked) == 2
    assert torch.equal(reset[1].running_mean, reference[1].running_mean)
    assert torch.equal(reset[1].running_var, reference[1].running_var)
    hidden = data[:16] @ model[0].weight.T + model[0].bias
    assert torch.allclose(reset[1].running_mean, hidden.mean(0), atol=1e-12)
    assert torch.allclose(reset[1].running_var, hidden.var(0), atol=1e-12)


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3), (4, 5)])
def test_coarse_to_fine_evaluates_the_documented_points_with_the_whole_grids_values(seeds):
    """Every 4th point of a 13-point grid, then the points strictly between the coarse neighbours of each coarse
    maximum (error and loss, both sets): the values at those points are the whole grid's, bit for bit."""
    model_a, model_b = make_cnn(seeds[0]), make_cnn(seeds[1])
    loaders = {"train": DataLoader(make_images(seed=1), batch_size=8), "test": DataLoader(make_images(seed=2))}
    full = linear_paths(model_a, model_b, loaders, alphas=13)
    coarse = linear_paths(model_a, model_b, loaders, alphas=13, coarse_every=4)
    coarse_points = [0, 4, 8, 12]
    expected = set(coarse_points)
    for path in full.values():
        for values in (path.error, path.loss):
            at = [float(values[i]) for i in coarse_points]
            j = at.index(max(at))
            expected |= set(range(coarse_points[max(j - 1, 0)] + 1, coarse_points[min(j + 1, 3)]))
    for name, path in coarse.items():
        indices = [round(float(a) * 12) for a in path.alphas]
        assert indices == sorted(expected), name
        assert torch.equal(path.alphas, full[name].alphas[indices])
        assert torch.equal(path.error, full[name].error[indices]) and torch.equal(path.loss, full[name].loss[indices])
        peak = int(full[name].error.argmax())
        if peak in indices:  # the maximum was refined into the coarse path: the same barrier
            assert error_barrier(path.error) == error_barrier(full[name].error)
