"""Run the config service: open the store, load (or generate) the tokens and the mesh CA, serve the API until
SIGTERM/SIGINT. The tokens file is reloaded when it changes (or on SIGHUP): see ``token_reload.py``.

Stopping is graceful and quick: the listener closes, every parked long-poll answers 304 at once (its gateway polls
again, or backs off), calls in flight finish (bounded by ``_SHUTDOWN_TIMEOUT``), the store is closed, exit 0.
Logs are JSON lines on stdout with ``service: configservice``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
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
from gateway.configservice.ca import (
    CA_DIR,
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_TTL,
    CaError,
    MeshCA,
    load_or_create,
    load_pair,
    load_trusted,
)
from gateway.configservice.http import ApiState
from gateway.configservice.seed import SeedError, seed
from gateway.configservice.store import ConfigStore
from gateway.configservice.store_sqlite import SqliteStore, StoreBusy
from gateway.configservice.token_reload import TokenReloader, file_identity
from telemetry import logging as tlogging
from telemetry.metrics import ConfigServiceMetrics

__all__ = ["DEFAULT_LISTEN", "TOKENS_NAME", "ServiceSettings", "run_configservice", "serve"]

DEFAULT_LISTEN: Final = Address("127.0.0.1", 7000)
TOKENS_NAME: Final = "tokens.yaml"
# Calls in flight when the service stops: long-polls answer at once, anything else is a short write.
_SHUTDOWN_TIMEOUT: Final = 5.0
_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
# SIGHUP (reload the tokens) is blocked while starting too: its default action would end the process.
_BLOCKED: Final = _SIGNALS | {signal.SIGHUP}

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
    # The mesh CA: DIR/ca/ (created on first start) unless both files are given; several replicas must share one.
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_trust: tuple[Path, ...] = ()  # trusted (served by /v1/ca) but not used to sign: CA rotation
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cert_ttl: datetime.timedelta = DEFAULT_TTL
    seed: Path | None = None  # configs and bundles stored on start-up where the service has none (seed.py)

    @property
    def tokens_file(self) -> Path:
        return self.tokens if self.tokens is not None else self.data / TOKENS_NAME


def run_configservice(settings: ServiceSettings) -> int:
    """Process entry point: serve on uvloop until SIGTERM/SIGINT; the exit code."""
    # Until the loop's handlers exist, a SIGTERM waits instead of killing a process that is still starting.
    signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(serve(settings))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)


async def serve(settings: ServiceSettings, *, ready: asyncio.Event | None = None) -> int:
    tlogging.configure(settings.log_level, "configservice")
    try:
        settings.data.mkdir(parents=True, exist_ok=True)
        seen = file_identity(settings.tokens_file)  # before reading: a change made meanwhile is reloaded
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
    try:
        # After the store: SQLite's lock keeps a second process on DIR from creating a CA of its own meanwhile.
        ca = _mesh_ca(settings)
    except (CaError, OSError) as error:
        print(f"mesh CA: {error}", file=sys.stderr)
        await store.close()
        return 1

    state = ApiState(store, tokens, ConfigServiceMetrics(), trust_domain=settings.trust_domain)
    if settings.seed is not None:
        try:
            seeded = await seed(state, settings.seed)
        except SeedError as error:
            print(str(error), file=sys.stderr)
            await store.close()
            return 1
        log.info("seed_applied", seed=str(settings.seed), stored=seeded)
    reloader = TokenReloader(settings.tokens_file, state, seen)
    runner = web.AppRunner(
        build_app(state, ca),
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
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _BLOCKED)  # one that came in while starting is delivered now
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
        tokens_file=str(settings.tokens_file),
        trust_domain=settings.trust_domain,
    )
    reloading = asyncio.create_task(reloader.run(), name="tokens-reload")
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping")
    reloading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reloading
    loop.remove_signal_handler(signal.SIGHUP)
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


def _mesh_ca(settings: ServiceSettings) -> MeshCA:
    now = datetime.datetime.now(datetime.UTC)
    if settings.ca_cert is not None and settings.ca_key is not None:
        cert, key = load_pair(settings.ca_cert, settings.ca_key, now)
        source = "files"
    else:
        cert, key, created = load_or_create(settings.data / CA_DIR, settings.trust_domain, now)
        source = "created" if created else "data"
        if settings.store == "etcd":
            # Replicas on one etcd must sign with (and serve) one CA; each one's own DIR/ca would split the mesh.
            log.warning(
                "mesh_ca_per_replica",
                message="the mesh CA is this replica's own DIR/ca; run several replicas with the same "
                "--ca-cert and --ca-key",
            )
    ca = MeshCA(cert, key, settings.trust_domain, settings.cert_ttl, load_trusted(settings.ca_trust))
    log.info(
        "mesh_ca_ready",
        source=source,
        ca_dir=str(settings.data / CA_DIR) if source != "files" else None,
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc.isoformat(),
        trusted=len(ca.trusted),
        bundle_etag=ca.bundle_hash,
        trust_domain=settings.trust_domain,
        cert_ttl_s=int(settings.cert_ttl.total_seconds()),
    )
    return ca


async def _open_store(settings: ServiceSettings) -> ConfigStore:
    if settings.store == "sqlite":
        return await SqliteStore.open(settings.data)
    # Imported only when asked for: a SQLite service never loads the etcd client.
    from gateway.configservice.store_etcd import EtcdStore

    return await EtcdStore.connect(settings.etcd_endpoints)  # EtcdUnavailable is an OSError (ConnectionError)
