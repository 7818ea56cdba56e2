r"""Risk, capacity and label noise: memorisation, the interpolation threshold, effective model complexity,
double-descent peaks, and the bias-variance decomposition of Yang et al. (2020).

**Label noise and memorisation.** With symmetric label noise (:func:`lt_theory.data.apply_label_noise`) the
training labels in use :math:`\tilde y_i` differ from the clean labels :math:`y_i` on a set :math:`\mathcal N`
of noisy examples. For predictions :math:`\hat y_i` on the :math:`n` training examples,
:func:`noisy_label_errors` returns

.. math::
    \mathrm{err} = \tfrac1n \textstyle\sum_i [\hat y_i \ne \tilde y_i],\quad
    \mathrm{err}_{clean} = \tfrac{1}{|\bar{\mathcal N}|} \textstyle\sum_{i \notin \mathcal N} [\hat y_i \ne \tilde y_i],
    \quad
    \mathrm{err}_{noisy} = \tfrac{1}{|\mathcal N|} \textstyle\sum_{i \in \mathcal N} [\hat y_i \ne \tilde y_i],

the memorised fraction :math:`\tfrac{1}{|\mathcal N|}\sum_{i \in \mathcal N} [\hat y_i = \tilde y_i]
= 1 - \mathrm{err}_{noisy}` (noisy examples predicted with their *noisy* label) and the corrected fraction
:math:`\tfrac{1}{|\mathcal N|}\sum_{i \in \mathcal N} [\hat y_i = y_i]` (predicted with their clean label).
Deep networks fit random labels (Zhang, Bengio, Hardt, Recht & Vinyals, ICLR 2017, "Understanding deep
learning requires rethinking generalization"), clean examples first (Arpit et al., ICML 2017, "A Closer Look
at Memorization in Deep Networks"); the test-error peak of double descent sits where the model just manages
to memorise the noisy labels (Nakkiran, Kaplun, Bansal, Yang, Barak & Sutskever, ICLR 2020, arXiv 2019,
"Deep Double Descent: Where Bigger Models and More Data Hurt"). An empty subset gives NaN.
:func:`evaluate_classifier` produces the logits, loss and error of a model on a loader for these measures.

**Interpolation threshold.** :func:`interpolation_threshold` returns the first step or epoch :math:`t` with
training error :math:`\le \varepsilon` (the point where the model interpolates its training set; Belkin,
Hsu, Ma & Mandal, PNAS 2019, "Reconciling modern machine-learning practice and the classical bias-variance
trade-off").

**Effective model complexity** (Nakkiran et al. 2019, Definition 1): for a training procedure :math:`T`
and a distribution :math:`\mathcal D`,

.. math::
    \mathrm{EMC}_{\mathcal D, \varepsilon}(T) = \max\{ n \mid
        \mathbb E_{S \sim \mathcal D^n}[\mathrm{Error}_S(T(S))] \le \varepsilon \},

the largest training-set size on which :math:`T` reaches a mean training error of at most
:math:`\varepsilon`. Their generalised double-descent hypothesis places the test-error peak (the critical
regime) where :math:`\mathrm{EMC} \approx n`. :func:`effective_model_complexity` estimates the expectation by
the mean training error over runs at each tested :math:`n` and returns the largest tested :math:`n` below
:math:`\varepsilon`; the true EMC is only resolved to the grid of sizes.

**Double-descent peaks.** :func:`find_peaks` finds descent-ascent-descent in a noisy curve (test error over
epochs or widths): it smooths the curve with a centred moving median or mean, finds the interior local
maxima of the smoothed curve, and keeps those whose topographic prominence (the height of a peak above the
higher of the two lowest points that separate it from higher ground on either side, as in
``scipy.signal.peak_prominences``) reaches a threshold, and, by default, that are preceded by a descent into
their left valley of at least the same size. The threshold is the larger of a fraction of the smoothed curve's
range and a multiple of the universal threshold :math:`\hat\sigma \sqrt{2 \ln n}` of Donoho & Johnstone
(Biometrika 1994, "Ideal spatial adaptation by wavelet shrinkage"; the maximum of :math:`n` Gaussian noise
values grows like it), so that a monotone curve with noise shows no peak however many points it has. The
noise level is estimated robustly from the second differences :math:`d_i = v_{i-1} - 2 v_i + v_{i+1}`,
:math:`i = 1, \dots, n-2` (for white noise :math:`\mathrm{Var}\, d_i = 6\sigma^2`; a smooth trend barely
changes them), leaving out the neighbourhood of large peaks:

.. math::
    R = \{ i : |d_i - \mathrm{med}\, d| > 5 \cdot 1.4826\, \mathrm{MAD}(d) \},\quad
    K = \{ i : \{i-1, i, i+1\} \cap R = \emptyset \},\quad
    \hat\sigma = 1.4826\, \mathrm{MAD}(d_K) / \sqrt 6

(:math:`\mathrm{MAD}(d) = \mathrm{med}_i |d_i - \mathrm{med}\, d|`; all of :math:`d` when fewer than three are
left in :math:`K`). A second difference five standard deviations out (probability :math:`6 \cdot 10^{-7}` for
Gaussian noise) is a peak's or a kink's, and so is the neighbouring one, which shares two of its three points
(a one-step hard rejection like Hampel's X84 rule, Hampel, Ronchetti, Rousseeuw & Stahel 1986, "Robust
Statistics", which cuts at 3.5 instead of 5). Without it, the peak of the test risk of min-norm least squares
at :math:`p = n`, a hundred times the noise or more and several points wide on a geometric grid, inflates the
estimate through its own second differences alone (the MAD of 20 values of which 5 are the peak's is the 67th
percentile of the other 15, not their median), and the first descent, a few times the noise, is held to that
inflated floor: the textbook peak was missed (issue #15). On white noise the rejection almost never triggers
(the estimate is unchanged in 99.7% of 61-point draws). When the curve is a mean over seeds or splits, pass
the standard error of each point instead (``standard_errors``): each comparison is then held to the root mean
square of the standard errors of its two points (:func:`find_peaks`), which also covers noise that changes
along the curve (that of the test risk near :math:`p = n`). On pure Gaussian noise of 8 to 1000 points the
defaults report a peak in at most 1.2% of draws (0.9% at 8 points, 1.1% at 15, 1.0% at 61, 0.5% at 1000;
seeded, 10,000 draws per length up to 61); on a descending 61-point curve, a bump of prominence
:math:`6.4\sigma` is found, exactly once, in 199 of 200 draws, one of :math:`4.3\sigma` in 164 (measured,
seeded, with the MAD of all second differences, which the rejection leaves unchanged on all but a few in a
thousand such curves).

**Bias-variance decomposition** (Yang, Yu, You, Steinhardt & Ma, ICML 2020, "Rethinking Bias-Variance
Trade-off for Generalization of Neural Networks"). Models :math:`f(\cdot; T)` trained on random training
sets :math:`T` of a fixed size, evaluated on test points :math:`(x, y)` with :math:`y` one-hot (or any target
vector).

- Squared error: with :math:`\bar f(x) = \mathbb E_T f(x; T)`, the cross term vanishes and

  .. math::
      \mathbb E_{x,y} \mathbb E_T \|y - f(x;T)\|_2^2
        = \underbrace{\mathbb E_{x,y} \|y - \bar f(x)\|_2^2}_{\mathrm{Bias}^2}
        + \underbrace{\mathbb E_x \mathbb E_T \|f(x;T) - \bar f(x)\|_2^2}_{\mathrm{Variance}}.

  Estimator (:func:`mse_bias_variance`): split the training data into :math:`m` disjoint parts of equal size
  (:func:`disjoint_splits`), train one model on each; the parts are independent training sets, so the sample
  variance with :math:`m - 1` in the denominator,

  .. math::
      \widehat{\mathrm{Var}} = \frac1N \sum_{x} \frac{1}{m-1} \sum_{j=1}^m \|f(x; T_j) - \hat f(x)\|_2^2,
      \qquad \hat f(x) = \frac1m \sum_j f(x; T_j),

  is an unbiased estimate of the variance (averaged over the :math:`N` test points), and so is
  :math:`\widehat{\mathrm{Bias}^2} = \widehat{\mathrm{Risk}} - \widehat{\mathrm{Var}}` of the squared bias,
  with :math:`\widehat{\mathrm{Risk}} = \frac{1}{mN} \sum_{j, x} \|y - f(x; T_j)\|_2^2` the mean test risk of
  the models (it equals :math:`\frac1N \sum_x \|y - \hat f(x)\|^2 - \widehat{\mathrm{Var}}/m`: the naive
  plug-in bias overestimates by :math:`\mathrm{Var}/m`, and can come out negative when the bias is small).
  :math:`k` independent partitions are averaged (their estimates, not their models). The squared error is
  summed over classes, not averaged, as in the authors' code; their MSE-trained networks output softmax
  probabilities, so pass what the models' loss was computed on. Note that the quantities are those of models
  trained on :math:`n/m` examples.

- Cross-entropy (:func:`cross_entropy_bias_variance`): with :math:`\pi(x; T)` the predicted class
  probabilities and :math:`\bar\pi(x) \propto \exp \mathbb E_T \log \pi(x; T)` their normalised geometric
  mean, :math:`\bar\pi_c = \exp(\mathbb E_T \log \pi_c) / Z`, :math:`Z = \sum_c \exp(\mathbb E_T \log\pi_c)`
  (Heskes, Neural Computation 1998, "Bias/Variance Decompositions for Likelihood-Based Estimators"),

  .. math::
      \mathbb E_T\, \mathrm{KL}(y \,\|\, \pi(x;T))
        = \underbrace{\mathrm{KL}(y \,\|\, \bar\pi(x))}_{\mathrm{Bias}^2}
        + \underbrace{\mathbb E_T\, \mathrm{KL}(\bar\pi(x) \,\|\, \pi(x;T))}_{\mathrm{Variance} = -\log Z}

  exactly, for every target distribution :math:`y`; for a one-hot :math:`y` the left side is the expected
  cross-entropy :math:`-\mathbb E_T \log \pi_y`. The first term plays the role of the squared bias (the
  authors' code names it ``bias2``). The estimate replaces :math:`\mathbb E_T` by the mean over the :math:`m`
  models of a partition, the plug-in estimator of the authors' ``evaluate_bv_ce.py`` (which pools the models
  of all its partitions into one geometric mean; here each partition has its own and the estimates are
  averaged, as for the squared error). Risk = bias + variance holds exactly for the estimates, but the
  variance is not unbiased and no correction is applied, as in the paper: when the models are close it is
  low by the factor :math:`(m-1)/m` (the KL divergence is then a quadratic form, and the plug-in sample
  variance has this bias; measured in the tests), and the bias is high by as much.

NaN or Inf in the inputs give NaN results (or count as errors, for predictions), never an exception.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_theory.checks import check_int, check_nonnegative, check_tensor
from lt_theory.measures.evaluation import CLASSIFIER_LOSSES, evaluate, predicted_classes

__all__ = [
    "CLASSIFIER_LOSSES",
    "SMOOTHING_METHODS",
    "BiasVariance",
    "ClassifierEvaluation",
    "NoisyLabelErrors",
    "Peak",
    "cross_entropy_bias_variance",
    "disjoint_splits",
    "effective_model_complexity",
    "evaluate_classifier",
    "find_peaks",
    "interpolation_threshold",
    "mse_bias_variance",
    "noisy_label_errors",
]

"""The losses :func:`evaluate_classifier` reports."""

SMOOTHING_METHODS = ("median", "mean", None)
"""The smoothers of :func:`find_peaks`."""


# ------------------------------------------------------------------------------------------------------------
# Argument checks.


def _is_integer_tensor(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _float_list(values: object, name: str) -> list[float]:
    """A 1-D sequence of numbers (list, tuple, tensor, NumPy array) as a list of Python floats."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, got {type(values).__name__}")
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers: {error}") from None
    if tensor.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, got shape {tuple(tensor.shape)}")
    return tensor.tolist()


