"""Results kept on disk and reused only under the settings that made them.

A sweep's run, a LinearModeConnectivity sibling and an IMP checkpoint each store what they were made with
(``settings``, a JSON-able dict); a later run reuses the stored result, or resumes, only when its own
settings are the same, and otherwise names the settings that differ. Settings are compared as their JSON
forms (:func:`comparable`), so a tuple equals the list it is written as and any other object its ``str``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["changed_settings", "check_resume_settings", "comparable", "read_json", "write_json"]


def comparable(settings: Mapping[str, Any]) -> dict:
    """``settings`` as it reads back from JSON (keys sorted, tuples as lists, other objects as ``str``)."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


def changed_settings(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The sorted names whose values differ between two settings (a name missing on one side differs).

    Example:
        >>> changed_settings({"seed": 0, "bn": "reset"}, {"seed": 1, "bn": "reset", "splits": None})
        ['seed', 'splits']
    """
    stored, current = comparable(stored), comparable(current)
    return sorted(key for key in set(stored) | set(current) if stored.get(key, ...) != current.get(key, ...))


def check_resume_settings(
    who: str, saved: Mapping[str, Any] | None, current: Mapping[str, Any], may_grow: tuple[str, ...] = ()
) -> None:
    """Refuse to resume a checkpoint made with other settings (those in ``may_grow`` may only increase).

    Settings a side does not have are not compared (a checkpoint written before a setting existed).

    Raises:
        ValueError: naming every setting that differs, its value in the checkpoint and here.

    Example:
        >>> check_resume_settings("IMPPruner", {"levels": 2, "fraction": 0.2}, {"levels": 3, "fraction": 0.2},
        ...                       may_grow=("levels",))
    """
    if saved is None:
        return
    shared = [name for name in current if name in saved and name not in may_grow]
    changed = changed_settings({n: saved[n] for n in shared}, {n: current[n] for n in shared})
    differ = [f"{name}={saved[name]!r} in the checkpoint, {current[name]!r} here" for name in changed]
    differ += [
        f"{name}={saved[name]!r} in the checkpoint, {current[name]!r} here (may only grow)"
        for name in may_grow
        if name in saved and name in current and current[name] < saved[name]
    ]
    if differ:
        raise ValueError(
            f"{who} cannot resume this checkpoint: it ran with other settings (" + "; ".join(differ) + "). "
            f"Resume with the {who} arguments of the checkpointed fit"
            + (f" (a larger `{'`, `'.join(may_grow)}` is allowed)" if may_grow else "")
            + ", or start a new fit without `ckpt_path`."
        )


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of a file the package wrote.

    Raises:
        ValueError: naming the file, when it is not valid JSON (damaged, truncated, or another file).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} is not the JSON file lt_theory wrote ({error}): remove it (the result is made again)"
        ) from None


def partial_file(path: str | os.PathLike) -> Path:
    """A new, empty file next to ``path`` that no other process writes (two jobs writing ``path`` at once, e.g.
    an array task resubmitted while its first run still runs, never write one partial file), to rename into
    place once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".partial")
    os.close(handle)
    return Path(name)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a partial file renamed into place); NaN round-trips."""
    partial = partial_file(path)
    partial.write_text(json.dumps(obj, indent=2))
    partial.replace(path)
