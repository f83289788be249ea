"""A small typed layer over the ``aetcd`` client: the few etcd v3 calls the etcd config store makes.

``aetcd`` (asyncio, gRPC) ships no type information and reports failures as its own exception tree; this module is
the one place that touches it, so the store reads as plain typed code. It gives:

- ``EtcdKV``: ranges, puts, deletes, transactions, leases and a prefix watch, with keys and values as ``bytes``;
- ``KV`` / ``WatchEvent``: frozen copies of etcd's key-value records (the store never sees protobuf objects);
- ``Compare`` / ``Op`` builders for transactions (``version_is``, ``mod_is``, ``put``, ``delete``, ``get``);
- errors: ``EtcdUnavailable`` (a ``ConnectionError``: etcd cannot be reached or did not answer in time; an HTTP API
  maps it to 503), ``EtcdCompacted`` (a watch asked for history etcd has compacted), ``EtcdError`` (anything else);
  etcd's "request is too large" becomes a ``ValueError``.

Several endpoints are handed to gRPC as one ``ipv4:``/``ipv6:`` target, whose ``pick_first`` policy fails over
between them; that needs IP literals, so a host name is accepted only as a single endpoint (gRPC resolves it).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NewType

import aetcd  # type: ignore[import-untyped]  # aetcd ships no type information; this module is its typed face
import aetcd.utils  # type: ignore[import-untyped]

__all__ = [
    "KV",
    "Compare",
    "EtcdCompacted",
    "EtcdError",
    "EtcdKV",
    "EtcdUnavailable",
    "Op",
    "Watch",
    "WatchEvent",
    "delete",
    "delete_prefix",
    "get",
    "get_prefix",
    "grpc_target",
    "mod_is",
    "prefix_end",
    "put",
    "version_is",
]

# gRPC refuses received messages over 4 MiB by default; a bundle read in one range is larger (up to the API's
# 64 MiB, in chunks), and etcd itself sends up to 2 GiB. The request side is bounded by etcd's --max-request-bytes.
_MAX_RECEIVE = 256 * 1024 * 1024
_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": _MAX_RECEIVE,
    # gRPC's default reconnect backoff grows to 120 s, and calls fail at once while it waits: after an etcd restart
    # the store would stay unavailable for up to two minutes. Retry the connection every 0.1 s growing to 2 s.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
    # The watch stream is idle between changes; without pings a silently lost etcd (a partition, a dead host)
    # would leave it hanging forever and no waiter would wake. etcd refuses pings more often than every 5 s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}

Compare = NewType("Compare", object)  # an aetcd compare, built only by the helpers below
Op = NewType("Op", object)  # an aetcd transaction operation, idem


class EtcdError(RuntimeError):
    """etcd answered with an error this layer has no better name for."""


class EtcdUnavailable(ConnectionError):
    """etcd could not be reached, or did not answer within the request timeout."""


class EtcdCompacted(EtcdError):
    """A watch asked for revisions etcd has already compacted away."""


@dataclass(frozen=True, slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int  # for a DELETE watch event: the revision of the deletion
    version: int
    lease: int  # 0: none


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KV


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes ``[prefix, end)`` exactly the keys starting with ``prefix``."""
    return bytes(aetcd.utils.prefix_range_end(prefix))


def version_is(key: bytes, version: int) -> Compare:
    """The key's version (writes since its creation) equals ``version``; 0 means the key does not exist."""
    compare = aetcd.transactions.Version(key)
    compare == version  # noqa: B015  # aetcd builds a compare by overloading ==: it records the operand
    return Compare(compare)


def mod_is(key: bytes, revision: int) -> Compare:
    """The key was last written at ``revision``; 0 means the key does not exist (etcd compares a missing key as
    all zeros)."""
    compare = aetcd.transactions.Mod(key)
    compare == revision  # noqa: B015  # see version_is
    return Compare(compare)


def put(key: bytes, value: bytes, lease: int = 0) -> Op:
    return Op(aetcd.transactions.Put(key, value, lease=lease))


def delete(key: bytes) -> Op:
    return Op(aetcd.transactions.Delete(key))


def delete_prefix(prefix: bytes) -> Op:
    return Op(aetcd.transactions.Delete(prefix, range_end=prefix_end(prefix)))


def get(key: bytes) -> Op:
    return Op(aetcd.transactions.Get(key))


def get_prefix(prefix: bytes) -> Op:
    return Op(aetcd.transactions.Get(prefix, range_end=prefix_end(prefix)))


