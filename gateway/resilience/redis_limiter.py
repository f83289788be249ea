"""A token bucket shared by every gateway replica, kept in Redis and updated by one atomic Lua script.

Each bucket is a hash ``{prefix}:rl:{key}`` with fields ``tokens`` (float) and ``ts`` (microseconds, Redis's own
clock). The script refills the bucket for the time since ``ts`` (``rate`` tokens per second, capped at ``burst``),
takes the requested tokens if they are there, and answers ``{admitted, retry_after_ms}``. Decisions:

* **Redis's clock, not the gateways'**: the script reads ``TIME``, so replicas with skewed clocks share one bucket
  correctly. A script that calls ``TIME`` is non-deterministic, so it must be replicated by its effects, which is
  the only mode since Redis 7 (and the default since 5).
* **A denial writes nothing** (unless Redis's clock went backwards past ``ts``): refill is linear and capped, so
  computing it later from the older ``ts`` gives the same answer, and a flood of denied requests causes no writes.
* **Expiry**: every write sets ``PEXPIRE`` to twice the time a bucket takes to refill from empty. A bucket idle that
  long is full anyway, so expiry loses nothing and idle keys (one per client) do not pile up.
* **EVALSHA first**: the script's SHA1 is computed locally; on ``NOSCRIPT`` (a restarted or flushed Redis, a
  failover) the call is repeated once as ``EVAL``, which runs the script and caches it again.

``take`` never raises for Redis trouble. It answers ``None`` when Redis is unreachable, slow (no answer within
``timeout``, the whole call included), or fails, and the caller then falls back to its local bucket. After such a
failure the limiter does not hammer Redis: for ``cooldown`` seconds (1 s by default) every ``take`` answers ``None``
at once, then a single call probes Redis while the others keep answering ``None``, and its outcome closes the
circuit or trips it for another ``cooldown``. ``RedisCircuit`` is that state machine, pure with ``now`` passed in;
the limiter reads an injected ``clock``.

At most ``max_connections`` commands are in flight at once (a small pool); a call that cannot get a connection
within ``timeout`` answers ``None`` too, but without tripping the circuit, since Redis itself has not failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any, Literal

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from gateway.config.snapshot import Address

__all__ = ["DEFAULT_COOLDOWN", "SCRIPT", "CircuitState", "RedisCircuit", "RedisLimiter", "bucket_key"]

DEFAULT_COOLDOWN = 1.0  # seconds during which take() answers None at once after a Redis failure

# KEYS[1] = the bucket hash; ARGV = rate (tokens/s), burst, requested tokens. Returns {admitted (1|0), retry_ms}.
# Numbers are written with string.format: Lua's own tostring keeps only 14 digits, too few for a microsecond clock.
SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local requested = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000000)
local admitted = 0
local retry_ms = 0
if tokens >= requested then
  admitted = 1
  tokens = tokens - requested
else
  retry_ms = math.max(1, math.ceil((requested - tokens) * 1000 / rate))
end
if admitted == 1 or ts > now then
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(2000 * burst / rate)))
end
return {admitted, retry_ms}
"""
_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

_log = structlog.get_logger("meshgate.ratelimit")

CircuitState = Literal["closed", "tripped", "probing"]


def bucket_key(prefix: str, key: str) -> str:
    """The Redis key of one bucket; ``key`` is built by the caller from the route name and the limit key."""
    return f"{prefix}:rl:{key}"


