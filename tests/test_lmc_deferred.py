"""Deferred siblings (``LinearModeConnectivity(siblings="deferred")``, ``python -m lt_theory.lmc``) against the
in-job siblings of the same run.

Reference: the same recipe run with in-job siblings (the default), same seeds. The deferred run's tasks are run
one after another in this process, as array tasks would be on a cluster, then aggregated; the sibling weights,
the stored results and every ``lmc/*`` scalar logged into the parent's TensorBoard run must equal the in-job
run's bit for bit (CPU). Then: a resubmitted task trains nothing, a missing sibling is named with the command that
trains it while the others are logged, and bad input (no task list, an index it does not hold, no index at all,
a module that cannot be rebuilt) says what to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from contract_setup import STEPS_PER_EPOCH, make_module_and_data, make_trainer
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lt_theory.callbacks import LinearModeConnectivity
from lt_theory.cli import main as recipe
from lt_theory.lmc.__main__ import main as lmc_command
from lt_theory.models import CIFARResNet
from lt_theory.module import ClassificationModule
from lt_theory.training import deferred
from lt_theory.training.deferred import TASKS_FILE, train_task

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "configs" / "quickstart.yaml"
FINAL_STEP = 2 * STEPS_PER_EPOCH
SPAWN_STEPS = [0, STEPS_PER_EPOCH]


def _config(tmp_path, siblings: str) -> str:
    """The quick start with ResNet-8 on 96 synthetic images (6 steps an epoch, 2 epochs) and only LMC."""
    config = yaml.safe_load(QUICKSTART.read_text())
    lmc = {
        "class_path": "lt_theory.LinearModeConnectivity",
        "init_args": {
            "spawn_steps": SPAWN_STEPS,
            "num_alphas": 5,
            "coarse_every": 2,
            "train_subset_size": 48,
            "eval_batch_size": 16,
            "siblings": siblings,
        },
    }
    config["trainer"].update(max_epochs=2, log_every_n_steps=1, enable_progress_bar=False, callbacks=[lmc])
    config["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path / "runs"), name=siblings)
    config["model"]["net"]["init_args"]["depth"] = 8
    config["model"].update(lr=0.05, schedule="constant")
    config["data"]["init_args"].update(num_train=16 * STEPS_PER_EPOCH, num_test=32, batch_size=16, label_noise=0.25)
    path = tmp_path / f"{siblings}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _scalars(run: Path) -> dict[tuple[str, int], float]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("lmc/")]
    return {(tag, e.step): e.value for tag in tags for e in events.Scalars(tag)}


def _images_and_text(run: Path) -> tuple[set, list[str]]:
    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    images = {(tag, e.step) for tag in events.Tags()["images"] if tag.startswith("lmc/") for e in events.Images(tag)}
    text = "lmc/summary/text_summary"
    logged = events.Tensors(text) if text in events.Tags()["tensors"] else []
    summaries = [e.tensor_proto.string_val[0].decode() for e in logged]
    return images, summaries


def _sibling_files(lmc_dir: Path, suffix: str) -> dict[str, Path]:
    return {p.name: p for p in lmc_dir.glob(f"sibling_step=*{suffix}")}


def test_deferred_tasks_then_aggregate_give_the_in_job_barriers_bit_for_bit(tmp_path, monkeypatch, caplog):
    in_job = recipe(["fit", "--config", _config(tmp_path, "in_job")])
    parent = recipe(["fit", "--config", _config(tmp_path, "deferred")])
    in_job_run, run = Path(in_job.trainer.log_dir), Path(parent.trainer.log_dir)
    lmc_dir = run / "lmc"
    assert parent.trainer.global_step == FINAL_STEP
    for key, value in in_job.model.state_dict().items():  # the parent is the same run
        assert torch.equal(parent.model.state_dict()[key], value), key
    tasks = json.loads((lmc_dir / TASKS_FILE).read_text())
    assert [t["k"] for t in tasks["tasks"]] == SPAWN_STEPS
    assert _sibling_files(lmc_dir, ".pt") == {} and _scalars(run) == {}  # the fit ended without siblings

    # the second task first (array tasks run in any order); then the first from $SLURM_ARRAY_TASK_ID
    assert lmc_command(["train-sibling", "--dir", str(lmc_dir), "--task-index", "1"]) == 0
    with caplog.at_level("WARNING", logger="lt_theory"):
        partial = deferred_aggregate(lmc_dir)
    assert partial["missing"] == [0] and partial["logged"] == [STEPS_PER_EPOCH]
    assert f"--dir {lmc_dir} --task-index 0" in caplog.text  # the command that trains the missing one
    assert not any(tag == "lmc/stable_point" for tag, _ in _scalars(run))  # not from half the siblings
    assert _images_and_text(run)[1] == []
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert lmc_command(["train-sibling", "--dir", str(lmc_dir)]) == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")

    # a resubmitted task trains nothing: its weights are on disk
    weights = {name: path.stat().st_mtime_ns for name, path in _sibling_files(lmc_dir, ".pt").items()}
    monkeypatch.setattr(deferred, "train_detached", lambda *a, **k: pytest.fail("a finished task trained again"))
    assert train_task(lmc_dir, 0)["trained"] is False
    assert {n: p.stat().st_mtime_ns for n, p in _sibling_files(lmc_dir, ".pt").items()} == weights

    # the whole run folder moved before the aggregation: the barriers go into the run where it is now
    moved = tmp_path / "moved"
    shutil.move(str(run.parent), str(moved))
    run, lmc_dir = moved / run.name, moved / run.name / "lmc"
    full = deferred_aggregate(lmc_dir)
    assert full["missing"] == [] and full["logged"] == [0]  # k = 6 was logged by the first aggregation
    assert not (tmp_path / "runs" / "deferred").exists()

    # the siblings, their results and the logged barriers are the in-job run's, bit for bit
    reference = _sibling_files(in_job_run / "lmc", ".pt")
    assert sorted(reference) == sorted(_sibling_files(lmc_dir, ".pt")) and len(reference) == 2
    for name, path in reference.items():
        a, b = torch.load(path), torch.load(lmc_dir / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name
    for name, path in _sibling_files(in_job_run / "lmc", ".json").items():
        expected, got = json.loads(path.read_text()), json.loads((lmc_dir / name).read_text())
        expected.pop("weights"), got.pop("weights")
        assert got == expected, name
    expected = _scalars(in_job_run)
    assert {tag for tag, _ in expected} >= {"lmc/test_error_barrier", "lmc/train_loss_barrier"}
    assert _scalars(run) == expected
    images, summaries = _images_and_text(run)
    expected_images, expected_summaries = _images_and_text(in_job_run)
    assert images == expected_images and summaries == expected_summaries  # logged once, complete

    # aggregating again logs nothing new
    assert deferred_aggregate(lmc_dir)["logged"] == []
    assert len(_images_and_text(run)[1]) == len(summaries)


def deferred_aggregate(lmc_dir: Path) -> dict:
    from lt_theory.lmc import aggregate

    return aggregate(lmc_dir, device="cpu", bars=False)


class SavedHyperparameters(ClassificationModule):
    """A module whose every argument is in its hyperparameters: rebuilt by ``load_from_checkpoint``."""

    def __init__(self, depth: int = 8, lr: float = 0.05) -> None:
        super().__init__(CIFARResNet(depth=depth), lr=lr, schedule="constant")
        self.save_hyperparameters()


def test_a_module_with_its_hyperparameters_is_rebuilt_from_the_snapshot_and_trains_the_in_job_sibling(tmp_path):
    _, data = make_module_and_data()
    siblings = {}
    for mode in ("in_job", "deferred"):
        _, data = make_module_and_data()
        module = SavedHyperparameters()
        module.load_state_dict(make_module_and_data()[0].state_dict())
        lmc = LinearModeConnectivity(
            spawn_steps=[STEPS_PER_EPOCH], num_alphas=3, train_subset_size=16, directory=tmp_path / mode, siblings=mode
        )
        make_trainer(tmp_path / mode, [lmc]).fit(module, datamodule=data)
        if mode == "deferred":
            assert train_task(tmp_path / mode, 0)["trained"] is True
        (siblings[mode],) = (tmp_path / mode).glob("sibling_step=*.pt")
    a, b = torch.load(siblings["in_job"]), torch.load(siblings["deferred"])
    assert siblings["in_job"].name == siblings["deferred"].name
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_module_that_cannot_be_rebuilt_is_refused_at_setup_saying_how_to_fix_it(tmp_path):
    module, data = make_module_and_data()  # ClassificationModule(net) outside the CLI: `net` is not saved
    lmc = LinearModeConnectivity(spawn_steps=[0], directory=tmp_path / "lmc", siblings="deferred")
    with pytest.raises(ValueError, match=r"\['net'\].*save_hyperparameters\(\).*recipe CLI.*siblings='in_job'"):
        make_trainer(tmp_path, [lmc]).fit(module, datamodule=data)
    with pytest.raises(ValueError, match="`siblings` must be one of"):
        LinearModeConnectivity(siblings="later")
    with pytest.raises(ValueError, match="needs mode='spawn'"):
        LinearModeConnectivity(mode="init", siblings="deferred")


def _fake_task_list(folder: Path, count: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"index": i, "k": i, "weights": str(folder / f"w{i}.pt"), "snapshot": str(folder / f"snapshot_step={i}.ckpt")}
        for i in range(count)
    ]
    parent = {"final_step": count, "weights": str(folder / "parent.pt")}
    task_list = {"format": 1, "directory": str(folder), "parent": parent, "trainer": {"bars": False}, "tasks": tasks}
    (folder / TASKS_FILE).write_text(json.dumps(task_list))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task-index", "0"], r"no task list at .*siblings='deferred'.*Give --dir that folder"),
        (["--task-index", "2"], r"task index 2 is out of range.*2 task\(s\), 0 \.\. 1.*--array=0-1"),
        ([], r"which task\? Give --task-index i \(i = 0 \.\. 1\), or run it as a SLURM array task"),
        (["--task-index", "1"], r"task 1 needs .*snapshot_step=1\.ckpt, which is missing.*copy the whole lmc folder"),
    ],
)
def test_bad_input_exits_with_a_message_saying_what_to_do(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    folder = tmp_path / "lmc"
    if "no task list" not in message:
        _fake_task_list(folder)
    with pytest.raises(SystemExit) as exit_:
        lmc_command(["train-sibling", "--dir", str(folder), *argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_module_entry_point_reports_a_missing_task_list(tmp_path):
    """``python -m lt_theory.lmc`` as a user types it (run from the tree under test)."""
    done = subprocess.run(
        [sys.executable, "-m", "lt_theory.lmc", "aggregate", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "aggregate: error: no task list at" in done.stderr


def test_a_task_on_two_processes_trains_its_sibling_to_the_end(tmp_path):
    """``train-sibling --devices 2`` on the CPU, as a user types it: two ranks (gloo, Lightning's launcher) read
    the task's progress folder while rank zero prepares it, and the sibling is trained to its last step."""

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )  # fmt: skip

    config = "recipes/configs/lmc_deferred_quick.yaml"
    parent = command("lt_theory.cli", "fit", "--config", config, f"--trainer.logger.init_args.save_dir={tmp_path}")
    assert parent.returncode == 0, parent.stderr[-3000:]
    lmc_dir = tmp_path / "lmc_deferred_quick" / "version_0" / "lmc"
    task = command("lt_theory.lmc", "train-sibling", "--dir", str(lmc_dir), "--task-index", "1", "--devices", "2")
    assert task.returncode == 0, task.stderr[-3000:]
    assert "Starting with 2 processes" in task.stdout + task.stderr
    (weights,) = lmc_dir.glob("sibling_step=12_to=48_*.pt")
    assert not list(lmc_dir.rglob("last.ckpt"))  # its progress folder is removed once it is trained
    state = torch.load(weights)
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


