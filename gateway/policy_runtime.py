"""Policy runtime handles: JWT key sources and Rego decision paths built from a snapshot, kept across reloads.

Config is data, runtime is handles (as for upstream clusters): ``Policies.apply`` turns a snapshot's ``authn`` and
``authz`` settings into a ``PolicyRuntime`` that requests pin through ``Serving``. A key source whose settings did
not change is reused (no JWKS refetch per reload), and so is a decision path whose engine settings, cache settings
and bundle are unchanged (its warm cache too). An embedded bundle is watched: when its files change it is loaded
again and the new decision path, with a fresh cache, replaces the old one in one attribute store; a bundle that
fails to load is logged and the old one keeps deciding.

The decision cache is made correct here. For the embedded engine the policy is analysed for every input path it
can read (``EmbeddedEngine.input_refs``): without a configured key the cache key is exactly those paths; with one,
a key that leaves out a path the policy reads is a config error, since two requests differing only there could
get each other's decision. For OPA the policy is out of sight, so the configured key is the author's promise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from gateway.config.errors import ConfigError, Problem
from gateway.config.policy import OPA_DEFAULT_CACHE_KEY
from gateway.config.snapshot import Snapshot
from policy.bundle import fingerprint, load_bundle
from policy.cache import DecisionCache, InputPath, uncovered
from policy.decision import Decision
from policy.engine import Engine, PolicyLoadError
from policy.engine_embedded import EmbeddedEngine
from policy.engine_remote import RemoteEngine
from policy.jwks import JwksKeys, KeySource, StaticKeys
from policy.settings import AuthnSettings, AuthzSettings, CacheSettings, EngineSettings
from policy.token_cache import VerifiedTokens
from telemetry.metrics import StateRow

__all__ = [
    "AuthnRuntime",
    "CachedDecision",
    "AuthzRuntime",
    "DecisionPath",
    "PolicyRuntime",
    "Policies",
    "check_policies",
]

log = structlog.get_logger("meshgate.policy")

# A cached decision keeps the rule's raw value with it: the decision log shows the result on a hit too.
CachedDecision = tuple[Decision, object]
_HTTP = ("attributes", "request", "http")
# Input paths that are the same for every request one applied config decides (or always null): never part of a key.
# Decision paths are reused across reloads only while the service stays the same (``Policies._authz``). The
# destination is not constant: a listener on 0.0.0.0 or :: sees each local address a client connected to.
_CONSTANT: tuple[InputPath, ...] = (("meshgate", "service"), ("parsed_body",))
# Paths fully determined by another one: the path (with its query) determines parsed_path and parsed_query.
_DERIVED: dict[InputPath, tuple[InputPath, ...]] = {(*_HTTP, "path"): (("parsed_path",), ("parsed_query",))}
# A key over the request id (as the input's id or as the x-request-id header the gateway puts in the headers) makes
# every request unique: such a cache would only cost memory.
_REQUEST_IDS: tuple[InputPath, ...] = ((*_HTTP, "id"), (*_HTTP, "headers", "x-request-id"))
# Built-ins whose result is not a function of the input and the bundle: the clock and randomness.
_VOLATILE_BUILTINS = frozenset({"time.now_ns", "rand.intn", "uuid.rfc4122"})
# Seconds a replaced engine stays open for requests that pinned it.
_RETIRE_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class AuthnRuntime:
    settings: AuthnSettings
    keys: KeySource
    # Lower-case names of the claim headers (and their `_` spellings): client-sent copies are removed from every
    # request, token or not.
    claim_headers: tuple[str, ...]
    tokens: VerifiedTokens = field(default_factory=VerifiedTokens)  # per runtime: new settings, new cache


@dataclass(frozen=True, slots=True)
class DecisionPath:
    """One engine asked one rule, with its cache. Pinned by a request for its whole decision."""

    settings: EngineSettings
    cache_settings: CacheSettings | None
    engine: Engine
    cache: DecisionCache[CachedDecision] | None
    key_paths: tuple[InputPath, ...]
    fingerprint: str  # of the embedded bundle's files ("" for OPA)


class AuthzRuntime:
    """The decision paths of one applied config. ``primary``/``shadow`` are swapped when a bundle reloads."""

    def __init__(self, settings: AuthzSettings, primary: DecisionPath, shadow: DecisionPath | None) -> None:
        self.settings = settings
        self.primary = primary
        self.shadow = shadow


@dataclass(frozen=True, slots=True)
class PolicyRuntime:
    authn: AuthnRuntime | None = None
    authz: AuthzRuntime | None = None


NO_POLICY = PolicyRuntime()


def check_policies(snapshot: Snapshot) -> None:
    """Load every embedded bundle the snapshot names, as ``meshgate check`` must; ConfigError lists what fails."""
    authz = snapshot.authz
    if authz is None:
        return
    problems: list[Problem] = []
    for where, settings in _engines(authz):
        if settings.engine == "embedded":
            try:
                _plan(_load_embedded(settings), authz.cache, where)
            except PolicyLoadError as error:
                problems.append(Problem(f"{where}.bundle", str(error)))
            except ConfigError as error:
                problems.extend(error.problems)
    if problems:
        raise ConfigError(tuple(problems))


def _engines(authz: AuthzSettings) -> list[tuple[str, EngineSettings]]:
    engines = [("authz", authz.primary)]
    if authz.shadow is not None:
        engines.append(("authz.shadow", authz.shadow))
    return engines


def _load_embedded(settings: EngineSettings) -> EmbeddedEngine:
    assert settings.bundle is not None
    return EmbeddedEngine(load_bundle(settings.bundle), settings.decision)


def _plan(
    engine: Engine, cache: CacheSettings | None, where: str
) -> tuple[DecisionCache[CachedDecision] | None, tuple[InputPath, ...]]:
    """The cache and its key for ``engine``, or ``(None, ())`` when decisions are not cached."""
    if cache is None:
        return None, ()
    if not isinstance(engine, EmbeddedEngine):
        key = cache.key if cache.key is not None else OPA_DEFAULT_CACHE_KEY
        return DecisionCache(cache.ttl, cache.max_entries), key
    volatile = sorted(engine.builtins_called & _VOLATILE_BUILTINS)
    if volatile:
        # Not a config error: the policy is fine, only caching its decisions is not.
        log.warning(
            "authz_cache_disabled",
            where=where,
            reason=f"the policy calls {', '.join(volatile)}: its decisions change without its input changing",
        )
        return None, ()
    reads = [read for read in engine.input_refs if not any(read[: len(c)] == c for c in _CONSTANT)]
    if cache.key is None:
        key = tuple(sorted(set(reads)))
        if any(unique[: len(read)] == read for read in key for unique in _REQUEST_IDS):
            log.warning(
                "authz_cache_disabled",
                where=where,
                reason="the policy reads the request id (or an object holding it): every request would miss",
            )
            return None, ()
        return DecisionCache(cache.ttl, cache.max_entries), key
    determined = [*cache.key, *_CONSTANT, *(d for k in cache.key for d in _DERIVED.get(k, ()))]
    missing = uncovered(determined, reads)
    if missing:
        shown = ", ".join("input." + ".".join(path) if path else "input (all of it)" for path in missing)
        raise ConfigError(
            (
                Problem(
                    "authz.cache.key",
                    f"the policy reads {shown}, which the key leaves out (two requests differing there would share "
                    "a decision); add it, or drop `key` to let meshgate key on exactly what the policy reads",
                ),
            )
        )
    return DecisionCache(cache.ttl, cache.max_entries), cache.key


class Policies:
    """Builds and keeps the policy runtime; one per gateway process."""

    def __init__(self, *, watch_interval: float = 1.0) -> None:
        self._watch_interval = watch_interval
        self._keys: dict[tuple[str | None, str | None, float], KeySource] = {}
        self._current = NO_POLICY
        self._service = ""
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # cuts retirement grace periods short: close() closes what they hold

    @property
    def current(self) -> PolicyRuntime:
        return self._current

    def revision_rows(self) -> list[StateRow]:
        """``(policy, revision)`` of each loaded decision path, for ``meshgate_authz_bundle_info`` (an OPA path
        shows the revision OPA reported with its latest decision, nothing before the first)."""
        authz = self._current.authz
        if authz is None:
            return []
        paths = (("primary", authz.primary), ("shadow", authz.shadow))
        return [((role, path.engine.revision), 1.0) for role, path in paths if path and path.engine.revision]

    async def apply(self, snapshot: Snapshot) -> PolicyRuntime:
        """The runtime for ``snapshot``, reusing what did not change; ConfigError (nothing changed) if a bundle
        fails to load or the cache key is unsound."""
        # A cached decision may rest on `input.meshgate.service` (never part of a key): no reuse across a rename.
        reuse = snapshot.service == self._service
        authz = self._authz(snapshot.authz, reuse)  # first: it can fail, and must fail before anything is replaced
        authn = await self._authn(snapshot.authn)
        self._service = snapshot.service
        previous, self._current = self._current, PolicyRuntime(authn, authz)
        self._retire(previous, self._current)
        if authz is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
        return self._current

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        # Not cancelled: a retirement task cancelled before it ran would never close its engines or key sources.
        self._closing.set()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        engines = _open_engines(self._current)
        await asyncio.gather(*(engine.close() for engine in engines), return_exceptions=True)
        await asyncio.gather(*(keys.close() for keys in self._keys.values()), return_exceptions=True)

    async def _authn(self, settings: AuthnSettings | None) -> AuthnRuntime | None:
        if settings is None:
            return None
        ident = (settings.jwks_url, settings.key_file, settings.refresh)
        keys = self._keys.get(ident)
        if keys is None:
            if settings.jwks_url is not None:
                keys = JwksKeys(settings.jwks_url, refresh_interval=settings.refresh)
            else:
                assert settings.key_file is not None
                try:
                    keys = StaticKeys.from_file(settings.key_file)
                except ValueError as error:
                    raise ConfigError((Problem("authn.jwt.key_file", str(error)),)) from None
            await keys.start()
            self._keys[ident] = keys
        return AuthnRuntime(settings, keys, _claim_header_names(settings))

    def _authz(self, settings: AuthzSettings | None, reuse: bool) -> AuthzRuntime | None:
        if settings is None:
            return None
        old = self._current.authz if reuse else None
        reusable = [old.primary, *((old.shadow,) if old.shadow else ())] if old is not None else []
        problems: list[Problem] = []
        paths: list[DecisionPath | None] = []
        for where, engine_settings in _engines(settings):
            try:
                paths.append(self._path(engine_settings, settings.cache, where, reusable))
            except PolicyLoadError as error:
                problems.append(Problem(f"{where}.bundle", str(error)))
                paths.append(None)
            except ConfigError as error:
                problems.extend(error.problems)
                paths.append(None)
        if problems:
            raise ConfigError(tuple(problems))
        primary = paths[0]
        assert primary is not None
        return AuthzRuntime(settings, primary, paths[1] if len(paths) > 1 else None)

    def _path(
        self, settings: EngineSettings, cache: CacheSettings | None, where: str, reusable: Iterable[DecisionPath]
    ) -> DecisionPath:
        current = fingerprint(settings.bundle) if settings.engine == "embedded" and settings.bundle else ""
        for path in reusable:
            if (path.settings, path.cache_settings, path.fingerprint) == (settings, cache, current):
                return path
        return _build_path(settings, cache, where, current)

    def _retire(self, previous: PolicyRuntime, current: PolicyRuntime) -> None:
        """Close engines the new runtime no longer uses, after a grace period for requests still running."""
        stale = _open_engines(previous) - _open_engines(current)
        if stale:
            task = asyncio.create_task(_close_later(stale, _RETIRE_GRACE, self._closing))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        used = {(s.jwks_url, s.key_file, s.refresh) for s in ([current.authn.settings] if current.authn else [])}
        for ident in [ident for ident in self._keys if ident not in used]:
            keys = self._keys.pop(ident)
            task = asyncio.create_task(keys.close())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _watch(self) -> None:
        """Reload embedded bundles whose files changed."""
        while True:
            await asyncio.sleep(self._watch_interval)
            authz = self._current.authz
            if authz is None:
                continue
            for role in ("primary", "shadow"):
                path: DecisionPath | None = getattr(authz, role)
                if path is None or path.settings.engine != "embedded" or path.settings.bundle is None:
                    continue
                with contextlib.suppress(OSError):
                    current = fingerprint(path.settings.bundle)
                    if current == path.fingerprint:
                        continue
                    self._reload(authz, role, path, current)

    def _reload(self, authz: AuthzRuntime, role: str, old: DecisionPath, current: str) -> None:
        where = "authz" if role == "primary" else "authz.shadow"
        try:
            new = _build_path(old.settings, old.cache_settings, where, current)
        except OSError:
            raise  # files changing under the read: `_watch` tries again on its next tick
        except Exception as error:  # whatever it is: a watcher that died would leave the old policy deciding forever
            # Remember the failed fingerprint: the same broken files are not reported every second.
            setattr(authz, role, _replace_fingerprint(old, current))
            log.error(
                "policy_reload_failed", bundle=old.settings.bundle, error=str(error), revision=old.engine.revision
            )
            return
        setattr(authz, role, new)  # one attribute store: the next request decides with the new policy
        log.info(
            "policy_reloaded", bundle=old.settings.bundle, revision=new.engine.revision, previous=old.engine.revision
        )


def _claim_header_names(settings: AuthnSettings) -> tuple[str, ...]:
    """The forwarded claim headers, each also spelled with ``_`` for ``-``: CGI-style servers (WSGI, PHP) read
    ``x-user`` and ``x_user`` as the same ``HTTP_X_USER``, so a client copy in either spelling must go."""
    names = (header for _, header in settings.forward_claims)
    return tuple(dict.fromkeys(spelling for name in names for spelling in (name, name.replace("-", "_"))))


def _build_path(settings: EngineSettings, cache: CacheSettings | None, where: str, fingerprint_: str) -> DecisionPath:
    engine: Engine
    if settings.engine == "embedded":
        engine = _load_embedded(settings)
    else:
        assert settings.opa_url is not None
        engine = RemoteEngine(settings.opa_url, settings.decision, settings.timeout)
    decision_cache, key = _plan(engine, cache, where)
    return DecisionPath(settings, cache, engine, decision_cache, key, fingerprint_)


def _replace_fingerprint(path: DecisionPath, fingerprint_: str) -> DecisionPath:
    return DecisionPath(path.settings, path.cache_settings, path.engine, path.cache, path.key_paths, fingerprint_)


def _open_engines(runtime: PolicyRuntime) -> set[Engine]:
    authz = runtime.authz
    if authz is None:
        return set()
    return {authz.primary.engine, *((authz.shadow.engine,) if authz.shadow else ())}


async def _close_later(engines: Iterable[Engine], grace: float, closing: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing.wait(), grace)
    await asyncio.gather(*(engine.close() for engine in engines), return_exceptions=True)