def _positions(positions: object, length: int, name: str, values_name: str) -> list:
    """The positions as a list of their own numbers (ints stay ints); finite and strictly increasing."""
    if hasattr(positions, "tolist"):  # a tensor or a NumPy array
        items = positions.tolist()  # type: ignore[union-attr]
    elif isinstance(positions, Iterable) and not isinstance(positions, (str, bytes)):
        items = list(positions)
    else:
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, got {type(positions).__name__}")
    if not all(isinstance(p, Real) and not isinstance(p, bool) for p in items):
        raise ValueError(f"`{name}` must be a 1-D sequence of numbers, got {items!r}")
    if len(items) != length:
        raise ValueError(
            f"`{name}` must have one entry per entry of `{values_name}` ({length}), got {len(items)}"
        )
    if not all(math.isfinite(p) for p in items):
        raise ValueError(f"`{name}` must be finite, got {items!r}")
    if any(b <= a for a, b in zip(items, items[1:])):
        raise ValueError(f"`{name}` must be strictly increasing, got {items!r}")
    return items


# ------------------------------------------------------------------------------------------------------------
# Label noise and memorisation.


class NoisyLabelErrors(NamedTuple):
    """Training errors under label noise (see :func:`noisy_label_errors`); NaN for an empty subset."""

    train_error: float
    """Fraction of all examples predicted differently from the label in use."""
    train_error_clean: float
    """The same on the examples whose label was not changed."""
    train_error_noisy: float
    """The same on the noisy examples (against their noisy label): ``1 - memorized_fraction``."""
    memorized_fraction: float
    """Fraction of the noisy examples predicted with their noisy label."""
    corrected_fraction: float
    """Fraction of the noisy examples predicted with their clean label."""
    num_clean: int
    """Number of examples whose label was not changed."""
    num_noisy: int
    """Number of noisy examples."""


