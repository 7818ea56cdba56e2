"""The measurement contexts: every submodule's own training flag comes back, even after an error, and draws
inside a forked generator leave training's generator where it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lt_theory.measures.modes import eval_mode, forked_rng


def _mixed_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    model[1].eval()  # a frozen BatchNorm inside a training model: model.train() would not restore it
    return model


def test_eval_mode_restores_each_submodules_own_flag():
    model = _mixed_model()
    before = [m.training for m in model.modules()]
    with eval_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
        x = torch.randn(5, 3)
        assert torch.equal(model(x), model(x))  # dropout off
    assert [m.training for m in model.modules()] == before == [True, True, False, True, True]


def test_eval_mode_restores_the_flags_when_the_block_raises():
    model = _mixed_model()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before


def test_forked_rng_leaves_the_global_generator_where_it_was():
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    with forked_rng("cpu"):
        torch.rand(1000)
    with forked_rng(None):
        nn.Dropout(0.5).train()(torch.ones(100))
    assert torch.equal(torch.rand(4), expected)
