"""The contract of docs/design.md, checked for every callback in the registry.

(a) a monitor leaves training bit-identical; (b) checkpoint + resume with a fresh instance restores its state;
(c) strategy="ddp" on 2 CPU processes finishes and only rank zero writes; (d) bad constructor arguments raise
ValueError naming the argument; (e) with only a CSVLogger, and with logger=False, one warning and no crash.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from contract_registry import REGISTRY
from contract_setup import make_module_and_data, make_trainer
from lightning.pytorch.loggers import CSVLogger

CASES = pytest.mark.parametrize("case", REGISTRY, ids=[case.name for case in REGISTRY])


def _fit(tmp_path, callbacks, **trainer_args):
    module, data = make_module_and_data()
    trainer = make_trainer(tmp_path, callbacks, **trainer_args)
    trainer.fit(module, datamodule=data)
    return module, trainer


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _assert_same_state(a, b, path="state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: {len(a)} entries != {len(b)} (a second baseline or lost history)"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference_parameters(tmp_path_factory) -> dict:
    """Final parameters and buffers of the tiny run without any callback."""
    module, _ = _fit(tmp_path_factory.mktemp("reference"), [])
    return module.state_dict()


_MONITORED_RUNS: dict[str, SimpleNamespace] = {}


def _monitored_run(case, tmp_path_factory) -> SimpleNamespace:
    """The tiny run with the callback and only a CSVLogger, done once per case and shared by three checks."""
    if case.name not in _MONITORED_RUNS:
        root = tmp_path_factory.mktemp(case.name)
        callback = case.make_callback()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module, _ = _fit(root, [callback], logger=CSVLogger(root / "logs", name="csv"))
        _MONITORED_RUNS[case.name] = SimpleNamespace(
            parameters=module.state_dict(),
            state=callback.state_dict(),
            warnings=_our_warnings(caught, callback),
            csv_header=next(
                csv.reader(open(next((root / "logs" / "csv").glob("version_*")) / "metrics.csv"))
            ),
        )
    return _MONITORED_RUNS[case.name]


@CASES
def test_monitor_leaves_training_bit_identical(case, reference_parameters, tmp_path_factory):
    if not case.monitor:
        pytest.skip(f"{case.name} changes training on purpose")
    _assert_same_tensors(reference_parameters, _monitored_run(case, tmp_path_factory).parameters)


@CASES
def test_resume_from_checkpoint_restores_state(case, tmp_path, tmp_path_factory):
    uninterrupted = _monitored_run(case, tmp_path_factory)

    first_half = case.make_callback()
    _, trainer = _fit(tmp_path / "half", [first_half], max_epochs=1)
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = case.make_callback()
    module, data = make_module_and_data()
    make_trainer(tmp_path / "resumed", [resumed], max_epochs=2).fit(
        module, datamodule=data, ckpt_path=checkpoint
    )

    _assert_same_tensors(uninterrupted.parameters, module.state_dict())
    _assert_same_state(uninterrupted.state, resumed.state_dict())


def test_ddp_two_processes_only_rank_zero_writes(tmp_path):
    """One DDP launch runs every registered callback together (a launch costs seconds, not the callbacks)."""
    script = Path(__file__).with_name("ddp_contract_run.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = {r["rank"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("rank*.json"))}
    assert set(reports) == {0, 1}
    assert reports[1]["emitted_writes"] == 0
    assert reports[0]["emitted_writes"] > 0
    versions = list((tmp_path / "logs" / "ddp").iterdir())
    assert len(versions) == 1, versions
    rows = list(csv.DictReader(open(versions[0] / "metrics.csv")))
    for case in REGISTRY:
        tagged = [row for row in rows if any(k.startswith(case.prefix + "/") and row[k] for k in row)]
        steps = [row["step"] for row in tagged]
        assert tagged, f"{case.name} logged nothing under DDP"
        assert len(steps) == len(set(steps)), f"{case.name} logged a step twice: {steps}"


@CASES
def test_bad_arguments_raise_value_error_naming_them(case):
    assert case.bad_arguments, f"{case.name} registers no bad arguments"
    for construct, argument in case.bad_arguments:
        with pytest.raises(ValueError, match=argument):
            construct()


def _our_warnings(caught, callback) -> list[str]:
    name = type(callback).__name__
    return [str(w.message) for w in caught if str(w.message).startswith(name)]


@CASES
def test_csv_logger_only_warns_once_and_logs_tags_under_prefix(case, tmp_path_factory):
    run = _monitored_run(case, tmp_path_factory)
    assert len(run.warnings) == 1 and "TensorBoardLogger" in run.warnings[0], run.warnings
    ours = [tag for tag in run.csv_header if tag.startswith(case.prefix + "/")]
    assert ours, f"no `{case.prefix}/` tag in {run.csv_header}"


@CASES
def test_no_logger_warns_once_and_does_not_crash(case, tmp_path):
    callback = case.make_callback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [callback], logger=False)
    messages = _our_warnings(caught, callback)
    assert len(messages) == 1 and "no logger" in messages[0], messages
