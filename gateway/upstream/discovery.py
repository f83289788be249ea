"""Endpoint discovery: turn a cluster's DNS name into addresses, and addresses into long-lived ``Endpoint`` objects.

``DnsResolver`` is the I/O shell: it resolves every A/AAAA record of a name now and every ``refresh`` seconds, and
reports the address set through ``on_change`` only when the set differs from the last one reported. A failed or
empty resolution keeps the last good set (logged), so a DNS hiccup never empties a cluster.

``reconcile`` is the pure half, also used for static endpoint lists on config reload: it maps the new address list
onto the existing ``Endpoint`` objects by address, so in-flight counts and latency estimates survive, and creates
objects only for new addresses. A removed endpoint is just dropped from the mapping; requests still in flight on it
hold the object and finish normally.

The config service's instance registry is the third source; it lives in ``registry.py`` and feeds ``reconcile`` the
same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import structlog

from gateway.config.snapshot import Address, DnsDiscovery, EndpointSpec
from gateway.upstream.state import Endpoint

__all__ = ["DnsResolver", "OnChange", "Resolve", "getaddrinfo_resolve", "reconcile"]

Resolve = Callable[[str, int], Awaitable[Sequence[Address]]]
"""``(host, port) -> addresses``; raises ``OSError`` (e.g. ``socket.gaierror``) when the name does not resolve."""
OnChange = Callable[[tuple[Address, ...]], None]

_log = structlog.get_logger(__name__)


async def getaddrinfo_resolve(host: str, port: int) -> list[Address]:
    """Every A/AAAA record of ``host`` as ``Address(ip, port)``, via the loop's ``getaddrinfo`` (a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [Address(str(sockaddr[0]), int(sockaddr[1])) for _, _, _, _, sockaddr in infos]


class DnsResolver:
    """Keeps one cluster's DNS-discovered address set current. ``start()`` in a running loop; ``await stop()``.

    ``on_change`` runs on the event loop with the new set, sorted; ``upstream`` (the cluster name) labels the logs.
    """

    def __init__(
        self,
        spec: DnsDiscovery,
        on_change: OnChange,
        *,
        upstream: str = "",
        resolve: Resolve = getaddrinfo_resolve,
        timeout: float = 5.0,
    ) -> None:
        self._upstream = upstream or spec.host  # the cluster name, for logs
        self._spec = spec
        self._on_change = on_change
        self._resolve = resolve
        self._timeout = timeout  # getaddrinfo can hang for the resolver's full retry cycle; don't stall refreshes
        self._addresses: tuple[Address, ...] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> tuple[Address, ...] | None:
        """The last set reported through ``on_change`` (sorted), or None before the first good resolution."""
        return self._addresses

    def start(self) -> None:
        """Resolve now, then every ``refresh`` seconds, in a background task. Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"dns:{self._upstream}")

    async def stop(self) -> None:
        """Cancel the refresh task and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> bool:
        """Resolve once; call ``on_change`` if the set changed. True when the resolution gave a usable answer.

        Never raises (except on cancellation): failures are logged and the last good set stays in force.
        """
        host, port = self._spec.host, self._spec.port
        try:
            async with asyncio.timeout(self._timeout):
                found = await self._resolve(host, port)
        except (OSError, TimeoutError) as exc:
            _log.warning("dns_resolve_failed", upstream=self._upstream, host=host, error=repr(exc))
            return False
        except Exception:
            _log.exception("dns_resolve_error", upstream=self._upstream, host=host)
            return False
        if not found:
            # An empty answer is treated like a failure: dropping every endpoint on one bad answer turns a DNS
            # blip into an outage, while stale addresses at worst fail and get retried or ejected.
            _log.warning("dns_resolve_empty", upstream=self._upstream, host=host)
            return False
        addresses = tuple(sorted(set(found), key=lambda a: (a.host, a.port)))  # sorted: stable balancer order
        if addresses != self._addresses:
            try:
                self._on_change(addresses)
            except Exception:
                # Not recorded as current, so the next refresh offers the same set again.
                _log.exception("dns_on_change_failed", upstream=self._upstream, host=host)
                return True
            self._addresses = addresses  # logging the change is on_change's job: it knows what it did with it
        return True

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._spec.refresh)


def reconcile(
    current: Mapping[str, Endpoint],
    addresses: Iterable[Address | EndpointSpec],
    cluster: str,
    weight: int = 1,
) -> dict[str, Endpoint]:
    """The endpoint mapping for ``addresses``, keyed by ``str(address)`` in the given order.

    Existing objects in ``current`` are reused (and take the new weight); new addresses get fresh ``Endpoint``
    objects. An ``EndpointSpec`` carries its own weight; a bare ``Address`` (DNS) gets ``weight``. Duplicates keep
    their first occurrence. ``current`` is not modified.
    """
    result: dict[str, Endpoint] = {}
    for item in addresses:
        if isinstance(item, EndpointSpec):
            address, item_weight = item.address, item.weight
        else:
            address, item_weight = item, weight
        if item_weight < 1:
            raise ValueError(f"endpoint weight must be >= 1, got {item_weight} for {address}")
        key = str(address)
        if key in result:
            continue
        endpoint = current.get(key)
        if endpoint is None or endpoint.cluster != cluster:
            endpoint = Endpoint(cluster, address, item_weight)
        else:
            # Weight is config, not runtime state: take the new one; the caller's balancer.update() applies it.
            endpoint.weight = item_weight
        result[key] = endpoint
    return result
