r"""Loss and classification error of a model over a data set: the one evaluation every measure and callback uses.

For examples :math:`(x_i, y_i)_{i=1}^n` and outputs :math:`f(x_i)`,

.. math::
    L = \frac1n \sum_i \ell\big(f(x_i), y_i\big), \qquad
    E = \frac1n \sum_i \mathbb 1\big[\operatorname{argmax}_c f(x_i)_c \ne y_i
        \ \text{or}\ f(x_i) \notin \mathbb R^C\big].

**One rule for a diverged network.** A row of outputs holding a NaN or an Inf counts as misclassified (its
argmax means nothing), so the error of a network that outputs NaN everywhere is 1, a number every callback
agrees on; the loss is the plain mean and so NaN or Inf as soon as one output is. The named losses are
computed per example and summed in float64; a ``loss_fn`` of the caller's is accumulated as
``loss_fn(outputs, targets) * batch_size`` when it returns a batch mean, or summed when it returns one loss
per example.

The model runs in eval mode under ``torch.no_grad`` and a forked RNG (:mod:`lt_theory.measures.modes`):
nothing about it or the global RNG changes, and its train/eval flags are restored, also on error.

Targets are class indices, or one-hot / soft labels of the outputs' shape (the error then compares with their
argmax).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_theory.measures.modes import eval_mode, forked_rng

__all__ = ["CLASSIFIER_LOSSES", "Evaluation", "evaluate", "loss_and_error_of_outputs", "predicted_classes"]

CLASSIFIER_LOSSES = ("cross_entropy", "mse")


class Evaluation(NamedTuple):
    """Result of :func:`evaluate`.

    Attributes:
        loss: mean loss over the examples (NaN or Inf if an output was not finite).
        error: fraction of the examples misclassified, a row with a non-finite output counted as wrong.
        num_examples: examples evaluated.
        outputs: the concatenated outputs on the evaluation device, or None unless ``keep_outputs``.
        labels: the concatenated targets (class indices), or None unless ``keep_outputs``.
    """

    loss: float
    error: float
    num_examples: int
    outputs: Tensor | None = None
    labels: Tensor | None = None


def cross_entropy(outputs: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per example (summed in float64 by :func:`evaluate`, not averaged in the outputs' dtype)."""
    return F.cross_entropy(outputs, labels, reduction="none")


def squared_error(outputs: Tensor, labels: Tensor) -> Tensor:
    """``||outputs - onehot(labels)||_2^2`` per example (the squared error of Yang et al., 2020); soft labels of
    the outputs' shape are used as they are."""
    target = labels if labels.shape == outputs.shape else F.one_hot(labels, outputs.shape[1])
    return (outputs - target.to(outputs.dtype)).pow(2).sum(dim=1)


