"""A sweep's configuration: a recipe config plus a ``sweep:`` section, parsed, validated, and made into the
recipe config of each task.

The recipe part is parsed by the recipes' own parser (:class:`lt_theory.cli.TheoryCLI`: ``seed_everything``,
``trainer`` with its ``callbacks`` and ``logger``, ``model`` = :class:`lt_theory.module.ClassificationModule`
with ``model.net``, ``data``), so a key means in a sweep what it means in a recipe, and several ``--config``
files merge (a recipe, then a sweep part). What the sweep adds or sets in each run:

- the axis values of its task (an int given for a list-valued key whose entries are all equal, such as the
  ``hidden`` widths of an MLP, sets every entry: ``hidden: [64]`` swept over ``[8, 16]`` is ``[8]``, ``[16]``);
- ``data.init_args.seed`` = ``seed_everything``: one seed for the initialisation, the label noise, the data
  order and the splits (in the bias-variance mode each split's initialisation seed is derived from it);
- ``data.init_args.train_split = [i, m]`` for split ``i`` of ``sweep.splits = m``;
- ``trainer.logger``: a TensorBoardLogger writing ``<sweep.logdir>/<sweep.name>/<task>``, which is also
  ``trainer.default_root_dir`` (the config's own logger and root folder are not used);
- a :class:`~lt_theory.callbacks.double_descent.DoubleDescentProbe` in ``trainer.callbacks`` when there is
  none (``train_subset_size: null``: the final train error on the whole training set), and
  ``measure_on_train_end: true`` on it: the sweep reads each run's final errors from it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from torch import nn

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.cli import TheoryCLI
from lt_theory.data import CIFARDataModule
from lt_theory.data.datamodule import derived_seed
from lt_theory.module import ClassificationModule
from lt_theory.sweep.keys import config_value, flatten, plain, with_value
from lt_theory.sweep.models import import_object
from lt_theory.sweep.progress import SWEEP_LOGGER
from lt_theory.sweep.tasks import Axis, SweepTask, check_axes, check_splits, describe_grid, sweep_tasks
from lt_theory.training.progress import info
from lt_theory.training.stored import comparable

PROBE_CLASS_PATH = "lt_theory.DoubleDescentProbe"

SWEEP_OPTIONS = (
    "axes",
    "splits",
    "logdir",
    "name",
    "task_index",
    "aggregate",
    "epsilon",
    "rerun",
    "print_tasks",
)
"""The keys of the ``sweep:`` section."""

_SET_BY_THE_SWEEP = {
    "sweep": "the `sweep:` section is not a run setting",
    "trainer.logger": "the sweep gives each run its own TensorBoardLogger",
    "trainer.default_root_dir": "each run's folder is <sweep.logdir>/<sweep.name>/<task>",
    "data.init_args.seed": "it is `seed_everything` (an axis over `seed_everything` varies every seed together)",
    "data.init_args.train_split": "it is set by `sweep.splits`",
}

_OLD_KEYS = {
    "widths": "the grid is an axis: `sweep.axes: {<the width key>: [...]}`, e.g. `model.net.init_args.k` of "
    "PreActResNet18 or `model.net.init_args.hidden` of an MLP",
    "model.width_arg": "the width key is the axis key: `sweep.axes: {model.net.init_args.<width_arg>: [...]}`",
    "model.class_path": "the network is `model.net.class_path` (`model` is ClassificationModule, as in a recipe)",
    "model.init_args": "the network's arguments are `model.net.init_args`",
    "model.input_pool": "wrap the network: `model.net: {class_path: lt_theory.models.PooledInput, init_args: "
    "{pool: <p>, net: {class_path: ..., init_args: ...}}}` (the axis key then is "
    "`model.net.init_args.net.init_args.<width>`)",
    "module": "ClassificationModule's arguments are the keys of `model` (`model.optimizer`, `model.lr`, ...)",
    "probe": "the probe is an entry of `trainer.callbacks`: `{class_path: lt_theory.DoubleDescentProbe, "
    "init_args: {...}}` (the sweep adds one when there is none)",
    "seed": "the seed is `seed_everything`",
    **{name: f"it is `sweep.{name}`" for name in SWEEP_OPTIONS if name != "axes"},
}


class SweepCLI(TheoryCLI):
    """The recipes' LightningCLI parser with a ``sweep:`` section; it parses only (each task is instantiated
    by the sweep from its own recipe config)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--sweep.axes", type=dict | None, default=None, help="{config key: [values]}, crossed"
        )
        parser.add_argument(
            "--sweep.splits", type=int | None, default=None, help="bias-variance mode: m >= 2 training splits"
        )
        parser.add_argument("--sweep.logdir", type=str, default="runs", help="TensorBoard root folder")
        parser.add_argument(
            "--sweep.name", type=str, default="dd_sweep", help="the sweep's folder under logdir"
        )
        parser.add_argument(
            "--sweep.task_index",
            type=int | None,
            default=None,
            help="one task (default $SLURM_ARRAY_TASK_ID)",
        )
        parser.add_argument("--sweep.aggregate", type=bool, default=True, help="aggregate a sequential sweep")
        parser.add_argument("--sweep.epsilon", type=float, default=0.01, help="train error that interpolates")
        parser.add_argument("--sweep.rerun", type=bool, default=False, help="retrain runs with a result.json")
        parser.add_argument("--sweep.print_tasks", type=bool, default=False, help="list the tasks and exit")

    def parse_arguments(self, parser, args) -> None:
        """Parse ``args``; refuse a ``seed_everything`` that is not an int (before LightningCLI draws one).

        Raises:
            ValueError: for ``seed_everything: true`` / ``false`` or a negative seed.
        """
        self.config = parser.parse_args(args)
        seed = self.config.get("seed_everything")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(
                f"`seed_everything` must be an int >= 0 in a sweep (every task seeds from it), got {seed!r}"
            )

    def instantiate_classes(self) -> None:
        """Nothing: the sweep instantiates each task's classes itself."""


