"""LinearModeConnectivity preempted on SLURM at every moment, against an uninterrupted run.

SLURM is simulated in this process: its environment variables (so Lightning's ``SLURMEnvironment`` with
``auto_requeue`` is detected), a stub ``scontrol`` on ``PATH`` that records its arguments, and the requeue
signal sent with ``os.kill`` to this process, so it goes through whatever handler is installed then (Lightning's
during the parent's fit, ours during the sibling phase; Python runs it inside ``os.kill``). A job is killed as
SLURM kills it, as soon as it is requeued: the stub ``scontrol`` sends SIGUSR2 back, whose handler raises
:class:`_Killed` the moment ``scontrol`` returns, wherever the process is. The requeued job is a fresh module,
data module and Trainer in the same folder with ``fit(ckpt_path=None)``, as the batch script's command would
run again.

References: the uninterrupted run (parent's final weights, sibling's final weights, every number of the
result, all bit-identical), and the number of optimizer steps each requeued job trains (the parent's: none
after a preemption in the sibling phase; the sibling's: ``T - s`` after one during its step ``s``).
"""

from __future__ import annotations

import os
import signal
import stat
import sys

import pytest
import torch
from contract_setup import STEPS_PER_EPOCH, make_module_and_data, make_trainer
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, seed_everything

import lt_theory.callbacks.siblings as siblings_module
import lt_theory.training.child as child_module
import lt_theory.training.preemption as preemption
from lt_theory.callbacks import LinearModeConnectivity
from lt_theory.compat import cluster_environment
from lt_theory.module import ClassificationModule
from lt_theory.training.preemption import requeue_job, save_checkpoint_atomically

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SLURM's requeue signal is SIGUSR1 (POSIX)")

FINAL_STEP = 2 * STEPS_PER_EPOCH
SPAWN = 3
JOB_ID = "4242"


class _Killed(BaseException):
    """The job killed by SLURM: not an error a sibling's failure handling may catch."""


