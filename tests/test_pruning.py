"""Tests of lt_theory.measures.pruning against exact references.

References: masks worked out by hand on explicit weights (global and layer-wise, ties, rounding), the
round-by-round counts of 20% pruning of 1000 weights written out (1000, 800, 640, 512, 410, 328, 262, 210, 168)
and the closed form (1 - p)^L, and ``torch.nn.utils.prune`` (``global_unstructured`` and ``l1_unstructured``
iterated over levels) on tie-free random weights. Enforcement is checked bit for bit: pruned weights exactly
0.0 after SGD with momentum and weight decay, and the same final state whether masks are enforced on the
weights after each step or on the gradients before it.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lt_theory.measures.pruning import (
    PRUNING_SCOPES,
    MaskEnforcer,
    apply_masks,
    magnitude_masks,
    mask_gradients,
    mask_optimizer_state,
    masks_from_state,
    masks_to_state,
    prunable_parameters,
    random_masks_like,
    remaining_counts,
    remaining_fraction_after,
    sparsity_report,
)
from lt_theory.models import LeNet


def T(*values):  # a short constructor for explicit float64 tensors
    return torch.tensor(values, dtype=torch.float64)


def B(*values):  # and for bool masks
    return torch.tensor(values, dtype=torch.bool)


class Mixed(nn.Module):
    """Every kind of layer: the prunable ones and the ones that must never be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.conv1 = nn.Conv1d(2, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.conv3 = nn.Conv3d(4, 2, 1)
        self.deconv = nn.ConvTranspose2d(4, 4, 2)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


# ------------------------------------------------------------------------------------------------------------
# Which parameters.


def test_prunable_parameters_default_is_linear_and_conv_weights_only():
    model = Mixed()
    params = prunable_parameters(model)
    assert list(params) == ["conv1.weight", "conv2.weight", "conv3.weight", "head.0.weight", "head.2.weight"]
    named = dict(model.named_parameters())
    assert all(params[name] is named[name] for name in params)  # the parameters themselves, not copies


def test_prunable_parameters_include_and_exclude():
    model = Mixed()
    assert list(prunable_parameters(model, include=["head.0", "conv2.weight"])) == [
        "conv2.weight",
        "head.0.weight",
    ]
    assert list(prunable_parameters(model, exclude=["head.2"])) == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "head.0.weight",
    ]
    assert list(prunable_parameters(model, include=["head.0", "head.2"], exclude=["head.2.weight"])) == [
        "head.0.weight"
    ]


def test_prunable_parameters_shared_module_once_and_root_linear():
    layer = nn.Linear(3, 3)
    assert list(prunable_parameters(nn.Sequential(layer, nn.ReLU(), layer))) == ["0.weight"]
    assert list(prunable_parameters(nn.Linear(2, 2))) == ["weight"]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"include": ["nope"]}, "`include`"),
        ({"include": ["head.0.bias"]}, "`include`"),  # biases are never prunable
        ({"include": ["bn"]}, "`include`"),  # nor normalisation layers
        ({"include": ["deconv"]}, "`include`"),
        ({"include": "head.0"}, "`include`"),  # a string, not a list of names
        ({"exclude": ["embed"]}, "`exclude`"),
    ],
)
def test_prunable_parameters_unknown_names_list_the_available_ones(kwargs, argument):
    with pytest.raises(ValueError, match=argument) as error:
        prunable_parameters(Mixed(), **kwargs)
    if "nope" in str(kwargs):
        assert "conv1.weight" in str(error.value) and "head.2.weight" in str(error.value)


