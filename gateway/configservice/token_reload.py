"""Reload the tokens file while the service runs, so a token removed from it is revoked without a restart.

The file's identity (device, inode, size, mtime, ctime) is checked once a second; SIGHUP (``request()``) reloads at
once, whether the identity moved or not. A new set replaces ``ApiState.tokens`` in one assignment: each call
authenticates against the set that was current when it arrived. A file that cannot be read or parsed is logged
(``tokens_reload_failed``, with the problems, never a token) and the old set kept: a half-written or mistyped
file must not lock every gateway out. It applies equally to ``--tokens FILE`` and to the generated
``DIR/tokens.yaml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Final

import structlog

from gateway.config.errors import ConfigError
from gateway.configservice.auth import load_tokens
from gateway.configservice.http import ApiState

__all__ = ["POLL_INTERVAL", "FileIdentity", "TokenReloader", "file_identity"]

POLL_INTERVAL: Final = 1.0

log = structlog.get_logger("meshgate.configservice")

FileIdentity = tuple[int, int, int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class TokenReloader:
    """Watches ``path`` and swaps ``state.tokens`` when it changes. ``run()`` is the task; ``request()`` (SIGHUP)
    forces a reload on the next turn."""

    def __init__(self, path: Path, state: ApiState, seen: FileIdentity | None, interval: float = POLL_INTERVAL) -> None:
        """``seen``: the file's identity taken *before* the current set was read from it (so a change made while
        the service started is not missed)."""
        self.path = path
        self.state = state
        self.interval = interval
        self._seen = seen
        self._wake = asyncio.Event()

    def request(self) -> None:
        self._wake.set()

    def check(self, *, force: bool = False) -> bool:
        """Reload if the file changed (or ``force``); whether a new set is in place."""
        identity = file_identity(self.path)
        if identity == self._seen and not force:
            return False
        self._seen = identity
        try:
            tokens = load_tokens(self.path)
        except ConfigError as error:
            problems = [f"{problem.path}: {problem.message}" for problem in error.problems]
            log.error("tokens_reload_failed", tokens_file=str(self.path), problems=problems, kept="previous tokens")
            return False
        before = {token.name for token in self.state.tokens.tokens}
        after = {token.name for token in tokens.tokens}
        self.state.tokens = tokens
        log.info(
            "tokens_reloaded",
            tokens_file=str(self.path),
            names=sorted(after),
            added=sorted(after - before),
            removed=sorted(before - after),
        )
        return True

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            force = self._wake.is_set()
            self._wake.clear()
            try:
                self.check(force=force)
            except Exception:  # never let the watcher die: the next turn tries again
                log.exception("tokens_reload_failed", tokens_file=str(self.path))
