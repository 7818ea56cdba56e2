r"""Sweeps: train a recipe over a grid of config values (widths, training-set sizes, label noise, any key),
then draw test error and the callbacks' final scalars against each axis; model-wise and sample-wise double
descent with their interpolation threshold, peaks and effective model complexity.

Classical theory says test error is U-shaped in model capacity; deep networks show double descent instead:
the test error peaks near the *interpolation threshold*, the smallest model that fits its (noisy) training
set, and falls again beyond it (Belkin, Hsu, Ma & Mandal, PNAS 2019, "Reconciling modern machine-learning
practice and the classical bias-variance trade-off"; Nakkiran, Kaplun, Bansal, Yang, Barak & Sutskever, ICLR
2020, "Deep Double Descent": PreAct ResNet-18 of width :math:`k = 1..64` on CIFAR-10 with 15% label noise,
Adam at 1e-4 for 4K epochs, peak near :math:`k = 10..12`). The same happens in the number of training
examples (*sample-wise*: near the effective model complexity, more data can hurt, Nakkiran et al. section 6).
For a practitioner the questions are whether a wider network, or more data, helps or hurts; a sweep answers
them.

**The config** is a recipe config (``seed_everything``, ``trainer`` with ``callbacks``, ``model`` =
:class:`lt_theory.module.ClassificationModule` with ``model.net``, ``data``; see ``recipes/``), parsed by the
recipes' own parser, plus one ``sweep:`` section; several ``--config`` files merge, so a sweep can start from
a recipe::

    python -m lt_theory.sweep run --config recipes/configs/resnet18k_cifar10.yaml \
        --config recipes/configs/sweeps/dd_sweep_resnet18k_cifar10.yaml

    sweep:
      axes:                                   # {config key: [values]}; several axes are crossed
        model.net.init_args.k: [1, 2, 4, 8, 16, 32, 64]
        data.init_args.label_noise: [0.1, 0.2]
      splits: null        # m >= 2: the bias-variance mode (below)
      logdir: runs        # the runs go to <logdir>/<name>/<task>
      name: dd_sweep
      task_index: null    # one task of the list (default $SLURM_ARRAY_TASK_ID)
      aggregate: true     # aggregate at the end of a sequential sweep
      epsilon: 0.01       # the train error that counts as interpolation (threshold, EMC)
      rerun: false        # retrain runs that have a result.json
      print_tasks: false  # list the tasks and exit

An axis key is any key of the config (``model.net.init_args.hidden``, ``data.init_args.num_train``,
``model.lr``, ``trainer.max_epochs``, ``trainer.callbacks.0.init_args.every_n_steps``, ``seed_everything`` for
replicates); a key the config does not have is refused, naming it. An int swept over a list-valued key whose
entries are all equal (an MLP's ``hidden: [64]``) sets every entry. The tasks are the product of the axes,
the last varying fastest (and the split slowest); task ``i`` is SLURM array task ``i``. The sweep seeds each
run with ``seed_everything`` and sets the data module's ``seed`` to it (one seed for initialisation, label
noise, order and splits), gives each run its own TensorBoardLogger in ``<logdir>/<name>/<task>`` (also its
``default_root_dir``), and reads each run's final errors from a :class:`DoubleDescentProbe` in
``trainer.callbacks`` (``measure_on_train_end`` set; one with ``train_subset_size: null`` is added, and said
so, when the config has none). Input pooling for CPU-sized sweeps is the recipe model
:class:`lt_theory.models.PooledInput`. Configs of the former format (top-level ``widths``, ``model.width_arg``,
``probe``, ``module``, ``seed``) are refused with the way to write each key now.

**run**: one run per task, sequentially (one data module per distinct ``data`` config, restored to its initial
state before each run) or one task per SLURM array task. A run writes ``config.yaml`` (its recipe config:
``python recipes/resnet_cifar.py fit --config <run>/config.yaml`` trains it again), logs its hyperparameters
(the axis values, ``seed``, ``num_parameters``, ``model``, ``label_noise``, ``train_size``; ``split`` and
``num_splits`` in the bias-variance mode) with its final metrics ``dd/final_train_error``,
``dd/final_test_error``, ``dd/final_test_loss`` (and the clean/noisy ones with label noise) to TensorBoard's
HPARAMS, and writes ``result.json``: those, plus the last value of every scalar its other callbacks logged
(``ntk/relative_change``, ``spectral/lipschitz_upper``, ...). A run whose ``result.json`` exists is not
trained again if it was made with the same settings (its recipe config), and refused naming the keys that
differ otherwise (``--sweep.rerun true`` retrains it from an empty folder). Progress is logged on rank zero:
task i of n with its axis values, the time elapsed and an estimate of the time left.

**aggregate** reads every ``result.json`` of the sweep folder (a partial sweep too), sorts the axes by what
changes along them (:mod:`lt_theory.sweep.axis_curves`: width, training-set size, replicate seed, other
value) and draws, against each axis and for each value of the others, the mean test and train error and the
mean of each callback scalar, the latter with its log-log least-squares slope, into the TensorBoard run
``<sweep>/aggregate`` (tags in :mod:`lt_theory.sweep.report`; every figure also as a PNG file in
``<sweep>/aggregate/figures/``). Against a width: the model-wise curve,
against width and parameter count, its interpolation threshold (the smallest width whose mean train error is
at most ``epsilon``, :func:`lt_theory.measures.risk.interpolation_threshold`), its peaks
(:func:`lt_theory.measures.risk.find_peaks`, unsmoothed, the standard error of each point as noise floor:
binomial on the test set, or between runs of a width if larger), and the verdict: wider helps when the
widest model's test error is within two binomial standard errors, :math:`2\sqrt{e(1-e)/N}` on :math:`N` test
points, of the lowest of the grid. Against a training-set size: the sample-wise curve against the number of
examples and the effective model complexity :math:`\mathrm{EMC}_\varepsilon`
(:func:`lt_theory.measures.risk.effective_model_complexity`). A sequential sweep aggregates at its end; a job
array runs ``aggregate`` once its tasks are done.

**Bias-variance mode** (``sweep.splits: m``, Yang, Yu, You, Steinhardt & Ma, ICML 2020, "Rethinking
Bias-Variance Trade-off for Generalization of Neural Networks"): at every point, ``m`` models are trained,
model ``i`` on the ``i``-th of ``m`` disjoint parts of the one noisy training set (the data module's
``train_split=(i, m)``) with its own initialisation; against a width, their test logits give
:func:`lt_theory.measures.risk.cross_entropy_bias_variance` (``dd/bias_squared_by_width``,
``dd/variance_by_width``, ``dd/risk_by_width``) and :func:`lt_theory.measures.risk.mse_bias_variance` on the
softmax probabilities (``dd/mse_*_by_width``), and the figure ``dd/bias_variance``. Yang et al. find the bias
falling monotonically with width and the variance unimodal, its peak raised and moved by label noise. The
quantities are those of models trained on ``n / m`` examples.

Usage::

    python -m lt_theory.sweep run --config recipes/configs/sweeps/dd_sweep_cpu.yaml
    python -m lt_theory.sweep run --config ... --sweep.print_tasks true
    python -m lt_theory.sweep run --config ... --sweep.task_index 3       # one task of a SLURM array
    python -m lt_theory.sweep run --config ... --sweep.splits 2 --data.init_args.label_noise 0.2
    python -m lt_theory.sweep aggregate --logdir runs/dd_sweep_cpu
"""

