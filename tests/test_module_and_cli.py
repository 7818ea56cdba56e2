"""The classification module's optimisers and schedules, and the recipe CLI's errors and links."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from contract_setup import make_trainer

from lt_theory.cli import main
from lt_theory.data import SyntheticCIFARDataModule
from lt_theory.models import MLP
from lt_theory.module import ClassificationModule

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"lr": 0.0}, "lr"),
        ({"milestones": (120, 80)}, "milestones"),
        ({"schedule_interval": "batch"}, "schedule_interval"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ClassificationModule(MLP(), **kwargs)


def _lrs_over_training(tmp_path, **module_args) -> list[float]:
    module = ClassificationModule(MLP(hidden=(8,)), **module_args)
    data = SyntheticCIFARDataModule(num_train=64, num_test=16, batch_size=16)  # 4 steps per epoch
    seen = []
    trainer = make_trainer(tmp_path, max_epochs=5, num_sanity_val_steps=0)
    original_step = module.training_step

    def training_step(batch, batch_idx):
        seen.append(trainer.optimizers[0].param_groups[0]["lr"])
        return original_step(batch, batch_idx)

    module.training_step = training_step
    trainer.fit(module, datamodule=data)
    return seen


def test_step_schedule_multiplies_by_gamma_at_epoch_milestones(tmp_path):
    lrs = _lrs_over_training(tmp_path, lr=0.1, schedule="step", milestones=(2, 4), gamma=0.1)
    expected = [0.1] * 8 + [0.01] * 8 + [0.001] * 4
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_step_schedule_with_step_milestones_follows_the_closed_form(tmp_path):
    # 4 optimizer steps an epoch; milestones 3 and 9 fall inside epochs 0 and 2
    lrs = _lrs_over_training(
        tmp_path, lr=0.1, schedule="step", milestones=(3, 9), gamma=0.1, schedule_interval="step"
    )
    # lr of the step after t completed steps: 0.1 * 0.1 ** #{m <= t}
    expected = [0.1 * 0.1 ** sum(m <= t for m in (3, 9)) for t in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[2:4] == pytest.approx([0.1, 0.01]) and lrs[8:10] == pytest.approx([0.01, 0.001])


def test_cosine_schedule_follows_the_closed_form_per_step(tmp_path):
    lrs = _lrs_over_training(tmp_path, lr=0.1, schedule="cosine")
    total = 20
    expected = [0.05 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_adam_with_constant_schedule(tmp_path):
    lrs = _lrs_over_training(tmp_path, optimizer="adam", lr=1e-3, schedule="constant")
    assert lrs == [1e-3] * 20


def test_net_with_the_wrong_number_of_classes_is_explained(tmp_path):
    module = ClassificationModule(MLP(num_classes=10), num_classes=100)
    data = SyntheticCIFARDataModule(num_train=32, num_test=16, batch_size=16, num_classes=100)
    with pytest.raises(ValueError, match="num_classes: 100"):
        make_trainer(tmp_path, max_epochs=1).fit(module, datamodule=data)


def test_cli_rejects_an_unknown_key_with_its_own_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.learning_rate", "0.1"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_cli_rejects_a_wrong_type_with_its_own_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--trainer.max_epochs", "many"])
    assert exit_info.value.code != 0
    assert "max_epochs" in capsys.readouterr().err


def test_cli_links_the_data_class_count_into_the_model(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.fast_dev_run",
            "1",
            "--trainer.callbacks",
            "[]",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--model.net",
            "lt_theory.models.MLP",
            "--model.net.init_args.hidden",
            "[8]",
            "--model.net.init_args.num_classes",
            "100",
            "--data.init_args.num_classes",
            "100",
            "--data.init_args.num_train",
            "200",
            "--data.init_args.num_test",
            "50",
        ]
    )
    assert cli.model.num_classes == 100
    assert cli.trainer.global_step == 1


LAYERED = {
    **dict.fromkeys(
        ("resnet20_cifar10_spectral.yaml", "resnet20_cifar10_ntk.yaml", "resnet20_cifar10_lmc.yaml"),
        "resnet20_cifar10.yaml",
    ),
    "resnet20_cifar10_imp_stability.yaml": "resnet20_cifar10_imp.yaml",
}
"""Configs that hold only what differs from a base config (config -> base), given after it: --config base
--config it."""


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_config_parses(config, capsys):
    layered = ["--config", str(CONFIGS / LAYERED[config.name])] if config.name in LAYERED else []
    assert ("model" not in yaml.safe_load(config.read_text())) == bool(layered), "a layered config is listed"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *layered, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["net"]["class_path"].startswith("lt_theory.models.")
    if layered:  # the base's training, this config's callbacks and run name
        callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
        assert callbacks[:2] == ["ModelCheckpoint", "LearningRateMonitor"]
        assert printed["trainer"]["callbacks"][2]["class_path"].startswith("lt_theory.")
        assert printed["model"]["lr"] == 0.1
        assert printed["trainer"]["logger"]["init_args"]["name"] == config.stem
        assert printed["trainer"]["logger"]["init_args"]["default_hp_metric"] is False


def test_resnet20_imp_config_has_open_lth_settings():
    config = yaml.safe_load((CONFIGS / "resnet20_cifar10_imp.yaml").read_text())
    steps_per_epoch = math.ceil(50_000 / config["data"]["init_args"]["global_batch_size"])  # 391
    assert config["model"]["schedule_interval"] == "step"
    assert config["model"]["milestones"] == [80 * steps_per_epoch, 120 * steps_per_epoch] == [31280, 46920]
    assert config["model"]["net"]["init_args"]["shortcut"] == "B"
    assert config["trainer"]["devices"] == 1


def _tiny_recipe(tmp_path, stop_after_epochs: int | None = None) -> Path:
    """The quick start with an MLP on 96 synthetic images and only a ModelCheckpoint keeping last.ckpt (and a
    callback stopping the fit after ``stop_after_epochs``, as a preemption would)."""
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    if stop_after_epochs is not None:
        callbacks.append({"class_path": "recorders.StopAfterEpochs", "init_args": {"epochs": stop_after_epochs}})
    config["trainer"].update(max_epochs=2, log_every_n_steps=1, enable_progress_bar=False, callbacks=callbacks)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["model"]["net"] = {"class_path": "lt_theory.models.MLP", "init_args": {"hidden": [16]}}
    config["data"]["init_args"].update(num_train=96, num_test=32, batch_size=16)
    path = tmp_path / f"tiny_stop{stop_after_epochs}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ckpt_path_last_resumes_the_runs_own_checkpoint_into_the_same_tensorboard_run(tmp_path):
    """A run stopped after epoch 1, then the same command with `--ckpt_path last`: it goes on from step 6 in
    version_0, and ends with the weights of a run that was never stopped."""
    config, stopping = str(_tiny_recipe(tmp_path)), str(_tiny_recipe(tmp_path, stop_after_epochs=1))
    straight = main(["fit", "--config", config, "--trainer.logger.init_args.name", "straight"])
    stopped = main(["fit", "--config", stopping, "--trainer.logger.init_args.name", "resumed"])
    assert stopped.trainer.global_step == 6
    resumed = main(["fit", "--config", config, "--trainer.logger.init_args.name", "resumed", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(tmp_path / "runs" / "resumed" / "version_0" / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in (tmp_path / "runs" / "resumed").iterdir()) == ["version_0"]
    assert resumed.trainer.global_step == straight.trainer.global_step == 12
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_ckpt_path_last_without_a_checkpoint_trains_from_the_start(tmp_path, capsys):
    cli = main(["fit", "--config", str(_tiny_recipe(tmp_path)), "--trainer.max_epochs", "1", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 6 and cli.trainer.ckpt_path is None
