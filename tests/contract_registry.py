"""The registry of every callback the contract suite checks, each with a small configuration.

A callback issue registers its callback here with: a factory for a cheap configuration, the tag prefix it
logs under, bad constructor arguments with the argument name the ValueError must mention, and whether it
is a monitor (training must stay bit-identical) or changes training on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from contract_monitor import ParameterNormMonitor
from lightning.pytorch import Callback


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
]

CASES = {case.name: case for case in REGISTRY}