@dataclass
class SweepConfig:
    """A validated ``run`` configuration (see :func:`validate_config`)."""

    parser: Any
    """The recipe parser (with the ``sweep`` section), which parses and instantiates each task's config."""
    base: dict
    """The recipe config without ``sweep``, every key filled in, with the probe the sweep reads."""
    axes: tuple[Axis, ...]
    splits: int | None
    seed: int
    directory: Path
    task_index: int | None
    aggregate: bool
    epsilon: float
    rerun: bool
    print_tasks: bool
    tasks: list[SweepTask] = field(default_factory=list)
    """Every task of the grid."""
    selected: list[SweepTask] = field(default_factory=list)
    """The tasks this process runs: all, or the one of ``task_index``."""


def refuse_old_format(args: Sequence[str]) -> None:
    """Refuse the sweep format of before (top-level ``widths``, ``model.width_arg``, ``probe``, ``module``...).

    Args:
        args: the command line of ``run`` (its ``--config`` files are read).

    Returns:
        None when there is no old key.

    Raises:
        ValueError: naming the old keys found and how each is written now.
    """
    found = []
    for path in _config_paths(args):
        try:
            content = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
        except yaml.YAMLError:
            content = None  # the parser says what is wrong with it
        found += _old_keys(content if isinstance(content, dict) else {})
    for arg in args:
        if arg.startswith("--") and arg != "--config" and not arg.startswith("--config="):
            name = arg[2:].split("=", 1)[0]
            found += [k for k in _OLD_KEYS if name == k or name.startswith(k + ".")]
    found = list(dict.fromkeys(found))
    if found:
        advice = "; ".join(f"`{key}`: {_OLD_KEYS[key]}" for key in found)
        raise ValueError(
            f"{', '.join(f'`{k}`' for k in found)} belong to the old sweep format. A sweep config is now a recipe "
            "config (`seed_everything`, `trainer`, `model` with `model.net`, `data`) plus a `sweep:` section "
            f"({', '.join(SWEEP_OPTIONS)}). {advice}. Example: recipes/configs/sweeps/dd_sweep_cpu.yaml"
        )