def test_prunable_parameters_refuses_a_model_without_prunable_layers_or_an_empty_selection():
    with pytest.raises(ValueError, match="`model` has no prunable parameter.*nn.Linear"):
        prunable_parameters(nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="`model` must be"):
        prunable_parameters({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="nothing to prune"):
        prunable_parameters(Mixed(), include=["head.0"], exclude=["head.0"])


# ------------------------------------------------------------------------------------------------------------
# Magnitude masks against masks worked out by hand.


def test_global_twenty_percent_by_hand_over_three_levels():
    weights = {"a": T([0.5, -0.1, 0.3], [0.05, -0.9, 0.2]), "b": T([0.4, -0.02], [0.7, 0.15])}
    # level 1: 10 remaining, round(2.0) = 2 pruned: |-0.02| (b), |0.05| (a)
    m1 = magnitude_masks(weights, 0.2)
    assert torch.equal(m1["a"], B([True, True, True], [False, True, True]))
    assert torch.equal(m1["b"], B([True, False], [True, True]))
    # level 2: 8 remaining, round(1.6) = 2 more: |-0.1| (a), |0.15| (b)
    m2 = magnitude_masks(weights, 0.2, current_masks=m1)
    assert torch.equal(m2["a"], B([True, False, True], [False, True, True]))
    assert torch.equal(m2["b"], B([True, False], [True, False]))
    # level 3: 6 remaining, round(1.2) = 1 more: |0.2| (a)
    m3 = magnitude_masks(weights, 0.2, current_masks=m2)
    assert torch.equal(m3["a"], B([True, False, True], [False, True, False]))
    assert torch.equal(m3["b"], m2["b"])
    # nothing was modified
    assert torch.equal(m1["a"], B([True, True, True], [False, True, True]))
    assert weights["b"][0, 1].item() == -0.02


def test_layerwise_and_global_differ_as_computed_by_hand():
    weights = {"a": T(0.01, -0.02, 0.03, 0.04, 0.9), "b": T(0.5, 0.6, -0.7, 0.8, 0.95)}
    # global: round(0.4 * 10) = 4, the four small entries of a
    glob = magnitude_masks(weights, 0.4, scope="global")
    assert torch.equal(glob["a"], B(False, False, False, False, True))
    assert torch.equal(glob["b"], B(True, True, True, True, True))
    # layer-wise: round(0.4 * 5) = 2 in each layer
    lay = magnitude_masks(weights, 0.4, scope="layerwise")
    assert torch.equal(lay["a"], B(False, False, True, True, True))
    assert torch.equal(lay["b"], B(False, False, True, True, True))
    # second layer-wise level: 3 remaining per layer, round(1.2) = 1 each
    lay2 = magnitude_masks(weights, 0.4, current_masks=lay, scope="layerwise")
    assert torch.equal(lay2["a"], B(False, False, False, True, True))
    assert torch.equal(lay2["b"], B(False, False, False, True, True))


def test_ties_go_to_the_smaller_index_and_rounding_is_half_to_even():
    weights = {"a": T(0.1, -0.1, 0.3), "b": T(0.1, 0.2)}
    assert torch.equal(magnitude_masks(weights, 0.4)["a"], B(False, False, True))  # 2 of the three 0.1
    m = magnitude_masks(weights, 0.6)  # 3: all three 0.1, a's before b's
    assert torch.equal(m["a"], B(False, False, True)) and torch.equal(m["b"], B(False, True))
    m = magnitude_masks(weights, 0.5, scope="layerwise")  # a: round(1.5) = 2, b: round(1.0) = 1
    assert torch.equal(m["a"], B(False, False, True)) and torch.equal(m["b"], B(False, True))
    # round half to even: 0.5 * 5 = 2.5 -> 2, 0.5 * 7 = 3.5 -> 4
    assert int(magnitude_masks({"w": T(*range(1, 6))}, 0.5)["w"].sum()) == 3
    assert int(magnitude_masks({"w": T(*range(1, 8))}, 0.5)["w"].sum()) == 3
    assert remaining_counts(5, 1, 0.5) == [5, 3] and remaining_counts(7, 1, 0.5) == [7, 3]


def test_already_pruned_stay_pruned_whatever_their_value():
    weights = {"w": T(0.3, 0.1, 0.2, 0.4)}
    m1 = magnitude_masks(weights, 0.25)
    assert torch.equal(m1["w"], B(True, False, True, True))
    weights["w"][1] = 100.0  # a pruned weight that grew back would be the largest
    m2 = magnitude_masks(weights, 0.25, current_masks=m1)  # round(0.75) = 1 more: 0.2
    assert torch.equal(m2["w"], B(True, False, False, True))
    weights["w"][1] = math.nan  # a pruned entry is not ranked, so its value does not matter
    assert torch.equal(magnitude_masks(weights, 0.25, current_masks=m2)["w"], B(True, False, False, True))


def test_iterated_levels_follow_the_round_by_round_counts_and_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(30, 20, generator=gen), "b": torch.randn(40, 10, generator=gen)}
    expected = [1000, 800, 640, 512, 410, 328, 262, 210, 168]
    assert remaining_counts(1000, 8, 0.2) == expected
    masks = None
    for level in range(1, 9):
        new = magnitude_masks(weights, 0.2, current_masks=masks)
        report = sparsity_report(new)
        assert report.remaining == expected[level] and report.total == 1000
        assert abs(report.remaining - 1000 * remaining_fraction_after(level, 0.2)) <= level / 2
        old = masks or {k: torch.ones_like(v) for k, v in new.items()}
        for name in weights:
            assert not (new[name] & ~old[name]).any()  # nothing revived
        # the newly pruned are the smallest of the remaining: max pruned now <= min kept
        newly = torch.cat([weights[k][old[k] & ~new[k]].abs() for k in weights])
        kept = torch.cat([weights[k][new[k]].abs() for k in weights])
        assert newly.numel() == expected[level - 1] - expected[level] and newly.max() <= kept.min()
        for name in weights:  # pruned weights set large: must not come back at the next level
            weights[name][~new[name]] = 1e6
        masks = new


