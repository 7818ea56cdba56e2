r"""Model-wise double descent: train a family of models over a width grid, then draw the curve and say where
its peak and its interpolation threshold are, with the bias-variance decomposition as an option.

Classical theory says test error is U-shaped in model capacity; deep networks show double descent instead:
the test error peaks near the *interpolation threshold*, the smallest model that fits its (noisy) training
set, and falls again beyond it (Belkin, Hsu, Ma & Mandal, PNAS 2019, "Reconciling modern machine-learning
practice and the classical bias-variance trade-off"; Nakkiran, Kaplun, Bansal, Yang, Barak & Sutskever, ICLR
2020, "Deep Double Descent": PreAct ResNet-18 of width :math:`k = 1..64` on CIFAR-10 with 15% label noise,
Adam at 1e-4 for 4K epochs, peak near :math:`k = 10..12`). For a practitioner the question is whether making
the network wider helps or hurts; this module answers it from a sweep.

**run**: one run per (width, split) task. Each run trains ``model.class_path`` with ``model.width_arg``
set to the width, with :class:`lt_theory.module.ClassificationModule` and a :class:`DoubleDescentProbe`
that measures the final model (and, every ``probe.every_n_epochs``, the epoch-wise curve). Every run logs
its hyperparameters (``width``, ``label_noise``, ``seed``, ``num_parameters``, ``model``; ``split`` and
``num_splits`` in the bias-variance mode) with its final metrics ``dd/final_train_error``,
``dd/final_test_error``, ``dd/final_test_loss`` (and the clean/noisy ones when the data has label-noise
records) through ``TensorBoardLogger.log_hyperparams``, so TensorBoard's HPARAMS panel shows error against
width, and writes them to ``result.json`` in its folder. Runs go sequentially on one machine, reusing one
data module (restored to its initial state before each run, so a run sees the same data order as it would
alone), or one per task of a SLURM job array (``--task_index``, default ``$SLURM_ARRAY_TASK_ID``). A run whose
``result.json`` exists is not trained again if it was made with the same settings, and refused
with the settings that differ otherwise (``--rerun true`` retrains it from an empty folder).

**aggregate**: reads every ``result.json`` under the sweep folder, averages the runs of each width, and draws
the model-wise curve (train and test error against width and against parameter count) into the TensorBoard
run ``<sweep>/aggregate``: scalars ``dd/<metric>_by_width`` (step = width) and ``dd/<metric>_by_params``
(step = parameter count), the figure ``dd/modelwise_curve``, and the text ``dd/modelwise_summary``. The
interpolation threshold is the smallest width whose mean train error is at most ``epsilon``
(:func:`lt_theory.measures.risk.interpolation_threshold`); the peaks are those of
:func:`lt_theory.measures.risk.find_peaks` on the test error over the widths, unsmoothed, with the standard
error of each point (binomial on the test set, or between runs of a width if larger) as the noise floor
(logged as ``dd/peak_width``
and ``dd/peak_test_error`` at the peak's width, and ``dd/interpolation_width``). The verdict says whether
wider helps or hurts at the top of the grid: wider helps when the widest model's test error is within two
binomial standard errors, :math:`2\sqrt{e(1-e)/N}` on :math:`N` test points, of the lowest test error of
the grid. A sequential sweep aggregates at its end; a job array runs ``aggregate`` once its tasks are done.

**Bias-variance mode** (``--splits m``, Yang, Yu, You, Steinhardt & Ma, ICML 2020, "Rethinking Bias-Variance
Trade-off for Generalization of Neural Networks"): at every width, ``m`` models are trained, model ``i`` on
the ``i``-th of ``m`` disjoint parts of the one noisy training set (the data module's
``train_split=(i, m)``) with its own initialisation; their test logits give, per width,
:func:`lt_theory.measures.risk.cross_entropy_bias_variance` (``dd/bias_squared_by_width``,
``dd/variance_by_width``, ``dd/risk_by_width``) and :func:`lt_theory.measures.risk.mse_bias_variance` on
the softmax probabilities (``dd/mse_*_by_width``), and the figure ``dd/bias_variance``. Yang et al. find
the bias falling monotonically with width and the variance unimodal, its peak raised and moved by label
noise. The quantities are those of models trained on ``n / m`` examples.

Usage::

    python -m lt_theory.sweep run --config recipes/configs/sweeps/dd_sweep_cpu.yaml
    python -m lt_theory.sweep run --config recipes/configs/sweeps/dd_sweep_resnet18k_cifar10.yaml --print_tasks true
    python -m lt_theory.sweep run --config ... --task_index 3        # one task of a SLURM array
    python -m lt_theory.sweep run --widths '[1, 2, 4]' --splits 4 --data.label_noise 0.2 ...
    python -m lt_theory.sweep aggregate --logdir runs/dd_sweep_cpu

The model family is any class or function (``model.class_path``) with a width argument (``model.width_arg``:
``k`` of :class:`lt_theory.models.PreActResNet18`, ``hidden`` of :class:`lt_theory.models.MLP`, ``width`` of
:class:`lt_theory.models.CIFARResNet`); ``model.input_pool`` average-pools the images before it, for CPU-sized
sweeps. Every other key of ``run`` is printed by ``python -m lt_theory.sweep run --help`` (``--model.*``,
``--data.*``, ``--module.*`` for :class:`ClassificationModule`, ``--trainer.*`` for the Lightning
``Trainer``, ``--probe.*`` for :class:`DoubleDescentProbe`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import shutil
import statistics
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lt_theory import loggers
from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.data.datamodule import derived_seed
from lt_theory.figures import FONT_SIZE, new_figure
from lt_theory.measures.risk import (
    SMOOTHING_METHODS,
    Peak,
    cross_entropy_bias_variance,
    find_peaks,
    interpolation_threshold,
    mse_bias_variance,
)
from lt_theory.module import ClassificationModule
from lt_theory.training.stored import changed_settings, comparable, read_json, write_json

__all__ = [
    "DEFAULT_WIDTHS",
    "ModelWiseCurve",
    "SweepTask",
    "aggregate",
    "build_model",
    "check_splits",
    "check_widths",
    "main",
    "model_wise_curve",
    "run_sweep",
    "sweep_tasks",
]

DEFAULT_WIDTHS = (1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64)
"""The width grid of PreAct ResNet-18 (Nakkiran et al. 2019 sweep k = 1..64; the peak is near 10-12)."""

RESULT_FILE = "result.json"
SETTINGS_FILE = "settings.json"
PREDICTIONS_FILE = "test_predictions.pt"
AGGREGATE_DIR = "aggregate"
AGGREGATE_FILE = "aggregate.json"
_CURVE_METRICS = (
    "train_error",
    "test_error",
    "test_loss",
    "train_error_clean",
    "train_error_noisy",
    "memorized_fraction",
)


# ------------------------------------------------------------------------------------------------------------
# Argument checks and the task list.


def check_widths(widths: object) -> tuple[int, ...]:
    """The width grid, validated and sorted.

    Args:
        widths: a non-empty sequence of distinct ints >= 1.

    Returns:
        The widths in increasing order.

    Raises:
        ValueError: for an empty grid, a width that is not an int >= 1, or a repeated width.

    Example:
        >>> check_widths([4, 1, 2])
        (1, 2, 4)
    """
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ValueError(f"`widths` must be a non-empty list of ints >= 1, got {widths!r}")
    if len(widths) == 0:
        raise ValueError("`widths` must be a non-empty list of ints >= 1, got an empty grid")
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or w < 1]
    if bad:
        raise ValueError(f"`widths` must hold ints >= 1, got {bad} in {list(widths)}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"`widths` must not repeat a width, got {list(widths)}")
    return tuple(sorted(widths))


def check_splits(splits: object) -> int | None:
    """The number of disjoint training splits per width of the bias-variance mode.

    Args:
        splits: None (no bias-variance mode) or an int >= 2 (a sample variance needs two models).

    Returns:
        ``splits``.

    Raises:
        ValueError: if ``splits`` is neither None nor an int >= 2.
    """
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 2):
        raise ValueError(
            f"`splits` must be None or an int m >= 2 (m models on m disjoint parts of the training set "
            f"per width), got {splits!r}"
        )
    return splits


@dataclass(frozen=True)
class SweepTask:
    """One run of a sweep: a width and, in the bias-variance mode, the training split."""

    width: int
    split: int | None = None

    @property
    def name(self) -> str:
        """The run's folder and TensorBoard version: ``width_0008`` or ``width_0008_split_1``."""
        base = f"width_{self.width:04d}"
        return base if self.split is None else f"{base}_split_{self.split}"