class RedisCircuit:
    """Stops calls to Redis for ``cooldown`` seconds after a failure, then lets one probe through. Pure.

    ``closed``: calls go through. ``tripped``: ``admit`` says no until ``cooldown`` has passed since the last
    failure. ``probing``: one admitted call is in flight to test Redis; the others are refused until it reports.
    Every admitted call must report exactly one of ``succeeded``, ``failed`` or ``abandoned``.
    """

    __slots__ = ("_probing", "_until", "cooldown", "trips")

    def __init__(self, cooldown: float = DEFAULT_COOLDOWN) -> None:
        if cooldown < 0:
            raise ValueError("cooldown must be >= 0")
        self.cooldown = cooldown
        self.trips = 0  # times it went from closed to tripped
        self._until: float | None = None  # None = closed
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._until is None:
            return "closed"
        if self._probing:
            return "probing"
        return "tripped"

    def admit(self, now: float) -> bool:
        """Whether a call may go to Redis now; the first call after the cooldown becomes the probe."""
        if self._until is None:
            return True
        if self._probing or now < self._until:
            return False
        self._probing = True
        return True

    def succeeded(self) -> bool:
        """Redis answered. True when this closed a tripped circuit."""
        recovered = self._until is not None
        self._until = None
        self._probing = False
        return recovered

    def failed(self, now: float) -> bool:
        """Redis failed or was too slow. True when this tripped a closed circuit."""
        tripped = self._until is None
        if tripped:
            self.trips += 1
        self._until = now + self.cooldown
        self._probing = False
        return tripped

    def abandoned(self) -> None:
        """An admitted call ended without telling anything about Redis (cancelled, no free connection)."""
        self._probing = False


class RedisLimiter:
    """Shared token buckets in the Redis at ``address``. Create and use it inside one event loop; ``await close()``.

    ``timeout`` bounds each ``take`` as a whole and is the socket connect/read timeout. ``clock`` (seconds, any
    monotonic clock) only drives the circuit; bucket time is Redis's.
    """

    def __init__(
        self,
        address: Address,
        timeout: float,
        prefix: str,
        *,
        max_connections: int = 8,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.address = address
        self.prefix = prefix
        self.circuit = RedisCircuit(cooldown)
        self._timeout = timeout
        self._clock = clock
        # Bounds commands in flight to the pool size, so the pool never raises "too many connections".
        self._slots = asyncio.Semaphore(max_connections)
        self._client: Redis = Redis(
            host=address.host,
            port=address.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            # No client-side retries: the caller has a fallback, and a retry would only stretch the timeout.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    @property
    def state(self) -> CircuitState:
        """The circuit's state, for /status and logs."""
        return self.circuit.state

    async def take(self, key: str, rate: float, burst: int, *, requested: int = 1) -> float | None:
        """Take ``requested`` tokens from the shared bucket ``key`` (``rate`` per second, ``burst`` at most).

        0.0: admitted. > 0: denied, retry after that many seconds. None: Redis could not decide (unreachable,
        slow, failing, or the circuit is tripped); fall back to the local bucket.
        """
        if rate <= 0 or burst < 1 or not 1 <= requested <= burst:
            raise ValueError(f"need rate > 0 and 1 <= requested <= burst, got {rate=} {burst=} {requested=}")
        if not self.circuit.admit(self._clock()):
            return None
        acquired = False
        answered = False  # Redis answered or failed: the circuit is told which; otherwise it is told "abandoned"
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
                acquired = True
                reply = await self._run(bucket_key(self.prefix, key), repr(float(rate)), burst, requested)
            admitted, retry_ms = int(reply[0]), int(reply[1])
            answered = True
        except (RedisError, OSError, TimeoutError, IndexError, TypeError, ValueError) as exc:
            if not acquired:
                return None  # no free connection for the whole timeout: our queue, not a Redis failure
            answered = True
            if self.circuit.failed(self._clock()):
                _log.warning("redis_limiter_unavailable", redis=str(self.address), error=repr(exc))
            # Idle pooled connections may all point at a Redis that has since restarted: each would fail once more
            # and re-trip the circuit. Drop them; the next call dials fresh.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            return None
        finally:
            if acquired:
                self._slots.release()
            if not answered:
                self.circuit.abandoned()  # cancelled, or never got a connection: frees the probe slot
        if self.circuit.succeeded():
            _log.info("redis_limiter_recovered", redis=str(self.address))
        return 0.0 if admitted else retry_ms / 1000.0

    async def _run(self, full_key: str, rate: str, burst: int, requested: int) -> Any:
        try:
            return await self._client.evalsha(_SHA, 1, full_key, rate, burst, requested)
        except NoScriptError:
            # Redis restarted, failed over or was flushed: EVAL runs the script and caches it for the next EVALSHA.
            return await self._client.eval(SCRIPT, 1, full_key, rate, burst, requested)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
