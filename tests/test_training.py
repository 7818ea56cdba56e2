"""lt_theory.training and lt_theory.compat: RNG states, state fingerprints, ticket files, Lightning internals.

The capture and restore of a whole training state and the child runs are tested end to end by the IMPPruner
rewind tests (bit-identical weights, buffers, learning rate and scheduler state after each rewind) and the
LinearModeConnectivity sibling tests (a sibling with the parent's seed ends bit-identical to the parent).
"""

from __future__ import annotations

import io
import math
import random
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.fabric.utilities.seed import _collect_rng_states
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lt_theory.compat import cluster_environment, ddp_options, hpc_checkpoint_path, uses_distributed_sampler
from lt_theory.models import MLP
from lt_theory.training import rng_states, set_rng_states, state_fingerprint
from lt_theory.training.child import child_trainer_arguments
from lt_theory.training.state import load_beside_checkpoints, save_beside_checkpoints
from lt_theory.training.stored import changed_settings, partial_file, read_json, write_json
from lt_theory.training.tickets import load_ticket, read_ticket, save_ticket


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


@pytest.mark.parametrize("collect", [rng_states, _collect_rng_states], ids=["ours", "lightning"])
def test_rng_states_restore_every_generator(collect):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    states = collect(include_cuda=True)
    first = _draws()
    assert _draws() != first
    set_rng_states(states)  # also a state Lightning wrote into an older snapshot
    assert _draws() == first


def test_rng_states_load_back_with_weights_only():
    """A checkpoint holding them (a snapshot, or the one taken before it) loads as ``fit(ckpt_path=None)`` loads
    a requeued job's checkpoint."""
    np.random.seed(5)
    buffer = io.BytesIO()
    torch.save({"states": rng_states(include_cuda=True)}, buffer)
    first = _draws()
    buffer.seek(0)
    set_rng_states(torch.load(buffer, weights_only=True)["states"])
    assert _draws() == first


def test_state_fingerprint_sees_one_bit():
    state = MLP((4,), hidden=(8,), num_classes=3).state_dict()
    copy = {key: value.clone() for key, value in state.items()}
    assert state_fingerprint(copy) == state_fingerprint(state)
    key = next(iter(copy))
    copy[key].view(-1).view(torch.int32)[0] ^= 1  # the lowest bit of one float
    assert state_fingerprint(copy) != state_fingerprint(state)


def test_ddp_options_read_what_the_strategy_was_built_with():
    strategy = DDPStrategy(timeout=timedelta(seconds=77), start_method="spawn", find_unused_parameters=True)
    options = ddp_options(strategy)
    assert options.start_method == "spawn"
    assert options.timeout == timedelta(seconds=77)
    assert options.ddp_kwargs == {"find_unused_parameters": True}


@pytest.mark.parametrize("flag", [True, False])
def test_uses_distributed_sampler_reads_the_trainer_flag(flag):
    trainer = Trainer(accelerator="cpu", use_distributed_sampler=flag, logger=False, enable_checkpointing=False)
    assert uses_distributed_sampler(trainer) is flag


