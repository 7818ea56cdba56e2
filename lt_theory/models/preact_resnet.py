"""Pre-activation ResNet-18 of width ``k``, the model family of the deep double descent experiments.

P. Nakkiran, G. Kaplun, Y. Bansal, T. Yang, B. Barak, I. Sutskever, "Deep Double Descent: Where Bigger
Models and More Data Hurt", ICLR 2020 (arXiv:1912.02292, 2019), section 3: ResNet-18s whose four stages have
``k, 2k, 4k, 8k`` channels; ``k = 64`` is the standard CIFAR ResNet-18 and ``k`` from 1 to 64 sweeps the
model size across the interpolation threshold.

The block is the pre-activation block of K. He, X. Zhang, S. Ren, J. Sun, "Identity Mappings in Deep
Residual Networks", ECCV 2016: ``x + conv(relu(bn(conv(relu(bn(x))))))``, where the shortcut, when the shape
changes, is a 1x1 convolution (with the block's stride, no bias) applied to ``relu(bn(x))``. The network is a
3x3 convolution with ``k`` channels (stride 1), four stages of two blocks with strides 1, 2, 2, 2, a final
BatchNorm and ReLU, global average pooling and a fully connected layer. With ``k = 64`` and 10 classes it has
11,172,170 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_theory.checks import check_positive_int

__all__ = ["PreActBlock", "PreActResNet18"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``shortcut + conv(relu(bn(conv(relu(bn(x))))))``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution and of the projection shortcut.

    Example:
        >>> block = PreActBlock(64, 128, stride=2)
        >>> block(torch.randn(2, 64, 32, 32)).shape
        torch.Size([2, 128, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 with stage widths ``k, 2k, 4k, 8k`` (Nakkiran et al., 2019).

    Args:
        k: width of the first stage; ``k = 64`` is the standard ResNet-18 (11.17M parameters).
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.

    Raises:
        ValueError: if ``k``, ``num_classes`` or ``in_channels`` is not a positive int.

    Example:
        >>> model = PreActResNet18(k=4)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, k: int = 64, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        check_positive_int("k", k)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.k = k
        self.conv1 = nn.Conv2d(in_channels, k, 3, stride=1, padding=1, bias=False)
        channels = k
        stages = []
        for stage_width, stride in zip((k, 2 * k, 4 * k, 8 * k), (1, 2, 2, 2)):
            stages.append(
                nn.Sequential(
                    PreActBlock(channels, stage_width, stride),
                    PreActBlock(stage_width, stage_width, 1),
                )
            )
            channels = stage_width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
