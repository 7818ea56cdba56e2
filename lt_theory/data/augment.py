"""Batched CIFAR augmentation and normalisation on whatever device the batch lives on.

The standard CIFAR training transform (He et al., 2016, "Deep Residual Learning for Image Recognition",
Sec. 4.2): pad 4 pixels of zeros on each side, take a random 32x32 crop, flip horizontally with
probability 1/2, then subtract the per-channel mean and divide by the per-channel standard deviation.
Here every step works on a whole batch at once with index arithmetic (no loop over images), so it runs on
the GPU after the batch has been transferred, and every random draw comes from a ``torch.Generator``
passed in by the caller, never from the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Convert ``uint8`` images in [0, 255] to ``float32`` in [0, 1]; floating images are returned as is.

    Args:
        images: tensor of any shape, ``uint8`` or floating point.

    Returns:
        ``images / 255`` as ``float32`` for ``uint8`` input, otherwise ``images`` unchanged.

    Raises:
        ValueError: if ``images`` is neither ``uint8`` nor floating point.

    Example:
        >>> to_unit_float(torch.tensor([0, 51, 255], dtype=torch.uint8))
        tensor([0.0000, 0.2000, 1.0000])
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images
    raise ValueError(f"`images` must be uint8 or floating point, got dtype {images.dtype}")


def random_crop(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels on every side and cut a random crop of the original size.

    Equivalent to ``F.pad(image, [padding] * 4)[:, top:top + H, left:left + W]`` with ``top`` and ``left``
    drawn independently per image, uniformly from ``{0, ..., 2 * padding}``, but computed for the whole batch
    at once by gathering rows and columns.

    Args:
        images: ``(N, C, H, W)`` tensor of any dtype, on any device.
        padding: number of zero pixels added on each side (>= 0).
        generator: source of the offsets; must live on ``images.device``. ``None`` uses the global RNG.

    Returns:
        Tensor of the same shape, dtype and device as ``images``.

    Raises:
        ValueError: if ``images`` is not 4-dimensional or ``padding`` is negative.

    Example:
        >>> images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
        >>> crops = random_crop(images, padding=2, generator=torch.Generator().manual_seed(0))
        >>> crops.shape
        torch.Size([2, 3, 8, 8])
    """
    _check_batch(images)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` must be a non-negative integer, got {padding!r}")
    count, channels, height, width = images.shape
    offsets = (
        torch.randint(0, 2 * padding + 1, (2, count), generator=generator, device=images.device) - padding
    )
    rows, rows_inside = _shifted_positions(height, offsets[0])
    cols, cols_inside = _shifted_positions(width, offsets[1])
    crops = images.gather(2, rows[:, None, :, None].expand(count, channels, height, width))
    crops = crops.gather(3, cols[:, None, None, :].expand(count, channels, height, width))
    inside = rows_inside[:, None, :, None] & cols_inside[:, None, None, :]
    return crops.masked_fill(~inside, 0)


def random_horizontal_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Mirror each image left-right independently with probability ``p``.

    Args:
        images: ``(N, C, H, W)`` tensor of any dtype, on any device.
        generator: source of the coin flips; must live on ``images.device``. ``None`` uses the global RNG.
        p: probability of flipping an image, in [0, 1].

    Returns:
        Tensor of the same shape, dtype and device as ``images``.

    Raises:
        ValueError: if ``images`` is not 4-dimensional or ``p`` is outside [0, 1].

    Example:
        >>> images = torch.arange(4.0).view(1, 1, 1, 4)
        >>> random_horizontal_flip(images, p=1.0)
        tensor([[[[3., 2., 1., 0.]]]])
    """
    _check_batch(images)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be a probability in [0, 1], got {p!r}")
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Per-channel standardisation ``(images - mean[c]) / std[c]`` of a batch of floating images.

    Args:
        images: ``(N, C, H, W)`` floating-point tensor.
        mean: ``C`` channel means.
        std: ``C`` positive channel standard deviations.

    Returns:
        Normalised tensor of the same shape, dtype and device.

    Raises:
        ValueError: if ``images`` is not a 4-dimensional floating tensor, or ``mean``/``std`` do not have
            one entry per channel, or ``std`` is not positive.

    Example:
        >>> normalize(torch.full((1, 3, 1, 1), 0.5), CIFAR10_MEAN, CIFAR10_STD).flatten()
        tensor([0.0348, 0.0731, 0.2045])
    """
    _check_batch(images)
    if not images.is_floating_point():
        raise ValueError(f"`images` must be floating point, got dtype {images.dtype}; see to_unit_float")
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device)
    channels = images.shape[1]
    if mean.shape != (channels,) or std.shape != (channels,):
        raise ValueError(
            f"`mean` and `std` must have one entry per channel ({channels}), "
            f"got shapes {tuple(mean.shape)} and {tuple(std.shape)}"
        )
    if not bool((std > 0).all()):
        raise ValueError(f"`std` must be positive, got {std.tolist()}")
    return (images - mean[:, None, None]) / std[:, None, None]


def _check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"`images` must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")


def _shifted_positions(size: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index ``i + offset`` per image and output position, clamped, with a mask of those inside."""
    positions = torch.arange(size, device=offsets.device)[None, :] + offsets[:, None]
    inside = (positions >= 0) & (positions < size)
    return positions.clamp(0, size - 1), inside
