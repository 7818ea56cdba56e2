"""The sweep's config format, without training: a recipe config plus a `sweep:` section, parsed by the
recipes' own parser (several --config files merge); each task's recipe config, which the recipe CLI accepts;
the old format refused with how to write it now; axes over keys the config does not have, or that the sweep
sets, refused naming them; the product of axes as the task list and the SLURM array indices; the probe the
sweep needs; every shipped sweep config parses with the command its comments give; PooledInput."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from lt_theory.cli import TheoryCLI
from lt_theory.data import CIFARDataModule
from lt_theory.models import MLP, PooledInput
from lt_theory.module import ClassificationModule
from lt_theory.sweep import check_axes, main, parse_arguments, sweep_tasks, task_config, validate_config

ROOT = Path(__file__).parents[1]

RECIPE = """
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  limit_val_batches: 0
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: recipe}
model:
  net:
    class_path: lt_theory.models.MLP
    init_args: {in_shape: [3, 32, 32], hidden: [16]}
  optimizer: adam
  lr: 0.01
  schedule: constant
data:
  class_path: lt_theory.data.SyntheticCIFARDataModule
  init_args: {num_train: 48, num_test: 24, batch_size: 16, label_noise: 0.25}
"""

SWEEP_PART = """
sweep:
  axes:
    model.net.init_args.hidden: [2, 4, 8]
    data.init_args.label_noise: [0.0, 0.5]
  splits: 2
  name: tiny
"""

HIDDEN, NOISE = "model.net.init_args.hidden", "data.init_args.label_noise"


def _configs(tmp_path: Path, recipe: str = RECIPE, sweep: str = SWEEP_PART) -> list[str]:
    (tmp_path / "recipe.yaml").write_text(recipe)
    (tmp_path / "sweep.yaml").write_text(sweep)
    return ["--config", str(tmp_path / "recipe.yaml"), "--config", str(tmp_path / "sweep.yaml")]


def _sweep(tmp_path: Path, *extra: str, **kwargs):
    parser, cfg = parse_arguments([*_configs(tmp_path, **kwargs), f"--sweep.logdir={tmp_path}", *extra])
    return validate_config(parser, cfg)


def _usage_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *args])
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


# --------------------------------------------------------------------------------------------------------
# A recipe config plus a sweep section
# --------------------------------------------------------------------------------------------------------


def test_a_sweep_config_is_a_recipe_config_plus_a_sweep_section(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    sweep = _sweep(tmp_path)
    recipe = yaml.safe_load(RECIPE)
    assert sweep.seed == 3 and sweep.splits == 2 and sweep.directory == tmp_path / "tiny"
    assert sweep.base["model"]["lr"] == 0.01 and sweep.base["model"]["net"]["init_args"]["hidden"] == [16]
    assert sweep.base["data"]["init_args"]["num_train"] == 48
    assert sweep.base["trainer"]["max_epochs"] == 1
    # the probe the sweep reads was added, measuring the final model on the whole training set
    [probe] = sweep.base["trainer"]["callbacks"]
    assert probe["class_path"] == "lt_theory.DoubleDescentProbe"
    assert (
        probe["init_args"]["measure_on_train_end"] is True and probe["init_args"]["train_subset_size"] is None
    )
    task = sweep.tasks[7]  # split 1, hidden 2, label noise 0.5
    assert (task.split, task.values) == (1, {HIDDEN: 2, NOISE: 0.5})
    config = task_config(sweep, task)
    assert config["model"]["net"]["init_args"]["hidden"] == [2]  # an int fills the list [16]
    assert config["data"]["init_args"]["label_noise"] == 0.5
    assert config["data"]["init_args"]["seed"] == 3 and config["data"]["init_args"]["train_split"] == [1, 2]
    assert config["seed_everything"] != 3  # each split has its own initialisation, derived from the seed
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "tiny" / task.name)
    logger = config["trainer"]["logger"]["init_args"]
    assert (logger["save_dir"], logger["name"], logger["version"]) == (str(tmp_path / "tiny"), "", task.name)
    assert recipe["trainer"]["logger"]["init_args"]["name"] == "recipe"  # the recipe's logger is replaced
    # the recipe CLI takes a task's config as it is: the keys mean the same
    cli = TheoryCLI(ClassificationModule, CIFARDataModule, subclass_mode_data=True, run=False, args=config)
    assert cli.model.net.hidden == (2,) and cli.datamodule.label_noise == 0.5
    assert cli.datamodule.train_split == (1, 2) and cli.model.hparams.lr == 0.01


def test_one_config_file_with_both_parts_equals_the_two_files(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "all.yaml").write_text(RECIPE + SWEEP_PART)
    parser, cfg = parse_arguments(["--config", str(both / "all.yaml"), f"--sweep.logdir={tmp_path}"])
    assert validate_config(parser, cfg).base == _sweep(tmp_path).base


def test_an_int_fills_a_list_of_equal_entries_and_other_lists_take_lists(tmp_path):
    recipe = RECIPE.replace("hidden: [16]", "hidden: [16, 16]").replace(
        "lr: 0.01", "lr: 0.01\n  milestones: [8, 9]"
    )
    sweep = _sweep(tmp_path, recipe=recipe)
    assert task_config(sweep, sweep.tasks[0])["model"]["net"]["init_args"]["hidden"] == [2, 2]
    listed = _sweep(tmp_path, '--sweep.axes={"model.milestones": [[1, 2], [3, 4]]}', recipe=recipe)
    assert task_config(listed, listed.tasks[1])["model"]["milestones"] == [3, 4]
    with pytest.raises(ValueError, match=r"`sweep.axes.model.milestones`: the value 5 is refused"):
        _sweep(tmp_path, '--sweep.axes={"model.milestones": [5]}', recipe=recipe)


def test_list_entries_such_as_a_callbacks_arguments_are_axis_keys(tmp_path):
    recipe = RECIPE.replace(
        "  logger:",
        "  callbacks:\n    - class_path: lt_theory.DoubleDescentProbe\n"
        "      init_args: {every_n_epochs: 3, measure_on_train_end: false}\n  logger:",
    )
    sweep = _sweep(
        tmp_path, '--sweep.axes={"trainer.callbacks.0.init_args.every_n_epochs": [1, 2]}', recipe=recipe
    )
    [probe] = task_config(sweep, sweep.tasks[3])["trainer"]["callbacks"]  # split 1, every_n_epochs 2
    assert probe["init_args"]["every_n_epochs"] == 2
    assert probe["init_args"]["measure_on_train_end"] is True  # set by the sweep, which reads the final model


# --------------------------------------------------------------------------------------------------------
# Refused: the old format, axes the config does not have or the sweep sets, bad values
# --------------------------------------------------------------------------------------------------------

OLD_CONFIG = """
widths: [2, 4]
seed: 0
logdir: runs
name: tiny
model:
  class_path: lt_theory.models.MLP
  width_arg: hidden
  input_pool: 8
