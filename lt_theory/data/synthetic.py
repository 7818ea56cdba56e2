"""A synthetic stand-in for CIFAR: 32x32 colour images that a ResNet learns in a few hundred steps.

Each class owns a prototype: a random smooth colour texture, a sum of low-frequency Fourier modes
(horizontal and vertical frequencies up to ``MAX_FREQUENCY`` cycles per image) with complex Gaussian
coefficients whose amplitude decays as ``1 / |k|``. A sample of class ``c`` is

    image = 0.5 + FIELD_SCALE * (contrast * roll(prototype_c, dy, dx) + NUISANCE_STRENGTH * nuisance)
            + brightness + noise,

clipped to [0, 1] and stored as uint8, where ``roll`` is a uniformly random circular translation (applied
exactly as a phase shift of the Fourier coefficients), ``contrast`` a random gain, ``nuisance`` a fresh
random smooth texture drawn from the same distribution as the prototypes (so it carries no class
information), ``brightness`` a random per-channel offset and ``noise`` i.i.d. Gaussian pixel noise.

Because of the random translation, the class mean of every pixel is the same grey, so a linear model on
pixels stays near chance; a convolutional network must recognise the texture wherever it lies, which it
does quickly. Classes are balanced. Everything is drawn from generators seeded from ``seed`` (never the
global RNG), and the test images do not depend on ``num_train``, nor the train images on ``num_test``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

IMAGE_SIZE = 32
MAX_FREQUENCY = 3
FIELD_SCALE = 0.16
NUISANCE_STRENGTH = 0.5
CONTRAST_RANGE = (0.7, 1.3)
BRIGHTNESS_STD = 0.06
NOISE_STD = 0.05
_CHUNK = 1024
_STREAMS = {"prototypes": 0, "train": 1, "test": 2}


def make_synthetic_cifar(
    num_train: int, num_test: int, num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate a balanced, learnable CIFAR-shaped data set, deterministically from ``seed``.

    Args:
        num_train: number of training images (>= 0).
        num_test: number of test images (>= 0).
        num_classes: number of classes (>= 2).
        seed: non-negative integer; the same seed gives bit-identical data.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images are ``uint8`` tensors of shape
        ``(N, 3, 32, 32)``, labels ``int64`` tensors of shape ``(N,)``. Each class has ``N // num_classes``
        or one more examples.

    Raises:
        ValueError: if a count is negative, ``num_classes < 2`` or ``seed`` is negative.

    Example:
        >>> x, y, x_test, y_test = make_synthetic_cifar(100, 20, num_classes=10, seed=0)
        >>> x.shape, x.dtype, y.bincount().tolist()
        (torch.Size([100, 3, 32, 32]), torch.uint8, [10, 10, 10, 10, 10, 10, 10, 10, 10, 10])
    """
    _check_arguments(num_train, num_test, num_classes, seed)
    with _single_intra_op_thread():
        modes = fourier_modes(MAX_FREQUENCY)
        basis = _fourier_basis(modes)
        prototypes = _random_textures(num_classes, modes, _stream_generator(seed, "prototypes"))
        prototypes = prototypes / _rms(prototypes, basis)[:, None, None]
        train = _sample_images(num_train, prototypes, modes, basis, _stream_generator(seed, "train"))
        test = _sample_images(num_test, prototypes, modes, basis, _stream_generator(seed, "test"))
    return train[0], train[1], test[0], test[1]


def fourier_modes(max_frequency: int) -> torch.Tensor:
    """The non-redundant 2-D frequencies ``(k_row, k_col)`` with ``|k| <= max_frequency`` per axis, no DC.

    Args:
        max_frequency: largest frequency, in cycles per image, along each axis.

    Returns:
        ``int64`` tensor of shape ``(M, 2)``; of each pair ``k, -k`` only one is listed.

    Example:
        >>> fourier_modes(1).tolist()
        [[0, 1], [1, -1], [1, 0], [1, 1]]
    """
    pairs = [
        (k_row, k_col)
        for k_row in range(max_frequency + 1)
        for k_col in range(-max_frequency, max_frequency + 1)
        if k_row > 0 or k_col > 0
    ]
    return torch.tensor(pairs, dtype=torch.int64)