from __future__ import annotations

from lt_theory.sweep.axis_curves import SweepAggregate, SweepCurve, axis_kinds, loglog_slope, sweep_curves
from lt_theory.sweep.cli import main
from lt_theory.sweep.config import (
    SweepConfig,
    parse_arguments,
    refuse_old_format,
    task_config,
    validate_config,
)
from lt_theory.sweep.curve import ModelWiseCurve, model_wise_curve
from lt_theory.sweep.report import AGGREGATE_DIR, AGGREGATE_FILE, aggregate
from lt_theory.sweep.run import (
    CONFIG_FILE,
    PREDICTIONS_FILE,
    RESULT_FILE,
    SETTINGS_FILE,
    final_scalars,
    run_sweep,
)
from lt_theory.sweep.tasks import Axis, SweepTask, check_axes, check_splits, sweep_tasks

__all__ = [
    "AGGREGATE_DIR",
    "AGGREGATE_FILE",
    "Axis",
    "CONFIG_FILE",
    "ModelWiseCurve",
    "PREDICTIONS_FILE",
    "RESULT_FILE",
    "SETTINGS_FILE",
    "SweepAggregate",
    "SweepConfig",
    "SweepCurve",
    "SweepTask",
    "aggregate",
    "axis_kinds",
    "check_axes",
    "check_splits",
    "final_scalars",
    "loglog_slope",
    "main",
    "model_wise_curve",
    "parse_arguments",
    "refuse_old_format",
    "run_sweep",
    "sweep_curves",
    "sweep_tasks",
    "task_config",
    "validate_config",
]