def sweep_tasks(widths: Sequence[int], splits: int | None = None) -> list[SweepTask]:
    """Every task of a sweep, in the order of their task index: split by split, width by width.

    Task ``i`` trains width ``widths[i % len(widths)]`` on split ``i // len(widths)``; a SLURM array
    ``--array=0-(len - 1)`` runs them all.

    Args:
        widths: the width grid (validated by :func:`check_widths`).
        splits: None, or the number ``m >= 2`` of disjoint training splits per width.

    Returns:
        The tasks.

    Raises:
        ValueError: for a bad grid or number of splits.

    Example:
        >>> [task.name for task in sweep_tasks([2, 1], splits=2)]
        ['width_0001_split_0', 'width_0002_split_0', 'width_0001_split_1', 'width_0002_split_1']
    """
    widths = check_widths(widths)
    splits = check_splits(splits)
    if splits is None:
        return [SweepTask(w) for w in widths]
    return [SweepTask(w, s) for s in range(splits) for w in widths]


# ------------------------------------------------------------------------------------------------------------
# Models.


def _import(class_path: str, name: str) -> Callable:
    module_name, _, attribute = class_path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"`{name}` must be an importable class or function path, got {class_path!r}: {error}"
        ) from None
    if not callable(factory):
        raise ValueError(f"`{name}` must name a class or function, got {class_path!r}")
    return factory


def build_model(
    class_path: str,
    width_arg: str,
    width: int,
    init_args: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    input_pool: int = 1,
) -> nn.Module:
    """A model of the family at one width: ``factory(**init_args, <width_arg>=width)``.

    A sequence-valued width argument (the ``hidden`` of :class:`lt_theory.models.MLP`) gets every entry set
    to the width, keeping the length of ``init_args[width_arg]`` if given, else of the factory's default:
    ``MLP`` with ``hidden`` becomes ``MLP(hidden=(w,))``, and with ``init_args={"hidden": [0, 0]}``,
    ``MLP(hidden=[w, w])``. ``num_classes`` is passed when the factory takes it and ``init_args`` does not
    set it.

    Args:
        class_path: the model class or factory function, e.g. ``"lt_theory.models.PreActResNet18"``.
        width_arg: the name of its width argument, e.g. ``"k"``.
        width: the width, an int >= 1.
        init_args: the other arguments.
        num_classes: the number of classes of the data.
        input_pool: average-pool the input images by this factor (``nn.AvgPool2d``) before the model, a
            CPU-sized stand-in for full resolution (no parameters: the counts are unchanged); 1 for none.

    Returns:
        The model (``nn.Sequential(nn.AvgPool2d(input_pool), model)`` when ``input_pool > 1``).

    Raises:
        ValueError: if ``class_path`` cannot be imported, the factory has no argument ``width_arg``,
            ``init_args`` sets a scalar ``width_arg``, the factory does not return an ``nn.Module``, or
            ``input_pool`` is not an int >= 1.

    Example:
        >>> build_model("lt_theory.models.MLP", "hidden", 3, {"in_shape": [4]}, num_classes=2)
        MLP(...)
    """
    if isinstance(input_pool, bool) or not isinstance(input_pool, int) or input_pool < 1:
        raise ValueError(f"`model.input_pool` must be an int >= 1, got {input_pool!r}")
    factory = _import(class_path, "model.class_path")
    init_args = dict(init_args or {})
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if width_arg not in parameters and not takes_kwargs:
        raise ValueError(
            f"`model.width_arg` must name an argument of {class_path}, got {width_arg!r}; "
            f"it takes {sorted(parameters)}"
        )
    template = init_args.get(width_arg)
    if template is None and width_arg in parameters:
        template = parameters[width_arg].default
    if isinstance(template, (list, tuple)):
        init_args[width_arg] = type(template)([width] * max(1, len(template)))
    elif width_arg in init_args:
        raise ValueError(
            f"`model.init_args` must not set the swept width argument {width_arg!r} (got {template!r}); "
            "the sweep sets it (a list value is kept as a template of its length)"
        )
    else:
        init_args[width_arg] = width
    if num_classes is not None and "num_classes" in parameters and "num_classes" not in init_args:
        init_args["num_classes"] = num_classes
    model = factory(**init_args)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"`model.class_path` must build a torch.nn.Module, {class_path} gave {type(model).__name__}"
        )
    return model if input_pool == 1 else nn.Sequential(nn.AvgPool2d(input_pool), model)


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# The sweep.