class _Slurm:
    """The simulated cluster: its ``scontrol`` record, the requeue signal, the kill's handler to give back."""

    def __init__(self, record, previous_kill_handler) -> None:
        self.record, self.previous_kill_handler = record, previous_kill_handler

    def restore(self) -> None:
        signal.signal(signal.SIGUSR2, self.previous_kill_handler)

    def requeues(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    @staticmethod
    def preempt() -> None:
        """SIGUSR1 to this process: its handler runs inside ``os.kill``."""
        os.kill(os.getpid(), signal.SIGUSR1)


def _killed(signum, frame) -> None:
    raise _Killed("requeued, so killed")


def _simulate_slurm(patch: pytest.MonkeyPatch, folder) -> _Slurm:
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "scontrol_calls"
    stub = folder / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\nkill -USR2 $PPID\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    patch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    slurm = dict(SLURM_NTASKS="1", SLURM_JOB_NAME="lt", SLURM_JOB_ID=JOB_ID, SLURM_PROCID="0")
    slurm.update(SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost")
    for name, value in slurm.items():
        patch.setenv(name, value)
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES"):
        patch.delenv(name, raising=False)
    return _Slurm(record, signal.signal(signal.SIGUSR2, _killed))


@pytest.fixture
def slurm(monkeypatch, tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    cluster = _simulate_slurm(monkeypatch, tmp_path / "cluster")
    yield cluster
    cluster.restore()
    after = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, before)
    assert after is before, "a handler of the requeue signal was left installed"


class _Steps(Callback):
    """Counts optimizer steps (one per batch: no accumulation here)."""

    def __init__(self, counts: list, key: str) -> None:
        self.counts, self.key = counts, key

    def on_train_batch_end(self, trainer, *args) -> None:
        self.counts.append(self.key)


class _Children:
    """Every child Trainer gets ``extra()``'s callbacks (after the child's own) and is recorded with its parent."""

    def __init__(self, patch: pytest.MonkeyPatch, extra=lambda: []) -> None:
        self.trainers, self.extra = [], extra
        original = child_module._child_trainer

        def with_callbacks(trainer, max_steps, callbacks, root_dir):
            child = original(trainer, max_steps, [*callbacks, *self.extra()], root_dir)
            self.trainers.append((trainer, child))
            return child

        patch.setattr(child_module, "_child_trainer", with_callbacks)


def _lmc(root) -> LinearModeConnectivity:
    return LinearModeConnectivity(
        spawn_steps=[SPAWN], num_alphas=5, train_subset_size=48, eval_batch_size=16, directory=root / "lmc"
    )


def _job(root, callbacks=(), module_and_data=None) -> dict:
    """One job of the batch script: a fresh module and Trainer in ``root``, ``fit(ckpt_path=None)``."""
    module, data = module_and_data() if module_and_data else make_module_and_data()
    lmc, steps = _lmc(root), []
    trainer = make_trainer(root, [lmc, _Steps(steps, "parent"), *callbacks])
    trainer.fit(module, datamodule=data)  # under SLURM, Lightning resumes from the newest hpc_ckpt_<n>.ckpt
    return {"module": module, "trainer": trainer, "lmc": lmc, "steps": steps}


def _sibling_weights(root) -> dict:
    (path,) = (root / "lmc").glob(f"sibling_step={SPAWN}_to={FINAL_STEP}_*.pt")
    return torch.load(path)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _assert_same_run(root, job: dict, reference: dict) -> None:
    """Parent, sibling and every number of the result bit-identical to the uninterrupted run."""
    assert _equal_states(job["module"].state_dict(), reference["parent"])
    assert _equal_states(_sibling_weights(root), reference["sibling"])
    ours = {key: value for key, value in job["lmc"].results[SPAWN].items() if key != "weights"}
    assert ours == reference["result"]
    assert not list(root.rglob("*.partial"))  # every file was renamed into place


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, under SLURM too: nothing requeued, our checkpoint removed, handler given back."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        slurm = _simulate_slurm(patch, root / "cluster")
        children = _Children(patch)
        before = signal.getsignal(signal.SIGUSR1)
        job = _job(root)
        assert signal.getsignal(signal.SIGUSR1) is before
        slurm.restore()
    assert slurm.requeues() == [] and not list(root.rglob("hpc_ckpt_*"))
    assert len(job["steps"]) == FINAL_STEP
    ((parent, child),) = children.trainers
    assert isinstance(cluster_environment(parent), SLURMEnvironment)
    assert cluster_environment(child) is cluster_environment(parent)  # the parent's plugins, not detected anew
    assert type(child.precision_plugin) is type(parent.precision_plugin)
    assert child.precision_plugin is not parent.precision_plugin
    result = {key: value for key, value in job["lmc"].results[SPAWN].items() if key != "weights"}
    return {"parent": job["module"].state_dict(), "sibling": _sibling_weights(root), "result": result}


def _hpc_checkpoints(root) -> list[str]:
    return sorted(path.name for path in root.glob("hpc_ckpt_*"))


# ------------------------------------------------------------------------------------------------------------
# The parent's fit: Lightning's own handler, with our snapshots.


class _SignalAtParentStep(Callback):
    def __init__(self, slurm: _Slurm, step: int) -> None:
        self.slurm, self.step = slurm, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.slurm.preempt()


def test_preempted_while_the_parent_trains_resumes_at_its_step(tmp_path, slurm, reference):
    root = tmp_path / "run"
    with pytest.raises(_Killed):
        _job(root, [_SignalAtParentStep(slurm, 5)])
    assert slurm.requeues() == [f"requeue {JOB_ID}"]
    assert _hpc_checkpoints(root) == ["hpc_ckpt_1.ckpt"]  # Lightning's, at step 5
    job = _job(root)
    assert len(job["steps"]) == FINAL_STEP - 5
    _assert_same_run(root, job, reference)
    assert _hpc_checkpoints(root) == ["hpc_ckpt_1.ckpt"]  # ours of the sibling phase removed at its end


def test_preempted_while_writing_a_snapshot_writes_it_when_resumed(tmp_path, slurm, reference, monkeypatch):
    """Lightning's handler checkpoints step k from inside the snapshot's own save (before k's snapshot is
    recorded): the requeued job starts at k and writes the snapshot then."""
    original, sent = LinearModeConnectivity.on_save_checkpoint, []

    def signal_inside_the_save(self, trainer, pl_module, checkpoint):
        original(self, trainer, pl_module, checkpoint)
        if trainer.global_step == SPAWN and not sent:
            sent.append(True)
            slurm.preempt()  # Lightning's handler saves (this hook again, nested), requeues; then the kill

    monkeypatch.setattr(LinearModeConnectivity, "on_save_checkpoint", signal_inside_the_save)
    root = tmp_path / "run"
    with pytest.raises(_Killed):
        _job(root)
    assert slurm.requeues() == [f"requeue {JOB_ID}"]
    assert not (root / "lmc" / f"snapshot_step={SPAWN}.ckpt").exists()  # killed before it was in place
    monkeypatch.setattr(LinearModeConnectivity, "on_save_checkpoint", original)
    job = _job(root)
    assert len(job["steps"]) == FINAL_STEP - SPAWN
    assert job["lmc"].snapshots == {SPAWN: str(root / "lmc" / f"snapshot_step={SPAWN}.ckpt")}
    _assert_same_run(root, job, reference)


def _dropout_module_and_data():
    seed_everything(0, verbose=False)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 10)
    )
    return ClassificationModule(net, lr=0.05), make_module_and_data()[1]


