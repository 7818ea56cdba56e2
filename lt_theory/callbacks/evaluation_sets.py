"""Evaluation sets taken from a data module, shared by the callbacks that evaluate a model on them.

A callback that measures error and loss (DoubleDescentProbe, LinearModeConnectivity) needs the same examples
at every measurement, without augmentation, in a fixed order:

- a fixed training subset of ``train_subset_size`` examples drawn once from ``seed`` (sorted indices; all of
  them when ``None``), with the clean labels and the noisy flags of an lt_theory data module with label noise;
- the test split (else the validation split), its first ``test_subset_size`` examples (all when ``None``).

An lt_theory data module (in-memory ``images`` / ``labels`` and a ``preprocess`` transform) is read as
tensors (:class:`TensorSet`); any other data module through the map-style datasets of its loaders
(:class:`DatasetSet`, with the loader's collate function and workers, never its sampler). Under DDP each rank
can evaluate the rows ``rank::world`` of a set (``batches(rank, world)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any, NamedTuple

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

__all__ = [
    "DatasetSet",
    "EvaluationSets",
    "TensorSet",
    "computed_once",
    "evaluation_sets",
    "fixed_subset",
    "split_loader",
]


def fixed_subset(size: int, subset_size: int | None, seed: int) -> Tensor:
    """Sorted indices of ``subset_size`` of ``size`` examples drawn from ``seed`` (all when it is None or larger).

    Example:
        >>> fixed_subset(10, 4, seed=0).tolist() == fixed_subset(10, 4, seed=0).tolist()
        True
        >>> fixed_subset(3, None, seed=0).tolist()
        [0, 1, 2]
    """
    if subset_size is None or subset_size >= size:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:subset_size].sort().values


class TensorSet:
    """An evaluation set held as tensors (an lt_theory split); iterating it yields every batch in order."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches(0, 1)

    def batches(self, rank: int, world: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of rows ``rank::world``."""
        images, labels = self.images, self.labels
        if world > 1:
            shard = torch.arange(rank, len(labels), world)
            images, labels = images[shard], labels[shard]
        for start in range(0, len(labels), self.batch_size):
            yield images[start : start + self.batch_size], labels[start : start + self.batch_size]


class DatasetSet:
    """An evaluation set held as a map-style dataset, read by a sequential DataLoader built once per shard."""

    def __init__(self, dataset, indices: Tensor, like: DataLoader, batch_size: int) -> None:
        self.dataset, self.indices, self.like, self.batch_size = dataset, indices, like, batch_size
        self._loaders: dict[tuple[int, int], DataLoader] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.batches(0, 1))

    def batches(self, rank: int, world: int) -> DataLoader:
        """A loader over the rows ``rank::world``."""
        if (rank, world) not in self._loaders:
            workers = self.like.num_workers
            self._loaders[(rank, world)] = DataLoader(
                Subset(self.dataset, self.indices[rank::world].tolist()),
                batch_size=self.batch_size,
                shuffle=False,
                collate_fn=self.like.collate_fn,
                num_workers=workers,
                persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(0),  # workers' base seed: not the global RNG
            )
        return self._loaders[(rank, world)]


class EvaluationSets(NamedTuple):
    """What :func:`evaluation_sets` found; a missing set is None."""

    train: TensorSet | DatasetSet | None
    test: TensorSet | DatasetSet | None
    transform: Callable[[Tensor], Tensor] | None
    clean_labels: Tensor | None = None
    """Clean labels of the training subset (an lt_theory data module), else None."""
    is_noisy: Tensor | None = None
    """Whether each example of the training subset has a noisy label (an lt_theory data module), else None."""


def _is_map_loader(loader) -> bool:
    dataset = getattr(loader, "dataset", None)
    return (
        isinstance(loader, DataLoader)
        and not isinstance(dataset, IterableDataset)
        and isinstance(dataset, Sized)
    )


def _in_memory(split) -> bool:
    return hasattr(split, "images") and hasattr(split, "labels")


def evaluation_sets(
    trainer: Trainer,
    train_subset_size: int | None,
    test_subset_size: int | None,
    seed: int,
    batch_size: int,
    warn: Callable[[str, str], None],
) -> EvaluationSets:
    """The training subset and the test (else validation) set of ``trainer.datamodule``.

    Args:
        trainer: a trainer with a data module whose training data is set up.
        train_subset_size: training examples (a fixed subset drawn from ``seed``); None for all.
        test_subset_size: the first test (or validation) examples; None for all.
        seed: seed of the training subset.
        batch_size: batch size of the evaluation passes.
        warn: ``warn(key, message)``, called for a loader that cannot be read in a fixed order.

    Returns:
        :class:`EvaluationSets`.
    """
    datamodule = trainer.datamodule
    transform = getattr(datamodule, "preprocess", None)
    transform = transform if callable(transform) else None
    train = getattr(datamodule, "train_dataset", None)
    if transform is not None and _in_memory(train):
        return _tensor_sets(datamodule, transform, train_subset_size, test_subset_size, seed, batch_size)
    loader = trainer.train_dataloader  # the loader in use; the data module's hook otherwise
    if not isinstance(loader, DataLoader):
        loader = datamodule.train_dataloader()
    train_set = _dataset_set(loader, "train_dataloader()", train_subset_size, seed, True, batch_size, warn)
    test_set = None
    for hook in ("test_dataloader", "val_dataloader"):
        if is_overridden(hook, datamodule):
            test_set = _dataset_set(
                getattr(datamodule, hook)(), f"{hook}()", test_subset_size, seed, False, batch_size, warn
            )
            if test_set is not None:
                break
    return EvaluationSets(train_set, test_set, transform)


def _tensor_sets(
    datamodule: LightningDataModule,
    transform,
    train_subset_size: int | None,
    test_subset_size: int | None,
    seed: int,
    batch_size: int,
) -> EvaluationSets:
    train = datamodule.train_dataset
    subset = fixed_subset(len(train.labels), train_subset_size, seed)
    everything = len(subset) == len(train.labels)
    images, labels = (
        (train.images, train.labels) if everything else (train.images[subset], train.labels[subset])
    )
    clean_labels = is_noisy = None
    if hasattr(train, "clean_labels") and hasattr(train, "noisy_indices"):
        noisy = torch.zeros(len(train.labels), dtype=torch.bool)
        noisy[train.noisy_indices] = True
        clean_labels, is_noisy = train.clean_labels[subset], noisy[subset]
    test = getattr(datamodule, "test_dataset", None) or getattr(datamodule, "val_dataset", None)
    test_set = None
    if _in_memory(test):
        size = len(test.labels) if test_subset_size is None else min(test_subset_size, len(test.labels))
        everything = size == len(test.labels)
        test_images, test_labels = (
            (test.images, test.labels) if everything else (test.images[:size], test.labels[:size])
        )
        test_set = TensorSet(test_images, test_labels, batch_size)
    return EvaluationSets(TensorSet(images, labels, batch_size), test_set, transform, clean_labels, is_noisy)


def _dataset_set(
    loader, source: str, subset_size: int | None, seed: int, draw: bool, batch_size: int, warn
) -> DatasetSet | None:
    """A set over ``loader``'s dataset: a seeded subset (``draw``) or its first ``subset_size`` examples."""
    if not _is_map_loader(loader):
        warn(
            f"unsized:{source}",
            f"`{source}` is not a DataLoader over a map-style dataset with a length, so the examples it holds "
            "cannot be evaluated in a fixed order; the measurements on it are off.",
        )
        return None
    size = len(loader.dataset)
    if draw:
        indices = fixed_subset(size, subset_size, seed)
    else:
        indices = torch.arange(size if subset_size is None else min(size, subset_size))
    return DatasetSet(loader.dataset, indices, loader, batch_size)


def split_loader(trainer: Trainer, split: str):
    """The data module's ``<split>_dataloader()`` (``"val"`` falls back to the Trainer's validation loaders),
    or None when there is none."""
    datamodule = trainer.datamodule
    if datamodule is not None and is_overridden(f"{split}_dataloader", datamodule):  # the base class raises
        return getattr(datamodule, f"{split}_dataloader")()
    if split == "val":
        return trainer.val_dataloaders
    return None


def computed_once(trainer: Trainer, module: torch.nn.Module, compute: Callable[[], Any]) -> Any:
    """``compute()`` on global rank zero, its result shared with every rank (under DDP every rank enters).

    A model with SyncBatchNorm is evaluated on every rank (same data, same result): a BatchNorm reset pass
    over it is a collective.
    """
    world = trainer.world_size
    every_rank = world > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
    result = compute() if trainer.is_global_zero or every_rank else None
    return trainer.strategy.broadcast(result, src=0) if world > 1 else result