@dataclass
class _Sweep:
    """A validated ``run`` configuration."""

    widths: tuple[int, ...]
    splits: int | None
    model_class_path: str
    model_width_arg: str
    model_init_args: dict
    model_input_pool: int
    data_class_path: str
    data_init_args: dict
    module_args: dict
    trainer_args: dict
    probe_args: dict
    seed: int
    directory: Path
    task_index: int | None
    aggregate: bool
    epsilon: float
    rerun: bool
    tasks: list[SweepTask] = field(default_factory=list)


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, Namespace):
        return value.as_dict()
    return dict(value)


def _validate(cfg: Namespace) -> _Sweep:
    widths = check_widths(list(cfg.widths) if cfg.widths is not None else None)
    splits = check_splits(cfg.splits)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {cfg.seed!r}")
    if not (isinstance(cfg.epsilon, (int, float)) and 0 <= cfg.epsilon < 1):
        raise ValueError(f"`epsilon` must be a number in [0, 1), got {cfg.epsilon!r}")
    task_index = cfg.task_index
    from_slurm = os.environ.get("SLURM_ARRAY_TASK_ID", "").strip()
    if task_index is None and from_slurm:
        if not from_slurm.isdigit():
            raise ValueError(
                f"`task_index` comes from $SLURM_ARRAY_TASK_ID, which is not an int: {from_slurm!r}"
            )
        task_index = int(from_slurm)
    tasks = sweep_tasks(widths, splits)
    if task_index is not None and not 0 <= task_index < len(tasks):
        raise ValueError(
            f"`task_index` must be in [0, {len(tasks)}) for {len(widths)} widths"
            + (f" x {splits} splits" if splits else "")
            + f", got {task_index}"
        )
    data = cfg.data
    data_class_path = data.class_path if isinstance(data, Namespace) else data["class_path"]
    data_init_args = _as_dict(data.init_args if isinstance(data, Namespace) else data.get("init_args"))
    data_seed = data_init_args.pop("seed", None)  # jsonargparse fills in the class default
    default_seed = inspect.signature(_import(data_class_path, "data.class_path")).parameters.get("seed")
    if data_seed not in (None, cfg.seed, getattr(default_seed, "default", None)):
        raise ValueError(
            "`data.init_args.seed` is set by the sweep's `--seed` (initialisation, label noise, order and "
            "splits together): give `--seed` instead"
        )
    if splits is not None:
        data_class = _import(data_class_path, "data.class_path")
        if "train_split" not in inspect.signature(data_class).parameters:
            raise ValueError(
                f"`splits` needs a data module that takes `train_split=(i, m)` (the lt_theory data modules do); "
                f"{data_class_path} does not"
            )
    model_init_args = _as_dict(cfg.model.init_args)
    build_model(
        cfg.model.class_path, cfg.model.width_arg, widths[0], model_init_args, 2, cfg.model.input_pool
    )
    sweep = _Sweep(
        widths=widths,
        splits=splits,
        model_class_path=cfg.model.class_path,
        model_width_arg=cfg.model.width_arg,
        model_init_args=model_init_args,
        model_input_pool=cfg.model.input_pool,
        data_class_path=data_class_path,
        data_init_args=data_init_args,
        module_args=_as_dict(cfg.module),
        trainer_args=_as_dict(cfg.trainer),
        probe_args=_as_dict(cfg.probe),
        seed=cfg.seed,
        directory=Path(cfg.logdir) / cfg.name,
        task_index=task_index,
        aggregate=bool(cfg.aggregate),
        epsilon=float(cfg.epsilon),
        rerun=bool(cfg.rerun),
    )
    sweep.tasks = tasks if task_index is None else [tasks[task_index]]
    return sweep


def _build_datamodule(sweep: _Sweep, split: int | None) -> LightningDataModule:
    data_class = _import(sweep.data_class_path, "data.class_path")
    init_args = dict(sweep.data_init_args)
    if "seed" in inspect.signature(data_class).parameters:
        init_args["seed"] = sweep.seed  # one seed: initialisation, label noise, order, augmentation, splits
    if split is not None:
        init_args["train_split"] = (split, sweep.splits)
    return data_class(**init_args)


def _settings(sweep: _Sweep) -> dict:
    """What a run's result depends on besides its width and split: a result is reused only under the same."""
    return comparable(
        {
            "model": [sweep.model_class_path, sweep.model_width_arg, sweep.model_init_args],
            "input_pool": sweep.model_input_pool,
            "data": [sweep.data_class_path, sweep.data_init_args],
            "module": sweep.module_args,
            "trainer": sweep.trainer_args,
            "probe": sweep.probe_args,
            "seed": sweep.seed,
            "splits": sweep.splits,
        }
    )