def test_a_snapshot_written_when_resumed_has_the_rng_states_of_its_step(tmp_path, slurm, monkeypatch):
    """Dropout draws from the global RNG, which a resume does not restore: the sibling (which continues from
    the snapshot's RNG states) is the uninterrupted run's only if the snapshot written by the requeued job
    holds the states of step k, kept in the checkpoint taken before it."""
    reference = _job(tmp_path / "reference", module_and_data=_dropout_module_and_data)
    original, sent = LinearModeConnectivity.on_save_checkpoint, []

    def signal_inside_the_save(self, trainer, pl_module, checkpoint):
        original(self, trainer, pl_module, checkpoint)
        if trainer.global_step == SPAWN and not sent:
            sent.append(True)
            slurm.preempt()

    monkeypatch.setattr(LinearModeConnectivity, "on_save_checkpoint", signal_inside_the_save)
    root = tmp_path / "run"
    with pytest.raises(_Killed):
        _job(root, module_and_data=_dropout_module_and_data)
    monkeypatch.setattr(LinearModeConnectivity, "on_save_checkpoint", original)
    _job(root, module_and_data=_dropout_module_and_data)
    assert _equal_states(_sibling_weights(root), _sibling_weights(tmp_path / "reference"))
    assert len(reference["steps"]) == FINAL_STEP


# ------------------------------------------------------------------------------------------------------------
# The sibling phase: our handler.


class _SignalDuringChildStep(Callback):
    """In the child: the signal while its step ``step`` runs."""

    def __init__(self, slurm: _Slurm, step: int) -> None:
        self.slurm, self.step = slurm, step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step - 1:
            self.slurm.preempt()


def test_preempted_while_the_parents_checkpoint_is_written_requeues_once_it_is_on_disk(
    tmp_path, slurm, reference, monkeypatch
):
    original, sent = preemption.save_checkpoint_atomically, []

    def signal_while_writing(*args, **kwargs):
        if not sent:
            sent.append(True)
            slurm.preempt()  # the guard's handler is installed, the checkpoint not yet written
        original(*args, **kwargs)

    monkeypatch.setattr(preemption, "save_checkpoint_atomically", signal_while_writing)
    sibling_steps = []
    _Children(monkeypatch, lambda: [_Steps(sibling_steps, "sibling")])
    root = tmp_path / "run"
    with pytest.raises(_Killed):
        _job(root)
    assert slurm.requeues() == [f"requeue {JOB_ID}"] and sibling_steps == []
    job = _job(root)
    assert job["steps"] == [] and len(sibling_steps) == FINAL_STEP - SPAWN
    _assert_same_run(root, job, reference)


@pytest.mark.parametrize("s", [7, FINAL_STEP], ids=["mid-sibling", "last-step"])
def test_preempted_while_a_sibling_trains_resumes_the_sibling_not_the_parent(
    tmp_path, slurm, reference, monkeypatch, s
):
    """The sibling writes its progress at the end of the step ``s`` the signal came in, then the job is
    requeued (and killed); the requeued job restores the finished parent (0 steps) and trains the sibling
    from s (at s = T, nothing: it only evaluates)."""
    root = tmp_path / "run"
    sibling_steps, preempted = [], []
    children = _Children(monkeypatch, lambda: [_Steps(sibling_steps, "sibling"), *preempted])
    preempted.append(_SignalDuringChildStep(slurm, s))
    with pytest.raises(_Killed):
        _job(root)
    assert slurm.requeues() == [f"requeue {JOB_ID}"]
    assert len(sibling_steps) == s - 1 - SPAWN  # killed in step s's requeue, before it was counted
    assert _hpc_checkpoints(root) == ["hpc_ckpt_1.ckpt"]  # the finished parent's
    assert not list((root / "lmc").rglob("hpc_ckpt_*"))  # the child wrote none of its own
    preempted.clear()
    sibling_steps.clear()
    job = _job(root)
    assert job["steps"] == [] and len(children.trainers) == 2
    assert len(sibling_steps) == FINAL_STEP - s
    _assert_same_run(root, job, reference)
    assert _hpc_checkpoints(root) == ["hpc_ckpt_1.ckpt"]


