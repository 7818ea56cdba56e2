"""Progress of the siblings and of the path evaluation: what a user sees, on rank zero only.

References: the points :func:`~lt_theory.measures.interpolation.linear_paths` returns (the progress hook must
count exactly them, the coarse ones first); the lines and bars an in-job LinearModeConnectivity run writes to
the ``lt_theory`` logger and to stderr (``sibling i of n (k = K)``, ``path k=K: alpha j of m``); nothing at all
with Lightning's rank set to 1.
"""

from __future__ import annotations

import logging

import pytest
import torch
from contract_setup import STEPS_PER_EPOCH, make_module_and_data, make_trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lt_theory.callbacks import IMPPruner, LinearModeConnectivity
from lt_theory.measures.interpolation import linear_paths
from lt_theory.models import MLP
from lt_theory.training.progress import PathProgress, SiblingsProgress

FINAL_STEP = 2 * STEPS_PER_EPOCH


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    handler = _Lines()
    logger = logging.getLogger("lt_theory")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def rank_one(monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)


def test_linear_paths_calls_the_hook_once_per_alpha_evaluated_coarse_points_first():
    torch.manual_seed(0)
    a, b = MLP((4,), hidden=(8,), num_classes=3), MLP((4,), hidden=(8,), num_classes=3)
    data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    calls = []
    paths = linear_paths(a, b, {"train": data}, alphas=9, coarse_every=4, progress=lambda j, m: calls.append((j, m)))
    evaluated = len(paths["train"].alphas)
    assert [j for j, _ in calls] == list(range(1, evaluated + 1))
    assert calls[:3] == [(1, 3), (2, 3), (3, 3)]  # the coarse grid: alphas 0, 4/8, 8/8
    assert calls[-1] == (evaluated, evaluated) and evaluated > 3  # then the refinement around the maxima
    whole = linear_paths(a, b, {"train": data}, alphas=9, coarse_every=4)
    assert torch.equal(whole["train"].error, paths["train"].error)  # the hook changes nothing


def test_path_progress_shows_alpha_j_of_m_as_lines_or_a_bar(lines, capsys):
    hook = PathProgress("path k=6", bars=False)
    for j in (1, 2, 3):
        hook(j, 3)
    hook.close()
    assert lines[:3] == ["path k=6: alpha 1 of 3", "path k=6: alpha 2 of 3", "path k=6: alpha 3 of 3"]
    assert lines[3].startswith("path k=6: 3 alphas evaluated in ")
    bar = PathProgress("path k=0", bars=True)
    bar(1, 2), bar(2, 2), bar(3, 4)
    bar.close()
    assert "path k=0: alpha 3 of 4" in capsys.readouterr().err


def test_progress_is_silent_on_other_ranks(lines, capsys, rank_one):
    hook = PathProgress("path k=6", bars=True)
    hook(1, 3)
    hook.close()
    siblings = SiblingsProgress({0: 12, 6: 6}, bars=True)
    siblings.skipped(0, "trained already")
    siblings.callback(6, 6, 12)
    assert lines == [] and capsys.readouterr().err == ""


def test_in_job_siblings_and_paths_show_their_progress_on_rank_zero(tmp_path, lines, capfd):
    module, data = make_module_and_data()
    lmc = LinearModeConnectivity(
        spawn_steps=[0, STEPS_PER_EPOCH], num_alphas=5, train_subset_size=16, directory=tmp_path / "lmc"
    )
    make_trainer(tmp_path, [lmc], enable_progress_bar=True).fit(module, datamodule=data)
    assert "sibling 1 of 2 (k = 0): training steps 0 to 12; " in lines[0]
    assert any(line.startswith("sibling 2 of 2 (k = 6): trained in ") and "elapsed" in line for line in lines)
    assert any(line.startswith("path k=6: ") and "alphas evaluated" in line for line in lines)
    assert not any("trained already" in line for line in lines)  # both were trained in this fit
    err = capfd.readouterr().err
    assert "sibling 2 of 2 (k = 6)" in err and "/6 [" in err  # the bar over the sibling's 6 steps, with its ETA
    assert "path k=0: alpha 1 of " in err
    lines.clear()
    make_trainer(tmp_path, [lmc], enable_progress_bar=False).fit(*make_module_and_data())  # a second fit
    assert any("sibling 1 of 2 (k = 0): trained already" in line for line in lines)  # stored results reused


def test_imp_level_siblings_show_their_progress(tmp_path, lines):
    pruner = IMPPruner(
        levels=1, fraction=0.5, rewind_step=2, steps_per_level=6, stability=True, num_alphas=3,
        train_subset_size=16, ticket_dir=tmp_path / "imp",
    )  # fmt: skip
    make_trainer(tmp_path, [pruner], max_epochs=-1).fit(*make_module_and_data())
    assert any(line.startswith("sibling 1 of 2 (level = 0): training steps 2 to 6; ") for line in lines)
    assert any(line.startswith("sibling 2 of 2 (level = 1): trained in ") for line in lines)
    assert any(line.startswith("path of level 1: ") for line in lines)
