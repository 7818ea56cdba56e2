"""Reading runs back from their TensorBoard event files, as the report needs them.

A *run* is a directory that holds ``events.out.tfevents.*`` files: a ``TensorBoardLogger``'s ``log_dir``
(``<save_dir>/<name>/version_<n>``), a width of a sweep (``<sweep>/width_0008``) or a sweep's ``aggregate``.
:func:`read_runs` finds every run under a directory (the directory itself included) and reads each with
TensorBoard's ``EventAccumulator``: every scalar (the last value written at each step wins, so a run
resumed from a checkpoint reads as one), the newest text of each text tag, the newest image of each image
tag, and the ``hparams.yaml`` Lightning writes next to the event files. Tags of the report itself
(``report/``) are not read back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

__all__ = [
    "EVENT_FILE",
    "THEORY_PREFIXES",
    "TRAINING_PREFIXES",
    "RunLog",
    "find_runs",
    "read_run",
    "read_runs",
]

EVENT_FILE = "events.out.tfevents."
THEORY_PREFIXES = ("landscape", "spectral", "ntk", "lmc", "imp", "dd")
"""The tag prefixes of the lt_theory callbacks (and of the sweep's ``aggregate`` run)."""
TRAINING_PREFIXES = ("train", "val")
"""The tag prefixes of :class:`lt_theory.ClassificationModule`."""
REPORT_PREFIX = "report"
_TEXT_SUFFIX = "/text_summary"  # torch's add_text appends it to the tag
# keep every scalar; only the newest image and text of a tag (the reservoir always keeps the newest item)
_SIZE_GUIDANCE = {"scalars": 0, "images": 1, "tensors": 1, "histograms": 1, "distributions": 1, "audio": 1}


@dataclass
class RunLog:
    """What one run logged: scalars, texts, images and hyperparameters.

    Attributes:
        name: the run's path relative to the directory given to :func:`read_runs` (``"."`` for itself).
        directory: the run's directory.
        scalars: tag -> ``[(step, value), ...]`` by increasing step (NaN kept as NaN).
        texts: tag (without torch's ``/text_summary``) -> the newest text.
        images: tag -> the newest image, PNG bytes.
        hparams: the contents of ``hparams.yaml`` (empty without one).
    """

    name: str
    directory: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)

    def values(self, tag: str) -> list[float]:
        """The values of ``tag`` by step (empty when it was not logged)."""
        return [value for _, value in self.scalars.get(tag, [])]

    def last(self, tag: str, finite: bool = False) -> float | None:
        """The value of ``tag`` at its last step (with ``finite``, its last finite value); None if absent."""
        values = [v for v in self.values(tag) if not finite or math.isfinite(v)]
        return values[-1] if values else None

    def first_present(self, *tags: str) -> str | None:
        """The first of ``tags`` that was logged, or None."""
        return next((tag for tag in tags if tag in self.scalars), None)

    def layers(self, prefix: str) -> dict[str, list[tuple[int, float]]]:
        """``{layer: series}`` of the tags ``<prefix>/<layer>``, in the order they were first logged."""
        start = prefix.rstrip("/") + "/"
        return {tag[len(start) :]: series for tag, series in self.scalars.items() if tag.startswith(start)}

    def has_prefix(self, *prefixes: str) -> bool:
        """Whether any scalar, text or image tag starts with one of ``<prefix>/``."""
        tags = [*self.scalars, *self.texts, *self.images]
        return any(tag.split("/", 1)[0] in prefixes for tag in tags)

    @property
    def last_step(self) -> int:
        """The largest step of any scalar (0 for a run without scalars)."""
        return max((series[-1][0] for series in self.scalars.values() if series), default=0)


def find_runs(source: str | os.PathLike) -> list[Path]:
    """Every directory under ``source`` (itself included) that holds TensorBoard event files.

    Args:
        source: a log directory.

    Returns:
        The run directories, sorted by path.

    Raises:
        FileNotFoundError: if ``source`` is not a directory.
    """
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(
            f"no log directory at {str(root)!r}: give the folder a TensorBoardLogger wrote "
            "(e.g. runs/quickstart/version_0, or runs/ to diagnose every run under it)"
        )
    return sorted({path.parent for path in root.rglob(f"{EVENT_FILE}*") if path.is_file()})


def _text(event) -> str:
    value = tensor_util.make_ndarray(event.tensor_proto)
    value = value.item() if value.size == 1 else value.flatten()[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _HparamsLoader(yaml.SafeLoader):
    """YAML's safe loader, plus the tuples Lightning writes (``!!python/tuple``); any other Python object tag
    reads as None: nothing from the file is ever instantiated."""


_HparamsLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)
_HparamsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
_HparamsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _hparams(directory: Path) -> dict:
    path = directory / "hparams.yaml"
    if not path.is_file():
        return {}
    try:
        loaded = yaml.load(path.read_text(), Loader=_HparamsLoader)  # noqa: S506 (a safe loader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}  # a damaged file: the report does without it
    return loaded if isinstance(loaded, dict) else {}


def read_run(directory: str | os.PathLike, name: str = ".") -> RunLog:
    """Read one run's event files (all of them, in order) and its ``hparams.yaml``.

    Args:
        directory: the run's directory (holding ``events.out.tfevents.*``).
        name: the name the report gives the run.

    Returns:
        The :class:`RunLog`.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> folder = tempfile.mkdtemp()
        >>> with SummaryWriter(folder) as writer:
        ...     writer.add_scalar("lmc/test_error_barrier", 0.3, global_step=100)
        ...     writer.add_text("lmc/summary", "Not stable.", global_step=100)
        >>> run = read_run(folder)
        >>> run.scalars["lmc/test_error_barrier"], run.texts["lmc/summary"]
        ([(100, 0.30000001192092896)], 'Not stable.')
    """
    directory = Path(directory)
    accumulator = EventAccumulator(str(directory), size_guidance=_SIZE_GUIDANCE, purge_orphaned_data=False)
    accumulator.Reload()
    tags = accumulator.Tags()
    run = RunLog(name=name, directory=directory, hparams=_hparams(directory))
    for tag in tags.get("scalars", []):
        if tag.split("/", 1)[0] == REPORT_PREFIX:
            continue
        by_step = {}
        for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
            by_step[int(event.step)] = float(event.value)
        run.scalars[tag] = sorted(by_step.items())
    for tag in tags.get("tensors", []):
        if tag.endswith(_TEXT_SUFFIX) and tag.split("/", 1)[0] != REPORT_PREFIX:
            events = accumulator.Tensors(tag)
            if events:
                run.texts[tag[: -len(_TEXT_SUFFIX)]] = _text(max(events, key=lambda e: e.wall_time))
    for tag in tags.get("images", []):
        events = accumulator.Images(tag)
        if events:
            run.images[tag] = max(events, key=lambda e: e.wall_time).encoded_image_string
    return run


def read_runs(source: str | os.PathLike) -> list[RunLog]:
    """Read every run under ``source`` (see :func:`find_runs`), named by their path relative to it.

    Args:
        source: a log directory.

    Returns:
        One :class:`RunLog` per run directory, sorted by path (empty when there are no event files).

    Raises:
        FileNotFoundError: if ``source`` is not a directory.
    """
    root = Path(source)
    return [read_run(path, str(path.relative_to(root))) for path in find_runs(root)]
