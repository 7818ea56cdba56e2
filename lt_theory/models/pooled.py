"""A network on average-pooled inputs: ``net(avg_pool(x, pool))``, a CPU-sized stand-in for full resolution.

Average pooling by a factor ``p`` (``nn.AvgPool2d(p)``: non-overlapping ``p x p`` windows) has no parameters,
so the wrapped network keeps its parameter count and its initialisation; only its input is smaller (a 32x32
CIFAR image pooled by 8 is 4x4, 48 numbers for an MLP). Any recipe can use it around any ``model.net``::

    model:
      net:
        class_path: lt_theory.models.PooledInput
        init_args:
          pool: 8
          net:
            class_path: lt_theory.models.MLP
            init_args: {in_shape: [3, 4, 4], hidden: [64]}
"""

from __future__ import annotations

from torch import Tensor, nn

from lt_theory.checks import check_positive_int

__all__ = ["PooledInput"]


class PooledInput(nn.Module):
    """``net`` applied to the inputs average-pooled by ``pool`` (``nn.AvgPool2d(pool)``).

    Args:
        net: the network that takes the pooled images.
        pool: the pooling window and stride, an int >= 1 (1: no pooling).

    Raises:
        ValueError: if ``net`` is not an ``nn.Module`` or ``pool`` is not an int >= 1.

    Example:
        >>> import torch
        >>> from lt_theory.models import MLP
        >>> model = PooledInput(MLP((3, 4, 4), hidden=(8,)), pool=8)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, net: nn.Module, pool: int = 1) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"`net` must be a torch.nn.Module, got {type(net).__name__}")
        check_positive_int("pool", pool)
        self.pool_size = pool
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.pool(x))
