"""``--workers N``: N gateway processes sharing one port through SO_REUSEPORT, under a small supervisor.

Each worker is a full gateway (own event loop on uvloop, own pools, own config watcher); the kernel spreads new
connections across them. The supervisor forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) and exits 0 only when
every worker drained cleanly. A worker that dies on its own takes the group down (exit 1): a sidecar's
orchestrator restarts it whole, which is simpler to reason about than a half-sized gateway.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from pathlib import Path
from types import FrameType

__all__ = ["run_worker", "run_workers"]


def run_worker(config_path: str, reuse_port: bool) -> None:
    """Process entry point: run one gateway on uvloop and exit with its code."""
    import asyncio

    import uvloop

    from gateway.app import run_gateway

    # The supervisor owns Ctrl-C; a worker drains on the SIGTERM it forwards.
    if reuse_port:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(run_gateway(Path(config_path), reuse_port=reuse_port)))


def run_workers(config_path: Path, count: int) -> int:
    context = multiprocessing.get_context("spawn")  # no fork: never copy a running event loop
    workers = [
        context.Process(target=run_worker, args=(str(config_path), True), name=f"meshgate-worker-{i}")
        for i in range(count)
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

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for worker in workers:
        worker.start()
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