def _config_paths(args: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _old_keys(content: Mapping) -> list[str]:
    found = [key for key in content if key in _OLD_KEYS]
    model = content.get("model")
    if isinstance(model, Mapping):
        found += [f"model.{key}" for key in model if f"model.{key}" in _OLD_KEYS]
    return found


def parse_arguments(args: Sequence[str]) -> tuple[Any, Namespace]:
    """Parse ``run``'s command line with the recipes' parser plus the ``sweep`` section.

    Args:
        args: e.g. ``["--config", "recipe.yaml", "--config", "sweep.yaml", "--sweep.task_index", "3"]``.

    Returns:
        ``(parser, config)``.

    Raises:
        ValueError: for the old sweep format, or a ``seed_everything`` that is not an int >= 0.
        SystemExit: for keys or values the parser refuses (with its message), and after ``--help`` or
            ``--print_config``.
    """
    refuse_old_format(args)
    cli = SweepCLI(
        ClassificationModule,
        CIFARDataModule,
        subclass_mode_data=True,
        run=False,
        auto_configure_optimizers=False,
        save_config_callback=None,
        seed_everything_default=0,
        parser_kwargs={
            "prog": "python -m lt_theory.sweep run",
            "description": "Train a recipe over a grid of config values (see lt_theory.sweep).",
        },
        args=list(args),
    )
    return cli.parser, cli.config


def validate_config(parser: Any, cfg: Namespace) -> SweepConfig:
    """Check a parsed sweep config and list its tasks.

    Args:
        parser: the parser of :func:`parse_arguments`.
        cfg: the parsed config.

    Returns:
        The :class:`SweepConfig`.

    Raises:
        ValueError: naming the key, for no or bad axes, an axis over a key the config does not have or one the
            sweep sets, an axis value the parser refuses, a bad seed, ``epsilon``, ``splits`` or
            ``task_index``, a data seed other than ``seed_everything``, splits without a data module that
            takes ``train_split``, or two DoubleDescentProbes.
    """
    options = cfg.sweep
    axes = check_axes(plain(options.axes))
    splits = check_splits(options.splits)
    if not (isinstance(options.epsilon, (int, float)) and 0 <= options.epsilon < 1):
        raise ValueError(f"`sweep.epsilon` must be a number in [0, 1), got {options.epsilon!r}")
    base = plain(cfg)
    for key in ("config", "sweep", "__path__"):
        base.pop(key, None)
    seed = base.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(
            f"`seed_everything` must be an int >= 0 in a sweep (every task seeds from it), got {seed!r}"
        )
    _check_data(base, seed, splits)
    _ensure_probe(base)
    for axis in axes:
        _check_axis(parser, base, axis)
    tasks = sweep_tasks(axes, splits)
    task_index = _task_index(options.task_index, tasks, axes, splits)
    first = base
    for key, value in tasks[0].values.items():
        first = with_value(first, key, value)
    build_net(first["model"]["net"])  # a network that cannot be built fails now, not in the first run
    return SweepConfig(
        parser=parser,
        base=base,
        axes=axes,
        splits=splits,
        seed=seed,
        directory=Path(options.logdir) / options.name,
        task_index=task_index,
        aggregate=bool(options.aggregate),
        epsilon=float(options.epsilon),
        rerun=bool(options.rerun),
        print_tasks=bool(options.print_tasks),
        tasks=tasks,
        selected=tasks if task_index is None else [tasks[task_index]],
    )


def _task_index(given: int | None, tasks: list[SweepTask], axes, splits) -> int | None:
    task_index = given
    from_slurm = os.environ.get("SLURM_ARRAY_TASK_ID", "").strip()
    if task_index is None and from_slurm:
        if not from_slurm.isdigit():
            raise ValueError(
                f"`sweep.task_index` comes from $SLURM_ARRAY_TASK_ID, which is not an int: {from_slurm!r}"
            )
        task_index = int(from_slurm)
    if task_index is not None and not 0 <= task_index < len(tasks):
        raise ValueError(
            f"`sweep.task_index` must be in [0, {len(tasks)}) for {describe_grid(axes, splits)}, got {task_index}"
        )
    return task_index


def _check_data(base: dict, seed: int, splits: int | None) -> None:
    data = base.get("data") or {}
    data_class = import_object(data.get("class_path", ""), "data.class_path")
    parameters = inspect.signature(data_class).parameters
    data_seed = (data.get("init_args") or {}).get("seed")
    default = getattr(parameters.get("seed"), "default", None)
    if data_seed not in (None, seed, default):
        raise ValueError(
            "`data.init_args.seed` is set by the sweep to `seed_everything` (initialisation, label noise, order "
            "and splits together): give `seed_everything` instead"
        )
    if splits is not None and "train_split" not in parameters:
        raise ValueError(
            "`sweep.splits` needs a data module that takes `train_split=(i, m)` (the lt_theory data modules "
            f"do); {data['class_path']} does not"
        )


def _is_probe(callback: Any) -> bool:
    if not isinstance(callback, Mapping) or not isinstance(callback.get("class_path"), str):
        return False
    try:
        found = import_object(callback["class_path"], "trainer.callbacks")
    except ValueError:
        return False
    return inspect.isclass(found) and issubclass(found, DoubleDescentProbe)


def _ensure_probe(base: dict) -> None:
    """Give ``base`` the one DoubleDescentProbe the sweep reads, measuring the final model; say what changed."""
    trainer = base.setdefault("trainer", {})
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, Mapping) else list(callbacks)
    probes = [c for c in callbacks if _is_probe(c)]
    if len(probes) > 1:
        raise ValueError(
            f"`trainer.callbacks` holds {len(probes)} DoubleDescentProbes: a sweep reads its final errors from one"
        )
    if not probes:
        callbacks.append(
            {
                "class_path": PROBE_CLASS_PATH,
                "init_args": {"train_subset_size": None, "measure_on_train_end": True},
            }
        )
        info(
            "[sweep] the config has no DoubleDescentProbe in `trainer.callbacks`: the sweep adds one "
            "(train_subset_size: null, measure_on_train_end: true) to measure each run's final model",
            SWEEP_LOGGER,
        )
    elif not (probes[0].get("init_args") or {}).get("measure_on_train_end"):
        probes[0].setdefault("init_args", {})["measure_on_train_end"] = True
        info(
            "[sweep] DoubleDescentProbe: measure_on_train_end set to true (the sweep reads the final model)",
            SWEEP_LOGGER,
        )
    trainer["callbacks"] = callbacks