data:
  class_path: lt_theory.data.SyntheticCIFARDataModule
module: {optimizer: adam}
probe: {every_n_epochs: 5}
"""


def test_the_old_format_is_refused_with_how_to_write_each_key_now(tmp_path, capsys):
    (tmp_path / "old.yaml").write_text(OLD_CONFIG)
    message = _usage_error(capsys, ["--config", str(tmp_path / "old.yaml")])
    assert "belong to the old sweep format" in message
    for advice in (
        "`widths`: the grid is an axis: `sweep.axes:",
        "`seed`: the seed is `seed_everything`",
        "`logdir`: it is `sweep.logdir`",
        "`module`: ClassificationModule's arguments are the keys of `model`",
        "`probe`: the probe is an entry of `trainer.callbacks`",
        "`model.width_arg`: the width key is the axis key",
        "`model.class_path`: the network is `model.net.class_path`",
        "`model.input_pool`: wrap the network: `model.net: {class_path: lt_theory.models.PooledInput",
    ):
        assert advice in message, advice
    assert not (tmp_path / "runs").exists()
    # the old command-line keys too
    message = _usage_error(capsys, [*_configs(tmp_path), "--task_index", "3", "--widths=[2]"])
    assert "`task_index`: it is `sweep.task_index`" in message and "`widths`" in message


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        (
            '{"model.net.init_args.widht": [2, 4]}',
            r"`model.net.init_args.widht` is not a key of this config, so "
            r"its values would not change the runs \(a typo\?\): model.net.init_args has no key `widht` \(its "
            r"keys: \['hidden', 'in_shape', 'num_classes'\]\)",
        ),
        ('{"data.init_args.num_trian": [8]}', r"`data.init_args.num_trian` is not a key of this config"),
        (
            '{"trainer.callbacks.5.init_args.seed": [1]}',
            r"trainer.callbacks has no key `5` \(its keys: 0..0\)",
        ),
        ('{"optimizer.lr": [0.1]}', r"`optimizer.lr` is not a key of this config"),
    ],
)
def test_an_axis_over_a_key_the_config_does_not_have_is_refused_naming_it(tmp_path, capsys, axes, match):
    message = _usage_error(
        capsys, [*_configs(tmp_path), f"--sweep.axes={axes}", f"--sweep.logdir={tmp_path}"]
    )
    assert re.search(match, message), message
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        (
            '{"data.init_args.seed": [1, 2]}',
            "`data.init_args.seed` cannot be an axis: it is `seed_everything`",
        ),
        ('{"data.init_args.train_split": [[0, 2]]}', "cannot be an axis: it is set by `sweep.splits`"),
        ('{"trainer.logger.init_args.name": ["a"]}', "cannot be an axis: the sweep gives each run its own"),
        ('{"trainer.default_root_dir": ["a"]}', "cannot be an axis: each run's folder is"),
        ("{}", "`sweep.axes` must map config keys to their values"),
        ('{"model.lr": []}', r"`sweep.axes.model.lr` must be a non-empty list"),
        ('{"model.lr": [0.1, 0.1]}', r"`sweep.axes.model.lr` repeats the value\(s\) 0.1"),
        ('{"model.net.init_args.hidden": [2, "x"]}', r"the value 'x' is refused: .*hidden"),
        ('{"model.lr": [0.1, "fast"]}', r"the value 'fast' is refused: .*model.lr"),
    ],
)
def test_axes_the_sweep_sets_and_bad_values_are_refused(tmp_path, capsys, axes, match):
    message = _usage_error(
        capsys, [*_configs(tmp_path), f"--sweep.axes={axes}", f"--sweep.logdir={tmp_path}"]
    )
    assert re.search(match, message), message


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--sweep.splits=1"], "m >= 2"),
        (
            ["--sweep.task_index=12"],
            r"`sweep.task_index` must be in \[0, 12\) for hidden: 3 values x label_noise: "
            r"2 values x 2 splits = 12 tasks, got 12",
        ),
        (["--sweep.epsilon=1.5"], r"`sweep.epsilon` must be a number in \[0, 1\)"),
        (["--seed_everything=true"], "`seed_everything` must be an int >= 0 in a sweep"),
        (["--data.init_args.seed=5"], "give `seed_everything` instead"),
        (["--model.net.init_args.in_shape=[0]"], "`model.net` cannot be built: .*in_shape"),
    ],
)
def test_bad_sweep_settings_are_usage_errors(tmp_path, capsys, extra, match):
    message = _usage_error(capsys, [*_configs(tmp_path), f"--sweep.logdir={tmp_path}", *extra])
    assert re.search(match, message), message


def test_two_double_descent_probes_are_refused(tmp_path, capsys):
    probe = "    - class_path: lt_theory.DoubleDescentProbe\n"
    recipe = RECIPE.replace("  logger:", "  callbacks:\n" + probe + probe + "  logger:")
    message = _usage_error(capsys, [*_configs(tmp_path, recipe=recipe)])
    assert "holds 2 DoubleDescentProbes" in message


# --------------------------------------------------------------------------------------------------------
# The task list: the product of the axes, the SLURM array
# --------------------------------------------------------------------------------------------------------


def test_the_product_of_two_axes_gives_the_task_list_and_the_array_indices(tmp_path, monkeypatch, capsys):
    hidden, noise = [2, 4, 8], [0.0, 0.5]
    by_hand = [(s, h, p) for s in range(2) for h in hidden for p in noise]  # split slowest, last axis fastest
    tasks = sweep_tasks(check_axes({HIDDEN: hidden, NOISE: noise}), splits=2)
    assert [(t.split, t.values[HIDDEN], t.values[NOISE]) for t in tasks] == by_hand
    assert [t.index for t in tasks] == list(range(12))
    assert (
        tasks[5].name == "hidden_0008_label_noise_0.5_split_0"
        and tasks[6].name == "hidden_0002_label_noise_0_split_1"
    )
    assert len({t.name for t in tasks}) == 12
    for index in (0, 5, 6, 11):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(index))
        sweep = _sweep(tmp_path)
        [task] = sweep.selected
        split, h, p = by_hand[index]
        config = task_config(sweep, task)
        assert (
            config["model"]["net"]["init_args"]["hidden"] == [h]
            and config["data"]["init_args"]["label_noise"] == p
        )
        assert config["data"]["init_args"]["train_split"] == [split, 2]
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert (
        main(["run", *_configs(tmp_path), f"--sweep.logdir={tmp_path}", "--sweep.print_tasks=true"]) is None
    )
    out = capsys.readouterr().out
    assert (
        "12 tasks; as a SLURM array: sbatch --array=0-11 ...  (hidden: 3 values x label_noise: 2 values x 2 splits"
        in out
    )
    assert (
        "task  11: hidden_0008_label_noise_0.5_split_1  (hidden=8, label_noise=0.5, split 1; 24,674 parameters)"
        in out
    )
    assert not (tmp_path / "tiny").exists()


def test_three_axes_and_replicate_seeds_multiply(tmp_path):
    axes = {"seed_everything": [0, 1], HIDDEN: [2, 4], "model.lr": [0.1, 0.01, 0.001]}
    tasks = sweep_tasks(check_axes(axes))
    assert [tuple(t.values.values()) for t in tasks] == list(itertools.product(*axes.values()))
    assert tasks[0].name == "seed_everything_0000_hidden_0002_lr_0.1"


# --------------------------------------------------------------------------------------------------------
# The shipped configs, the recipe model for pooled inputs
# --------------------------------------------------------------------------------------------------------

SWEEP_CONFIGS = sorted((ROOT / "recipes" / "configs" / "sweeps").glob("*.yaml"))


def _documented_command(config: Path) -> list[str]:
    """The first `python -m lt_theory.sweep run ...` command of the config's header comments."""
    for line in config.read_text().splitlines():
        found = re.match(r"#\s+(python -m lt_theory\.sweep run .*)", line)
        if found:
            return shlex.split(found.group(1))[4:]
    raise AssertionError(f"{config} documents no `python -m lt_theory.sweep run` command")