def test_layerwise_levels_count_each_layer_separately():
    gen = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(30, 20, generator=gen), "b": torch.randn(40, 10, generator=gen)}
    counts_a, counts_b = remaining_counts(600, 5, 0.2), remaining_counts(400, 5, 0.2)
    assert counts_a == [600, 480, 384, 307, 246, 197] and counts_b == [400, 320, 256, 205, 164, 131]
    masks = None
    for level in range(1, 6):
        masks = magnitude_masks(weights, 0.2, current_masks=masks, scope="layerwise")
        assert sparsity_report(masks).layer_remaining == {"a": counts_a[level], "b": counts_b[level]}


def test_a_model_is_pruned_over_its_prunable_parameters_and_mixed_dtypes_rank_together():
    model = Mixed()
    masks = magnitude_masks(model, 0.5)
    assert list(masks) == list(prunable_parameters(model))
    weights = {"half": torch.tensor([0.25, 2.0], dtype=torch.float16), "double": T(0.5, 1.0)}
    masks = magnitude_masks(weights, 0.5)
    assert torch.equal(masks["half"], B(False, True)) and torch.equal(masks["double"], B(False, True))


# ------------------------------------------------------------------------------------------------------------
# Against torch.nn.utils.prune (tie-free random weights).


@pytest.mark.parametrize("scope", PRUNING_SCOPES)
def test_masks_equal_torch_nn_utils_prune_over_three_levels(scope):
    ours = LeNet()
    theirs = copy.deepcopy(ours)
    names = list(prunable_parameters(ours))
    modules = [theirs.get_submodule(name.rsplit(".", 1)[0]) for name in names]
    masks = None
    for _ in range(3):
        masks = magnitude_masks(ours, 0.2, current_masks=masks, scope=scope)
        if scope == "global":
            prune.global_unstructured([(m, "weight") for m in modules], prune.L1Unstructured, amount=0.2)
        else:
            for module in modules:
                prune.l1_unstructured(module, "weight", amount=0.2)
        for name, module in zip(names, modules):
            assert torch.equal(masks[name], module.weight_mask.bool()), name


# ------------------------------------------------------------------------------------------------------------
# The random control.