def _check_axis(parser: Any, base: dict, axis: Axis) -> None:
    for reserved, why in _SET_BY_THE_SWEEP.items():
        if axis.key == reserved or axis.key.startswith(reserved + "."):
            raise ValueError(f"`sweep.axes`: `{axis.key}` cannot be an axis: {why}")
    try:
        config_value(base, axis.key)
    except KeyError as error:
        raise ValueError(
            f"`sweep.axes`: `{axis.key}` is not a key of this config, so its values would not change the runs "
            f"(a typo?): {error.args[0]}"
        ) from None
    for value in axis.values:
        try:
            parse_config(parser, with_value(base, axis.key, value))
        except ValueError as error:
            raise ValueError(f"`sweep.axes.{axis.key}`: the value {value!r} is refused: {error}") from None


def parse_config(parser: Any, config: dict) -> Namespace:
    """Parse a plain recipe config with the sweep's parser (its ``sweep`` section left at the defaults).

    Args:
        parser: the parser of :func:`parse_arguments`.
        config: a plain recipe config.

    Returns:
        The parsed config, every default filled in.

    Raises:
        ValueError: with the parser's message, for a key or value it refuses.
    """
    exit_on_error = getattr(parser, "exit_on_error", True)
    parser.exit_on_error = False
    try:
        return parser.parse_object(config)
    except Exception as error:  # argparse.ArgumentError, jsonargparse's own errors
        raise ValueError(" ".join(str(error).split())) from None
    finally:
        parser.exit_on_error = exit_on_error


