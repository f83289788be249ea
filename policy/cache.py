"""The decision cache: TTL- and size-bounded, keyed by the decision-relevant part of the input and the revision.

Pure (the clock is passed in). Correctness rests on the key: two inputs that agree on every path in ``key_paths``
must get the same decision from the policy. For the embedded engine the gateway derives those paths from the
policy itself (``EmbeddedEngine.input_refs``) and ``covers`` checks a configured key against them, so the cache can
never answer for a request the policy would have judged differently. The bundle revision is part of every key, and
the gateway starts a fresh cache with each loaded bundle, so a policy change never serves a decision of the old
policy.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["DecisionCache", "InputPath", "covers", "key_of", "uncovered"]

InputPath = tuple[str, ...]
V = TypeVar("V")
_MISSING = object()


def key_of(document: Mapping[str, Any], paths: Iterable[InputPath]) -> str:
    """The values at ``paths`` as one canonical string: each present value wrapped as ``[value]``, an absent one
    as ``[]``, so no value a client can send (``?x=absent`` parses to ``["absent"]``) encodes like an absence."""
    values: list[list[object]] = []
    for path in paths:
        node: object = document
        for part in path:
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
            if node is _MISSING:
                break
        # Absent and null are told apart: a policy can distinguish them (`not input.x` vs `input.x == null`).
        values.append([] if node is _MISSING else [node])
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def covers(key: Iterable[InputPath], read: InputPath) -> bool:
    """Does a key made of ``key`` determine the value at ``read``? Only if some key path is ``read`` or above it."""
    return any(read[: len(path)] == path for path in key)


def uncovered(key: Iterable[InputPath], reads: Iterable[InputPath]) -> list[InputPath]:
    """The paths in ``reads`` that ``key`` does not determine, sorted (for an error message)."""
    key = tuple(key)
    return sorted(read for read in set(reads) if not covers(key, read))


class DecisionCache(Generic[V]):
    """Least-recently-used entries, each valid for ``ttl`` seconds after it was stored."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: V, now: float) -> None:
        self._entries[key] = (now + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