class _SignalAtChildStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's requeue signal, 90 s before the end


def test_a_task_preempted_on_slurm_is_requeued_and_resumes_its_sibling_where_it_was(tmp_path, monkeypatch):
    """SIGUSR1 while the task's sibling runs its step 9 of 6..12: the sibling writes its progress at the end of
    step 9, `scontrol requeue <array job>_<task>` runs (a stub, which kills the task); the requeued task trains
    steps 10 to 12 only and ends with the sibling an uninterrupted in-job run trains."""
    from test_lmc_requeue import JOB_ID, _Killed, _simulate_slurm

    from lt_theory.training import child as child_module

    folders, extra, steps = {}, [], []
    for mode in ("in_job", "deferred"):
        module, data = SavedHyperparameters(), make_module_and_data()[1]
        module.load_state_dict(make_module_and_data()[0].state_dict())
        lmc = LinearModeConnectivity(
            spawn_steps=[STEPS_PER_EPOCH], num_alphas=3, train_subset_size=16, directory=tmp_path / mode, siblings=mode
        )
        make_trainer(tmp_path / mode, [lmc]).fit(module, datamodule=data)
        folders[mode] = tmp_path / mode
    original = child_module._detached_trainer
    monkeypatch.setattr(
        child_module, "_detached_trainer", lambda a, m, callbacks, r: original(a, m, [*callbacks, *extra], r)
    )
    slurm = _simulate_slurm(monkeypatch, tmp_path / "cluster")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", JOB_ID)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    before = signal.getsignal(signal.SIGUSR1)
    try:
        extra[:] = [_SignalAtChildStep(9), _CountSteps(steps)]
        with pytest.raises(_Killed):
            train_task(folders["deferred"])
        assert slurm.requeues() == [f"requeue {JOB_ID}_0"] and steps == [7, 8]  # killed in step 9's requeue
        extra[:] = [_CountSteps(steps)]
        steps.clear()
        assert train_task(folders["deferred"])["trained"] is True
        assert steps == [10, 11, 12]
    finally:
        slurm.restore()
    assert signal.getsignal(signal.SIGUSR1) is before  # the task gave the handler back
    (reference,) = folders["in_job"].glob("sibling_step=*.pt")
    a, b = torch.load(reference), torch.load(folders["deferred"] / reference.name)
    assert all(torch.equal(a[key], b[key]) for key in a)


class _CountSteps(Callback):
    def __init__(self, steps: list) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append(trainer.global_step)


def test_a_task_runs_on_what_it_has_not_on_what_the_parent_had(monkeypatch):
    """A parent of 2 nodes x 4 GPUs: a task run by hand on a 1-GPU machine outside SLURM uses 1 GPU on 1 node (not
    8 ranks that never start); under a SLURM job, its nodes; given flags win."""
    parent = {"accelerator": "gpu", "devices": 4, "num_nodes": 2}
    monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert deferred._resources_here(parent, None, None) == {"devices": 1, "num_nodes": 1}
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert deferred._resources_here(parent, None, None) == {"devices": 4, "num_nodes": 2}
    assert deferred._resources_here(parent, 2, 1) == {"devices": 2, "num_nodes": 1}
    cpu = {"accelerator": "cpu", "devices": 3, "num_nodes": 1}
    assert deferred._resources_here(cpu, None, None)["devices"] == 3