def build_net(spec: Mapping[str, Any]) -> nn.Module:
    """The network of a ``model.net`` spec (``class_path`` / ``init_args``), built alone.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``.

    Returns:
        The network.

    Raises:
        ValueError: naming ``model.net``, when it cannot be built.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    try:
        return instantiate(parser, parser.parse_object({"net": dict(spec)})).net
    except Exception as error:  # argparse.ArgumentError, the network's own ValueError
        raise ValueError(f"`model.net` cannot be built: {' '.join(str(error).split())}") from None


def instantiate(parser: Any, cfg: Namespace) -> Namespace:
    """The classes of a parsed config, instantiated (``model``, ``data``, ``trainer.callbacks``, ...).

    Args:
        parser: the parser that parsed ``cfg``.
        cfg: a parsed config.

    Returns:
        The config with its classes instantiated.
    """
    method = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    return method(cfg)


def init_seed(sweep: SweepConfig, task: SweepTask, seed: int) -> int:
    """The initialisation seed: ``seed`` itself, or one derived from it per split in the bias-variance mode.

    Args:
        sweep: the sweep.
        task: the task.
        seed: the task's ``seed_everything``.

    Returns:
        The seed of the task's ``seed_everything`` in its recipe config.
    """
    if task.split is None:
        return seed
    return derived_seed("sweep-init", seed, task.split) % 2**31


def task_config(sweep: SweepConfig, task: SweepTask) -> dict:
    """The recipe config of one task: the axis values, the seeds, the split, the logger and the run folder.

    ``python recipes/resnet_cifar.py fit --config <run folder>/config.yaml`` trains the same run.

    Args:
        sweep: the validated sweep.
        task: one of its tasks.

    Returns:
        The plain recipe config.
    """
    config = copy.deepcopy(sweep.base)
    for key, value in task.values.items():
        config = with_value(config, key, value)
    seed = config["seed_everything"]
    data_args = config["data"].setdefault("init_args", {})
    if "seed" in inspect.signature(import_object(config["data"]["class_path"], "data.class_path")).parameters:
        data_args["seed"] = seed
    if task.split is not None:
        data_args["train_split"] = [task.split, sweep.splits]
    config["seed_everything"] = init_seed(sweep, task, seed)
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {
            "save_dir": str(sweep.directory),
            "name": "",
            "version": task.name,
            "default_hp_metric": False,
        },
    }
    config["trainer"]["default_root_dir"] = str(sweep.directory / task.name)
    return config


def run_settings(config: Mapping[str, Any]) -> dict:
    """What a run's result depends on: its recipe config as dotted keys, without where it logs.

    A stored result is reused only under the same settings; the keys that differ are named.

    Args:
        config: a task's recipe config (:func:`task_config`).

    Returns:
        ``{dotted key: value}`` (lists are values: ``trainer.callbacks`` is one setting).
    """
    flat = flatten(comparable(config))
    for key in ("trainer.logger", "trainer.default_root_dir"):
        for name in [k for k in flat if k == key or k.startswith(key + ".")]:
            del flat[name]
    return flat


def recipe_yaml(config: Mapping[str, Any], task: SweepTask) -> str:
    """The recipe config of a task as YAML, with a header saying how to train it alone.

    Args:
        config: the task's recipe config.
        task: the task.

    Returns:
        The YAML text.
    """
    header = (
        f"# Task {task.index} of a sweep ({task.label()}): this run's recipe config.\n"
        "#   python recipes/resnet_cifar.py fit --config <this file>   trains it again\n"
    )
    return header + yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False)


def grid_summary(sweep: SweepConfig) -> str:
    """One line: the grid and where the runs go.

    Args:
        sweep: the validated sweep.

    Returns:
        e.g. ``hidden: 10 values = 10 tasks, in runs/dd_sweep_cpu``.
    """
    return f"{describe_grid(sweep.axes, sweep.splits)}, in {sweep.directory}"