def _run_seed(sweep: _Sweep, task: SweepTask) -> int:
    """The initialisation seed: ``seed`` itself, or one derived from it per split in the bias-variance mode."""
    if task.split is None:
        return sweep.seed
    return derived_seed("sweep-init", sweep.seed, task.split) % 2**31


def _train(sweep: _Sweep, task: SweepTask, datamodule: LightningDataModule, data_state: dict) -> dict | None:
    """Train one task and return its result record (on global rank zero; None elsewhere)."""
    run_dir = sweep.directory / task.name
    result_path = run_dir / RESULT_FILE
    settings = _settings(sweep)
    if result_path.exists() and not sweep.rerun:
        done = read_json(result_path)
        changed = changed_settings(done.get("settings", {}), settings)
        if changed:
            raise ValueError(
                f"{run_dir} holds a run made with other settings ({', '.join(changed)} differ): give this sweep "
                "another `--name`, or `--rerun true` to train it again with the new settings"
            )
        print(f"[sweep] {task.name}: done already ({result_path}); `--rerun true` trains it again")
        return done
    if run_dir.exists() and (sweep.rerun or not _same_settings_in_progress(run_dir, settings)):
        shutil.rmtree(run_dir)  # events, checkpoints (a SLURM requeue would resume them) and results
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / SETTINGS_FILE, settings)
    datamodule.load_state_dict(data_state)  # the same data order and augmentation as a lone run
    seed = _run_seed(sweep, task)
    seed_everything(seed, workers=True, verbose=False)
    num_classes = getattr(datamodule, "num_classes", None) or sweep.model_init_args.get("num_classes")
    if num_classes is None:
        raise ValueError("the data module has no `num_classes`: give `model.init_args.num_classes`")
    net = build_model(
        sweep.model_class_path,
        sweep.model_width_arg,
        task.width,
        sweep.model_init_args,
        num_classes=num_classes,
        input_pool=sweep.model_input_pool,
    )
    module = ClassificationModule(net, num_classes=num_classes, **sweep.module_args)
    probe = DoubleDescentProbe(**sweep.probe_args, measure_on_train_end=True)
    params: dict[str, Any] = {
        "width": task.width,
        "seed": sweep.seed,
        "num_parameters": _num_parameters(net),
        "model": sweep.model_class_path,
    }
    label_noise = getattr(datamodule, "label_noise", None)
    if label_noise is not None:
        params["label_noise"] = float(label_noise)
    if task.split is not None:
        params.update(split=task.split, num_splits=sweep.splits)
    logger = TensorBoardLogger(
        save_dir=str(sweep.directory), name="", version=task.name, default_hp_metric=False
    )
    trainer = Trainer(
        **sweep.trainer_args,
        logger=logger,
        callbacks=[probe, _FinalHyperparameters(probe, params)],
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    if not probe.history:
        raise RuntimeError(
            f"{task.name}: training ended before any step, so there is no final model to measure"
        )
    final = _final_metrics(probe)
    if not trainer.is_global_zero:
        return None
    record = {
        **params,
        "label_noise": params.get("label_noise"),
        "split": task.split,
        "num_splits": sweep.splits,
        "epochs": probe.history[-1]["epoch"],
        "global_step": trainer.global_step,
        "metrics": final,
        "num_test": None if probe.last_test_labels is None else len(probe.last_test_labels),
        "test_predictions": None,
        "settings": settings,
    }
    if task.split is not None and probe.last_test_logits is not None:
        torch.save(
            {"logits": probe.last_test_logits, "labels": probe.last_test_labels}, run_dir / PREDICTIONS_FILE
        )
        record["test_predictions"] = PREDICTIONS_FILE
    write_json(result_path, record)
    print(
        f"[sweep] {task.name}: {record['num_parameters']:,} parameters, train error "
        f"{final.get('train_error', math.nan):.4f}, test error {final.get('test_error', math.nan):.4f}"
    )
    return record


def _same_settings_in_progress(run_dir: Path, settings: Mapping[str, Any]) -> bool:
    """Whether an unfinished run in ``run_dir`` (a preempted SLURM task) was started with these settings, so
    that its checkpoint may be resumed."""
    path = run_dir / SETTINGS_FILE
    return path.exists() and not changed_settings(read_json(path), settings)


def _final_metrics(probe: DoubleDescentProbe) -> dict[str, float]:
    return {k: float(v) for k, v in probe.history[-1].items() if k not in ("epoch", "step")}


class _FinalHyperparameters(Callback):
    """Logs the run's hyperparameters with its final metrics, once the probe has measured the final model.

    At fit end, before Lightning finalises the loggers: ``log_hyperparams(params, {"dd/final_<metric>": ...})``
    writes TensorBoard's HPARAMS entry and the metrics as scalars at the last step.
    """

    def __init__(self, probe: DoubleDescentProbe, params: dict[str, Any]) -> None:
        self.probe, self.params = probe, params

    def on_fit_end(self, trainer: Trainer, pl_module) -> None:
        if not self.probe.history:
            return
        metrics = {f"dd/final_{k}": v for k, v in _final_metrics(self.probe).items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(self.params, metrics, step=trainer.global_step)


def run_sweep(sweep: _Sweep) -> list[dict]:
    """Train the tasks of a validated sweep, one data module per split reused across its widths.

    Returns:
        The result records of the tasks run (or found done), on global rank zero.
    """
    results = []
    for split in sorted({task.split for task in sweep.tasks}, key=lambda s: -1 if s is None else s):
        datamodule = _build_datamodule(sweep, split)
        data_state = datamodule.state_dict()
        for task in (t for t in sweep.tasks if t.split == split):
            record = _train(sweep, task, datamodule, data_state)
            if record is not None:
                results.append(record)
    return results


# ------------------------------------------------------------------------------------------------------------
# The model-wise curve.


@dataclass
class ModelWiseCurve:
    """The model-wise curve of a sweep and what it says (see :func:`model_wise_curve`)."""

    widths: list[int]
    """The widths, increasing."""
    num_parameters: list[int]
    """Parameter count of each width."""
    metrics: dict[str, list[float]]
    """``train_error``, ``test_error``, ``test_loss``, ... per width: the mean over that width's runs."""
    runs: list[int]
    """Number of runs averaged at each width."""
    epsilon: float
    """The train error at or below which a width counts as interpolating."""
    interpolation_width: int | None
    """The smallest width whose train error is at most ``epsilon``, or None."""
    peaks: list[Peak]
    """Peaks of the test error over the widths (:func:`lt_theory.measures.risk.find_peaks`)."""
    best_width: int
    """The width of lowest test error."""
    wider_helps: bool
    """Whether the widest model's test error is within two standard errors of the lowest."""
    tolerance: float
    """Those two standard errors (0.01 when the test-set size is unknown)."""
    verdict: str
    """A few sentences: the threshold, the peak, and whether wider helps or hurts."""
    bias_variance: dict[str, list[float]] = field(default_factory=dict)
    """``bias_squared``, ``variance``, ``risk`` (cross-entropy) and ``mse_*`` per width, bias-variance mode."""

    def as_dict(self) -> dict:
        """A JSON-ready dict (peaks as dicts)."""
        out = dict(self.__dict__)
        out["peaks"] = [peak._asdict() for peak in self.peaks]
        return out


def model_wise_curve(
    results: Sequence[Mapping[str, Any]],
    epsilon: float = 0.01,
    smoothing: str | None = None,
    window: int = 3,
    load_predictions: Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor] | None] | None = None,
) -> ModelWiseCurve:
    """The model-wise curve of a sweep: its metrics per width, interpolation threshold, peaks and verdict.

    Each record is what a run wrote to ``result.json``: ``width``, ``num_parameters``, ``metrics``
    (``train_error``, ``test_error``, ...) and optionally ``num_test``, ``split``, ``num_splits``. Runs of the
    same width (splits, or seeds) are averaged. In the bias-variance mode, ``load_predictions(record)`` gives
    each run's ``{"logits": (N, C), "labels": (N,)}`` on the test set, and a width with all its ``num_splits``
    runs gets the decompositions.

    Args:
        results: the run records.
        epsilon: the train error at or below which a width interpolates, in [0, 1).
        smoothing, window: passed to :func:`lt_theory.measures.risk.find_peaks` (window counts widths). No
            smoothing by default: a width grid is coarse, a peak can be one width wide, and the detector's
            noise floor is the known standard error of the test error (``num_test`` in the records).
        load_predictions: reads a run's test predictions; None skips the bias-variance decomposition.

    Returns:
        :class:`ModelWiseCurve`.

    Raises:
        ValueError: for no records, a record without ``width`` / ``metrics.test_error``, runs of one width
            with different parameter counts, or runs at different label-noise rates.

    Example:
        >>> runs = [{"width": w, "num_parameters": 10 * w, "metrics": {"train_error": t, "test_error": e}}
        ...         for w, t, e in [(1, .5, .40), (2, .3, .30), (3, .1, .35), (4, 0., .45), (5, 0., .30),
        ...                         (6, 0., .25), (7, 0., .20)]]
        >>> curve = model_wise_curve(runs, smoothing=None)
        >>> curve.interpolation_width, [p.position for p in curve.peaks], curve.wider_helps
        (4, [4], True)
    """
    if not results:
        raise ValueError("`results` is empty: no run of the sweep has finished (no result.json found)")
    if not (isinstance(epsilon, (int, float)) and 0 <= epsilon < 1):
        raise ValueError(f"`epsilon` must be a number in [0, 1), got {epsilon!r}")
    noise = {r.get("label_noise") for r in results}
    if len(noise) > 1:
        raise ValueError(
            f"the runs have different label-noise rates {sorted(noise, key=str)}: aggregate one rate at a time "
            "(give each rate its own `--name`)"
        )
    kinds = {(r.get("split") is None, r.get("num_splits")) for r in results}
    if len(kinds) > 1:
        raise ValueError(
            "the runs mix full-data runs and bias-variance runs, or different numbers of splits "
            f"{sorted({k[1] for k in kinds}, key=str)}: models trained on n and on n/m examples cannot be averaged; "
            "give each its own `--name`"
        )
    by_width: dict[int, list[Mapping[str, Any]]] = {}
    for record in results:
        if "width" not in record or "test_error" not in record.get("metrics", {}):
            raise ValueError(f"a run record needs `width` and `metrics.test_error`, got {dict(record)}")
        by_width.setdefault(int(record["width"]), []).append(record)
    widths = sorted(by_width)
    num_parameters = []
    for width in widths:
        counts = {int(r.get("num_parameters", -1)) for r in by_width[width]}
        if len(counts) != 1:
            raise ValueError(f"the runs of width {width} have different parameter counts {sorted(counts)}")
        num_parameters.append(counts.pop())
    metrics: dict[str, list[float]] = {}
    for name in _CURVE_METRICS:
        if any(name in r["metrics"] for r in results):
            metrics[name] = [_mean(r["metrics"].get(name, math.nan) for r in by_width[w]) for w in widths]
    test = metrics["test_error"]
    train = metrics.get("train_error", [math.nan] * len(widths))
    threshold = interpolation_threshold(widths, train, epsilon)
    noise_level = _test_error_noise_level(by_width, widths, test)
    peaks = find_peaks(test, widths, smoothing=smoothing, window=window, noise_level=noise_level)
    finite = [i for i, e in enumerate(test) if math.isfinite(e)]
    best = min(finite, key=lambda i: test[i]) if finite else len(widths) - 1
    sizes = [r.get("num_test") for r in results if r.get("num_test")]
    tolerance = 0.01
    if sizes and math.isfinite(test[best]):
        e = min(max(test[best], 0.0), 1.0)
        tolerance = 2 * math.sqrt(max(e * (1 - e), 1e-12) / min(sizes))
    wider_helps = math.isfinite(test[-1]) and test[-1] <= test[best] + tolerance
    curve = ModelWiseCurve(
        widths=widths,
        num_parameters=num_parameters,
        metrics=metrics,
        runs=[len(by_width[w]) for w in widths],
        epsilon=float(epsilon),
        interpolation_width=threshold,
        peaks=peaks,
        best_width=widths[best],
        wider_helps=bool(wider_helps),
        tolerance=tolerance,
        verdict="",
    )
    if load_predictions is not None:
        curve.bias_variance = _bias_variance(by_width, widths, load_predictions)
    curve.verdict = _verdict(curve, results[0].get("label_noise"))
    return curve


