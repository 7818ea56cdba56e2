"""Small networks for fast tests: a multilayer perceptron and LeNet-5.

Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-Based Learning Applied to Document Recognition",
Proceedings of the IEEE 86(11), 1998: LeNet-5, two 5x5 convolutions with 6 and 16 channels, each followed by
2x2 subsampling, then fully connected layers of 120, 84 and ``num_classes`` units. Here the nonlinearity is
ReLU and the subsampling max pooling, the common modern form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from lt_theory.checks import check_positive_int

__all__ = ["LeNet", "MLP"]


class MLP(nn.Module):
    """Multilayer perceptron: flatten, then ``Linear + ReLU`` per hidden layer, then a ``Linear`` classifier.

    Args:
        in_shape: shape of one input without the batch dimension, e.g. ``(3, 32, 32)``.
        hidden: widths of the hidden layers; empty for a linear model.
        num_classes: outputs of the classifier.

    Raises:
        ValueError: if ``in_shape`` or ``hidden`` holds something other than positive ints, ``in_shape`` is
            empty, or ``num_classes`` is not a positive int.

    Example:
        >>> import torch
        >>> model = MLP((3, 32, 32), hidden=(128, 64))
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (3, 32, 32),
        hidden: Sequence[int] = (128,),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        in_shape = tuple(in_shape)
        hidden = tuple(hidden)
        if not in_shape:
            raise ValueError("`in_shape` must hold at least one positive int, got ()")
        for size in in_shape:
            check_positive_int("in_shape", size)
        for size in hidden:
            check_positive_int("hidden", size)
        check_positive_int("num_classes", num_classes)
        self.in_shape = in_shape
        self.hidden = hidden
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(in_shape)
        for size in hidden:
            layers += [nn.Linear(features, size), nn.ReLU()]
            features = size
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-5 for 32x32 images: ``conv5x5(6)-relu-maxpool2, conv5x5(16)-relu-maxpool2, fc 120, 84, classes``.

    Args:
        in_channels: channels of the input images (32x32).
        num_classes: outputs of the classifier.

    Raises:
        ValueError: if ``in_channels`` or ``num_classes`` is not a positive int.

    Example:
        >>> import torch
        >>> model = LeNet()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
