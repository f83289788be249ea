"""Wake-ups for long-polls: one in-process event per watched key, set when that key changes.

A store calls ``changed(key)`` after each write that is durable (its own, or one seen on etcd's watch), and a
long-poll parks on ``wait(key, timeout)``: one ``asyncio.Event`` per key, shared by every waiter on it, replaced
after it fires. So thousands of idle watchers of one service cost one parked coroutine each and one event in total,
a write wakes them all with one ``set()``, and nothing polls the database.

The caller must take the waiter *before* it reads the current version (``waiter = changes.waiter(key)``; read;
compare; ``await waiter.wait(timeout)``): a change landing between the read and the wait then still wakes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

__all__ = ["Changes", "Waiter"]


class Waiter:
    """One wait on one key's current event (see the module docstring for the order of calls)."""

    __slots__ = ("_changes", "_event")

    def __init__(self, changes: Changes, event: asyncio.Event) -> None:
        self._changes = changes
        self._event = event

    async def wait(self, seconds: float) -> bool:
        """True when the key changed (or the service is closing), False when ``seconds`` passed first."""
        if self._event.is_set():
            return True
        if seconds <= 0:
            return False
        try:
            # asyncio.timeout, not wait_for: no extra task per parked watcher.
            async with asyncio.timeout(seconds):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class Changes:
    """Per-key change events, for one event loop."""

    def __init__(self) -> None:
        self._events: dict[Hashable, asyncio.Event] = {}
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def waiter(self, key: Hashable) -> Waiter:
        if self._closed.is_set():
            return Waiter(self, self._closed)  # already set: a poll after close answers at once
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return Waiter(self, event)

    def changed(self, key: Hashable) -> None:
        """Wake everyone waiting on ``key``; later waiters get a fresh event."""
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def close(self) -> None:
        """Wake every waiter now and any later one at once: a stopping service answers its long-polls (304) instead
        of holding the shutdown for up to a minute."""
        self._closed.set()
        events, self._events = self._events, {}
        for event in events.values():
            event.set()