def test_random_masks_have_the_same_layer_counts_and_are_deterministic_per_seed():
    model = LeNet()
    masks = magnitude_masks(model, 0.5, scope="global")
    before = {k: v.clone() for k, v in masks.items()}
    rng_state = torch.get_rng_state()
    one = random_masks_like(masks, torch.Generator().manual_seed(1))
    again = random_masks_like(masks, torch.Generator().manual_seed(1))
    other = random_masks_like(masks, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert sparsity_report(one).layer_remaining == sparsity_report(masks).layer_remaining
    assert sparsity_report(other).layer_remaining == sparsity_report(masks).layer_remaining
    for name in masks:
        assert one[name].shape == masks[name].shape and one[name].dtype == torch.bool
        assert torch.equal(one[name], again[name])
        assert not torch.equal(one[name], other[name])
        assert not torch.equal(one[name], masks[name])
        assert torch.equal(masks[name], before[name])


def test_random_masks_keep_each_position_with_probability_k_over_n():
    gen = torch.Generator().manual_seed(0)
    masks = {"w": B(True, True, True, False, False, False, False, False, False, False)}
    freq = torch.stack([random_masks_like(masks, gen)["w"] for _ in range(2000)]).double().mean(0)
    assert torch.allclose(freq, torch.full((10,), 0.3, dtype=torch.float64), atol=0.05)  # 5 sigma = 0.051


# ------------------------------------------------------------------------------------------------------------
# Applying and enforcing masks.


def _train(model, masks, steps, enforce_weights, enforce_grads, optimizer="sgd"):
    gen = torch.Generator().manual_seed(3)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if enforce_grads:
            mask_gradients(model, masks)
        opt.step()
        if enforce_weights:
            apply_masks(model, masks)
    return opt


def test_enforced_masks_keep_pruned_weights_exactly_zero_under_momentum_and_weight_decay():
    model = small_net()
    masks = magnitude_masks(model, 0.5)
    assert list(masks) == ["0.weight", "3.weight"]  # no bias, no BatchNorm
    apply_masks(model, masks)
    start = copy.deepcopy(model.state_dict())
    free, by_grads = copy.deepcopy(model), copy.deepcopy(model)

    opt = _train(model, masks, 6, enforce_weights=True, enforce_grads=False)
    _train(free, masks, 6, enforce_weights=False, enforce_grads=False)
    _train(by_grads, masks, 6, enforce_weights=False, enforce_grads=True)
    params, free_params = dict(model.named_parameters()), dict(free.named_parameters())
    for name, mask in masks.items():
        pruned = params[name][~mask]
        assert torch.equal(pruned, torch.zeros_like(pruned)) and not pruned.signbit().any()  # +0.0 exactly
        assert (free_params[name][~mask] != 0).float().mean() > 0.9  # without enforcement they revive
    # masking gradients alone keeps them at zero too, and the surviving weights, biases and BatchNorm
    # parameters and statistics end bit-identical either way
    state, other = model.state_dict(), by_grads.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)
    # biases and BatchNorm were trained, never masked
    assert not torch.equal(state["0.bias"], start["0.bias"]) and not torch.equal(
        state["1.weight"], start["1.weight"]
    )
    assert (state["1.weight"] != 0).all() and (state["0.bias"] != 0).all()

    # momentum built up at pruned positions (their gradients are not zero) until the state is masked
    buffers = {name: opt.state[params[name]]["momentum_buffer"] for name in masks}
    assert all((buffers[name][~mask] != 0).any() for name, mask in masks.items())
    bias_buffer = opt.state[params["0.bias"]]["momentum_buffer"].clone()
    assert mask_optimizer_state(opt, model, masks) == 2
    for name, mask in masks.items():
        assert torch.equal(buffers[name][~mask], torch.zeros_like(buffers[name][~mask]))
        assert (buffers[name][mask] != 0).any()
    assert torch.equal(opt.state[params["0.bias"]]["momentum_buffer"], bias_buffer)