def test_cluster_environment_is_the_one_the_signal_handlers_read(monkeypatch):
    given = LightningEnvironment()
    trainer = Trainer(accelerator="cpu", plugins=[given], logger=False, enable_checkpointing=False)
    assert cluster_environment(trainer) is given
    for name, value in dict(SLURM_NTASKS="1", SLURM_JOB_NAME="lt", SLURM_PROCID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NODEID", "0")
    detected = cluster_environment(Trainer(accelerator="cpu", logger=False, enable_checkpointing=False))
    assert isinstance(detected, SLURMEnvironment) and detected.auto_requeue


def test_hpc_checkpoint_path_is_the_next_number_lightning_resumes_from(tmp_path):
    trainer = Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    assert hpc_checkpoint_path(trainer) == str(tmp_path / "hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"")
    assert hpc_checkpoint_path(trainer) == str(tmp_path / "hpc_ckpt_4.ckpt")


class _NotATensor:
    pass


def _ticket(model) -> dict:
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.ndim > 1}
    return {"level": 0, "masks": masks, "start_state": model.state_dict(), "control": None, "history": []}


def test_a_ticket_round_trips_and_bad_files_are_refused_naming_them(tmp_path):
    model = MLP((4,), hidden=(8,), num_classes=3)
    good = tmp_path / "ticket_level00.pt"
    save_ticket(good, _ticket(model))
    other = MLP((4,), hidden=(8,), num_classes=3)
    masks = load_ticket(good, other)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    assert set(masks) == {"net.1.weight", "net.3.weight"} and all(bool(m.all()) for m in masks.values())

    with_code = tmp_path / "with_object.pt"
    torch.save({**_ticket(model), "extra": _NotATensor()}, with_code)  # unpickling it would build the object
    with pytest.raises(ValueError, match="with_object.pt"):
        read_ticket(with_code)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.pt"):
        read_ticket(truncated)
    not_a_ticket = tmp_path / "weights.pt"
    torch.save(model.state_dict(), not_a_ticket)
    with pytest.raises(ValueError, match="not a ticket"):
        read_ticket(not_a_ticket)
    with pytest.raises(ValueError, match="no ticket file"):
        read_ticket(tmp_path / "missing.pt")


def test_changed_settings_compare_what_json_keeps_and_name_every_difference():
    assert changed_settings({"alphas": (0, 1), "seed": 0}, {"alphas": [0, 1], "seed": 0}) == []
    assert changed_settings({"seed": 0, "bn": "reset"}, {"seed": 1, "bn": "reset", "splits": None}) == [
        "seed",
        "splits",
    ]


def test_stored_json_round_trips_nan_and_a_damaged_file_is_named(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"barrier": math.nan, "settings": {"seed": 0}})
    stored = read_json(path)
    assert math.isnan(stored["barrier"]) and stored["settings"] == {"seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # the partial file renamed into place
    path.write_text('{"barrier": 0.1, "sett')  # truncated by a crash or another writer
    with pytest.raises(ValueError, match="result.json"):
        read_json(path)


def test_two_writers_of_one_file_never_share_a_partial_file(tmp_path):
    """Two jobs writing the same file (a resubmitted array task next to its first run): each writes its own
    partial file, so the one renamed into place is always one writer's whole file."""
    path = tmp_path / "weights.pt"
    first, second = partial_file(path), partial_file(path)
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith("weights.pt.") and first.suffix == ".partial"


def test_a_file_beside_the_checkpoints_is_loaded_only_if_it_is_the_one_the_checkpoint_names(tmp_path):
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    trainer = SimpleNamespace(
        checkpoint_callbacks=[ModelCheckpoint(dirpath=tmp_path)], is_global_zero=True, strategy=strategy
    )
    state = {"step": 3, "model": {"w": torch.arange(4.0)}}
    record = save_beside_checkpoints(trainer, state, "snapshot.pt")
    assert record["path"] == str(tmp_path / "snapshot.pt")
    loaded = load_beside_checkpoints(record, "the snapshot")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    torch.save({"step": 4, "model": {"w": torch.zeros(4)}}, tmp_path / "snapshot.pt")  # another run's
    with pytest.raises(ValueError, match="wrote over it"):
        load_beside_checkpoints(record, "the snapshot")
    (tmp_path / "snapshot.pt").unlink()
    with pytest.raises(ValueError, match="the snapshot .*snapshot.pt.* is missing"):
        load_beside_checkpoints(record, "the snapshot")
    without = SimpleNamespace(checkpoint_callbacks=[], is_global_zero=True, strategy=strategy)
    assert save_beside_checkpoints(without, state, "snapshot.pt") is None


def test_ddp_options_a_deferred_task_cannot_be_given_are_refused_naming_them():
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=DDPStrategy(bucket_cap_mb=25, comm_state=object()), logger=False
    )
    with pytest.raises(ValueError, match=r"DDP options \['bucket_cap_mb', 'comm_state'\] cannot be written"):
        child_trainer_arguments(trainer)
    plain = Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(bucket_cap_mb=25), logger=False)
    assert child_trainer_arguments(plain)["ddp"]["ddp_kwargs"] == {"bucket_cap_mb": 25}
