"""``--workers N``: N gateway processes sharing one port through SO_REUSEPORT, under a small supervisor.

Each worker is a full gateway (own event loop on uvloop, own pools, own config watcher); the kernel spreads new
connections across them. The supervisor forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) and exits 0 only when
every worker drained cleanly. A worker that dies on its own takes the group down (exit 1): a sidecar's
orchestrator restarts it whole, which is simpler to reason about than a half-sized gateway.

Each worker has its own metrics registry, and a scrape of the shared admin port lands on any one of them. So the
supervisor gives every worker a ``PeerSet``: a private directory where each worker also serves its own registry on a
unix socket, from which the worker that answers the scrape adds up the others' (``gateway/admin.py``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from types import FrameType

__all__ = ["STARTUP_SIGNALS", "PeerSet", "run_worker", "run_workers"]

# The signals the gateway handles on its event loop; blocked from process start until those handlers exist.
STARTUP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True, slots=True)
class PeerSet:
    """One worker's place in its ``--workers`` group (plain data: it crosses the spawn boundary pickled)."""

    directory: str  # private to the group (mode 0700), removed by the supervisor at exit
    index: int  # this worker's, 0 <= index < count
    count: int

    def socket_path(self, index: int) -> str:
        """Where worker ``index`` serves its own metrics registry."""
        return os.path.join(self.directory, f"worker-{index}.sock")

    @property
    def others(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.count) if i != self.index)


def run_worker(config_path: str, reuse_port: bool, peers: PeerSet | None = None) -> None:
    """Process entry point: run one gateway on uvloop and exit with its code."""
    # Until run_gateway's event loop handles them (it unblocks them then), SIGTERM, SIGINT and SIGHUP wait instead
    # of killing a process that is still importing: a SIGHUP (or a SIGTERM) forwarded to a worker still starting
    # used to take the whole group down with exit 1. Spawned workers start with them blocked already (see below).
    signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)
    import asyncio

    import uvloop

    from gateway.app import run_gateway

    # The supervisor owns Ctrl-C; a worker drains on the SIGTERM it forwards.
    if reuse_port:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(run_gateway(Path(config_path), reuse_port=reuse_port, peers=peers)))


def run_workers(config_path: Path, count: int) -> int:
    """Run ``count`` workers until they all exit; 0 only when every one drained cleanly."""
    # mkdtemp makes it 0700: only this user's processes can read the workers' metrics sockets. It is the group's
    # own, so a socket path left by an earlier (killed) group can never be in the way.
    directory = tempfile.mkdtemp(prefix="meshgate-")
    try:
        return _supervise(config_path, [PeerSet(directory, i, count) for i in range(count)])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _supervise(config_path: Path, peer_sets: list[PeerSet]) -> int:
    context = multiprocessing.get_context("spawn")  # no fork: never copy a running event loop
    workers = [
        context.Process(target=run_worker, args=(str(config_path), True, peers), name=f"meshgate-worker-{peers.index}")
        for peers in peer_sets
    ]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
            signum = signal.SIGTERM
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    for signum in STARTUP_SIGNALS:
        signal.signal(signum, forward)
    # A child inherits the signal mask: started with these blocked, a worker keeps what the supervisor forwards
    # pending until its loop can handle it. Blocked here too, a signal that arrives mid-loop is forwarded only once
    # every worker has a pid, so none is missed. The resource tracker goes first: starting it (on the first
    # Process.start) unblocks SIGINT and SIGTERM in this process, which would leave the workers without the block.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)
    try:
        for worker in workers:
            worker.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_SIGNALS)
    failed = False
    running = list(workers)
    while running:
        multiprocessing.connection.wait([w.sentinel for w in running])
        for worker in [w for w in running if w.exitcode is not None]:
            running.remove(worker)
            if worker.exitcode != 0:
                failed = True
                if not stopping:  # one worker failed on its own: stop the group
                    forward(signal.SIGTERM, None)
    return 1 if failed else 0
