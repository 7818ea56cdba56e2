"""Data for lt_theory: CIFAR-10/100 from the official files (no torchvision), a synthetic stand-in that
needs no download, symmetric label noise, and batched GPU-side augmentation.

Example:
    >>> from lt_theory.data import SyntheticCIFARDataModule
    >>> dm = SyntheticCIFARDataModule(num_train=200, num_test=50, label_noise=0.1)
    >>> dm.setup()
    >>> x, y, indices = dm.probe(8, split="test")
    >>> x.shape
    torch.Size([8, 3, 32, 32])
"""

from lt_theory.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    normalize,
    random_crop,
    random_horizontal_flip,
    to_unit_float,
)
from lt_theory.data.cifar_files import (
    CIFAR_ARCHIVES,
    CIFARArchive,
    CIFARDownloadError,
    CIFARIntegrityError,
    check_cifar_present,
    cifar_folder,
    cifar_is_present,
    download_cifar,
    read_cifar_class_names,
    read_cifar_split,
)
from lt_theory.data.datamodule import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    LabeledImages,
    SyntheticCIFARDataModule,
    channel_statistics,
    derived_seed,
)
from lt_theory.data.label_noise import apply_label_noise
from lt_theory.data.synthetic import fourier_modes, make_synthetic_cifar

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_ARCHIVES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARArchive",
    "CIFARDataModule",
    "CIFARDownloadError",
    "CIFARIntegrityError",
    "LabeledImages",
    "SyntheticCIFARDataModule",
    "apply_label_noise",
    "channel_statistics",
    "check_cifar_present",
    "cifar_folder",
    "cifar_is_present",
    "derived_seed",
    "download_cifar",
    "fourier_modes",
    "make_synthetic_cifar",
    "normalize",
    "random_crop",
    "random_horizontal_flip",
    "read_cifar_class_names",
    "read_cifar_split",
    "to_unit_float",
]
