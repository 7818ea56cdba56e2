"""The fixed probe batch a monitor measures on, chosen once and kept across a resume.

Where it comes from, in order: tensors the user gave; the data module's ``probe(size, split, seed)`` (the
lt_theory data modules have one: a seeded subset by index, normalised, no augmentation); otherwise the
first ``size`` examples of the first training batch, as the model sees it. None of these draws from the
global RNG or advances a data loader, so a monitor that uses a probe does not perturb training.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lt_theory.checks import check_positive_int

__all__ = ["Probe"]

PROBE_SPLITS = ("train", "val", "test")


class Probe:
    """A fixed batch of inputs (and labels, when known) for measurements during training.

    Args:
        size: number of examples.
        split: the data module split to take them from: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of the data module's choice of examples.
        inputs: the probe inputs, if the user gives them (then ``size`` and ``split`` are not used).
        targets: their integer labels (optional; measurements needing labels are skipped without them).

    Raises:
        ValueError: for a bad ``size``/``split``, or targets that do not match the inputs.

    Example:
        >>> import torch
        >>> probe = Probe(size=2, split="train")
        >>> probe.ready  # in a hook: probe.resolve(trainer) (the data module's probe) or probe.capture(batch)
        False
        >>> probe.capture((torch.arange(8.0).reshape(4, 2), torch.tensor([3, 1, 4, 1])))
        >>> probe.inputs.tolist(), probe.targets.tolist()  # the first `size` examples of the batch
        ([[0.0, 1.0], [2.0, 3.0]], [3, 1])
        >>> probe.capture((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))  # kept: chosen once
        >>> probe.on(torch.device("cpu"))[1].tolist()
        [3, 1]
    """

    def __init__(
        self,
        size: int = 32,
        split: str = "train",
        seed: int = 0,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> None:
        check_positive_int("probe_size", size)
        if split not in PROBE_SPLITS:
            raise ValueError(f"`probe_split` must be one of {PROBE_SPLITS}, got {split!r}")
        if targets is not None and (inputs is None or len(targets) != len(inputs)):
            raise ValueError("`probe_targets` needs `probe_inputs` with one label per input")
        self.size, self.split, self.seed = size, split, seed
        self.inputs = None if inputs is None else inputs.detach().clone()
        self.targets = None if targets is None else targets.detach().clone()

    @property
    def ready(self) -> bool:
        return self.inputs is not None

    def resolve(self, trainer: Trainer) -> bool:
        """Take the probe from the data module's ``probe`` method if there is one; True when ready."""
        if self.ready:
            return True
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "probe", None)):
            try:
                self.inputs, self.targets, _ = datamodule.probe(self.size, split=self.split, seed=self.seed)
            except ValueError as error:  # say it in the callback's terms when the probe is too large
                dataset = getattr(datamodule, f"{self.split}_dataset", None)
                if not hasattr(dataset, "__len__") or self.size <= len(dataset):
                    raise
                raise ValueError(
                    f"`probe_size` must be at most the {len(dataset)} examples of the {self.split!r} split of "
                    f"{type(datamodule).__name__}, got {self.size}"
                ) from error
        return self.ready

    def capture(self, batch) -> None:
        """Take the first ``size`` examples of a training batch ``(inputs, targets, ...)`` or ``inputs``."""
        if self.ready:
            return
        inputs, targets = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        if inputs.shape[0] < self.size:
            rank_zero_warn(
                f"`probe_size` is {self.size} but the first training batch has {inputs.shape[0]} examples: the "
                f"probe is those {inputs.shape[0]}. Give `probe_inputs`, or a smaller `probe_size`.",
                category=UserWarning,
            )
        self.inputs = inputs[: self.size].detach().clone()
        is_label = isinstance(targets, Tensor) and targets.dim() == 1 and not targets.is_floating_point()
        self.targets = targets[: self.size].detach().clone() if is_label else None

    def on(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The inputs and targets on ``device``."""
        targets = None if self.targets is None else self.targets.to(device)
        return self.inputs.to(device), targets

    def state_dict(self) -> dict:
        to_cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {"inputs": to_cpu(self.inputs), "targets": to_cpu(self.targets)}

    def load_state_dict(self, state: dict) -> None:
        self.inputs, self.targets = state["inputs"], state["targets"]