@contextlib.contextmanager
def _single_intra_op_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the setting.

    The generation is a long series of medium-sized, memory-bound operations: extra threads gain nothing
    when the machine is idle and, when other processes keep the cores busy, every parallel region waits for
    a descheduled thread (measured on 2 busy cores: 10 s for 50,000 images with 2 threads, 1.2 s with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_arguments(num_train: int, num_test: int, num_classes: int, seed: int) -> None:
    for name, value in (("num_train", num_train), ("num_test", num_test), ("seed", seed)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")


def _stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one independent stream; distinct (seed, stream) pairs get distinct seeds."""
    return torch.Generator().manual_seed(seed * len(_STREAMS) + _STREAMS[stream])


def _fourier_basis(modes: torch.Tensor) -> torch.Tensor:
    """Rows ``cos(phase_m)`` then ``sin(phase_m)`` over the flattened 32x32 grid, shape ``(2M, 1024)``."""
    rows, cols = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()]).double()
    phases = 2 * math.pi / IMAGE_SIZE * (modes.double() @ positions)
    return torch.cat([phases.cos(), phases.sin()]).float()


def _random_textures(count: int, modes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Complex Fourier coefficients of ``count`` random smooth colour textures, shape ``(count, 3, M)``."""
    amplitude = 1.0 / modes.double().norm(dim=1)
    real = torch.randn(count, 3, len(modes), generator=generator, dtype=torch.float64)
    imag = torch.randn(count, 3, len(modes), generator=generator, dtype=torch.float64)
    return torch.complex(real, imag) * amplitude


def _expected_rms(modes: torch.Tensor) -> float:
    """Expected root-mean-square pixel value of a texture from ``_random_textures``."""
    return math.sqrt(modes.double().norm(dim=1).pow(-2).sum().item())


def _rms(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel value of each texture in ``coefficients`` (shape ``(count, 3, M)``)."""
    return _render(coefficients, basis).pow(2).mean(dim=(1, 2)).sqrt().double()


def _render(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Pixel values ``Re(sum_m z_m exp(i phase_m))`` of textures, shape ``(count, 3, 1024)``."""
    real_and_minus_imag = torch.cat([coefficients.real, -coefficients.imag], dim=-1).float()
    return real_and_minus_imag @ basis


def _sample_images(
    count: int,
    prototypes: torch.Tensor,
    modes: torch.Tensor,
    basis: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = prototypes.shape[0]
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=generator)]
    images = torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for start in range(0, count, _CHUNK):
        chunk_labels = labels[start : start + _CHUNK]
        images[start : start + _CHUNK] = _sample_chunk(chunk_labels, prototypes, modes, basis, generator)
    return images, labels


def _sample_chunk(
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    modes: torch.Tensor,
    basis: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    count = len(labels)
    shifts = torch.randint(0, IMAGE_SIZE, (count, 2), generator=generator).double()
    shift_phases = -2 * math.pi / IMAGE_SIZE * (shifts @ modes.double().T)
    translation = torch.polar(torch.ones_like(shift_phases), shift_phases)
    low, high = CONTRAST_RANGE
    contrast = low + (high - low) * torch.rand(count, 1, 1, generator=generator, dtype=torch.float64)
    nuisance = _random_textures(count, modes, generator) / _expected_rms(modes)
    texture = contrast * prototypes[labels] * translation[:, None, :] + NUISANCE_STRENGTH * nuisance
    mean_level = 0.5 + BRIGHTNESS_STD * torch.randn(count, 3, 1, generator=generator, dtype=torch.float64)
    pixels = _render(FIELD_SCALE * texture, basis) + mean_level.float()
    pixels = torch.normal(pixels, NOISE_STD, generator=generator)
    pixels = pixels.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return pixels.view(count, 3, IMAGE_SIZE, IMAGE_SIZE)