def _test_error_noise_level(
    by_width: Mapping[int, Sequence[Mapping[str, Any]]], widths: Sequence[int], test: Sequence[float]
) -> float | None:
    r"""The standard deviation of one point of the mean test-error curve, for the peak detector.

    At each width, the larger of the binomial standard error of an error rate on ``num_test`` examples,
    :math:`\sqrt{e(1-e)/N}` (not divided by the number of runs: they share one test set), and the standard
    error of the mean of the runs' test errors when there are two or more; the largest over the widths.
    None when no run recorded ``num_test`` (then :func:`find_peaks` estimates the noise from the curve).
    """
    levels = []
    for width, error in zip(widths, test):
        runs = by_width[width]
        sizes = [r["num_test"] for r in runs if r.get("num_test")]
        if not sizes or not math.isfinite(error):
            continue
        e = min(max(error, 0.0), 1.0)
        level = math.sqrt(e * (1 - e) / min(sizes))  # the runs share the test set: its error does not average
        errors = [float(r["metrics"]["test_error"]) for r in runs]
        if len(errors) >= 2 and all(math.isfinite(x) for x in errors):
            level = max(level, statistics.stdev(errors) / math.sqrt(len(errors)))
        levels.append(level)
    return max(levels) if levels else None


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return math.fsum(values) / len(values) if values else math.nan