def test_preempted_while_the_path_is_evaluated_evaluates_the_stored_sibling(
    tmp_path, slurm, reference, monkeypatch
):
    """The sibling's weights are on disk before its path is evaluated: the requeued job trains nothing."""
    original, sent = siblings_module.linear_paths, []

    def signal_at_the_first_alpha(*args, **kwargs):
        if not sent:
            sent.append(True)
            slurm.preempt()  # our handler requeues at once; the kill follows
        return original(*args, **kwargs)

    monkeypatch.setattr(siblings_module, "linear_paths", signal_at_the_first_alpha)
    sibling_steps = []
    _Children(monkeypatch, lambda: [_Steps(sibling_steps, "sibling")])
    root = tmp_path / "run"
    with pytest.raises(_Killed):
        _job(root)
    assert slurm.requeues() == [f"requeue {JOB_ID}"] and len(sibling_steps) == FINAL_STEP - SPAWN
    assert not list((root / "lmc").glob("sibling_*.json"))
    sibling_steps.clear()
    job = _job(root)
    assert job["steps"] == [] and sibling_steps == []
    _assert_same_run(root, job, reference)


# ------------------------------------------------------------------------------------------------------------
# The pieces.


def test_requeue_job_runs_scontrol_with_the_job_or_array_task_id(slurm, monkeypatch):
    with pytest.raises(_Killed):
        requeue_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with pytest.raises(_Killed):
        requeue_job()
    assert slurm.requeues() == [f"requeue {JOB_ID}", "requeue 77_3"]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77; rm -rf /")
    with pytest.warns(UserWarning, match="not a SLURM job id"):
        assert requeue_job() is None
    assert len(slurm.requeues()) == 2


class _HalfWriting:
    """A trainer whose checkpoint write dies half-way, as a kill would leave it."""

    is_global_zero = True
    strategy = type("Strategy", (), {"checkpoint_io": None})()

    def save_checkpoint(self, path) -> None:
        with open(path, "wb") as file:
            file.write(b"half a checkpoint")
        raise _Killed("killed while writing")


def test_a_checkpoint_killed_while_written_leaves_the_complete_one_in_place(tmp_path):
    path = tmp_path / "snapshot_step=3.ckpt"
    path.write_bytes(b"the complete checkpoint")
    with pytest.raises(_Killed):
        save_checkpoint_atomically(_HalfWriting(), path)
    assert path.read_bytes() == b"the complete checkpoint"
    with pytest.raises(_Killed):
        save_checkpoint_atomically(_HalfWriting(), tmp_path / "new.ckpt")
    assert not (tmp_path / "new.ckpt").exists()


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_sibling_stopped_short_is_not_kept_as_trained_and_resumes_from_its_progress(tmp_path, monkeypatch):
    """A child stopped before the end (here by a callback at step SPAWN + 2) writes no final weights, which
    would mark it as done, and no result, and keeps its progress checkpoint; the next job trains it again."""
    _Children(monkeypatch, lambda: [_StopAt(SPAWN + 2)])
    with pytest.warns(UserWarning, match=f"ChildStoppedShort: .* stopped at step {SPAWN + 2}, not {FINAL_STEP}"):
        _job(tmp_path)
    lmc_dir = tmp_path / "lmc"
    assert list(lmc_dir.glob("sibling_step=*.pt")) == []
    assert len(list(lmc_dir.rglob("last.ckpt"))) == 1  # the progress checkpoint at step SPAWN + 2
    monkeypatch.undo()
    sibling_steps = []
    _Children(monkeypatch, lambda: [_Steps(sibling_steps, "sibling")])
    _job(tmp_path)
    assert len(list(lmc_dir.glob("sibling_step=*.pt"))) == 1
    assert len(sibling_steps) == FINAL_STEP - SPAWN  # from k: this job retrained the parent, a new snapshot