def test_enforced_masks_with_adam_and_its_state_masked():
    model = small_net(1)
    masks = magnitude_masks(model, 0.7, scope="layerwise")
    apply_masks(model, masks)
    opt = _train(model, masks, 4, enforce_weights=True, enforce_grads=False, optimizer="adam")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(params[name][~mask], torch.zeros_like(params[name][~mask]))
    assert mask_optimizer_state(opt, model, masks) == 4  # exp_avg and exp_avg_sq of both weights; not `step`
    for name, mask in masks.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert not opt.state[params[name]][key][~mask].any()


def test_apply_masks_keeps_parameters_and_state_dict_keys_unlike_torch_prune():
    model = small_net()
    keys, weight = list(model.state_dict()), model[0].weight
    masks = magnitude_masks(model, 0.2)
    with torch.no_grad():
        model[0].weight[~masks["0.weight"]] = math.nan  # NaN at pruned positions is cleared too
    apply_masks(model, masks)
    assert list(model.state_dict()) == keys and model[0].weight is weight
    assert int((model[0].weight == 0).sum()) == int((~masks["0.weight"]).sum())
    reference = copy.deepcopy(small_net())
    prune.l1_unstructured(reference[0], "weight", amount=0.2)
    assert "0.weight_orig" in reference.state_dict()  # what the plain masks avoid


# ------------------------------------------------------------------------------------------------------------
# Reports, closed forms, checkpoints.


def test_sparsity_report_by_hand():
    report = sparsity_report({"a": B([True, False], [False, False]), "b": B(True, True, True, False)})
    assert report.remaining == 4 and report.total == 8 and report.remaining_fraction == 0.5
    assert report.layer_remaining_fraction == {"a": 0.25, "b": 0.75}
    assert report.layer_remaining == {"a": 1, "b": 3} and report.layer_total == {"a": 4, "b": 4}


def test_remaining_fraction_after_closed_form():
    assert remaining_fraction_after(0, 0.2) == 1.0
    assert remaining_fraction_after(3, 0.2) == pytest.approx(0.512, rel=1e-12)
    assert remaining_fraction_after(9, 0.2) == pytest.approx(0.134217728, rel=1e-12)  # open_lth's ~13%


def test_masks_round_trip_through_a_checkpoint():
    model = LeNet()
    masks = magnitude_masks(model, 0.3)
    buffer = io.BytesIO()
    torch.save({"masks": masks_to_state(masks)}, buffer)
    buffer.seek(0)
    loaded = masks_from_state(torch.load(buffer, weights_only=True)["masks"], model)
    assert list(loaded) == list(masks) and all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(ValueError, match="`state\\['features.0.weight'\\]` has shape"):
        masks_from_state({"features.0.weight": torch.ones(3, dtype=torch.bool)}, model)
    with pytest.raises(ValueError, match="`state` has 'fc.weight'"):
        masks_from_state({"fc.weight": torch.ones(3, dtype=torch.bool)}, model)


# ------------------------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.2, 1.5, math.nan, True, "0.2", None])
def test_bad_fraction_raises_naming_it(fraction):
    with pytest.raises(ValueError, match="`fraction`"):
        magnitude_masks({"w": T(1.0, 2.0)}, fraction)
    with pytest.raises(ValueError, match="`fraction`"):
        remaining_fraction_after(2, fraction)
    with pytest.raises(ValueError, match="`fraction`"):
        remaining_counts(10, 2, fraction)


