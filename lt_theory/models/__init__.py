"""Models for the recipes and the tests: CIFAR ResNets (He et al., 2016), PreAct ResNet-18 of width ``k``
(Nakkiran et al., 2019), small nets (MLP, LeNet-5), and
any of them on average-pooled inputs (PooledInput). Plain ``torch.nn``, traceable by ``torch.fx``."""

from lt_theory.models.pooled import PooledInput
from lt_theory.models.preact_resnet import PreActBlock, PreActResNet18
from lt_theory.models.resnet_cifar import (
    BasicBlock,
    CIFARResNet,
    ZeroPadShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from lt_theory.models.small import MLP, LeNet

__all__ = [
    "MLP",
    "BasicBlock",
    "CIFARResNet",
    "LeNet",
    "PooledInput",
    "PreActBlock",
    "PreActResNet18",
    "ZeroPadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]
