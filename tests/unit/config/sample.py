"""A minimal valid config document, and edits to it addressed by the same paths the error messages use."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["BASE", "DELETE", "edited"]

BASE: dict[str, Any] = {
    "service": "orders",
    "routes": [{"name": "r", "cluster": "orders"}],
    "clusters": [{"name": "orders", "endpoints": ["127.0.0.1:9001"]}],
}

DELETE = object()  # as an edit value: remove the key
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def edited(edits: Mapping[str, object], base: Mapping[str, Any] = BASE) -> dict[str, Any]:
    """A deep copy of ``base`` with each ``path: value`` applied in order (``routes[0].match.path``).

    A list index equal to the list's length appends; missing mappings along the path are created.
    """
    document: dict[str, Any] = copy.deepcopy(dict(base))
    for path, value in edits.items():
        steps: list[str | int] = [name if name else int(index) for name, index in _STEP.findall(path)]
        parent: Any = document
        for step in steps[:-1]:
            if isinstance(step, str) and step not in parent:
                parent[step] = {}
            parent = parent[step]
        _apply(parent, steps[-1], value)
    return document


def _apply(parent: Any, step: str | int, value: object) -> None:
    if value is DELETE:
        del parent[step]
    elif isinstance(parent, list) and step == len(parent):
        parent.append(copy.deepcopy(value))
    else:
        parent[step] = copy.deepcopy(value)