@pytest.mark.parametrize("config", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_every_sweep_config_parses_with_its_documented_command_and_lists_its_tasks(
    config, capsys, monkeypatch
):
    monkeypatch.chdir(ROOT)
    args = [a for a in _documented_command(config) if a not in ("--sweep.print_tasks", "true")]
    assert str(config.relative_to(ROOT)) in args
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sweep"]["axes"] and printed["model"]["net"]["class_path"].startswith("lt_theory.models")
    assert main(["run", *args, "--sweep.print_tasks=true"]) is None
    assert "tasks; as a SLURM array" in capsys.readouterr().out


def test_the_resnet18k_sweep_part_keeps_the_recipes_model_data_and_optimiser(monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep_part = "recipes/configs/sweeps/dd_sweep_resnet18k_cifar10.yaml"
    parser, cfg = parse_arguments(
        ["--config", "recipes/configs/resnet18k_cifar10.yaml", "--config", sweep_part]
    )
    sweep = validate_config(parser, cfg)
    assert [t.values["model.net.init_args.k"] for t in sweep.tasks] == [
        1,
        2,
        4,
        6,
        8,
        10,
        12,
        14,
        16,
        20,
        24,
        32,
        48,
        64,
    ]
    data = sweep.base["data"]["init_args"]
    assert (data["label_noise"], data["global_batch_size"], data["augment"], data["eval_batch_size"]) == (
        0.15,
        128,
        True,
        1000,
    )
    assert (sweep.base["model"]["optimizer"], sweep.base["model"]["lr"], sweep.base["model"]["schedule"]) == (
        "adam",
        0.0001,
        "constant",
    )
    assert sweep.base["trainer"]["max_epochs"] == 4000 and sweep.base["trainer"]["devices"] == 1
    kinds = [c["class_path"].rsplit(".", 1)[-1] for c in sweep.base["trainer"]["callbacks"]]
    assert kinds == ["ModelCheckpoint", "DoubleDescentProbe"]


def test_pooled_input_is_the_network_on_average_pooled_images_with_its_parameters_unchanged():
    torch.manual_seed(0)
    inner = MLP((3, 4, 4), hidden=(8,))
    pooled = PooledInput(inner, pool=8)
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(pooled(x), inner(torch.nn.functional.avg_pool2d(x, 8)))
    assert sum(p.numel() for p in pooled.parameters()) == sum(p.numel() for p in inner.parameters())
    assert torch.equal(PooledInput(inner)(x[:, :, :4, :4]), inner(x[:, :, :4, :4]))  # pool 1: no pooling
    with pytest.raises(ValueError, match="`pool`"):
        PooledInput(inner, pool=0)
    with pytest.raises(ValueError, match="`net`"):
        PooledInput("mlp")
    assert len(list(torch.fx.symbolic_trace(pooled).graph.nodes)) > 2