def grpc_target(endpoints: Sequence[str]) -> tuple[str, int]:
    """``["10.0.0.1:2379", "10.0.0.2:2379"]`` -> the ``(host, port)`` pair aetcd joins into one gRPC target.

    aetcd connects to ``f"{host}:{port}"``; several endpoints become ``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,...``),
    which gRPC's resolver understands as one channel over all of them.
    """
    if not endpoints:
        raise ValueError("no etcd endpoints given")
    parsed: list[tuple[str, int]] = []
    for endpoint in endpoints:
        text = endpoint.removeprefix("http://")
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port")
        parsed.append((host, int(port)))
    if len(parsed) == 1:
        return parsed[0]
    families = set()
    for host, _ in parsed:
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"etcd endpoint {host!r}: several endpoints must be IP addresses") from None
    if len(families) != 1:
        raise ValueError("etcd endpoints: do not mix IPv4 and IPv6 addresses")
    scheme = "ipv4" if families == {4} else "ipv6"
    head = ",".join(f"{host}:{port}" for host, port in parsed[:-1])
    last_host, last_port = parsed[-1]
    return f"{scheme}:{head},{last_host}", last_port


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn aetcd's exceptions into this module's (and ``ValueError`` for an oversized request)."""
    try:
        yield
    except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as exc:
        raise EtcdUnavailable(f"etcd unavailable during {what}: {exc}") from exc
    except aetcd.RevisionCompactedError as exc:
        raise EtcdCompacted(str(exc)) from exc
    except aetcd.InvalidArgumentError as exc:
        if "too large" in str(exc):
            raise ValueError(f"etcd refused {what}: {exc}") from exc
        raise EtcdError(f"etcd refused {what}: {exc}") from exc
    except aetcd.ClientError as exc:
        raise EtcdError(f"etcd error during {what}: {exc}") from exc


def _kv(raw: Any) -> KV:
    return KV(
        key=bytes(raw.key),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        version=int(raw.version),
        lease=int(raw.lease),
    )


class Watch:
    """One running watch: iterate for events (it raises ``EtcdUnavailable``/``EtcdCompacted``/``EtcdError`` when
    the stream breaks), ``await cancel()`` to stop it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    async def events(self) -> AsyncIterator[WatchEvent]:
        with _translated("watch"):
            async for event in self._raw:
                yield WatchEvent("put" if event.kind == "PUT" else "delete", _kv(event.kv))

    async def cancel(self) -> None:
        with contextlib.suppress(aetcd.ClientError):
            await self._raw.cancel()


class EtcdKV:
    """The etcd calls the store needs. Every call has the ``timeout`` deadline (seconds) except the watch stream."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0) -> None:
        host, port = grpc_target(endpoints)
        self.endpoints = tuple(endpoints)
        self._client = aetcd.Client(
            host=host,
            port=port,
            timeout=timeout,
            options=_CHANNEL_OPTIONS,
        )

    async def close(self) -> None:
        with contextlib.suppress(aetcd.ClientError):
            await self._client.close()

    async def revision(self) -> int:
        """etcd's current revision (a one-key read; its header carries the store-wide revision)."""
        with _translated("read"):
            response = await self._client.get_prefix(b"\0", keys_only=True)  # empty range: only the header matters
        return int(response.header.revision)

    async def get(self, key: bytes) -> KV | None:
        with _translated("read"):
            found = await self._client.get(key)
        return None if found is None else _kv(found)

    async def get_prefix(self, prefix: bytes) -> list[KV]:
        """Every key under ``prefix``, in key order, from one consistent read."""
        with _translated("read"):
            response = await self._client.get_prefix(prefix, sort_order="ascend", sort_target="key")
        return [_kv(raw) for raw in response.kvs]

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write ``key``; the revision it was written at."""
        with _translated("write"):
            response = await self._client.put(key, value, lease=lease or None)
        return int(response.header.revision)

    async def delete(self, key: bytes) -> bool:
        with _translated("delete"):
            response = await self._client.delete(key)
        return bool(response.deleted) if response is not None else False

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> tuple[bool, list[list[KV]]]:
        """Run a transaction; ``(succeeded, results)`` with one ``list[KV]`` per ``get``/``get_prefix`` op of the
        branch that ran (other ops give no entry)."""
        with _translated("transaction"):
            succeeded, responses = await self._client.transaction(list(compare), list(success), list(failure))
        results = [[_kv(found) for _, found in response] for response in responses if isinstance(response, list)]
        return bool(succeeded), results

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease of ``ttl`` seconds: ``(lease id, granted ttl)`` (etcd raises a TTL below its minimum)."""
        with _translated("lease grant"):
            lease = await self._client.lease(ttl)
        return int(lease.id), int(lease.ttl)

    async def revoke(self, lease_id: int) -> None:
        """Revoke a lease (deleting the keys still attached to it); a lease that is already gone is not an error."""
        try:
            with _translated("lease revoke"):
                await self._client.revoke_lease(lease_id)
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def watch(self, key: bytes, range_end: bytes, start_revision: int) -> Watch:
        """Watch ``[key, range_end)`` from ``start_revision`` (inclusive); returns once etcd created the watch."""
        with _translated("watch"):
            raw = await self._client.watch(key, range_end=range_end, start_revision=start_revision)
        return Watch(raw)