def test_bad_arguments_raise_naming_them():
    weights = {"w": T(1.0, 2.0, 3.0)}
    with pytest.raises(ValueError, match="`scope`"):
        magnitude_masks(weights, 0.2, scope="local")
    with pytest.raises(ValueError, match="`model`"):
        magnitude_masks({}, 0.2)
    with pytest.raises(ValueError, match="`model\\['w'\\]`"):
        magnitude_masks({"w": torch.ones(3, dtype=torch.long)}, 0.2)
    with pytest.raises(ValueError, match="`model` has NaN.*'w'"):
        magnitude_masks({"w": T(1.0, math.inf, 3.0)}, 0.2)
    with pytest.raises(ValueError, match="`current_masks`.*missing \\['w'\\], unexpected \\['v'\\]"):
        magnitude_masks(weights, 0.2, current_masks={"v": B(True, True, True)})
    with pytest.raises(ValueError, match="`current_masks\\['w'\\]` has shape"):
        magnitude_masks(weights, 0.2, current_masks={"w": B(True, True)})
    with pytest.raises(ValueError, match="`current_masks\\['w'\\]` must be a bool tensor"):
        magnitude_masks(weights, 0.2, current_masks={"w": torch.ones(3)})
    with pytest.raises(ValueError, match="`generator`"):
        random_masks_like({"w": B(True)}, 0)
    with pytest.raises(ValueError, match="`levels`"):
        remaining_fraction_after(-1, 0.2)
    with pytest.raises(ValueError, match="`total`"):
        remaining_counts(-5, 1, 0.2)
    model = small_net()
    with pytest.raises(ValueError, match="`masks` has 'fc.weight'"):
        apply_masks(model, {"fc.weight": B(True)})
    with pytest.raises(ValueError, match="`masks\\['0.weight'\\]` has shape"):
        mask_gradients(model, {"0.weight": B(True)})
    with pytest.raises(ValueError, match="`optimizer`"):
        mask_optimizer_state(None, model, {})
    with pytest.raises(ValueError, match="`masks`"):
        sparsity_report([B(True)])


def test_mask_enforcer_equals_apply_masks_through_sgd_steps():
    """The fused enforcer and apply_masks give equal weights after every step; kept entries bit for bit."""
    torch.manual_seed(0)
    model = LeNet()
    twin = copy.deepcopy(model)
    masks = magnitude_masks(model, 0.6)
    enforce = MaskEnforcer(model, masks)
    inputs, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2) for m in (model, twin)
    ]
    for _ in range(3):
        for net, optimizer in zip((model, twin), optimizers):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(inputs), labels).backward()
            optimizer.step()
        enforce()
        apply_masks(twin, masks)
        params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
        for name, param in params.items():
            assert torch.equal(param, twin_params[name]), name  # -0.0 == 0.0
            if name in masks:
                assert int((param[~masks[name]] != 0).sum()) == 0
                assert torch.equal(
                    param[masks[name]].view(torch.int32), twin_params[name][masks[name]].view(torch.int32)
                )


def test_mask_enforcer_leaves_positive_zero_and_every_kept_bit_pattern():
    """After the multiply, pruned negative weights would be -0.0; the enforcer leaves +0.0, as apply_masks."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    mask = torch.rand(32, 64) < 0.5
    assert int((layer.weight[~mask] < 0).sum()) > 100  # negative pruned weights: the multiply gives -0.0
    before = layer.weight.detach().clone()
    MaskEnforcer(layer, {"weight": mask})()
    bits = layer.weight.detach().view(torch.int32)
    assert torch.equal(bits[~mask], torch.zeros_like(bits[~mask]))  # +0.0: all bits zero, no sign bit
    assert torch.equal(bits[mask], before.view(torch.int32)[mask])  # kept entries bit for bit
    twin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        twin.weight.copy_(before)
    apply_masks(twin, {"weight": mask})
    assert torch.equal(twin.weight.detach().view(torch.int32), bits)  # the same bits as apply_masks


def test_mask_enforcer_masks_gradients_as_mask_gradients():
    torch.manual_seed(0)
    model = LeNet()
    twin = copy.deepcopy(model)
    masks = magnitude_masks(model, 0.6)
    inputs, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for net in (model, twin):
        nn.functional.cross_entropy(net(inputs), labels).backward()
    MaskEnforcer(model, masks).mask_gradients()
    mask_gradients(twin, masks)
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, twin_params[name].grad), name  # -0.0 == 0.0
        if name in masks:
            assert (
                int((param.grad[~masks[name]] != 0).sum()) == 0
                and int((param.grad[masks[name]] != 0).sum()) > 0
            )
