"""ResNets for CIFAR of He et al. (2016), section 4.2.

K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

The network is a 3x3 convolution with 16 filters, then three stages of ``n`` basic blocks on feature maps of
32x32, 16x16 and 8x8 with 16, 32 and 64 filters (times ``width``), then global average pooling and a fully
connected layer: ``6n + 2`` weighted layers in all. A basic block is two 3x3 convolutions (no bias), each
followed by BatchNorm, with a ReLU between them and one after the addition of the shortcut. The first block of
stages 2 and 3 halves the resolution with stride 2 and doubles the channels; its shortcut is

- option ``"A"`` (the paper's CIFAR choice): the identity, subsampled with stride 2 and zero-padded to the new
  number of channels, so that every ResNet has as many parameters as its plain counterpart;
- option ``"B"``: a 1x1 convolution with stride 2 followed by BatchNorm (a projection).

Convolutions are initialised as in He et al. (2015), "Delving Deep into Rectifiers": normal with standard
deviation ``sqrt(2 / (k * k * c_in))``.

With 10 classes and option A, ResNet-20/32/44/56/110 have 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters
(Table 6 of the paper); ResNet-20 has exactly 269,722.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lt_theory.checks import check_positive_int

__all__ = [
    "BasicBlock",
    "CIFARResNet",
    "ZeroPadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

_SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut of option A: subsample with a stride, then zero-pad the new channels.

    ``out[:, :c_in] = x[:, :, ::stride, ::stride]`` and ``out[:, c_in:] = 0``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output, at least ``in_channels``.
        stride: spatial subsampling step.

    Raises:
        ValueError: if an argument is not a positive int or ``out_channels < in_channels``.

    Example:
        >>> shortcut = ZeroPadShortcut(16, 32, stride=2)
        >>> shortcut(torch.ones(1, 16, 32, 32)).shape
        torch.Size([1, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.stride = check_positive_int("stride", stride)
        if out_channels < in_channels:
            raise ValueError(
                f"`out_channels` must be at least `in_channels` ({in_channels}) for a zero-padding shortcut, "
                f"got {out_channels}"
            )

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad lists (left, right) pairs from the last dimension backwards: W, H, then C.
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Basic residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (and of the shortcut).
        shortcut: ``"A"`` (zero-padded identity) or ``"B"`` (1x1 convolution + BatchNorm) where the shape
            changes; the identity otherwise.

    Example:
        >>> block = BasicBlock(16, 32, stride=2, shortcut="A")
        >>> block(torch.randn(2, 16, 32, 32)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"`shortcut` must be one of {_SHORTCUTS}, got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CIFARResNet(nn.Module):
    """ResNet for 32x32 images of He et al. (2016), section 4.2, with ``depth = 6n + 2``.

    Args:
        depth: number of weighted layers, ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110, ...).
        num_classes: outputs of the classifier.
        width: multiplier of the channels of the three stages (16, 32, 64 times ``width``).
        shortcut: ``"A"`` (parameter-free, zero-padded identity; the paper's CIFAR choice) or ``"B"``
            (1x1 convolution + BatchNorm) where the shape changes.
        in_channels: channels of the input images.

    Raises:
        ValueError: if ``depth`` is not ``6n + 2``, or ``num_classes``, ``width`` or ``in_channels`` is not a
            positive int, or ``shortcut`` is not ``"A"`` or ``"B"``.

    Example:
        >>> model = CIFARResNet(20)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> sum(p.numel() for p in model.parameters())
        269722
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        width: int = 1,
        shortcut: str = "A",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"`depth` must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}"
            )
        check_positive_int("num_classes", num_classes)
        check_positive_int("width", width)
        check_positive_int("in_channels", in_channels)
        if shortcut not in _SHORTCUTS:
            raise ValueError(f"`shortcut` must be one of {_SHORTCUTS}, got {shortcut!r}")
        self.depth = depth
        self.width = width
        self.shortcut_option = shortcut
        blocks_per_stage = (depth - 2) // 6
        widths = (16 * width, 32 * width, 64 * width)

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        stages = []
        for index, stage_width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if index > 0 and block_index == 0 else 1
                blocks.append(BasicBlock(channels, stage_width, stride, shortcut))
                channels = stage_width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Apply the network's own initialisation: every convolution's weight drawn again from He et al.
        (2015)'s normal, ``std = sqrt(2 / (k * k * c_in))``, from the global random generator.

        The other layers (BatchNorm, the classifier) keep their values: for a complete fresh initialisation,
        call ``reset_parameters`` of every submodule first, children before parents (what
        :class:`~lt_theory.callbacks.imp.IMPPruner`'s ``random_reinit`` control does), then this one.
        ``__init__`` ends with this call, so a seeded construction draws the same weights as before the method
        existed.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def resnet20(num_classes: int = 10, width: int = 1, shortcut: str = "A") -> CIFARResNet:
    """ResNet-20 (n = 3) of He et al. (2016); 0.27M parameters with 10 classes and option A.

    Example:
        >>> resnet20()(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return CIFARResNet(20, num_classes=num_classes, width=width, shortcut=shortcut)


def resnet32(num_classes: int = 10, width: int = 1, shortcut: str = "A") -> CIFARResNet:
    """ResNet-32 (n = 5) of He et al. (2016); 0.46M parameters with 10 classes and option A."""
    return CIFARResNet(32, num_classes=num_classes, width=width, shortcut=shortcut)


def resnet44(num_classes: int = 10, width: int = 1, shortcut: str = "A") -> CIFARResNet:
    """ResNet-44 (n = 7) of He et al. (2016); 0.66M parameters with 10 classes and option A."""
    return CIFARResNet(44, num_classes=num_classes, width=width, shortcut=shortcut)


def resnet56(num_classes: int = 10, width: int = 1, shortcut: str = "A") -> CIFARResNet:
    """ResNet-56 (n = 9) of He et al. (2016); 0.85M parameters with 10 classes and option A."""
    return CIFARResNet(56, num_classes=num_classes, width=width, shortcut=shortcut)


def resnet110(num_classes: int = 10, width: int = 1, shortcut: str = "A") -> CIFARResNet:
    """ResNet-110 (n = 18) of He et al. (2016); 1.7M parameters with 10 classes and option A."""
    return CIFARResNet(110, num_classes=num_classes, width=width, shortcut=shortcut)
