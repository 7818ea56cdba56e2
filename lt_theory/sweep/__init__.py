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

from lt_theory.sweep.cli import main
from lt_theory.sweep.curve import ModelWiseCurve, model_wise_curve
from lt_theory.sweep.models import build_model
from lt_theory.sweep.report import AGGREGATE_DIR, AGGREGATE_FILE, aggregate
from lt_theory.sweep.run import PREDICTIONS_FILE, RESULT_FILE, SETTINGS_FILE, run_sweep
from lt_theory.sweep.tasks import DEFAULT_WIDTHS, SweepTask, check_splits, check_widths, sweep_tasks

__all__ = [
    "AGGREGATE_DIR",
    "AGGREGATE_FILE",
    "DEFAULT_WIDTHS",
    "ModelWiseCurve",
    "PREDICTIONS_FILE",
    "RESULT_FILE",
    "SETTINGS_FILE",
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
