"""Dotted keys of a plain config (dicts and lists, as a parsed recipe config reads back from YAML): reading
one, setting one (an int fills a list of equal ints, such as an MLP's ``hidden``), flattening a config into
its keys."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from jsonargparse import Namespace


def plain(value: Any) -> Any:
    """A parsed config as plain JSON-able values: Namespaces as dicts, tuples as lists, paths as strings.

    Args:
        value: a jsonargparse Namespace, or any value inside one.

    Returns:
        The same content as dicts, lists and plain values.
    """
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def config_value(config: Any, key: str) -> Any:
    """The value of a dotted key in a plain config (list entries by index: ``trainer.callbacks.0.init_args``).

    Args:
        config: a plain config (:func:`plain`).
        key: e.g. ``model.net.init_args.k``.

    Returns:
        The value.

    Raises:
        KeyError: with the deepest existing prefix and its keys, when the key is not in the config.
    """
    node, done = config, []
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            where = ".".join(done) or "the config"
            has = (
                sorted(node)
                if isinstance(node, Mapping)
                else (f"0..{len(node) - 1}" if isinstance(node, list) else [])
            )
            raise KeyError(f"{where} has no key `{part}` (its keys: {has})")
        done.append(part)
    return node


def with_value(config: dict, key: str, value: Any) -> dict:
    """A copy of ``config`` with ``key`` set to ``value`` (see the module docstring for list-valued keys).

    Args:
        config: a plain config.
        key: an existing dotted key.
        value: its new value.

    Returns:
        The new config (``config`` is left as it is).

    Raises:
        KeyError: when ``key`` is not in the config.
    """
    out = copy.deepcopy(config)
    parent_key, _, last = key.rpartition(".")
    parent = config_value(out, parent_key) if parent_key else out
    current = config_value(out, key)
    if _is_template(current) and not isinstance(value, (list, tuple, Mapping)):
        value = [value] * len(current)
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        parent[last] = value
    return out


def _is_template(current: Any) -> bool:
    """A list of equal ints (the hidden widths of an MLP), which an int axis value fills."""
    return (
        isinstance(current, list)
        and len(current) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) for v in current)
        and len(set(current)) == 1
    )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict:
    """A nested config as ``{dotted key: value}`` (lists and empty dicts are values).

    Args:
        config: a plain config.
        prefix: prepended to every key.

    Returns:
        The flat dict.

    Example:
        >>> flatten({"model": {"lr": 0.1, "net": {"init_args": {"k": 4}}}, "tags": [1]})
        {'model.lr': 0.1, 'model.net.init_args.k': 4, 'tags': [1]}
    """
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