def _bias_variance(by_width, widths, load_predictions) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    names = ("bias_squared", "variance", "risk", "mse_bias_squared", "mse_variance", "mse_risk")
    for width in widths:
        runs = [r for r in by_width[width] if r.get("split") is not None]
        m = runs[0].get("num_splits") if runs else None
        if runs and sorted(r["split"] for r in runs) != list(range(m or 0)):
            missing = sorted(set(range(m or 0)) - {r["split"] for r in runs})
            warnings.warn(
                f"width {width}: the bias-variance decomposition needs the runs of all {m} splits; "
                f"split(s) {missing} have not finished (their SLURM tasks?): its bias and variance are NaN",
                UserWarning,
                stacklevel=2,
            )
        values = dict.fromkeys(names, math.nan)
        splits = sorted(r["split"] for r in runs)
        if m and splits == list(range(m)):
            predictions = [load_predictions(r) for r in sorted(runs, key=lambda r: r["split"])]
            if all(p is not None for p in predictions):
                labels = predictions[0]["labels"]
                if any(not torch.equal(p["labels"], labels) for p in predictions):
                    raise ValueError(f"the runs of width {width} were tested on different test sets")
                logits = torch.stack([p["logits"].double() for p in predictions])  # (m, N, C)
                ce = cross_entropy_bias_variance(logits, labels)
                mse = mse_bias_variance(torch.softmax(logits, dim=-1), labels)
                values = {
                    "bias_squared": float(ce.bias_squared),
                    "variance": float(ce.variance),
                    "risk": float(ce.risk),
                    "mse_bias_squared": float(mse.bias_squared),
                    "mse_variance": float(mse.variance),
                    "mse_risk": float(mse.risk),
                }
        for name in names:
            out.setdefault(name, []).append(values[name])
    if all(math.isnan(v) for v in out["risk"]):
        return {}
    return out


def _verdict(curve: ModelWiseCurve, label_noise) -> str:
    widths, test = curve.widths, curve.metrics["test_error"]
    index = {w: i for i, w in enumerate(widths)}
    noise = "" if label_noise is None else f", label noise {label_noise:g}"
    parts = [
        f"Model-wise curve over widths {widths[0]}..{widths[-1]} ({curve.num_parameters[0]:,} to "
        f"{curve.num_parameters[-1]:,} parameters{noise})."
    ]
    if curve.interpolation_width is None:
        parts.append(
            f"No width interpolates the training set (train error <= {curve.epsilon:g}): the interpolation "
            f"threshold lies beyond width {widths[-1]}."
        )
    else:
        k = curve.interpolation_width
        parts.append(
            f"Interpolation threshold: width {k} (train error <= {curve.epsilon:g} from width {k} on)."
        )
    for peak in curve.peaks:
        where = ""
        if curve.interpolation_width is not None:
            gap = index[peak.position] - index[curve.interpolation_width]
            where = (
                " at the interpolation threshold, as double descent predicts"
                if abs(gap) <= 1
                else f", {abs(gap)} grid steps {'below' if gap < 0 else 'above'} the interpolation threshold"
            )
        parts.append(
            f"Test-error peak at width {peak.position} (test error {peak.value:.3g}){where}: wider hurts from "
            f"width {peak.left_base} to {peak.position}, and helps again from {peak.position} to "
            f"{peak.right_base}."
        )
    if not curve.peaks:
        parts.append("No test-error peak: no model-wise double descent on this grid.")
    best, last = curve.best_width, widths[-1]
    if curve.wider_helps:
        parts.append(
            f"Wider helps here: the widest model (width {last}, test error {test[-1]:.3g}) is within "
            f"{curve.tolerance:.2g} of the lowest test error ({test[index[best]]:.3g} at width {best})."
        )
    else:
        parts.append(
            f"Wider hurts here: the test error rises from {test[index[best]]:.3g} at width {best} to "
            f"{test[-1]:.3g} at width {last} (more than {curve.tolerance:.2g})"
            + (
                "; the widest models sit near the interpolation threshold: go wider, past the peak, or narrower."
                if curve.interpolation_width is None
                or curve.interpolation_width >= widths[max(0, len(widths) - 3)]
                else "; extend the grid to see whether it descends again."
            )
        )
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Aggregation: read the runs, log the curve.


