"""Lightning DataModules for CIFAR-10, CIFAR-100 and their synthetic stand-in.

All three hold the images in memory as ``uint8`` tensors; their datasets yield ``(image_uint8, label)``.
The conversion to float, the augmentation (random crop with 4 pixels of zero padding and a horizontal
flip, only while training) and the normalisation run in ``on_after_batch_transfer``, so on the GPU when
there is one, with the DataModule's own generators: the global RNG is never drawn from, so adding or
removing a DataModule feature cannot change a model's initialisation or dropout masks.

One ``seed`` fixes everything random about the data pipeline, each part from its own stream: the
train/validation split, the label noise, the order of the training examples and the augmentation. For
the synthetic data, the images themselves depend on a separate ``data_seed``, so that runs with different
``seed`` (for instance the two children of a linear-mode-connectivity experiment) see the same data set.

What the callbacks use: ``train_dataset.clean_labels`` / ``.labels`` (the labels in use) /
``.noisy_indices`` for double descent, ``preprocess`` (the evaluation transform) and ``probe`` (a fixed,
seeded subset of a split, already normalised). ``train_split=(i, m)`` trains on the ``i``-th of ``m``
disjoint parts of the (noisy) training set, for the bias-variance estimate of Yang et al. (2020).
``reseed_order(order_seed)`` re-seeds only the training order and the augmentation (the split and the noise
stay), which is how the siblings of ``LinearModeConnectivity`` get their own SGD noise. A checkpoint written
in mid-epoch resumes with the rest of that epoch's order (see ``state_dict``), on one device: under DDP,
Lightning's ``DistributedSampler`` replaces the sampler and a resumed epoch starts its order again.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lt_theory.checks import check_bool, check_fraction, check_int
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
    check_cifar_present,
    cifar_is_present,
    download_cifar,
    read_cifar_class_names,
    read_cifar_split,
)
from lt_theory.data.label_noise import apply_label_noise
from lt_theory.data.synthetic import make_synthetic_cifar
from lt_theory.measures.risk import disjoint_splits

CROP_PADDING = 4
_SPLITS = ("train", "val", "test")


def derived_seed(*parts: int | str) -> int:
    """A 64-bit seed determined by ``parts``, different for different ``parts`` (up to hash collisions).

    Used to give each random stream of the data pipeline (split, noise, order, augmentation of batch ``k`` on
    rank ``r``) its own generator seeded from the single user-facing ``seed``.

    Args:
        parts: integers and strings naming the stream.

    Returns:
        An integer in ``[0, 2**64)``, the same in every process and on every platform.

    Example:
        >>> derived_seed("shuffle", 0) == derived_seed("shuffle", 0) != derived_seed("shuffle", 1)
        True
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class LabeledImages(Dataset):
    """An in-memory split: ``uint8`` images with their labels, yielding ``(image, label)`` pairs.

    Args:
        images: ``uint8`` tensor ``(N, 3, H, W)``.
        labels: ``int64`` tensor ``(N,)``, the labels used for training and evaluation.
        clean_labels: the labels before label noise; defaults to ``labels``.
        noisy_indices: positions (in this split) whose label was changed; defaults to none.
        source_indices: position of each example in the official training or test set it was taken
            from; defaults to ``0, ..., N - 1``.

    Raises:
        ValueError: if the lengths disagree or ``images`` is not ``uint8``.

    Example:
        >>> split = LabeledImages(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
        >>> image, label = split[1]
        >>> image.shape, int(label), len(split.noisy_indices)
        (torch.Size([3, 32, 32]), 1, 0)
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        clean_labels: torch.Tensor | None = None,
        noisy_indices: torch.Tensor | None = None,
        source_indices: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8:
            raise ValueError(f"`images` must be uint8, got {images.dtype}")
        self.images = images
        self.labels = labels
        self.clean_labels = labels if clean_labels is None else clean_labels
        self.noisy_indices = torch.empty(0, dtype=torch.int64) if noisy_indices is None else noisy_indices
        self.source_indices = torch.arange(len(images)) if source_indices is None else source_indices
        if not len(images) == len(labels) == len(self.clean_labels) == len(self.source_indices):
            raise ValueError(
                f"images, labels, clean_labels and source_indices must have the same length, got "
                f"{len(images)}, {len(labels)}, {len(self.clean_labels)} and {len(self.source_indices)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class CIFARDataModule(LightningDataModule):
    """Base DataModule: splitting, label noise, loaders, GPU-side augmentation, probes and resumption.

    Subclasses provide the images (``_read_splits``), the channel statistics (``_channel_statistics``)
    and the class names; everything else is shared.

    Args:
        num_classes: number of classes.
        batch_size: training batch size (positive integer).
        eval_batch_size: validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes (non-negative integer).
        val_size: number of training examples held out, by a seeded permutation, as the validation split;
            0 validates on the test split.
        label_noise: fraction of the remaining training examples whose label is replaced by a different,
            uniformly random class (see ``apply_label_noise``), in [0, 1].
        augment: random crop (4-pixel zero padding) and horizontal flip of training batches.
        seed: non-negative integer fixing the split, the noise, the training order and the augmentation.
        train_split: ``(i, m)`` to train on the ``i``-th of ``m`` disjoint, equal parts of the training set
            (``disjoint_splits`` of :mod:`lt_theory.measures.risk`, drawn from ``seed``; the ``N % m``
            examples left over are in no part), taken after the validation split and the label noise, so that
            the ``m`` data modules that differ only in ``i`` share one noisy training set; None (default)
            trains on all of it. ``m >= 2`` and ``0 <= i < m``.
        global_batch_size: the batch of one optimizer step over all devices (the batch size a paper states);
            each of the ``W`` devices of a DDP run then loads ``global_batch_size / W`` examples (it must
            divide), so a recipe keeps its batch, and so its learning rate, on any number of GPUs. None
            (default): ``batch_size`` per device, Lightning's convention.

    Raises:
        ValueError: naming the argument and what it accepts, for any invalid value.

    Example:
        >>> dm = SyntheticCIFARDataModule(num_train=200, num_test=50, batch_size=32, val_size=20)
        >>> dm.setup()
        >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        (180, 20, 50)
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> dm.on_after_batch_transfer((images, labels), 0)[0].dtype
        torch.float32
    """

    def __init__(
        self,
        num_classes: int,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 0,
        label_noise: float = 0.0,
        augment: bool = True,
        seed: int = 0,
        train_split: tuple[int, int] | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=2)
        check_int("batch_size", batch_size, minimum=1)
        self.global_batch_size = check_int("global_batch_size", global_batch_size, minimum=1, allow_none=True)
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("val_size", val_size, minimum=0)
        check_fraction("label_noise", label_noise)
        check_bool("augment", augment)
        check_int("seed", seed, minimum=0)
        self.train_split = _check_train_split(train_split)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.label_noise = float(label_noise)
        self.augment = augment
        self.seed = seed
        self.train_dataset: LabeledImages | None = None
        self.val_dataset: LabeledImages | None = None
        self.test_dataset: LabeledImages | None = None
        self.class_names: list[str] | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self.order_seed: int | None = None  # see reseed_order; None: the order follows `seed`
        self._shuffle_generator = torch.Generator().manual_seed(derived_seed("shuffle", seed))
        self._train_sampler: _ResumableRandomSampler | None = None
        self._replay: tuple[torch.Tensor | None, int] = (None, 0)  # for the next sampler made
        self._augmentation_generator: torch.Generator | None = None
        self._augmented_batches = 0
        self._statistics_on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------------------- to override
    def _read_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_images, train_labels, test_images, test_labels)``, images ``uint8 (N, 3, 32, 32)``."""
        raise NotImplementedError

    def _channel_statistics(self, train_images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(mean, std)`` of the training images, in [0, 1] units."""
        raise NotImplementedError

    def _read_class_names(self) -> list[str]:
        return [f"class_{label}" for label in range(self.num_classes)]

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Read the data, split off the validation set and apply the label noise; a no-op the second time.

        Args:
            stage: the Lightning stage; ignored, every split is prepared.

        Raises:
            ValueError: if ``val_size`` is not smaller than the training set.
            FileNotFoundError: for CIFAR files that are missing (see ``CIFAR10DataModule``).
        """
        if self.train_dataset is not None:
            return
        train_images, train_labels, test_images, test_labels = self._read_splits()
        self.mean, self.std = self._channel_statistics(train_images)
        self.class_names = self._read_class_names()
        train_indices, val_indices = self._split_indices(len(train_images))
        self.test_dataset = LabeledImages(test_images, test_labels)
        self.val_dataset = self.test_dataset
        if self.val_size > 0:
            self.val_dataset = LabeledImages(
                train_images[val_indices], train_labels[val_indices], source_indices=val_indices
            )
            train_images, train_labels = train_images[train_indices], train_labels[train_indices]
        noisy_labels, noisy_indices = apply_label_noise(
            train_labels, self.label_noise, self.num_classes, seed=derived_seed("label_noise", self.seed)
        )
        if self.train_split is not None:
            part, parts = self.train_split
            if parts > len(train_labels):
                raise ValueError(
                    f"`train_split` must have at most {len(train_labels)} parts (the training examples), "
                    f"got {parts}"
                )
            keep = disjoint_splits(len(train_labels), parts, derived_seed("train_split", self.seed))[part]
            is_noisy = torch.zeros(len(train_labels), dtype=torch.bool)
            is_noisy[noisy_indices] = True
            noisy_indices = torch.nonzero(is_noisy[keep]).flatten()  # positions within the part
            train_images, train_indices = train_images[keep], train_indices[keep]
            noisy_labels, train_labels = noisy_labels[keep], train_labels[keep]
        self.train_dataset = LabeledImages(
            train_images, noisy_labels, train_labels, noisy_indices, source_indices=train_indices
        )

    @property
    def train_batch_size(self) -> int:
        """Examples per training batch on this device: ``global_batch_size / world size``, else ``batch_size``.

        Raises:
            ValueError: when ``global_batch_size`` is not a multiple of the number of devices.
        """
        if self.global_batch_size is None:
            return self.batch_size
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.global_batch_size % world:
            raise ValueError(
                f"`global_batch_size`={self.global_batch_size} must be a multiple of the {world} devices of "
                "this run (each loads an equal share); change it or the number of devices"
            )
        return self.global_batch_size // world

    def _split_indices(self, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted ``(train_indices, val_indices)`` of a seeded permutation of the official training set."""
        if self.val_size >= num_examples:
            raise ValueError(
                f"`val_size` must be smaller than the {num_examples} training examples, got {self.val_size}"
            )
        if self.val_size == 0:
            return torch.arange(num_examples), torch.empty(0, dtype=torch.int64)
        generator = torch.Generator().manual_seed(derived_seed("split", self.seed))
        permutation = torch.randperm(num_examples, generator=generator)
        return permutation[self.val_size :].sort().values, permutation[: self.val_size].sort().values

    # ---------------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``(uint8 images, labels)``, in an order fixed by ``seed``.

        Returns:
            A DataLoader whose sampler draws from the DataModule's own shuffling generator.
        """
        self.setup()
        if self._train_sampler is None or self._train_sampler.data_source is not self.train_dataset:
            self._train_sampler = _ResumableRandomSampler(self.train_dataset, self._shuffle_generator)
            self._train_sampler.resume_from(*self._replay)
            self._replay = (None, 0)
        return DataLoader(
            self.train_dataset,
            batch_size=self.train_batch_size,
            sampler=self._train_sampler,  # a RandomSampler: Lightning's DistributedSampler shuffles under DDP
            # the workers' base seed, drawn at each iterator: not from the order's generator, which an extra
            # or a missing iterator (persistent workers, a resume at an epoch end) would then shift
            generator=torch.Generator().manual_seed(derived_seed("workers", self._stream_seed())),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Sequential validation batches (the held-out part of training, or the test split if ``val_size=0``).

        Returns:
            A DataLoader over ``val_dataset`` in order.
        """
        self.setup()
        return self._sequential_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """Sequential batches of the official test split.

        Returns:
            A DataLoader over ``test_dataset`` in order.
        """
        self.setup()
        return self._sequential_loader(self.test_dataset)

    def _sequential_loader(self, dataset: LabeledImages) -> DataLoader:
        # A DataLoader draws its workers' base seed from `generator`, or from the global RNG without one.
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(derived_seed("sequential", self.seed)),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # ---------------------------------------------------------------------------------------- transforms
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Turn ``(uint8 images, labels)`` into ``(normalised float images, labels)`` on the batch's device.

        Training batches (``trainer.training``) are augmented when ``augment=True``.
        """
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(images, training=training), labels

    def transform_batch(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        """Convert to float in [0, 1], augment if ``training`` (and ``augment``), and normalise.

        Each augmented batch is drawn from the DataModule's generator on ``images.device``, re-seeded from
        ``(seed, global rank, number of batches augmented so far)``: the stream is reproducible, differs
        between ranks and continues after ``load_state_dict``.

        Args:
            images: ``uint8`` (or float in [0, 1]) tensor ``(N, 3, H, W)``.
            training: whether to apply the training augmentation.

        Returns:
            Normalised ``float32`` tensor on the same device.

        Example:
            >>> dm = SyntheticCIFARDataModule(num_train=100, num_test=10)
            >>> dm.setup()
            >>> dm.transform_batch(dm.train_dataset.images[:8], training=True).shape
            torch.Size([8, 3, 32, 32])
        """
        self.setup()
        if training and self.augment:
            generator = self._next_augmentation_generator(images.device)
            images = random_crop(images, CROP_PADDING, generator)
            images = random_horizontal_flip(images, generator)
        mean, std = self._statistics_on(images.device)
        return normalize(to_unit_float(images), mean, std)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluation transform: ``uint8`` images to normalised float images, without augmentation.

        Args:
            images: ``uint8`` tensor ``(N, 3, H, W)`` on any device.

        Returns:
            Normalised ``float32`` tensor on the same device.

        Example:
            >>> dm = SyntheticCIFARDataModule(num_train=100, num_test=10)
            >>> dm.preprocess(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape
            torch.Size([2, 3, 32, 32])
        """
        return self.transform_batch(images, training=False)

    def _next_augmentation_generator(self, device: torch.device) -> torch.Generator:
        generator = self._augmentation_generator
        if generator is None or not _same_device(generator.device, device):
            generator = self._augmentation_generator = torch.Generator(device=device)
        generator.manual_seed(
            derived_seed("augment", self._stream_seed(), self._global_rank(), self._augmented_batches)
        )
        self._augmented_batches += 1
        return generator

    def _stream_seed(self) -> int:
        return self.seed if self.order_seed is None else self.order_seed

    def reseed_order(self, order_seed: int) -> None:
        """Draw the training order and the augmentation from ``order_seed`` instead of ``seed`` from now on.

        The split, the label noise and the data set stay those of ``seed``: two data modules that differ only
        by ``reseed_order`` train on the same examples in a different order with different augmentation (the
        different SGD noise of the siblings of ``LinearModeConnectivity``). ``reseed_order(seed)`` gives the
        default streams. A later ``load_state_dict`` of a checkpoint whose streams came from another seed
        keeps these new streams (only the count of augmented batches is taken from it); from the same seed,
        it continues the checkpoint's streams as usual.

        Args:
            order_seed: non-negative integer.

        Raises:
            ValueError: if ``order_seed`` is not a non-negative integer.

        Example:
            >>> a = SyntheticCIFARDataModule(num_train=64, num_test=8, batch_size=64)
            >>> b = SyntheticCIFARDataModule(num_train=64, num_test=8, batch_size=64)
            >>> b.reseed_order(1)
            >>> bool((next(iter(a.train_dataloader()))[1] == next(iter(b.train_dataloader()))[1]).all())
            False
        """
        check_int("order_seed", order_seed, minimum=0)
        self.order_seed = int(order_seed)
        self._shuffle_generator.manual_seed(derived_seed("shuffle", order_seed))
        self._replay = (None, 0)
        if self._train_sampler is not None:
            self._train_sampler.resume_from(None, 0)

    def _global_rank(self) -> int:
        return getattr(self.trainer, "global_rank", 0) if self.trainer is not None else 0

    def _statistics_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._statistics_on_device:
            self._statistics_on_device[device] = (
                torch.tensor(self.mean, device=device),
                torch.tensor(self.std, device=device),
            )
        return self._statistics_on_device[device]

    # ------------------------------------------------------------------------------------------------ probe
    def probe(
        self, size: int, split: str = "val", seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fixed subset of a split, normalised without augmentation, for measurements during training.

        The indices are the first ``size`` entries of a permutation drawn from a private generator seeded with
        ``seed``, sorted: the same arguments give the same examples on every call, in every process and after
        a resume. On ``"train"`` the labels are the ones in use (noisy where label noise is on).

        Args:
            size: number of examples, from 1 to the length of the split.
            split: ``"train"``, ``"val"`` or ``"test"``.
            seed: seed of the choice.

        Returns:
            ``(images, labels, indices)``: normalised ``float32`` images ``(size, 3, 32, 32)`` on the CPU,
            their labels and their positions in the split's dataset.

        Raises:
            ValueError: if ``split`` is unknown or ``size`` is not in ``[1, len(split)]``.

        Example:
            >>> dm = SyntheticCIFARDataModule(num_train=100, num_test=50)
            >>> x, y, indices = dm.probe(16, split="test", seed=0)
            >>> x.shape, bool((indices == dm.probe(16, split="test", seed=0)[2]).all())
            (torch.Size([16, 3, 32, 32]), True)
        """
        if split not in _SPLITS:
            raise ValueError(f"`split` must be one of {_SPLITS}, got {split!r}")
        self.setup()
        dataset = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(dataset):
            raise ValueError(
                f"`size` must be an integer in [1, {len(dataset)}] for split {split!r}, got {size!r}"
            )
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(dataset), generator=generator)[:size].sort().values
        return self.preprocess(dataset.images[indices]), dataset.labels[indices], indices

    # --------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same data order and augmentation stream.

        Returns:
            ``{"seed", "order_seed", "shuffle_generator_state", "augmented_batches", "epoch_state",
            "examples_done"}``. The shuffling generator's state is taken at the time of the call: a checkpoint
            written at the end of an epoch resumes with the order of the next epoch. In mid-epoch (while a
            trainer has processed some but not all of the epoch's training batches) ``epoch_state`` is the
            generator state the epoch's permutation was drawn from and ``examples_done`` the examples of the
            batches processed, so the resumed run draws the same permutation and skips those examples; both
            are None / 0 otherwise. A batch already augmented but not yet trained on (a checkpoint written
            in ``on_train_batch_start``) is not counted in ``augmented_batches``: the resumed run augments it
            again.
        """
        epoch_state, examples_done, pending = None, 0, 0
        progress = self._epoch_progress()
        if progress is not None and self._train_sampler is not None:
            batches_done, pending = progress
            epoch_state = self._train_sampler.epoch_state
            examples_done = batches_done * self.train_batch_size if epoch_state is not None else 0
        return {
            "seed": self.seed,
            "order_seed": self._stream_seed(),
            "shuffle_generator_state": self._shuffle_generator.get_state(),
            "augmented_batches": self._augmented_batches - (pending if self.augment else 0),
            "epoch_state": epoch_state,
            "examples_done": examples_done,
        }

    def _epoch_progress(self) -> tuple[int, int] | None:
        """In mid-epoch: the training batches processed in the epoch, and those fetched but not processed."""
        trainer = self.trainer
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is None or getattr(trainer.state, "fn", None) != "fit":
            return None
        current = loop.batch_progress.current
        if not 0 <= current.processed < trainer.num_training_batches:
            return None
        return current.processed, max(0, current.ready - current.processed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the shuffling generator and the position in the augmentation stream.

        Args:
            state_dict: the output of ``state_dict``.
        """
        checkpoint_stream = state_dict.get("order_seed", state_dict.get("seed", self.seed))
        if self.order_seed is not None and self.order_seed != checkpoint_stream:  # re-seeded on purpose
            self._augmented_batches = int(state_dict["augmented_batches"])
            return
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(
                f"The checkpoint's data pipeline used seed={state_dict['seed']}, "
                f"this DataModule seed={self.seed}; "
                "continuing the checkpoint's shuffling and augmentation streams."
            )
        self._shuffle_generator.set_state(state_dict["shuffle_generator_state"])
        self._augmented_batches = int(state_dict["augmented_batches"])
        replay = (state_dict.get("epoch_state"), int(state_dict.get("examples_done", 0)))
        if self._train_sampler is not None:
            self._train_sampler.resume_from(*replay)
        else:
            self._replay = replay


def _base_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``CIFARDataModule.__init__`` after ``num_classes`` (batch sizes, loaders, split, noise,
    augmentation, seed), picked by name from a subclass's ``__init__`` ``locals()``: one list of them, the base
    class's signature, which each subclass repeats so that LightningCLI and ``help()`` show them."""
    names = list(inspect.signature(CIFARDataModule.__init__).parameters)[2:]  # after self, num_classes
    return {name: arguments[name] for name in names}


class _ResumableRandomSampler(RandomSampler):
    """``RandomSampler`` that records the generator state each permutation is drawn from, and can replay it.

    After ``resume_from(state, skip)``, the next pass sets the generator to ``state``, draws that
    permutation again and leaves out its first ``skip`` indices; the generator then ends where it did the
    first time. Drawing exactly what ``RandomSampler`` draws, it keeps the order of ``shuffle=True``.
    """

    def __init__(self, data_source: Dataset, generator: torch.Generator) -> None:
        super().__init__(data_source, generator=generator)
        self.epoch_state: torch.Tensor | None = None
        self._replay: tuple[torch.Tensor | None, int] = (None, 0)

    def resume_from(self, epoch_state: torch.Tensor | None, skip: int) -> None:
        self._replay = (epoch_state, skip)

    def __iter__(self):
        state, skip = self._replay
        self._replay = (None, 0)
        if state is not None:
            self.generator.set_state(state)
        else:
            skip = 0
        self.epoch_state = self.generator.get_state()
        for position, index in enumerate(super().__iter__()):
            if position >= skip:
                yield index


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 from the official python release under ``root`` (50,000 training, 10,000 test images).

    Args:
        root: directory holding (or to receive) ``cifar-10-batches-py/``.
        download: fetch and check the official archive in ``prepare_data`` when it is missing.
        url: download from this mirror instead of ``CIFAR_ARCHIVES["cifar10"].url``.
        md5: expected md5 of the archive at ``url``; defaults to the official one.
        verify_files: check every file's md5 against the official release before unpickling it (a damaged or
            substituted file raises ``CIFARIntegrityError`` naming it); False only for files you re-packed
            yourself and trust.
        batch_size, eval_batch_size, num_workers, val_size, label_noise, augment, seed, train_split,
            global_batch_size: see
            ``CIFARDataModule``.

    Raises:
        ValueError: for an invalid argument.
        FileNotFoundError: at ``setup`` when the files are missing and ``download=False``; the message names
            the folder, ``download=True`` and ``SyntheticCIFARDataModule``.

    Example:
        >>> dm = CIFAR10DataModule(root="data", download=True, val_size=5000)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup()  # doctest: +SKIP
        >>> len(dm.train_dataset), dm.class_names[:2]  # doctest: +SKIP
        (45000, ['airplane', 'automobile'])
    """

    dataset_name = "cifar10"
    channel_mean = CIFAR10_MEAN
    channel_std = CIFAR10_STD
    classes = 10

    def __init__(
        self,
        root: str | os.PathLike = "data",
        download: bool = False,
        url: str | None = None,
        md5: str | None = None,
        verify_files: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 0,
        label_noise: float = 0.0,
        augment: bool = True,
        seed: int = 0,
        train_split: tuple[int, int] | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__(self.classes, **_base_arguments(locals()))
        self.download = check_bool("download", download)
        self.verify_files = check_bool("verify_files", verify_files)
        self.root = root
        self.url = url
        self.md5 = md5
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Download, check and extract the archive when ``download=True`` and it is not there yet."""
        if self.download:
            download_cifar(self.root, self.dataset_name, url=self.url, md5=self.md5)

    def _read_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.download and not cifar_is_present(self.root, self.dataset_name):
            self.prepare_data()  # setup() called without prepare_data(), outside a Trainer
        check_cifar_present(self.root, self.dataset_name)
        train_images, train_labels = read_cifar_split(self.root, self.dataset_name, "train", self.verify_files)
        test_images, test_labels = read_cifar_split(self.root, self.dataset_name, "test", self.verify_files)
        return train_images, train_labels, test_images, test_labels

    def _channel_statistics(self, train_images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.channel_mean, self.channel_std

    def _read_class_names(self) -> list[str]:
        return read_cifar_class_names(self.root, self.dataset_name, self.verify_files)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from the official python release under ``root``.

    Same arguments and behaviour as ``CIFAR10DataModule``, with ``cifar-100-python/``, 100 classes and the
    CIFAR-100 channel statistics.

    Example:
        >>> CIFAR100DataModule(root="data", download=True).num_classes  # no file is touched before setup
        100
    """

    dataset_name = "cifar100"
    channel_mean = CIFAR100_MEAN
    channel_std = CIFAR100_STD
    classes = 100


class SyntheticCIFARDataModule(CIFARDataModule):
    """The synthetic CIFAR stand-in of ``make_synthetic_cifar``: no files, generated in about a second.

    A CIFAR ResNet-20 learns it in a few hundred SGD steps, so recipes and tests run anywhere.

    Args:
        num_train: number of training images (the validation split, if any, is taken from them).
        num_test: number of test images.
        num_classes: number of classes (>= 2).
        data_seed: seed of the images themselves; kept apart from ``seed`` so that runs with different
            ``seed`` share one data set.
        batch_size, eval_batch_size, num_workers, val_size, label_noise, augment, seed, train_split,
            global_batch_size: see
            ``CIFARDataModule``.

    Raises:
        ValueError: for an invalid argument.

    Example:
        >>> dm = SyntheticCIFARDataModule(num_train=500, num_test=100, label_noise=0.2)
        >>> dm.setup()
        >>> len(dm.train_dataset.noisy_indices)
        100
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_test: int = 1000,
        num_classes: int = 10,
        data_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 0,
        label_noise: float = 0.0,
        augment: bool = True,
        seed: int = 0,
        train_split: tuple[int, int] | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__(num_classes, **_base_arguments(locals()))
        check_int("num_train", num_train, minimum=1)
        check_int("num_test", num_test, minimum=1)
        check_int("data_seed", data_seed, minimum=0)
        self.num_train = num_train
        self.num_test = num_test
        self.data_seed = data_seed
        self.save_hyperparameters()

    def _read_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return make_synthetic_cifar(self.num_train, self.num_test, self.num_classes, seed=self.data_seed)

    def _channel_statistics(self, train_images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return channel_statistics(train_images)


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and standard deviation of ``uint8`` images, in [0, 1] units.

    Computed from a 256-bin histogram per channel, so it needs no float copy of the data.

    Args:
        images: ``uint8`` tensor ``(N, C, H, W)``.

    Returns:
        ``(mean, std)``, tuples of ``C`` floats (population standard deviation).

    Example:
        >>> images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
        >>> channel_statistics(images)
        ((0.5,), (0.5,))
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in images.unbind(1):
        counts = torch.bincount(channel.flatten(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        variance = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(mean.item())
        stds.append(variance.sqrt().item())
    return tuple(means), tuple(stds)


def _check_train_split(value: Any) -> tuple[int, int] | None:
    """``(i, m)`` as a tuple of ints with ``m >= 2`` and ``0 <= i < m``, or None."""
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or value[1] < 2 or not 0 <= value[0] < value[1]:
        raise ValueError(
            "`train_split` must be None or a pair (i, m) of ints with m >= 2 disjoint parts and 0 <= i < m, "
            f"got {value!r}"
        )
    return int(value[0]), int(value[1])


def _same_device(first: torch.device, second: torch.device) -> bool:
    return first.type == second.type and (first.index or 0) == (second.index or 0)
