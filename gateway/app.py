"""Wiring: build telemetry, the stage pipeline, the snapshot store and config source; run one gateway process.

The stage order is written here once, with the reason for each position.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import signal
import sys
from pathlib import Path

import structlog
from aiohttp import web

from gateway.admin import AdminState, build_admin_app
from gateway.config.bootstrap import Bootstrap, load_config, read_token
from gateway.config.errors import ConfigError
from gateway.config.snapshot import Snapshot
from gateway.config.sources.cache import service_dir
from gateway.config.sources.file import FileSource
from gateway.config.sources.remote import RemoteSource
from gateway.config.store import SnapshotStore
from gateway.mesh.runtime import STARTUP_WAIT as MESH_STARTUP_WAIT
from gateway.mesh.runtime import Mesh
from gateway.pipeline import Handler, Stage, compose
from gateway.policy_runtime import Policies
from gateway.server import GatewayServer
from gateway.serving import Serving
from gateway.stages.authn import AuthnStage
from gateway.stages.authz import AuthzStage
from gateway.stages.forward import Forward
from gateway.stages.observe import Observe
from gateway.stages.ratelimit import RateLimitStage
from gateway.stages.rescue import Rescue
from gateway.stages.route import RouteStage
from gateway.tls.reloader import ListenerCertificate
from gateway.upstream.clusters import Upstreams
from gateway.upstream.registry import RegistryClient
from gateway.workers import PeerSet
from telemetry import logging as tlogging
from telemetry.access_log import AccessLog
from telemetry.export import span_batcher
from telemetry.log_writer import default_writer
from telemetry.metrics import Metrics
from telemetry.tracing import Tracer

__all__ = ["build_pipeline", "run_gateway"]

log = structlog.get_logger("meshgate.gateway")

# Seconds the exit waits for queued spans to be exported.
_SPAN_FLUSH_TIMEOUT = 2.0


def build_pipeline(
    metrics: Metrics, rng: random.Random, access_log: AccessLog, ratelimit: RateLimitStage, tracer: Tracer
) -> Handler:
    stages: list[Stage] = [
        # Outermost: sees every reply, local or proxied, and times the whole request including body streaming; the
        # trace context is set here first, so every later stage's log lines and span events belong to the request.
        Observe(metrics, access_log, tracer),
        # Inside observe so local replies are measured and logged; the only place errors become JSON replies.
        Rescue(metrics),
        # Normalizes the path before matching (and, later, before policy): nothing sees the raw path after this.
        RouteStage(),
        # After routing (`auth` is per route); before the rate limit, which may key on the verified principal.
        AuthnStage(metrics),
        # After routing (limits are per route) and before authz: floods never reach the policy engine.
        ratelimit,
        # Last before forwarding: it judges the principal, and an allow may edit the upstream request's headers.
        AuthzStage(metrics, tracer, access_log),
    ]
    return compose(stages, Forward(metrics, rng, tracer))


async def run_gateway(config_path: Path, *, reuse_port: bool = False, peers: PeerSet | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the process exit code.

    A plain config file is served at once (``FileSource``). A bootstrap file (one with ``config_service``) binds
    its listeners at once and takes its config from the service, or from the cached copy (``RemoteSource``).
    """
    try:
        loaded = load_config(config_path)
        if isinstance(loaded, Bootstrap):
            read_token(loaded.settings.token_file)  # fail fast: one that can never authenticate is a typo
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    bootstrap = loaded if isinstance(loaded, Bootstrap) else None
    # The settings the process starts with (listeners, parser limits, logs): the config file, or the bootstrap.
    first: Snapshot = loaded.snapshot if isinstance(loaded, Bootstrap) else loaded
    tlogging.configure(first.logs.level, first.service)
    try:
        # The listener's certificate is loaded before anything else starts: one that does not load is fatal now,
        # never a listener that fails every handshake. (`meshgate run` checked it already; the files may differ.)
        certificate = ListenerCertificate(first.tls) if first.tls is not None else None
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 1
    metrics = Metrics()
    rng = random.Random()
    access_log = AccessLog()
    ratelimit = RateLimitStage(metrics)
    tracer = Tracer()
    tracer.configure(first.tracing, first.service, span_batcher)
    server = GatewayServer(build_pipeline(metrics, rng, access_log, ratelimit, tracer), metrics)
    # Derived from the server's own in-flight count at scrape time: no second counter kept per request.
    metrics.active_requests.set_function(lambda: server.in_flight)
    # Clusters with `discovery: {registry: NAME}` follow the config service's instance registry.
    # The token is read from its file on every poll (as by RemoteSource): a rotated token is used at once. The last
    # instance lists are cached beside the config, so a restart while the service is down still has endpoints.
    registry = (
        RegistryClient(
            bootstrap.settings.url,
            functools.partial(read_token, bootstrap.settings.token_file),
            rng=rng,
            cache_dir=service_dir(bootstrap.settings.cache_dir, bootstrap.snapshot.service),
        )
        if bootstrap is not None
        else None
    )
    # `mesh`: the gateway's mesh certificate, from the config service (a bootstrap-only section, so `bootstrap` is set).
    mesh = (
        Mesh(
            first.mesh,
            first.service,
            bootstrap.settings.url,
            functools.partial(read_token, bootstrap.settings.token_file),
            rng,
        )
        if first.mesh is not None and bootstrap is not None
        else None
    )
    upstreams = Upstreams(rng, grace=5.0, metrics=metrics, registry=registry, mesh=mesh)
    metrics.state_gauges(upstreams.breaker_rows, upstreams.endpoint_rows)
    metrics.log_drops(lambda: default_writer().dropped)
    metrics.span_counts(tracer.counts)

    def publish(serving: Serving) -> None:
        previous = server.serving
        server.serving = serving
        # Sampling and propagation follow a reload at once; a new export target gets a new exporter.
        tracer.configure(serving.snapshot.tracing, serving.snapshot.service, span_batcher)
        # Before the first config, logging was set up from the bootstrap: a pushed level must take over from it.
        old, new = (previous.snapshot if previous else first), serving.snapshot
        if (old.logs.level, old.service) != (new.logs.level, new.service):
            tlogging.configure(new.logs.level, new.service)  # a renamed service: log lines must follow the spans
        if certificate is not None and new.tls is not None:
            certificate.configure(new.tls)  # other files or min_version: new handshakes use them (checked already)

    policies = Policies()
    metrics.bundle_revisions(policies.revision_rows)
    store = SnapshotStore(upstreams, metrics, publish, policies)
    source: FileSource | RemoteSource
    if bootstrap is None:
        source = FileSource(config_path, store)
    else:
        source = RemoteSource(bootstrap, store, rng)
        # The listeners are bound with the bootstrap's settings before any config arrives: a pushed version must
        # keep them (parser limits belong in the bootstrap).
        store.bind(first)
    admin_state = AdminState()
    if mesh is not None:
        admin_state.waiting_for = lambda: None if mesh.ready else "no valid mesh certificate"
    admin_runner = web.AppRunner(
        # peers (--workers only): /metrics answers for the whole group, see gateway/admin.py.
        build_admin_app(admin_state, lambda: server.serving, metrics, peers),
        access_log=None,
        handle_signals=False,
    )
    try:
        if isinstance(source, FileSource):
            await source.load_initial(first)
    except ConfigError as error:  # a policy bundle that does not load: nothing is bound yet
        print(str(error), file=sys.stderr)
        await upstreams.close()
        await policies.close()
        return 1
    snapshot = first

    # Signal handlers go in before anything is bound: /readyz answering 200 tells an orchestrator (or a test) that
    # SIGTERM drains and SIGHUP reloads; installed afterwards, a signal in between killed the process outright.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def on_sighup() -> None:
        if certificate is not None:
            certificate.reload("sighup")  # SIGHUP re-reads everything: the certificate too, changed or not
        task = loop.create_task(source.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    # workers.run_worker blocks these until now so that a signal during start-up waits for these handlers instead
    # of killing the process; one that came in meanwhile is delivered here. (A no-op when nothing blocked them.)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    listener_context = certificate.context if certificate is not None else None
    if mesh is not None:
        # The certificate is asked for before the listener binds, within a bound: a config service that is down
        # must not keep the admin port (and the cached config) from coming up. Until one arrives, mesh handshakes
        # fail and /readyz says 503; renewal keeps asking, with backoff.
        mesh.start()
        if not await mesh.wait_ready(MESH_STARTUP_WAIT):
            log.warning("mesh_certificate_pending", identity=mesh.identity, waited_s=MESH_STARTUP_WAIT)
        if mesh.listener is not None:
            listener_context = mesh.listener.context
    try:
        # The proxy listener first, the admin one second: /readyz may only say 200 once the proxy port accepts.
        await server.start(
            snapshot.listen.host,
            snapshot.listen.port,
            reuse_port=reuse_port,
            limits=snapshot.limits,
            ssl_context=listener_context,
            mesh_trust_domain=mesh.settings.trust_domain if mesh is not None else None,
            permissive=mesh is not None and mesh.settings.mtls == "permissive",
        )
        await admin_runner.setup()
        await web.TCPSite(admin_runner, snapshot.admin.host, snapshot.admin.port, reuse_port=reuse_port).start()
    except OSError as exc:
        log.error(
            "listen_failed", error=exc.strerror or str(exc), listen=str(snapshot.listen), admin=str(snapshot.admin)
        )
        await server.stop(drain_timeout=0.0)
        await admin_runner.cleanup()
        await upstreams.close()
        await policies.close()
        if mesh is not None:
            await mesh.stop()
        return 1

    # A remote source starts here: its first version (or the cached copy) makes /readyz 200, never before.
    source.start()
    if certificate is not None:
        certificate.start()  # watches the certificate files: a rotation on disk is served without a restart
    # Objects built at start-up live forever: move them out of the collector's way (cyclic GC showed up at 13% of
    # native time in the profiled proxy), and collect young objects less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    log.info(
        "gateway_started",
        listen=str(snapshot.listen),
        admin=str(snapshot.admin),
        tls=certificate is not None,
        mesh=mesh.settings.mtls if mesh is not None else None,
        identity=mesh.identity if mesh is not None else None,
        version=server.serving.snapshot.version if server.serving else None,
        config_service=bootstrap.settings.url if bootstrap else None,
    )

    await stop.wait()
    admin_state.draining = True
    await source.stop()  # no reload may start mid-drain
    if certificate is not None:
        await certificate.stop()
    drain_timeout = (server.serving.snapshot if server.serving else first).limits.drain_timeout
    log.info("draining", drain_timeout=drain_timeout)
    await server.stop(drain_timeout)
    await admin_runner.cleanup()
    await upstreams.close()
    if registry is not None:
        await registry.close()  # Upstreams does not own it
    if mesh is not None:
        await mesh.stop()  # after the drain: requests still in flight may open mesh connections
    await policies.close()
    await ratelimit.close()
    # Spans of the last requests are still queued: export them, bounded (a dead collector must not hold the exit).
    await loop.run_in_executor(None, tracer.shutdown, _SPAN_FLUSH_TIMEOUT)
    log.info("stopped")
    # Lines still queued for a slow stdout: written within a bound (a stdout nobody reads must not hold the exit).
    tlogging.flush()
    return 0
