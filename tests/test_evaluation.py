"""The one evaluation (lt_theory.measures.evaluation) against plain float64 loops, and its rule for a diverged
network shared by every callback that evaluates: IMPPruner, DoubleDescentProbe and LinearModeConnectivity
give the same error for the same diverged network."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from contract_setup import STEPS_PER_EPOCH, make_module_and_data, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.callbacks.imp import IMPPruner
from lt_theory.callbacks.lmc import LinearModeConnectivity
from lt_theory.measures.evaluation import evaluate, loss_and_error_of_outputs, predicted_classes
from lt_theory.measures.interpolation import loss_and_error
from lt_theory.measures.risk import evaluate_classifier


class NaNWhereFirstFeatureIsPositive(nn.Module):
    """A linear classifier whose outputs are NaN (or +Inf) on the rows whose first input is positive."""

    def __init__(self, fill: float = math.nan) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.fill = fill

    def forward(self, x):
        out = self.linear(x)
        return torch.where((x[:, :1] > 0), torch.full_like(out, self.fill), out)


def reference(model: nn.Module, batches, squared: bool = False) -> tuple[float, float]:
    """Mean loss and error, one example at a time, in float64: a non-finite row is wrong."""
    losses, wrong, count = [], 0, 0
    with torch.no_grad():
        for inputs, labels in batches:
            for x, y in zip(inputs, labels):
                out = model(x[None]).double()[0]
                if squared:
                    losses.append(float(((out - F.one_hot(y, out.numel()).double()) ** 2).sum()))
                else:
                    losses.append(float(torch.logsumexp(out, 0) - out[y]))
                finite = bool(torch.isfinite(out).all())
                wrong += int(not finite or int(out.argmax()) != int(y))
                count += 1
    return sum(losses) / count, wrong / count


def batches(seed: int = 0, sizes=(7, 5, 9)):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=generator), torch.randint(0, 4, (n,), generator=generator)) for n in sizes]


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_finite_outputs_match_a_float64_loop(loss):
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    data = batches()
    result = evaluate(model, data, loss=loss)
    expected_loss, expected_error = reference(model, data, squared=loss == "mse")
    assert result.num_examples == 21
    assert result.error == expected_error
    assert result.loss == pytest.approx(expected_loss, rel=1e-6, abs=0)


@pytest.mark.parametrize("fill", [math.nan, math.inf])
def test_a_non_finite_row_counts_as_wrong_and_makes_the_loss_non_finite(fill):
    torch.manual_seed(1)
    model = NaNWhereFirstFeatureIsPositive(fill)
    data = batches(seed=3)
    result = evaluate(model, data, keep_outputs=True)
    _, expected_error = reference(model, data)
    non_finite = sum(int((x[:, 0] > 0).sum()) for x, _ in data)
    assert 0 < non_finite < 21  # some rows of each kind
    assert result.error == expected_error
    assert not math.isfinite(result.loss)
    assert torch.equal(predicted_classes(result.outputs) == -1, torch.cat([x[:, 0] > 0 for x, _ in data]))
    # every way in: the same error
    assert loss_and_error(model, data).error == expected_error
    assert evaluate_classifier(model, data).error == expected_error
    assert loss_and_error_of_outputs(result.outputs, result.labels)[1] == expected_error


def test_outputs_already_computed_give_the_evaluations_numbers():
    torch.manual_seed(2)
    model = nn.Linear(5, 4)
    result = evaluate(model, batches(seed=4), keep_outputs=True)
    loss, error = loss_and_error_of_outputs(result.outputs, result.labels)
    assert error == result.error
    assert loss == pytest.approx(result.loss, rel=1e-12, abs=0)


class DivergeAtStep(Callback):
    """Puts NaN into the classifier's bias after optimizer step ``step``, before the other callbacks measure."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            linear = [m for m in pl_module.modules() if isinstance(m, nn.Linear)][-1]
            with torch.no_grad():
                linear.bias.fill_(math.nan)


def test_the_same_diverged_network_has_the_same_error_in_every_callback(tmp_path):
    module, data = make_module_and_data()
    pruner = IMPPruner(levels=1, fraction=0.5, epochs_per_level=1, eval_split="test")
    probe = DoubleDescentProbe(every_n_epochs=1, train_subset_size=32)
    lmc = LinearModeConnectivity(mode="init", every_n_epochs=1, num_alphas=2, train_subset_size=32)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(
        tmp_path, callbacks=[DivergeAtStep(STEPS_PER_EPOCH), pruner, probe, lmc], logger=logger, max_epochs=1
    )
    with pytest.warns(UserWarning):
        trainer.fit(module, datamodule=data)
    logger.save()
    rows = {}
    for row in csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")):
        rows.update({key: value for key, value in row.items() if value != ""})
    # every test row of the diverged network is NaN, so every callback sees an error of exactly 1
    assert pruner.stopped is not None and float(rows["imp/diverged_level"]) == 0.0
    assert float(rows["imp/accuracy"]) == 0.0
    assert float(rows["dd/test_error"]) == 1.0
    assert lmc.history[-1]["test_error"][-1] == 1.0  # the path's end: the network itself
    assert math.isnan(float(rows["imp/loss"])) and math.isnan(float(rows["dd/test_loss"]))