def _predictions(outputs: object, name: str) -> Tensor:
    """Integer predictions from integer predictions ``(N,)`` or floating logits/scores ``(N, C)``."""
    outputs = check_tensor(name, outputs)
    if outputs.ndim == 2 and outputs.is_floating_point() and outputs.shape[1] >= 1:
        return predicted_classes(outputs)  # -1 for a row holding NaN or Inf: an error whatever the label
    if outputs.ndim == 1 and _is_integer_tensor(outputs):
        return outputs.long()
    raise ValueError(
        f"`{name}` must be integer predictions of shape (N,) or float logits of shape (N, C) with C >= 1, "
        f"got dtype {outputs.dtype} and shape {tuple(outputs.shape)}"
    )


def _labels(labels: object, n: int, name: str, device: torch.device) -> Tensor:
    labels = check_tensor(name, labels)
    if labels.ndim != 1 or not _is_integer_tensor(labels):
        raise ValueError(
            f"`{name}` must be a 1-D integer tensor, got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != n:
        raise ValueError(f"`{name}` must have one label per prediction ({n}), got {labels.shape[0]}")
    return labels.to(device=device, dtype=torch.long)


def _fraction(count: Tensor, total: int) -> float:
    return float(count) / total if total > 0 else math.nan


def noisy_label_errors(
    outputs: Tensor,
    labels: Tensor,
    clean_labels: Tensor,
    noisy_indices: Tensor | None = None,
) -> NoisyLabelErrors:
    r"""Training error overall, on clean and on noisy examples, and the fraction of noisy labels memorised.

    All errors are against the labels in use (``labels``, the noisy ones where noise was injected); the
    memorised fraction is the fraction of noisy examples predicted with their noisy label, and the corrected
    fraction the fraction predicted with their clean label (module docstring).

    Args:
        outputs: integer predictions ``(N,)`` or float logits ``(N, C)`` (the prediction is the argmax; a row
            with NaN counts as wrong for every label), in the order of the dataset, e.g. from
            :func:`evaluate_classifier` on a sequential loader over the training set.
        labels: the labels in use ``(N,)``, e.g. ``train_dataset.labels``.
        clean_labels: the labels before noise ``(N,)``, e.g. ``train_dataset.clean_labels``.
        noisy_indices: positions of the noisy examples, as integer indices (e.g.
            ``train_dataset.noisy_indices``) or a boolean mask ``(N,)``; None takes the examples where
            ``labels != clean_labels``.

    Returns:
        :class:`NoisyLabelErrors` of Python floats (NaN where the subset is empty: no noisy example, or
        no clean one) and the sizes of the two subsets.

    Raises:
        ValueError: if ``outputs`` is neither ``(N,)`` integers nor ``(N, C)`` floats; ``labels`` or
            ``clean_labels`` is not a 1-D integer tensor of length ``N``; ``noisy_indices`` is not a 1-D
            integer tensor of distinct indices in ``[0, N)`` or a boolean mask of length ``N``; or
            ``labels`` differs from ``clean_labels`` outside ``noisy_indices``.

    Example:
        >>> clean = torch.tensor([0, 1, 2, 0, 1])
        >>> labels = torch.tensor([0, 1, 2, 2, 0])  # examples 3 and 4 are noisy
        >>> errors = noisy_label_errors(torch.tensor([0, 1, 1, 2, 1]), labels, clean, torch.tensor([3, 4]))
        >>> errors.train_error, errors.train_error_clean, errors.memorized_fraction, errors.corrected_fraction
        (0.4, 0.3333333333333333, 0.5, 0.5)
    """
    predicted = _predictions(outputs, "outputs")
    n = predicted.shape[0]
    device = predicted.device
    labels = _labels(labels, n, "labels", device)
    clean_labels = _labels(clean_labels, n, "clean_labels", device)
    if noisy_indices is None:
        noisy = labels != clean_labels
    else:
        noisy_indices = check_tensor("noisy_indices", noisy_indices).to(device)
        if noisy_indices.dtype == torch.bool:
            if noisy_indices.shape != (n,):
                raise ValueError(
                    f"`noisy_indices` as a boolean mask must have shape ({n},), got {tuple(noisy_indices.shape)}"
                )
            noisy = noisy_indices
        else:
            if noisy_indices.ndim != 1 or not _is_integer_tensor(noisy_indices):
                raise ValueError(
                    "`noisy_indices` must be a 1-D integer tensor of indices or a boolean mask, got dtype "
                    f"{noisy_indices.dtype} and shape {tuple(noisy_indices.shape)}"
                )
            if noisy_indices.numel() and (int(noisy_indices.min()) < 0 or int(noisy_indices.max()) >= n):
                raise ValueError(f"`noisy_indices` must lie in [0, {n}), got {noisy_indices.tolist()}")
            noisy = torch.zeros(n, dtype=torch.bool, device=device)
            noisy[noisy_indices.long()] = True
            if int(noisy.sum()) != noisy_indices.numel():
                raise ValueError("`noisy_indices` must hold distinct indices, got repeated ones")
    if bool((labels != clean_labels)[~noisy].any()):
        raise ValueError(
            "`labels` differ from `clean_labels` at positions not in `noisy_indices`: the noise information "
            "does not describe these labels"
        )
    wrong = predicted != labels
    num_noisy = int(noisy.sum())
    num_clean = n - num_noisy
    wrong_noisy = wrong[noisy].sum()
    return NoisyLabelErrors(
        train_error=_fraction(wrong.sum(), n),
        train_error_clean=_fraction(wrong[~noisy].sum(), num_clean),
        train_error_noisy=_fraction(wrong_noisy, num_noisy),
        memorized_fraction=_fraction(num_noisy - wrong_noisy, num_noisy),
        corrected_fraction=_fraction((predicted == clean_labels)[noisy].sum(), num_noisy),
        num_clean=num_clean,
        num_noisy=num_noisy,
    )


class ClassifierEvaluation(NamedTuple):
    """What :func:`evaluate_classifier` returns."""

    logits: Tensor
    """The model's outputs ``(N, C)``, in the order of the batches, on the evaluation device."""
    labels: Tensor
    """The labels ``(N,)`` (int64), on the evaluation device."""
    predictions: Tensor
    """``logits.argmax(dim=1)``."""
    loss: float
    """Mean loss over the ``N`` examples (NaN or Inf if a logit is not finite)."""
    error: float
    """Fraction of examples misclassified, a row with a NaN or Inf logit counted as wrong (the rule of
    :mod:`lt_theory.measures.evaluation`, shared by every callback)."""


def evaluate_classifier(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    loss: str = "cross_entropy",
) -> ClassifierEvaluation:
    """Logits, loss and error of a classifier over every batch of a loader, without perturbing training.

    The model runs in eval mode (BatchNorm uses its running statistics, which are not updated; dropout is
    off) under ``torch.no_grad``; every module's train/eval flag is restored afterwards, even on error.
    ``.grad`` is never written, and the global RNG state (CPU, and the CUDA device evaluated on) is left as it
    was, even for a shuffling DataLoader without a generator (``torch.random.fork_rng``). The outputs are
    kept on the device and read back once at the end (one synchronisation per call). For the noise measures
    of :func:`noisy_label_errors`, use a sequential (non-shuffling) loader over the training set, so that
    the rows follow the dataset's order.

    Losses: ``"cross_entropy"`` is ``F.cross_entropy`` averaged over examples; ``"mse"`` is
    ``||outputs - onehot(label)||_2^2`` summed over classes and averaged over examples (the squared error of
    Yang et al., 2020; apply a softmax in the model if it was trained on probabilities).

    Args:
        model: a classifier returning one row of ``C`` scores per input.
        batches: an iterable of batches ``(inputs, labels, ...)`` (a DataLoader, a list of tuples); elements
            after the first two (e.g. indices) are ignored.
        device: where to evaluate; None uses the device of the model's first parameter or buffer (CPU if it
            has none). Inputs and labels are moved there.
        transform: applied to the inputs on the device before the model, e.g. a DataModule's ``preprocess``
            for ``uint8`` images (:class:`lt_theory.data.CIFARDataModule`); None passes them as they are.
        loss: ``"cross_entropy"`` or ``"mse"``.

    Returns:
        :class:`ClassifierEvaluation` with the concatenated logits, labels and predictions on ``device``, and
        the mean loss and the error as Python floats.

    Raises:
        ValueError: if ``model`` is not a ``nn.Module``, ``loss`` is unknown, a batch is not a sequence of at
            least ``(inputs, labels)`` tensors, labels are not 1-D integers, the model's output is not ``(b, C)`` for
            ``b`` inputs, the number of classes changes between batches, or there is no example at all.

    Example:
        >>> from lt_theory.models import MLP
        >>> model = MLP((4,), hidden=(8,), num_classes=3)
        >>> batches = [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))]
        >>> result = evaluate_classifier(model, batches)
        >>> result.logits.shape, 0.0 <= result.error <= 1.0
        (torch.Size([5, 3]), True)
    """
    if loss not in CLASSIFIER_LOSSES:
        raise ValueError(f"`loss` must be one of {CLASSIFIER_LOSSES}, got {loss!r}")
    result = evaluate(model, batches, loss=loss, transform=transform, device=device, keep_outputs=True)
    return ClassifierEvaluation(
        result.outputs, result.labels, predicted_classes(result.outputs), result.loss, result.error
    )


# ------------------------------------------------------------------------------------------------------------
# Thresholds.


def interpolation_threshold(
    steps_or_epochs: Sequence[float] | Tensor,
    train_errors: Sequence[float] | Tensor,
    epsilon: float = 0.0,
) -> float | int | None:
    """The first step or epoch at which the training error is at most ``epsilon``.

    Args:
        steps_or_epochs: the strictly increasing times of the measurements (ints or floats).
        train_errors: the training error at each of them; NaN entries are skipped.
        epsilon: the error that counts as interpolation, >= 0 (0: every training example fitted).

    Returns:
        The first entry of ``steps_or_epochs`` whose error is ``<= epsilon`` (as given: an int stays an int),
        or None if the error never gets there.

    Raises:
        ValueError: if the sequences are not 1-D and of equal length, the times are not finite and strictly
            increasing, or ``epsilon`` is negative or not finite.

    Example:
        >>> interpolation_threshold([1, 2, 3, 4], [0.5, 0.1, 0.0, 0.0])
        3
        >>> interpolation_threshold([1, 2, 3, 4], [0.5, 0.1, 0.0, 0.0], epsilon=0.1)
        2
        >>> interpolation_threshold([1, 2], [0.5, 0.2]) is None
        True
    """
    errors = _float_list(train_errors, "train_errors")
    times = _positions(steps_or_epochs, len(errors), "steps_or_epochs", "train_errors")
    epsilon = check_nonnegative("epsilon", epsilon)
    for time, error in zip(times, errors):
        if error <= epsilon:  # False for NaN
            return time
    return None


def effective_model_complexity(
    sizes: Sequence[int] | Tensor,
    train_errors: Sequence[float] | Tensor,
    epsilon: float = 0.1,
) -> int | None:
    r"""Effective model complexity of Nakkiran et al. (2019, Definition 1) from a table of runs.

    :math:`\mathrm{EMC}_{\mathcal D, \varepsilon}(T) = \max\{n \mid \mathbb E_{S \sim \mathcal D^n}
    [\mathrm{Error}_S(T(S))] \le \varepsilon\}`: the largest training-set size ``n`` on which the training
    procedure reaches a mean training error of at most ``epsilon``. The expectation is estimated by the mean
    of the training errors of the runs at each size (rows with the same ``n`` are averaged, NaN entries
    ignored). The maximum is over the tested sizes, as in the definition (not the first failure): if the
    expected error grows with ``n``, the true EMC lies between the returned size and the next tested one.

    Args:
        sizes: training-set size of each run (positive ints, in any order, repeated for several runs).
        train_errors: the final training error of each run, in [0, 1].
        epsilon: the error tolerance, >= 0 (the paper leaves it a small constant; 0.1 is this library's
            default).

    Returns:
        The largest tested ``n`` whose mean training error is ``<= epsilon``, or None if there is none.

    Raises:
        ValueError: if the sequences are not 1-D and of equal length, a size is not a positive int, or
            ``epsilon`` is negative or not finite.

    Example:
        >>> effective_model_complexity([1000, 2000, 4000, 2000], [0.0, 0.05, 0.3, 0.1])
        2000
        >>> effective_model_complexity([1000], [0.5]) is None
        True
    """
    errors = _float_list(train_errors, "train_errors")
    raw = sizes.tolist() if hasattr(sizes, "tolist") else list(sizes)  # type: ignore[union-attr]
    if len(raw) != len(errors):
        raise ValueError(
            f"`sizes` must have one entry per entry of `train_errors` ({len(errors)}), got {len(raw)}"
        )
    for size in raw:
        check_int("sizes", size, 1)
    epsilon = check_nonnegative("epsilon", epsilon)
    by_size: dict[int, list[float]] = {}
    for size, error in zip(raw, errors):
        if not math.isnan(error):
            by_size.setdefault(int(size), []).append(error)
    fitted = [size for size, runs in by_size.items() if sum(runs) / len(runs) <= epsilon]
    return max(fitted) if fitted else None


# ------------------------------------------------------------------------------------------------------------
# Peaks of a noisy curve.


class Peak(NamedTuple):
    """A peak of a descent-ascent-descent curve (see :func:`find_peaks`)."""

    position: float | int
    """The position (epoch, width, ...) of the peak, an entry of ``positions``."""
    index: int
    """Its index in the curve as given (NaN entries included)."""
    height: float
    """The smoothed curve at the peak."""
    value: float
    """The raw curve at the peak."""
    prominence: float
    """Height above the higher of the valleys on either side, on the smoothed curve."""
    left_base: float | int
    """Position of the valley before the peak (the lowest point between it and higher ground on the left)."""
    right_base: float | int
    """Position of the valley after the peak."""


def _centred_windows(n: int, window: int) -> list[range]:
    """The indices of each of ``n`` points' centred window of ``window`` points, shrunk symmetrically at the
    ends (so that the point stays at its centre)."""
    windows = []
    for i in range(n):
        h = min(window // 2, i, n - 1 - i)
        windows.append(range(i - h, i + h + 1))
    return windows


def _smooth(values: list[float], window: int, method: str | None) -> list[float]:
    """Centred moving median or mean over ``window`` points; the window shrinks symmetrically at the ends."""
    if method is None or window == 1:
        return list(values)
    smoothed = []
    for span in _centred_windows(len(values), window):
        segment = values[span.start : span.stop]
        smoothed.append(
            statistics.median(segment) if method == "median" else math.fsum(segment) / len(segment)
        )
    return smoothed


_REJECTION = 5.0
"""Second differences further than this many robust standard deviations from their median are a peak's or a
kink's, not noise: :func:`_noise_level` leaves them out, with their neighbours."""


def _robust_location_scale(values: list[float]) -> tuple[float, float]:
    """Median and normal-consistent MAD (``1.4826 * median |x - median x|``) of a non-empty list."""
    center = statistics.median(values)
    return center, 1.4826 * statistics.median([abs(x - center) for x in values])


def _noise_level(values: list[float]) -> float:
    r"""Robust standard deviation of white noise on a smooth curve that a few large peaks do not inflate.

    From the second differences :math:`d_i = v_{i-1} - 2 v_i + v_{i+1}` (:math:`6\sigma^2` their variance
    for white noise): those further than ``_REJECTION`` robust standard deviations from their median, and
    the second differences next to them, are left out; the MAD of the rest, divided by :math:`\sqrt 6`.
    With fewer than three left, the MAD of all of them (module docstring).
    """
    second = [values[i - 1] - 2 * values[i] + values[i + 1] for i in range(1, len(values) - 1)]
    if not second:
        return 0.0
    center, scale = _robust_location_scale(second)
    outlying = [abs(d - center) > _REJECTION * scale for d in second]
    rest = [d for i, d in enumerate(second) if not any(outlying[max(i - 1, 0) : i + 2])]
    if len(rest) >= 3:
        scale = _robust_location_scale(rest)[1]
    return scale / math.sqrt(6.0)


def _smoothed_errors(
    values: list[float], errors: list[float], window: int, method: str | None
) -> list[float]:
    """The standard error of each point of :func:`_smooth`'s curve, in units of one raw point's: the standard
    error of the point the median picks (the largest among equal values), the root mean square of the
    window's for the mean, the raw ones unsmoothed."""
    if method is None or window == 1:
        return list(errors)
    smoothed = []
    for span in _centred_windows(len(values), window):
        if method == "median":
            median = statistics.median(values[span.start : span.stop])  # an odd window: one of its values
            smoothed.append(max(errors[k] for k in span if values[k] == median))
        else:
            smoothed.append(math.sqrt(math.fsum(errors[k] ** 2 for k in span) / len(span)))
    return smoothed


def _local_maxima(s: list[float]) -> list[tuple[int, int]]:
    """Interior local maxima as (first, last) index of their plateau: strictly lower on both sides."""
    maxima = []
    n = len(s)
    i = 1
    while i < n - 1:
        if s[i - 1] < s[i]:
            ahead = i + 1
            while ahead < n - 1 and s[ahead] == s[i]:
                ahead += 1
            if s[ahead] < s[i]:
                maxima.append((i, ahead - 1))
            i = ahead
        else:
            i += 1
    return maxima


def _base(s: list[float], start: int, step: int, height: float) -> int:
    """Index of the lowest point from ``start`` walking by ``step`` until the curve rises above ``height``."""
    best = start
    k = start
    while 0 <= k < len(s) and s[k] <= height:
        if s[k] < s[best]:
            best = k
        k += step
    return best


def find_peaks(
    values: Sequence[float] | Tensor,
    positions: Sequence[float] | Tensor | None = None,
    smoothing: str | None = "median",
    window: int = 3,
    min_prominence: float = 0.05,
    noise_factor: float = 1.25,
    require_descent_before: bool = True,
    noise_level: float | None = None,
    standard_errors: Sequence[float] | Tensor | None = None,
) -> list[Peak]:
    r"""Peaks of descent-ascent-descent in a noisy curve, such as test error over epochs or widths.

    1. NaN and Inf entries are dropped (the other points keep their positions).
    2. The curve is smoothed by a centred moving median (``smoothing="median"``, robust to outliers) or mean
       (``"mean"``) over ``window`` consecutive points; near the ends the window shrinks symmetrically, so the
       first and last points are kept as they are. ``None`` or ``window=1`` skips the smoothing. The window
       counts points, not units of position.
    3. Candidates are the interior local maxima of the smoothed curve :math:`s` (a plateau counts once; its
       point with the highest raw value is reported).
    4. The prominence of a candidate of height :math:`h` is :math:`h - \max(b_L, b_R)`, where :math:`b_L` is
       the minimum of :math:`s` between the peak and the nearest point to its left higher than :math:`h` (or
       the start), and :math:`b_R` likewise on the right (the definition of ``scipy.signal.peak_prominences``):
       the curve ascends by at least the prominence into the peak and descends by at least as much after it.
    5. A candidate is kept if its prominence is at least the threshold
       :math:`\max(\text{min\_prominence} \cdot (\max s - \min s),\ F)`, with the noise floor
       :math:`F = \text{noise\_factor} \cdot \hat\sigma \sqrt{2 \ln n}`, :math:`n` the number of finite
       points and :math:`\hat\sigma` the noise level of one raw point: ``noise_level`` when it is known, else
       estimated from the curve's second differences with the neighbourhood of large peaks left out (module
       docstring), and, with ``require_descent_before``, if the curve descends into its left valley by more
       than 0 and by at least the noise floor: :math:`\max_{i \le L} s_i - s_L`, :math:`L` the left base
       (the *first* descent of double descent; a curve that starts in the valley, rises and falls has no
       such peak). The descent is held to the noise floor only: the range-relative part of the threshold
       would be set by the peak itself, which can be far higher than the first descent (the divergence at
       :math:`p = n` of min-norm least squares).
    6. With ``standard_errors`` (a curve that is a mean over seeds or splits), each comparison has its own
       floor, from the standard errors :math:`e_i, e_j` of the two smoothed points it subtracts:
       :math:`F_{ij} = \text{noise\_factor} \sqrt{2 \ln n}\, \sqrt{(e_i^2 + e_j^2)/2}`, the floor of
       step 5 with :math:`\hat\sigma` the root mean square of the two (equal standard errors :math:`\sigma`
       everywhere give the floor of ``noise_level=σ``). The prominence is held to :math:`F` between the peak
       (the largest :math:`e` of its plateau) and the higher of its bases, the descent to :math:`F` between
       the highest point before the left base (the first of equals) and the left base. A smoothed point's
       standard error is that of the raw point the median picks (the largest among equal values), the root
       mean square over the window for the mean (like ``noise_level``, in units of one raw point: the
       calibration of ``noise_factor`` accounts for the smoothing).

    Args:
        values: the curve, 1-D (list, tensor, NumPy array).
        positions: the strictly increasing position of each value; None for ``0, 1, ..., n - 1``.
        smoothing: ``"median"``, ``"mean"`` or None.
        window: odd number of points of the smoothing window, >= 1.
        min_prominence: the least prominence as a fraction of the smoothed curve's range, >= 0.
        noise_factor: the least prominence as a multiple of the universal threshold
            ``noise_level * sqrt(2 ln n)``, >= 0 (0 turns the noise floor off).
        require_descent_before: keep only peaks preceded by a descent.
        noise_level: the standard deviation of one point's noise when it is known, e.g. the binomial
            standard error :math:`\sqrt{e(1-e)/N}` of an error rate measured on :math:`N` examples; None
            estimates it from the curve, which needs more points than a coarse width grid has.
        standard_errors: the standard error of each value, e.g. ``std / sqrt(runs)`` of a mean over runs
            with different seeds (the noise of the mean test risk of min-norm least squares is far larger near
            :math:`p = n` and in the under-parameterised regime than beyond: one noise level does not fit);
            one per value, finite and >= 0 where the value is finite (ignored where it is not). Replaces
            ``noise_level``; None uses ``noise_level`` or the estimate.

    Returns:
        The peaks, by increasing position, as :class:`Peak`; empty when fewer than three finite points
        remain or the smoothed curve is flat.

    Raises:
        ValueError: if ``values`` is not 1-D numbers, ``positions`` does not have one strictly increasing
            finite entry per value, ``smoothing`` is unknown, ``window`` is not an odd int >= 1,
            ``min_prominence``, ``noise_factor`` or ``noise_level`` is negative or not finite,
            ``standard_errors`` does not have one entry per value, finite and >= 0 where the value is finite,
            or both ``noise_level`` and ``standard_errors`` are given.

    Example:
        >>> curve = [5.0, 4.0, 3.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0]
        >>> peak, = find_peaks(curve, smoothing=None)
        >>> peak.position, peak.height, peak.prominence, peak.left_base, peak.right_base
        (5, 4.0, 2.0, 3, 9)
        >>> find_peaks([5.0, 4.0, 3.0, 2.0, 1.0])
        []

        Min-norm least squares on p random ReLU features, n = 100, mean test risk of 20 seeds: it falls a
        little, diverges at p = n and falls again (the estimated noise level is 0.010 with the peak left out;
        0.033 with it, a floor of 0.097 that the smoothed first descent, 0.094, would not have reached):

        >>> p = [10, 13, 18, 24, 32, 42, 56, 75, 100, 133, 178, 237, 316, 422, 562, 750, 1000]
        >>> risk = [0.533, 0.497, 0.441, 0.414, 0.439, 0.498, 0.657, 1.17, 5749.0, 1.24, 0.694, 0.515, 0.439,
        ...         0.387, 0.355, 0.342, 0.325]
        >>> [(peak.position, peak.left_base, peak.right_base) for peak in find_peaks(risk, p)]
        [(100, 32, 1000)]

        With the standard errors of means over seeds:

        >>> means = [0.60, 0.50, 0.45, 0.52, 0.70, 0.55, 0.40, 0.35, 0.33]  # over seeds
        >>> [p.position for p in find_peaks(means, smoothing=None, standard_errors=[0.01] * 9)]
        [4]
        >>> find_peaks(means, smoothing=None, standard_errors=[0.1, 0.1] + [0.01] * 7)  # first descent: noise
        []
    """
    raw = _float_list(values, "values")
    where = (
        list(range(len(raw))) if positions is None else _positions(positions, len(raw), "positions", "values")
    )
    if smoothing not in SMOOTHING_METHODS:
        raise ValueError(f"`smoothing` must be one of {SMOOTHING_METHODS}, got {smoothing!r}")
    window = check_int("window", window, 1)
    if window % 2 == 0:
        raise ValueError(f"`window` must be odd (a centred window), got {window}")
    min_prominence = check_nonnegative("min_prominence", min_prominence)
    noise_factor = check_nonnegative("noise_factor", noise_factor)
    if noise_level is not None:
        noise_level = check_nonnegative("noise_level", noise_level)
    if not isinstance(require_descent_before, bool):
        raise ValueError(f"`require_descent_before` must be a bool, got {require_descent_before!r}")
    errors = None
    if standard_errors is not None:
        if noise_level is not None:
            raise ValueError(
                "give `noise_level` (one for the whole curve) or `standard_errors` (one per value)"
            )
        errors = _float_list(standard_errors, "standard_errors")
        if len(errors) != len(raw):
            raise ValueError(
                f"`standard_errors` must have one entry per entry of `values` ({len(raw)}), got {len(errors)}"
            )
        for value, error in zip(raw, errors):
            if math.isfinite(value) and not (math.isfinite(error) and error >= 0):
                raise ValueError(
                    f"`standard_errors` must be finite and >= 0 where `values` is, got {error!r}"
                )

    kept = [i for i, v in enumerate(raw) if math.isfinite(v)]
    if len(kept) < 3:
        return []
    curve = [raw[i] for i in kept]
    s = _smooth(curve, window, smoothing)
    spread = max(s) - min(s)
    if not spread > 0:
        return []
    universal = math.sqrt(2 * math.log(len(curve)))
    if errors is None:
        sigma = _noise_level(curve) if noise_level is None else noise_level
        noise_floor = noise_factor * sigma * universal

        def floor(i: int, j: int) -> float:
            return noise_floor

    else:
        e = _smoothed_errors(curve, [errors[i] for i in kept], window, smoothing)

        def floor(i: int, j: int) -> float:
            return noise_factor * universal * math.sqrt((e[i] ** 2 + e[j] ** 2) / 2)

    peaks = []
    for first, last in _local_maxima(s):
        height = s[first]
        left = _base(s, first - 1, -1, height)
        right = _base(s, last + 1, +1, height)
        base = left if s[left] >= s[right] else right
        prominence = height - s[base]
        noise = max(floor(k, base) for k in range(first, last + 1))
        if prominence < max(min_prominence * spread, noise) or prominence <= 0:
            continue
        summit = max(range(left + 1), key=lambda k: s[k])
        descent = s[summit] - s[left]
        if require_descent_before and (descent < floor(summit, left) or descent <= 0):
            continue
        top = max(range(first, last + 1), key=lambda k: curve[k])
        peaks.append(
            Peak(
                position=where[kept[top]],
                index=kept[top],
                height=height,
                value=curve[top],
                prominence=prominence,
                left_base=where[kept[left]],
                right_base=where[kept[right]],
            )
        )
    return peaks


# ------------------------------------------------------------------------------------------------------------
# Bias and variance.


def disjoint_splits(n: int, m: int, generator: torch.Generator | int) -> list[Tensor]:
    """``m`` disjoint random index sets of equal size ``n // m`` over ``range(n)``, for the bias-variance
    estimate of Yang et al. (2020): one model is trained on each.

    The ``n % m`` left-over indices are in no split. The splits are a function of the generator's state only
    (the global RNG is not used): the same seed gives the same splits.

    Args:
        n: number of training examples.
        m: number of splits, >= 2 (a sample variance needs two models) and <= ``n``.
        generator: a ``torch.Generator`` on the CPU (advanced by one ``randperm``), or an int seed.

    Returns:
        A list of ``m`` sorted ``int64`` tensors of ``n // m`` indices each.

    Raises:
        ValueError: if ``n`` is not a positive int, ``m`` is not an int in ``[2, n]``, or ``generator`` is
            neither a CPU ``torch.Generator`` nor an int.

    Example:
        >>> splits = disjoint_splits(10, 3, generator=0)
        >>> [len(split) for split in splits], len(set(torch.cat(splits).tolist()))
        ([3, 3, 3], 9)
    """
    n = check_int("n", n, 1)
    m = check_int("m", m, 2)
    if m > n:
        raise ValueError(f"`m` must be at most `n` ({n}) so that no split is empty, got {m}")
    if isinstance(generator, Integral) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(int(generator))
    elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"`generator` must be a CPU torch.Generator or an int seed, got {generator!r}")
    size = n // m
    permutation = torch.randperm(n, generator=generator)[: m * size]
    return [split.sort().values for split in permutation.reshape(m, size)]


class BiasVariance(NamedTuple):
    """A bias-variance decomposition, ``risk = bias_squared + variance`` (0-d tensors)."""

    risk: Tensor
    """Mean loss of the models over the test points."""
    bias_squared: Tensor
    """Bias² (squared error: ``risk - variance``; cross-entropy: ``KL(y || normalised geometric mean)``)."""
    variance: Tensor
    """Variance (squared error: unbiased sample variance; cross-entropy: ``E KL(mean || model)``)."""


def _ensemble(predictions: object, name: str) -> Tensor:
    """``(k, m, N, C)`` floating predictions from ``(m, N, C)`` or ``(k, m, N, C)``."""
    predictions = check_tensor(name, predictions)
    if predictions.ndim not in (3, 4) or not predictions.is_floating_point():
        raise ValueError(
            f"`{name}` must be floating, of shape (m, N, C) for m models or (k, m, N, C) for k partitions, "
            f"got dtype {predictions.dtype} and shape {tuple(predictions.shape)}"
        )
    if predictions.ndim == 3:
        predictions = predictions.unsqueeze(0)
    k, m, n, c = predictions.shape
    if m < 2:
        raise ValueError(f"`{name}` must hold m >= 2 models (one per disjoint split), got {m}")
    if k < 1 or n < 1 or c < 1:
        raise ValueError(
            f"`{name}` must hold at least one partition, test point and class, got {tuple(predictions.shape)}"
        )
    if predictions.dtype in (torch.float16, torch.bfloat16):
        predictions = predictions.float()
    return predictions


def _target_matrix(targets: object, n: int, c: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(N, C)`` targets: one-hot rows for integer labels, the given float matrix otherwise."""
    targets = check_tensor("targets", targets)
    if targets.ndim == 1 and _is_integer_tensor(targets):
        if targets.shape[0] != n:
            raise ValueError(f"`targets` must have one label per test point ({n}), got {targets.shape[0]}")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= c):
            raise ValueError(
                f"`targets` must be labels in [0, {c}), got {int(targets.min())}..{int(targets.max())}"
            )
        return F.one_hot(targets.to(device).long(), c).to(dtype)
    if targets.ndim == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (n, c):
            raise ValueError(f"`targets` as a matrix must have shape ({n}, {c}), got {tuple(targets.shape)}")
        return targets.to(device=device, dtype=dtype)
    raise ValueError(
        f"`targets` must be integer labels (N,) or a float target matrix (N, C), got dtype {targets.dtype} "
        f"and shape {tuple(targets.shape)}"
    )


def mse_bias_variance(predictions: Tensor, targets: Tensor) -> BiasVariance:
    r"""Bias² and variance of the squared error (Yang et al., 2020), from models trained on disjoint splits.

    With ``f_j(x)`` the output vector of model ``j`` of a partition and ``f̄(x)`` their mean over the ``m``
    models:

    - ``variance = mean_x sum_j ||f_j(x) - f̄(x)||² / (m - 1)`` (unbiased sample variance, summed over
      classes, averaged over test points);
    - ``risk = mean_{j, x} ||y(x) - f_j(x)||²`` (the models' mean test MSE, summed over classes);
    - ``bias_squared = risk - variance`` (also ``mean_x ||y - f̄||² - variance / m``).

    With ``k`` partitions, each quantity is the mean of the ``k`` per-partition estimates. See the module
    docstring for why these are unbiased and what the models must be.

    Args:
        predictions: ``(m, N, C)`` outputs of ``m >= 2`` models on ``N`` test points, or ``(k, m, N, C)``
            for ``k`` independent partitions into ``m`` splits.
        targets: integer labels ``(N,)`` in ``[0, C)`` (one-hot targets) or a float target matrix ``(N, C)``.

    Returns:
        :class:`BiasVariance` of 0-d tensors in the predictions' dtype (half precision promoted to float32).

    Raises:
        ValueError: if the shapes are not as above, ``m < 2``, or a label is outside ``[0, C)``.

    Example:
        >>> predictions = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]])
        >>> mse_bias_variance(predictions, torch.tensor([0, 2]))
        BiasVariance(risk=tensor(1.2500), bias_squared=tensor(0.7500), variance=tensor(0.5000))
    """
    p = _ensemble(predictions, "predictions")
    k, m, n, c = p.shape
    y = _target_matrix(targets, n, c, p.dtype, p.device)
    mean = p.mean(dim=1, keepdim=True)
    variance = (p - mean).pow(2).sum(dim=(1, 3)).div(m - 1).mean()
    risk = (p - y).pow(2).sum(dim=3).mean()
    return BiasVariance(risk=risk, bias_squared=risk - variance, variance=variance)


def _cross_entropy(y: Tensor, log_q: Tensor) -> Tensor:
    """``-sum_c y_c log q_c`` over the last dimension; classes with ``y_c = 0`` add nothing, even if
    ``log q_c = -inf``."""
    return -torch.where(y > 0, y * log_q, torch.zeros_like(log_q)).sum(dim=-1)


def cross_entropy_bias_variance(logits: Tensor, targets: Tensor) -> BiasVariance:
    r"""Bias and variance of the cross-entropy (Yang et al., 2020; Heskes, 1998), from disjoint splits.

    With ``log π_j = log_softmax(logits_j)`` for model ``j`` of a partition and ``π̄`` the normalised
    geometric mean, ``log π̄ = mean_j log π_j - logsumexp_c(mean_j log π_j)``:

    - ``risk = mean_{j, x} KL(y || π_j)``, the mean cross-entropy for one-hot ``y``;
    - ``bias_squared = mean_x KL(y || π̄)``;
    - ``variance = mean_{j, x} KL(π̄ || π_j)``;

    and ``risk = bias_squared + variance`` holds exactly (module docstring). All three are plug-in estimates
    over the ``m`` models, as in the paper: for models close to each other the variance is low by the factor
    ``(m - 1) / m`` (and the bias high by as much); with ``k`` partitions each partition has its own ``π̄``
    and the estimates are averaged.

    Args:
        logits: ``(m, N, C)`` logits (or log-probabilities: ``log_softmax`` leaves them unchanged) of
            ``m >= 2`` models on ``N`` test points, or ``(k, m, N, C)`` for ``k`` partitions. Probabilities
            must be passed as their logarithm.
        targets: integer labels ``(N,)`` in ``[0, C)`` or a float matrix ``(N, C)`` of target distributions
            (rows summing to 1; the identity needs it).

    Returns:
        :class:`BiasVariance` of 0-d tensors in the logits' dtype (half precision promoted to float32).

    Raises:
        ValueError: if the shapes are not as above, ``m < 2``, or a label is outside ``[0, C)``.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]]], dtype=torch.float64)
        >>> result = cross_entropy_bias_variance(logits, torch.tensor([0]))
        >>> round(result.bias_squared.item(), 6)  # the geometric mean is (1/2, 1/2): KL = log 2
        0.693147
        >>> abs(result.risk - result.bias_squared - result.variance).item() < 1e-15
        True
    """
    log_p = torch.log_softmax(_ensemble(logits, "logits"), dim=-1)
    k, m, n, c = log_p.shape
    y = _target_matrix(targets, n, c, log_p.dtype, log_p.device)
    mean_log = log_p.mean(dim=1, keepdim=True)
    log_bar = mean_log - torch.logsumexp(mean_log, dim=-1, keepdim=True)  # (k, 1, N, C)
    y_log_y = torch.special.xlogy(y, y).sum(dim=-1)  # 0 for one-hot targets
    risk = (_cross_entropy(y, log_p) + y_log_y).mean()
    bias = (_cross_entropy(y, log_bar[:, 0]) + y_log_y).mean()
    p_bar = log_bar.exp()
    kl = torch.where(p_bar > 0, p_bar * (log_bar - log_p), torch.zeros_like(log_p)).sum(dim=-1)
    variance = kl.mean()
    return BiasVariance(risk=risk, bias_squared=bias, variance=variance)
