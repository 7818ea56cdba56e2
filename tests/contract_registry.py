"""The registry of every callback the contract suite checks, each with a small configuration.

A callback issue registers its callback here with: a factory for a cheap configuration, the tag prefix it
logs under, bad constructor arguments with the argument name the ValueError must mention, and whether it
is a monitor (training must stay bit-identical) or changes training on purpose.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from contract_monitor import ParameterNormMonitor
from lightning.pytorch import Callback

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.callbacks.imp import IMPPruner
from lt_theory.callbacks.landscape import LossLandscapeMonitor
from lt_theory.callbacks.lmc import LinearModeConnectivity
from lt_theory.callbacks.ntk import NTKDrift
from lt_theory.callbacks.spectral import SpectralNormMonitor

# one directory per session, shared with the DDP processes (which inherit the environment)
_LMC_DIRECTORY = os.environ.setdefault(
    "LT_THEORY_LMC_CONTRACT_DIR", tempfile.mkdtemp(prefix="lt_theory_lmc_")
)


@dataclass(frozen=True)
class ContractCase:
    name: str
    make_callback: Callable[[], Callback]
    prefix: str
    bad_arguments: list[tuple[Callable[[], Callback], str]] = field(default_factory=list)
    monitor: bool = True


REGISTRY: list[ContractCase] = [
    ContractCase(
        name="parameter_norm_test_monitor",
        make_callback=lambda: ParameterNormMonitor(every_n_steps=2),
        prefix="testmon",
        bad_arguments=[
            (lambda: ParameterNormMonitor(every_n_steps=0), "every_n_steps"),
            (lambda: ParameterNormMonitor(every_n_steps=1.5), "every_n_steps"),
        ],
    ),
    ContractCase(
        name="ntk_drift",
        make_callback=lambda: NTKDrift(every_n_steps=3, probe_size=4),
        prefix="ntk",
        bad_arguments=[
            (lambda: NTKDrift(every_n_steps=0), "every_n_steps"),
            (lambda: NTKDrift(kind="diagonal"), "kind"),
            (lambda: NTKDrift(probe_size=-1), "probe_size"),
            (lambda: NTKDrift(probe_split="holdout"), "probe_split"),
            (lambda: NTKDrift(lazy_threshold=0), "lazy_threshold"),
        ],
    ),
    ContractCase(
        name="spectral_norm_monitor",
        make_callback=lambda: SpectralNormMonitor(every_n_steps=2, bound_every_n_steps=3, probe_size=8),
        prefix="spectral",
        bad_arguments=[
            (lambda: SpectralNormMonitor(every_n_steps=0), "every_n_steps"),
            (lambda: SpectralNormMonitor(bound_every_n_steps=-5), "bound_every_n_steps"),
            (lambda: SpectralNormMonitor(power_iterations=0), "power_iterations"),
            (lambda: SpectralNormMonitor(layers="net.fc"), "layers"),
            (lambda: SpectralNormMonitor(probe_split="all"), "probe_split"),
        ],
    ),
    ContractCase(
        name="loss_landscape_monitor",
        make_callback=lambda: LossLandscapeMonitor(every_n_steps=2, probe_size=8, sharpness_iters=5),
        prefix="landscape",
        bad_arguments=[
            (lambda: LossLandscapeMonitor(every_n_steps=0), "every_n_steps"),
            (lambda: LossLandscapeMonitor(loss_star=math.nan), "loss_star"),
            (lambda: LossLandscapeMonitor(loss_fn="cross_entropy"), "loss_fn"),
            (lambda: LossLandscapeMonitor(sharpness_iters=0), "sharpness_iters"),
            (lambda: LossLandscapeMonitor(sharpness_tol=-1.0), "sharpness_tol"),
            (lambda: LossLandscapeMonitor(layers="net.fc"), "layers"),
            (lambda: LossLandscapeMonitor(condition_floor=1.0), "condition_floor"),
            (lambda: LossLandscapeMonitor(probe_split="all"), "probe_split"),
            (lambda: LossLandscapeMonitor(bn_statistics="train"), "bn_statistics"),
        ],
    ),
    ContractCase(
        name="double_descent_probe",
        make_callback=lambda: DoubleDescentProbe(every_n_epochs=1, train_subset_size=48, eval_batch_size=20),
        prefix="dd",
        bad_arguments=[
            (lambda: DoubleDescentProbe(every_n_epochs=0), "every_n_epochs"),
            (lambda: DoubleDescentProbe(train_subset_size=-3), "train_subset_size"),
            (lambda: DoubleDescentProbe(eval_batch_size=0), "eval_batch_size"),
            (lambda: DoubleDescentProbe(interpolation_epsilon=1.5), "interpolation_epsilon"),
        ],
    ),
    ContractCase(
        # the parent run is a monitored run: bit-identical with or without the callback. One snapshot directory
        # for the session, so that a resumed run finds the snapshots (and the state holds the same paths)
        name="linear_mode_connectivity",
        make_callback=lambda: LinearModeConnectivity(
            spawn_steps=[2], num_alphas=3, train_subset_size=32, eval_batch_size=16, directory=_LMC_DIRECTORY
        ),
        prefix="lmc",
        bad_arguments=[
            (lambda: LinearModeConnectivity(spawn_steps=[-1]), "spawn_steps"),
            (lambda: LinearModeConnectivity(spawn_steps=[3, 3]), "spawn_steps"),
            (lambda: LinearModeConnectivity(mode="both"), "mode"),
            (lambda: LinearModeConnectivity(bn="swap"), "bn"),
            (lambda: LinearModeConnectivity(num_alphas=1), "num_alphas"),
        ],
    ),
    ContractCase(
        name="imp_pruner",
        # levels end at steps 4, 7, 10 of the 12-step run; the half run stops in the middle of level 1
        make_callback=lambda: IMPPruner(levels=2, fraction=0.5, rewind_step=1, steps_per_level=4),
        prefix="imp",
        bad_arguments=[
            (lambda: IMPPruner(levels=2, fraction=1.0, steps_per_level=4), "fraction"),
            (lambda: IMPPruner(levels=0, steps_per_level=4), "levels"),
            (lambda: IMPPruner(levels=2, rewind_step=4, steps_per_level=4), "rewind_step"),
            (lambda: IMPPruner(levels=2), "steps_per_level"),
        ],
        monitor=False,
    ),
]

CASES = {case.name: case for case in REGISTRY}
