"""Run the config service: open the store, load (or generate) the tokens, serve the API until SIGTERM/SIGINT.

Stopping is graceful and quick: the listener closes, every parked long-poll answers 304 at once (its gateway polls
again, or backs off), calls in flight finish (bounded by ``_SHUTDOWN_TIMEOUT``), the store is closed, exit 0.
Logs are JSON lines on stdout with ``service: configservice``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog
from aiohttp import web

from gateway.config.errors import ConfigError
from gateway.config.snapshot import Address
from gateway.configservice.api import build_app
from gateway.configservice.auth import TokenSet, generate_tokens, load_tokens
from gateway.configservice.http import ApiState
from gateway.configservice.store import ConfigStore
from gateway.configservice.store_sqlite import SqliteStore, StoreBusy
from telemetry import logging as tlogging
from telemetry.metrics import ConfigServiceMetrics

__all__ = ["DEFAULT_LISTEN", "TOKENS_NAME", "ServiceSettings", "run_configservice", "serve"]

DEFAULT_LISTEN: Final = Address("127.0.0.1", 7000)
TOKENS_NAME: Final = "tokens.yaml"
# Calls in flight when the service stops: long-polls answer at once, anything else is a short write.
_SHUTDOWN_TIMEOUT: Final = 5.0
_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})

StoreKind = Literal["sqlite", "etcd"]

log = structlog.get_logger("meshgate.configservice")


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    data: Path
    listen: Address = DEFAULT_LISTEN
    tokens: Path | None = None  # None: DIR/tokens.yaml, generated on first start
    store: StoreKind = "sqlite"
    etcd_endpoints: tuple[str, ...] = ()
    log_level: str = "info"


def run_configservice(settings: ServiceSettings) -> int:
    """Process entry point: serve on uvloop until SIGTERM/SIGINT; the exit code."""
    # Until the loop's handlers exist, a SIGTERM waits instead of killing a process that is still starting.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(serve(settings))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


async def serve(settings: ServiceSettings, *, ready: asyncio.Event | None = None) -> int:
    tlogging.configure(settings.log_level, "configservice")
    try:
        settings.data.mkdir(parents=True, exist_ok=True)
        tokens = _tokens(settings)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{settings.data}: {error.strerror or error}", file=sys.stderr)
        return 1
    try:
        store = await _open_store(settings)
    except (StoreBusy, OSError) as error:
        print(str(error), file=sys.stderr)
        return 1

    state = ApiState(store, tokens, ConfigServiceMetrics())
    runner = web.AppRunner(
        build_app(state),
        access_log=None,
        handle_signals=False,
        # A long-poll whose gateway hung up stops waiting (and leaves the watchers gauge) at once.
        handler_cancellation=True,
        shutdown_timeout=_SHUTDOWN_TIMEOUT,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # one that came in while starting is delivered now
    try:
        await runner.setup()
        await web.TCPSite(runner, settings.listen.host, settings.listen.port).start()
    except OSError as error:
        log.error("listen_failed", listen=str(settings.listen), error=error.strerror or str(error))
        await runner.cleanup()
        await store.close()
        tlogging.flush()
        return 1
    log.info(
        "configservice_started",
        listen=str(settings.listen),
        data=str(settings.data),
        store=settings.store,
        tokens_file=str(settings.tokens or settings.data / TOKENS_NAME),
    )
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()  # stops listening, answers parked polls (on_shutdown), waits for calls in flight
    await store.close()
    log.info("stopped")
    tlogging.flush()
    return 0


def _tokens(settings: ServiceSettings) -> TokenSet:
    if settings.tokens is not None:
        return load_tokens(settings.tokens)
    path = settings.data / TOKENS_NAME
    try:
        tokens = generate_tokens(path)
    except FileExistsError:
        return load_tokens(path)
    # Where, never what: the tokens are read from the file by whoever may read it.
    log.warning("tokens_generated", tokens_file=str(path), names=[token.name for token in tokens.tokens])
    return tokens


async def _open_store(settings: ServiceSettings) -> ConfigStore:
    if settings.store == "sqlite":
        return await SqliteStore.open(settings.data)
    # Imported only when asked for: a SQLite service never loads the etcd client.
    from gateway.configservice.store_etcd import EtcdStore

    return await EtcdStore.connect(settings.etcd_endpoints)  # EtcdUnavailable is an OSError (ConnectionError)
