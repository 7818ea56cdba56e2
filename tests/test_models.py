"""Models: parameter counts against the architecture formulas and the published sizes, shapes, the option A
shortcut, He initialisation, torch.fx tracing, pickling and argument validation."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.fx
from torch import nn

from lt_theory.models import (
    MLP,
    CIFARResNet,
    LeNet,
    PreActResNet18,
    ZeroPadShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)

# ------------------------------------------------------------------------------------------------------------
# Parameter counts written out from the architectures.


def conv(kernel: int, c_in: int, c_out: int) -> int:
    """A convolution without bias."""
    return kernel * kernel * c_in * c_out


def bn(channels: int) -> int:
    """BatchNorm: a scale and a shift per channel."""
    return 2 * channels


def linear(n_in: int, n_out: int) -> int:
    """A fully connected layer with bias."""
    return n_in * n_out + n_out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cifar_resnet_count(depth: int, num_classes: int = 10, width: int = 1, shortcut: str = "A") -> int:
    n = (depth - 2) // 6
    widths = [16 * width, 32 * width, 64 * width]
    total = conv(3, 3, widths[0]) + bn(widths[0])
    c_in = widths[0]
    for c in widths:
        for _ in range(n):
            total += conv(3, c_in, c) + bn(c) + conv(3, c, c) + bn(c)
            if shortcut == "B" and c_in != c:
                total += conv(1, c_in, c) + bn(c)
            c_in = c
    return total + linear(c_in, num_classes)


def preact_resnet18_count(k: int, num_classes: int = 10) -> int:
    total = conv(3, 3, k)
    c_in = k
    for c, stride in zip([k, 2 * k, 4 * k, 8 * k], [1, 2, 2, 2]):
        for block_stride in (stride, 1):
            total += bn(c_in) + conv(3, c_in, c) + bn(c) + conv(3, c, c)
            if block_stride != 1 or c_in != c:
                total += conv(1, c_in, c)  # projection shortcut, no BatchNorm (pre-activation)
            c_in = c
    return total + bn(c_in) + linear(c_in, num_classes)


# ResNet-20/32/44/56/110 with option A and 10 classes: exact counts and Table 6 of He et al. (2016).
EXACT_RESNET = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
PUBLISHED_RESNET_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}
FACTORIES = {20: resnet20, 32: resnet32, 44: resnet44, 56: resnet56, 110: resnet110}


@pytest.mark.parametrize("depth", sorted(EXACT_RESNET))
def test_cifar_resnet_parameter_count(depth):
    model = FACTORIES[depth]()
    assert n_params(model) == cifar_resnet_count(depth) == EXACT_RESNET[depth]
    digits = 1 if depth == 110 else 2
    assert round(n_params(model) / 1e6, digits) == PUBLISHED_RESNET_M[depth]


@pytest.mark.parametrize("depth", [8, 20, 56])
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_parameter_count_formula(depth, num_classes, width, shortcut):
    model = CIFARResNet(depth, num_classes=num_classes, width=width, shortcut=shortcut)
    assert n_params(model) == cifar_resnet_count(depth, num_classes, width, shortcut)


def test_option_b_adds_two_projections():
    extra = (conv(1, 16, 32) + bn(32)) + (conv(1, 32, 64) + bn(64))
    assert extra == 2_752
    assert n_params(resnet20(shortcut="B")) == EXACT_RESNET[20] + extra
    projections = [
        m for m in resnet20(shortcut="B").modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert [(m.in_channels, m.out_channels, m.stride) for m in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]


def test_preact_resnet18_parameter_count():
    model = PreActResNet18(k=64)
    assert n_params(model) == preact_resnet18_count(64) == 11_172_170
    assert abs(n_params(model) - 11.17e6) / 11.17e6 < 0.01


@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_preact_resnet18_parameter_count_formula(k, num_classes):
    assert n_params(PreActResNet18(k=k, num_classes=num_classes)) == preact_resnet18_count(k, num_classes)


def test_small_parameter_counts():
    assert n_params(MLP()) == linear(3 * 32 * 32, 128) + linear(128, 10) == 394_634
    assert n_params(MLP((1, 28, 28), hidden=(300, 100), num_classes=10)) == (
        linear(784, 300) + linear(300, 100) + linear(100, 10)
    )
    assert n_params(MLP((5,), hidden=(), num_classes=2)) == linear(5, 2)
    lenet = (
        conv(5, 3, 6) + 6 + conv(5, 6, 16) + 16 + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, 10)
    )
    assert n_params(LeNet()) == lenet == 62_006


# ------------------------------------------------------------------------------------------------------------
# Shapes, widths, the option A shortcut, initialisation.

MODELS = {
    "resnet20": lambda c: resnet20(num_classes=c),
    "resnet20_B": lambda c: resnet20(num_classes=c, shortcut="B"),
    "resnet20_w2": lambda c: resnet20(num_classes=c, width=2),
    "resnet32": lambda c: resnet32(num_classes=c),
    "resnet44": lambda c: resnet44(num_classes=c),
    "resnet56": lambda c: resnet56(num_classes=c),
    "resnet110": lambda c: resnet110(num_classes=c),
    "preact18_k64": lambda c: PreActResNet18(k=64, num_classes=c),
    "preact18_k4": lambda c: PreActResNet18(k=4, num_classes=c),
    "mlp": lambda c: MLP(num_classes=c),
    "lenet": lambda c: LeNet(num_classes=c),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name, num_classes):
    model = MODELS[name](num_classes)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_in_channels():
    assert CIFARResNet(8, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert PreActResNet18(k=2, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert LeNet(in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert MLP((1, 28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _stage_convs(stage: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_channels, m.out_channels) for m in stage.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("width", [1, 2, 3])
def test_cifar_resnet_width_scales_channels(width):
    model = CIFARResNet(14, width=width)  # n = 2
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    assert model.conv1.out_channels == c1
    assert _stage_convs(model.layer1) == [(c1, c1)] * 4
    assert _stage_convs(model.layer2) == [(c1, c2)] + [(c2, c2)] * 3
    assert _stage_convs(model.layer3) == [(c2, c3)] + [(c3, c3)] * 3
    assert model.fc.in_features == c3


@pytest.mark.parametrize("k", [1, 5, 64])
def test_preact_resnet18_width_scales_channels(k):
    model = PreActResNet18(k=k)
    assert model.conv1.out_channels == k
    c_in = k
    for stage, c, stride in zip(
        [model.layer1, model.layer2, model.layer3, model.layer4], [k, 2 * k, 4 * k, 8 * k], [1, 2, 2, 2]
    ):
        first, second = stage
        assert (first.conv1.in_channels, first.conv1.out_channels, first.conv1.stride) == (
            c_in,
            c,
            (stride, stride),
        )
        assert (second.conv1.in_channels, second.conv2.out_channels) == (c, c)
        assert (first.shortcut is None) == (stride == 1 and c_in == c)
        assert second.shortcut is None
        c_in = c
    assert model.fc.in_features == 8 * k


def test_preact_spatial_resolution():
    model = PreActResNet18(k=2).eval()
    x = torch.randn(1, 3, 32, 32)
    sizes = []
    out = model.conv1(x)
    for stage in [model.layer1, model.layer2, model.layer3, model.layer4]:
        out = stage(out)
        sizes.append(tuple(out.shape[1:]))
    assert sizes == [(2, 32, 32), (4, 16, 16), (8, 8, 8), (16, 4, 4)]


def test_zero_pad_shortcut_values():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float64).reshape(2, 3, 6, 6)
    out = ZeroPadShortcut(3, 7, stride=2)(x)
    assert out.shape == (2, 7, 3, 3)
    expected = torch.zeros(2, 7, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            expected[:, :3, i, j] = x[:, :, 2 * i, 2 * j]
    assert torch.equal(out, expected)
    assert out[0, 1, 1, 2].item() == x[0, 1, 2, 4].item() == 1 * 36 + 2 * 6 + 4


def test_option_a_shortcuts_are_parameter_free():
    model = resnet20()
    shortcuts = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert [(s.in_channels, s.out_channels, s.stride) for s in shortcuts] == [(16, 32, 2), (32, 64, 2)]
    for s in shortcuts:
        assert list(s.parameters()) == [] and list(s.buffers()) == []
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    # Option A adds nothing to the plain network: 2n + 1 3x3 convolutions with their BatchNorms, and the fc.
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19


def test_cifar_resnet_spatial_resolution():
    model = resnet20().eval()
    out = model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))
    shapes = []
    for stage in [model.layer1, model.layer2, model.layer3]:
        out = stage(out)
        shapes.append(tuple(out.shape[1:]))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_cifar_resnet_he_initialisation():
    torch.manual_seed(0)
    model = resnet56()
    convs = [m for m in model.layer3.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 64]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert weights.numel() == 17 * 64 * 64 * 9
    assert abs(weights.mean().item()) < 1e-3
    assert weights.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.01)
    assert model.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 3)), rel=0.15)


def _state_hash(model: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        # hashes of the seed-0 weights written before `reset_parameters` existed: construction draws the same
        (dict(depth=8), "3906f98f2b8d563b"),
        (dict(depth=20), "8fb061ecc542f4b7"),
        (dict(depth=8, shortcut="B", width=2), "4d34104905eb5d0c"),
    ],
)
def test_cifar_resnet_initial_weights_unchanged_by_reset_parameters_refactor(arguments, expected):
    torch.manual_seed(0)
    assert _state_hash(CIFARResNet(**arguments)) == expected


def test_cifar_resnet_reset_parameters_redraws_the_he_normal_convolutions():
    torch.manual_seed(0)
    model = resnet56()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    torch.manual_seed(1)
    model.reset_parameters()
    convs = [m for m in model.layer3.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 64]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert weights.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.01)
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])  # redrawn
    assert torch.equal(model.fc.weight, before["fc.weight"])  # the rest: its own reset_parameters
    assert torch.equal(model.bn1.weight, before["bn1.weight"])


# ------------------------------------------------------------------------------------------------------------
# torch.fx, copies, pickling.


def _with_bn_statistics(model: nn.Module) -> nn.Module:
    """Float64, with BatchNorm running statistics away from their initial (identity) values, in eval mode."""
    model = model.double().train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32, dtype=torch.float64) * 2 + 1)
    return model.eval()


TRACE_MODELS = ["resnet20", "resnet20_B", "resnet20_w2", "preact18_k4", "mlp", "lenet"]


@pytest.mark.parametrize("name", TRACE_MODELS)
def test_fx_trace_matches(name):
    torch.manual_seed(0)
    model = _with_bn_statistics(MODELS[name](10))
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(traced(x), model(x))


def test_fx_trace_keeps_every_parameter_and_buffer():
    for model in (resnet110(), resnet56(shortcut="B"), PreActResNet18(k=64)):
        traced = torch.fx.symbolic_trace(model)
        assert traced.state_dict().keys() == model.state_dict().keys()
        assert all(traced.get_parameter(name) is p for name, p in model.named_parameters())


@pytest.mark.parametrize("name", TRACE_MODELS)
def test_deepcopy_and_pickle(name):
    torch.manual_seed(0)
    model = _with_bn_statistics(MODELS[name](10))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), reference)
        assert clone.state_dict().keys() == model.state_dict().keys()
        assert all(p is not q for p, q in zip(clone.parameters(), model.parameters()))


# ------------------------------------------------------------------------------------------------------------
# Argument validation.


@pytest.mark.parametrize("depth", [21, 2, 0, -4, 20.0, "20", True])
def test_invalid_depth(depth):
    with pytest.raises(ValueError, match="`depth`"):
        CIFARResNet(depth)


@pytest.mark.parametrize("width", [0, -1, 1.5, True, "2"])
def test_invalid_width(width):
    with pytest.raises(ValueError, match="`width`"):
        CIFARResNet(20, width=width)
    with pytest.raises(ValueError, match="`width`"):
        resnet20(width=width)


@pytest.mark.parametrize("k", [0, -8, 2.0, None])
def test_invalid_k(k):
    with pytest.raises(ValueError, match="`k`"):
        PreActResNet18(k=k)


def test_invalid_other_arguments():
    with pytest.raises(ValueError, match="`shortcut`"):
        CIFARResNet(20, shortcut="C")
    for build in (
        lambda: CIFARResNet(20, num_classes=0),
        lambda: PreActResNet18(num_classes=0),
        lambda: MLP(num_classes=0),
        lambda: LeNet(num_classes=0),
    ):
        with pytest.raises(ValueError, match="`num_classes`"):
            build()
    with pytest.raises(ValueError, match="`in_channels`"):
        CIFARResNet(20, in_channels=0)
    with pytest.raises(ValueError, match="`hidden`"):
        MLP(hidden=(128, 0))
    with pytest.raises(ValueError, match="`in_shape`"):
        MLP(in_shape=())
    with pytest.raises(ValueError, match="`out_channels`"):
        ZeroPadShortcut(32, 16)
