"""Symmetric label noise, as in the double-descent experiments of Nakkiran et al. (2020), "Deep Double
Descent: Where Bigger Models and More Data Hurt" (ICLR), Sec. 3: a fixed fraction of the training
examples, chosen at random, get a label drawn uniformly from the *other* classes.

Exactly ``round(fraction * N)`` examples are corrupted, and every corrupted label differs from the clean
one, so the fraction of wrong labels is the fraction asked for (with "uniform over all classes" it would
be ``fraction * (1 - 1 / num_classes)``). The choice is a function of the seed only.
"""

from __future__ import annotations

import torch


def apply_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the labels of a random ``fraction`` of the examples by a uniformly random different class.

    Args:
        labels: ``int64`` tensor of shape ``(N,)`` with values in ``[0, num_classes)``.
        fraction: fraction of examples whose label is changed, in [0, 1]; ``round(fraction * N)`` of them.
        num_classes: number of classes (>= 2 when any label is changed).
        seed: seed of the private generator that chooses the examples and their new labels.

    Returns:
        ``(noisy_labels, noisy_indices)``: a new label tensor (on the device of ``labels``) and the sorted
        ``int64`` indices of the changed examples; ``noisy_labels[i] != labels[i]`` exactly for those.

    Raises:
        ValueError: if ``fraction`` is outside [0, 1], ``labels`` is not a 1-D integer tensor with values in
            ``[0, num_classes)``, or ``num_classes < 2`` while labels must change.

    Example:
        >>> labels = torch.arange(10) % 5
        >>> noisy, changed = apply_label_noise(labels, fraction=0.3, num_classes=5, seed=0)
        >>> len(changed), bool((noisy[changed] != labels[changed]).all())
        (3, True)
    """
    _check_arguments(labels, fraction, num_classes)
    num_noisy = round(fraction * len(labels))
    if num_noisy > 0 and num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2 to change labels, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    noisy_indices = torch.randperm(len(labels), generator=generator)[:num_noisy].sort().values
    shifts = torch.randint(1, max(num_classes, 2), (num_noisy,), generator=generator)
    noisy_labels = labels.detach().cpu().clone()
    noisy_labels[noisy_indices] = (noisy_labels[noisy_indices] + shifts) % num_classes
    return noisy_labels.to(labels.device), noisy_indices.to(labels.device)


def _check_arguments(labels: torch.Tensor, fraction: float, num_classes: int) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be in [0, 1], got {fraction!r}")
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(
            f"`labels` must be a 1-D integer tensor, got shape {tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, num_classes={num_classes}), "
            f"got values from {int(labels.min())} to {int(labels.max())}"
        )