def _read_results(directory: Path) -> list[dict]:
    results = []
    for path in sorted(directory.glob(f"*/{RESULT_FILE}")):
        if path.parent.name == AGGREGATE_DIR:
            continue
        record = read_json(path)
        record["_dir"] = str(path.parent)
        results.append(record)
    return results


def _load_predictions(record: Mapping[str, Any]) -> dict | None:
    if not record.get("test_predictions"):
        return None
    return torch.load(Path(record["_dir"]) / record["test_predictions"], map_location="cpu")


def aggregate(
    logdir: str | os.PathLike,
    epsilon: float = 0.01,
    smoothing: str | None = None,
    window: int = 3,
) -> ModelWiseCurve:
    """Read every run of a sweep folder, draw the model-wise curve into TensorBoard and say what it shows.

    Writes the TensorBoard run ``<logdir>/aggregate`` (replacing an earlier one; tags in the module
    docstring) and ``<logdir>/aggregate/aggregate.json`` (the curve), and prints the curve and the verdict.

    Args:
        logdir: the sweep folder (``<run --logdir>/<run --name>``), holding one folder per run.
        epsilon: the train error at or below which a width interpolates.
        smoothing, window: passed to :func:`lt_theory.measures.risk.find_peaks`.

    Returns:
        The :class:`ModelWiseCurve`.

    Raises:
        ValueError: if ``logdir`` is not a folder or holds no finished run (see :func:`model_wise_curve`).
    """
    directory = Path(logdir)
    if not directory.is_dir():
        raise ValueError(f"`logdir` must be the folder of a sweep, {str(directory)!r} is not a folder")
    results = _read_results(directory)
    if not results:
        sweeps = sorted(str(p.parent.parent) for p in directory.glob(f"*/*/{RESULT_FILE}"))
        hint = f"; the sweeps under it: {sorted(set(sweeps))}" if sweeps else ""
        raise ValueError(
            f"`logdir` {str(directory)!r} holds no finished run (no */{RESULT_FILE}): it must be the sweep's "
            f"folder, <run --logdir>/<run --name>{hint}"
        )
    curve = model_wise_curve(results, epsilon, smoothing, window, load_predictions=_load_predictions)
    out = directory / AGGREGATE_DIR
    if out.is_dir():
        for old in out.glob("events.out.tfevents.*"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _log_curve(curve, directory)
    write_json(out / AGGREGATE_FILE, curve.as_dict())
    print(_table(curve))
    print(curve.verdict)
    return curve


def _log_curve(curve: ModelWiseCurve, directory: Path) -> None:
    logger = TensorBoardLogger(
        save_dir=str(directory), name="", version=AGGREGATE_DIR, default_hp_metric=False
    )
    trainer = Trainer(
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    series = {**curve.metrics, **curve.bias_variance}
    for i, (width, params) in enumerate(zip(curve.widths, curve.num_parameters)):
        loggers.log_scalars(
            trainer, {f"dd/{name}_by_width": values[i] for name, values in series.items()}, width
        )
        by_params = {
            f"dd/{name}_by_params": curve.metrics[name][i]
            for name in ("train_error", "test_error")
            if name in curve.metrics
        }
        loggers.log_scalars(trainer, {k: v for k, v in by_params.items()}, params)
    for peak in curve.peaks:
        loggers.log_scalars(
            trainer, {"dd/peak_width": peak.position, "dd/peak_test_error": peak.value}, peak.position
        )
    if curve.interpolation_width is not None:
        loggers.log_scalars(
            trainer, {"dd/interpolation_width": curve.interpolation_width}, curve.interpolation_width
        )
    charts = {
        "Model-wise: error by width": ["dd/train_error_by_width", "dd/test_error_by_width"],
        "Model-wise: error by parameter count": ["dd/train_error_by_params", "dd/test_error_by_params"],
    }
    if curve.bias_variance:
        charts["Bias-variance by width (cross-entropy)"] = [
            "dd/bias_squared_by_width",
            "dd/variance_by_width",
            "dd/risk_by_width",
        ]
        charts["Bias-variance by width (squared error)"] = [
            "dd/mse_bias_squared_by_width",
            "dd/mse_variance_by_width",
            "dd/mse_risk_by_width",
        ]
    loggers.add_custom_scalar_charts(trainer, "dd sweep", charts)
    loggers.log_figure(trainer, "dd/modelwise_curve", _curve_figure(curve), step=0)
    if curve.bias_variance:
        loggers.log_figure(trainer, "dd/bias_variance", _bias_variance_figure(curve), step=0)
    loggers.log_text(
        trainer, "dd/modelwise_summary", curve.verdict + "\n\n" + _table(curve, markdown=True), step=0
    )
    logger.save()
    logger.finalize("success")


def _curve_figure(curve: ModelWiseCurve):
    figure, axes = new_figure(11, 4, ncols=2)
    for axis, positions, label in (
        (axes[0], curve.widths, "width"),
        (axes[1], curve.num_parameters, "parameters"),
    ):
        axis.plot(positions, curve.metrics["test_error"], "o-", label="test error")
        if "train_error" in curve.metrics:
            axis.plot(positions, curve.metrics["train_error"], "s--", label="train error")
        if curve.interpolation_width is not None:
            at = positions[curve.widths.index(curve.interpolation_width)]
            axis.axvline(at, color="grey", linestyle=":", label="interpolation threshold")
        for peak in curve.peaks:
            at = positions[curve.widths.index(peak.position)]
            axis.annotate("peak", (at, peak.value), textcoords="offset points", xytext=(0, 8), ha="center")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("error")
        axis.legend(fontsize=FONT_SIZE)
    figure.suptitle("Model-wise double descent")
    return figure


def _bias_variance_figure(curve: ModelWiseCurve):
    figure, axes = new_figure(11, 4, ncols=2)
    for axis, prefix, title in ((axes[0], "", "cross-entropy"), (axes[1], "mse_", "squared error")):
        for name, style in (("risk", "o-"), ("bias_squared", "s--"), ("variance", "^:")):
            axis.plot(curve.widths, curve.bias_variance[prefix + name], style, label=name)
        axis.set_xscale("log")
        axis.set_xlabel("width")
        axis.set_title(title)
        axis.legend(fontsize=FONT_SIZE)
    return figure


def _table(curve: ModelWiseCurve, markdown: bool = False) -> str:
    names = list(curve.metrics) + list(curve.bias_variance)
    header = ["width", "parameters", "runs", *names]
    rows = [
        [str(w), f"{p:,}", str(r), *(f"{(curve.metrics | curve.bias_variance)[n][i]:.4f}" for n in names)]
        for i, (w, p, r) in enumerate(zip(curve.widths, curve.num_parameters, curve.runs))
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(x.rjust(n) for x, n in zip(line, widths)) for line in [header, *rows])


# ------------------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lt_theory.sweep",
        description="Model-wise double descent: a width sweep (`run`) and its curve (`aggregate`).",
    )
    commands = parser.add_subcommands(required=True, dest="command")

    run = ArgumentParser(description="Train a family of models over a width grid (see lt_theory.sweep).")
    run.add_argument("--config", action=ActionConfigFile, help="a YAML file of these keys")
    run.add_argument("--widths", type=list[int], default=list(DEFAULT_WIDTHS), help="the width grid")
    run.add_argument(
        "--splits", type=int | None, default=None, help="bias-variance mode: m >= 2 disjoint training splits"
    )
    run.add_argument("--seed", type=int, default=0, help="initialisation and data-module seed")
    run.add_argument("--model.class_path", type=str, default="lt_theory.models.PreActResNet18")
    run.add_argument("--model.width_arg", type=str, default="k", help="the factory's width argument")
    run.add_argument("--model.init_args", type=dict, default={}, help="the factory's other arguments")
    run.add_argument("--model.input_pool", type=int, default=1, help="average-pool the inputs by this factor")
    run.add_subclass_arguments(LightningDataModule, "data", instantiate=False, required=False)
    run.set_defaults(
        data={"class_path": "lt_theory.data.CIFAR10DataModule", "init_args": {"label_noise": 0.15}}
    )
    run.add_class_arguments(
        ClassificationModule, "module", skip={"net", "num_classes"}, instantiate=False, sub_configs=True
    )
    run.add_class_arguments(
        Trainer,
        "trainer",
        skip={"logger", "callbacks", "default_root_dir"},
        instantiate=False,
        sub_configs=True,
    )
    run.add_class_arguments(
        DoubleDescentProbe, "probe", skip={"measure_on_train_end"}, instantiate=False, sub_configs=True
    )
    run.set_defaults({"probe.train_subset_size": None})
    run.add_argument("--logdir", type=str, default="runs", help="TensorBoard root folder")
    run.add_argument("--name", type=str, default="dd_sweep", help="the sweep's folder under --logdir")
    run.add_argument(
        "--task_index", type=int | None, default=None, help="run one task (default $SLURM_ARRAY_TASK_ID)"
    )
    run.add_argument(
        "--aggregate", type=bool, default=True, help="aggregate at the end of a sequential sweep"
    )
    run.add_argument("--epsilon", type=float, default=0.01, help="train error counted as interpolation")
    run.add_argument("--rerun", type=bool, default=False, help="retrain runs that have a result.json")
    run.add_argument("--print_tasks", type=bool, default=False, help="print the task list and exit")
    commands.add_subcommand("run", run, help="train the sweep (sequentially, or one task of a job array)")

    agg = ArgumentParser(description="Draw the model-wise curve of a finished (or partial) sweep.")
    agg.add_argument(
        "--logdir", type=str, required=True, help="the sweep folder: <run --logdir>/<run --name>"
    )
    agg.add_argument("--epsilon", type=float, default=0.01, help="train error counted as interpolation")
    agg.add_argument("--smoothing", type=str | None, default=None, help=f"one of {SMOOTHING_METHODS}")
    agg.add_argument("--window", type=int, default=3, help="smoothing window, in widths (odd)")
    commands.add_subcommand("aggregate", agg, help="read the runs, draw the curve, find peak and threshold")
    return parser


def _print_tasks(sweep: _Sweep) -> None:
    tasks = sweep_tasks(sweep.widths, sweep.splits)
    print(f"{len(tasks)} tasks; as a SLURM array: sbatch --array=0-{len(tasks) - 1} ...")
    for index, task in enumerate(tasks):
        net = build_model(
            sweep.model_class_path, sweep.model_width_arg, task.width, sweep.model_init_args, 10
        )
        print(f"  task {index:3d}: {task.name}  ({_num_parameters(net):,} parameters)")


def main(args: Sequence[str] | None = None) -> ModelWiseCurve | list[dict] | None:
    """The command line: ``run`` a sweep or ``aggregate`` one (module docstring); ``args`` default to argv.

    Returns:
        ``run``: the curve when it aggregated, else the run records; ``aggregate``: the curve.
    """
    parser = _parser()
    cfg = parser.parse_args(sys.argv[1:] if args is None else list(args))
    if cfg.command == "aggregate":
        options = cfg.aggregate
        try:
            return aggregate(options.logdir, options.epsilon, options.smoothing, options.window)
        except ValueError as error:
            parser.error(f"aggregate: {error}")
    try:
        sweep = _validate(cfg.run)
    except ValueError as error:
        parser.error(f"run: {error}")
    if cfg.run.print_tasks:
        _print_tasks(sweep)
        return None
    try:
        results = run_sweep(sweep)
    except ValueError as error:
        parser.error(f"run: {error}")
    if sweep.task_index is None and sweep.aggregate and rank_zero_only.rank == 0:  # once under DDP
        return aggregate(sweep.directory, sweep.epsilon)
    return results


if __name__ == "__main__":
    main()