def _loss_fn(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return cross_entropy
    if loss == "mse":
        return squared_error
    raise ValueError(f"`loss` must be one of {CLASSIFIER_LOSSES} or a callable, got {loss!r}")


def predicted_classes(outputs: Tensor) -> Tensor:
    """``argmax`` of each row of ``(n, C)`` outputs, and -1 (which no label equals) for a row with a NaN or Inf.

    Example:
        >>> predicted_classes(torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]))
        tensor([ 1, -1])
    """
    return torch.where(torch.isfinite(outputs).all(dim=1), outputs.argmax(dim=1), -1)


def _class_indices(targets: Tensor, outputs: Tensor) -> Tensor:
    return targets.argmax(dim=1) if targets.ndim == 2 and targets.shape == outputs.shape else targets


def _batch_totals(outputs: Tensor, targets: Tensor, loss_fn) -> tuple[Tensor, Tensor]:
    """Summed loss (float64) and number of wrong rows of one batch, under the rule of the module docstring."""
    n = outputs.shape[0]
    scores = outputs.float() if outputs.dtype in (torch.float16, torch.bfloat16) else outputs
    loss = loss_fn(scores, targets)
    if loss.numel() == 1:
        loss_sum = loss.detach().to(torch.float64).reshape(()) * n
    elif loss.shape == (n,):
        loss_sum = loss.detach().to(torch.float64).sum()
    else:
        raise ValueError(
            f"the loss (`loss`, `loss_fn`) must return the batch mean or one loss per example, got shape "
            f"{tuple(loss.shape)}"
        )
    return loss_sum, (predicted_classes(outputs) != _class_indices(targets, outputs)).sum()


def loss_and_error_of_outputs(
    outputs: Tensor, targets: Tensor, loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy"
) -> tuple[float, float]:
    """Mean loss and error of outputs already computed (e.g. gathered from every rank), by :func:`evaluate`'s rule.

    Args:
        outputs: ``(n, C)`` outputs.
        targets: ``(n,)`` class indices, or ``(n, C)`` one-hot / soft labels.
        loss: ``"cross_entropy"``, ``"mse"`` or ``loss(outputs, targets)`` returning a mean or per-example losses.

    Returns:
        ``(loss, error)`` as Python floats.

    Example:
        >>> outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0], [float("nan"), 0.0]])
        >>> loss_and_error_of_outputs(outputs, torch.tensor([0, 0, 0]))[1]  # the NaN row is wrong
        0.6666666666666666
    """
    if outputs.ndim != 2 or outputs.shape[0] == 0:
        raise ValueError(f"`outputs` must be a non-empty (n, classes) tensor, got shape {tuple(outputs.shape)}")
    loss_sum, wrong = _batch_totals(outputs, targets, _loss_fn(loss))
    n = outputs.shape[0]
    return float(loss_sum) / n, int(wrong) / n


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; the CPU for a model without either."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _inputs_and_targets(batch: object) -> tuple[Tensor, Tensor]:
    if (
        isinstance(batch, (list, tuple))
        and len(batch) >= 2
        and isinstance(batch[0], Tensor)
        and isinstance(batch[1], Tensor)
    ):
        return batch[0], batch[1]
    raise ValueError(
        f"the data (batches, loader) must yield (inputs, targets, ...) tuples or lists of tensors, got {batch!r:.80}"
    )


def _check_targets(targets: Tensor, outputs: Tensor) -> None:
    indices = targets.ndim == 1 and targets.shape[0] == outputs.shape[0] and not targets.is_floating_point()
    if not (indices or targets.shape == outputs.shape):
        raise ValueError(
            "the targets of a batch must be class indices (a 1-D integer tensor) or one-hot / soft labels of "
            f"the outputs' shape {tuple(outputs.shape)}, got dtype {targets.dtype} and shape {tuple(targets.shape)}"
        )


def evaluate(
    model: nn.Module,
    batches: Iterable,
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
    transform: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    keep_outputs: bool = False,
) -> Evaluation:
    """Mean loss and classification error of ``model`` over every batch, without perturbing it.

    Args:
        model: a classifier mapping a batch of inputs to ``(batch, classes)`` outputs.
        batches: an iterable of ``(inputs, targets, ...)`` (a DataLoader, a list of tuples); elements after the
            first two (e.g. indices) are ignored.
        loss: ``"cross_entropy"`` (mean over examples), ``"mse"`` (squared error to the one-hot label, summed
            over classes) or ``loss(outputs, targets)`` returning the batch mean or one loss per example.
        transform: applied to each batch of inputs on the device (a data module's ``preprocess``), or None.
        device: where to evaluate; None for the device of the model's first parameter or buffer.
        keep_outputs: also return the concatenated outputs and labels (on ``device``).

    Returns:
        :class:`Evaluation` ``(loss, error, num_examples, outputs, labels)``.

    Raises:
        ValueError: if ``model`` is not a module, ``loss`` is unknown, ``transform`` is not callable, a batch
            is not an ``(inputs, targets)`` pair, an output is not ``(batch, classes)`` or changes its number of
            classes, the loss is neither a mean nor per-example, or there is no example.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
        >>> batches = [(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))]
        >>> result = evaluate(model, batches)
        >>> result.error, result.num_examples  # the third example is misclassified
        (0.3333333333333333, 3)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    loss_fn = _loss_fn(loss)
    if transform is not None and not callable(transform):
        raise ValueError(f"`transform` must be callable or None, got {type(transform).__name__}")
    device = model_device(model) if device is None else torch.device(device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_wrong = torch.zeros((), dtype=torch.int64, device=device)
    kept_outputs: list[Tensor] = []
    kept_labels: list[Tensor] = []
    count = 0
    with eval_mode(model), torch.no_grad(), forked_rng(device):
        for batch in batches:
            inputs, targets = _inputs_and_targets(batch)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            outputs = model(transform(inputs) if transform is not None else inputs)
            n = inputs.shape[0]
            if not isinstance(outputs, Tensor) or outputs.ndim != 2 or outputs.shape[0] != n:
                shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
                raise ValueError(f"`model` must return (batch, classes) outputs, got {shape} for {n} inputs")
            if kept_outputs and outputs.shape[1] != kept_outputs[0].shape[1]:
                raise ValueError(
                    f"`model` returned {outputs.shape[1]} classes for a batch after {kept_outputs[0].shape[1]}"
                )
            _check_targets(targets, outputs)
            loss_sum, wrong = _batch_totals(outputs, targets, loss_fn)
            total_loss += loss_sum
            total_wrong += wrong
            count += n
            if keep_outputs or not kept_outputs:  # the first batch's width checks the others
                kept_outputs.append(outputs)
                kept_labels.append(_class_indices(targets, outputs).long())
    if count == 0:
        raise ValueError("the data (batches, loader) yielded no example to evaluate")
    values = torch.stack([total_loss, total_wrong.to(torch.float64)]).tolist()  # one read-back
    if not keep_outputs:
        return Evaluation(values[0] / count, values[1] / count, count)
    return Evaluation(values[0] / count, values[1] / count, count, torch.cat(kept_outputs), torch.cat(kept_labels))
